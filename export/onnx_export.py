"""Export the torch modules to ONNX graphs with dynamic batch and spatial axes (opset 17).

The VGG graphs ship as weightless templates: their weight initializers keep name, shape and type
but no data, and ``archivecolor models pull`` fills them from whichever weight source is
available, with no torch at inference time. The U-Net ships with float16 weights to stay small.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from archivecolor.models.layout import CHROMA_GAIN_PROP, SECOND_AB
from archivecolor.models.registry import ASSET_DIR, WEIGHT_MARK
from archivecolor.models.weights import sha256_bytes
from archivecolor.nets.correspondence import Correspondence
from archivecolor.nets.unet import SEMANTIC_FEATURES, ColorUNet
from archivecolor.nets.vgg import FEATURE_CHANNELS, VGGFeatures

OPSET = 17
FEATURE_OUTPUTS = ["f1", "f2", "f3", "f4", "f5", "embedding_gem", "embedding_avg"]


def _to_model(module: torch.nn.Module, args: tuple, inputs: list[str], outputs: list[str], axes: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def export_features(vgg: VGGFeatures) -> onnx.ModelProto:
    axes = {"l": {0: "batch", 2: "height", 3: "width"}}
    for i, name in enumerate(FEATURE_OUTPUTS):
        axes[name] = {0: "batch"} if name.startswith("embedding") else {0: "batch", 2: f"h{i + 1}", 3: f"w{i + 1}"}
    return _to_model(vgg.eval(), (torch.rand(1, 1, 64, 96),), ["l"], FEATURE_OUTPUTS, axes)


def export_correspondence() -> onnx.ModelProto:
    def feats(h: int, w: int) -> list[torch.Tensor]:
        return [torch.rand(1, c, h >> i, w >> i) for i, c in enumerate(FEATURE_CHANNELS)]

    args = (torch.rand(1, 1, 64, 96), *feats(64, 96), *feats(48, 64), torch.rand(1, 2, 48, 64))
    inputs = ["l"] + [f"tf{i}" for i in range(1, 6)] + [f"rf{i}" for i in range(1, 6)] + ["ref_ab"]
    axes = {"l": {0: "batch", 2: "height", 3: "width"}, "ref_ab": {0: "batch", 2: "ref_height", 3: "ref_width"},
            "x13": {0: "batch", 2: "height", 3: "width"}}
    for i in range(1, 6):
        axes[f"tf{i}"] = {0: "batch", 2: f"th{i}", 3: f"tw{i}"}
        axes[f"rf{i}"] = {0: "batch", 2: f"rh{i}", 3: f"rw{i}"}
    return _to_model(Correspondence().eval(), args, inputs, ["x13"], axes)


def export_unet(unet: ColorUNet) -> onnx.ModelProto:
    """Inputs ``x13``; for a U-Net with the semantic prior, the target features ``tf3``..``tf5``; for one with a
    second opinion, ``second_ab``."""
    axes = {n: {0: "batch", 2: "height", 3: "width"} for n in ("x13", "ab", "trust")}
    args = [torch.rand(1, 13, 64, 96)]
    if unet.semantic:
        for name, channels, stride in SEMANTIC_FEATURES:
            args.append(torch.rand(1, channels, 64 // stride, 96 // stride))
            axes[name] = {0: "batch", 2: f"{name}_height", 3: f"{name}_width"}
    if unet.second_opinion:
        args.append(torch.rand(1, 2, 64, 96))
        axes[SECOND_AB] = {0: "batch", 2: "height", 3: "width"}
    model = _to_model(unet.eval(), tuple(args), unet.input_names(), ["ab", "trust"], axes)
    onnx.helper.set_model_props(model, {CHROMA_GAIN_PROP: repr(unet.chroma_gain)})
    return model


def strip_weights(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """Drop the data of the named initializers, marking them for the weight filler."""
    stripped = 0
    for init in model.graph.initializer:
        if init.name in names:
            name, dims, dtype = init.name, list(init.dims), init.data_type
            init.Clear()
            init.name = name
            init.dims.extend(dims)
            init.data_type = dtype
            init.doc_string = WEIGHT_MARK
            stripped += 1
    if stripped != len(names):
        raise RuntimeError(f"expected {len(names)} weight initializers, found {stripped}")
    return model


def to_float16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store float32 initializers as float16 (marked), to be widened back to float32 on install."""
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(init).astype(np.float16)
            name = init.name
            init.CopyFrom(numpy_helper.from_array(arr, name))
            init.doc_string = "archivecolor:fp16"
    return model


