"""`--engine ray` on a real local Ray (2 CPUs): same outputs as local, killed workers, bad files, resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from archivecolor.catalog import Catalog, index_references
from archivecolor.imageio import read_image
from archivecolor.provenance import read_sidecar, verify
from archivecolor.runner import LEDGER_NAME, Ledger, RunOptions, colorize_folder
from tests.conftest import colour_photos, gray_of

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'archivecolor[ray]')")
pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'archivecolor[ray]')")

VARYING = {"started_utc", "finished_utc", "durations_s"}


@pytest.fixture(scope="module", autouse=True)
def local_ray(models_home):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """12 gray scans in three folders and one colour reference."""
    root = tmp_path_factory.mktemp("raytree")
    photos = colour_photos(13, (160, 112))
    Image.fromarray(photos[12]).save(root / "reference.png")
    for i, photo in enumerate(photos[:12]):
        folder = root / "scans" / f"box{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gray_of(photo)).save(folder / f"scan{i:02d}.png")
    return root


def _comparable(record) -> dict:
    doc = {k: v for k, v in record.to_document().items() if k not in VARYING}
    doc["parameters"] = {k: v for k, v in doc["parameters"].items() if k != "engine"}
    return doc


@pytest.mark.slow  # Ray runs of all 12 scans; `make test-slow` (CI runs it)
def test_ray_outputs_are_pixel_identical_to_local_with_a_complete_ledger(tree):
    reference = tree / "reference.png"
    local = colorize_folder(tree / "scans", RunOptions(out=tree / "local", reference=reference))
    remote = colorize_folder(tree / "scans", RunOptions(out=tree / "ray", reference=reference, engine="ray"))
    assert local.count("done") == remote.count("done") == 12 and remote.exit_code == 0
    for result in local.results:
        ours, theirs = tree / "local" / result.output, tree / "ray" / result.output
        assert np.array_equal(read_image(ours).pixels, read_image(theirs).pixels), result.output
        assert _comparable(read_sidecar(ours.with_name(ours.name + ".json"))) == \
            _comparable(read_sidecar(theirs.with_name(theirs.name + ".json")))
    ledger = Ledger(tree / "ray" / LEDGER_NAME)
    rows = ledger.rows()
    ledger.close()
    assert len(rows) == 12 and all(r["status"] == "done" and r["content_key"] for r in rows)
    assert verify(tree / "ray").clean
    again = colorize_folder(tree / "scans", RunOptions(out=tree / "ray", reference=reference, engine="ray"))
    assert again.count("skipped") == 12  # the ledger the driver wrote is the local engine's


def _worker_pids() -> list[int]:
    """The processes of the colorizing actors, found by the name Ray gives them (no dashboard needed)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and b"MapWorker(MapBatches(ColorizeWorker))" in cmdline:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow  # Ray runs of all 12 scans; `make test-slow` (CI runs it)
def test_a_worker_killed_mid_run_is_replaced_and_every_file_completes(tree):
    killed = []

    def kill_one(result, done, total):
        if done == 2 and not killed:
            pids = _worker_pids()
            assert pids, "no Ray Data worker found to kill"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    out = tree / "killed"
    report = colorize_folder(tree / "scans", RunOptions(out=out, reference=tree / "reference.png", engine="ray"),
                             progress=kill_one)
    assert killed and report.count("done") == 12 and report.exit_code == 0
    assert not list(out.rglob("*.tmp"))
    assert verify(out).clean  # every output decodes to the bytes its sidecar certifies


def test_a_bad_file_is_a_recorded_failure_and_the_rest_are_done(tree, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    for path in sorted((tree / "scans" / "box0").iterdir())[:3]:
        (scans / path.name).write_bytes(path.read_bytes())
    (scans / "broken.png").write_bytes((scans / path.name).read_bytes()[:150])
    report = colorize_folder(scans, RunOptions(out=tmp_path / "out", reference=tree / "reference.png", engine="ray"))
    status = {r.source: r for r in report.results}
    assert report.exit_code == 1 and report.count("done") == 3
    assert status["broken.png"].status == "failed" and "broken.png" in status["broken.png"].reason
    ledger = Ledger(tmp_path / "out" / LEDGER_NAME)
    assert ledger.get("broken.png")["status"] == "failed"
    ledger.close()


@pytest.mark.slow  # Ray runs of all 12 scans; `make test-slow` (CI runs it)
def test_resume_after_the_driver_is_interrupted(tree):
    out = tree / "resumed"
    options = RunOptions(out=out, reference=tree / "reference.png", engine="ray")
    seen = []
    first = colorize_folder(tree / "scans", options, progress=lambda r, done, total: seen.append(r.source),
                            should_stop=lambda: len(seen) >= 4)
    assert first.interrupted and first.exit_code == 130 and 4 <= first.count("done") < 12
    second = colorize_folder(tree / "scans", options)
    assert second.count("skipped") == first.count("done") and second.count("done") == 12 - first.count("done")
    assert verify(out).clean and not list(out.rglob("*.tmp"))


def test_index_on_ray_gives_the_local_catalogue(tree, tmp_path, models_home):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, photo in enumerate(colour_photos(5, (160, 112))):
        Image.fromarray(photo).save(refs / f"ref{i}.png")
    Image.fromarray(gray_of(photo)).save(refs / "gray.png")
    local = index_references(refs, tmp_path / "local.sqlite", home=models_home)
    remote = index_references(refs, tmp_path / "ray.sqlite", home=models_home, engine="ray")
    assert (remote.added, remote.refused_gray, remote.failed) == (local.added, local.refused_gray, local.failed) == (5, 1, [])
    with Catalog.open(tmp_path / "local.sqlite") as a, Catalog.open(tmp_path / "ray.sqlite") as b:
        (ma, ia), (mb, ib) = a._load(), b._load()
        by_sha = {i["sha256"]: row for i, row in zip(ib, mb)}  # the actors finish in any order
        assert sorted(by_sha) == sorted(i["sha256"] for i in ia)
        np.testing.assert_allclose(ma, np.stack([by_sha[i["sha256"]] for i in ia]), atol=1e-5)
    again = index_references(refs, tmp_path / "ray.sqlite", home=models_home, engine="ray")
    assert again.unchanged == 6 and again.added == 0
    assert json.loads(json.dumps(again.failed)) == []
