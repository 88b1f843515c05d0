"""Grad-CAM of the U-Net: which regions of the input drove the predicted chroma (torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from archivecolor.errors import UsageError
from archivecolor.models.layout import MEMBER


class UNetGradCAM:
    """Grad-CAM of the shipped U-Net: which regions of the input drove the predicted chroma.

    The ONNX graph has its BatchNorms folded into the convolutions, so the torch ColorUNet is rebuilt
    with biased convolutions and no BatchNorm, and the folded weights are loaded in graph order.
    The score is the mean predicted chroma; the map is taken at the bottleneck. Of an ensemble, the map is
    the first member's (the network that colours the first reference's turn).
    """

    def __init__(self, unet_path: Path) -> None:
        import onnx
        import torch
        from onnx import numpy_helper
        from torch import nn

        from archivecolor.models.layout import CHROMA_GAIN_PROP, SECOND_AB
        from archivecolor.models.store import widen_float16
        from archivecolor.nets.unet import SEMANTIC_FEATURES, ColorUNet

        model = onnx.load_from_string(widen_float16(Path(unet_path).read_bytes()))
        graph = model.graph
        chroma_gain = float({p.key: p.value for p in model.metadata_props}.get(CHROMA_GAIN_PROP, 1.0))
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        inputs = [i.name for i in graph.input]
        member = "m0/" if MEMBER in inputs else ""  # an ensemble's members are prefixed m0/, m1/, ...
        convs = [n for n in graph.node if n.op_type == "Conv" and n.input[1].startswith(member)]
        semantic = SEMANTIC_FEATURES[0][0] in inputs
        # The first convolution is the first projection (semantic prior) or the first encoder block.
        width = int(inits[convs[0].input[1]].shape[0]) // (4 if semantic else 1)
        net = ColorUNet(width=width, semantic=semantic, second_opinion=SECOND_AB in inputs, chroma_gain=chroma_gain)
        modules = []
        for name, module in list(net.named_modules()):
            if isinstance(module, nn.BatchNorm2d):
                parent, attr = name.rsplit(".", 1)
                net.get_submodule(parent)[int(attr)] = nn.Identity()
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                modules.append(module)
        if len(modules) != len(convs):
            raise UsageError(f"{unet_path}: {len(convs)} convolutions, the U-Net has {len(modules)}")
        with torch.no_grad():
            for module, node in zip(modules, convs):
                module.weight = nn.Parameter(torch.from_numpy(inits[node.input[1]].copy()))
                module.bias = nn.Parameter(torch.from_numpy(inits[node.input[2]].copy()))
        self.torch = torch
        self.net = net.eval()

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
