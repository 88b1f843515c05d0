"""The torch twin of ``archivecolor.color``, differentiable, built from its constants (tested against it):
L to the gray sRGB the VGG sees, and CIELAB to sRGB for the perceptual loss."""

from __future__ import annotations

import torch

from archivecolor.color import AB_SCALE, DELTA, L_SCALE, SRGB_LINEAR_KNEE, WHITE_D65, XYZ_TO_RGB


def _f_inv(f: torch.Tensor) -> torch.Tensor:
    # This order of operations keeps the exported VGG graph byte for byte (catalogues key on its sha256).
    return torch.where(f > DELTA, f.clamp(min=DELTA) ** 3, (f - 4.0 / 29.0) * 3.0 * DELTA * DELTA)


def linear_to_srgb(lin: torch.Tensor) -> torch.Tensor:
    return torch.where(lin <= SRGB_LINEAR_KNEE, 12.92 * lin,
                       1.055 * lin.clamp(min=SRGB_LINEAR_KNEE) ** (1.0 / 2.4) - 0.055)


def l_to_gray_srgb(l01: torch.Tensor) -> torch.Tensor:
    """L/100 in [0, 1] to the sRGB gray value in [0, 1] that has that lightness (D65)."""
    return linear_to_srgb(_f_inv((l01 * L_SCALE + 16.0) / 116.0).clamp(0.0, 1.0))


def lab_to_rgb(l01: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) L/100 and (B,2,H,W) ab/128 to (B,3,H,W) sRGB clipped to [0, 1]."""
    fy = (l01 * L_SCALE + 16.0) / 116.0
    f = torch.cat([fy + ab[:, 0:1] * AB_SCALE / 500.0, fy, fy - ab[:, 1:2] * AB_SCALE / 200.0], dim=1)
    xyz = _f_inv(f) * torch.tensor(WHITE_D65, dtype=l01.dtype, device=l01.device).view(1, 3, 1, 1)
    m = torch.tensor(XYZ_TO_RGB, dtype=l01.dtype, device=l01.device)
    return linear_to_srgb(torch.einsum("ij,bjhw->bihw", m, xyz).clamp(0.0, 1.0))
