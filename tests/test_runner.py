"""End to end: the real CLI over a folder tree of real photos turned gray, mixed with broken files."""

import hashlib
import io
import json
import os
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from archivecolor.catalog import index_references
from archivecolor.cli import app
from archivecolor.color import l_to_gray, rgb_to_lab
from archivecolor.errors import UsageError
from archivecolor.imageio import read_embedded_xmp, read_image
from archivecolor.provenance import load_schema, read_xmp_fields
from archivecolor.runner import RunOptions, colorize_folder
from tests.conftest import ROOT, colour_photos, gray_of, small_ensemble

runner = CliRunner()


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def scans(tmp_path):
    photos = colour_photos(4, (240, 160))
    root = tmp_path / "scans"
    (root / "box1" / "folder a").mkdir(parents=True)
    Image.fromarray(gray_of(photos[0])).save(root / "box1" / "plain.jpg", quality=95)
    tifffile.imwrite(root / "box1" / "folder a" / "deep16.tif", gray_of(photos[1]).astype(np.uint16) * 257,
                     compression="zlib")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(gray_of(photos[2])).save(root / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(gray_of(photos[3])).save(root / "palette.png")
    Image.fromarray(np.dstack([gray_of(photos[3])] * 3)).convert("CMYK").save(root / "cmyk.jpg")
    (root / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(gray_of(photos[0])).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:2000])
    (root / "fake.png").write_text("not a png")
    (root / "readme.txt").write_text("notes")
    (root / ".DS_Store").write_bytes(b"junk")
    Image.fromarray(photos[0]).save(root / "already-colour.png")
    return root


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "reference.jpg"
    Image.fromarray(colour_photos(5, (256, 192))[4]).save(path, quality=95)
    return path


def _run(*args):
    return runner.invoke(app, ["run", *map(str, args)], catch_exceptions=False)


def test_run_end_to_end(scans, reference, tmp_path, models_home):
    before = snapshot(scans)
    out = tmp_path / "out"
    result = _run(scans, "--out", out, "--reference", reference, "--quiet", "--jobs", "2", "--xmp-sidecar")
    assert result.exit_code == 1, result.output
    assert snapshot(scans) == before  # the input tree is never written to

    schema = load_schema()
    done = {"box1/plain.jpg", "box1/folder a/deep16.tif", "rotated.jpg", "palette.png", "cmyk.jpg"}
    for rel in done:
        output = out / rel
        assert output.exists(), rel
        sidecar = json.loads((out / (rel + ".json")).read_text())
        jsonschema.validate(sidecar, schema)
        assert sidecar["output"]["sha256"] == hashlib.sha256(output.read_bytes()).hexdigest()
        assert sidecar["source"]["sha256"] == hashlib.sha256((scans / rel).read_bytes()).hexdigest()
        assert sidecar["provider"] == "CPUExecutionProvider"
        assert sidecar["references"][0]["sha256"] == hashlib.sha256(reference.read_bytes()).hexdigest()
        src, dst = read_image(scans / rel), read_image(output)
        assert (dst.width, dst.height) == (src.width, src.height)
        assert dst.orientation == src.orientation
        assert read_xmp_fields(read_embedded_xmp(output))["DerivedFrom"] == "sha256:" + sidecar["source"]["sha256"]
        assert (out / (rel + ".xmp")).exists()
    assert "treated as gray" in " ".join(json.loads((out / "cmyk.jpg.json").read_text())["warnings"])

    deep = read_image(out / "box1" / "folder a" / "deep16.tif")
    assert deep.bit_depth == 16 and deep.pixels.dtype == np.uint16
    source_l = read_image(scans / "box1" / "folder a" / "deep16.tif").lightness()
    assert np.abs(rgb_to_lab(deep.pixels)[..., 0] - source_l).max() < 0.05
    png = read_image(out / "palette.png").pixels
    gray_back = np.round(l_to_gray(rgb_to_lab(png)[..., 0]) * 255)
    assert np.abs(gray_back - read_image(scans / "palette.png").pixels).max() <= 1
    colourful = rgb_to_lab(png)[..., 1:]
    assert np.hypot(colourful[..., 0], colourful[..., 1]).mean() > 2.0  # it really is colour

    for bad in ("zero.jpg", "truncated.jpg", "fake.png"):
        assert bad in result.output
        assert not (out / bad).exists()
    assert "already-colour.png" not in os.listdir(out)

    again = _run(scans, "--out", out, "--reference", reference, "--json")
    report = json.loads(again.stdout)
    assert report["counts"]["done"] == 0 and report["counts"]["failed"] == 3
    assert {r["source"] for r in report["results"] if r["reason"] == "up to date"} == done

    (out / "rotated.jpg").unlink()
    third = json.loads(_run(scans, "--out", out, "--reference", reference, "--json").stdout)
    assert [r["source"] for r in third["results"] if r["status"] == "done"] == ["rotated.jpg"]

    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    with open(out / "palette.png", "ab") as handle:
        handle.write(b"tampered")
    verify = runner.invoke(app, ["verify", str(out)])
    assert verify.exit_code == 1 and "changed output: palette.png" in verify.output


