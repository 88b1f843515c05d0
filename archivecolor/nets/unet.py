"""The colorization U-Net: 13 input channels (L, warped ab, 10 similarity maps) to ab."""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class ColorUNet(nn.Module):
    """Encoder 13→w→2w→4w→8w (w=64 by default) with four downsamplings and a symmetric decoder.

    Input: (B, 13, H, W) float32 with H, W multiples of 16.
    Outputs: ab (B, 2, H, W), ab/128 in (-1, 1), and trust (B, 1, H, W) in (0, 1).
    The head predicts its own colour and a per-pixel trust in the warped reference colour, and
    blends the two: the network learns where the reference can be believed.
    """

    def __init__(self, in_channels: int = 13, width: int = 64) -> None:
        super().__init__()
        w = width
        chans = (w, 2 * w, 4 * w, 8 * w)
        self.width = width
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.enc.append(_block(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = _block(chans[-1], chans[-1])
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        cin = chans[-1]
        for c in reversed(chans):
            self.up.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.dec.append(_block(cin + c, c))
            cin = c
        self.head = nn.Conv2d(chans[0], 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        h = x
        for block in self.enc:
            h = block(h)
            skips.append(h)
            h = self.pool(h)
        h = self.bottleneck(h)
        for up, block, skip in zip(self.up, self.dec, reversed(skips)):
            h = block(torch.cat([up(h), skip], dim=1))
        out = self.head(h)
        trust = torch.sigmoid(out[:, 2:3])
        ab = trust * x[:, 1:3] + (1.0 - trust) * torch.tanh(out[:, 0:2])
        return ab, trust
