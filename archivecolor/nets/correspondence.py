"""Multi-scale bidirectional semantic correspondence, the fast replacement for PatchMatch.

Dense cosine matching runs only at stride 8, where it is cheap; the match is carried to the finer
layers as a flow field. The output is the U-Net's 13-channel input, and the reference's colours where the
stride-8 attention puts its weight.

The graph is written for ONNX Runtime's CPU provider: every bilinear lookup is one row gather from a
channel-last table (its GridSample is slower than the whole rest of the graph), each sampling grid's
taps are computed once and shared by every tensor read at that grid, and the 3×3 refinement scores
are combined from the dot products with a 4×4 integer neighbourhood rather than nine resampled copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 0.01
EPS = 1e-6


def _centred_unit(f: torch.Tensor) -> torch.Tensor:
    """Subtract the per-image channel mean, then L2-normalise each position (B, C, H, W)."""
    return F.normalize(f - f.mean(dim=(2, 3), keepdim=True), dim=1, eps=EPS)


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


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _resize_field(field: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize a (B, 2, h, w) coordinate field and return it as a (B, H, W, 2) sampling grid."""
    return _resize(field, size).permute(0, 2, 3, 1)


class _Raster:
    """An (H, W) raster of a batch, for bilinear lookups with border padding (grid_sample's arithmetic,
    align_corners=False). Sizes are tensors, so eager mode and the traced dynamic-shape graph agree."""

    def __init__(self, like: torch.Tensor) -> None:
        self.height = torch.ones_like(like[:1, :1, :, :1]).sum()
        self.width = torch.ones_like(like[:1, :1, :1, :]).sum()
        batch = torch.cumsum(torch.ones_like(like[:, :1, :1, :1]), dim=0) - 1.0  # (B, 1, 1, 1)
        self.offset = batch[:, 0] * (self.height * self.width)  # (B, 1, 1): first row of each image

    def pixels(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel coordinates (x, y), each (B, h, w), of a normalised grid, clamped to the raster."""
        px = ((grid[..., 0] + 1.0) * self.width - 1.0) / 2.0
        py = ((grid[..., 1] + 1.0) * self.height - 1.0) / 2.0
        return (torch.minimum(px.clamp(min=0.0), self.width - 1.0),
                torch.minimum(py.clamp(min=0.0), self.height - 1.0))

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """Integer columns clamped to the raster (border padding)."""
        return torch.minimum(x.clamp(min=0.0), self.width - 1.0)

    def row_starts(self, y: torch.Tensor) -> torch.Tensor:
        """Flat index of the first pixel of integer rows clamped to the raster, in a (B*H*W, C) table."""
        return self.offset + torch.minimum(y.clamp(min=0.0), self.height - 1.0) * self.width

    def taps(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The four bilinear taps of ``grid`` (B, h, w, 2): row indices (B, h, w, 4) and weights (B, h, w, 4, 1)."""
        px, py = self.pixels(grid)
        x0, y0 = px.floor(), py.floor()
        wx, wy = px - x0, py - y0
        top, bottom = self.row_starts(y0), self.row_starts(y0 + 1.0)
        left, right = self.columns(x0), self.columns(x0 + 1.0)
        index = torch.stack([top + left, top + right, bottom + left, bottom + right], dim=-1).long()
        weight = torch.stack([(1.0 - wx) * (1.0 - wy), wx * (1.0 - wy), (1.0 - wx) * wy, wx * wy], dim=-1)
        return index, weight.unsqueeze(-1)


def _channels_last(*xs: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) of same-size (B, C, H, W) tensors, stacked along the channels: a lookup table."""
    return (torch.cat(xs, dim=1) if len(xs) > 1 else xs[0]).permute(0, 2, 3, 1)


def _gather(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of a (B, H, W, C) table at flat indices of any shape: index.shape + (C,)."""
    return table.flatten(0, 2)[index]


def _sample(table: torch.Tensor, taps: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Bilinear lookup of a (B, H, W, C) table at precomputed taps: (B, h, w, C)."""
    index, weight = taps
    # One tap at a time: gathering all four at once quadruples the largest tensor of the graph.
    total = _gather(table, index[..., 0]) * weight[..., 0, :]
    for k in range(1, 4):
        total = total + _gather(table, index[..., k]) * weight[..., k, :]
    return total


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis, keeping it."""
    norms = a.norm(dim=-1, keepdim=True).clamp(min=EPS) * b.norm(dim=-1, keepdim=True).clamp(min=EPS)
    return (a * b).sum(dim=-1, keepdim=True) / norms


def _refine(flow: torch.Tensor, t: torch.Tensor, r: torch.Tensor, temperature: float) -> torch.Tensor:
    """Refine a flow at ``t``'s resolution: soft-argmax over the 3×3 reference neighbours of each match.

    flow: (B, 2, h', w') coarser flow in normalised reference coordinates; returns (B, 2, h, w).
    A neighbour one pixel away has the same bilinear weights on a shifted set of pixels, and the score
    is linear in the sampled vector, so the nine scores are bilinear blends of the dot products with
    the 4×4 pixels around the match (exact, border clamping included). A match beyond the outer pixel
    centres (a refined flow can overshoot by up to a pixel) is scored from the nearest centre.
    """
    grid = _resize_field(flow, t.shape[-2:])  # (B, h, w, 2)
    raster = _Raster(r)
    px, py = raster.pixels(grid)
    x0, y0 = px.floor(), py.floor()
    wx, wy = (px - x0).unsqueeze(-1), (py - y0).unsqueeze(-1)
    shifts = (-1.0, 0.0, 1.0, 2.0)
    columns = [raster.columns(x0 + dx) for dx in shifts]
    table = _channels_last(_centred_unit(r))
    tn = _channels_last(_centred_unit(t)).unsqueeze(-2)  # (B, h, w, 1, C)
    # Row by row (four columns each), so that at most a quarter of the 16 gathered vectors is held at once.
    dots = torch.stack([(_gather(table, torch.stack([raster.row_starts(y0 + dy) + x for x in columns], dim=-1).long())
                         * tn).sum(dim=-1) for dy in shifts], dim=-2)  # (B, h, w, 4, 4): [row y0-1..y0+2, column]
    across = dots[..., :3] * (1.0 - wx.unsqueeze(-1)) + dots[..., 1:] * wx.unsqueeze(-1)  # (B, h, w, 4, 3)
    scores = across[..., :3, :] * (1.0 - wy.unsqueeze(-1)) + across[..., 1:, :] * wy.unsqueeze(-1)  # [.., dy, dx]
    weights = torch.softmax(scores.flatten(-2) / temperature, dim=-1).unflatten(-1, (3, 3))
    # The soft-argmax of the candidates grid + (dx, dy) pixels is the grid plus the expected shift.
    shift_x = weights[..., 2].sum(dim=-1) - weights[..., 0].sum(dim=-1)
    shift_y = weights[..., 2, :].sum(dim=-1) - weights[..., 0, :].sum(dim=-1)
    refined = grid + torch.stack([shift_x * (2.0 / raster.width), shift_y * (2.0 / raster.height)], dim=-1)
    return refined.permute(0, 3, 1, 2)


class Correspondence(nn.Module):
    """Build (L, warped ab, 10 similarity maps) for (target, reference) pairs.

    Inputs, all float32:
      l: (B, 1, H, W) target L/100.
      tf1..tf5, rf1..rf5: target and reference VGG features at strides 1, 2, 4, 8, 16.
      ref_ab: (B, 2, Hr, Wr) reference ab/128, Hr and Wr multiples of 16 (any aspect ratio).
    Output: (B, 13, H, W): L/100, warped ab/128 (the reference's ab sampled where the refined flow points),
    5 target→reference and 5 reference→target (round-trip) cosine similarity maps in [-1, 1], fine to coarse.
    ``match`` also gives the *matched colour* (B, 2, H, W): the attention-weighted mean of the reference's ab
    over its 8×8 cells, upsampled bilinearly. Where a target cell matches far-apart reference cells (sky on both
    sides of a tower), the soft-argmax position lies on neither, and a flow interpolated between two matches
    samples the colours in between: the warped ab has swirls of colour from unrelated places, the matched colour
    does not. The pipeline gives it to the U-Net in place of the warped ab for a reference chosen by hand.
    """

    def __init__(self, temperature: float = TEMPERATURE, matched: bool = False) -> None:
        super().__init__()
        self.temperature = temperature
        self.matched = matched  # ``forward`` gives the matched colour in place of the warped ab (training)

    def flows(self, tf: list[torch.Tensor], rf: list[torch.Tensor],
              ref_ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Soft-argmax flows at stride 8, target→reference (B, 2, ht, wt) and reference→target (B, 2, hr, wr),
        and the matched colour (B, 2, ht, wt): the reference's stride-8 ab weighted by the same attention."""
        dt = _descriptor(tf[2], tf[3], tf[4])
        dr = _descriptor(rf[2], rf[3], rf[4])
        b, c, ht, wt = dt.shape
        hr, wr = dr.shape[-2:]
        sim = torch.bmm(dt.flatten(2).transpose(1, 2), dr.flatten(2)) / self.temperature  # (B, Nt, Nr)
        attention = torch.softmax(sim, dim=2)
        to_ref = attention @ _grid(hr, wr, dt)  # (B, Nt, 2)
        to_tgt = torch.softmax(sim, dim=1).transpose(1, 2) @ _grid(ht, wt, dt)  # (B, Nr, 2)
        cells = F.avg_pool2d(_resize(ref_ab, (hr * 8, wr * 8)), 8)  # the reference's mean ab per stride-8 cell
        colour = attention @ cells.flatten(2).transpose(1, 2)  # (B, Nt, 2)
        flow_tr = to_ref.transpose(1, 2).reshape(b, 2, ht, wt)
        flow_rt = to_tgt.transpose(1, 2).reshape(b, 2, hr, wr)
        return flow_tr, flow_rt, colour.transpose(1, 2).reshape(b, 2, ht, wt)

    def match(
        self,
        l: torch.Tensor,
        tf1: torch.Tensor, tf2: torch.Tensor, tf3: torch.Tensor, tf4: torch.Tensor, tf5: torch.Tensor,
        rf1: torch.Tensor, rf2: torch.Tensor, rf3: torch.Tensor, rf4: torch.Tensor, rf5: torch.Tensor,
        ref_ab: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The U-Net's input (B, 13, H, W) and the matched colour (B, 2, H, W), ab/128."""
        tf = [tf1, tf2, tf3, tf4, tf5]
        rf = [rf1, rf2, rf3, rf4, rf5]
        flow_tr, flow_rt, colour = self.flows(tf, rf, ref_ab)
        # Carry the stride-8 match to the finer layers, refining it locally at strides 4 and 2.
        fine_4 = _refine(flow_tr, tf[2], rf[2], self.temperature)
        fine_2 = _refine(fine_4, tf[1], rf[1], self.temperature)
        level_flows = [fine_2, fine_2, fine_4, flow_tr, flow_tr]
        size = l.shape[-2:]
        forward_maps, reverse_maps = [], []
        for t, r, flow in zip(tf, rf, level_flows):
            # One lookup gives the matched reference vector and where that point maps back to in the
            # target (the bidirectional check).
            found = _sample(_channels_last(r, _resize(flow_rt, r.shape[-2:])),
                            _Raster(r).taps(_resize_field(flow, t.shape[-2:])))
            matched, back = found[..., :-2], found[..., -2:]
            target = _channels_last(t)
            forward_maps.append(_cosine(target, matched))
            reverse_maps.append(_cosine(matched, _sample(target, _Raster(t).taps(back))))
        maps = [_resize(m.permute(0, 3, 1, 2), size) for m in forward_maps + reverse_maps]
        smoothed_ab = F.avg_pool2d(ref_ab, 3, stride=1, padding=1, count_include_pad=False)
        warped_ab = _sample(_channels_last(smoothed_ab), _Raster(smoothed_ab).taps(_resize_field(fine_2, size)))
        warped_ab = warped_ab.permute(0, 3, 1, 2)
        return torch.cat([l, warped_ab, *maps], dim=1), _resize(colour, size)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The U-Net's input (B, 13, H, W): with the warped ab, or with ``matched`` the matched colour."""
        x13, colour = self.match(*inputs)
        return torch.cat([x13[:, :1], colour, x13[:, 3:]], dim=1) if self.matched else x13


class MatchingCorrespondence(Correspondence):
    """The exported graph: the U-Net's input and the matched colour (outputs ``x13`` and ``matched_ab``)."""

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.match(*inputs)