def test_clean_folder_exits_zero_and_python_api_returns_results(tmp_path, reference, models_home):
    scans = tmp_path / "clean"
    scans.mkdir()
    Image.fromarray(gray_of(colour_photos(1, (160, 160))[0])).save(scans / "one.png")
    report = colorize_folder(scans, RunOptions(reference=reference, format="tiff"))
    assert report.exit_code == 0 and report.count("done") == 1
    assert report.results[0].output == "one.tif"
    assert (tmp_path / "clean-colorized" / "one.tif").exists()  # the default sibling folder
    assert _run(scans, "--reference", reference, "--quiet").exit_code == 0


def test_usage_errors_exit_2_and_write_nothing(scans, reference, tmp_path, models_home):
    before = snapshot(scans)
    inside = _run(scans, "--out", scans / "out", "--reference", reference)
    assert inside.exit_code == 2 and "inside the scans folder" in inside.output
    assert _run(scans, "--format", "gif", "--reference", reference).exit_code == 2
    assert _run(tmp_path / "nope", "--reference", reference).exit_code == 2
    with pytest.raises(UsageError):
        colorize_folder(scans, RunOptions(reference=reference, working_size=100))
    assert snapshot(scans) == before


def test_dry_run_with_catalogue_and_top_k(scans, tmp_path, models_home):
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, photo in enumerate(colour_photos(6, (192, 128))):
        Image.fromarray(photo).save(refs / f"r{i}.jpg")
    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    out = tmp_path / "dry"
    report = json.loads(_run(scans, "--out", out, "--catalog", db, "--top-k", "2", "--dry-run", "--json").stdout)
    planned = [r for r in report["results"] if r["status"] == "planned"]
    assert len(planned) == 5 and all(len(r["references"]) == 2 for r in planned)
    assert not out.exists()

    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(gray_of(colour_photos(1, (160, 128))[0])).save(small / "s.png")
    done = colorize_folder(small, RunOptions(out=tmp_path / "fused", catalog=db, top_k=2))
    refs_used = done.results[0].references
    assert len(refs_used) == 2 and abs(sum(r["share"] for r in refs_used) - 1.0) < 1e-3
    assert refs_used[0]["similarity"] >= refs_used[1]["similarity"]


def test_mapping_csv(tmp_path, reference, models_home):
    scans = tmp_path / "mapped"
    (scans / "a").mkdir(parents=True)
    Image.fromarray(gray_of(colour_photos(1, (160, 128))[0])).save(scans / "a" / "x.png")
    Image.fromarray(gray_of(colour_photos(2, (160, 128))[1])).save(scans / "y.png")
    mapping = tmp_path / "map.csv"
    mapping.write_text(f"scan,reference\na/x.png,{reference}\n")
    report = colorize_folder(scans, RunOptions(mapping=mapping))
    status = {r.source: r for r in report.results}
    assert status["a/x.png"].status == "done"
    assert status["y.png"].status == "failed" and "not listed in the mapping" in status["y.png"].reason
    bad = tmp_path / "bad.csv"
    bad.write_text("scan,reference\na/x.png,missing.jpg\n")
    with pytest.raises(UsageError, match="bad.csv:2"):
        colorize_folder(scans, RunOptions(mapping=bad))


