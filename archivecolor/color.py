"""sRGB ↔ CIE XYZ ↔ CIELAB (D65, 2°) in numpy, float32, vectorised.

Conversions build on each other: rgb → linear rgb → xyz → lab, and back. Arrays are channel-last
(..., 3). RGB is in [0, 1]; L in [0, 100]; a, b roughly in [-128, 127].
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

# sRGB primaries, D65 white (IEC 61966-2-1), the same matrix skimage uses.
RGB_TO_XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]],
    dtype=np.float64,
)
XYZ_TO_RGB = np.linalg.inv(RGB_TO_XYZ)
WHITE_D65 = np.array([0.95047, 1.0, 1.08883], dtype=np.float64)
DELTA = 6.0 / 29.0  # where CIELAB's cube root turns linear
SRGB_LINEAR_KNEE = 0.0031308  # where sRGB's transfer curve turns linear (linear-light side)
AB_SCALE = 128.0
L_SCALE = 100.0


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Integer images (uint8, uint16) to float32 in [0, 1]; float input is passed through as float32."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise TypeError(f"unsupported image dtype {image.dtype}; expected uint8, uint16 or float")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """uint16 (or uint8) samples to uint8, rounded to the nearest level: the one 16-to-8-bit conversion."""
    if image.dtype == np.uint8:
        return image
    if image.dtype != np.uint16:
        raise TypeError(f"unsupported image dtype {image.dtype}; expected uint8 or uint16")
    return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float32)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((np.maximum(rgb, 0.04045) + 0.055) / 1.055) ** 2.4).astype(
        np.float32
    )


def linear_to_srgb(lin: np.ndarray) -> np.ndarray:
    lin = np.asarray(lin, dtype=np.float32)
    return np.where(
        lin <= SRGB_LINEAR_KNEE, 12.92 * lin, 1.055 * np.maximum(lin, SRGB_LINEAR_KNEE) ** (1.0 / 2.4) - 0.055
    ).astype(np.float32)


def linear_to_xyz(lin: np.ndarray) -> np.ndarray:
    return (lin @ RGB_TO_XYZ.T.astype(np.float32)).astype(np.float32)


def xyz_to_linear(xyz: np.ndarray) -> np.ndarray:
    return (xyz @ XYZ_TO_RGB.T.astype(np.float32)).astype(np.float32, copy=False)


def _f(t: np.ndarray) -> np.ndarray:
    return np.where(t > DELTA**3, np.cbrt(t), t / (3 * DELTA**2) + 4.0 / 29.0).astype(np.float32)


def _f_inv(t: np.ndarray) -> np.ndarray:
    return np.where(t > DELTA, t * t * t, 3 * DELTA**2 * (t - 4.0 / 29.0)).astype(np.float32)


def xyz_to_lab(xyz: np.ndarray) -> np.ndarray:
    f = _f(xyz / WHITE_D65.astype(np.float32))
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_xyz(lab: np.ndarray) -> np.ndarray:
    lab = np.asarray(lab, dtype=np.float32)
    f = np.empty_like(lab)
    np.divide(lab[..., 0] + 16.0, 116.0, out=f[..., 1])
    np.add(f[..., 1], lab[..., 1] / 500.0, out=f[..., 0])
    np.subtract(f[..., 1], lab[..., 2] / 200.0, out=f[..., 2])
    xyz = _f_inv(f)
    xyz *= WHITE_D65.astype(np.float32)
    return xyz


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (..., 3), uint8/uint16 or float in [0, 1], to CIELAB float32 (..., 3)."""
    return xyz_to_lab(linear_to_xyz(srgb_to_linear(to_unit_float(rgb))))


