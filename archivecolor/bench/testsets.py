"""The test-set benchmark: colorize ground-truth colour photos from their gray and measure each method."""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from archivecolor.bench.metrics import LPIPS, METRICS, colorfulness, mse01, psnr, ssim
from archivecolor.bench.report import lab_rgb, markdown, write_figures
from archivecolor.bench.stats import mean_ci, paired_test
from archivecolor.catalog import EMBED_SHORT_SIDE, EMBEDDING, Catalog, catalogue_precision, embedding_input, index_references
from archivecolor.color import global_transfer, rgb_to_lab, to_uint8
from archivecolor.errors import UsageError
from archivecolor.imageio import file_walk_images, read_image, to_upright
from archivecolor.models.layout import WARPED_AB
from archivecolor.models.session import INT8_SUFFIX, resolve_precision
from archivecolor.models.store import downloads_dir, model_dir
from archivecolor.models.weights import sha256_file
from archivecolor.pipeline import (
    CHOSEN_REFERENCE_CAST,
    DEFAULT_WORKING_SIZE,
    Models,
    Prediction,
    ReferenceCache,
    StageTimes,
    check_colour_strength,
    predict,
    reference_from_lab,
    working_l,
)
from archivecolor.upsample import recombine, resize_plane

METHODS = ("gray", "global", "warp-only", "exemplar", "top-k")
TOP_K = 3


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
    precision: str = "auto"
    model_path: Path | None = None  # a U-Net of one's own export instead of the installed one
    colour_strength: float = 1.0  # scales the network's colours (exemplar, top-k), as `run --colour-strength`
    same_scene: bool = False  # each photo's second half coloured from its first: a reference of the same scene


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
    reference_rgb: np.ndarray | None = None  # a reference that is no file (--same-scene: the photo's first half)


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


def _upright_rgb(path: Path) -> np.ndarray:
    scan = read_image(path)
    pixels = scan.pixels if scan.pixels.ndim == 3 else np.dstack([scan.pixels] * 3)
    return to_uint8(to_upright(pixels, scan.orientation))


def _sample(pixels: np.ndarray, name: str, group: str, size: int | None, sha256: str) -> Sample:
    if size:
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))
    else:  # the working grid needs multiples of 16; crop the few extra rows and columns
        h, w = pixels.shape[0] // 16 * 16, pixels.shape[1] // 16 * 16
        pixels = pixels[:h, :w]
    return Sample(name, group, pixels, rgb_to_lab(pixels)[..., 0], sha256)


