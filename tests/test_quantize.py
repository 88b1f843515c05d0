"""int8 twins of the VGG features and the U-Net: made by `models pull --int8`, run by `--precision int8`."""

import json
import shutil

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from archivecolor.cli import app
from archivecolor.color import lab_to_rgb, rgb_to_lab
from archivecolor.errors import CatalogError, ModelNotFound
from archivecolor.models.quantize import pull_int8
from archivecolor.models.store import install_file, read_manifest, write_manifest
from archivecolor.pipeline import Models, load_reference, predict, reference_from_lab
from tests.conftest import colour_photos

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def int8_home(models_home, tmp_path_factory):
    """A copy of the installed store with the int8 twins added (the shared store stays float32 only)."""
    home = tmp_path_factory.mktemp("int8-home")
    shutil.copytree(models_home / "models", home / "models")
    (home / "downloads").symlink_to(models_home / "downloads")
    pull_int8(home)
    return home


def test_pull_int8_installs_quantized_twins_once(int8_home):
    manifest = read_manifest(int8_home)
    for name in ("vgg16_features", "unet"):
        twin = manifest[f"{name}_int8"]
        assert twin.source["quantized_from"] == manifest[name].sha256
        graph = onnx.load(int8_home / "models" / twin.file)
        ops = {node.op_type for node in graph.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
        int8_weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
        float_graph = onnx.load(int8_home / "models" / manifest[name].file)
        convolutions = sum(node.op_type == "Conv" for node in float_graph.graph.node)
        # every convolution's weights stored as int8, those of each network of an ensemble too (each was calibrated)
        assert len(int8_weights) == convolutions >= 10
        assert twin.size < manifest[name].size / 2
    again = pull_int8(int8_home)
    assert [new for _, new in again] == [False, False]


def test_a_new_correspondence_graph_recalibrates_the_unet_twin(int8_home, tmp_path):
    """The U-Net twin is calibrated on the correspondence's outputs: another correspondence graph makes it stale."""
    home = tmp_path / "home"
    shutil.copytree(int8_home / "models", home / "models")
    (home / "downloads").symlink_to((int8_home / "downloads").resolve())
    manifest = read_manifest(home)
    graph = onnx.load(home / "models" / manifest["correspondence"].file)
    graph.doc_string = "a later release of the correspondence"
    manifest["correspondence"] = install_file("correspondence", graph.SerializeToString(),
                                              manifest["correspondence"].source, home)
    write_manifest(manifest, home)
    remade = {entry.name: new for entry, new in pull_int8(home)}
    assert remade == {"vgg16_features_int8": False, "unet_int8": True}
    assert read_manifest(home)["unet_int8"].source["calibrated_through"] == manifest["correspondence"].sha256


def test_int8_colours_stay_close_to_fp32(int8_home):
    fp32 = Models.open("cpu", int8_home, precision="fp32")
    int8 = Models.open("cpu", int8_home, precision="int8")
    assert int8.precision == "int8" and int8.features.name == "vgg16_features_int8"
    assert set(int8.hashes()) == {"vgg16_features_int8", "correspondence", "unet_int8"}
    int8_features = Models.open("cpu", int8_home, precision="int8")
    int8_features.unet = fp32.unet
    photos = colour_photos(3, (256, 192))

    def psnr(a, b):
        return 10 * np.log10(1 / np.mean((a - b) ** 2))

    for target, source in zip(photos, photos[1:] + photos[:1]):
        lab = rgb_to_lab(target)
        outputs = []
        for models in (fp32, int8, int8_features):
            ref = reference_from_lab("r", rgb_to_lab(source), 192)
            ref.features = models.features_of(ref.l)
            ab = predict(models, (lab[None, None, ..., 0] / 100).astype(np.float32), [[ref]])[0].ab
            outputs.append(lab_to_rgb(np.dstack([lab[..., 0], ab])))
        # The int8 U-Net gives the float U-Net's colours on the same inputs, within quantisation noise.
        assert psnr(outputs[2], outputs[1]) > 40.0
        # The int8 VGG moves the matches a little, and a U-Net that trusts its reference passes that on
        # (28.7-33.6 dB for the shipped model on these photos; 0.04 dB on the benchmark, model card).
        assert psnr(outputs[0], outputs[1]) > 27.0


def test_an_ensemble_is_calibrated_and_quantized_in_every_network(models_home, tmp_path):
    """Each calibration target runs through every network of an ensemble, so the int8 graph quantizes the
    convolutions of all of them and gives the float graph's colours within quantisation noise. The networks are
    the shipped U-Net twice (trained weights: a random network's saturated outputs say nothing about noise)."""
    import onnxruntime as ort

    from archivecolor.models.quantize import calibration_feeds, quantize_file
    from archivecolor.pipeline import unet_rows
    from export.onnx_export import compose_unets

    shipped = onnx.load(models_home / "models" / "unet.onnx")
    ensemble = tmp_path / "ensemble.onnx"
    onnx.save(compose_unets([shipped, shipped], 1.0), ensemble)
    _, feeds = calibration_feeds(models_home, unet_path=ensemble)
    assert all(sorted(f["member"].tolist()) == [0, 1] for f in feeds)
    quantize_file(ensemble, feeds, tmp_path / "int8.onnx")
    graph = onnx.load(tmp_path / "int8.onnx")
    int8_weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_weights) == sum(n.op_type == "Conv" for n in onnx.load(ensemble).graph.node) == 44

    fp32 = Models.open("cpu", models_home, precision="fp32", unet_path=ensemble)
    target, source = colour_photos(2, (192, 128))
    ref = reference_from_lab("r", rgb_to_lab(source), 128)
    ref.features = fp32.features_of(ref.l)
    l = (rgb_to_lab(target)[None, None, ..., 0] / 100).astype(np.float32)
    rows = unet_rows(fp32, l, [[ref]], fp32.target_features(l)).feeds
    want = fp32.unet.run(rows)[0]
    got = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"]).run(["ab"], rows)[0]
    for row in range(2):  # ab/128 spans 2: PSNR against that range, per network
        assert 10 * np.log10(4 / np.mean((got[row] - want[row]) ** 2)) > 40.0


