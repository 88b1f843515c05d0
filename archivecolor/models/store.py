"""The model store under ``$ARCHIVECOLOR_HOME/models``: installing graphs and verifying them.

``pull`` turns the packaged graphs into runnable files: VGG templates get their ImageNet weights,
the float16 U-Net is widened to float32. Every file's sha256 goes into ``manifest.json``, and
every session checks the file against it before loading.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from archivecolor.errors import ChecksumMismatch, ModelNotFound, UsageError
from archivecolor.imageio import atomic_write_bytes
from archivecolor.models.layout import CHROMA_GAIN_PROP
from archivecolor.models.registry import (
    DEFAULT_BACKBONE,
    FLOAT16_MARK,
    WEIGHT_MARK,
    ModelSpec,
    features_name,
    load_registry,
)
from archivecolor.models.weights import load_backbone_weights, sha256_bytes, sha256_file

MANIFEST = "manifest.json"


def archivecolor_home() -> Path:
    return Path(os.environ.get("ARCHIVECOLOR_HOME", Path.home() / ".cache" / "archivecolor"))


def downloads_dir(home: Path | None = None) -> Path:
    """Where downloaded weight archives are kept (and looked for, offline)."""
    return (home or archivecolor_home()) / "downloads"


def model_dir(home: Path | None = None) -> Path:
    return (home or archivecolor_home()) / "models"


@dataclass
class InstalledModel:
    name: str
    file: str
    sha256: str
    size: int
    source: dict


def read_manifest(home: Path | None = None) -> dict[str, InstalledModel]:
    path = model_dir(home) / MANIFEST
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_bytes())
        return {name: InstalledModel(**entry) for name, entry in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ModelNotFound(f"{path}: unreadable manifest ({type(exc).__name__}: {exc}); "
                            f"run `archivecolor models pull --force`") from exc


def write_manifest(entries: dict[str, InstalledModel], home: Path | None) -> None:
    data = json.dumps({k: asdict(v) for k, v in sorted(entries.items())}, indent=2) + "\n"
    atomic_write_bytes(model_dir(home) / MANIFEST, data.encode())


def verify_asset(spec: ModelSpec) -> bytes:
    """The packaged graph's bytes, after checking them against the registry's sha256."""
    if not spec.asset_path.exists():
        raise ModelNotFound(f"{spec.asset_path}: packaged model missing; reinstall archivecolor")
    data = spec.asset_path.read_bytes()
    digest = sha256_bytes(data)
    if digest != spec.sha256:
        raise ChecksumMismatch(f"{spec.asset_path}: sha256 {digest[:12]}… is not the registry's {spec.sha256[:12]}…; "
                               f"reinstall archivecolor")
    return data


def fill_weights(template: bytes, state: dict[str, np.ndarray]) -> bytes:
    """Fill a template's marked initializers from a torchvision-named state dict."""
    model = onnx.load_from_string(template)
    for init in model.graph.initializer:
        if init.doc_string != WEIGHT_MARK:
            continue
        if init.name not in state:
            raise ModelNotFound(f"weights lack {init.name}; pass weights for the right backbone")
        arr = np.ascontiguousarray(state[init.name], dtype=np.float32)
        if tuple(arr.shape) != tuple(init.dims):
            raise ModelNotFound(f"weights {init.name} have shape {arr.shape}, the graph needs {tuple(init.dims)}")
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return model.SerializeToString()


def chroma_gain_of(model: onnx.ModelProto) -> float:
    """The chroma gain a U-Net graph scales its output ab by (1 where it says none)."""
    return float({p.key: p.value for p in model.metadata_props}.get(CHROMA_GAIN_PROP, 1.0))


def widen_float16(data: bytes) -> bytes:
    """Convert float16-stored initializers back to float32, the type the graph computes in."""
    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        if init.doc_string == FLOAT16_MARK:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    return model.SerializeToString()


def install_file(name: str, data: bytes, source: dict, home: Path | None) -> InstalledModel:
    path = model_dir(home) / f"{name}.onnx"
    atomic_write_bytes(path, data)
    return InstalledModel(name, path.name, sha256_bytes(data), len(data), source)


def is_current(entry: InstalledModel | None, home: Path | None, wanted_source: dict) -> bool:
    if entry is None or any(entry.source.get(k) != v for k, v in wanted_source.items()):
        return False
    path = model_dir(home) / entry.file
    return path.exists() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256


def pull(
    home: Path | None = None,
    backbone: str = DEFAULT_BACKBONE,
    weights: Path | None = None,
    allow_download: bool = True,
    force: bool = False,
    progress=None,
) -> list[tuple[InstalledModel, bool]]:
    """Install the graphs for ``backbone`` into the store. Idempotent: unchanged files are kept.

    Returns (model, installed_now) pairs.
    """
    say = progress or (lambda message: None)
    registry = load_registry()
    if features_name(backbone) not in registry:
        raise UsageError(f"backbone {backbone!r}: this archivecolor's U-Net is trained on "
                         f"{', '.join(n.removesuffix('_features') for n in registry if n.endswith('_features'))} features only")
    manifest = {} if force else read_manifest(home)
    done: list[tuple[InstalledModel, bool]] = []
    home_dir = home or archivecolor_home()

    feat = registry[features_name(backbone)]
    template = verify_asset(feat)
    wanted = {"template_sha256": feat.sha256, "weights": str(weights) if weights else "auto"}
    if is_current(manifest.get(feat.name), home, wanted):
        done.append((manifest[feat.name], False))
    else:
        say(f"loading {backbone} ImageNet weights")
        state, origin = load_backbone_weights(backbone, weights, downloads_dir(home_dir), allow_download)
        entry = install_file(feat.name, fill_weights(template, state), wanted | {"weights_from": asdict(origin)}, home)
        manifest[feat.name] = entry
        done.append((entry, True))
    for name, transform in (("correspondence", None), ("unet", widen_float16)):
        spec = registry.get(name)
        if spec is None:
            raise ModelNotFound(f"the package registry has no {name} graph; reinstall archivecolor")
        wanted = {"asset_sha256": spec.sha256}
        if is_current(manifest.get(name), home, wanted):
            done.append((manifest[name], False))
            continue
        data = verify_asset(spec)
        entry = install_file(name, transform(data) if transform else data, wanted, home)
        manifest[name] = entry
        done.append((entry, True))
    write_manifest(manifest, home)
    return done



def verified_path(name: str, home: Path | None = None) -> tuple[Path, InstalledModel]:
    """The installed file for ``name`` after checking its sha256 against the manifest."""
    entry = read_manifest(home).get(name)
    if entry is None:
        raise ModelNotFound(f"model {name!r} is not installed in {model_dir(home)}; run `archivecolor models pull`")
    path = model_dir(home) / entry.file
    if not path.exists():
        raise ModelNotFound(f"{path}: missing; run `archivecolor models pull`")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ChecksumMismatch(
            f"{path}: sha256 {digest[:12]}… does not match the manifest's {entry.sha256[:12]}… (tampered or "
            f"truncated); run `archivecolor models pull --force`"
        )
    return path, entry