def test_interrupt_finishes_the_batch_and_resumes(tmp_path, reference, models_home):
    scans = tmp_path / "many"
    scans.mkdir()
    for i, photo in enumerate(colour_photos(5, (128, 96))):
        Image.fromarray(gray_of(photo)).save(scans / f"s{i}.png")
    out = tmp_path / "many-out"
    seen = []
    first = colorize_folder(scans, RunOptions(out=out, reference=reference, batch_size=2),
                            progress=lambda r, done, total: seen.append(r.source), should_stop=lambda: len(seen) >= 1)
    assert first.interrupted and 1 <= first.count("done") < 5
    assert not [p for p in out.rglob("*.tmp")]  # nothing partial
    for r in first.results:
        assert (out / r.output).exists() and (out / (r.output + ".json")).exists()
    second = colorize_folder(scans, RunOptions(out=out, reference=reference, batch_size=2))
    assert second.count("done") == 5 - first.count("done") and second.count("skipped") == first.count("done")


def test_model_path_runs_a_users_own_unet_and_records_its_hash(tmp_path, reference, models_home):
    from archivecolor.models.store import model_dir

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(colour_photos(1, (128, 96))[0])).save(scans / "a.png")
    own = tmp_path / "my-unet.onnx"
    own.write_bytes((model_dir(models_home) / "unet.onnx").read_bytes())
    result = _run(scans, "--out", tmp_path / "out", "--reference", reference, "--model-path", own)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "out" / "a.png.json").read_text())
    assert doc["models"]["unet"] == hashlib.sha256(own.read_bytes()).hexdigest()
    assert doc["parameters"]["model_path"] == str(own)
    assert doc["parameters"]["batch_size"] == 2  # auto on the CPU: the batch that holds less memory
    negative = _run(scans, "--out", tmp_path / "o3", "--reference", reference, "--batch-size", "-1")
    assert negative.exit_code == 2 and "--batch-size must be at least 1, or 0 for auto" in negative.output
    missing = _run(scans, "--out", tmp_path / "o2", "--reference", reference, "--model-path", tmp_path / "nope.onnx")
    assert missing.exit_code == 2 and "nope.onnx: no such file" in missing.output


def test_a_unet_without_semantic_prior_or_second_opinion_runs_from_model_path(tmp_path, reference, models_home):
    """An earlier release's U-Net reads only the 13 channels: it runs, fed only what it reads, and its colours
    are its own. A graph with an input the pipeline does not know is still refused, naming the fix."""
    torch = pytest.importorskip("torch")
    import onnx

    from archivecolor.nets.unet import ColorUNet
    from export.onnx_export import export_unet, to_float16_storage

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(colour_photos(1, (128, 96))[0])).save(scans / "a.png")
    torch.manual_seed(0)
    plain = ColorUNet(width=8, semantic=False).eval()
    own = tmp_path / "plain-unet.onnx"
    onnx.save(to_float16_storage(export_unet(plain)), own)
    assert [i.name for i in onnx.load(own).graph.input] == ["x13"]
    outputs = {}
    for name, extra in (("plain", ["--model-path", own]), ("installed", [])):
        result = _run(scans, "--out", tmp_path / name, "--reference", reference, *extra)
        assert result.exit_code == 0, result.output
        outputs[name] = np.asarray(Image.open(tmp_path / name / "a.png"))
    assert np.abs(outputs["plain"].astype(int) - outputs["installed"].astype(int)).max() > 2
    doc = json.loads((tmp_path / "plain" / "a.png.json").read_text())
    assert doc["models"]["unet"] == hashlib.sha256(own.read_bytes()).hexdigest()

    # Two retrieved references fused per pixel: the scan's own colours match best everywhere; the other photo
    # offered colours too (role "colours", share 0), for this U-Net reads no second opinion.
    refs = tmp_path / "refs"
    refs.mkdir()
    photos = colour_photos(3, (128, 96))
    Image.fromarray(photos[0]).save(refs / "own.png")
    Image.fromarray(photos[2]).save(refs / "other.png")
    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    result = _run(scans, "--out", tmp_path / "fused", "--catalog", db, "--top-k", "2", "--model-path", own)
    assert result.exit_code == 0, result.output
    fused = json.loads((tmp_path / "fused" / "a.png.json").read_text())["references"]
    assert [Path(r["path"]).name for r in fused] == ["own.png", "other.png"]
    assert [r["share"] for r in fused] == [1.0, 0.0] and [r["role"] for r in fused] == ["colours", "colours"]

    graph = onnx.load(own)
    graph.graph.input[0].name = "x14"
    for node in graph.graph.node:
        node.input[:] = ["x14" if n == "x13" else n for n in node.input]
    other = tmp_path / "other-unet.onnx"
    onnx.save(graph, other)
    refused = _run(scans, "--out", tmp_path / "o", "--reference", reference, "--model-path", other)
    assert refused.exit_code != 0 and "models pull --force" in refused.output and "other-unet.onnx" in refused.output
    assert not (tmp_path / "o" / "a.png").exists()


