"""The colorization U-Net: L, warped ab and 10 similarity maps, plus the target's own VGG features and a second
reference's warped ab, to ab."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from archivecolor.models.layout import INPUT_CHANNELS, MEMBER, SECOND_AB, SEMANTIC_INPUTS, WARPED_AB

# The target's VGG features that the U-Net reads as a semantic prior: (name, channels, stride).
SEMANTIC_FEATURES = tuple(zip(SEMANTIC_INPUTS, (256, 512, 512), (4, 8, 16)))
SECOND_OPINION_CHANNELS = 3  # its a, b and how far it is from the first reference's warped ab
# The first convolution's weights for those channels start at zero on a trained network. Scaling the channels
# up lets Adam's steps of about the learning rate move them as fast as a fresh layer's: unscaled, they
# reached a fifteenth of the other weights' size in two CPU epochs.
SECOND_OPINION_GAIN = 10.0


def disagreement(warped_ab: torch.Tensor, second_ab: torch.Tensor) -> torch.Tensor:
    """Per pixel, the ab distance (B, 1, H, W) between two references' warped colours (ab/128)."""
    return (warped_ab - second_ab).pow(2).sum(dim=1, keepdim=True).add(1e-8).sqrt()


def _block(cin: int, cout: int) -> nn.Sequential:
    # Reflect padding: zero padding reads as a dark frame and leaves coloured fringes along the borders.
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def _projection(cin: int, cout: int) -> nn.Sequential:
    # The BN after the 1x1 convolution brings VGG's wide-ranging activations to the encoder's scale,
    # and folds into the convolution on export like every other BN here.
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ColorUNet(nn.Module):
    """Encoder 13→w→2w→4w→8w (w=64 by default) with four downsamplings and a symmetric decoder.

    Inputs: ``x13`` (B, 13, H, W) float32 with H, W multiples of 16; with ``semantic`` (the default),
    also the target's VGG activations relu3_3 (B, 256, H/4, W/4), relu4_3 (B, 512, H/8, W/8) and
    relu5_3 (B, 512, H/16, W/16), projected by 1×1 convolutions and added to the encoder at the
    matching scales, so the network knows what an object is where the reference does not match.
    With ``second_opinion``, a last input ``second_ab`` (B, 2, H, W): the warped ab of a second reference (the
    first's own where there is one reference). Two retrieved references that warp the same colour onto a pixel
    are likely right there, and ones that disagree likely wrong: a far better sign of a wrong warped colour than
    the similarity maps, which cannot tell a right match to an object of another colour. The first
    convolution reads it with the distance between the two warps (16 channels instead of 13).
    Outputs: ab (B, 2, H, W), ab/128 in (-1, 1), and trust (B, 1, H, W) in (0, 1).
    The head predicts its own colour and a per-pixel trust in the warped reference colour, and
    blends the two: the network learns where the reference can be believed.

    ``chroma_gain`` scales the output ab (training leaves it at 1; the export sets it). An L2-trained network
    gives the mean of the colours a thing may have, duller than any of them; a gain chosen on validation buys
    colour back at a known cost in PSNR, and keeps neutral pixels neutral.
    """

    def __init__(self, in_channels: int = INPUT_CHANNELS, width: int = 64, semantic: bool = True,
                 second_opinion: bool = False, chroma_gain: float = 1.0) -> None:
        super().__init__()
        self.chroma_gain = chroma_gain
        w = width
        chans = (w, 2 * w, 4 * w, 8 * w)
        self.width = width
        self.semantic = semantic
        self.second_opinion = second_opinion
        if semantic:
            # Registered first because forward() runs them first: module order is graph order (Grad-CAM relies on it).
            # Added to encoder level 2 (stride 4), level 3 (stride 8) and the bottleneck input (stride 16).
            self.proj = nn.ModuleList(_projection(c, out) for (_, c, _), out in zip(SEMANTIC_FEATURES, chans[2:] + chans[3:]))
        self.enc = nn.ModuleList()
        cin = in_channels + (SECOND_OPINION_CHANNELS if second_opinion else 0)
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

    def input_names(self) -> list[str]:
        """What forward() reads, in order (the ONNX graph's input names)."""
        semantic = [name for name, _, _ in SEMANTIC_FEATURES] if self.semantic else []
        return ["x13", *semantic, *([SECOND_AB] if self.second_opinion else [])]

    def forward(self, x: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(inputs) != len(self.input_names()) - 1:
            raise ValueError(f"this U-Net reads {self.input_names()}")
        semantic = inputs[: len(SEMANTIC_FEATURES)] if self.semantic else ()
        prior = [proj(f) for proj, f in zip(self.proj, semantic)] if self.semantic else []
        skips = []
        h = x
        if self.second_opinion:
            second = inputs[-1]
            opinion = torch.cat([second, disagreement(x[:, WARPED_AB], second)], dim=1)
            h = torch.cat([x, SECOND_OPINION_GAIN * opinion], dim=1)
        for level, block in enumerate(self.enc):
            h = block(h)
            if prior and level >= 2:
                h = h + prior[level - 2]
            skips.append(h)
            h = self.pool(h)
        if prior:
            h = h + prior[2]
        h = self.bottleneck(h)
        for up, block, skip in zip(self.up, self.dec, reversed(skips)):
            h = block(torch.cat([up(h), skip], dim=1))
        out = self.head(h)
        trust = torch.sigmoid(out[:, 2:3])
        ab = trust * x[:, WARPED_AB] + (1.0 - trust) * torch.tanh(out[:, 0:2])
        if self.chroma_gain != 1.0:
            ab = self.chroma_gain * ab
        return ab, trust


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A training checkpoint, read without running any code from the file (tensors and plain data only)."""
    return torch.load(path, map_location=device, weights_only=True)


def unet_from_graph(path: Path, member: int | None = 0) -> ColorUNet:
    """The network of an exported U-Net graph (of an ensemble, network ``member``; None refuses an ensemble), its
    chroma gain included.

    The export folds each BatchNorm into the convolution before it, so each convolution takes the folded weights
    (in graph order, which is module order) and each BatchNorm becomes the folded bias: scale 1, statistics 0 and
    1 − eps. In eval mode the network computes what the graph does; to train it, keep the BatchNorms in eval mode
    (their statistics are gone).
    """
    import onnx
    from onnx import numpy_helper

    from archivecolor.models.store import chroma_gain_of, widen_float16

    try:
        model = onnx.load_from_string(widen_float16(Path(path).read_bytes()))
    except Exception as exc:  # protobuf's decode errors have no common public type
        raise ValueError(f"{path}: not an ONNX graph ({exc}); pass a U-Net exported with `python -m export`") from exc
    graph = model.graph
    inputs = [i.name for i in graph.input]
    if member is None and MEMBER in inputs:
        raise ValueError(f"{path}: an ensemble of several networks; pass one network's graph")
    prefix = f"m{member}/" if MEMBER in inputs else ""  # an ensemble's networks are prefixed m0/, m1/, ...
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv" and n.input[1].startswith(prefix)]
    if not convs:
        raise ValueError(f"{path}: no convolutions{f' of network {member}' if prefix else ''}; pass an exported U-Net")
    semantic = SEMANTIC_FEATURES[0][0] in inputs
    # The first convolution is the first projection (semantic prior, 4w channels) or the first encoder block.
    width = int(inits[convs[0].input[1]].shape[0]) // (4 if semantic else 1)
    net = ColorUNet(width=width, semantic=semantic, second_opinion=SECOND_AB in inputs,
                    chroma_gain=chroma_gain_of(model))
    batchnorm_after = {}
    for seq in net.modules():
        if isinstance(seq, nn.Sequential):
            for conv, after in zip(seq, list(seq)[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
                    batchnorm_after[conv] = after
    modules = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    if len(modules) != len(convs):
        raise ValueError(f"{path}: {len(convs)} convolutions, a U-Net of width {width} has {len(modules)}")
    with torch.no_grad():
        for conv, node in zip(modules, convs):
            weight, bias = (torch.from_numpy(inits[name].copy()) for name in node.input[1:3])
            if conv.weight.shape != weight.shape:
                raise ValueError(f"{path}: convolution {node.name} has weights {tuple(weight.shape)}, the U-Net's "
                                 f"{tuple(conv.weight.shape)}")
            conv.weight.copy_(weight)
            bn = batchnorm_after.get(conv)
            if bn is None:
                conv.bias.copy_(bias)
            else:
                bn.weight.fill_(1.0)
                bn.bias.copy_(bias)
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)
    return net.eval()
