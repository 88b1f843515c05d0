"""A training bundle: the training photos at a reduced size and the VGG-16 weights in one small folder,
to train on a machine that has neither the data nor a network (a rented GPU, say).

``python -m training bundle OUT``, then on that machine
``python -m training train --data OUT/data --weights OUT/vgg16-fp16.pth``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from archivecolor.models.weights import load_backbone_weights
from training.data import list_photos, shrunk

WEIGHTS_NAME = "vgg16-fp16.pth"


@dataclass
class Bundle:
    folder: Path
    photos: int
    photo_bytes: int
    weight_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.photo_bytes + self.weight_bytes


def make_bundle(data_root: Path, out: Path, short_side: int = 224, quality: int = 88,
                weights: Path | None = None, max_bytes: int | None = None) -> Bundle:
    """Copy the training photos of ``data_root`` into ``out/data`` (same folders and names; short side at
    most ``short_side``, JPEG ``quality``) and the VGG-16 conv weights into ``out/vgg16-fp16.pth``.

    The weights are stored as float16, half the size; training then sees features that differ from the
    float32 ones of inference by float16 rounding (about 1e-3 relative). ``max_bytes``: refuse a bundle
    that would be larger (ValueError naming the sizes), before writing anything.
    """
    photos = list_photos(data_root)
    if not photos:
        raise ValueError(f"{data_root}: no training photos (expected the folders of training.config.TRAIN_FOLDERS)")
    encoded = {}
    for path in photos:
        with Image.open(path) as im:
            encoded[path.relative_to(data_root)] = _jpeg(shrunk(im.convert("RGB"), short_side, Image.LANCZOS), quality)
    state, _ = load_backbone_weights("vgg16", weights)
    half = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float16)) for k, v in state.items()}
    bundle = Bundle(out, len(encoded), sum(map(len, encoded.values())),
                    sum(t.numel() * t.element_size() for t in half.values()))
    if max_bytes is not None and bundle.total_bytes > max_bytes:
        raise ValueError(f"{out}: the bundle would take {bundle.total_bytes / 2**20:.1f} MiB (photos "
                         f"{bundle.photo_bytes / 2**20:.1f}, weights {bundle.weight_bytes / 2**20:.1f}), more than "
                         f"{max_bytes / 2**20:.1f} MiB; lower --short-side or --quality")
    for rel, data in encoded.items():
        target = out / "data" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    torch.save(half, out / WEIGHTS_NAME)
    return bundle


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()
