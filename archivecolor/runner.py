"""``archivecolor run``: walk a folder of scans, colorize them in batches, write outputs and records.

Never writes into the input tree and never replaces a file it did not write. Every output is written
atomically with its sidecar and recorded in a ledger (``OUT_DIR/.archivecolor-ledger.sqlite``) keyed by
content: the source's sha256, the model hashes, the parameters and the references (their sha256s, or
for retrieval the catalogue's fingerprint). A re-run skips finished files whose output, sidecar and
references are still what was recorded. One failure boundary per file: whatever goes wrong with one
scan is recorded with a one-line reason and the batch goes on.

The stages: planning (walk, decode, hash, skip by ledger, choose references), batching (same-size
working inputs through the networks together), and writing (render, encode, sidecar, ledger).
``colorize_folder`` drives them; ``colorize_file`` is the per-file core that other engines call.
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import sqlite_utils

from archivecolor.catalog import EMBED_SHORT_SIDE, EMBEDDING, Catalog, catalogue_precision
from archivecolor.errors import (
    ArchivecolorError,
    CatalogError,
    ImageReadError,
    LedgerError,
    UsageError,
    failure_reason,
)
from archivecolor.imageio import (
    DEFAULT_MAX_PIXELS,
    FORMAT_SUFFIX,
    FORMAT_SUFFIXES,
    TIFF_COMPRESSIONS,
    Scan,
    encode_image,
    file_walk,
    is_temp_file,
    output_icc,
    printable_path,
    read_image,
    write_file,
)
from archivecolor.models.session import resolve_precision
from archivecolor.models.weights import sha256_bytes, sha256_file
from archivecolor.pipeline import (
    CHOSEN_REFERENCE_CAST,
    DEFAULT_WORKING_SIZE,
    Models,
    Prediction,
    Reference,
    ReferenceCache,
    StageTimes,
    TargetFeatures,
    check_colour_strength,
    predict,
    read_colour_reference,
    render,
    target_l,
)
from archivecolor.provenance import (
    SIDECAR_SCHEMA,
    OutputRecord,
    Sidecar,
    SourceRecord,
    build_xmp,
    record_digest,
    sidecar_path,
    utc_now,
    write_sidecar,
    xmp_sidecar_path,
)

LEDGER_NAME = ".archivecolor-ledger.sqlite"
LOCK_NAME = ".archivecolor.lock"
FORMATS = ("same", "tiff", "png", "jpeg")
ENGINES = ("local", "ray")
_FORMAT_NAMES = {"tiff": "TIFF", "png": "PNG", "jpeg": "JPEG"}
_XMP_FORMATS = {"JPEG", "PNG", "TIFF", "WEBP"}
PENDING_PIXEL_LIMIT = 300_000_000  # decoded pixels held while waiting for a full batch
# The main thread's seconds, which add up to the wall time with "other" (planning, the ledger). Decoding
# and recombining/encoding run on worker threads beside them: their own seconds are reported too, and
# what the main thread spent waiting for them is wait_decode and wait_write.
STAGES = ("walk", "open_models", "hash", "retrieval", "references", "features", "correspondence", "unet",
          "wait_decode", "wait_write")
CANDIDATES = 5  # catalogue candidates recorded per scan, for review and re-picking
INTERRUPTED_EXIT = 130  # the shell's convention for a run stopped by Ctrl-C
_WALK_REASONS = {
    "outside": "a linked folder outside the scans folder; not followed",
    "special": "not a regular file (a FIFO, socket or device); not read",
    "unreadable": "a folder that cannot be listed; check its permissions",
}


@dataclass
class RunOptions:
    """Every parameter of a run. ``out`` defaults to a sibling ``<SCANS_DIR>-colorized``."""

    out: Path | None = None
    catalog: Path | None = None
    collection: str | None = None
    reference: Path | None = None
    mapping: Path | None = None
    top_k: int = 1
    working_size: int = DEFAULT_WORKING_SIZE
    batch_size: int = 0  # 0: auto (see auto_batch_size)
    provider: str = "auto"
    format: str = "same"
    tiff_compression: str = "zlib"
    overwrite: bool = False
    dry_run: bool = False
    jobs: int = 2
    xmp_sidecar: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = 0
    home: Path | None = None
    model_path: Path | None = None  # a user's own U-Net export instead of the installed one
    engine: str = "local"  # local, or ray (archivecolor[ray]): the same outputs from a pool of Ray actors
    ray_address: str | None = None  # None starts a local Ray; "auto" or "ray://host:10001" joins a cluster
    workers: int = 2  # Ray actors, one CPU each
    gpus_per_worker: float = 0.0
    # int8: the VGG features and U-Net from `models pull --int8` (needs an int8 catalogue); auto: the
    # catalogue's precision when retrieving from one, else int8 on the CPU where installed, else fp32
    precision: str = "auto"
    # Scales the model's colours (its chroma), 0 to 2: under 1 safer and duller, over 1 bolder and more often wrong.
    colour_strength: float = 1.0
    overall_colour: float = CHOSEN_REFERENCE_CAST  # how far a scan from one chosen reference takes its overall colour

    _PATHS = ("out", "catalog", "reference", "mapping", "home", "model_path")

    def to_dict(self) -> dict:
        """Plain JSON-able values (paths as strings), e.g. to hand the options to another process."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> RunOptions:
        names = {f.name for f in fields(cls)}
        return cls(**{k: (Path(v) if k in cls._PATHS and v is not None else v) for k, v in values.items() if k in names})

    def parameters(self) -> dict:
        """The parameters that change the output, as recorded in each sidecar."""
        return {"top_k": self.top_k, "working_size": self.working_size, "format": self.format,
                "collection": self.collection, "reference": str(self.reference) if self.reference else None,
                "mapping": str(self.mapping) if self.mapping else None, "engine": self.engine,
                "model_path": str(self.model_path) if self.model_path else None,
                "tiff_compression": self.tiff_compression, "precision": self.precision,
                "colour_strength": self.colour_strength}

    def ledger_parameters(self) -> dict:
        """The parameters that key the ledger: no paths, since the references are keyed by content."""
        mode = "fixed" if self.reference else "mapping" if self.mapping else "catalogue"
        keys = {"top_k": self.top_k, "working_size": self.working_size, "format": self.format,
                "collection": self.collection, "references": mode, "tiff_compression": self.tiff_compression,
                "colour_strength": self.colour_strength}
        if self.chosen_cast:  # outputs from a chosen reference made before it was taken are redone
            keys["chosen_reference_cast"] = self.chosen_cast
        return keys

    @property
    def chosen(self) -> bool:
        """Whether the references are chosen by hand (``--reference``, ``--mapping``), not retrieved."""
        return bool(self.reference or self.mapping)

    @property
    def chosen_cast(self) -> float:
        """How far a scan coloured from one reference chosen by hand moves its mean colour to that reference's."""
        return self.overall_colour if self.chosen else 0.0

    def check(self) -> None:
        if self.tiff_compression not in TIFF_COMPRESSIONS:
            raise UsageError(f"--tiff-compression {self.tiff_compression!r}: choose one of {', '.join(TIFF_COMPRESSIONS)}")
        if self.format not in FORMATS:
            raise UsageError(f"--format {self.format!r}: choose one of {', '.join(FORMATS)}")
        if self.working_size % 16 or self.working_size < 64:
            raise UsageError(f"--working-size {self.working_size}: use a multiple of 16, at least 64")
        if self.top_k < 1 or self.jobs < 1 or self.workers < 1:
            raise UsageError("--top-k, --jobs and --workers must be at least 1")
        if self.batch_size < 0:
            raise UsageError("--batch-size must be at least 1, or 0 for auto")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        if self.gpus_per_worker < 0:
            raise UsageError("--gpus-per-worker must be 0 or more")
        check_colour_strength(self.colour_strength)
        if not 0.0 <= self.overall_colour <= 1.0:
            raise UsageError(f"--overall-colour {self.overall_colour}: use 0 (the network's own overall colour) to 1 "
                             f"(the reference's); {CHOSEN_REFERENCE_CAST:g} is the default")


