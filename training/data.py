"""Training photos, (target, reference) pairs, and the precomputed 13-channel inputs.

The VGG backbone and the correspondence have no trainable weights, so each pair's 13-channel input
is computed once, with the same Correspondence module that is exported for inference, and stored
as float16 memory maps. Training then only runs the U-Net.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from archivecolor.color import is_near_gray, normalise_ab, normalise_l, rgb_to_lab
from archivecolor.imageio import is_image_path
from archivecolor.nets.correspondence import Correspondence
from archivecolor.nets.unet import SEMANTIC_FEATURES
from archivecolor.nets.vgg import VGGFeatures
from training.config import TEST_FOLDERS, TRAIN_FOLDERS, TrainConfig


def list_photos(data_root: Path) -> list[Path]:
    """Colour training photos under ``data_root``'s training folders, sorted; grayscale ones skipped."""
    photos = []
    for folder in TRAIN_FOLDERS:
        assert folder not in TEST_FOLDERS
        for path in sorted((data_root / folder).glob("*")):
            if is_image_path(path):
                photos.append(path)
    return photos


def split(photos: list[Path], every: int) -> tuple[list[Path], list[Path]]:
    """Deterministic train/validation split: every ``every``-th photo is held out."""
    val = photos[every - 1 :: every]
    held = set(val)
    return [p for p in photos if p not in held], val


def load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def centre_view(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side to ``size`` and take the centre square: (size, size, 3) uint8."""
    im = Image.fromarray(rgb)
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def augmented_view(rgb: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """A geometrically different view of the same photo: crop, flip, rotation, so matching must work."""
    im = Image.fromarray(rgb)
    short = min(im.size)
    crop = int(short * rng.uniform(0.6, 1.0))
    left = rng.randint(0, im.width - crop)
    top = rng.randint(0, im.height - crop)
    im = im.crop((left, top, left + crop, top + crop))
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = im.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, expand=False)
    inset = int(crop * 0.1)  # drop the corners the rotation left empty
    im = im.crop((inset, inset, crop - inset, crop - inset))
    return np.asarray(im.resize((size, size), Image.BICUBIC))


def lab_tensors(rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (H, W, 3) to model-scale L (1, 1, H, W) and ab (1, 2, H, W)."""
    lab = rgb_to_lab(rgb)
    l = torch.from_numpy(normalise_l(lab[..., 0]))[None, None]
    ab = torch.from_numpy(normalise_ab(lab[..., 1:]).transpose(2, 0, 1).copy())[None]
    return l, ab


def _semantic_shapes(n: int, size: int) -> dict[str, tuple[int, ...]]:
    return {name: (n, channels, size // stride, size // stride) for name, channels, stride in SEMANTIC_FEATURES}


@dataclass
class PairCache:
    """Precomputed pairs: ``x`` (N, 13, S, S) and ``ab`` (N, 2, S, S) float16, per-pair metadata, and
    per photo the target's VGG features that the U-Net reads as its semantic prior (float16)."""

    x: np.ndarray
    ab: np.ndarray
    meta: list[dict]
    per_photo: int
    semantic: dict[str, np.ndarray]

    @classmethod
    def open(cls, folder: Path) -> PairCache:
        meta = json.loads((folder / "pairs.json").read_text())
        n, s, per = len(meta["pairs"]), meta["size"], meta["per_photo"]
        x = np.memmap(folder / "x.f16", dtype=np.float16, mode="r", shape=(n, 13, s, s))
        ab = np.memmap(folder / "ab.f16", dtype=np.float16, mode="r", shape=(n, 2, s, s))
        semantic = {name: np.memmap(folder / f"{name}.f16", dtype=np.float16, mode="r", shape=shape)
                    for name, shape in _semantic_shapes(n // per, s).items()}
        return cls(x, ab, meta["pairs"], per, semantic)

    def photo_of(self, row: int) -> int:
        return row // self.per_photo


@torch.no_grad()
def build_pairs(
    photos: list[Path], folder: Path, config: TrainConfig, vgg: VGGFeatures, device: torch.device,
    progress=None, held_out: set[Path] = frozenset(),
) -> PairCache:
    """Compute every pair's 13-channel input for ``photos`` into ``folder`` (reuses a finished cache).

    Retrieved references never come from ``held_out`` photos, so validation colours stay unseen.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "pairs.json").exists():
        return PairCache.open(folder)
    rng = random.Random(config.seed)
    size = config.size
    corr = Correspondence().to(device)
    colour = []
    views = []
    for path in photos:
        rgb = load_rgb(path)
        if is_near_gray(rgb):
            continue
        colour.append(path)
        views.append(centre_view(rgb, size))
    # Retrieval embeddings of the target views, to pick real (imperfect) references.
    embeddings = []
    for view in views:
        l, _ = lab_tensors(view)
        embeddings.append(vgg(l.to(device))[5].cpu())
    emb = torch.cat(embeddings)
    sims = emb @ emb.T
    sims.fill_diagonal_(-2.0)
    for j, path in enumerate(colour):
        if path in held_out:
            sims[:, j] = -2.0
    ranked = sims.argsort(dim=1, descending=True)[:, :6].tolist()

    per_photo = 1 + config.retrieved_per_photo
    n = len(colour) * per_photo
    names = ["x", "ab", *(name for name, _, _ in SEMANTIC_FEATURES)]
    shapes = {"x": (n, 13, size, size), "ab": (n, 2, size, size), **_semantic_shapes(len(colour), size)}
    arrays = {name: np.memmap(folder / f"{name}.f16.tmp", dtype=np.float16, mode="w+", shape=shapes[name])
              for name in names}
    meta = []
    for i, (path, view) in enumerate(zip(colour, views)):
        l, ab = lab_tensors(view)
        tf = vgg(l.to(device))[:5]
        for (name, _, _), f in zip(SEMANTIC_FEATURES, tf[2:]):
            arrays[name][i] = f[0].cpu().numpy().astype(np.float16)
        refs = [("self", path, augmented_view(load_rgb(path), size, rng))]
        choices = [ranked[i][0]] + rng.sample(ranked[i][1:], config.retrieved_per_photo - 1)
        refs += [("retrieved", colour[j], views[j]) for j in choices]
        # All references of one target in one batch: VGG and the correspondence run once.
        ref_l, ref_ab = zip(*(lab_tensors(ref_view) for _, _, ref_view in refs))
        rl, rab = torch.cat(ref_l).to(device), torch.cat(ref_ab).to(device)
        rf = vgg(rl)[:5]
        k_refs = len(refs)
        x13 = corr(l.to(device).expand(k_refs, -1, -1, -1), *(f.expand(k_refs, -1, -1, -1) for f in tf), *rf, rab)
        rows = slice(i * per_photo, i * per_photo + k_refs)
        arrays["x"][rows] = x13.cpu().numpy().astype(np.float16)
        arrays["ab"][rows] = ab.numpy().astype(np.float16)
        for kind, ref_path, _ in refs:
            meta.append({"photo": path.name, "kind": kind, "reference": ref_path.name,
                         "split": "val" if path in held_out else "train"})
        if progress is not None:
            progress(i + 1, len(colour))
    for array in arrays.values():
        array.flush()
    del arrays
    for name in names:
        (folder / f"{name}.f16.tmp").rename(folder / f"{name}.f16")
    (folder / "pairs.json").write_text(json.dumps({"size": size, "per_photo": per_photo, "pairs": meta}))
    return PairCache.open(folder)
