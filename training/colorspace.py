"""Differentiable CIELAB → sRGB for the perceptual loss; the torch twin of archivecolor.color."""

from __future__ import annotations

import torch

from archivecolor.color import AB_SCALE, L_SCALE, WHITE_D65, XYZ_TO_RGB

_DELTA = 6.0 / 29.0


def lab_to_rgb(l01: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) L/100 and (B,2,H,W) ab/128 to (B,3,H,W) sRGB clipped to [0, 1]."""
    lum = l01 * L_SCALE
    a = ab[:, 0:1] * AB_SCALE
    b = ab[:, 1:2] * AB_SCALE
    fy = (lum + 16.0) / 116.0
    f = torch.cat([fy + a / 500.0, fy, fy - b / 200.0], dim=1)
    xyz = torch.where(f > _DELTA, f.clamp(min=_DELTA) ** 3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
    xyz = xyz * torch.tensor(WHITE_D65, dtype=l01.dtype, device=l01.device).view(1, 3, 1, 1)
    m = torch.tensor(XYZ_TO_RGB, dtype=l01.dtype, device=l01.device)
    lin = torch.einsum("ij,bjhw->bihw", m, xyz).clamp(0.0, 1.0)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055)
