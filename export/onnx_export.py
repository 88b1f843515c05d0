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

from archivecolor.models.layout import CHROMA_GAIN_PROP, MATCHED_AB, MEMBER, MEMBERS_PROP, SECOND_AB
from archivecolor.models.registry import ASSET_DIR, WEIGHT_MARK
from archivecolor.models.store import chroma_gain_of
from archivecolor.models.weights import sha256_bytes
from archivecolor.nets.correspondence import MatchingCorrespondence
from archivecolor.nets.unet import SEMANTIC_FEATURES, ColorUNet, load_checkpoint
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
            "x13": {0: "batch", 2: "height", 3: "width"}, MATCHED_AB: {0: "batch", 2: "height", 3: "width"}}
    for i in range(1, 6):
        axes[f"tf{i}"] = {0: "batch", 2: f"th{i}", 3: f"tw{i}"}
        axes[f"rf{i}"] = {0: "batch", 2: f"rh{i}", 3: f"rw{i}"}
    return _to_model(MatchingCorrespondence().eval(), args, inputs, ["x13", MATCHED_AB], axes)


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


def compose_unets(members: list[onnx.ModelProto], chroma_gain: float) -> onnx.ModelProto:
    """One graph of several U-Nets trained apart: input ``member`` (B,) says which network colours each row,
    and each network's ab is rescaled from its own chroma gain to ``chroma_gain``.

    The pipeline gives each of a scan's reference turns to another member, so the ensemble costs no more
    U-Net passes than one network; averaging the turns then also averages the networks' errors. Every batch
    must give each member a row (the pipeline does): ONNX Runtime's CPU layout for convolutions cannot reshape
    an empty batch.
    """
    from onnx import helper

    names = [[i.name for i in m.graph.input] for m in members]
    if any(n != names[0] for n in names) or MEMBER in names[0]:
        raise ValueError(f"the members must be single U-Nets with the same inputs, not {names}")
    i64 = onnx.TensorProto.INT64
    consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), name) for name, v in
              (("ens/flat", [-1]), ("ens/last", [-1]), ("ens/zero", [0]), ("ens/one", [1]), ("ens/two", [2]),
               ("ens/four", [4]), ("ens/ab_channels", [2]), ("ens/trust_channels", [1]))]
    nodes = [  # zero outputs of the batch's shape, scattered into below
        helper.make_node("Shape", ["x13"], ["ens/shape"]),
        helper.make_node("Slice", ["ens/shape", "ens/zero", "ens/one"], ["ens/batch"]),
        helper.make_node("Slice", ["ens/shape", "ens/two", "ens/four"], ["ens/spatial"]),
    ]
    for out, channels in (("ab", "ens/ab_channels"), ("trust", "ens/trust_channels")):
        nodes += [helper.make_node("Concat", ["ens/batch", channels, "ens/spatial"], [f"ens/{out}_shape"], axis=0),
                  helper.make_node("ConstantOfShape", [f"ens/{out}_shape"], [f"ens/{out}_0"])]
    initializers = list(consts)
    for k, member in enumerate(members):
        prefixed = onnx.compose.add_prefix(member, f"m{k}/")
        initializers += [numpy_helper.from_array(np.array(k, dtype=np.int64), f"ens/k{k}"),
                         *prefixed.graph.initializer]
        # a Constant node, not an initializer: float16 storage would round the gain
        gain = numpy_helper.from_array(np.array(chroma_gain / chroma_gain_of(member), dtype=np.float32))
        nodes += [helper.make_node("Constant", [], [f"ens/gain{k}"], value=gain),
                  helper.make_node("Equal", [MEMBER, f"ens/k{k}"], [f"ens/mask{k}"]),
                  helper.make_node("NonZero", [f"ens/mask{k}"], [f"ens/nz{k}"]),
                  helper.make_node("Reshape", [f"ens/nz{k}", "ens/flat"], [f"ens/rows{k}"]),
                  helper.make_node("Unsqueeze", [f"ens/rows{k}", "ens/last"], [f"ens/index{k}"])]
        nodes += [helper.make_node("Gather", [name, f"ens/rows{k}"], [f"m{k}/{name}"], axis=0) for name in names[0]]
        nodes += list(prefixed.graph.node)
        nodes += [helper.make_node("Mul", [f"m{k}/ab", f"ens/gain{k}"], [f"ens/ab_m{k}"]),
                  helper.make_node("ScatterND", [f"ens/ab_{k}", f"ens/index{k}", f"ens/ab_m{k}"],
                                   ["ab" if k == len(members) - 1 else f"ens/ab_{k + 1}"]),
                  helper.make_node("ScatterND", [f"ens/trust_{k}", f"ens/index{k}", f"m{k}/trust"],
                                   ["trust" if k == len(members) - 1 else f"ens/trust_{k + 1}"])]
    first = members[0].graph
    member_input = helper.make_tensor_value_info(MEMBER, i64, ["batch"])
    graph = helper.make_graph(nodes, "unet_ensemble", [*first.input, member_input], list(first.output), initializers)
    model = helper.make_model(graph, opset_imports=list(members[0].opset_import), ir_version=members[0].ir_version)
    helper.set_model_props(model, {CHROMA_GAIN_PROP: repr(chroma_gain), MEMBERS_PROP: str(len(members))})
    onnx.checker.check_model(model)
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
    ckpt = load_checkpoint(checkpoint)
    config = ckpt["config"]
    unet = ColorUNet(width=config["width"], semantic=config.get("semantic", False),
                     second_opinion=config.get("second_opinion", False), chroma_gain=chroma_gain)
    unet.load_state_dict(ckpt["model"], strict=True)
    return unet.eval(), ckpt


