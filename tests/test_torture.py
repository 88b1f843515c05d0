"""The runner under hostile input: real files, real processes, one failure boundary per file."""

import errno
import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
from PIL import Image
from typer.testing import CliRunner

from archivecolor.cli import app
from archivecolor.errors import ArchivecolorError, UsageError
from archivecolor.imageio import read_image
from archivecolor.provenance import verify
from archivecolor.runner import INTERRUPTED_EXIT, LEDGER_NAME, RunOptions, colorize_file, colorize_folder
from tests.conftest import ROOT, colour_photos, gray_of

runner = CliRunner()


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def photos():
    return colour_photos(6, (160, 112))


@pytest.fixture
def reference(tmp_path, photos):
    path = tmp_path / "refs" / "reference.png"
    path.parent.mkdir()
    Image.fromarray(photos[5]).save(path)
    return path


def gray_scans(folder, photos, n=2):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(gray_of(photos[i])).save(folder / f"scan{i}.png")
    return folder


def indexed_catalogue(tmp_path, photos, which, home):
    """A catalogue (tmp_path/cat.sqlite) of the colour ``photos[i]`` for i in ``which``, saved in tmp_path/refs."""
    from archivecolor.catalog import index_references

    refs = tmp_path / "refs"
    refs.mkdir(exist_ok=True)
    for i in which:
        Image.fromarray(photos[i]).save(refs / f"r{i}.png")
    catalog = tmp_path / "cat.sqlite"
    index_references(refs, catalog, home=home)
    return refs, catalog


def by_source(report):
    return {r.source: r for r in report.results}


def test_extreme_aspect_ratios_and_tiny_scans_never_abort_the_batch(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos)
    Image.fromarray(np.full((1, 4000), 128, np.uint8)).save(scans / "strip-1x4000.png")
    Image.fromarray(np.full((4000, 1), 90, np.uint8)).save(scans / "strip-4000x1.png")
    Image.fromarray(np.full((1, 1), 200, np.uint8)).save(scans / "dot-1x1.png")
    before = snapshot(scans)
    report = colorize_folder(scans, RunOptions(out=tmp_path / "out", reference=reference))
    results = by_source(report)
    assert results["scan0.png"].status == results["scan1.png"].status == "done"
    for name in ("strip-1x4000.png", "strip-4000x1.png", "dot-1x1.png"):
        assert results[name].status == "done", results[name].reason
        src, out = read_image(scans / name), read_image(tmp_path / "out" / name)
        assert (out.width, out.height) == (src.width, src.height)
    assert snapshot(scans) == before