def test_missing_twins_name_the_command(models_home):
    with pytest.raises(ModelNotFound, match="models pull --int8"):
        Models.open("cpu", models_home, precision="int8")


def test_index_and_run_at_int8_and_the_catalogue_refuses_a_mixed_run(int8_home, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHIVECOLOR_HOME", str(int8_home))
    runner = CliRunner()
    fp32_catalog, int8_catalog = tmp_path / "fp32.sqlite", tmp_path / "int8.sqlite"
    refs = ROOT / "examples" / "references"
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(ROOT / "examples" / "scans" / "church.jpg", scans)
    assert runner.invoke(app, ["index", str(refs), "--catalog", str(fp32_catalog), "--precision", "fp32"]).exit_code == 0
    result = runner.invoke(app, ["index", str(refs), "--catalog", str(int8_catalog), "--precision", "int8"])
    assert result.exit_code == 0, result.output

    mixed = runner.invoke(app, ["run", str(scans), "--out", str(tmp_path / "mixed"), "--catalog", str(fp32_catalog),
                                "--precision", "int8"])
    said = " ".join(mixed.output.split())
    assert mixed.exit_code != 0 and "Traceback" not in said
    assert "run with --precision fp32" in said and "catalog reembed" in said  # either fix, by name

    out = tmp_path / "out"
    done = runner.invoke(app, ["run", str(scans), "--out", str(out), "--catalog", str(int8_catalog), "--precision", "int8"])
    assert done.exit_code == 0, done.output
    sidecar = json.loads((out / "church.jpg.json").read_text())
    manifest = read_manifest(int8_home)
    assert sidecar["parameters"]["precision"] == "int8"
    assert sidecar["models"]["unet_int8"] == manifest["unet_int8"].sha256
    assert sidecar["models"]["vgg16_features_int8"] == manifest["vgg16_features_int8"].sha256
    stats = runner.invoke(app, ["catalog", "stats", "--catalog", str(int8_catalog)])
    assert "vgg16 (int8)" in stats.output
    with pytest.raises(CatalogError, match="run with --precision fp32"):
        from archivecolor.catalog import Catalog

        with Catalog.open(fp32_catalog) as cat:
            cat.check_model("vgg16", manifest["vgg16_features_int8"].sha256, "gem", "int8")


def test_an_unknown_precision_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["run", str(tmp_path), "--precision", "int4"])
    assert result.exit_code == 2 and "--precision 'int4'" in result.output


def test_calibration_photos_are_packaged():
    from archivecolor.models.quantize import calibration_photos

    photos = calibration_photos()
    assert len(photos) >= 7
    scan = load_reference(photos[0], "c", 192)
    assert min(scan.l.shape[-2:]) == 192


def test_models_pull_int8_from_the_cli_reports_the_twins_current(int8_home, monkeypatch):
    monkeypatch.setenv("ARCHIVECOLOR_HOME", str(int8_home))
    result = CliRunner().invoke(app, ["models", "pull", "--offline", "--int8"])
    assert result.exit_code == 0, result.output
    lines = [line.split() for line in result.output.splitlines()]
    assert ["current", "unet_int8"] in [line[:2] for line in lines]
    assert ["current", "vgg16_features_int8"] in [line[:2] for line in lines]