def lab_to_rgb_unclipped(lab: np.ndarray) -> np.ndarray:
    """CIELAB to sRGB float32 with no gamut handling (values may leave [0, 1])."""
    return linear_to_srgb(xyz_to_linear(lab_to_xyz(lab)))


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) to sRGB float32 in [0, 1], clipping out-of-gamut colours per channel."""
    return np.clip(lab_to_rgb_unclipped(lab), 0.0, 1.0)


def gray_to_l(gray: np.ndarray) -> np.ndarray:
    """Gray sRGB values (any shape), uint8/uint16 or float [0, 1], to L in [0, 100] float32."""
    gray = np.asarray(gray)
    if gray.dtype in (np.uint8, np.uint16):  # look every level up: 25x faster on a 12 MP scan, the same values
        return _gray_levels_to_l(gray.dtype.str)[gray]
    return _computed_gray_to_l(gray)


def _computed_gray_to_l(gray: np.ndarray) -> np.ndarray:
    y = srgb_to_linear(to_unit_float(gray))
    return (116.0 * _f(y) - 16.0).astype(np.float32)


@lru_cache(maxsize=2)
def _gray_levels_to_l(dtype: str) -> np.ndarray:
    """L of every level of an integer gray dtype."""
    return _computed_gray_to_l(np.arange(np.iinfo(np.dtype(dtype)).max + 1).astype(dtype))


def l_to_gray(l: np.ndarray) -> np.ndarray:
    """L in [0, 100] to the gray sRGB value in [0, 1] of that lightness."""
    y = _f_inv((np.asarray(l, dtype=np.float32) + 16.0) / 116.0)
    return np.clip(linear_to_srgb(y), 0.0, 1.0)


# The gamut test's tolerance in sRGB, and the same bounds in linear RGB: the sRGB curve is monotonic,
# so the bisection can test there and skip the curve at every step.
GAMUT_TOLERANCE = 1e-4
_LINEAR_LOW = -GAMUT_TOLERANCE / 12.92
_LINEAR_HIGH = ((1.0 + GAMUT_TOLERANCE + 0.055) / 1.055) ** 2.4


def lab_to_rgb_keep_l(lab: np.ndarray, steps: int = 12) -> np.ndarray:
    """CIELAB to sRGB in [0, 1] that keeps L exactly: out-of-gamut colours lose chroma, not lightness.

    Each out-of-gamut pixel's (a, b) is scaled towards 0 by the largest factor in [0, 1] that stays
    in gamut (bisection, ``steps`` halvings), so the gray axis, which is always in gamut, bounds it.
    """
    lab = np.asarray(lab, dtype=np.float32)
    rgb = lab_to_rgb_unclipped(lab)
    beyond = (rgb < -GAMUT_TOLERANCE) | (rgb > 1 + GAMUT_TOLERANCE)
    outside = beyond[..., 0] | beyond[..., 1] | beyond[..., 2]  # elementwise: a reduction over 3 is slow
    if np.any(outside):
        sub = lab[outside]
        white = WHITE_D65.astype(np.float32)
        to_linear = XYZ_TO_RGB.astype(np.float32)
        fy = (sub[:, 0] + 16.0) / 116.0
        y_part = (_f_inv(fy) * white[1])[:, None] * to_linear[:, 1]  # L is fixed: Y's share never changes
        lo = np.zeros(len(sub), dtype=np.float32)
        hi = np.ones(len(sub), dtype=np.float32)
        for _ in range(steps):
            mid = (lo + hi) / 2
            x = _f_inv(fy + mid * sub[:, 1] / 500.0) * white[0]
            z = _f_inv(fy - mid * sub[:, 2] / 200.0) * white[2]
            linear = x[:, None] * to_linear[:, 0] + y_part + z[:, None] * to_linear[:, 2]
            ok = np.all((linear >= _LINEAR_LOW) & (linear <= _LINEAR_HIGH), axis=-1)
            lo = np.where(ok, mid, lo)
            hi = np.where(ok, hi, mid)
        sub[:, 1:] *= lo[:, None]
        rgb[outside] = lab_to_rgb_unclipped(sub)
    return np.clip(rgb, 0.0, 1.0)


def normalise_l(l: np.ndarray) -> np.ndarray:
    """L in [0, 100] to the model's input scale, L/100 in [0, 1]."""
    return (np.asarray(l, dtype=np.float32) / L_SCALE).astype(np.float32)


def normalise_ab(ab: np.ndarray) -> np.ndarray:
    """ab to the model's scale, ab/128, about [-1, 1]."""
    return (np.asarray(ab, dtype=np.float32) / AB_SCALE).astype(np.float32)


def denormalise_ab(ab: np.ndarray) -> np.ndarray:
    """The model's ab/128 back to CIELAB a, b units."""
    return (np.asarray(ab, dtype=np.float32) * AB_SCALE).astype(np.float32)


def is_near_gray(rgb: np.ndarray, tolerance: float = 4.0) -> bool:
    """True when an RGB image carries no chroma beyond a tint: gray, sepia or toned prints.

    A toned print's chroma is a function of lightness alone, so the test subtracts the mean (a, b)
    of each of 16 lightness bands and judges what is left (95th percentile, ΔE units) on a 64 px
    thumbnail, where JPEG chroma noise has averaged out. Near-monochrome colour photos count as gray.
    """
    from PIL import Image

    thumb = Image.fromarray(to_uint8(rgb))
    thumb.thumbnail((64, 64), Image.BOX)
    lab = rgb_to_lab(np.asarray(thumb)).reshape(-1, 3)
    bands = np.minimum((lab[:, 0] / 100.0 * 16).astype(np.int64), 15)
    residual = lab[:, 1:].copy()
    for band in np.unique(bands):
        sel = bands == band
        residual[sel] -= residual[sel].mean(axis=0)
    spread = np.sqrt((residual**2).sum(axis=1))
    return float(np.percentile(spread, 95)) < tolerance


GLOBAL_TRANSFER_L_BINS = 16


def global_transfer(l_target: np.ndarray, ref_lab: np.ndarray) -> np.ndarray:
    """Reinhard-style global transfer: match the reference's L statistics to the target's, then give
    each target pixel the mean reference ab of its L band. Returns (H, W, 2) ab."""
    rl = ref_lab[..., 0].ravel()
    rl = (rl - rl.mean()) / (rl.std() + 1e-6) * (l_target.std() + 1e-6) + l_target.mean()
    edges = np.quantile(rl, np.linspace(0, 1, GLOBAL_TRANSFER_L_BINS + 1)[1:-1])
    ref_bin = np.digitize(rl, edges)
    ab = ref_lab[..., 1:].reshape(-1, 2)
    means = np.stack([ab[ref_bin == k].mean(axis=0) if np.any(ref_bin == k) else ab.mean(axis=0)
                      for k in range(GLOBAL_TRANSFER_L_BINS)])
    return means[np.digitize(l_target, edges)].astype(np.float32)