def test_tiff_compression_choices_give_the_same_pixels(tmp_path, reference, models_home):
    scans = tmp_path / "scans"
    scans.mkdir()
    gray16 = (gray_of(colour_photos(1, (128, 96))[0]).astype(np.uint16) * 257)
    tifffile.imwrite(scans / "a.tif", gray16)
    pixels = {}
    for compression in ("zlib", "zstd", "none"):
        out = tmp_path / compression
        report = colorize_folder(scans, RunOptions(out=out, reference=reference, tiff_compression=compression))
        assert report.count("done") == 1
        with tifffile.TiffFile(out / "a.tif") as tif:
            assert tif.pages[0].compression.name == {"zlib": "ADOBE_DEFLATE", "zstd": "ZSTD", "none": "NONE"}[compression]
            assert tif.pages[0].predictor == (1 if compression == "none" else 2)  # horizontal differencing
            pixels[compression] = tif.asarray()
        assert json.loads((out / "a.tif.json").read_text())["parameters"]["tiff_compression"] == compression
    assert np.array_equal(pixels["zlib"], pixels["zstd"]) and np.array_equal(pixels["zlib"], pixels["none"])
    assert pixels["zlib"].dtype == np.uint16
    with pytest.raises(UsageError, match="--tiff-compression"):
        colorize_folder(scans, RunOptions(out=tmp_path / "bad", reference=reference, tiff_compression="lzw"))


def test_the_stage_report_adds_up_to_the_wall_time(tmp_path, models_home):
    """The main thread's stages plus "other" are the wall time; the worker threads' own seconds are extra."""
    from archivecolor.runner import STAGES

    scans = tmp_path / "scans"
    scans.mkdir()
    for i, photo in enumerate(colour_photos(3, (192, 128))):
        Image.fromarray(gray_of(photo)).save(scans / f"{i}.png")
    report = colorize_folder(scans, RunOptions(out=tmp_path / "out", reference=ROOT / "examples" / "references" / "kodim05.jpg"))
    stages = report.stage_seconds
    assert report.count("done") == 3 and set(STAGES) <= set(stages)
    assert sum(stages[k] for k in STAGES) + stages["other"] == pytest.approx(stages["wall"], abs=0.01)
    assert 0 <= stages["other"] < 0.5 * stages["wall"]
    assert stages["decode"] > 0 and stages["recombine_encode"] > 0  # thread seconds, reported beside the sum


def test_retrieval_from_the_scans_own_pass_is_what_catalog_search_finds(scans, tmp_path, models_home):
    """A run retrieves with the embedding of each scan's own VGG pass; at another working size it takes a
    pass at the catalogue's size. Either way a scan gets the references `catalog search` lists for it."""
    from archivecolor.catalog import search_images

    refs = tmp_path / "refs"
    refs.mkdir()
    for i, photo in enumerate(colour_photos(12, (192, 128))[4:]):
        Image.fromarray(photo).save(refs / f"r{i}.jpg", quality=92)
    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    for size in (256, 192):
        report = colorize_folder(scans, RunOptions(out=tmp_path / f"out{size}", catalog=db, top_k=2, working_size=size))
        done = [r for r in report.results if r.status == "done"]
        assert len(done) == 5
        found = search_images([scans / r.source for r in done], db, k=2, home=models_home)
        for result, expected in zip(done, found):
            assert [r["path"] for r in result.references] == [m.path for m in expected], (size, result.source)
            np.testing.assert_allclose([r["similarity"] for r in result.references],
                                       [m.similarity for m in expected], atol=2e-3)


