"""Multi-scale bidirectional semantic correspondence, the fast replacement for PatchMatch.

Dense cosine matching runs only at stride 8, where it is cheap; the match is carried to the finer
layers as a flow field. The output is the U-Net's 13-channel input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.01


def _centred_unit(f: torch.Tensor) -> torch.Tensor:
    """Subtract the per-image channel mean, then L2-normalise each position (B, C, H, W)."""
    return F.normalize(f - f.mean(dim=(2, 3), keepdim=True), dim=1, eps=1e-6)


def _descriptor(f3: torch.Tensor, f4: torch.Tensor, f5: torch.Tensor) -> torch.Tensor:
    """Stride-8 matching descriptor from the three deepest layers, unit norm per position."""
    size = f4.shape[-2:]
    d3 = _centred_unit(F.avg_pool2d(f3, 2))
    d4 = _centred_unit(f4)
    d5 = _centred_unit(F.interpolate(f5, size=size, mode="bilinear", align_corners=False))
    return torch.cat([d3, d4, d5], dim=1) / (3.0**0.5)


def _grid(h: torch.Tensor, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Normalised pixel-centre coordinates (h*w, 2) in grid_sample's (x, y) order."""
    ys = (torch.arange(h, dtype=like.dtype, device=like.device) + 0.5) / h * 2.0 - 1.0
    xs = (torch.arange(w, dtype=like.dtype, device=like.device) + 0.5) / w * 2.0 - 1.0
    gy = ys.view(-1, 1).expand(-1, w)
    gx = xs.view(1, -1).expand(h, -1)
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


def _resize_field(field: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize a (B, 2, h, w) coordinate field and return it as a (B, H, W, 2) sampling grid."""
    return F.interpolate(field, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


class _Sampler:
    """Bilinear sampling of x (B, C, H, W) at grids (B, h, w, 2), border padding, align_corners=False.

    The same arithmetic as ``F.grid_sample``, written with one row-gather table built once per
    tensor: ONNX Runtime's CPU GridSample is slower than the whole rest of the graph.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self.channels = x.shape[1]
        self.height = torch.ones_like(x[:1, :1, :, :1]).sum()
        self.width = torch.ones_like(x[:1, :1, :1, :]).sum()
        self.table = x.permute(0, 2, 3, 1).reshape(-1, self.channels)
        batch = torch.cumsum(torch.ones_like(x[:, :1, :1, :1]), dim=0) - 1.0  # (B, 1, 1, 1)
        self.offset = batch[:, 0] * (self.height * self.width)  # (B, 1, 1)

    def __call__(self, grid: torch.Tensor) -> torch.Tensor:
        width, height = self.width, self.height
        px = torch.minimum((((grid[..., 0] + 1.0) * width - 1.0) / 2.0).clamp(min=0.0), width - 1.0)
        py = torch.minimum((((grid[..., 1] + 1.0) * height - 1.0) / 2.0).clamp(min=0.0), height - 1.0)
        x0, y0 = px.floor(), py.floor()
        wx, wy = (px - x0).unsqueeze(-1), (py - y0).unsqueeze(-1)
        x1 = torch.minimum(x0 + 1.0, width - 1.0)
        y1 = torch.minimum(y0 + 1.0, height - 1.0)

        def gather(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
            index = (self.offset + yy * width + xx).long().reshape(-1)
            return self.table[index].reshape(grid.shape[0], grid.shape[1], grid.shape[2], self.channels)

        top = gather(y0, x0) * (1.0 - wx) + gather(y0, x1) * wx
        bottom = gather(y1, x0) * (1.0 - wx) + gather(y1, x1) * wx
        return (top * (1.0 - wy) + bottom * wy).permute(0, 3, 1, 2)


def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return _Sampler(x)(grid)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=1, eps=1e-6) * F.normalize(b, dim=1, eps=1e-6)).sum(dim=1, keepdim=True)