def test_a_write_error_is_one_failure_and_the_batch_goes_on(tmp_path, photos, reference, models_home, monkeypatch):
    from archivecolor import imageio

    scans = gray_scans(tmp_path / "scans", photos, 3)
    real_replace = os.replace

    def disk_full_for_one_sidecar(src, dst):  # the sidecar of scan1 hits a full disk
        if str(dst).endswith("scan1.png.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(imageio.os, "replace", disk_full_for_one_sidecar)
    out = tmp_path / "out"
    report = colorize_folder(scans, RunOptions(out=out, reference=reference))
    results = by_source(report)
    assert results["scan1.png"].status == "failed" and "No space left" in results["scan1.png"].reason
    assert results["scan0.png"].status == results["scan2.png"].status == "done"
    assert report.exit_code == 1
    assert not [p for p in out.rglob("*.tmp")]
    monkeypatch.undo()
    again = colorize_folder(scans, RunOptions(out=out, reference=reference))  # with space, the run completes it
    assert [r.source for r in again.results if r.status == "done"] == ["scan1.png"]
    assert verify(out).clean


def test_the_ledger_keys_on_reference_content_not_paths(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 2)
    out = tmp_path / "out"
    first = colorize_folder(scans, RunOptions(out=out, reference=reference))
    assert first.count("done") == 2
    assert colorize_folder(scans, RunOptions(out=out, reference=reference)).count("skipped") == 2
    Image.fromarray(photos[4]).save(reference)  # the same path, another photo
    redone = colorize_folder(scans, RunOptions(out=out, reference=reference))
    assert redone.count("done") == 2
    assert json.loads((out / "scan0.png.json").read_text())["references"][0]["sha256"] == sha(reference)

    other = tmp_path / "refs" / "other.png"
    Image.fromarray(photos[3]).save(other)
    mapping = tmp_path / "map.csv"
    mapping.write_text(f"scan,reference\nscan0.png,{reference}\nscan1.png,{reference}\n")
    # A mapping that names the very references the outputs were made from leaves them up to date.
    assert colorize_folder(scans, RunOptions(out=out, mapping=mapping)).count("skipped") == 2
    mapping.write_text(f"scan,reference\nscan0.png,{reference}\nscan1.png,{other}\n")  # one row re-picked
    edited = colorize_folder(scans, RunOptions(out=out, mapping=mapping))
    assert [r.source for r in edited.results if r.status == "done"] == ["scan1.png"]


def test_sidecar_certifies_the_reference_as_read_not_as_indexed(tmp_path, photos, models_home):
    refs, catalog = indexed_catalogue(tmp_path, photos, [5], models_home)
    Image.fromarray(photos[4]).save(refs / "r5.png")  # changed after indexing
    scans = gray_scans(tmp_path / "scans", photos, 1)
    out = tmp_path / "out"
    report = colorize_folder(scans, RunOptions(out=out, catalog=catalog))
    doc = json.loads((out / "scan0.png.json").read_text())
    assert report.count("done") == 1
    assert doc["references"][0]["sha256"] == sha(refs / "r5.png")
    assert any("changed since it was indexed" in w for w in doc["warnings"])


def test_format_same_writes_what_the_name_says(tmp_path, photos, reference, models_home):
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(photos[0])).save(scans / "misnamed.jpg", format="PNG")  # PNG bytes, .jpg name
    out = tmp_path / "out"
    report = colorize_folder(scans, RunOptions(out=out, reference=reference))
    assert report.results[0].output == "misnamed.png"
    assert Image.open(out / "misnamed.png").format == "PNG" and not (out / "misnamed.jpg").exists()


