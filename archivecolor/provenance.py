"""What was done to each file: the JSON sidecar (versioned schema), embedded XMP, and verification."""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from xml.sax.saxutils import escape

from archivecolor import __version__
from archivecolor.imageio import atomic_write_bytes, file_walk, find_xmp, is_temp_file
from archivecolor.models.weights import sha256_bytes, sha256_file

SCHEMA_PATH = Path(__file__).with_name("provenance.schema.json")
SCHEMA_VERSION = 2  # 2: source.root is relative to OUT_DIR
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
IPTC_EXT_NS = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
ARCHIVECOLOR_NS = "urn:archivecolor:provenance:1.0#"
SIDECAR_SUFFIX = ".json"
SIDECAR_SCHEMA = "archivecolor.sidecar"


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + SIDECAR_SUFFIX)


def xmp_sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".xmp")


def document_id(source_sha256: str, params_key: str) -> str:
    """Stable across re-runs of the same source with the same models and parameters."""
    return f"xmp.did:{uuid.uuid5(uuid.NAMESPACE_URL, f'archivecolor:{source_sha256}:{params_key}')}"


def instance_id(source_sha256: str, params_key: str) -> str:
    """Derived from content, like the document id: the same source, models, parameters and references
    give a byte-identical output, so a re-run can be checked against the first by hash."""
    return f"xmp.iid:{uuid.uuid5(uuid.NAMESPACE_URL, f'archivecolor-instance:{source_sha256}:{params_key}')}"


# Recorded, but they do not change the pixels: left out of the record digest so that outputs stay
# byte-identical across engines and batch settings.
_UNDIGESTED_PARAMETERS = frozenset({"engine", "batch_size", "jobs"})


def record_digest(source_sha256: str, references: list[dict], models: dict[str, str], backbone: str, provider: str,
                  parameters: dict) -> str:
    """The digest of what a sidecar says made its output. The output's XMP carries it, so `verify` can
    tell a sidecar whose references, models, provider or parameters were edited afterwards."""
    # A reference's overall colour (a chosen reference's share of the scan's mean colour) changes the pixels;
    # records made without it digest as before.
    claims = {"source": source_sha256,
              "references": [[r["path"], r["sha256"]] + ([r["overall_colour"]] if "overall_colour" in r else [])
                             for r in references],
              "models": models, "backbone": backbone, "provider": provider,
              "parameters": {k: v for k, v in parameters.items() if k not in _UNDIGESTED_PARAMETERS}}
    return "sha256:" + sha256_bytes(json.dumps(claims, sort_keys=True).encode())


def build_xmp(source_rel: str, source_sha256: str, params_key: str, references: list[dict], digest: str) -> bytes:
    """An XMP packet marking the file as an AI-colorized derivative of its source.

    It carries no wall-clock time (the JSON sidecar records when), so that outputs are reproducible
    byte for byte; ``params_key`` must identify the models, parameters and references, and ``digest`` is
    the sidecar's `record_digest`.
    """
    agent = f"archivecolor {__version__}"
    refs = ", ".join(Path(r["path"]).name for r in references)
    params = escape(f"exemplar colorization; references: {refs}")
    description = escape(f"Colorized derivative of {source_rel}; colours are an algorithmic estimate, not a record.")
    packet = f"""<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:Iptc4xmpExt="{IPTC_EXT_NS}"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:stRef="http://ns.adobe.com/xap/1.0/sType/ResourceRef#"
    xmlns:stEvt="http://ns.adobe.com/xap/1.0/sType/ResourceEvent#"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:archivecolor="{ARCHIVECOLOR_NS}"
    Iptc4xmpExt:DigitalSourceType="{DIGITAL_SOURCE_TYPE}"
    Iptc4xmpExt:AISystemUsed="archivecolor exemplar-based colorization"
    Iptc4xmpExt:AISystemVersionUsed="{__version__}"
    xmp:CreatorTool="{agent}"
    xmpMM:DocumentID="{document_id(source_sha256, params_key)}"
    xmpMM:InstanceID="{instance_id(source_sha256, params_key)}"
    xmpMM:OriginalDocumentID="sha256:{source_sha256}"
    archivecolor:RecordDigest="{digest}">
   <xmpMM:DerivedFrom rdf:parseType="Resource">
    <stRef:documentID>sha256:{source_sha256}</stRef:documentID>
    <stRef:filePath>{escape(source_rel)}</stRef:filePath>
   </xmpMM:DerivedFrom>
   <xmpMM:History>
    <rdf:Seq>
     <rdf:li rdf:parseType="Resource">
      <stEvt:action>derived</stEvt:action>
      <stEvt:softwareAgent>{agent}</stEvt:softwareAgent>
      <stEvt:parameters>{params}</stEvt:parameters>
     </rdf:li>
    </rdf:Seq>
   </xmpMM:History>
   <dc:description>
    <rdf:Alt><rdf:li xml:lang="x-default">{description}</rdf:li></rdf:Alt>
   </dc:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>"""
    return packet.encode("utf-8")