def _refine(flow: torch.Tensor, t: torch.Tensor, r: torch.Tensor, temperature: float) -> torch.Tensor:
    """Refine a flow at ``t``'s resolution: soft-argmax over the 3×3 reference neighbours of each match.

    flow: (B, 2, h', w') coarser flow in normalised reference coordinates; returns (B, 2, h, w).
    """
    grid = _resize_field(flow, t.shape[-2:])  # (B, h, w, 2)
    # Sizes as tensors, so that eager mode and the traced (dynamic-shape) graph compute the same.
    hr = torch.ones_like(r[:1, :1, :, :1]).sum()
    wr = torch.ones_like(r[:1, :1, :1, :]).sum()
    step = torch.stack([2.0 / wr, 2.0 / hr])
    tn = _centred_unit(t)
    sample_rn = _Sampler(_centred_unit(r))
    candidates, scores = [], []
    for dy in (-1.0, 0.0, 1.0):
        for dx in (-1.0, 0.0, 1.0):
            g = grid + torch.stack([dx * step[0], dy * step[1]])
            candidates.append(g)
            scores.append((tn * sample_rn(g)).sum(dim=1))  # (B, h, w)
    weights = torch.softmax(torch.stack(scores, dim=-1) / temperature, dim=-1)  # (B, h, w, 9)
    refined = (torch.stack(candidates, dim=-2) * weights.unsqueeze(-1)).sum(dim=-2)  # (B, h, w, 2)
    return refined.permute(0, 3, 1, 2)


class Correspondence(nn.Module):
    """Build (L, warped ab, 10 similarity maps) for (target, reference) pairs.

    Inputs, all float32:
      l: (B, 1, H, W) target L/100.
      tf1..tf5, rf1..rf5: target and reference VGG features at strides 1, 2, 4, 8, 16.
      ref_ab: (B, 2, Hr, Wr) reference ab/128, Hr and Wr multiples of 16 (any aspect ratio).
    Output: (B, 13, H, W): L/100, warped ab/128, 5 target→reference and 5 reference→target
    (round-trip) cosine similarity maps in [-1, 1], fine to coarse.
    """

    def __init__(self, temperature: float = TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature

    def flows(self, tf: list[torch.Tensor], rf: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft-argmax flows at stride 8: target→reference (B, 2, ht, wt), reference→target (B, 2, hr, wr)."""
        dt = _descriptor(tf[2], tf[3], tf[4])
        dr = _descriptor(rf[2], rf[3], rf[4])
        b, c, ht, wt = dt.shape
        hr, wr = dr.shape[-2:]
        sim = torch.bmm(dt.flatten(2).transpose(1, 2), dr.flatten(2)) / self.temperature  # (B, Nt, Nr)
        to_ref = torch.softmax(sim, dim=2) @ _grid(hr, wr, dt)  # (B, Nt, 2)
        to_tgt = torch.softmax(sim, dim=1).transpose(1, 2) @ _grid(ht, wt, dt)  # (B, Nr, 2)
        flow_tr = to_ref.transpose(1, 2).reshape(b, 2, ht, wt)
        flow_rt = to_tgt.transpose(1, 2).reshape(b, 2, hr, wr)
        return flow_tr, flow_rt

    def forward(
        self,
        l: torch.Tensor,
        tf1: torch.Tensor, tf2: torch.Tensor, tf3: torch.Tensor, tf4: torch.Tensor, tf5: torch.Tensor,
        rf1: torch.Tensor, rf2: torch.Tensor, rf3: torch.Tensor, rf4: torch.Tensor, rf5: torch.Tensor,
        ref_ab: torch.Tensor,
    ) -> torch.Tensor:
        tf = [tf1, tf2, tf3, tf4, tf5]
        rf = [rf1, rf2, rf3, rf4, rf5]
        flow_tr, flow_rt = self.flows(tf, rf)
        # Carry the stride-8 match to the finer layers, refining it locally at strides 4 and 2.
        fine_4 = _refine(flow_tr, tf[2], rf[2], self.temperature)
        fine_2 = _refine(fine_4, tf[1], rf[1], self.temperature)
        level_flows = [fine_2, fine_2, fine_4, flow_tr, flow_tr]
        size = l.shape[-2:]
        forward_maps, reverse_maps = [], []
        for t, r, flow in zip(tf, rf, level_flows):
            grid = _resize_field(flow, t.shape[-2:])
            matched = _sample(r, grid)
            forward_maps.append(_cosine(t, matched))
            # Where the matched reference point maps back to in the target (bidirectional check).
            back = _sample(F.interpolate(flow_rt, size=r.shape[-2:], mode="bilinear", align_corners=False), grid)
            reverse_maps.append(_cosine(matched, _sample(t, back.permute(0, 2, 3, 1))))
        maps = [
            F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in forward_maps + reverse_maps
        ]
        smoothed_ab = F.avg_pool2d(ref_ab, 3, stride=1, padding=1, count_include_pad=False)
        warped_ab = _sample(smoothed_ab, _resize_field(fine_2, size))
        return torch.cat([l, warped_ab, *maps], dim=1)
