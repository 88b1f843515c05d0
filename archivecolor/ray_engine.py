"""``--engine ray``: the same run and index across a Ray cluster (or a local Ray on this machine).

The driver plans (walk, hash, ledger check, the catalogue's fingerprint) and is the only writer of the
ledger and the catalogue. Ray Data moves paths and small JSON records, never pixels, to a pool of
actors; each opens the ONNX sessions once and calls the local engine's per-file core
(:func:`archivecolor.runner.colorize_file`, or the catalogue's :func:`prepare_photo` for ``index``),
which writes outputs and sidecars atomically itself. Inputs, outputs, references and the catalogue
must be on storage every node sees at the same paths.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from archivecolor.errors import UsageError

TASK_RETRIES = 3  # a scan whose worker dies this many more times is recorded as failed, not retried forever
MAX_BLOCKS = 4096  # one block per file up to this many: fine-grained scheduling and retries


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the extra installs both
    except ImportError as exc:
        raise UsageError("--engine ray needs Ray: pip install 'archivecolor[ray]'") from exc
    return ray


def start(address: str | None, workers: int) -> bool:
    """Connect to ``address`` (a running cluster: ``auto`` or ``ray://host:10001``) or start a local Ray
    with ``workers`` CPUs; returns whether this call started it (and so must stop it)."""
    ray = _ray()
    if ray.is_initialized():
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=max(1, workers), **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise UsageError(f"cannot start or reach {where} ({exc}); check --ray-address, or drop it to run a local Ray") from exc
    _quiet_ray_data()
    return True


def _quiet_ray_data() -> None:
    """Our own progress and summary replace Ray Data's per-second progress log."""
    import logging

    _ray().data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _rows(records: list[dict]):
    """A Ray dataset of JSON records, one per block (up to MAX_BLOCKS), so that one file is one task."""
    ray = _ray()
    _quiet_ray_data()
    context = ray.data.DataContext.get_current()
    context.max_errored_blocks = -1  # a block that fails after its retries is a recorded failure, not an abort
    return ray.data.from_items([{"task": json.dumps(r)} for r in records],
                               override_num_blocks=max(1, min(len(records), MAX_BLOCKS)))


def _map(dataset, actor: type, kwargs: dict, workers: int, gpus_per_worker: float):
    ray = _ray()
    # The retry bound has no named parameter yet (Ray 2.60 deprecates the remote-args route for 2.64, hence
    # the extra's upper bound); without it a file that kills its worker would be retried for ever.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(
            actor, fn_constructor_kwargs=kwargs, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus_per_worker or None,
            max_restarts=-1, max_task_retries=TASK_RETRIES,
        )


def _results(dataset) -> Iterator[dict]:
    for row in dataset.iter_rows():
        yield json.loads(row["result"])


# --- run ------------------------------------------------------------------------------------------


class ColorizeWorker:
    """A Ray actor: the sessions, reference cache and picker of one worker process, opened once."""

    def __init__(self, scans_dir: str, out_dir: str, options: dict) -> None:
        from archivecolor.pipeline import Models, ReferenceCache
        from archivecolor.runner import ReferencePicker, RunContext, RunOptions

        run_options = RunOptions.from_dict(options)
        run_options.threads = run_options.threads or 1
        models = Models.open(run_options.provider, run_options.home, threads=run_options.threads,
                             unet_path=run_options.model_path, precision=run_options.precision)
        self.ctx = RunContext.create(Path(scans_dir), Path(out_dir), run_options, models)
        self.picker = ReferencePicker(run_options, Path(scans_dir), models)
        self.cache = ReferenceCache(models)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from archivecolor.runner import colorize_file

        results = []
        for text in batch["task"]:
            task = json.loads(str(text))
            result = colorize_file(self.ctx, Path(task["source"]), task["references"], self.cache,
                                   task["file_key"], picker=self.picker, row=task["row"])
            results.append(json.dumps({"task": task, "result": asdict(result)}))
        return {"result": np.array(results, dtype=object)}