def auto_batch_size(provider: str) -> int:
    """Scans per model batch where the user leaves it to us: on the CPU larger batches are no faster but
    hold more memory (24 scans of 1536x1024, one reference: peak RSS 1.38 GB at 4, 1.23 GB at 2, the same
    scans/s); a GPU wants them."""
    return 4 if provider == "CUDAExecutionProvider" else 2


@dataclass
class FileResult:
    """What happened to one scan: status is done, skipped, failed or planned (dry run)."""

    source: str
    status: str
    output: str | None = None
    reason: str = ""
    references: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    source_sha256: str = ""
    output_sha256: str = ""


@dataclass
class RunReport:
    scans_dir: Path
    out_dir: Path
    provider: str
    results: list[FileResult] = field(default_factory=list)
    skipped_junk: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    removed_temp_files: int = 0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED_EXIT
        return 1 if self.count("failed") else 0

    def as_dict(self) -> dict:
        return {"scans_dir": str(self.scans_dir), "out_dir": str(self.out_dir), "provider": self.provider,
                "interrupted": self.interrupted, "seconds": round(self.seconds, 3), "skipped_junk": self.skipped_junk,
                "removed_temp_files": self.removed_temp_files,
                "counts": {s: self.count(s) for s in ("done", "skipped", "failed", "planned")},
                "stage_seconds": self.stage_seconds, "results": [asdict(r) for r in self.results]}