def halves(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two halves of a photo across its long side: (first, second), left and right or top and bottom."""
    h, w = pixels.shape[:2]
    if w >= h:
        return pixels[:, : w // 2], pixels[:, w // 2 :]
    return pixels[: h // 2], pixels[h // 2 :]


def run_bench(
    testsets: list[Path], options: BenchOptions, progress: Callable[[int, int, str], None] | None = None
) -> dict:
    """Run the benchmark; writes report.json, report.md and figures into ``options.out``."""
    unknown = set(options.methods) - set(METHODS)
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    check_colour_strength(options.colour_strength)
    if options.same_scene and (options.catalog is not None or options.references is not None):
        raise UsageError("--same-scene colours each photo's second half from its first half; leave out --catalog "
                         "and --references")
    if options.same_scene and "top-k" in options.methods:
        raise UsageError("--methods top-k fuses several retrieved references; --same-scene gives one, so leave "
                         "top-k out")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    catalog_path = options.catalog
    precision = resolve_precision(options.precision, options.provider, options.home,
                                  catalogue_precision(catalog_path) if options.references is None else None)
    if options.references is not None:
        catalog_path = out / "references.sqlite"
        index_references(options.references, catalog_path, provider=options.provider, home=options.home,
                         precision=precision)
    if catalog_path is None and not options.same_scene:
        raise UsageError("pass --catalog PATH or --references DIR for the references (or --same-scene)")
    items = _test_images(testsets, options.limit)
    models = Models.open(options.provider, options.home, precision=precision, unet_path=options.model_path)
    cache = ReferenceCache(models)
    catalog = None
    if not options.same_scene:
        catalog = Catalog.open(catalog_path)
        catalog.check_model(models.backbone, models.features.model.sha256, EMBEDDING, models.precision)
    lpips_metric = LPIPS(options.lpips_net, download_dir=downloads_dir(options.home))
    times = StageTimes()
    stage = {"decode": 0.0, "recombine": 0.0}
    samples: list[Sample] = []
    started = time.perf_counter()
    k_needed = max(TOP_K if "top-k" in options.methods else 1, models.references_wanted)
    side = options.size or DEFAULT_WORKING_SIZE  # --native: the run path's working size, recombined at full size
    networks = bool({"exemplar", "warp-only", "top-k"} & set(options.methods))
    for n, (path, group) in enumerate(items, 1):
        t = time.perf_counter()
        pixels, sha256 = _upright_rgb(path), sha256_file(path)
        if options.same_scene:
            first, second = halves(pixels)
            sample = _sample(second, path.name, group, options.size, sha256)
        else:
            sample = _sample(pixels, path.name, group, options.size, sha256)
        stage["decode"] += time.perf_counter() - t
        l01 = working_l(sample.l, side)
        features = None
        if networks:  # one VGG pass for every prediction of this photo, and at the catalogue's size its query
            t = time.perf_counter()
            features = models.target_features(l01)
            times.features += time.perf_counter() - t
        if options.same_scene:
            key = f"{sha256}:first-half"
            refs = [cache.get(key, partial(reference_from_lab, key, rgb_to_lab(first), side))]
            sample.reference, sample.reference_rgb = f"{path}, first half", first
        else:
            # the query `run` would make for this photo
            query = (features.embedding if features is not None and side == EMBED_SHORT_SIDE
                     else models.embed(embedding_input(sample.l)))
            matches = catalog.search(query, k_needed, exclude_sha256={sample.sha256})[0]
            refs = [cache.load(Path(m.path), m.sha256, side) for m in matches]
            sample.reference = matches[0].path
        h, w = sample.l.shape
        if "gray" in options.methods:
            sample.outputs["gray"] = lab_rgb(sample.l, np.zeros((h, w, 2), np.float32))
        if "global" in options.methods:
            sample.outputs["global"] = lab_rgb(sample.l, global_transfer(sample.l, refs[0].lab()))
        if {"exemplar", "warp-only"} & set(options.methods):
            pred = predict(models, l01, [refs[: models.references_wanted]], times, features,
                           chosen=options.same_scene, chosen_cast=CHOSEN_REFERENCE_CAST)[0]
            sample.prediction = pred
            t = time.perf_counter()
            sample.outputs["exemplar"] = recombine(sample.l, pred.ab, pred.l, colour_strength=options.colour_strength)
            stage["recombine"] += time.perf_counter() - t
            if "warp-only" in options.methods:  # the warp is at working size: bring its ab to the sample's
                warp_ab = pred.x13[WARPED_AB].transpose(1, 2, 0) * 128
                if warp_ab.shape[:2] != (h, w):
                    warp_ab = np.dstack([resize_plane(warp_ab[..., c], h, w) for c in range(2)])
                sample.outputs["warp-only"] = lab_rgb(sample.l, warp_ab)
        if "top-k" in options.methods and len(refs) > 1:
            pred = predict(models, l01, [refs], times, features)[0]
            sample.outputs["top-k"] = recombine(sample.l, pred.ab, pred.l, colour_strength=options.colour_strength)
        for m in list(sample.outputs):
            if m not in options.methods:
                del sample.outputs[m]
        samples.append(sample)
        if progress:
            progress(n, len(items), path.name)
    elapsed = time.perf_counter() - started
    if catalog is not None:
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
                     "catalog": None if options.same_scene else str(catalog_path),
                     "reference": "each photo's first half; its second half is the target" if options.same_scene
                     else "retrieved from the catalogue",
                     "reference_excludes_self": True, "lpips_net": options.lpips_net,
                     "colour_strength": options.colour_strength},
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