def test_a_second_opinion_unet_gets_the_next_reference_and_records_it(tmp_path, models_home):
    """A U-Net that reads `second_ab` is given the second-best retrieved reference even at --top-k 1. Each
    reference takes a turn giving the colours with the other as its second opinion, and the turns are
    averaged, so the sidecar gives each half the colour; one reference alone is its own second opinion."""
    torch = pytest.importorskip("torch")
    import onnx

    from archivecolor.models.layout import SECOND_AB
    from archivecolor.nets.unet import ColorUNet
    from archivecolor.pipeline import Models, load_reference, predict, target_l
    from export.onnx_export import export_unet, to_float16_storage

    torch.manual_seed(0)
    unet = ColorUNet(width=8, second_opinion=True)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        unet.head.bias[2] = -20.0  # no trust in the warp: the output is the network's own colour
    own = tmp_path / "second-unet.onnx"
    onnx.save(to_float16_storage(export_unet(unet.eval())), own)

    refs = tmp_path / "refs"
    refs.mkdir()
    photos = colour_photos(8, (192, 128))
    for i, photo in enumerate(photos[3:]):
        Image.fromarray(photo).save(refs / f"r{i}.jpg", quality=92)
    db = tmp_path / "cat.sqlite"
    index_references(refs, db, home=models_home)
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(photos[0])).save(scans / "a.png")
    report = colorize_folder(scans, RunOptions(out=tmp_path / "out", catalog=db, home=models_home, model_path=own))
    (result,) = report.results
    assert result.status == "done"
    doc = json.loads((tmp_path / "out" / "a.png.json").read_text())
    jsonschema.validate(doc, load_schema())
    assert [r["role"] for r in doc["references"]] == ["colours", "colours"]
    assert [r["share"] for r in doc["references"]] == [0.5, 0.5]
    assert doc["references"][0]["similarity"] >= doc["references"][1]["similarity"]

    models = Models.open("cpu", models_home, unet_path=own, precision="fp32")
    assert models.second_opinion and models.references_wanted == 2
    first, second = (load_reference(refs / f"r{i}.jpg", f"r{i}", 256) for i in (0, 1))
    for ref in (first, second):
        ref.features = models.features_of(ref.l)
    from archivecolor.imageio import read_image

    l = target_l(read_image(scans / "a.png"), 256)
    alone, doubled, other = (predict(models, l, [refs_])[0] for refs_ in ([first], [first, first], [first, second]))
    np.testing.assert_array_equal(alone.ab, doubled.ab)
    np.testing.assert_array_equal(alone.x13, other.x13)  # the first reference gives the colours ...
    # ... the second reference's warp is the network's second opinion, and changes what it makes of them
    np.testing.assert_array_equal(other.unet_inputs[SECOND_AB][0], predict(models, l, [[second]])[0].x13[1:3])
    assert (alone.ab != other.ab).any()
    swapped = predict(models, l, [[second, first]])[0]  # the other turn first: the same average
    np.testing.assert_allclose(swapped.ab, other.ab, atol=1e-4)
    assert swapped.shares == other.shares == [0.5, 0.5]
    with torch.no_grad():
        turn = [unet(torch.from_numpy(p.x13[None]), *map(torch.from_numpy, p.unet_inputs.values()))[0][0]
                for p in (other, swapped)]
    expected = (turn[0] + turn[1]).numpy().transpose(1, 2, 0) * 64
    assert np.abs(expected - other.ab).max() < 1.0  # float16 storage
    assert np.abs(turn[0].numpy().transpose(1, 2, 0) * 128 - other.ab).max() > 2.0  # not the first turn alone