def write_asset(model: onnx.ModelProto, name: str, kind: str, asset_dir: Path = ASSET_DIR, extra: dict | None = None) -> dict:
    """Save ``model`` into the package's assets and return its registry entry."""
    data = model.SerializeToString()
    path = asset_dir / f"{name}.onnx"
    path.write_bytes(data)
    entry = {
        "name": name, "kind": kind, "file": path.name, "sha256": sha256_bytes(data), "size": len(data),
        "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
    }
    entry.update(extra or {})
    return entry


GRAPHS = ("features", "correspondence", "unet")


def load_unet(checkpoint: Path, chroma_gain: float = 1.0) -> tuple[ColorUNet, dict]:
    """The U-Net of a training checkpoint (eval mode), its output ab scaled by ``chroma_gain``, and the checkpoint."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = ckpt["config"]
    unet = ColorUNet(width=config["width"], semantic=config.get("semantic", False),
                     second_opinion=config.get("second_opinion", False), chroma_gain=chroma_gain)
    unet.load_state_dict(ckpt["model"], strict=True)
    return unet.eval(), ckpt


def export_all(unet_checkpoint: Path | None, asset_dir: Path = ASSET_DIR, graphs: tuple[str, ...] = GRAPHS,
               chroma_gain: float = 1.0) -> dict:
    """Export the named ``graphs`` into ``asset_dir`` and update its ``registry.json``; the U-Net only
    with a ``unet_checkpoint``, its output ab scaled by ``chroma_gain``.

    Graphs left out stay byte for byte: leaving out ``features`` keeps catalogues built with it valid.
    """
    unknown = set(graphs) - set(GRAPHS)
    if unknown:
        raise ValueError(f"unknown graphs {sorted(unknown)}; choose from {', '.join(GRAPHS)}")
    registry_path = asset_dir / "registry.json"
    registry = json.loads(registry_path.read_text()) if registry_path.exists() else {"models": {}}
    # VGG-16 only: the U-Net reads VGG-16 features (and no offline VGG-19 weights exist to train one).
    registry["models"].pop("vgg19_features", None)
    (asset_dir / "vgg19_features.onnx").unlink(missing_ok=True)
    if "features" in graphs:
        vgg = VGGFeatures("vgg16")
        with torch.no_grad():  # distinct values, so the exporter cannot merge equal initializers
            for p in vgg.parameters():
                p.normal_()
        model = strip_weights(export_features(vgg), set(vgg.state_dict()))
        registry["models"]["vgg16_features"] = write_asset(
            model, "vgg16_features", "features", asset_dir, {"backbone": "vgg16", "template": True})
    if "correspondence" in graphs:
        registry["models"]["correspondence"] = write_asset(export_correspondence(), "correspondence", "correspondence",
                                                           asset_dir)
    if "unet" in graphs and unet_checkpoint is not None:
        unet, ckpt = load_unet(unet_checkpoint, chroma_gain)
        model = to_float16_storage(export_unet(unet))
        info = {"width": unet.width, "epochs": ckpt["epoch"], "config": ckpt["config"]["name"],
                "backbone": ckpt.get("backbone", "vgg16"), "float16_storage": True, "semantic": unet.semantic,
                "second_opinion": unet.second_opinion, "chroma_gain": chroma_gain}
        registry["models"]["unet"] = write_asset(model, "unet", "colorizer", asset_dir, info)
    registry_path.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    return registry
