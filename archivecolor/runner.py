"""``archivecolor run``: walk a folder of scans, colorize them in batches, write outputs and records.

Never writes into the input tree. Every output is written atomically with its sidecar, and
recorded in a ledger (``OUT_DIR/.archivecolor-ledger.sqlite``) keyed by the source's sha256, the
model hashes and the parameters: a re-run skips finished files whose output still matches its
recorded hash. A bad file never stops the batch; it is recorded with a one-line reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from archivecolor.catalog import Catalog, centre_square
from archivecolor.errors import ArchivecolorError, UsageError
from archivecolor.imageio import (
    DEFAULT_MAX_PIXELS,
    FORMAT_SUFFIX,
    Scan,
    atomic_write_bytes,
    file_walk,
    output_icc,
    read_image,
    to_upright,
    write_image,
)
from archivecolor.models.weights import sha256_file
from archivecolor.pipeline import (
    DEFAULT_WORKING_SIZE,
    Models,
    Prediction,
    ReferenceCache,
    StageTimes,
    load_reference,
    predict,
    render,
    target_l,
)
from archivecolor.provenance import (
    build_xmp,
    make_sidecar,
    sidecar_path,
    utc_now,
    write_sidecar,
    xmp_sidecar_path,
)

LEDGER_NAME = ".archivecolor-ledger.sqlite"
FORMATS = ("same", "tiff", "png", "jpeg")
_FORMAT_NAMES = {"tiff": "TIFF", "png": "PNG", "jpeg": "JPEG"}
_XMP_FORMATS = {"JPEG", "PNG", "TIFF", "WEBP"}
PENDING_PIXEL_LIMIT = 300_000_000  # decoded pixels held while waiting for a full batch


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
    batch_size: int = 4
    provider: str = "auto"
    format: str = "same"
    overwrite: bool = False
    dry_run: bool = False
    jobs: int = 2
    xmp_sidecar: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int = 0
    home: Path | None = None

    def parameters(self) -> dict:
        """The parameters that change the output (they key the ledger)."""
        return {"top_k": self.top_k, "working_size": self.working_size, "format": self.format,
                "collection": self.collection, "reference": str(self.reference) if self.reference else None,
                "mapping": str(self.mapping) if self.mapping else None}


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

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def exit_code(self) -> int:
        return 1 if self.count("failed") else 0

    def as_dict(self) -> dict:
        return {"scans_dir": str(self.scans_dir), "out_dir": str(self.out_dir), "provider": self.provider,
                "interrupted": self.interrupted, "seconds": round(self.seconds, 3), "skipped_junk": self.skipped_junk,
                "counts": {s: self.count(s) for s in ("done", "skipped", "failed", "planned")},
                "stage_seconds": self.stage_seconds, "results": [asdict(r) for r in self.results]}


class Ledger:
    """The run's record in OUT_DIR: one row per source, keyed by its relative path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(
            "create table if not exists files (source text primary key, source_sha256 text, size integer, "
            "mtime real, run_key text, output text, output_sha256 text, status text, reason text, updated text)"
        )
        self.conn.commit()

    def get(self, source: str) -> dict | None:
        cur = self.conn.execute("select * from files where source = ?", [source])
        row = cur.fetchone()
        return dict(zip([d[0] for d in cur.description], row)) if row else None

    def put(self, **row: object) -> None:
        row["updated"] = utc_now()
        cols = ", ".join(row)
        self.conn.execute(f"insert or replace into files ({cols}) values ({', '.join('?' * len(row))})",
                          list(row.values()))
        self.conn.commit()

    def close(self) -> None:
        self.conn.close()


def default_out_dir(scans_dir: Path) -> Path:
    return scans_dir.parent / f"{scans_dir.name}-colorized"


def check_dirs(scans_dir: Path, out_dir: Path) -> None:
    if not scans_dir.is_dir():
        raise UsageError(f"{scans_dir}: not a folder; pass the folder of scans to colorize")
    scans, out = scans_dir.resolve(), out_dir.resolve()
    if out == scans or scans in out.parents:
        raise UsageError(f"{out_dir}: the output folder is inside the scans folder {scans_dir}; "
                         f"choose --out outside it (default: {default_out_dir(scans_dir)})")


def output_relpath(rel: Path, scan_format: str, fmt: str) -> Path:
    if fmt == "same":
        return rel
    return rel.with_suffix(FORMAT_SUFFIX[_FORMAT_NAMES[fmt]])


