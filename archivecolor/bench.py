"""``archivecolor bench``: colorize ground-truth colour photos from their gray and measure.

Metrics are computed in RGB after Lab→RGB, as the seed does: PSNR (8-bit, MAX=255), SSIM
(gaussian window σ=1.5, K1=0.01, K2=0.03), MSE on [0, 1] values, LPIPS v0.1 (AlexNet by
default) and Hasler–Süsstrunk colourfulness. Methods are compared side by side with 95%
confidence intervals and paired t-tests. LPIPS needs torch (the ``bench`` extra); everything
else runs on ONNX Runtime.
"""

from __future__ import annotations

import json
import math
import resource
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from archivecolor.catalog import Catalog, centre_square, index_references
from archivecolor.color import l_to_gray, lab_to_rgb, normalise_l, rgb_to_lab, to_uint8
from archivecolor.errors import UsageError
from archivecolor.imageio import file_walk_images, read_image, to_upright
from archivecolor.models.layout import WARPED_AB, forward_map, round_trip_map
from archivecolor.models.session import INT8_SUFFIX
from archivecolor.models.store import model_dir
from archivecolor.models.weights import load_backbone_weights, sha256_file
from archivecolor.pipeline import (
    DEFAULT_WORKING_SIZE,
    Models,
    Prediction,
    ReferenceCache,
    StageTimes,
    predict,
    reference_from_lab,
    upright_lab,
)
from archivecolor.upsample import recombine, resize_plane
from archivecolor.upsample import working_size as fit_working_size

METHODS = ("gray", "global", "warp-only", "exemplar", "top-k")
METRICS = ("psnr", "ssim", "mse", "lpips", "colorfulness")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mse": False, "lpips": False, "colorfulness": True}
TOP_K = 3
L_BINS = 16

# --- metrics ------------------------------------------------------------------------------------------


def rgb01_to_uint8(rgb01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb01, 0, 1) * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between uint8 RGB images, MAX = 255."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def mse01(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error on [0, 1] values of uint8 RGB images."""
    return float(np.mean((a.astype(np.float64) / 255 - b.astype(np.float64) / 255) ** 2))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels, gaussian window σ=1.5 (11 taps), K1=0.01, K2=0.03, data range 255."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for ch in range(a.shape[-1]):
        x = a[..., ch].astype(np.float64)
        y = b[..., ch].astype(np.float64)

        def blur(z: np.ndarray) -> np.ndarray:
            return gaussian_filter(z, sigma=1.5, truncate=3.5)

        mx, my = blur(x), blur(y)
        vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        pad = 5  # skimage crops the border where the window is incomplete
        scores.append(s[pad:-pad, pad:-pad].mean())
    return float(np.mean(scores))


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) colourfulness of a uint8 RGB image."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2))