class Ledger:
    """The run's record in OUT_DIR: one row per source (its relative path), on sqlite-utils."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            conn = sqlite3.connect(path, timeout=30)
            try:
                self.db = sqlite_utils.Database(conn)
                self.db.enable_wal()
                self.table = self.db.table("files", pk="source")
                self.db.execute("select 1").fetchone()
            except BaseException:
                conn.close()  # not left open: it would keep the output folder's file system busy
                raise
        except sqlite3.OperationalError as exc:  # a full disk or no permission: the ledger itself may be fine
            raise LedgerError(f"{path}: the run's ledger cannot be opened ({exc}); free space or fix permissions "
                              f"in {path.parent}, then run the same command again") from exc
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{path}: not a ledger ({exc}); move it aside to start afresh") from exc

    def get(self, source: str) -> dict | None:
        if not self.table.exists():
            return None
        rows = list(self.table.rows_where("source = ?", [source]))
        return rows[0] if rows else None

    def rows(self, status: str | None = None) -> list[dict]:
        if not self.table.exists():
            return []
        return list(self.table.rows_where("status = ?", [status]) if status else self.table.rows)

    def put(self, **row: object) -> None:
        row["updated"] = utc_now()
        try:
            with self.db.conn:
                self.table.upsert(row, pk="source", alter=True)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: cannot record {row['source']} ({exc}); free space or fix "
                              f"permissions, then run the same command again") from exc

    def close(self) -> None:
        self.db.conn.close()


class OutputLock:
    """An exclusive lock on OUT_DIR, so that two runs never write the same outputs at once."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ArchivecolorError(f"{self.path.parent}: cannot write here ({exc.strerror}); "
                                    f"choose a writable --out") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise ArchivecolorError(f"{self.path.parent}: another archivecolor run ({holder}) is writing here; "
                                    f"wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {utc_now()}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def remove_orphan_temp_files(out_dir: Path) -> int:
    """Delete the temp files of writes that a killed run left behind (call only while holding the lock)."""
    removed = 0
    for path in out_dir.rglob(".*"):
        if path.is_file() and is_temp_file(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def default_out_dir(scans_dir: Path) -> Path:
    resolved = scans_dir.resolve()
    return resolved.parent / f"{resolved.name or 'scans'}-colorized"


def check_dirs(scans_dir: Path, out_dir: Path) -> None:
    if not scans_dir.is_dir():
        raise UsageError(f"{scans_dir}: not a folder; pass the folder of scans to colorize")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir}: exists and is not a folder; choose another --out")
    scans, out = scans_dir.resolve(), out_dir.resolve()
    if out == scans or scans in out.parents:
        raise UsageError(f"{out_dir}: the output folder is inside the scans folder {scans_dir}; "
                         f"choose --out outside it (default: {default_out_dir(scans_dir)})")


def output_format(scan_format: str, option: str) -> str:
    """The format an output is written in: the scan's own where we can write it (MPO is JPEG), else PNG."""
    if option != "same":
        return _FORMAT_NAMES[option]
    fmt = "JPEG" if scan_format == "MPO" else scan_format
    return fmt if fmt in FORMAT_SUFFIX else "PNG"


def output_relpath(rel: Path, fmt: str) -> Path:
    """The output's path: the source's, with a suffix that names the format actually written."""
    # A suffix that already names the format is kept as it is, case included.
    return rel if rel.suffix.lower() in FORMAT_SUFFIXES[fmt] else rel.with_suffix(FORMAT_SUFFIX[fmt])


def read_mapping(path: Path, scans_dir: Path) -> dict[str, list[Path]]:
    """A ``scan,reference`` CSV: scan relative to SCANS_DIR, reference absolute or relative to the CSV.

    A scan listed on several rows is coloured from all those references, in row order; other columns
    (such as the review's ``approved``) are ignored.
    """
    if not path.is_file():
        raise UsageError(f"{path}: no such mapping file; pass a CSV with columns scan,reference")
    mapping: dict[str, list[Path]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or {"scan", "reference"} - set(reader.fieldnames):
                raise UsageError(f"{path}: needs a header row with columns scan,reference")
            for line, row in enumerate(reader, 2):
                scan, ref_text = (row.get("scan") or "").strip(), (row.get("reference") or "").strip()
                if not scan or not ref_text:
                    raise UsageError(f"{path}:{line}: needs both a scan and a reference")
                scan_path = Path(scan)
                if scan_path.is_absolute() or ".." in scan_path.parts:
                    raise UsageError(f"{path}:{line}: scan {scan} must be a path inside {scans_dir}, relative to it")
                ref = Path(ref_text)
                ref = ref if ref.is_absolute() else (path.parent / ref)
                if not ref.is_file():
                    raise UsageError(f"{path}:{line}: reference {ref} does not exist; fix the row or the path")
                mapping.setdefault(scan_path.as_posix(), []).append(ref)
    except (UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise UsageError(f"{path}: not a readable UTF-8 CSV ({exc}); save it as CSV with columns scan,reference") from exc
    return mapping


class ReferencePicker:
    """Chooses the reference(s) of each scan: fixed, from a CSV mapping, or retrieved from the catalogue."""

    def __init__(self, options: RunOptions, scans_dir: Path, models: Models | None) -> None:
        self.options = options
        self.models = models
        self.catalog: Catalog | None = None
        self.mapping: dict[str, list[Path]] = {}
        self._hashes: dict[Path, str] = {}
        self._fingerprint: str | None = None
        chosen = [x for x in (options.reference, options.mapping) if x is not None]
        if len(chosen) > 1:
            raise UsageError("--reference and --mapping cannot be used together; pick one")
        if options.reference is not None:
            if not Path(options.reference).is_file():
                raise UsageError(f"{options.reference}: no such reference image")
            try:
                read_colour_reference(Path(options.reference))
            except ImageReadError as exc:
                raise UsageError(f"--reference {exc}") from exc
        if options.mapping is not None:
            self.mapping = read_mapping(options.mapping, scans_dir)
        if options.reference is None and options.mapping is None:
            self.catalog = Catalog.open(options.catalog)
            if models is not None:
                self.catalog.check_model(models.backbone, models.features.model.sha256, EMBEDDING, models.precision)
            if self.catalog.count(colour_only=True) == 0:
                raise CatalogError(f"{self.catalog.path}: the catalogue has no colour references; index some with "
                                   f"`archivecolor index REF_DIR`, or pass --reference")

    def file_hash(self, path: Path) -> str:
        """sha256 of a reference file, hashed once per run."""
        path = Path(path).resolve()
        if path not in self._hashes:
            self._hashes[path] = sha256_file(path)
        return self._hashes[path]

    def _fixed(self, path: Path) -> dict:
        return {"path": str(Path(path).resolve()), "sha256": self.file_hash(path), "similarity": None, "catalog_id": None}

    def known_references(self, rel: str) -> list[Path] | None:
        """The scan's references where they are known without retrieval (fixed or mapped), else None."""
        if self.options.reference is not None:
            return [Path(self.options.reference)]
        if self.mapping:
            return self.mapping.get(rel, [])
        return None

    def identity(self, rel: str) -> str:
        """What decides this scan's references, by content, without retrieving them (keys the ledger)."""
        known = self.known_references(rel)
        if known is not None:
            return "references:" + ",".join(self.file_hash(ref) for ref in known)
        assert self.catalog is not None
        if self._fingerprint is None:
            self._fingerprint = self.catalog.fingerprint(self.options.collection)
        return "catalogue:" + self._fingerprint

    def pick(self, rel: str, scan: Scan, source_sha256: str) -> tuple[list[dict], list[dict]]:
        """The scan's references, and the catalogue's best candidates for it (empty unless retrieved)."""
        if self.options.reference is not None:
            return [self._fixed(self.options.reference)], []
        if self.mapping:
            if rel not in self.mapping:
                raise ArchivecolorError(f"{rel}: not listed in the mapping {self.options.mapping}; add a row for it")
            return [self._fixed(ref) for ref in self.mapping[rel]], []
        assert self.models is not None
        return self.retrieve(self.models.embed(target_l(scan, EMBED_SHORT_SIDE)), source_sha256)

    @property
    def from_target_pass(self) -> bool:
        """Whether a scan's retrieval query comes from its own VGG pass at working size (the catalogue's
        embedding recipe), rather than from a pass of its own."""
        return self.catalog is not None and self.options.working_size == EMBED_SHORT_SIDE

    def retrieve(self, query: np.ndarray, source_sha256: str) -> tuple[list[dict], list[dict]]:
        """The catalogue's references for a query embedding (1, 512), never the scan itself, and its best candidates."""
        assert self.catalog is not None
        wanted = max(self.options.top_k, self.models.references_wanted if self.models is not None else 1)
        matches = self.catalog.search(query, max(wanted, CANDIDATES), collection=self.options.collection,
                                      exclude_sha256={source_sha256})[0]
        candidates = [{"path": m.path, "sha256": m.sha256, "similarity": round(m.similarity, 4), "catalog_id": m.id}
                      for m in matches]
        return candidates[:wanted], candidates

    def close(self) -> None:
        if self.catalog is not None:
            self.catalog.close()


def written_by_us(out_path: Path, output_rel: Path, ledger_row: dict | None) -> bool:
    """Whether an existing output (or its sidecar) is one this tool wrote, so that it may be replaced."""
    if ledger_row and ledger_row.get("output") == printable_path(output_rel):
        return True
    sidecar = sidecar_path(out_path)
    try:
        doc = json.loads(sidecar.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("schema") == SIDECAR_SCHEMA and \
        isinstance(doc.get("output"), dict) and doc["output"].get("path") == output_rel.as_posix()


@dataclass
class RunContext:
    """What every file of one run shares: where things go, the models, the keys."""

    scans_dir: Path
    out_dir: Path
    options: RunOptions
    models: Models
    run_key: str  # models + ledger parameters; each file's key adds its references' identity
    output_key: str  # what else decides the pixels: models, working size, format

    @classmethod
    def create(cls, scans_dir: Path, out_dir: Path, options: RunOptions, models: Models) -> RunContext:
        def digest(record: dict) -> str:
            return sha256_bytes(json.dumps(record, sort_keys=True).encode())

        run_key = digest({"models": models.hashes(), **options.ledger_parameters()})
        output_key = digest({"models": models.hashes(), "working_size": options.working_size, "format": options.format,
                             "tiff_compression": options.tiff_compression, "colour_strength": options.colour_strength})
        options = replace(options, batch_size=options.batch_size or auto_batch_size(models.provider))
        return cls(scans_dir, out_dir, options, models, run_key, output_key)

    def file_key(self, reference_identity: str) -> str:
        return sha256_bytes(f"{self.run_key}:{reference_identity}".encode())

    def content_key(self, reference_sha256s: list[str]) -> str:
        """The output's identity whatever chose its references: a mapping that names the references a
        catalogue run retrieved leaves that output up to date."""
        return sha256_bytes(f"{self.output_key}:{','.join(reference_sha256s)}".encode())


@dataclass
class _Job:
    rel: Path
    source: Path
    output_rel: Path
    output_format: str
    sha256: str
    file_key: str
    scan: Scan
    references: list[dict] | None  # None: to be retrieved from the scan's own VGG pass (see retrieve_from_pass)
    l_work: np.ndarray
    started: str
    t0: float
    decode_s: float
    candidates: list[dict] = field(default_factory=list)
    retrieval_s: float = 0.0

    @property
    def name(self) -> str:
        return printable_path(self.rel)


@dataclass
class _Written:
    result: FileResult  # carries the output's and the references' sha256s as written and read
    encode_s: float


def _decode(path: Path, max_pixels: int) -> tuple[Scan | None, str | None, float]:
    t = time.perf_counter()
    try:
        return read_image(path, max_pixels), None, time.perf_counter() - t
    except MemoryError:
        return None, f"{path}: out of memory while decoding; lower --jobs or --batch-size", time.perf_counter() - t
    except Exception as exc:  # one failure boundary per file
        return None, failure_reason(exc, printable_path(path)), time.perf_counter() - t


def _prefetch(pool: ThreadPoolExecutor, paths: list[Path], depth: int, max_pixels: int) -> Iterator:
    """Decode ahead of use in the pool, never more than ``depth`` files at a time."""
    window: deque[Future] = deque()
    for path in paths:
        window.append(pool.submit(_decode, path, max_pixels))
        if len(window) > depth:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def write_outputs(ctx: RunContext, job: _Job, prediction: Prediction, loaded: list[Reference]) -> _Written:
    """Render one prediction at full size and write the output, its XMP and its sidecar, each atomically."""
    t = time.perf_counter()
    scan = job.scan
    rgb = render(scan, prediction, colour_strength=ctx.options.colour_strength)
    fmt = job.output_format
    icc, icc_warning = output_icc(scan.icc)
    warnings = list(scan.warnings) + ([icc_warning] if icc_warning else [])
    refs = []
    for k, (chosen, ref) in enumerate(zip(job.references, loaded)):
        if ref.sha256 and ref.sha256 != chosen["sha256"]:
            warnings.append(f"reference {chosen['path']} changed since it was indexed; the sha256 recorded is of the "
                            f"file as read; re-run `archivecolor index` to update the catalogue")
        share = prediction.shares[k]
        # A fused reference that wins no pixel still offered its colours; only a second opinion is read for agreement.
        role = "second opinion" if ctx.models.second_opinion and share == 0 else "colours"
        refs.append(dict(chosen, sha256=ref.sha256 or chosen["sha256"], share=round(share, 4),
                         match=round(prediction.similarity[k], 4), role=role))
        if prediction.cast:
            refs[-1]["overall_colour"] = prediction.cast
    models, parameters = ctx.models, ctx.options.parameters() | {"batch_size": ctx.options.batch_size,
                                                                   "jobs": ctx.options.jobs}
    digest = record_digest(job.sha256, refs, models.hashes(), models.backbone, models.provider, parameters)
    xmp = build_xmp(job.name, job.sha256, job.file_key, refs, digest)
    embed_xmp = fmt in _XMP_FORMATS
    if not embed_xmp:
        warnings.append(f"{fmt} cannot carry XMP; provenance is in the JSON sidecar only")
    if scan.exif and fmt in ("TIFF", "BMP"):
        warnings.append(f"the source's EXIF block is not written into {fmt} output (orientation is kept)")
    out_path = ctx.out_dir / job.output_rel
    bit_depth = 16 if rgb.dtype == np.uint16 and fmt in ("PNG", "TIFF") else 8
    data = encode_image(out_path, rgb, fmt, alpha=scan.alpha, icc=icc, exif=scan.exif,
                        tiff_compression=ctx.options.tiff_compression,
                        xmp=xmp if embed_xmp else None, orientation=scan.orientation)
    encode_s = time.perf_counter() - t
    out_sha = sha256_bytes(data)
    # The records go first and the image last: a run killed in between leaves a sidecar without its
    # output, which the next run recognises as its own and redoes, never an output nobody accounts for.
    records = _write_records(ctx, job, out_path, fmt, bit_depth, out_sha, xmp, embed_xmp, refs, parameters, warnings,
                             encode_s)
    try:
        write_file(out_path, data)
    except BaseException:
        for path in (sidecar_path(out_path), xmp_sidecar_path(out_path)):
            path.unlink(missing_ok=True)
        raise
    return records


def _write_records(ctx: RunContext, job: _Job, out_path: Path, fmt: str, bit_depth: int, out_sha: str, xmp: bytes,
                   embed_xmp: bool, refs: list[dict], parameters: dict, warnings: list[str], encode_s: float) -> _Written:
    """The XMP sidecar (when asked for) and the JSON sidecar of an output about to be written."""
    options, scan = ctx.options, job.scan
    xmp_file = None
    if options.xmp_sidecar:
        write_file(xmp_sidecar_path(out_path), xmp)
        xmp_file = xmp_sidecar_path(out_path).name
    record = Sidecar(
        # Paths as the file system has them: json escapes undecodable bytes reversibly (\udcXX).
        source=SourceRecord(os.path.relpath(ctx.scans_dir.resolve(), ctx.out_dir.resolve()), job.rel.as_posix(),
                            job.sha256, scan.width, scan.height, scan.bit_depth, scan.format, scan.orientation),
        output=OutputRecord(job.output_rel.as_posix(), out_sha, fmt, bit_depth, embed_xmp, xmp_file),
        references=refs, models=ctx.models.hashes(), backbone=ctx.models.backbone, provider=ctx.models.provider,
        parameters=parameters,
        started_utc=job.started, finished_utc=utc_now(),
        durations_s={"decode": job.decode_s, "recombine_encode": encode_s, "total": time.perf_counter() - job.t0},
        warnings=warnings, candidates=job.candidates or [],
    )
    write_sidecar(out_path, record)
    result = FileResult(job.name, "done", printable_path(job.output_rel), references=refs,
                        seconds=time.perf_counter() - job.t0, warnings=warnings, source_sha256=job.sha256,
                        output_sha256=out_sha)
    return _Written(result, encode_s)


def up_to_date(picker: ReferencePicker, sha: str, file_key: str, content_key: str | None, out_path: Path,
               row: dict | None) -> bool:
    """Whether the ledger row says this output is current: same source, same key (or the same references by
    content), the output unchanged since written, and its references still the files they were."""
    if not (row and row.get("status") == "done" and row.get("source_sha256") == sha
            and (row.get("run_key") == file_key or (content_key and row.get("content_key") == content_key))
            and out_path.exists() and sidecar_path(out_path).exists()):
        return False
    if sha256_file(out_path) != row.get("output_sha256"):
        return False
    try:  # the references as they were read then must still be the same files
        recorded = json.loads(row.get("references") or "[]")
        return all(Path(r["path"]).is_file() and picker.file_hash(Path(r["path"])) == r["sha256"] for r in recorded)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ledger_keys(ctx: RunContext, picker: ReferencePicker, name: str) -> tuple[str, str | None]:
    """The scan's ledger key, and its content key where its references are known without retrieval."""
    known = picker.known_references(name)
    content_key = ctx.content_key([picker.file_hash(r) for r in known]) if known else None
    return ctx.file_key(picker.identity(name)), content_key


def plan_file(ctx: RunContext, picker: ReferencePicker, source: Path, scan: Scan, sha: str, row: dict | None,
              claimed: dict[Path, str] | None = None) -> _Job | FileResult:
    """What to do with one decoded scan: a job, or the result that settles it (skipped, failed, planned).

    ``row`` is the scan's ledger row; ``claimed`` maps the outputs already planned in this run to their scans.
    """
    options = ctx.options
    rel = source.relative_to(ctx.scans_dir)
    name = printable_path(rel)
    fmt = output_format(scan.format, options.format)
    output_rel = output_relpath(rel, fmt)
    out_path = ctx.out_dir / output_rel
    if claimed is not None:
        if output_rel in claimed:
            return FileResult(name, "failed", reason=f"{source}: output {printable_path(output_rel)} would overwrite "
                                                     f"the output of {claimed[output_rel]}; rename one of them")
        claimed[output_rel] = name
    if scan.pixels.ndim == 3 and not any("treated as gray" in w for w in scan.warnings):
        return FileResult(name, "skipped", reason="already a colour image; nothing to colorize")
    file_key, content_key = ledger_keys(ctx, picker, name)
    if not options.dry_run:
        if not options.overwrite and up_to_date(picker, sha, file_key, content_key, out_path, row):
            return FileResult(name, "skipped", printable_path(output_rel), reason="up to date")
        if (out_path.exists() or sidecar_path(out_path).exists()) and not written_by_us(out_path, output_rel, row):
            return FileResult(name, "failed", reason=f"{out_path}: exists and was not written by archivecolor; refusing "
                                                     f"to replace it (choose an empty --out, or move that file away)")
    t = time.perf_counter()
    if picker.from_target_pass and not options.dry_run:
        references, candidates = None, []  # retrieved from the scan's own VGG pass when its batch runs
    else:
        references, candidates = picker.pick(name, scan, sha)
    retrieval_s = time.perf_counter() - t
    if options.dry_run:
        return FileResult(name, "planned", printable_path(output_rel), references=references, warnings=scan.warnings)
    return _Job(rel, source, output_rel, fmt, sha, file_key, scan, references, target_l(scan, options.working_size),
                utc_now(), time.perf_counter(), 0.0, candidates, retrieval_s)


def retrieve_from_pass(picker: ReferencePicker, job: _Job, features: TargetFeatures, row: int) -> float:
    """Retrieve a waiting job's references with the embedding of its own VGG pass (``row`` of the batch's
    ``features``); returns the seconds spent."""
    if job.references is not None:
        return 0.0
    t = time.perf_counter()
    job.references, job.candidates = picker.retrieve(features.embedding[row : row + 1], job.sha256)
    spent = time.perf_counter() - t
    job.retrieval_s += spent
    return spent


def record(ledger: Ledger, ctx: RunContext, source: Path, result: FileResult, file_key: str) -> None:
    """The ledger row of one finished scan (done or failed); skipped and planned scans leave theirs as is."""
    if result.status == "failed":
        ledger.put(source=result.source, status="failed", reason=result.reason,
                   **({"source_sha256": result.source_sha256} if result.source_sha256 else {}))
    elif result.status == "done":
        st = source.stat()
        refs = [{"path": r["path"], "sha256": r["sha256"]} for r in result.references]
        ledger.put(source=result.source, source_sha256=result.source_sha256, size=st.st_size, mtime=st.st_mtime,
                   run_key=file_key, output=result.output, output_sha256=result.output_sha256,
                   content_key=ctx.content_key([r["sha256"] for r in refs]), references=json.dumps(refs),
                   status="done", reason="")


def colorize_file(ctx: RunContext, source: Path, references: list[dict] | None, cache: ReferenceCache,
                  file_key: str | None = None, picker: ReferencePicker | None = None,
                  row: dict | None = None) -> FileResult:
    """Colorize one scan and write its outputs: the per-file core that engines other than the local
    batch runner call.

    With ``references`` (dicts with path and sha256) the scan is coloured from them; with None,
    ``picker`` chooses them and the scan's ledger ``row`` settles it (up to date, already colour, an
    output we did not write) exactly as the local runner does. ``file_key`` is the ledger key the
    driver planned with (it also seeds the XMP document id). Never raises for a bad file: the result's
    status is done, skipped or failed with a one-line reason.
    """
    rel = source.relative_to(ctx.scans_dir)
    t0 = time.perf_counter()
    scan, error, decode_s = _decode(source, ctx.options.max_pixels)
    if scan is None:
        return FileResult(printable_path(rel), "failed", reason=error or f"{source}: unreadable")
    try:
        sha = sha256_file(source)
        if references is None:
            if picker is None:
                raise ValueError("colorize_file needs references or a picker")
            planned = plan_file(ctx, picker, source, scan, sha, row)
            if isinstance(planned, FileResult):
                planned.source_sha256 = sha
                return planned
            job = planned
            job.t0, job.decode_s = t0, decode_s
        else:
            fmt = output_format(scan.format, ctx.options.format)
            job = _Job(rel, source, output_relpath(rel, fmt), fmt, sha, "", scan, references,
                       target_l(scan, ctx.options.working_size), utc_now(), t0, decode_s)
            job.file_key = ctx.file_key("references:" + ",".join(r["sha256"] for r in references))
        job.file_key = file_key or job.file_key
        features = ctx.models.target_features(job.l_work)
        if picker is not None:
            retrieve_from_pass(picker, job, features, 0)
        assert job.references is not None
        loaded = [cache.load(Path(r["path"]), r["sha256"], ctx.options.working_size, r) for r in job.references]
        prediction = predict(ctx.models, job.l_work, [loaded], features=features, chosen=ctx.options.chosen,
                             chosen_cast=ctx.options.chosen_cast)[0]
        return write_outputs(ctx, job, prediction, loaded).result
    except MemoryError:
        return FileResult(printable_path(rel), "failed", reason=f"{source}: out of memory; lower --working-size")
    except Exception as exc:  # one failure boundary per file
        return FileResult(printable_path(rel), "failed", reason=failure_reason(exc, printable_path(source)))


def colorize_folder(
    scans_dir: Path | str,
    options: RunOptions | None = None,
    progress: Callable[[FileResult, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunReport:
    """Colorize every scan under ``scans_dir``; returns a report with one FileResult per file considered.

    ``progress(result, done, total)`` is called after each file; ``should_stop()`` is polled
    between files (Ctrl-C finishes the batch in flight and returns with ``interrupted``).
    """
    options = options or RunOptions()
    scans_dir = Path(scans_dir)
    out_dir = Path(options.out) if options.out else default_out_dir(scans_dir)
    check_dirs(scans_dir, out_dir)
    options.check()
    retrieving = options.reference is None and options.mapping is None
    options = replace(options, precision=resolve_precision(
        options.precision, options.provider, options.home, catalogue_precision(options.catalog) if retrieving else None))
    if not options.dry_run:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"{out_dir}: cannot create the output folder ({exc.strerror}); choose a writable --out") from exc
        with OutputLock(out_dir):
            if options.engine == "ray":
                from archivecolor.ray_engine import colorize_folder_ray

                return colorize_folder_ray(scans_dir, out_dir, options, progress, should_stop)
            return _colorize_locked(scans_dir, out_dir, options, progress, should_stop)
    return _colorize_locked(scans_dir, out_dir, options, progress, should_stop)


def _colorize_locked(scans_dir: Path, out_dir: Path, options: RunOptions,
                     progress: Callable[[FileResult, int, int], None] | None,
                     should_stop: Callable[[], bool] | None) -> RunReport:
    started = time.perf_counter()
    entries = list(file_walk(scans_dir))
    images = [p for p, kind in entries if kind == "image"]
    unusable = [(p, kind) for p, kind in entries if kind in _WALK_REASONS]
    walked = time.perf_counter()
    models = Models.open(options.provider, options.home, threads=options.threads, unet_path=options.model_path,
                         precision=options.precision)
    picker = ReferencePicker(options, scans_dir, models)
    opened = time.perf_counter()
    ctx = RunContext.create(scans_dir, out_dir, options, models)
    report = RunReport(scans_dir, out_dir, models.provider, skipped_junk=sum(k == "junk" for _, k in entries))
    ledger = None
    if not options.dry_run:
        report.removed_temp_files = remove_orphan_temp_files(out_dir)
        ledger = Ledger(out_dir / LEDGER_NAME)
    try:
        _Batches(ctx, picker, ledger, report, progress, len(images) + len(unusable)).run(images, unusable, should_stop)
    finally:
        if ledger is not None:
            ledger.close()
        picker.close()
    report.seconds = time.perf_counter() - started
    stages = {"walk": round(walked - started, 3), "open_models": round(opened - walked, 3), **report.stage_seconds}
    timed = sum(v for k, v in stages.items() if k in STAGES)
    report.stage_seconds = stages | {"wall": round(report.seconds, 3), "other": round(report.seconds - timed, 3)}
    return report


class _Batches:
    """Planning, batching and writing for one run; every per-file failure is recorded, never raised."""

    def __init__(self, ctx: RunContext, picker: ReferencePicker, ledger: Ledger | None, report: RunReport,
                 progress: Callable[[FileResult, int, int], None] | None, total: int) -> None:
        self.ctx, self.options = ctx, ctx.options
        self.picker, self.ledger, self.report = picker, ledger, report
        self.progress, self.total = progress, total
        self.cache = ReferenceCache(ctx.models)
        self.times = StageTimes()
        self.extra = {"decode": 0.0, "hash": 0.0, "retrieval": 0.0, "recombine_encode": 0.0, "wait_decode": 0.0,
                      "wait_write": 0.0}
        self.claimed: dict[Path, str] = {}
        self.buckets: dict[tuple[int, int], list[_Job]] = {}
        self.writes: list[tuple[_Job, Future]] = []

    # --- records --------------------------------------------------------------------------------
    def finish(self, result: FileResult) -> None:
        self.report.results.append(result)
        if self.progress:
            self.progress(result, len(self.report.results), self.total)

    def fail(self, name: str, reason: str, **ledger_row: object) -> None:
        reason = reason.strip().splitlines()[0] if reason.strip() else "failed"
        self.finish(FileResult(name, "failed", reason=reason))
        if self.ledger is not None:
            self.ledger.put(source=name, status="failed", reason=reason, **ledger_row)

    # --- planning -------------------------------------------------------------------------------
    def plan(self, source: Path, scan: Scan | None, error: str | None, decode_s: float) -> _Job | None:
        """Hash, check the ledger and choose references; returns a job, or None when the file is settled."""
        name = printable_path(source.relative_to(self.ctx.scans_dir))
        t0 = time.perf_counter() - decode_s
        self.extra["decode"] += decode_s
        t = time.perf_counter()
        try:
            sha = sha256_file(source)
        except OSError as exc:
            self.fail(name, f"{source}: cannot read ({exc.strerror or exc}); check its permissions")
            return None
        self.extra["hash"] += time.perf_counter() - t
        if scan is None:
            self.fail(name, error or f"{source}: unreadable", source_sha256=sha)
            return None
        row = self.ledger.get(name) if self.ledger is not None else None
        planned = plan_file(self.ctx, self.picker, source, scan, sha, row, self.claimed)
        if isinstance(planned, FileResult):
            if planned.status == "failed":
                self.fail(name, planned.reason, source_sha256=sha)
            else:
                self.finish(planned)
            return None
        planned.t0, planned.decode_s = t0, decode_s
        self.extra["retrieval"] += planned.retrieval_s
        return planned

    # --- batching -------------------------------------------------------------------------------
    def run_bucket(self, key: tuple[int, int], pool: ThreadPoolExecutor) -> None:
        jobs = self.buckets.pop(key, [])
        if jobs:
            self._run_jobs(jobs, pool)

    def _run_jobs(self, jobs: list[_Job], pool: ThreadPoolExecutor) -> None:
        """One VGG pass over same-size jobs, retrieval from it, the references, the networks, and the
        writes handed to ``pool``."""
        l_batch = np.concatenate([j.l_work for j in jobs])
        try:
            t = time.perf_counter()
            features = self.ctx.models.target_features(l_batch)
            self.times.features += time.perf_counter() - t
        except Exception as exc:
            self._networks_failed(jobs, exc, pool)
            return
        usable, rows, loaded = [], [], []
        for row, job in enumerate(jobs):
            try:
                self.extra["retrieval"] += retrieve_from_pass(self.picker, job, features, row)
                assert job.references is not None
            except Exception as exc:  # one failure boundary per file
                self.fail(job.name, failure_reason(exc, printable_path(job.source)), source_sha256=job.sha256)
                continue
            try:
                loaded.append([self.cache.load(Path(r["path"]), r["sha256"], self.options.working_size, r)
                               for r in job.references])
            except Exception as exc:  # one failure boundary per file
                self.fail(job.name, f"reference unusable: {failure_reason(exc)}", source_sha256=job.sha256)
                continue
            usable.append(job)
            rows.append(row)
        if not usable:
            return
        try:
            predictions = predict(self.ctx.models, l_batch[rows], loaded, self.times, features.select(rows),
                                  chosen=self.options.chosen, chosen_cast=self.options.chosen_cast)
        except Exception as exc:
            self._networks_failed(usable, exc, pool)
            return
        for job, prediction, refs in zip(usable, predictions, loaded):
            self.writes.append((job, pool.submit(write_outputs, self.ctx, job, prediction, refs)))

    def _networks_failed(self, jobs: list[_Job], exc: Exception, pool: ThreadPoolExecutor) -> None:
        """A batch the networks could not take is tried again a file at a time, so only the culprit fails."""
        if len(jobs) > 1:
            for job in jobs:
                self._run_jobs([job], pool)
            return
        job = jobs[0]
        reason = ("out of memory in the networks; lower --working-size" if isinstance(exc, MemoryError)
                  else f"the networks failed on it ({failure_reason(exc)})")
        self.fail(job.name, f"{job.source}: {reason}", source_sha256=job.sha256)

    # --- writing --------------------------------------------------------------------------------
    def collect(self, block: bool) -> None:
        keep = []
        for job, fut in self.writes:
            if not block and not fut.done():
                keep.append((job, fut))
                continue
            waited = time.perf_counter()
            try:
                written: _Written = fut.result()
            except MemoryError:
                self.fail(job.name, f"{job.source}: out of memory while writing; lower --jobs", source_sha256=job.sha256)
                continue
            except Exception as exc:  # one failure boundary per file
                where = printable_path(self.ctx.out_dir / job.output_rel)
                self.fail(job.name, failure_reason(exc, where), source_sha256=job.sha256)
                continue
            self.extra["wait_write"] += time.perf_counter() - waited
            self.extra["recombine_encode"] += written.encode_s
            if self.ledger is not None:
                record(self.ledger, self.ctx, job.source, written.result, job.file_key)
            self.finish(written.result)
        self.writes[:] = keep

    def pending_pixels(self) -> int:
        return sum(j.scan.width * j.scan.height for js in self.buckets.values() for j in js)

    def run(self, images: list[Path], unusable: list[tuple[Path, str]], should_stop: Callable[[], bool] | None) -> None:
        options = self.options
        for path, kind in unusable:
            rel = path.relative_to(self.ctx.scans_dir) if self.ctx.scans_dir in path.parents else path
            self.finish(FileResult(printable_path(rel), "failed" if kind == "unreadable" else "skipped",
                                   reason=f"{path}: {_WALK_REASONS[kind]}"))
        with ThreadPoolExecutor(max_workers=options.jobs) as pool:
            decoded = None if options.dry_run else _prefetch(pool, images, options.jobs, options.max_pixels)
            for source in images:
                if should_stop and should_stop():
                    self.report.interrupted = True
                    break
                waited = time.perf_counter()
                scan, error, decode_s = next(decoded) if decoded is not None else _decode(source, options.max_pixels)
                self.extra["wait_decode"] += time.perf_counter() - waited
                try:
                    job = self.plan(source, scan, error, decode_s)
                except (LedgerError, UsageError):
                    raise  # the run cannot record anything more, or cannot work at all: stop cleanly
                except Exception as exc:  # one failure boundary per file
                    self.fail(printable_path(source.relative_to(self.ctx.scans_dir)), failure_reason(exc, printable_path(source)))
                    continue
                if job is None:
                    continue
                key = job.l_work.shape[-2:]
                self.buckets.setdefault(key, []).append(job)
                if len(self.buckets[key]) >= options.batch_size:
                    self.run_bucket(key, pool)
                elif self.pending_pixels() > PENDING_PIXEL_LIMIT:
                    for k in list(self.buckets):
                        self.run_bucket(k, pool)
                self.collect(block=False)
            for key in list(self.buckets):
                self.run_bucket(key, pool)
            self.collect(block=True)
        self.report.stage_seconds = {
            "decode": round(self.extra["decode"], 3), "hash": round(self.extra["hash"], 3),
            "retrieval": round(self.extra["retrieval"], 3), "references": round(self.cache.seconds, 3),
            "features": round(self.times.features, 3), "correspondence": round(self.times.correspondence, 3),
            "unet": round(self.times.unet, 3), "recombine_encode": round(self.extra["recombine_encode"], 3),
            "wait_decode": round(self.extra["wait_decode"], 3), "wait_write": round(self.extra["wait_write"], 3),
            "reference_cache_hits": self.cache.hits, "reference_cache_misses": self.cache.misses}