def test_auto_precision_follows_the_catalogue_then_the_installed_twins(int8_home, models_home):
    from archivecolor.models.session import resolve_precision

    assert resolve_precision("fp32", "cpu", int8_home) == "fp32"
    assert resolve_precision("auto", "cpu", int8_home, catalog_precision="fp32") == "fp32"  # old catalogues keep working
    assert resolve_precision("auto", "cpu", int8_home) == "int8"  # twins installed, on the CPU
    assert resolve_precision("auto", "cpu", models_home) == "fp32"  # no twins
    assert Models.open("cpu", int8_home).precision == "int8"


def test_a_default_run_uses_the_catalogues_precision(int8_home, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHIVECOLOR_HOME", str(int8_home))
    runner = CliRunner()
    refs = ROOT / "examples" / "references"
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(ROOT / "examples" / "scans" / "church.jpg", scans)
    for precision in ("fp32", "int8"):
        catalog = tmp_path / f"{precision}.sqlite"
        assert runner.invoke(app, ["index", str(refs), "--catalog", str(catalog), "--precision", precision]).exit_code == 0
        again = runner.invoke(app, ["index", str(refs), "--catalog", str(catalog)])  # auto keeps the catalogue's
        assert again.exit_code == 0, again.output
        out = tmp_path / f"out-{precision}"
        done = runner.invoke(app, ["run", str(scans), "--out", str(out), "--catalog", str(catalog)])
        assert done.exit_code == 0, done.output
        assert json.loads((out / "church.jpg.json").read_text())["parameters"]["precision"] == precision
    fresh = tmp_path / "fresh.sqlite"
    assert runner.invoke(app, ["index", str(refs), "--catalog", str(fresh)]).exit_code == 0
    from archivecolor.catalog import catalogue_precision

    assert catalogue_precision(fresh) == "int8"  # a new catalogue on the CPU, twins installed


def test_a_stale_twin_is_not_used(int8_home, tmp_path):
    """After an upgrade replaces the float U-Net, its old int8 twin must not run: auto falls back to float,
    and asking for int8 says to pull again."""
    import json as json_

    home = tmp_path / "home"
    shutil.copytree(int8_home / "models", home / "models")
    manifest_path = home / "models" / "manifest.json"
    manifest = json_.loads(manifest_path.read_text())
    manifest["unet_int8"]["source"]["quantized_from"] = "0" * 64
    manifest_path.write_text(json_.dumps(manifest))
    from archivecolor.models.session import resolve_precision

    assert resolve_precision("auto", "cpu", home) == "fp32"
    with pytest.raises(ModelNotFound, match="quantized from another unet.*models pull"):
        Models.open("cpu", home, precision="int8")


def test_a_failed_quantisation_leaves_the_float_models_working(models_home, tmp_path, monkeypatch):
    """The int8 twins are optional: when they cannot be made (here: the calibration photos are gone),
    `models pull` warns, exits 0, and runs use the float models."""
    import archivecolor.models.quantize as quantize

    home = tmp_path / "home"
    shutil.copytree(models_home / "models", home / "models")
    (home / "downloads").symlink_to(models_home / "downloads")
    monkeypatch.setenv("ARCHIVECOLOR_HOME", str(home))
    monkeypatch.setattr(quantize, "CALIBRATION_DIR", tmp_path / "no-photos")
    result = CliRunner().invoke(app, ["models", "pull", "--offline"])
    assert result.exit_code == 0, result.output
    assert "int8 models not made" in result.output and "calibration photos are missing" in result.output
    assert "unet_int8" not in read_manifest(home)
    assert Models.open("cpu", home).precision == "fp32"


def test_the_pairs_benchmark_runs_at_the_precision_asked(int8_home, tmp_path):
    from archivecolor.bench import run_pairs
    from tests.conftest import data_dir

    folder = data_dir("he2018-demo") / "example"
    int8 = run_pairs(folder, tmp_path / "int8", provider="cpu", home=int8_home, precision="int8")
    fp32 = run_pairs(folder, tmp_path / "fp32", provider="cpu", home=int8_home, precision="fp32")
    assert (int8["precision"], fp32["precision"]) == ("int8", "fp32")
    assert "unet_int8" in int8["models"] and "unet" in fp32["models"]
    assert int8["ours"] != fp32["ours"]


def test_quantizing_again_calibrates_through_the_float_graphs(int8_home, tmp_path):
    """A forced re-pull, with current twins installed, must calibrate through the float graphs as the first
    pull did, so the twins come out byte for byte the same (calibrating through the old twins would not)."""
    home = tmp_path / "home"
    shutil.copytree(int8_home / "models", home / "models")
    before = read_manifest(home)
    again = dict((model.name, model) for model, _ in pull_int8(home, force=True))
    for name in ("vgg16_features_int8", "unet_int8"):
        assert again[name].sha256 == before[name].sha256