class LPIPS:
    """LPIPS v0.1 from the ``lpips`` package, its backbone loaded from our offline weight sources."""

    def __init__(self, net: str = "alex", download_dir: Path | None = None) -> None:
        try:
            import lpips
            import torch
        except ImportError as exc:
            raise UsageError("LPIPS needs torch and lpips: pip install 'archivecolor[bench]'") from exc
        self.torch = torch
        backbone = {"alex": "alexnet", "vgg": "vgg16"}[net]
        state, self.source = load_backbone_weights(backbone, download_dir=download_dir)
        with warnings.catch_warnings():  # torchvision's notes on its own deprecated arguments, inside lpips
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, verbose=False)
        own = model.state_dict()
        for key in own:
            if key.startswith("net.slice"):
                index = key.split(".")[2]
                own[key] = torch.from_numpy(state[f"features.{index}.{key.rsplit('.', 1)[1]}"])
        model.load_state_dict(own, strict=True)
        self.model = model.eval()

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """LPIPS distance between uint8 RGB images (H, W, 3)."""
        def tensor(x: np.ndarray):
            return self.torch.from_numpy(x.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

        with self.torch.no_grad():
            return float(self.model(tensor(a), tensor(b)).item())


# --- baselines -----------------------------------------------------------------------------------------


def global_transfer(l_target: np.ndarray, ref_lab: np.ndarray) -> np.ndarray:
    """Reinhard-style global transfer: match the reference's L statistics to the target's, then give
    each target pixel the mean reference ab of its L band. Returns (H, W, 2) ab."""
    rl = ref_lab[..., 0].ravel()
    rl = (rl - rl.mean()) / (rl.std() + 1e-6) * (l_target.std() + 1e-6) + l_target.mean()
    edges = np.quantile(rl, np.linspace(0, 1, L_BINS + 1)[1:-1])
    ref_bin = np.digitize(rl, edges)
    ab = ref_lab[..., 1:].reshape(-1, 2)
    means = np.stack([ab[ref_bin == k].mean(axis=0) if np.any(ref_bin == k) else ab.mean(axis=0)
                      for k in range(L_BINS)])
    return means[np.digitize(l_target, edges)].astype(np.float32)


# --- statistics ----------------------------------------------------------------------------------------


def mean_ci(values: list[float]) -> dict:
    from scipy import stats

    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "ci95": [float(x.mean() - half), float(x.mean() + half)], "n": int(len(x))}


def paired_test(a: list[float], b: list[float]) -> dict:
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return {"t": None, "p": None, "mean_diff": None}
    t, p = stats.ttest_rel(x[ok], y[ok])
    return {"t": float(t), "p": float(p), "mean_diff": float((x[ok] - y[ok]).mean())}


# --- the benchmark -------------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    catalog: Path | None = None
    references: Path | None = None
    size: int | None = 224  # None: --native
    methods: tuple[str, ...] = METHODS
    limit: int | None = None
    out: Path = Path("bench-report")
    provider: str = "auto"
    lpips_net: str = "alex"
    home: Path | None = None
    figures: bool = True
    precision: str = "fp32"
    model_path: Path | None = None  # a U-Net of one's own export instead of the installed one


@dataclass
class Sample:
    name: str
    group: str
    gt: np.ndarray  # uint8 RGB at evaluation size
    l: np.ndarray  # L at evaluation size
    sha256: str
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    reference: str = ""
    prediction: Prediction | None = None


def _test_images(dirs: list[Path], limit: int | None) -> list[tuple[Path, str]]:
    items = []
    for d in dirs:
        if not d.is_dir():
            raise UsageError(f"{d}: not a folder of colour test photos")
        for path in file_walk_images(d):
            group = d.name if path.parent == d else f"{d.name}/{path.parent.relative_to(d).as_posix()}"
            items.append((path, group))
    if not items:
        raise UsageError(f"no images under {', '.join(map(str, dirs))}")
    return items[:limit] if limit else items


def _load_sample(path: Path, group: str, size: int | None) -> Sample:
    scan = read_image(path)
    pixels = scan.pixels if scan.pixels.ndim == 3 else np.dstack([scan.pixels] * 3)
    pixels = to_upright(pixels, scan.orientation)
    pixels = to_uint8(pixels)
    if size:
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))
    else:  # the working grid needs multiples of 16; crop the few extra rows and columns
        h, w = pixels.shape[0] // 16 * 16, pixels.shape[1] // 16 * 16
        pixels = pixels[:h, :w]
    lab = rgb_to_lab(pixels)
    return Sample(path.name, group, pixels, lab[..., 0], sha256_file(path))


def _rgb(l: np.ndarray, ab: np.ndarray) -> np.ndarray:
    return rgb01_to_uint8(lab_to_rgb(np.dstack([l, ab])))