def test_an_ensemble_gives_each_reference_turn_to_another_network(tmp_path, models_home):
    """With two networks in the U-Net graph, the first reference's turn is coloured by the first network and the
    second's by the second; a single reference's one turn is coloured by both. Either way the result is the mean,
    at the ensemble's chroma gain, of what the member graphs give on their own."""
    pytest.importorskip("torch")
    import onnxruntime as ort

    from archivecolor.color import denormalise_ab
    from archivecolor.models.layout import MEMBER
    from archivecolor.pipeline import Models, predict, reference_from_lab

    ensemble, gains = tmp_path / "ensemble.onnx", (1.0, 1.25)
    members = small_ensemble(ensemble, gains, 1.5)
    models = Models.open("cpu", models_home, unet_path=ensemble, precision="fp32")
    assert models.members == 2 and models.second_opinion and models.references_wanted == 2
    alone = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in members]

    photos = colour_photos(3, (192, 128))
    refs = [reference_from_lab(f"r{i}", rgb_to_lab(p), 128) for i, p in enumerate(photos[1:])]
    for ref in refs:
        ref.features = models.features_of(ref.l)
    l = (rgb_to_lab(photos[0])[None, None, ..., 0] / 100).astype(np.float32)

    def member(k, prediction):  # network k alone on the turn that `prediction` records (its first)
        feeds = {"x13": prediction.x13[None], **{n: f for n, f in prediction.unet_inputs.items() if n != MEMBER}}
        return denormalise_ab(alone[k].run(["ab"], feeds)[0][0].transpose(1, 2, 0)) * 1.5 / gains[k]

    both, swapped, single = (predict(models, l, [r])[0] for r in (refs, refs[::-1], refs[:1]))
    assert both.unet_inputs[MEMBER].tolist() == [0] and both.shares == [0.5, 0.5]
    np.testing.assert_allclose(both.ab, (member(0, both) + member(1, swapped)) / 2, atol=1e-3)
    np.testing.assert_allclose(single.ab, (member(0, single) + member(1, single)) / 2, atol=1e-3)
    assert np.abs(both.ab - (member(0, both) + member(0, swapped)) / 2).max() > 1.0  # not one network's turns
    assert np.abs(swapped.ab - both.ab).max() > 1.0  # the order of the references says which network colours which

    # End to end: a run with the ensemble records it, and the two references each give half the colour.
    refs_dir, scans = tmp_path / "refs", tmp_path / "scans"
    refs_dir.mkdir()
    scans.mkdir()
    for i, photo in enumerate(photos[1:]):
        Image.fromarray(photo).save(refs_dir / f"r{i}.jpg", quality=92)
    Image.fromarray(gray_of(photos[0])).save(scans / "a.png")
    db = tmp_path / "cat.sqlite"
    index_references(refs_dir, db, home=models_home)
    report = colorize_folder(scans, RunOptions(out=tmp_path / "out", catalog=db, home=models_home, model_path=ensemble))
    assert [r.status for r in report.results] == ["done"]
    doc = json.loads((tmp_path / "out" / "a.png.json").read_text())
    assert [r["share"] for r in doc["references"]] == [0.5, 0.5]
    assert doc["models"]["unet"] == hashlib.sha256(ensemble.read_bytes()).hexdigest()


def test_colour_strength_scales_the_colours_keeps_the_lightness_and_redoes_the_file(tmp_path, reference, models_home):
    scans = tmp_path / "scans"
    scans.mkdir()
    gray16 = gray_of(colour_photos(1, (192, 128))[0]).astype(np.uint16) * 257
    tifffile.imwrite(scans / "a.tif", gray16)  # 16-bit: the output's chroma is not rounded to 8 bits
    out = tmp_path / "out"
    lab = {}
    for strength in (1.0, 0.5, 0.0):
        report = colorize_folder(scans, RunOptions(out=out, reference=reference, colour_strength=strength))
        assert report.count("done") == 1  # another strength is another output, not an up-to-date one
        lab[strength] = rgb_to_lab(tifffile.imread(out / "a.tif"))
        assert json.loads((out / "a.tif.json").read_text())["parameters"]["colour_strength"] == strength
    chroma = {s: np.hypot(v[..., 1], v[..., 2]) for s, v in lab.items()}
    assert chroma[1.0].mean() > 5
    assert chroma[0.5].mean() == pytest.approx(0.5 * chroma[1.0].mean(), rel=0.05)
    assert chroma[0.0].max() < 0.5  # gray
    for s in (0.5, 0.0):
        assert np.abs(lab[s][..., 0] - lab[1.0][..., 0]).max() < 0.5  # the scan's own lightness throughout
    again = colorize_folder(scans, RunOptions(out=out, reference=reference, colour_strength=0.0))
    assert again.count("skipped") == 1
    with pytest.raises(UsageError, match="--colour-strength 2.5: use 0 .gray. to 2"):
        colorize_folder(scans, RunOptions(out=tmp_path / "bad", reference=reference, colour_strength=2.5))
    assert not (tmp_path / "bad").exists()
    result = _run(scans, "--out", tmp_path / "cli", "--reference", reference, "--colour-strength", "-1")
    assert result.exit_code == 2 and "--colour-strength -1" in result.output


