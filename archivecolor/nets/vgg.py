"""The VGG feature extractor that reads the grayscale L channel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from archivecolor.models.weights import WeightSource, load_backbone_weights
from archivecolor.nets.colour import l_to_gray_srgb

# Index in torchvision's `features` of the ReLU after each matching layer (last conv of each block).
MATCH_TAPS = {"vgg16": (3, 8, 15, 22, 29)}
CONV4_2_TAP = {"vgg16": 20}  # the ReLU after conv4_2
FEATURE_CHANNELS = (64, 128, 256, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GEM_P = 3.0


class VGGFeatures(nn.Module):
    """VGG on gray input.

    Input ``l``: (B, 1, H, W) float32, L/100 in [0, 1], H and W multiples of 16.
    Outputs: five matching feature maps (after ReLU) at strides 1, 2, 4, 8, 16, then two
    L2-normalised retrieval embeddings of shape (B, 512): GeM (p=3) of the last layer, and the
    seed's average-pooled conv4_2.
    """

    def __init__(self, backbone: str = "vgg16") -> None:
        super().__init__()
        if backbone not in MATCH_TAPS:
            raise ValueError(f"unknown backbone {backbone!r}")
        self.backbone = backbone
        full = getattr(models, backbone)(weights=None).features
        last = MATCH_TAPS[backbone][-1]
        self.features = nn.Sequential(*list(full.children())[: last + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)

    @classmethod
    def pretrained(cls, weights: Path | None = None, download_dir: Path | None = None) -> tuple[VGGFeatures, WeightSource]:
        """VGG-16 with its ImageNet weights, in eval mode, from the sources ``load_backbone_weights`` tries, and
        which source gave them."""
        state, source = load_backbone_weights("vgg16", weights, download_dir=download_dir)
        vgg = cls("vgg16")
        vgg.load_numpy(state)
        return vgg.eval(), source

    def load_numpy(self, state: dict[str, np.ndarray]) -> None:
        """Load a torchvision-named numpy state dict (all keys must match)."""
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
        own = {k for k in self.state_dict()}
        tensors = {k: v for k, v in tensors.items() if k in own}
        self.load_state_dict(tensors, strict=True)

    def normalise(self, l: torch.Tensor) -> torch.Tensor:
        gray = l_to_gray_srgb(l)
        return (gray.expand(-1, 3, -1, -1) - self.mean) / self.std

    def forward(self, l: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.normalise(l)
        taps = MATCH_TAPS[self.backbone]
        feats: list[torch.Tensor] = []
        conv4_2 = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == CONV4_2_TAP[self.backbone]:
                conv4_2 = x
            if i in taps:
                feats.append(x)
        assert conv4_2 is not None
        gem = feats[-1].clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
        avg = conv4_2.mean(dim=(2, 3))
        return (*feats, F.normalize(gem, dim=1), F.normalize(avg, dim=1))