def run_bench(
    testsets: list[Path], options: BenchOptions, progress: Callable[[int, int, str], None] | None = None
) -> dict:
    """Run the benchmark; writes report.json, report.md and figures into ``options.out``."""
    unknown = set(options.methods) - set(METHODS)
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    catalog_path = options.catalog
    if options.references is not None:
        catalog_path = out / "references.sqlite"
        index_references(options.references, catalog_path, provider=options.provider, home=options.home,
                         precision=options.precision)
    if catalog_path is None:
        raise UsageError("pass --catalog PATH or --references DIR for the references")
    items = _test_images(testsets, options.limit)
    models = Models.open(options.provider, options.home, precision=options.precision, unet_path=options.model_path)
    cache = ReferenceCache(models)
    catalog = Catalog.open(catalog_path)
    catalog.check_model(models.backbone, models.features.model.sha256, "gem", models.precision)
    lpips_metric = LPIPS(options.lpips_net, download_dir=default_download_dir(options.home))
    times = StageTimes()
    stage = {"decode": 0.0, "recombine": 0.0}
    samples: list[Sample] = []
    started = time.perf_counter()
    k_needed = TOP_K if "top-k" in options.methods else 1
    side = options.size or DEFAULT_WORKING_SIZE  # --native: the run path's working size, recombined at full size
    for n, (path, group) in enumerate(items, 1):
        t = time.perf_counter()
        sample = _load_sample(path, group, options.size)
        stage["decode"] += time.perf_counter() - t
        h, w = fit_working_size(*sample.l.shape, side)
        l01 = normalise_l(resize_plane(sample.l, h, w))[None, None]
        query = models.embed(centre_square(sample.l))
        matches = catalog.search(query, k_needed, exclude_sha256={sample.sha256})[0]
        refs = [cache.load(Path(m.path), m.sha256, side) for m in matches]
        sample.reference = matches[0].path
        h, w = sample.l.shape
        if "gray" in options.methods:
            sample.outputs["gray"] = _rgb(sample.l, np.zeros((h, w, 2), np.float32))
        if "global" in options.methods:
            ref_lab = np.dstack([refs[0].l[0, 0] * 100, refs[0].ab[0].transpose(1, 2, 0) * 128])
            sample.outputs["global"] = _rgb(sample.l, global_transfer(sample.l, ref_lab))
        if {"exemplar", "warp-only"} & set(options.methods):
            pred = predict(models, l01, [refs[:1]], times)[0]
            sample.prediction = pred
            t = time.perf_counter()
            sample.outputs["exemplar"] = recombine(sample.l, pred.ab, pred.l)
            stage["recombine"] += time.perf_counter() - t
            if "warp-only" in options.methods:  # the warp is at working size: bring its ab to the sample's
                warp_ab = pred.x13[WARPED_AB].transpose(1, 2, 0) * 128
                if warp_ab.shape[:2] != (h, w):
                    warp_ab = np.dstack([resize_plane(warp_ab[..., c], h, w) for c in range(2)])
                sample.outputs["warp-only"] = _rgb(sample.l, warp_ab)
        if "top-k" in options.methods and len(refs) > 1:
            pred = predict(models, l01, [refs], times)[0]
            sample.outputs["top-k"] = recombine(sample.l, pred.ab, pred.l)
        for m in list(sample.outputs):
            if m not in options.methods:
                del sample.outputs[m]
        samples.append(sample)
        if progress:
            progress(n, len(items), path.name)
    elapsed = time.perf_counter() - started
    catalog.close()

    scores: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in options.methods}
    for s in samples:
        for m in options.methods:
            img = s.outputs.get(m)
            if img is None:
                continue
            scores[m]["psnr"].append(psnr(img, s.gt))
            scores[m]["ssim"].append(ssim(img, s.gt))
            scores[m]["mse"].append(mse01(img, s.gt))
            scores[m]["lpips"].append(lpips_metric(img, s.gt) if lpips_metric else float("nan"))
            scores[m]["colorfulness"].append(colorfulness(img))
    report = _report(samples, scores, options, models, elapsed, times, stage, cache, catalog_path, testsets)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if options.figures:
        # Grad-CAM rebuilds the float U-Net in torch from the graph's weights; an int8 graph has none to read.
        unet_path = (None if models.unet.name.endswith(INT8_SUFFIX) else
                     options.model_path or model_dir(options.home) / models.unet.model.file)
        report["figures"] = write_figures(samples, scores, options.methods, out, unet_path)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _report(samples, scores, options, models, elapsed, times, stage, cache, catalog_path, testsets) -> dict:
    methods = {m: {k: mean_ci(v) | {"values": [round(x, 6) for x in v]} for k, v in scores[m].items()}
               for m in options.methods}
    truth = mean_ci([colorfulness(s.gt) for s in samples])["mean"] if samples else None
    for m in methods:
        methods[m]["n"] = len(scores[m]["psnr"])
        mine = methods[m]["colorfulness"]["mean"]
        methods[m]["colorfulness_of_truth"] = round(mine / truth, 4) if truth and mine is not None else None
    tests = {}
    if "exemplar" in options.methods:
        for m in options.methods:
            if m != "exemplar" and len(scores[m]["psnr"]) == len(scores["exemplar"]["psnr"]):
                tests[f"exemplar_vs_{m}"] = {k: paired_test(scores["exemplar"][k], scores[m][k]) for k in METRICS}
    groups: dict[str, dict] = {}
    for group in sorted({s.group for s in samples}):
        idx = [i for i, s in enumerate(samples) if s.group == group]
        groups[group] = {m: {k: mean_ci([scores[m][k][i] for i in idx if i < len(scores[m][k])])["mean"]
                             for k in METRICS} for m in options.methods}
    n = len(samples)
    return {
        "schema_version": 1,
        "protocol": {"size": options.size or "native", "testsets": [str(t) for t in testsets],
                     "catalog": str(catalog_path), "reference_excludes_self": True, "lpips_net": options.lpips_net},
        "ground_truth": {"colorfulness": truth},
        "methods": methods,
        "paired_t_tests": tests,
        "groups": groups,
        "throughput": {
            "images": n, "seconds": round(elapsed, 3), "images_per_s": round(n / elapsed, 3) if elapsed else None,
            "stage_seconds": {"decode": round(stage["decode"], 3), "features": round(times.features, 3),
                              "correspondence": round(times.correspondence, 3), "unet": round(times.unet, 3),
                              "recombine": round(stage["recombine"], 3)},
            "provider": models.provider, "precision": models.precision, "batch_size": 1,
            "threads": models.unet.session.get_session_options().intra_op_num_threads or "default",
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "reference_cache": {"hits": cache.hits, "misses": cache.misses},
        },
        "models": models.hashes(),
        "samples": [{"name": s.name, "group": s.group, "reference": s.reference} for s in samples],
    }


