"""Speed: `run` timed in fresh processes (scans/s, stages, peak RSS), and catalogue query latency at scale."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np

from archivecolor.errors import UsageError


def retrieval_latency(sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), queries: int = 16, k: int = 5,
                      dim: int = 512, repeats: int = 5) -> list[dict]:
    """Exact top-k query latency over synthetic unit embeddings, as the catalogue runs it (in memory)."""
    from archivecolor.catalog import top_k

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        matrix = rng.standard_normal((n, dim), dtype=np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        q = matrix[rng.integers(0, n, queries)] + 0.01
        mask = np.ones(n, dtype=bool)
        top_k(q, matrix, mask, k)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            top_k(q, matrix, mask, k)
            times.append(time.perf_counter() - t)
        best = min(times)
        rows.append({"embeddings": n, "batch": queries, "ms_per_batch": round(best * 1e3, 2),
                     "ms_per_query": round(best * 1e3 / queries, 3), "matrix_mb": round(matrix.nbytes / 2**20, 1)})
        del matrix
    return rows


_SPEED_CHILD = ("import time; started = time.perf_counter(); import sys; "
               "from archivecolor.bench.speed import speed_child; speed_child(sys.stdin.read(), started)")


def speed_child(request: str, started: float) -> None:
    """One timed run in a fresh process (so that peak RSS and start-up are its own): JSON in, JSON out.
    ``started``: when the process began running Python, for the time to the first finished scan."""
    from archivecolor.runner import RunOptions, colorize_folder

    args = json.loads(request)
    options = RunOptions.from_dict(args["options"])
    first: list[float] = []

    def on_result(result, done: int, total: int) -> None:
        if result.status == "done" and not first:
            first.append(time.perf_counter() - started)

    report = colorize_folder(args["scans"], options, progress=on_result)
    print(json.dumps({"seconds": report.seconds, "stage_seconds": report.stage_seconds,
                      "counts": report.as_dict()["counts"],
                      "first_output_s": round(first[0], 3) if first else None,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run_speed(scans: Path, options: dict, repeat: int = 3, work_dir: Path | None = None) -> dict:
    """Colorize ``scans`` ``repeat`` times, each in a fresh process writing a fresh output folder.

    ``options``: RunOptions fields (catalog, reference, top_k, working_size, ...). Returns each run's
    wall seconds, scans/s, peak RSS and seconds from the process's start to its first finished output
    (imports and opening the models included), the median run's stage seconds (they add up to its wall
    time: "other" is the rest), and the median scans/s.
    """
    import subprocess
    import sys
    import tempfile

    scans = Path(scans)
    if not scans.is_dir():
        raise UsageError(f"--speed {scans}: not a folder; pass a folder of gray scans")
    runs = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for i in range(repeat):
            request = json.dumps({"scans": str(scans), "options": {**options, "out": str(Path(tmp) / f"out{i}")}},
                                 default=str)
            proc = subprocess.Popen([sys.executable, "-c", _SPEED_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            stdout, stderr = proc.communicate(request)
            if proc.returncode:
                raise UsageError(f"--speed {scans}: the timed run failed: {stderr.strip().splitlines()[-1:]}")
            result = json.loads(stdout.strip().splitlines()[-1])
            done = result["counts"]["done"]
            if not done:
                raise UsageError(f"--speed {scans}: no scan was colorized ({result['counts']}); pass a folder of gray scans")
            result["scans_per_s"] = round(done / result["seconds"], 3)
            runs.append(result)
    order = sorted(range(len(runs)), key=lambda i: runs[i]["seconds"])
    median = runs[order[len(order) // 2]]
    return {"scans": str(scans), "options": options, "repeat": repeat, "runs": runs,
            "median_scans_per_s": median["scans_per_s"], "median_seconds": round(median["seconds"], 3),
            "stage_seconds": median["stage_seconds"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "first_output_s": median["first_output_s"]}
