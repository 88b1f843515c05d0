import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from archivecolor import bench
from archivecolor.color import rgb_to_lab
from archivecolor.errors import UsageError
from archivecolor.runner import STAGES
from tests.conftest import DATA, colour_photos, data_dir, gray_of


@pytest.fixture(scope="module")
def pair():
    photo = colour_photos(1)[0]
    return photo, np.dstack([gray_of(photo)] * 3)


def _ssim_by_hand(a, b):
    """Wang et al.'s SSIM written out: gaussian window σ=1.5 truncated at 3.5σ, K1=0.01, K2=0.03, range 255,
    the border where the window is incomplete left out, mean over the RGB channels."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)

        def blur(z):
            return gaussian_filter(z, sigma=1.5, truncate=3.5)

        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        scores.append(s[5:-5, 5:-5].mean())
    return float(np.mean(scores))


def test_metrics_match_their_formulas(pair):
    truth, gray = pair
    diff = (gray.astype(np.float64) - truth) ** 2
    assert bench.psnr(gray, truth) == pytest.approx(10 * np.log10(255.0**2 / diff.mean()), abs=1e-6)
    assert bench.mse01(gray, truth) == pytest.approx(diff.mean() / 255.0**2, abs=1e-12)
    assert bench.ssim(gray, truth) == pytest.approx(_ssim_by_hand(gray, truth), abs=1e-4)
    assert bench.ssim(truth, truth) == pytest.approx(1.0) and bench.psnr(truth, truth) == float("inf")
    brighter = np.clip(truth.astype(int) + 5, 0, 255).astype(np.uint8)
    assert bench.psnr(brighter, truth) < bench.psnr(np.clip(truth.astype(int) + 2, 0, 255).astype(np.uint8), truth)


def test_colorfulness_orders_images(pair):
    truth, gray = pair
    assert bench.colorfulness(gray) == pytest.approx(0.0, abs=1e-9)
    lab_boost = np.clip((truth.astype(float) - truth.mean(-1, keepdims=True)) * 1.5 + truth.mean(-1, keepdims=True), 0, 255)
    assert bench.colorfulness(lab_boost.astype(np.uint8)) > bench.colorfulness(truth) > 5


def test_statistics_match_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(20, 2, 30), rng.normal(19, 2, 30)
    ci = bench.mean_ci(list(a))
    low, high = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    assert ci["ci95"] == pytest.approx([low, high])
    assert bench.paired_test(list(a), list(b))["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)


def test_global_transfer_follows_reference_luminance():
    from archivecolor.color import rgb_to_lab

    ref = rgb_to_lab(colour_photos(2, (96, 64))[1])
    l = rgb_to_lab(colour_photos(1, (96, 64))[0])[..., 0]
    ab = bench.global_transfer(l, ref)
    assert ab.shape == (64, 96, 2) and np.isfinite(ab).all()
    assert np.abs(ab.reshape(-1, 2).mean(0) - ref[..., 1:].reshape(-1, 2).mean(0)).max() < 15


def test_bench_writes_the_report(tmp_path, models_home):
    kodak = data_dir("kodak24")
    refs = tmp_path / "refs"
    refs.mkdir()
    for p in sorted((DATA / "sun-hays80").glob("*.jpg"))[:8] if (DATA / "sun-hays80").is_dir() else []:
        Image.open(p).save(refs / p.name)
    for p in sorted(kodak.glob("*.png"))[:3]:  # the test photos themselves: each its own best match
        (refs / p.name).write_bytes(p.read_bytes())
    options = bench.BenchOptions(references=refs, limit=3, out=tmp_path / "report", home=models_home)
    report = bench.run_bench([kodak], options)
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    for method in bench.METHODS:
        assert set(bench.METRICS) <= set(saved["methods"][method])
        assert saved["methods"][method]["n"] == 3
    assert report["throughput"]["provider"] == "CPUExecutionProvider"
    assert set(report["throughput"]["stage_seconds"]) == {"decode", "features", "correspondence", "unet", "recombine"}
    assert "exemplar_vs_gray" in saved["paired_t_tests"]
    for name in ("report.md", "boxplots.png", "examples.png", "similarity.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    # A test image is never its own reference, although its own file is in the catalogue.
    assert all(s["reference"] and Path(s["reference"]).name != s["name"] for s in saved["samples"])


def test_pairs_against_he2018(tmp_path, models_home):
    folder = data_dir("he2018-demo") / "example"
    summary = bench.run_pairs(folder, tmp_path / "pairs", home=models_home, precision="fp32")
    assert len(summary["pairs"]) == 2 and "he2018" in summary and summary["precision"] == "fp32"
    assert 0.05 < summary["ours"]["ab_overlap"] < 1
    assert (tmp_path / "pairs" / "pairs.png").exists()


def test_gradcam_rebuilds_the_shipped_unet_exactly(models_home):
    pytest.importorskip("torch")
    import onnxruntime as ort
    import torch

    from archivecolor.models.layout import MEMBER, SECOND_AB
    from archivecolor.nets.unet import SEMANTIC_FEATURES

    path = models_home / "models" / "unet.onnx"
    cam = bench.UNetGradCAM(path)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (13, 64, 96)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    extra = {name: rng.uniform(0, 4, (1, channels, 64 // stride, 96 // stride)).astype(np.float32)
             for name, channels, stride in SEMANTIC_FEATURES if name in names}
    if SECOND_AB in names:  # another reference's warp: the shipped model reads a second opinion
        extra[SECOND_AB] = rng.uniform(-0.5, 0.5, (1, 2, 64, 96)).astype(np.float32)
    member = {MEMBER: np.array([0])} if MEMBER in names else {}  # of an ensemble, the first network
    if member:  # an ensemble's batch gives each network a row: the same inputs, the second row the second network
        feeds = {name: np.concatenate([f, f]) for name, f in {"x13": x[None], **extra}.items()}
        expected = session.run(["ab"], {**feeds, MEMBER: np.array([0, 1])})[0][:1]
    else:
        expected = session.run(["ab"], {"x13": x[None], **extra})[0]
    with torch.no_grad():
        got = cam.net(torch.from_numpy(x[None]), *(torch.from_numpy(f) for f in extra.values()))[0].numpy()
    assert np.abs(got - expected).max() < 1e-4
    heat = cam(x, extra | member)
    assert heat.shape == (64, 96) and heat.max() == pytest.approx(1.0) and heat.min() >= 0


def test_gradcam_of_an_ensemble_is_its_first_networks(tmp_path):
    pytest.importorskip("torch")
    import onnxruntime as ort
    import torch

    from archivecolor.models.layout import MEMBER
    from tests.conftest import small_ensemble

    path = tmp_path / "ensemble.onnx"
    first = small_ensemble(path, (1.25, 1.0), 1.5)[0]
    cam = bench.UNetGradCAM(path)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 13, 64, 96)).astype(np.float32)
    extra = {"tf3": rng.uniform(0, 4, (1, 256, 16, 24)), "tf4": rng.uniform(0, 4, (1, 512, 8, 12)),
             "tf5": rng.uniform(0, 4, (1, 512, 4, 6)), "second_ab": rng.uniform(-0.5, 0.5, (1, 2, 64, 96))}
    extra = {name: f.astype(np.float32) for name, f in extra.items()}
    alone = ort.InferenceSession(first.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = alone.run(["ab"], {"x13": x, **extra})[0] * 1.5 / 1.25
    with torch.no_grad():
        got = cam.net(torch.from_numpy(x), *(torch.from_numpy(f) for f in extra.values()))[0].numpy()
    assert np.abs(got - expected).max() < 1e-4
    heat = cam(x[0], extra | {MEMBER: np.array([0])})  # as a Prediction records an ensemble's first turn
    assert heat.shape == (64, 96) and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1


def test_ab_histogram_overlap_is_one_for_the_same_colours_and_low_for_gray():
    lab = rgb_to_lab(colour_photos(1, (96, 64))[0])
    gray = lab.copy()
    gray[..., 1:] = 0
    assert bench.ab_histogram_overlap(lab, lab) == pytest.approx(1.0)
    assert bench.ab_histogram_overlap(lab[::-1], lab) == pytest.approx(1.0)  # a histogram ignores where
    assert bench.ab_histogram_overlap(lab, gray) < 0.5


def test_bench_and_pairs_run_a_unet_of_ones_own(tmp_path, models_home):
    """--model-path: the report's U-Net hash is the given file's, and its outputs are its own."""
    torch = pytest.importorskip("torch")
    import onnx

    from archivecolor.models.weights import sha256_file
    from archivecolor.nets.unet import ColorUNet
    from export.onnx_export import export_unet, to_float16_storage

    kodak = data_dir("kodak24")
    torch.manual_seed(0)
    own = tmp_path / "own-unet.onnx"
    # As `python -m export` writes it: weights stored as float16, widened when the session opens.
    onnx.save(to_float16_storage(export_unet(ColorUNet(width=8, semantic=True).eval())), own)
    refs = tmp_path / "refs"
    refs.mkdir()
    for p in sorted(kodak.glob("*.png"))[3:6]:
        (refs / p.name).write_bytes(p.read_bytes())
    reports = {}
    for name, path in (("installed", None), ("own", own)):
        options = bench.BenchOptions(references=refs, limit=2, out=tmp_path / name, home=models_home,
                                     methods=("gray", "exemplar"), figures=False, model_path=path)
        reports[name] = bench.run_bench([kodak], options)
    assert reports["own"]["models"]["unet"] == sha256_file(own)
    assert reports["installed"]["models"]["unet"] != sha256_file(own)
    assert reports["own"]["methods"]["exemplar"]["psnr"] != reports["installed"]["methods"]["exemplar"]["psnr"]
    summary = bench.run_pairs(data_dir("he2018-demo") / "example", tmp_path / "pairs", home=models_home, model_path=own)
    installed = bench.run_pairs(data_dir("he2018-demo") / "example", tmp_path / "pairs-installed", home=models_home)
    assert summary["ours"] != installed["ours"]


def test_native_bench_on_non_square_photos_of_several_sizes(tmp_path, models_home):
    photos = colour_photos(5)
    tests, refs = tmp_path / "tests", tmp_path / "refs"
    tests.mkdir()
    refs.mkdir()
    sizes = [(336, 200), (181, 97), (240, 240)]  # wide, odd-sized tall, square (width, height)
    for i, size in enumerate(sizes):
        Image.fromarray(photos[i]).resize(size).save(tests / f"t{i}.png")
    for i in (3, 4):
        Image.fromarray(photos[i]).save(refs / f"r{i}.png")
    options = bench.BenchOptions(references=refs, size=None, methods=("gray", "warp-only", "exemplar"),
                                 out=tmp_path / "report", home=models_home, figures=False)
    report = bench.run_bench([tests], options)
    assert report["protocol"]["size"] == "native"
    for method in ("gray", "warp-only", "exemplar"):
        assert report["methods"][method]["n"] == 3
        assert all(np.isfinite(v) for v in report["methods"][method]["psnr"]["values"])
    assert "global" not in report["methods"] and "top-k" not in report["methods"]


def test_speed_times_fresh_runs_with_stages_that_add_up(tmp_path, models_home):
    scans, ref = tmp_path / "scans", tmp_path / "ref.png"
    scans.mkdir()
    photos = colour_photos(3, (160, 112))
    for i in range(2):
        Image.fromarray(gray_of(photos[i])).save(scans / f"s{i}.png")
    Image.fromarray(photos[2]).save(ref)
    result = bench.run_speed(scans, {"reference": ref, "home": models_home}, repeat=1, work_dir=tmp_path)
    run = result["runs"][0]
    assert run["counts"]["done"] == 2 and run["scans_per_s"] == pytest.approx(2 / run["seconds"], rel=1e-2)
    assert 0 < result["first_output_s"] and result["peak_rss_mb"] > 100
    stages = result["stage_seconds"]
    assert stages["wall"] == pytest.approx(sum(stages[k] for k in STAGES) + stages["other"], abs=0.01)
    assert result["first_output_s"] > stages["open_models"]  # from the process's start: imports and models too
    with pytest.raises(UsageError, match="not a folder"):
        bench.run_speed(tmp_path / "none", {}, repeat=1)


def test_colour_strength_in_the_benchmark_scales_the_exemplar_colours(tmp_path, models_home):
    photos = colour_photos(4, (160, 120))
    tests, refs = tmp_path / "tests", tmp_path / "refs"
    tests.mkdir()
    refs.mkdir()
    for i in (0, 1):
        Image.fromarray(photos[i]).save(tests / f"t{i}.png")
    for i in (2, 3):
        Image.fromarray(photos[i]).save(refs / f"r{i}.png")
    reports = {}
    for strength in (1.0, 0.0):
        options = bench.BenchOptions(references=refs, size=128, methods=("gray", "exemplar"), out=tmp_path / str(strength),
                                     home=models_home, figures=False, colour_strength=strength)
        reports[strength] = bench.run_bench([tests], options)
        assert reports[strength]["protocol"]["colour_strength"] == strength
    assert reports[1.0]["methods"]["exemplar"]["colorfulness"]["mean"] > 5
    gray, none = reports[0.0]["methods"]["gray"], reports[0.0]["methods"]["exemplar"]
    assert none["colorfulness"]["mean"] < 0.5  # strength 0 is gray, through the same recombination
    assert none["psnr"]["mean"] == pytest.approx(gray["psnr"]["mean"], abs=0.1)
    with pytest.raises(UsageError, match="--colour-strength 3.0"):
        bench.run_bench([tests], bench.BenchOptions(references=refs, out=tmp_path / "bad", home=models_home,
                                                    colour_strength=3.0))
    assert not (tmp_path / "bad").exists()


def test_same_scene_colours_each_photos_second_half_from_its_first(tmp_path, models_home):
    from archivecolor.bench.report import lab_rgb
    from archivecolor.pipeline import reference_from_lab

    wide, tall = colour_photos(2)
    tall = np.ascontiguousarray(np.rot90(tall))
    tests = tmp_path / "tests"
    tests.mkdir()
    for name, photo in (("a-wide.png", wide), ("b-tall.png", tall)):
        Image.fromarray(photo).save(tests / name)
    options = bench.BenchOptions(same_scene=True, methods=("gray", "global", "exemplar"), out=tmp_path / "report",
                                 home=models_home)
    report = bench.run_bench([tests], options)
    assert report["protocol"]["catalog"] is None and "first half" in report["protocol"]["reference"]
    assert [s["reference"].endswith("first half") for s in report["samples"]] == [True, True]
    assert (tmp_path / "report" / "examples.png").stat().st_size > 0

    # The target is the right (bottom) half at 224×224 and the reference the left (top) half: global transfer from
    # that reference, computed here, scores what the benchmark reports; from the other half it would not.
    def global_psnr(reference: np.ndarray, target: np.ndarray) -> float:
        truth = np.asarray(Image.fromarray(target).resize((224, 224), Image.BICUBIC))
        l = rgb_to_lab(truth)[..., 0]
        ref = reference_from_lab("ref", rgb_to_lab(reference), 224)
        ref_lab = np.dstack([ref.l[0, 0] * 100, ref.ab[0].transpose(1, 2, 0) * 128])
        return bench.psnr(lab_rgb(l, bench.global_transfer(l, ref_lab)), truth)

    w, h = wide.shape[1] // 2, tall.shape[0] // 2
    splits = [(wide[:, :w], wide[:, w:]), (tall[:h], tall[h:])]
    reported = report["methods"]["global"]["psnr"]["values"]
    assert reported == pytest.approx([global_psnr(first, second) for first, second in splits], abs=1e-4)
    assert reported != pytest.approx([global_psnr(second, first) for first, second in splits], abs=0.1)
    # A reference of the same scene gives the exemplar colour worth having.
    assert np.mean(report["methods"]["exemplar"]["psnr"]["values"]) > np.mean(report["methods"]["gray"]["psnr"]["values"]) + 1

    with pytest.raises(UsageError, match="leave out --catalog"):
        bench.run_bench([tests], bench.BenchOptions(same_scene=True, catalog=tmp_path / "c.sqlite", home=models_home))
    with pytest.raises(UsageError, match="leave top-k out"):
        bench.run_bench([tests], bench.BenchOptions(same_scene=True, home=models_home))