def member_graph(path: Path, data: bytes, inputs: list[str]) -> onnx.ModelProto:
    """An ensemble member's graph, checked to be a single U-Net that reads what the checkpoint's network reads."""
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's decode errors have no common public type
        raise ValueError(f"{path}: not an ONNX graph ({exc}); pass a U-Net exported with `python -m export`") from exc
    names = [i.name for i in model.graph.input]
    if names != inputs:
        raise ValueError(f"{path}: a U-Net reading {names}, the checkpoint's network reads {inputs}; an ensemble's "
                         f"members must read the same inputs, and an ensemble cannot be a member")
    return model


def export_all(unet_checkpoint: Path | None, asset_dir: Path = ASSET_DIR, graphs: tuple[str, ...] = GRAPHS,
               chroma_gain: float = 1.0, ensemble_with: tuple[Path, ...] = ()) -> dict:
    """Export the named ``graphs`` into ``asset_dir`` and update its ``registry.json``; the U-Net only
    with a ``unet_checkpoint``, its output ab scaled by ``chroma_gain``. ``ensemble_with``: exported U-Net
    graphs (``.onnx``) that join the checkpoint's network in an ensemble (``compose_unets``), in turn order:
    they colour the first references' turns, the checkpoint's network the last.

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
        # read before writing: a member may be the packaged U-Net that this export replaces
        members = [(path, path.read_bytes()) for path in ensemble_with]
        unet, ckpt = load_unet(unet_checkpoint, 1.0 if members else chroma_gain)
        model = export_unet(unet)
        info = {"width": unet.width, "epochs": ckpt["epoch"], "config": ckpt["config"]["name"],
                "backbone": ckpt.get("backbone", "vgg16"), "float16_storage": True, "semantic": unet.semantic,
                "second_opinion": unet.second_opinion, "chroma_gain": chroma_gain}
        if members:
            graphs_in = [member_graph(path, data, unet.input_names()) for path, data in members]
            model = compose_unets([*graphs_in, model], chroma_gain)
            info["members"] = [{"graph": path.name, "sha256": sha256_bytes(data), "chroma_gain": chroma_gain_of(g)}
                               for (path, data), g in zip(members, graphs_in)]
            info["members"].append({"checkpoint": unet_checkpoint.name, "config": info["config"],
                                    "epochs": info["epochs"]})
        registry["models"]["unet"] = write_asset(to_float16_storage(model), "unet", "colorizer", asset_dir, info)
    registry_path.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n")
    return registry