def markdown(report: dict) -> str:
    lines = [f"# archivecolor benchmark ({report['protocol']['size']})", ""]
    lines.append("| method | n | PSNR (dB) | SSIM | MSE | LPIPS | colourfulness | of the truth's |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, m in report["methods"].items():
        cells = []
        for k in METRICS:
            v = m[k]
            cells.append("–" if v["mean"] is None else
                         f"{v['mean']:.4f} ± {(v['ci95'][1] - v['ci95'][0]) / 2:.4f}")
        share = m.get("colorfulness_of_truth")
        cells.append("–" if share is None else f"{share:.0%}")
        lines.append(f"| {name} | {m['n']} | " + " | ".join(cells) + " |")
    truth = report.get("ground_truth", {}).get("colorfulness")
    if truth is not None:
        lines += ["", f"Ground truth colourfulness: {truth:.2f}."]
    if report["paired_t_tests"]:
        lines += ["", "Paired t-tests (exemplar − other; p-values):", "",
                  "| comparison | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        for name, t in report["paired_t_tests"].items():
            cells = ["–" if t[k]["p"] is None else f"{t[k]['mean_diff']:+.4f} (p={t[k]['p']:.2g})" for k in METRICS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per folder (means):", "", "| folder | method | PSNR | SSIM | LPIPS |", "|---|---|---|---|---|"]
    for group, per in report["groups"].items():
        for name, m in per.items():
            fmt = [("–" if m[k] is None else f"{m[k]:.4f}") for k in ("psnr", "ssim", "lpips")]
            lines.append(f"| {group} | {name} | " + " | ".join(fmt) + " |")
    tp = report["throughput"]
    lines += ["", f"Throughput: {tp['images']} images in {tp['seconds']} s ({tp['images_per_s']} images/s) on "
              f"{tp['provider']} ({tp.get('precision', 'fp32')}),"
              f" peak RSS {tp['peak_rss_mb']} MB; stage seconds: {tp['stage_seconds']}", ""]
    for fig in report.get("figures", []):
        lines.append(f"![{fig}]({fig})")
    return "\n".join(lines) + "\n"


def _gray_rgb(l: np.ndarray) -> np.ndarray:
    return np.dstack([rgb01_to_uint8(l_to_gray(l))] * 3)


def write_figures(samples: list[Sample], scores: dict, methods: tuple[str, ...], out: Path,
                  unet_path: Path | None = None) -> list[str]:
    """Box plots, best/median/worst example grid, and where-the-colour-came-from maps with Grad-CAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    for ax, k in zip(axes, METRICS):
        data = [[v for v in scores[m][k] if math.isfinite(v)] for m in methods]
        ax.boxplot(data, tick_labels=list(methods))
        ax.set_title(k)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "boxplots.png", dpi=80)
    plt.close(fig)
    names.append("boxplots.png")
    if "exemplar" in methods and samples:
        order = np.argsort(scores["exemplar"]["psnr"])
        picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
        fig, axes = plt.subplots(3, 4, figsize=(12, 9))
        for row, (label, i) in enumerate(picks.items()):
            s = samples[i]
            ref = np.asarray(Image.open(s.reference).convert("RGB"))
            for col, (title, img) in enumerate((("gray", _gray_rgb(s.l)), ("reference", ref),
                                                ("output", s.outputs["exemplar"]), ("ground truth", s.gt))):
                axes[row, col].imshow(img)
                axes[row, col].set_title(f"{label}: {title}" if col == 0 else title, fontsize=9)
                axes[row, col].axis("off")
            axes[row, 2].set_title(f"output {scores['exemplar']['psnr'][i]:.2f} dB", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "examples.png", dpi=80)
        plt.close(fig)
        names.append("examples.png")
        shown = [samples[i] for i in list(picks.values()) if samples[i].prediction is not None]
        gradcam = UNetGradCAM(unet_path) if unet_path is not None else None
        fig, axes = plt.subplots(len(shown), 6, figsize=(18, 3 * len(shown)), squeeze=False)
        for row, s in enumerate(shown):
            p = s.prediction
            panels = (("warped reference", _rgb(s.l, p.x13[WARPED_AB].transpose(1, 2, 0) * 128)),
                      ("similarity conv2 (t→r)", p.x13[forward_map(2)]), ("similarity conv5 (t→r)", p.x13[forward_map(5)]),
                      ("round-trip similarity conv3", p.x13[round_trip_map(3)]), ("trust in reference", p.trust),
                      ("Grad-CAM (U-Net bottleneck)" if gradcam else "Grad-CAM: float U-Net only",
                       gradcam(p.x13, p.semantic) if gradcam else np.zeros_like(p.trust)))
            for col, (title, img) in enumerate(panels):
                axes[row, col].imshow(img, cmap=None if img.ndim == 3 else "magma",
                                      vmin=None if img.ndim == 3 else 0, vmax=None if img.ndim == 3 else 1)
                axes[row, col].set_title(f"{s.name}: {title}" if col == 0 else title, fontsize=8)
                axes[row, col].axis("off")
        fig.tight_layout()
        fig.savefig(out / "similarity.png", dpi=80)
        plt.close(fig)
        names.append("similarity.png")
    return names


# --- explainability -----------------------------------------------------------------------------------


class UNetGradCAM:
    """Grad-CAM of the shipped U-Net: which regions of the input drove the predicted chroma.

    The ONNX graph has its BatchNorms folded into the convolutions, so the torch ColorUNet is rebuilt
    with biased convolutions and no BatchNorm, and the folded weights are loaded in graph order.
    The score is the mean predicted chroma; the map is taken at the bottleneck.
    """

    def __init__(self, unet_path: Path) -> None:
        import onnx
        import torch
        from onnx import numpy_helper
        from torch import nn

        from archivecolor.models.store import widen_float16
        from archivecolor.nets.unet import SEMANTIC_FEATURES, ColorUNet

        graph = onnx.load_from_string(widen_float16(Path(unet_path).read_bytes())).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        convs = [n for n in graph.node if n.op_type == "Conv"]
        inputs = [i.name for i in graph.input]
        semantic = SEMANTIC_FEATURES[0][0] in inputs
        # The first convolution is the first projection (semantic prior) or the first encoder block.
        width = int(inits[convs[0].input[1]].shape[0]) // (4 if semantic else 1)
        net = ColorUNet(width=width, semantic=semantic)
        modules = []
        for name, module in list(net.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                parent, attr = name.rsplit(".", 1)
                net.get_submodule(parent)[int(attr)] = nn.Identity()
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                modules.append(module)
        if len(modules) != len(convs):
            raise UsageError(f"{unet_path}: {len(convs)} convolutions, the U-Net has {len(modules)}")
        with torch.no_grad():
            for module, node in zip(modules, convs):
                module.weight = nn.Parameter(torch.from_numpy(inits[node.input[1]].copy()))
                module.bias = nn.Parameter(torch.from_numpy(inits[node.input[2]].copy()))
        self.torch = torch
        self.net = net.eval()

    def __call__(self, x13: np.ndarray, semantic: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """x13: (13, h, w) U-Net input; semantic: its target-feature inputs. Returns the (h, w) map in [0, 1]."""
        torch = self.torch
        store: dict = {}
        hook = self.net.bottleneck.register_forward_hook(lambda m, i, o: store.update(act=o))
        prior = [torch.from_numpy(f.astype(np.float32)) for f in (semantic or {}).values()]
        try:
            ab, _ = self.net(torch.from_numpy(x13[None].astype(np.float32)), *prior)
            act = store["act"]
            (grad,) = torch.autograd.grad(ab.pow(2).sum(dim=1).sqrt().mean(), act)
        finally:
            hook.remove()
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=x13.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        cam = cam.detach().numpy()
        return cam / cam.max() if cam.max() > 0 else cam


# --- retrieval at scale --------------------------------------------------------------------------------


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


# --- peer comparison -------------------------------------------------------------------------------------


def ab_histogram_overlap(a_lab: np.ndarray, b_lab: np.ndarray, bins: int = 32) -> float:
    """Histogram intersection (0..1) of two images' ab distributions."""
    rng = [[-110, 110], [-110, 110]]
    ha, _, _ = np.histogram2d(a_lab[..., 1].ravel(), a_lab[..., 2].ravel(), bins=bins, range=rng)
    hb, _, _ = np.histogram2d(b_lab[..., 1].ravel(), b_lab[..., 2].ravel(), bins=bins, range=rng)
    return float(np.minimum(ha / ha.sum(), hb / hb.sum()).sum())


def run_pairs(pairs_dir: Path, out: Path, provider: str = "auto", home: Path | None = None,
              working_size: int = 256, model_path: Path | None = None) -> dict:
    """Colorize He et al.'s demo pairs with their given references; compare with their outputs in res/."""
    listing = pairs_dir / "pairs.txt"
    if not listing.is_file():
        raise UsageError(f"{listing}: missing; pass a folder with input/, res/ and pairs.txt")
    out.mkdir(parents=True, exist_ok=True)
    models = Models.open(provider, home, unet_path=model_path)
    rows = []
    for line in listing.read_text().split("\n"):
        parts = line.split()
        if len(parts) < 2:
            continue
        target, ref = pairs_dir / "input" / parts[0], pairs_dir / "input" / parts[1]
        theirs = pairs_dir / "res" / f"{Path(parts[0]).stem}_{Path(parts[1]).stem}.png"
        scan = read_image(target)
        lightness = to_upright(scan.lightness(), scan.orientation)
        h, w = fit_working_size(*lightness.shape, working_size)
        l_low = resize_plane(lightness, h, w)
        ref_lab = upright_lab(read_image(ref))
        ref_rgb = rgb01_to_uint8(lab_to_rgb(ref_lab))
        reference = reference_from_lab(sha256_file(ref), ref_lab, working_size)
        reference.features = models.features_of(reference.l)
        pred = predict(models, normalise_l(l_low)[None, None], [[reference]])[0]
        ours = recombine(lightness, pred.ab, pred.l)
        row = {"target": parts[0], "reference": parts[1],
               "ours": {"colorfulness": colorfulness(ours), "ab_overlap": ab_histogram_overlap(rgb_to_lab(ours), ref_lab)}}
        their_img = None
        if theirs.exists():
            their_img = np.asarray(Image.open(theirs).convert("RGB"))
            row["he2018"] = {"colorfulness": colorfulness(their_img),
                             "ab_overlap": ab_histogram_overlap(rgb_to_lab(their_img), ref_lab)}
        rows.append((row, _gray_rgb(lightness), ref_rgb, ours, their_img))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)), squeeze=False)
    for r, (row, gray, ref, ours, theirs) in enumerate(rows):
        for c, (title, img) in enumerate((("target", gray), ("reference", ref), ("archivecolor", ours),
                                          ("He et al. 2018", theirs))):
            if img is not None:
                axes[r, c].imshow(img)
            axes[r, c].set_title(f"{row['target']}: {title}" if c == 0 else title, fontsize=8)
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(out / "pairs.png", dpi=70)
    plt.close(fig)
    summary = {"pairs": [r[0] for r in rows]}
    for who in ("ours", "he2018"):
        vals = [r[0][who] for r in rows if who in r[0]]
        if vals:
            summary[who] = {k: float(np.mean([v[k] for v in vals])) for k in ("colorfulness", "ab_overlap")}
    (out / "pairs.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def default_download_dir(home: Path | None = None) -> Path:
    from archivecolor.models.store import archivecolor_home

    return (home or archivecolor_home()) / "downloads"




# --- speed ----------------------------------------------------------------------------------------

_SPEED_CHILD = "import sys; from archivecolor.bench import speed_child; speed_child(sys.stdin.read())"


def speed_child(request: str) -> None:
    """One timed run in a fresh process (so that peak RSS and start-up are its own): JSON in, JSON out."""
    from archivecolor.runner import RunOptions, colorize_folder

    args = json.loads(request)
    options = RunOptions.from_dict(args["options"])
    report = colorize_folder(args["scans"], options)
    print(json.dumps({"seconds": report.seconds, "stage_seconds": report.stage_seconds,
                      "counts": report.as_dict()["counts"],
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run_speed(scans: Path, options: dict, repeat: int = 3, work_dir: Path | None = None) -> dict:
    """Colorize ``scans`` ``repeat`` times, each in a fresh process writing a fresh output folder.

    ``options``: RunOptions fields (catalog, reference, top_k, working_size, ...). Returns each run's
    wall seconds, scans/s and peak RSS, the median run's stage seconds (they add up to its wall time:
    "other" is the rest), and the median scans/s.
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
            "stage_seconds": median["stage_seconds"], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