def test_a_chosen_reference_moves_the_scans_mean_colour_halfway_to_its_own(tmp_path, reference, models_home):
    """A reference chosen by hand that colours a scan alone moves the scan's mean colour halfway to the mean of the
    global transfer from it; the colours around that mean stay the network's. Retrieved references do not, nor do
    two references together. The sidecar records it, and only chosen-reference runs key the ledger on it."""
    from archivecolor.color import global_transfer
    from archivecolor.pipeline import CHOSEN_REFERENCE_CAST, Models, predict, reference_from_lab

    models = Models.open("cpu", models_home, precision="fp32")
    photos = colour_photos(3, (192, 128))
    refs = [reference_from_lab(f"r{i}", rgb_to_lab(p), 128) for i, p in enumerate(photos[1:])]
    for ref in refs:
        ref.features = models.features_of(ref.l)
    target_l = rgb_to_lab(photos[0])[..., 0]
    l = (target_l[None, None] / 100).astype(np.float32)
    own, chosen = (predict(models, l, [refs[:1]], chosen=True, chosen_cast=c)[0] for c in (0.0, CHOSEN_REFERENCE_CAST))
    ref_lab = np.dstack([refs[0].l[0, 0] * 100, refs[0].ab[0].transpose(1, 2, 0) * 128])
    towards = global_transfer(target_l, ref_lab).reshape(-1, 2).mean(axis=0)
    network = own.ab.reshape(-1, 2).mean(axis=0)
    assert np.abs(towards - network).max() > 2  # the two overall colours differ, so the move shows
    np.testing.assert_allclose(chosen.ab - own.ab, np.broadcast_to((towards - network) / 2, chosen.ab.shape),
                               atol=1e-3)
    retrieved = predict(models, l, [refs[:1]], chosen_cast=CHOSEN_REFERENCE_CAST)[0]
    assert (chosen.cast, own.cast, retrieved.cast) == (CHOSEN_REFERENCE_CAST, 0.0, 0.0)
    two = [predict(models, l, [refs], chosen=True, chosen_cast=c)[0].ab for c in (0.0, CHOSEN_REFERENCE_CAST)]
    np.testing.assert_array_equal(two[0], two[1])

    fixed = RunOptions(out=tmp_path / "out", reference=reference)
    assert fixed.ledger_parameters()["chosen_reference_cast"] == CHOSEN_REFERENCE_CAST
    assert "chosen_reference_cast" not in RunOptions(out=tmp_path / "out", catalog=tmp_path / "c.sqlite").ledger_parameters()
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(photos[0])).save(scans / "a.png")
    report = colorize_folder(scans, fixed)
    sidecar = json.loads((tmp_path / "out" / "a.png.json").read_text())
    jsonschema.validate(sidecar, load_schema())
    assert report.results[0].status == "done" and sidecar["references"][0]["overall_colour"] == CHOSEN_REFERENCE_CAST


def test_overall_colour_sets_how_far_a_chosen_reference_moves_the_scan(tmp_path, reference, models_home):
    """`--overall-colour 0` keeps the network's own overall colour (nothing recorded), 1 takes the reference's;
    outside 0–1 is refused in one line, and the command line's default is the pipeline's."""
    from archivecolor.pipeline import CHOSEN_REFERENCE_CAST

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(colour_photos(1, (192, 128))[0])).save(scans / "a.png")
    pixels, sidecars = {}, {}
    for share in (0.0, CHOSEN_REFERENCE_CAST, 1.0):
        out = tmp_path / f"out{share}"
        result = runner.invoke(app, ["run", str(scans), "--out", str(out), "--reference", str(reference),
                                     "--overall-colour", str(share), "--quiet"])
        assert result.exit_code == 0, result.output
        pixels[share] = read_image(out / "a.png").pixels.astype(np.float64)
        sidecars[share] = json.loads((out / "a.png.json").read_text())["references"][0]
    assert "overall_colour" not in sidecars[0.0] and sidecars[1.0]["overall_colour"] == 1.0
    # The mean colour moves in proportion: half-way lies between none and all of it.
    means = {k: v.reshape(-1, 3).mean(axis=0) for k, v in pixels.items()}
    assert np.abs(means[1.0] - means[0.0]).max() > 1.0
    np.testing.assert_allclose(means[CHOSEN_REFERENCE_CAST], (means[0.0] + means[1.0]) / 2, atol=1.0)
    refused = runner.invoke(app, ["run", str(scans), "--out", str(tmp_path / "bad"), "--reference", str(reference),
                                  "--overall-colour", "1.5"])
    assert refused.exit_code == 2 and "--overall-colour 1.5: use 0" in refused.output
    assert not (tmp_path / "bad").exists()
    run_command = next(c for c in app.registered_commands if c.callback.__name__ == "run")
    import inspect

    assert inspect.signature(run_command.callback).parameters["overall_colour"].default.default == CHOSEN_REFERENCE_CAST
