"""Grad-CAM of the U-Net: which regions of the input drove the predicted chroma (torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from archivecolor.errors import UsageError
from archivecolor.models.layout import MEMBER


class UNetGradCAM:
    """Grad-CAM of the shipped U-Net: which regions of the input drove the predicted chroma.

    The torch network is rebuilt from the graph (``unet_from_graph``: the folded BatchNorms become biases).
    The score is the mean predicted chroma; the map is taken at the bottleneck. Of an ensemble, the map is
    the first member's (the network that colours the first reference's turn).
    """

    def __init__(self, unet_path: Path) -> None:
        import torch

        from archivecolor.nets.unet import unet_from_graph

        try:
            self.net = unet_from_graph(unet_path)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        self.torch = torch

    def __call__(self, x13: np.ndarray, unet_inputs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """x13: (13, h, w) U-Net input; unet_inputs: its other inputs in graph order (``Prediction.unet_inputs``).
        Returns the (h, w) map in [0, 1]."""
        torch = self.torch
        store: dict = {}
        hook = self.net.bottleneck.register_forward_hook(lambda m, i, o: store.update(act=o))
        extra = [torch.from_numpy(f.astype(np.float32)) for name, f in (unet_inputs or {}).items() if name != MEMBER]
        try:
            ab, _ = self.net(torch.from_numpy(x13[None].astype(np.float32)), *extra)
            act = store["act"]
            (grad,) = torch.autograd.grad(ab.pow(2).sum(dim=1).sqrt().mean(), act)
        finally:
            hook.remove()
        cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=x13.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        cam = cam.detach().numpy()
        return cam / cam.max() if cam.max() > 0 else cam
