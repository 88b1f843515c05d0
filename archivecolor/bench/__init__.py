"""``archivecolor bench``: colorize ground-truth colour photos from their gray and measure.

Metrics are computed in RGB after Lab→RGB, as the seed does: PSNR (8-bit, MAX=255), SSIM
(gaussian window σ=1.5, K1=0.01, K2=0.03), MSE on [0, 1] values (scikit-image), LPIPS v0.1 (AlexNet by
default) and Hasler–Süsstrunk colourfulness. Methods are compared side by side with 95%
confidence intervals and paired t-tests. The ``bench`` extra brings torch (LPIPS, Grad-CAM), scipy,
scikit-image and matplotlib; the colorization itself runs on ONNX Runtime.

Modules: ``testsets`` (the test-set run), ``metrics``, ``stats``, ``report``, ``explain``
(Grad-CAM), ``pairs`` (He et al.'s demo pairs), ``speed`` (`--speed`, `--retrieval`).
"""

from archivecolor.bench.explain import UNetGradCAM
from archivecolor.bench.metrics import (
    HIGHER_IS_BETTER,
    LPIPS,
    METRICS,
    ab_histogram_overlap,
    colorfulness,
    mse01,
    psnr,
    rgb01_to_uint8,
    ssim,
)
from archivecolor.bench.pairs import run_pairs
from archivecolor.bench.speed import retrieval_latency, run_speed
from archivecolor.bench.stats import mean_ci, paired_test
from archivecolor.bench.testsets import METHODS, BenchOptions, run_bench
from archivecolor.color import global_transfer  # the `global` method, beside the other colour science

__all__ = [
    "HIGHER_IS_BETTER", "LPIPS", "METHODS", "METRICS", "BenchOptions", "UNetGradCAM", "ab_histogram_overlap",
    "colorfulness", "global_transfer", "mean_ci", "mse01", "paired_test", "psnr", "retrieval_latency",
    "rgb01_to_uint8", "run_bench", "run_pairs", "run_speed", "ssim",
]