def mounted_tmpfs(path, size_bytes):
    """A real small file system at ``path`` (needs root and tmpfs); skips the test where it cannot be had."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); "
                    "the injected-ENOSPC tests cover the same paths")


@pytest.mark.parametrize("fills", ["outputs", "ledger"])
def test_a_real_full_disk_leaves_nothing_partial_and_a_later_run_completes(tmp_path, photos, reference, models_home,
                                                                           fills):
    scans = gray_scans(tmp_path / "scans", colour_photos(4), 4)  # full size: outputs dwarf the ledger
    roomy = tmp_path / "roomy"
    colorize_folder(scans, RunOptions(out=roomy, reference=reference))
    needed = sum(p.stat().st_size for p in roomy.rglob("*") if p.is_file())
    images = sum(p.stat().st_size for p in roomy.glob("*.png"))
    disk = tmp_path / "disk"
    # Room for the ledger (its write-ahead log grows to about 100 KB) and about half the outputs, or for
    # less than the ledger needs.
    mounted_tmpfs(disk, 256 * 1024 + images // 2 if fills == "outputs" else 32 * 1024)
    try:
        out = disk / "out"
        try:
            report = colorize_folder(scans, RunOptions(out=out, reference=reference))
            failed = [r for r in report.results if r.status == "failed"]
            assert failed and all("No space left" in r.reason for r in failed) and report.exit_code == 1
            assert report.count("done") >= 1 if fills == "outputs" else not report.count("done")
        except ArchivecolorError as exc:  # the ledger itself could not grow: the run stops with one line
            assert fills == "ledger" and "free space" in str(exc) and "run the same command again" in str(exc)
        check = verify(out)
        assert not (check.changed_output or check.orphaned or check.temp_files or check.unreadable)
        for image in (p for p in out.iterdir() if p.suffix == ".png"):  # what was written is whole
            assert np.array_equal(read_image(image).pixels, read_image(roomy / image.name).pixels)
        subprocess.run(["mount", "-o", f"remount,size={needed * 4}", str(disk)], check=True)
        again = colorize_folder(scans, RunOptions(out=out, reference=reference))
        assert again.exit_code == 0 and verify(out).clean
        assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in roomy.glob("*.png"))
    finally:
        unmounted = subprocess.run(["umount", str(disk)], capture_output=True).returncode == 0
        if not unmounted:
            subprocess.run(["umount", "-l", str(disk)])
    assert unmounted, "the file system stayed busy: a file on it was left open"


def test_a_ledger_that_is_not_one_is_one_error_line_and_left_alone(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / LEDGER_NAME).write_bytes(b"these are not the rows you are looking for" * 100)
    result = runner.invoke(app, ["run", str(scans), "--out", str(out), "--reference", str(reference)])
    assert result.exit_code == 1 and "not a ledger" in result.output and "move it aside" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert (out / LEDGER_NAME).read_bytes().startswith(b"these are not") and not (out / "scan0.png").exists()


def test_interrupted_run_exits_130_and_resumes(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 3)
    out = tmp_path / "out"
    seen = []
    first = colorize_folder(scans, RunOptions(out=out, reference=reference, batch_size=1),
                            progress=lambda r, done, total: seen.append(r), should_stop=lambda: len(seen) >= 1)
    assert first.interrupted and first.exit_code == INTERRUPTED_EXIT == 130
    second = colorize_folder(scans, RunOptions(out=out, reference=reference))
    assert second.exit_code == 0 and second.count("done") + second.count("skipped") == 3


def test_importing_archivecolor_keeps_pillows_bomb_guard(tmp_path):
    code = "import PIL.Image as I; d = I.MAX_IMAGE_PIXELS; import archivecolor.runner, archivecolor.cli; " \
           "print(I.MAX_IMAGE_PIXELS == d and d is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "True"
    assert PIL.Image.MAX_IMAGE_PIXELS is not None


def test_header_bomb_is_refused_by_our_limit(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"  # a PNG header claiming 100000x100000 pixels
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))
    with pytest.raises(ArchivecolorError, match="bomb.png.*exceeds the limit.*--max-pixels"):
        read_image(bomb)


def test_verify_follows_a_moved_archive_and_survives_foreign_json(tmp_path, photos, reference, models_home):
    base = tmp_path / "archive"
    scans = gray_scans(base / "scans", photos, 1)
    colorize_folder(scans, RunOptions(out=base / "out", reference=reference))
    doc = json.loads((base / "out" / "scan0.png.json").read_text())
    assert not os.path.isabs(doc["source"]["root"]) and str(tmp_path) not in json.dumps(doc["source"])
    moved = tmp_path / "moved"
    base.rename(moved)  # the archive moves, outputs and scans together
    assert verify(moved / "out").clean and verify(moved / "out").other_models == []  # the installed models made it
    upgraded = tmp_path / "upgraded-home" / "models"  # models replaced since: not a fault, but worth saying
    upgraded.mkdir(parents=True)
    (upgraded / "manifest.json").write_text(json.dumps(
        {name: {"name": name, "file": f"{name}.onnx", "sha256": "e" * 63 + str(i), "size": 1, "source": {}}
         for i, name in enumerate(doc["models"])}))
    assert verify(moved / "out", home=upgraded.parent).other_models == ["scan0.png"]
    assert verify(moved / "out", home=upgraded.parent).clean
    (moved / "out" / "list.json").write_text("[1, 2]")
    (moved / "out" / "number.json").write_text("7")
    (moved / "out" / "latin1.json").write_bytes(b'{"name": "caf\xe9"}')
    assert verify(moved / "out").clean  # not sidecars: ignored, never a crash
    apart = tmp_path / "apart"
    (moved / "scans").rename(apart)
    assert verify(moved / "out").missing_source == ["scan0.png"]
    assert verify(moved / "out", apart).clean
    result = runner.invoke(app, ["verify", str(moved / "out"), "--scans", str(apart)])
    assert result.exit_code == 0, result.output

    sidecar = moved / "out" / "scan0.png.json"
    original = sidecar.read_text()
    doc = json.loads(original)
    edits = {"reference sha256": ("references", [dict(doc["references"][0], sha256="0" * 64)]),
             "reference overall colour": ("references", [dict(doc["references"][0], overall_colour=1.0)]),
             "provider": ("provider", "CUDAExecutionProvider"),
             "model": ("models", dict(doc["models"], unet="f" * 64)),
             "parameter": ("parameters", dict(doc["parameters"], working_size=512))}
    for what, (key, value) in edits.items():  # each a valid sidecar that no longer says what made the output
        sidecar.write_text(json.dumps(dict(doc, **{key: value})))
        assert verify(moved / "out", apart).edited_record == ["scan0.png"], what
        result = runner.invoke(app, ["verify", str(moved / "out"), "--scans", str(apart)])
        assert result.exit_code == 1 and "sidecar edited" in result.output, what
    sidecar.write_text(json.dumps(dict(doc, parameters=dict(doc["parameters"], engine="ray", jobs=7))))
    assert verify(moved / "out", apart).clean  # what does not change the pixels is not part of the digest
    sidecar.write_text(json.dumps(dict(doc, provider="TotallyRealGPU")))  # not a provider: the schema refuses it
    assert "provider" in verify(moved / "out", apart).unreadable[0]
    sidecar.write_text(original)
    reference.write_bytes(reference.read_bytes() + b"\0")  # the reference file itself changes
    assert verify(moved / "out", apart).changed_reference == ["scan0.png"]
    (moved / "out" / ".scan0.png.4242.tmp").write_bytes(b"half")
    assert verify(moved / "out", apart).temp_files == [".scan0.png.4242.tmp"]


def test_never_replaces_files_it_did_not_write(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 2)
    other_scans = gray_scans(tmp_path / "other-scans", photos[2:], 2)  # same names, other photos
    before = snapshot(other_scans)
    report = colorize_folder(scans, RunOptions(out=other_scans, reference=reference, overwrite=True))
    assert report.count("failed") == 2 and report.exit_code == 1
    assert all("not written by archivecolor" in r.reason for r in report.results)
    after = snapshot(other_scans)
    assert {k: after[k] for k in before} == before  # only the run's own ledger and lock were added
    assert set(after) - set(before) == {".archivecolor-ledger.sqlite", ".archivecolor.lock"}
    out = tmp_path / "out"
    colorize_folder(scans, RunOptions(out=out, reference=reference))
    assert colorize_folder(scans, RunOptions(out=out, reference=reference, overwrite=True)).count("done") == 2


def test_fifos_device_links_and_escaping_folder_links_are_skipped_with_a_reason(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 1)
    os.mkfifo(scans / "pipe.png")
    (scans / "zero.jpg").symlink_to("/dev/zero")
    (scans / "everything").symlink_to("/")
    (scans / "inside.png").symlink_to(scans / "scan0.png")
    Image.fromarray(gray_of(photos[2])).save(tmp_path / "elsewhere.png")
    (scans / "linked.png").symlink_to(tmp_path / "elsewhere.png")
    (scans / "loop").symlink_to(scans)
    name = os.fsdecode(b"caf\xe9 \n name.png")  # not UTF-8, with a space and a newline
    Image.fromarray(gray_of(photos[1])).save(os.path.join(os.fsencode(scans), os.fsencode(name)))
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        from archivecolor.runner import RunOptions, colorize_folder
        r = colorize_folder({str(scans)!r}, RunOptions(out={str(out)!r}, reference={str(reference)!r}))
        for x in r.results:
            print(x.status, '|', x.source.replace(chr(10), '<nl>'), '|', x.reason)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split(" | ")[1]: line for line in proc.stdout.splitlines()}
    assert all(lines[name].startswith("done") for name in ("scan0.png", "inside.png", "linked.png"))
    assert "not a regular file" in lines["pipe.png"] and "not a regular file" in lines["zero.jpg"]
    assert "outside the scans folder" in lines["everything"]
    odd = [k for k in lines if k.startswith("caf")]
    assert len(odd) == 1 and lines[odd[0]].startswith("done") and "\\xe9" in odd[0]


def test_a_second_run_on_the_same_output_folder_is_refused_with_the_holder(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 1)
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from archivecolor.runner import OutputLock\n"
         f"with OutputLock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ArchivecolorError, match=rf"another archivecolor run \(pid {holder.pid} on .*\) is writing"):
            colorize_folder(scans, RunOptions(out=out, reference=reference))
        result = runner.invoke(app, ["run", str(scans), "--out", str(out), "--reference", str(reference)])
        assert result.exit_code == 1 and "another archivecolor run" in result.output
    finally:
        holder.kill()
        holder.wait()
    assert colorize_folder(scans, RunOptions(out=out, reference=reference)).count("done") == 1


def test_orphan_temp_files_of_a_killed_run_are_cleaned(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 1)
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / ".scan0.png.99999.tmp").write_bytes(b"partial")
    report = colorize_folder(scans, RunOptions(out=out, reference=reference))
    assert report.removed_temp_files == 1 and not list(out.rglob("*.tmp"))


def test_run_dot_writes_beside_the_folder(tmp_path, photos, reference, models_home, monkeypatch):
    scans = gray_scans(tmp_path / "box", photos, 1)
    monkeypatch.chdir(scans)
    result = runner.invoke(app, ["run", ".", "--reference", str(reference), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "box-colorized" / "scan0.png").exists()


def test_bad_references_mappings_and_catalogues_are_clear_errors(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 1)
    gray_ref = tmp_path / "gray.png"
    Image.fromarray(gray_of(photos[4])).save(gray_ref)
    with pytest.raises(UsageError, match="grayscale or toned"):
        colorize_folder(scans, RunOptions(out=tmp_path / "o1", reference=gray_ref))
    escaping = tmp_path / "escape.csv"
    escaping.write_text(f"scan,reference\n../../etc/passwd,{reference}\n")
    with pytest.raises(UsageError, match="escape.csv:2.*inside"):
        colorize_folder(scans, RunOptions(out=tmp_path / "o2", mapping=escaping))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    result = runner.invoke(app, ["run", str(scans), "--out", str(tmp_path / "o3"), "--mapping", str(binary)])
    assert result.exit_code == 2 and "binary.csv" in result.output and "Traceback" not in result.output
    missing = tmp_path / "missing.csv"
    missing.write_text(f"scan,reference\nscan0.png,{tmp_path / 'nope.jpg'}\n")
    with pytest.raises(UsageError, match="nope.jpg does not exist"):
        colorize_folder(scans, RunOptions(out=tmp_path / "o4", mapping=missing))
    not_sqlite = tmp_path / "cat.sqlite"
    not_sqlite.write_bytes(b"this is not a database" * 100)
    result = runner.invoke(app, ["run", str(scans), "--out", str(tmp_path / "o5"), "--catalog", str(not_sqlite)])
    assert result.exit_code == 1 and "not a readable catalogue" in result.output
    from archivecolor.catalog import Catalog

    empty = tmp_path / "empty.sqlite"
    Catalog.open(empty, create=True).close()
    result = runner.invoke(app, ["run", str(scans), "--out", str(tmp_path / "o6"), "--catalog", str(empty)])
    assert result.exit_code == 1 and "no colour references" in result.output


def test_output_folder_that_is_a_file_is_a_usage_error(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 1)
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, ["run", str(scans), "--out", str(afile), "--reference", str(reference)])
    assert result.exit_code == 2 and "is not a folder" in result.output


def test_a_rerun_gives_byte_identical_outputs(tmp_path, photos, reference, models_home):
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(photos[0])).save(scans / "a.png")
    Image.fromarray(gray_of(photos[1])).save(scans / "b.jpg", quality=92)
    out = tmp_path / "out"
    colorize_folder(scans, RunOptions(out=out, reference=reference))
    first = {name: sha(out / name) for name in ("a.png", "b.jpg")}
    colorize_folder(scans, RunOptions(out=out, reference=reference, overwrite=True))
    assert {name: sha(out / name) for name in first} == first


def test_a_corrupt_icc_profile_is_not_copied(tmp_path, photos, reference, models_home):
    from archivecolor.imageio import srgb_profile

    scans = tmp_path / "scans"
    scans.mkdir()
    good = srgb_profile()
    corrupt = good[:40] + b"\xff" * (len(good) - 40)
    Image.fromarray(np.dstack([gray_of(photos[0])] * 3)).save(scans / "icc.png", icc_profile=corrupt)
    out = tmp_path / "out"
    report = colorize_folder(scans, RunOptions(out=out, reference=reference))
    assert report.count("done") == 1
    assert read_image(out / "icc.png").icc == good
    assert any("ICC profile is corrupt" in w for w in report.results[0].warnings)


def test_index_survives_odd_names_and_a_concurrent_indexer(tmp_path, photos, models_home):
    from archivecolor.catalog import Catalog, index_references

    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        Image.fromarray(photos[i]).save(refs / f"r{i}.png")
    odd = os.path.join(os.fsencode(refs), b"caf\xe9.png")
    Image.fromarray(photos[4]).save(odd)
    catalog = tmp_path / "cat.sqlite"
    code = ("import sys; from archivecolor.catalog import index_references; "
            f"r = index_references({str(refs)!r}, {str(catalog)!r}); print(r.added + r.updated + r.unchanged, len(r.failed))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ)) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outputs]
    with Catalog.open(catalog) as cat:
        assert cat.count(colour_only=True) == 4
    report = index_references(refs, catalog, home=models_home)
    assert report.unchanged == 4 and len(report.failed) == 1
    assert "caf\\xe9.png" in report.failed[0][0] and "not valid UTF-8" in report.failed[0][1]


def hostile_tree(root, photos):
    """At least fifteen kinds of bad or unusual scans, each a real file."""
    import io
    import struct
    import zlib

    import tifffile

    root.mkdir(parents=True)
    g = gray_of(photos[0])
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(g).save(buf, format="PNG")
    png = buf.getvalue()
    buf = io.BytesIO()
    tifffile.imwrite(buf, g)
    tiff = buf.getvalue()
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "truncated.png").write_bytes(png[: len(png) // 3])
    (root / "truncated.tif").write_bytes(tiff[: len(tiff) // 3])
    (root / "png-named.jpg").write_bytes(png)
    (root / "page.jpg").write_text("<html><body>404 Not Found</body></html>")
    Image.fromarray(np.full((1, 1), 99, np.uint8)).save(root / "one-pixel.png")
    Image.fromarray(np.tile(g[:1], (1, 60))[:, :10000]).save(root / "strip-1x10000.png")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    (root / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
                                    + chunk(b"IEND", b""))
    Image.fromarray(np.dstack([g] * 3)).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(g).convert("P").save(root / "palette.png")
    Image.fromarray(g).convert("LA").save(root / "gray-alpha.png")
    Image.fromarray(g.astype(np.uint16) * 257).save(root / "gray16.png")
    tifffile.imwrite(root / "float32.tif", g.astype(np.float32) / 255)
    tifffile.imwrite(root / "multipage.tif", np.stack([g, g]))
    tifffile.imwrite(root / "planar.tif", np.stack([g, g, g]), planarconfig="separate", photometric="rgb")
    frames = [Image.fromarray(g), Image.fromarray(255 - g)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 42
    Image.fromarray(g).save(root / "bad-orientation.jpg", exif=exif.tobytes())
    from archivecolor.imageio import srgb_profile

    icc = srgb_profile()
    Image.fromarray(np.dstack([g] * 3)).save(root / "corrupt-icc.png", icc_profile=icc[:40] + b"\xff" * (len(icc) - 40))
    (root / "loop").symlink_to(root)
    Image.fromarray(g).save(root / "name with spaces.png")
    Image.fromarray(g).save(os.path.join(os.fsencode(root), b"new\nline-\xff.png"))
    return root


def test_a_hostile_tree_gets_done_or_one_line_reasons_and_stays_untouched(tmp_path, photos, reference, models_home):
    scans = hostile_tree(tmp_path / "hostile", photos)
    before = snapshot(scans)
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import json
        from archivecolor.runner import RunOptions, colorize_folder
        r = colorize_folder({str(scans)!r}, RunOptions(out={str(out)!r}, reference={str(reference)!r}))
        print(json.dumps(r.as_dict()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = {r["source"]: r for r in json.loads(proc.stdout)["results"]}
    assert snapshot(scans) == before
    failed = {"zero.jpg", "truncated.jpg", "truncated.png", "truncated.tif", "page.jpg", "bomb.png", "float32.tif"}
    done = {"png-named.jpg", "one-pixel.png", "strip-1x10000.png", "cmyk.jpg", "palette.png", "gray-alpha.png",
            "gray16.png", "multipage.tif", "planar.tif", "animated.gif", "bad-orientation.jpg", "corrupt-icc.png",
            "name with spaces.png", "new\nline-\\xff.png"}
    for name in failed:
        assert results[name]["status"] == "failed", results[name]
        reason = results[name]["reason"]
        assert "\n" not in reason and name.split(".")[0] in reason and "Traceback" not in reason
    for name in done:
        assert results[name]["status"] == "done", results[name]
        output = results[name]["output"].replace("\\xff", os.fsdecode(b"\xff"))  # the report shows bytes as \\xNN
        assert read_image(out / output).pixels.size > 0
    assert results["png-named.jpg"]["output"] == "png-named.png"
    assert results["animated.gif"]["output"] == "animated.png"
    assert any("only the first" in w for w in results["animated.gif"]["warnings"])
    assert any("orientation 42" in w for w in results["bad-orientation.jpg"]["warnings"])
    assert any("ICC profile is corrupt" in w for w in results["corrupt-icc.png"]["warnings"])
    assert any("only the first page" in w for w in results["multipage.tif"]["warnings"])
    assert verify(out).clean


@pytest.mark.slow
def test_kill_9_at_random_moments_never_leaves_a_partial_output(tmp_path, photos, reference, models_home):
    import random
    import time

    scans = gray_scans(tmp_path / "scans", photos, 6)
    (scans / "sub").mkdir()
    Image.fromarray(gray_of(photos[2])).save(scans / "sub" / "deep.jpg", quality=90)

    def command(out):
        return [sys.executable, "-m", "archivecolor", "run", str(scans), "--out", str(out), "--reference", str(reference),
                "--quiet", "--batch-size", "1"]

    baseline = tmp_path / "baseline"
    started = time.perf_counter()
    subprocess.run(command(baseline), cwd=ROOT, check=True, capture_output=True)
    full = time.perf_counter() - started
    expected = {p.relative_to(baseline): read_image(p).pixels for p in baseline.rglob("*") if p.suffix in (".png", ".jpg")}
    assert len(expected) == 7
    rng = random.Random(0)
    trials = []
    for trial in range(20):
        out = tmp_path / f"trial{trial}"
        proc = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.1, full))
        proc.kill()
        proc.wait()
        outputs = [p for p in out.rglob("*") if p.suffix in (".png", ".jpg")] if out.exists() else []
        for path in outputs:  # whatever a killed run left is whole and accounted for
            doc = json.loads((path.parent / (path.name + ".json")).read_text())
            assert doc["output"]["sha256"] == sha(path)
            assert read_image(path).pixels.size > 0
        trials.append(len(outputs))
        resumed = colorize_folder(scans, RunOptions(out=out, reference=reference, batch_size=1))
        assert resumed.exit_code == 0 and resumed.count("done") + resumed.count("skipped") == 7
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
        for rel, pixels in expected.items():
            assert np.array_equal(read_image(out / rel).pixels, pixels), (trial, rel)
        assert verify(out).clean
    assert min(trials) < 7 and max(trials) > 0  # kills landed before, during and after the writes


def test_an_unwritable_output_folder_is_one_error_line(tmp_path, photos, reference, models_home):
    scans = gray_scans(tmp_path / "scans", photos, 1)
    # /proc/self exists and is a folder that nobody, root included, may create files in
    result = runner.invoke(app, ["run", str(scans), "--out", "/proc/self", "--reference", str(reference), "--quiet"])
    assert result.exit_code == 1 and "Error: /proc/self: cannot write here" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_index_and_run_at_once_on_one_catalogue_both_finish(tmp_path, photos, models_home):
    _, catalog = indexed_catalogue(tmp_path, photos, [3, 4, 5], models_home)
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        Image.fromarray(np.ascontiguousarray(photos[i][::-1])).save(more / f"m{i}.png")
    indexer = subprocess.Popen([sys.executable, "-m", "archivecolor", "index", str(more), "--catalog", str(catalog)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    scans = gray_scans(tmp_path / "scans", photos, 3)
    report = colorize_folder(scans, RunOptions(out=tmp_path / "out", catalog=catalog))
    _, err = indexer.communicate(timeout=240)
    assert indexer.returncode == 0, err[-1000:]
    assert report.exit_code == 0 and report.count("done") == 3


def test_a_malformed_manifest_is_one_error_line(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("ARCHIVECOLOR_HOME", str(home))
    for text in ("[1, 2, 3]", '{"unet": {"name": "unet"}}', "not json"):
        (home / "models" / "manifest.json").write_text(text)
        result = runner.invoke(app, ["models", "list"])
        assert result.exit_code == 1 and "manifest.json: unreadable manifest" in result.output, result.output
        assert "Traceback" not in result.output


def test_unreadable_scans_and_folders_are_reported(tmp_path, photos, reference, models_home):
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads every file: permissions cannot be exercised here")
    scans = gray_scans(tmp_path / "scans", photos, 2)
    (scans / "scan1.png").chmod(0)
    locked = scans / "locked"
    locked.mkdir()
    Image.fromarray(gray_of(photos[2])).save(locked / "inside.png")
    locked.chmod(0)
    try:
        report = colorize_folder(scans, RunOptions(out=tmp_path / "out", reference=reference))
    finally:
        (scans / "scan1.png").chmod(0o644)
        locked.chmod(0o755)
    results = by_source(report)
    assert results["scan0.png"].status == "done" and results["scan1.png"].status == "failed"
    assert any(r.status == "failed" and "cannot be listed" in r.reason for r in report.results)
    assert report.exit_code == 1


def test_a_changed_catalogue_redoes_the_retrieved_outputs(tmp_path, photos, models_home):
    from archivecolor.catalog import index_references

    refs, catalog = indexed_catalogue(tmp_path, photos, [3, 4], models_home)
    scans = gray_scans(tmp_path / "scans", photos, 2)
    out = tmp_path / "out"
    assert colorize_folder(scans, RunOptions(out=out, catalog=catalog)).count("done") == 2
    assert colorize_folder(scans, RunOptions(out=out, catalog=catalog)).count("skipped") == 2
    Image.fromarray(photos[5]).save(refs / "r2.png")  # a new reference could now be retrieved
    index_references(refs, catalog, home=models_home)
    assert colorize_folder(scans, RunOptions(out=out, catalog=catalog)).count("done") == 2


def test_colorize_file_is_the_same_core_as_the_folder_run(tmp_path, photos, reference, models_home):
    from archivecolor.pipeline import Models, ReferenceCache
    from archivecolor.runner import RunContext

    scans = gray_scans(tmp_path / "scans", photos, 2)
    colorize_folder(scans, RunOptions(out=tmp_path / "folder", reference=reference))
    options = RunOptions(out=tmp_path / "single", reference=reference)
    models = Models.open("cpu", models_home)
    ctx = RunContext.create(scans, tmp_path / "single", options, models)
    refs = [{"path": str(reference.resolve()), "sha256": sha(reference), "similarity": None, "catalog_id": None}]
    cache = ReferenceCache(models)
    for name in ("scan0.png", "scan1.png"):
        result = colorize_file(ctx, scans / name, refs, cache)
        assert result.status == "done" and result.output == name
        assert np.array_equal(read_image(tmp_path / "single" / name).pixels, read_image(tmp_path / "folder" / name).pixels)
        doc = json.loads((tmp_path / "single" / (name + ".json")).read_text())
        assert doc["output"]["sha256"] == sha(tmp_path / "single" / name)
    bad = scans / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    failed = colorize_file(ctx, bad, refs, cache)
    assert failed.status == "failed" and "broken.png" in failed.reason and "\n" not in failed.reason
