"""The benchmark's report: Markdown tables and figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from archivecolor.bench.metrics import METRICS, rgb01_to_uint8
from archivecolor.color import l_to_gray, lab_to_rgb
from archivecolor.models.layout import WARPED_AB, forward_map, round_trip_map

if TYPE_CHECKING:
    from archivecolor.bench.testsets import Sample


def lab_rgb(l: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """uint8 RGB of CIELAB planes."""
    return rgb01_to_uint8(lab_to_rgb(np.dstack([l, ab])))


def markdown(report: dict) -> str:
    lines = [f"# archivecolor benchmark ({report['protocol']['size']})", ""]
    if "reference" in report["protocol"]:
        lines += [f"References: {report['protocol']['reference']}.", ""]
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


def gray_rgb(l: np.ndarray) -> np.ndarray:
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
            ref = s.reference_rgb if s.reference_rgb is not None else np.asarray(Image.open(s.reference).convert("RGB"))
            for col, (title, img) in enumerate((("gray", gray_rgb(s.l)), ("reference", ref),
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
        from archivecolor.bench.explain import UNetGradCAM

        gradcam = UNetGradCAM(unet_path) if unet_path is not None else None
        fig, axes = plt.subplots(len(shown), 6, figsize=(18, 3 * len(shown)), squeeze=False)
        for row, s in enumerate(shown):
            p = s.prediction
            panels = (("warped reference", lab_rgb(s.l, p.x13[WARPED_AB].transpose(1, 2, 0) * 128)),
                      ("similarity conv2 (t→r)", p.x13[forward_map(2)]), ("similarity conv5 (t→r)", p.x13[forward_map(5)]),
                      ("round-trip similarity conv3", p.x13[round_trip_map(3)]), ("trust in reference", p.trust),
                      ("Grad-CAM (U-Net bottleneck)" if gradcam else "Grad-CAM: float U-Net only",
                       gradcam(p.x13, p.unet_inputs) if gradcam else np.zeros_like(p.trust)))
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