def read_mapping(path: Path, scans_dir: Path) -> dict[str, Path]:
    """A ``scan,reference`` CSV: scan relative to SCANS_DIR, reference absolute or relative to the CSV."""
    if not path.is_file():
        raise UsageError(f"{path}: no such mapping file; pass a CSV with columns scan,reference")
    mapping: dict[str, Path] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or {"scan", "reference"} - set(reader.fieldnames):
            raise UsageError(f"{path}: needs a header row with columns scan,reference")
        for line, row in enumerate(reader, 2):
            ref = Path(row["reference"].strip())
            ref = ref if ref.is_absolute() else (path.parent / ref)
            if not ref.is_file():
                raise UsageError(f"{path}:{line}: reference {ref} does not exist; fix the row or the path")
            mapping[Path(row["scan"].strip()).as_posix()] = ref
    return mapping


class ReferencePicker:
    """Chooses the reference(s) of each scan: fixed, from a CSV mapping, or retrieved from the catalogue."""

    def __init__(self, options: RunOptions, scans_dir: Path, models: Models | None) -> None:
        self.options = options
        self.models = models
        self.catalog: Catalog | None = None
        self.mapping: dict[str, Path] = {}
        self._hashes: dict[Path, str] = {}
        chosen = [x for x in (options.reference, options.mapping) if x is not None]
        if len(chosen) > 1:
            raise UsageError("--reference and --mapping cannot be used together; pick one")
        if options.reference is not None and not Path(options.reference).is_file():
            raise UsageError(f"{options.reference}: no such reference image")
        if options.mapping is not None:
            self.mapping = read_mapping(options.mapping, scans_dir)
        if options.reference is None and options.mapping is None:
            self.catalog = Catalog.open(options.catalog)
            if models is not None:
                self.catalog.check_model(models.backbone, models.features.model.sha256, "gem")

    def _fixed(self, path: Path) -> dict:
        path = Path(path).resolve()
        if path not in self._hashes:
            self._hashes[path] = sha256_file(path)
        return {"path": str(path), "sha256": self._hashes[path], "similarity": None, "catalog_id": None}

    def pick(self, rel: str, scan: Scan, source_sha256: str) -> list[dict]:
        if self.options.reference is not None:
            return [self._fixed(self.options.reference)]
        if self.mapping:
            if rel not in self.mapping:
                raise ArchivecolorError(f"{rel}: not listed in the mapping {self.options.mapping}; add a row for it")
            return [self._fixed(self.mapping[rel])]
        assert self.catalog is not None and self.models is not None
        query = self.models.embed(centre_square(to_upright(scan.lightness(), scan.orientation)))
        matches = self.catalog.search(query, self.options.top_k, collection=self.options.collection,
                                      exclude_sha256={source_sha256})[0]
        return [{"path": m.path, "sha256": m.sha256, "similarity": round(m.similarity, 4), "catalog_id": m.id}
                for m in matches]


@dataclass
class _Job:
    rel: Path
    source: Path
    output_rel: Path
    sha256: str
    scan: Scan
    references: list[dict]
    l_work: np.ndarray
    started: str
    t0: float
    decode_s: float


def _decode(path: Path, max_pixels: int) -> tuple[Scan | None, str | None, float]:
    t = time.perf_counter()
    try:
        return read_image(path, max_pixels), None, time.perf_counter() - t
    except ArchivecolorError as exc:
        return None, str(exc), time.perf_counter() - t
    except MemoryError:
        return None, f"{path}: out of memory while decoding; lower --jobs or --batch-size", time.perf_counter() - t