def read_xmp_fields(xmp: bytes) -> dict[str, str]:
    """The archival fields back out of an XMP packet (DigitalSourceType, DocumentID, DerivedFrom,
    RecordDigest)."""
    import xml.etree.ElementTree as ET

    text = xmp.decode("utf-8", "replace")
    start, end = text.find("<x:xmpmeta"), text.find("</x:xmpmeta>")
    root = ET.fromstring(text[start : end + len("</x:xmpmeta>")])
    rdf = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
    mm = "{http://ns.adobe.com/xap/1.0/mm/}"
    desc = root.find(f"{rdf}RDF/{rdf}Description")
    derived = desc.find(f"{mm}DerivedFrom/" + "{http://ns.adobe.com/xap/1.0/sType/ResourceRef#}documentID")
    return {
        "DigitalSourceType": desc.get(f"{{{IPTC_EXT_NS}}}DigitalSourceType", ""),
        "DocumentID": desc.get(f"{mm}DocumentID", ""),
        "DerivedFrom": derived.text if derived is not None else "",
        "RecordDigest": desc.get(f"{{{ARCHIVECOLOR_NS}}}RecordDigest", ""),
    }


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    return jsonschema.Draft202012Validator(load_schema())


def schema_problem(document: object) -> str | None:
    """Why ``document`` is not a valid sidecar under the schema, or None when it is."""
    error = next(iter(_validator().iter_errors(document)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "top level"
    return f"{where}: {error.message}"


@dataclass(frozen=True)
class SourceRecord:
    """The scan as it was read."""

    root: str  # the scans folder, relative to OUT_DIR (schema 2) or absolute (schema 1)
    path: str  # relative to root
    sha256: str
    width: int
    height: int
    bit_depth: int
    format: str
    orientation: int = 1


@dataclass(frozen=True)
class OutputRecord:
    """The colorized file as it was written."""

    path: str  # relative to OUT_DIR
    sha256: str
    format: str
    bit_depth: int
    xmp_embedded: bool
    xmp_sidecar: str | None = None


@dataclass(frozen=True)
class Sidecar:
    """The provenance record of one output (``<output>.json``): what was read and written, with which
    references, models and parameters. Validated against ``provenance.schema.json`` both ways."""

    source: SourceRecord
    output: OutputRecord
    references: list[dict]  # path, sha256, similarity, catalog_id, share of the pixels
    models: dict[str, str]  # graph name -> sha256 of the file that ran
    backbone: str
    provider: str  # the ONNX Runtime provider that really ran
    parameters: dict
    started_utc: str
    finished_utc: str
    durations_s: dict[str, float]
    warnings: list[str]
    candidates: list[dict] = field(default_factory=list)  # the catalogue's best matches, when retrieved
    archivecolor_version: str = __version__
    schema_version: int = SCHEMA_VERSION

    @property
    def record_digest(self) -> str:
        return record_digest(self.source.sha256, self.references, self.models, self.backbone, self.provider,
                             self.parameters)

    def to_document(self) -> dict:
        document = {
            "schema": SIDECAR_SCHEMA, "schema_version": self.schema_version,
            "archivecolor_version": self.archivecolor_version,
            "source": asdict(self.source), "output": asdict(self.output), "references": self.references,
            "models": self.models, "backbone": self.backbone, "provider": self.provider,
            "parameters": self.parameters, "started_utc": self.started_utc, "finished_utc": self.finished_utc,
            "durations_s": {k: round(v, 4) for k, v in self.durations_s.items()}, "warnings": self.warnings,
            "digital_source_type": DIGITAL_SOURCE_TYPE,
        }
        if self.candidates:
            document["candidates"] = self.candidates
        problem = schema_problem(document)
        if problem is not None:  # a bug, not a user error: never certify with a malformed record
            raise ValueError(f"refusing to write an invalid sidecar for {self.output.path}: {problem}")
        return document

    @classmethod
    def from_document(cls, document: dict) -> Sidecar:
        """The record of a sidecar's JSON; ValueError naming the first problem when the schema refuses it."""
        problem = schema_problem(document)
        if problem is not None:
            raise ValueError(f"not a valid sidecar ({problem})")
        known = {f.name for f in fields(SourceRecord)}
        return cls(
            source=SourceRecord(**{k: v for k, v in document["source"].items() if k in known}),
            output=OutputRecord(**{k: v for k, v in document["output"].items() if k in {f.name for f in fields(OutputRecord)}}),
            references=document["references"], models=document["models"], backbone=document["backbone"],
            provider=document["provider"], parameters=document["parameters"], started_utc=document["started_utc"],
            finished_utc=document["finished_utc"], durations_s=document["durations_s"], warnings=document["warnings"],
            candidates=document.get("candidates", []), archivecolor_version=document["archivecolor_version"],
            schema_version=document["schema_version"],
        )


def write_sidecar(output: Path, record: Sidecar) -> Path:
    path = sidecar_path(output)
    atomic_write_bytes(path, (json.dumps(record.to_document(), indent=2, sort_keys=True) + "\n").encode())
    return path


@dataclass
class VerifyReport:
    ok: list[str] = field(default_factory=list)
    missing_output: list[str] = field(default_factory=list)
    changed_output: list[str] = field(default_factory=list)
    missing_source: list[str] = field(default_factory=list)
    changed_source: list[str] = field(default_factory=list)
    changed_reference: list[str] = field(default_factory=list)
    edited_record: list[str] = field(default_factory=list)  # the sidecar no longer says what the output's XMP says
    orphaned: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    # Made by models other than those installed now (an earlier version, or --model-path): not a fault,
    # but `run` would redo them.
    other_models: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing_output or self.changed_output or self.missing_source or self.changed_source
                    or self.changed_reference or self.edited_record or self.orphaned or self.unreadable or self.temp_files)


def read_sidecar(path: Path) -> Sidecar | None:
    """A sidecar's record; None for a JSON file that is not an archivecolor sidecar.

    Raises ValueError for one that claims to be a sidecar but breaks the schema.
    """
    try:
        doc = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != SIDECAR_SCHEMA:
        return None
    return Sidecar.from_document(doc)


def sidecars(out_dir: Path, unreadable: list[str]) -> Iterator[Sidecar]:
    """Every sidecar record under ``out_dir``, in path order; those that cannot be read are named in
    ``unreadable``, and JSON files that are not sidecars are passed over."""
    for path in sorted(out_dir.rglob(f"*{SIDECAR_SUFFIX}")):
        try:
            record = read_sidecar(path)
        except (OSError, ValueError) as exc:
            unreadable.append(f"{path}: {exc}")
            continue
        if record is not None:
            yield record


REVIEW_IMAGES = ("review", "img")  # under OUT_DIR: the review's pictures, which verify leaves alone
_REVIEW_IMAGE_NAME = re.compile(r"[0-9a-f]{32}-[a-z]\.jpg")


def review_image_name(sha256: str, kind: str) -> str:
    """The file name of a review picture: named by the content it shows, so a rebuild makes none again."""
    return f"{sha256[:32]}-{kind}.jpg"


def is_review_image(out_dir: Path, path: Path) -> bool:
    """A thumbnail or preview of ``archivecolor review`` (named by content under OUT_DIR/review/img)."""
    rel = path.relative_to(out_dir).parts
    return len(rel) == 3 and rel[:2] == REVIEW_IMAGES and _REVIEW_IMAGE_NAME.fullmatch(rel[2]) is not None


def embedded_record_digest(data: bytes) -> str:
    """The record digest in the embedded XMP of an output's bytes; empty where it has none (outputs written
    before record digests)."""
    xmp = find_xmp(data)
    try:
        return read_xmp_fields(xmp)["RecordDigest"] if xmp else ""
    except (ValueError, AttributeError):  # a packet we cannot parse says nothing
        return ""


def installed_model_hashes(home: Path | None = None) -> set[str]:
    """The sha256 of every model installed in ``home`` (float and int8); empty where none can be read."""
    from archivecolor.errors import ModelNotFound
    from archivecolor.models.store import read_manifest

    try:
        return {entry.sha256 for entry in read_manifest(home).values()}
    except ModelNotFound:
        return set()


def verify(out_dir: Path, scans_dir: Path | None = None, home: Path | None = None) -> VerifyReport:
    """Re-hash every output, its source and its references against their sidecars, check each sidecar
    against the record digest in its output's XMP; list orphaned outputs and temp files left by killed runs.

    Sources are found under ``scans_dir`` when given (an archive moved apart from its outputs), else
    where the sidecar's root, relative to ``out_dir``, points. Outputs whose models are not installed in
    ``home`` are listed in ``other_models``.
    """
    report = VerifyReport()
    installed = installed_model_hashes(home)
    with_sidecar: set[Path] = set()
    hashes: dict[Path, str | None] = {}

    def digest(path: Path) -> str | None:
        if path not in hashes:
            hashes[path] = sha256_file(path) if path.is_file() else None
        return hashes[path]

    for record in sidecars(out_dir, report.unreadable):
        output = out_dir / record.output.path
        root = scans_dir if scans_dir is not None else out_dir / record.source.root
        source = root / record.source.path
        with_sidecar.add(output.resolve())
        rel = record.output.path
        data = output.read_bytes() if output.is_file() else None  # read once: hashed, and its XMP looked up
        if data is None:
            report.missing_output.append(rel)
        elif sha256_bytes(data) != record.output.sha256:
            report.changed_output.append(rel)
        elif record.output.xmp_embedded and embedded_record_digest(data) not in ("", record.record_digest):
            report.edited_record.append(rel)
        elif digest(source) is None:
            report.missing_source.append(rel)
        elif digest(source) != record.source.sha256:
            report.changed_source.append(rel)
        elif any(digest(Path(r["path"])) not in (None, r["sha256"]) for r in record.references):
            report.changed_reference.append(rel)
        else:
            report.ok.append(rel)
        if installed and not set(record.models.values()) <= installed:
            report.other_models.append(rel)
    for path, kind in file_walk(out_dir):
        if kind == "image" and path.resolve() not in with_sidecar and not is_review_image(out_dir, path):
            report.orphaned.append(str(path.relative_to(out_dir)))
    report.temp_files = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob(".*") if p.is_file() and is_temp_file(p))
    return report
