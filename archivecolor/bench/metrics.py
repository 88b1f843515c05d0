"""Image metrics in RGB, as the seed computes them: PSNR (8-bit), SSIM, MSE on [0, 1], LPIPS v0.1,
Hasler–Süsstrunk colourfulness, and the ab-histogram overlap with a reference."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from archivecolor.errors import UsageError
from archivecolor.models.weights import load_backbone_weights

METRICS = ("psnr", "ssim", "mse", "lpips", "colorfulness")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "mse": False, "lpips": False, "colorfulness": True}


def rgb01_to_uint8(rgb01: np.ndarray) -> np.ndarray:
    return np.round(np.clip(rgb01, 0, 1) * 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between uint8 RGB images, MAX = 255 (inf for identical images)."""
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(a, b):
        return float("inf")
    return float(peak_signal_noise_ratio(b, a, data_range=255))


def mse01(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error on [0, 1] values of uint8 RGB images."""
    from skimage.metrics import mean_squared_error

    return float(mean_squared_error(a / 255.0, b / 255.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over RGB channels: gaussian window σ=1.5, K1=0.01, K2=0.03, data range 255 (Wang et al.)."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=255))


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


def ab_histogram_overlap(a_lab: np.ndarray, b_lab: np.ndarray, bins: int = 32) -> float:
    """Histogram intersection (0..1) of two images' ab distributions."""
    rng = [[-110, 110], [-110, 110]]
    ha, _, _ = np.histogram2d(a_lab[..., 1].ravel(), a_lab[..., 2].ravel(), bins=bins, range=rng)
    hb, _, _ = np.histogram2d(b_lab[..., 1].ravel(), b_lab[..., 2].ravel(), bins=bins, range=rng)
    return float(np.minimum(ha / ha.sum(), hb / hb.sum()).sum())