def colorize_folder_ray(scans_dir: Path, out_dir: Path, options, progress: Callable | None,
                        should_stop: Callable[[], bool] | None):
    """The ``--engine ray`` run: plan here, colorize on the actors, record here. Called with OUT_DIR locked."""
    from archivecolor.imageio import file_walk
    from archivecolor.models.weights import sha256_file
    from archivecolor.pipeline import Models
    from archivecolor.runner import (
        _WALK_REASONS,
        LEDGER_NAME,
        FileResult,
        Ledger,
        ReferencePicker,
        RunContext,
        RunReport,
        ledger_keys,
        printable_path,
        record,
        remove_orphan_temp_files,
        up_to_date,
    )

    started = time.perf_counter()
    entries = list(file_walk(scans_dir))
    images = [p for p, kind in entries if kind == "image"]
    # The ledger keys need the models' hashes.
    models = Models.open("cpu", options.home, threads=1, unet_path=options.model_path, precision=options.precision)
    picker = ReferencePicker(options, scans_dir, models)
    ctx = RunContext.create(scans_dir, out_dir, options, models)
    report = RunReport(scans_dir, out_dir, f"ray ({options.provider})", skipped_junk=sum(k == "junk" for _, k in entries))
    report.removed_temp_files = remove_orphan_temp_files(out_dir)
    ledger = Ledger(out_dir / LEDGER_NAME)
    total = len(images) + sum(kind in _WALK_REASONS for _, kind in entries)

    def finish(result: FileResult) -> None:
        report.results.append(result)
        if progress:
            progress(result, len(report.results), total)

    started_ray = False
    try:
        for path, kind in entries:
            if kind in _WALK_REASONS:
                rel = path.relative_to(scans_dir) if scans_dir in path.parents else path
                finish(FileResult(printable_path(rel), "failed" if kind == "unreadable" else "skipped",
                                  reason=f"{path}: {_WALK_REASONS[kind]}"))
        tasks = []
        for source in images:
            name = printable_path(source.relative_to(scans_dir))
            try:
                sha = sha256_file(source)
            except OSError as exc:
                result = FileResult(name, "failed",
                                    reason=f"{source}: cannot read ({exc.strerror or exc}); check its permissions")
                record(ledger, ctx, source, result, "")
                finish(result)
                continue
            row = ledger.get(name)
            file_key, content_key = ledger_keys(ctx, picker, name)
            recorded = out_dir / row["output"] if row and row.get("output") else None
            if not options.overwrite and recorded is not None and up_to_date(picker, sha, file_key, content_key, recorded, row):
                finish(FileResult(name, "skipped", row["output"], reason="up to date"))
                continue
            tasks.append({"source": str(source), "name": name,
                          "references": None, "file_key": file_key, "row": row})
        if tasks and not (should_stop and should_stop()):
            started_ray = start(options.ray_address, options.workers)
            kwargs = {"scans_dir": str(scans_dir), "out_dir": str(out_dir), "options": options.to_dict()}
            done_names = set()
            for item in _results(_map(_rows(tasks), ColorizeWorker, kwargs, options.workers,
                                      options.gpus_per_worker)):
                result = FileResult(**item["result"])
                task = item["task"]
                record(ledger, ctx, Path(task["source"]), result, task["file_key"])
                done_names.add(task["name"])
                finish(result)
                if should_stop and should_stop():
                    report.interrupted = True
                    break
            if not report.interrupted:
                for task in tasks:
                    if task["name"] not in done_names:
                        reason = (f"{task['source']}: its worker process died {TASK_RETRIES + 1} times on it; "
                                  f"check its size and memory")
                        result = FileResult(task["name"], "failed", reason=reason)
                        record(ledger, ctx, Path(task["source"]), result, task["file_key"])
                        finish(result)
    finally:
        ledger.close()
        picker.close()
        if started_ray:
            _ray().shutdown()
        report.removed_temp_files += remove_orphan_temp_files(out_dir)
    report.seconds = time.perf_counter() - started
    report.stage_seconds = {"wall": round(report.seconds, 3)}
    return report


# --- index ----------------------------------------------------------------------------------------


class IndexWorker:
    """A Ray actor that reads reference photos and embeds them; the driver writes the catalogue."""

    def __init__(self, provider: str, home: str | None, precision: str) -> None:
        from archivecolor.catalog import _features_session

        self.session = _features_session(provider, Path(home) if home else None, precision)

    def __call__(self, batch: dict) -> dict:
        import base64

        import numpy as np

        from archivecolor.catalog import embed_with, prepare_photo
        from archivecolor.errors import failure_reason
        from archivecolor.imageio import printable_path

        results = []
        for text in batch["task"]:
            task = json.loads(str(text))
            path = Path(task["path"])
            try:
                fields, lightness = prepare_photo(path)
                vector = None if lightness is None else embed_with(self.session, lightness)[0]
                item = {"fields": {**fields, "thumbnail": base64.b64encode(fields["thumbnail"]).decode()},
                        "embedding": None if vector is None else np.asarray(vector, dtype=np.float32).tolist()}
            except Exception as exc:  # one failure boundary per file
                item = {"error": failure_reason(exc, printable_path(path))}
            results.append(json.dumps({"task": task, **item}))
        return {"result": np.array(results, dtype=object)}


def index_with_ray(cat, ref_dir: Path, collection: str | None, tags: list[str] | None, prune: bool,
                   progress: Callable | None, provider: str, home: Path | None, address: str | None, workers: int,
                   gpus_per_worker: float, precision: str = "fp32"):
    """``index --engine ray``: plan here, read and embed on the actors, write the catalogue here."""
    import base64

    import numpy as np

    from archivecolor.catalog import IndexReport
    from archivecolor.imageio import printable_path

    started = time.perf_counter()
    report = IndexReport()
    planned = {str(path): record for path, record in cat.plan_folder(ref_dir, collection, tags, report, progress)}
    if planned:
        started_ray = start(address, workers)
        try:
            tasks = [{"path": path} for path in planned]
            kwargs = {"provider": provider, "home": str(home) if home else None, "precision": precision}
            seen = set()
            for item in _results(_map(_rows(tasks), IndexWorker, kwargs, workers, gpus_per_worker)):
                path = item["task"]["path"]
                seen.add(path)
                if "error" in item:
                    report.failed.append((printable_path(path), item["error"]))
                    continue
                fields = {**item["fields"], "thumbnail": base64.b64decode(item["fields"]["thumbnail"])}
                embedding = None if item["embedding"] is None else np.asarray(item["embedding"], dtype=np.float32)
                cat.add_prepared({**planned[path], **fields}, report, embedding=embedding)
            for path in set(planned) - seen:
                report.failed.append((printable_path(path), f"{path}: its worker process died {TASK_RETRIES + 1} "
                                                            f"times on it; check its size and memory"))
        finally:
            if started_ray:
                _ray().shutdown()
    if prune:
        report.pruned = cat.prune()
    report.seconds = time.perf_counter() - started
    return report