def _prefetch(pool: ThreadPoolExecutor, paths: list[Path], depth: int, max_pixels: int):
    """Decode ahead of use in the pool, never more than ``depth`` files at a time."""
    window: deque[Future] = deque()
    for path in paths:
        window.append(pool.submit(_decode, path, max_pixels))
        if len(window) > depth:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def colorize_folder(
    scans_dir: Path | str,
    options: RunOptions | None = None,
    progress: Callable[[FileResult, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> RunReport:
    """Colorize every scan under ``scans_dir``; returns a report with one FileResult per image.

    ``progress(result, done, total)`` is called after each file; ``should_stop()`` is polled
    between batches (Ctrl-C finishes the batch in flight and returns with ``interrupted``).
    """
    options = options or RunOptions()
    scans_dir = Path(scans_dir)
    out_dir = Path(options.out) if options.out else default_out_dir(scans_dir)
    check_dirs(scans_dir, out_dir)
    if options.format not in FORMATS:
        raise UsageError(f"--format {options.format!r}: choose one of {', '.join(FORMATS)}")
    if options.working_size % 16 or options.working_size < 64:
        raise UsageError(f"--working-size {options.working_size}: use a multiple of 16, at least 64")
    if options.top_k < 1 or options.batch_size < 1 or options.jobs < 1:
        raise UsageError("--top-k, --batch-size and --jobs must be at least 1")
    started = time.perf_counter()
    entries = list(file_walk(scans_dir))
    images = [p for p, kind in entries if kind == "image"]
    models = Models.open(options.provider, options.home, threads=options.threads)
    picker = ReferencePicker(options, scans_dir, models)
    report = RunReport(scans_dir, out_dir, models.provider, skipped_junk=sum(k == "junk" for _, k in entries))
    run_key = hashlib.sha256(json.dumps({"models": models.hashes(), **options.parameters()},
                                        sort_keys=True).encode()).hexdigest()
    ledger = None if options.dry_run else (out_dir.mkdir(parents=True, exist_ok=True) or Ledger(out_dir / LEDGER_NAME))
    cache = ReferenceCache(models)
    times = StageTimes()
    extra_times = {"decode": 0.0, "recombine_encode": 0.0}
    total = len(images)
    claimed: dict[Path, str] = {}

    def finish(result: FileResult) -> None:
        report.results.append(result)
        if progress:
            progress(result, len(report.results), total)

    def fail(rel: str, reason: str, **ledger_row: object) -> None:
        finish(FileResult(rel, "failed", reason=reason.splitlines()[0]))
        if ledger is not None:
            ledger.put(source=rel, status="failed", reason=reason.splitlines()[0], run_key=run_key, **ledger_row)

    def up_to_date(rel: str, source: Path, sha: str, out_path: Path) -> bool:
        row = ledger.get(rel) if ledger else None
        return bool(row and row["status"] == "done" and row["source_sha256"] == sha and row["run_key"] == run_key
                    and out_path.exists() and sha256_file(out_path) == row["output_sha256"]
                    and sidecar_path(out_path).exists())

    def write_outputs(job: _Job, prediction: Prediction) -> tuple[FileResult, str]:
        t = time.perf_counter()
        scan = job.scan
        rgb = render(scan, prediction)
        fmt = scan.format if options.format == "same" else _FORMAT_NAMES[options.format]
        fmt = fmt if fmt in FORMAT_SUFFIX else "PNG"
        icc, icc_warning = output_icc(scan.icc)
        warnings = list(scan.warnings) + ([icc_warning] if icc_warning else [])
        refs = [dict(r, share=round(float((prediction.chosen == k).mean()), 4),
                     match=round(prediction.similarity[k], 4)) for k, r in enumerate(job.references)]
        when = utc_now()
        xmp = build_xmp(job.rel.as_posix(), job.sha256, run_key, refs, when)
        embed_xmp = fmt in _XMP_FORMATS
        if not embed_xmp:
            warnings.append(f"{fmt} cannot carry XMP; provenance is in the JSON sidecar only")
        if scan.exif and fmt in ("TIFF", "BMP"):
            warnings.append(f"the source's EXIF block is not written into {fmt} output (orientation is kept)")
        out_path = out_dir / job.output_rel
        bit_depth = 16 if rgb.dtype == np.uint16 and fmt in ("PNG", "TIFF") else 8
        write_image(out_path, rgb, fmt, alpha=scan.alpha, icc=icc, exif=scan.exif,
                    xmp=xmp if embed_xmp else None, orientation=scan.orientation)
        xmp_file = None
        if options.xmp_sidecar:
            atomic_write_bytes(xmp_sidecar_path(out_path), xmp)
            xmp_file = xmp_sidecar_path(out_path).name
        encode_s = time.perf_counter() - t
        out_sha = sha256_file(out_path)
        doc = make_sidecar(
            source_root=scans_dir.resolve(), source_rel=job.rel.as_posix(), source_sha256=job.sha256,
            scan_info={"width": scan.width, "height": scan.height, "bit_depth": scan.bit_depth,
                       "format": scan.format, "orientation": scan.orientation},
            output_rel=job.output_rel.as_posix(), output_sha256=out_sha, output_format=fmt,
            output_bit_depth=bit_depth, xmp_embedded=embed_xmp, xmp_sidecar=xmp_file, references=refs,
            models=models.hashes(), backbone=models.backbone, provider=models.provider,
            parameters=options.parameters() | {"batch_size": options.batch_size, "jobs": options.jobs},
            started=job.started, finished=utc_now(),
            durations={"decode": job.decode_s, "recombine_encode": encode_s, "total": time.perf_counter() - job.t0},
            warnings=warnings,
        )
        write_sidecar(out_path, doc)
        extra_times["recombine_encode"] += encode_s
        result = FileResult(job.rel.as_posix(), "done", job.output_rel.as_posix(), references=refs,
                            seconds=time.perf_counter() - job.t0, warnings=warnings)
        return result, out_sha

    buckets: dict[tuple[int, int], list[_Job]] = {}
    writes: list[tuple[_Job, Future]] = []

    def collect(block: bool) -> None:
        keep = []
        for job, fut in writes:
            if not block and not fut.done():
                keep.append((job, fut))
                continue
            try:
                result, out_sha = fut.result()
            except ArchivecolorError as exc:
                fail(job.rel.as_posix(), str(exc), source_sha256=job.sha256)
                continue
            except MemoryError:
                fail(job.rel.as_posix(), f"{job.source}: out of memory while writing; lower --jobs",
                     source_sha256=job.sha256)
                continue
            if ledger is not None:
                st = job.source.stat()
                ledger.put(source=result.source, source_sha256=job.sha256, size=st.st_size, mtime=st.st_mtime,
                           run_key=run_key, output=result.output,
                           output_sha256=out_sha, status="done", reason="")
            finish(result)
        writes[:] = keep

    def run_bucket(key: tuple[int, int], pool: ThreadPoolExecutor) -> None:
        jobs = buckets.pop(key, [])
        if not jobs:
            return
        try:
            refs = [[cache.get(r["sha256"], lambda r=r: load_reference(Path(r["path"]), r["sha256"],
                                                                       options.working_size, r))
                     for r in job.references] for job in jobs]
        except ArchivecolorError as exc:
            for job in jobs:
                fail(job.rel.as_posix(), f"reference unusable: {exc}", source_sha256=job.sha256)
            return
        predictions = predict(models, np.concatenate([j.l_work for j in jobs]), refs, times)
        for job, prediction in zip(jobs, predictions):
            writes.append((job, pool.submit(write_outputs, job, prediction)))

    def pending_pixels() -> int:
        return sum(j.scan.width * j.scan.height for js in buckets.values() for j in js)

    try:
        with ThreadPoolExecutor(max_workers=options.jobs) as pool:
            decoded = None if options.dry_run else _prefetch(pool, images, options.jobs, options.max_pixels)
            for source in images:
                if should_stop and should_stop():
                    report.interrupted = True
                    break
                rel = source.relative_to(scans_dir)
                rel_s = rel.as_posix()
                t0 = time.perf_counter()
                scan, error, decode_s = (next(decoded) if decoded is not None else _decode(source, options.max_pixels))
                extra_times["decode"] += decode_s
                try:
                    sha = sha256_file(source)
                except OSError as exc:
                    fail(rel_s, f"{source}: cannot read ({exc.strerror})")
                    continue
                if scan is None:
                    fail(rel_s, error or f"{source}: unreadable", source_sha256=sha)
                    continue
                output_rel = output_relpath(rel, scan.format, options.format)
                out_path = out_dir / output_rel
                if output_rel in claimed:
                    fail(rel_s, f"{source}: output {output_rel} would overwrite the output of {claimed[output_rel]}; "
                                f"use --format same", source_sha256=sha)
                    continue
                claimed[output_rel] = rel_s
                if scan.pixels.ndim == 3 and not any("treated as gray" in w for w in scan.warnings):
                    finish(FileResult(rel_s, "skipped", reason="already a colour image; nothing to colorize"))
                    continue
                if not options.overwrite and not options.dry_run and up_to_date(rel_s, source, sha, out_path):
                    finish(FileResult(rel_s, "skipped", output_rel.as_posix(), reason="up to date"))
                    continue
                try:
                    references = picker.pick(rel_s, scan, sha)
                except ArchivecolorError as exc:
                    fail(rel_s, str(exc), source_sha256=sha)
                    continue
                if options.dry_run:
                    finish(FileResult(rel_s, "planned", output_rel.as_posix(), references=references,
                                      warnings=scan.warnings))
                    continue
                l_work = target_l(scan, options.working_size)
                job = _Job(rel, source, output_rel, sha, scan, references, l_work, utc_now(), t0, decode_s)
                key = l_work.shape[-2:]
                buckets.setdefault(key, []).append(job)
                if len(buckets[key]) >= options.batch_size:
                    run_bucket(key, pool)
                elif pending_pixels() > PENDING_PIXEL_LIMIT:
                    for k in list(buckets):
                        run_bucket(k, pool)
                collect(block=False)
            for key in list(buckets):
                run_bucket(key, pool)
            collect(block=True)
    finally:
        if ledger is not None:
            ledger.close()
        if picker.catalog is not None:
            picker.catalog.close()
    report.seconds = time.perf_counter() - started
    report.stage_seconds = {"decode": round(extra_times["decode"], 3),
                            "features": round(times.features, 3),
                            "correspondence": round(times.correspondence, 3),
                            "unet": round(times.unet, 3),
                            "recombine_encode": round(extra_times["recombine_encode"], 3),
                            "reference_cache_hits": cache.hits, "reference_cache_misses": cache.misses}
    return report
