"""Training photos, (target, reference) pairs, and the precomputed 13-channel inputs.

The VGG backbone and the correspondence have no trainable weights, so each pair's 13-channel input
is computed once, with the same Correspondence module that is exported for inference, and stored
as float16 memory maps. Training then only runs the U-Net.
"""

from __future__ import annotations

import json
import multiprocessing
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from archivecolor.color import is_near_gray, normalise_ab, normalise_l, rgb_to_lab
from archivecolor.imageio import is_image_path
from archivecolor.models.layout import WARPED_AB
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


def _random_square(rgb: np.ndarray, rng: random.Random) -> Image.Image:
    """A square crop of 60-100% of the short side at a random place, mirrored half the time."""
    im = Image.fromarray(rgb)
    crop = int(min(im.size) * rng.uniform(0.6, 1.0))
    left = rng.randint(0, im.width - crop)
    top = rng.randint(0, im.height - crop)
    im = im.crop((left, top, left + crop, top + crop))
    return im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def crop_view(rgb: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """A random square crop of a photo at ``size``: a new view of it each time it is drawn."""
    return np.asarray(_random_square(rgb, rng).resize((size, size), Image.BICUBIC))


def augmented_view(rgb: np.ndarray, size: int, rng: random.Random) -> np.ndarray:
    """A geometrically different view of the same photo: crop, flip, rotation, so matching must work."""
    im = _random_square(rgb, rng)
    crop = im.width
    im = im.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, expand=False)
    inset = int(crop * 0.1)  # drop the corners the rotation left empty
    im = im.crop((inset, inset, crop - inset, crop - inset))
    return np.asarray(im.resize((size, size), Image.BICUBIC))


def lab_arrays(views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Same-size uint8 RGB views (H, W, 3) to model-scale L (B, 1, H, W) and ab (B, 2, H, W), numpy only
    (what a forked worker may run: no torch, whose thread pool does not survive a fork)."""
    lab = rgb_to_lab(np.stack(views))
    return normalise_l(lab[:, None, ..., 0]), np.ascontiguousarray(normalise_ab(lab[..., 1:]).transpose(0, 3, 1, 2))


def lab_tensors(rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (H, W, 3) to model-scale L (1, 1, H, W) and ab (1, 2, H, W)."""
    return lab_batch([rgb])


def lab_batch(views: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-size uint8 RGB views to model-scale L (B, 1, S, S) and ab (B, 2, S, S)."""
    l, ab = lab_arrays(views)
    return torch.from_numpy(l), torch.from_numpy(ab)


def shrunk(im: Image.Image, short_side: int, resample: int = Image.BICUBIC) -> Image.Image:
    """``im`` with its short side brought down to ``short_side`` (never enlarged)."""
    scale = short_side / min(im.size)
    if scale >= 1:
        return im
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)


def colour_photos(photos: list[Path]) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, uint8 RGB) of the photos that are not near gray, read one at a time."""
    for path in photos:
        rgb = load_rgb(path)
        if not is_near_gray(rgb):
            yield path, rgb


def colour_photos_and_views(photos: list[Path], size: int) -> tuple[list[Path], list[np.ndarray]]:
    """The photos that are not near gray, and their centre views at ``size`` (what retrieval ranks)."""
    colour, views = [], []
    for path, rgb in colour_photos(photos):
        colour.append(path)
        views.append(centre_view(rgb, size))
    return colour, views


@torch.no_grad()
def retrieval_ranks(views: list[np.ndarray], excluded: list[bool], vgg: VGGFeatures, device: torch.device,
                    k: int = 6) -> list[list[int]]:
    """For each view, the ``k`` most similar other views by the retrieval embedding, never an ``excluded``
    one: real, imperfect references, as a catalogue would give."""
    embeddings = [vgg(lab_tensors(view)[0].to(device))[5].cpu() for view in views]
    emb = torch.cat(embeddings)
    sims = emb @ emb.T
    sims.fill_diagonal_(-2.0)
    sims[:, torch.tensor(excluded, dtype=torch.bool)] = -2.0
    return sims.argsort(dim=1, descending=True)[:, :k].tolist()


def _semantic_shapes(n: int, size: int) -> dict[str, tuple[int, ...]]:
    return {name: (n, channels, size // stride, size // stride) for name, channels, stride in SEMANTIC_FEATURES}


@dataclass
class Batch:
    """What one training step reads."""

    x: torch.Tensor  # (B, 13, S, S) the U-Net input
    ab: torch.Tensor  # (B, 2, S, S) true ab/128
    semantic: list[torch.Tensor]  # the target's VGG features for the semantic prior, or empty
    retrieved: torch.Tensor  # (B,) bool: the reference is another photo
    second: torch.Tensor | None = None  # (B, 2, S, S) a second reference's warped ab, for a second-opinion U-Net

    def inputs(self) -> list[torch.Tensor]:
        """What the U-Net reads after ``x``."""
        return [*self.semantic, *([] if self.second is None else [self.second])]

    def flipped(self) -> Batch:
        second = None if self.second is None else self.second.flip(-1)
        return Batch(self.x.flip(-1), self.ab.flip(-1), [f.flip(-1) for f in self.semantic], self.retrieved, second)


@dataclass
class PairCache:
    """Precomputed pairs: ``x`` (N, 13, S, S) and ``ab`` (N, 2, S, S) float16, per-pair metadata, and
    per photo the target's VGG features that the U-Net reads as its semantic prior (float16)."""

    x: np.ndarray
    ab: np.ndarray
    meta: list[dict]
    per_photo: int
    semantic: dict[str, np.ndarray]
    validation_only: bool = False  # only the held-out photos' pairs (what online training validates on)
    matched_colour: bool = False  # x holds the reference's matched colour in place of its warped ab

    @classmethod
    def open(cls, folder: Path) -> PairCache:
        meta = json.loads((folder / "pairs.json").read_text())
        n, s, per = len(meta["pairs"]), meta["size"], meta["per_photo"]
        x = np.memmap(folder / "x.f16", dtype=np.float16, mode="r", shape=(n, 13, s, s))
        ab = np.memmap(folder / "ab.f16", dtype=np.float16, mode="r", shape=(n, 2, s, s))
        semantic = {name: np.memmap(folder / f"{name}.f16", dtype=np.float16, mode="r", shape=shape)
                    for name, shape in _semantic_shapes(n // per, s).items()}
        return cls(x, ab, meta["pairs"], per, semantic, meta.get("validation_only", False),
                   meta.get("matched_colour", False))

    def photo_of(self, row: int) -> int:
        return row // self.per_photo

    def validation_turns(self) -> list[list[int]]:
        """Per validation photo, the rows of its retrieved references (the realistic case): the references that
        take turns giving the colours."""
        photos: dict[int, list[int]] = {}
        for row, pair in enumerate(self.meta):
            if pair["split"] == "val" and pair["kind"] == "retrieved":
                photos.setdefault(self.photo_of(row), []).append(row)
        return list(photos.values())

    def second_of(self, row: int) -> int:
        """The row whose warped ab is ``row``'s second opinion: another retrieved reference of the same photo
        (the next one, the last wrapping to the first), or the row itself for a self reference, which
        stands alone as a user's single chosen reference does."""
        first = self.photo_of(row) * self.per_photo
        k = row - first
        if k == 0 or self.per_photo < 3:
            return row
        return first + (k % (self.per_photo - 1)) + 1


@torch.no_grad()
def build_pairs(
    photos: list[Path], folder: Path, config: TrainConfig, vgg: VGGFeatures, device: torch.device,
    progress=None, held_out: set[Path] = frozenset(), validation_only: bool = False,
    neighbours: tuple[list[Path], list[np.ndarray], list[list[int]]] | None = None,
) -> PairCache:
    """Compute every pair's 13-channel input for ``photos`` into ``folder`` (reuses a finished cache).

    Retrieved references never come from ``held_out`` photos, so validation colours stay unseen. With
    ``validation_only``, only the ``held_out`` photos' pairs are computed (what online training validates on,
    a twentieth of the work); the other photos' random draws are still made, so each pair is the one a full
    cache holds. ``neighbours``: the colour photos, their centre views and retrieval ranks, where they are at
    hand already (``OnlinePairs`` has them), instead of reading and ranking the photos again.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "pairs.json").exists():
        cache = PairCache.open(folder)
        if cache.matched_colour != config.matched_colour:
            have, want = (("the matched colour" if m else "the warped ab") for m in (cache.matched_colour,
                                                                                     config.matched_colour))
            raise SystemExit(f"{folder}: its pairs give the U-Net {have}, --config {config.name} trains on {want}; "
                             f"pass --pairs with another folder")
        return cache
    rng = random.Random(config.seed)
    size = config.size
    corr = Correspondence(matched=config.matched_colour).to(device)
    if neighbours is None:
        colour, views = colour_photos_and_views(photos, size)
        ranked = retrieval_ranks(views, [path in held_out for path in colour], vgg, device)
    else:
        colour, views, ranked = neighbours
    kept = [i for i, path in enumerate(colour) if path in held_out or not validation_only]

    per_photo = 1 + config.retrieved_per_photo
    n = len(kept) * per_photo
    names = ["x", "ab", *(name for name, _, _ in SEMANTIC_FEATURES)]
    shapes = {"x": (n, 13, size, size), "ab": (n, 2, size, size), **_semantic_shapes(len(kept), size)}
    arrays = {name: np.memmap(folder / f"{name}.f16.tmp", dtype=np.float16, mode="w+", shape=shapes[name])
              for name in names}
    meta = []
    for i, (path, view) in enumerate(zip(colour, views)):
        self_view = augmented_view(load_rgb(path), size, rng)
        choices = [ranked[i][0]] + rng.sample(ranked[i][1:], config.retrieved_per_photo - 1)
        if progress is not None:
            progress(i + 1, len(colour))
        if validation_only and path not in held_out:
            continue
        at = len(meta) // per_photo
        l, ab = lab_tensors(view)
        tf = vgg(l.to(device))[:5]
        for (name, _, _), f in zip(SEMANTIC_FEATURES, tf[2:]):
            arrays[name][at] = f[0].cpu().numpy().astype(np.float16)
        refs = [("self", path, self_view)] + [("retrieved", colour[j], views[j]) for j in choices]
        # All references of one target in one batch: VGG and the correspondence run once.
        rl, rab = (t.to(device) for t in lab_batch([ref_view for _, _, ref_view in refs]))
        rf = vgg(rl)[:5]
        k_refs = len(refs)
        x13 = corr(l.to(device).expand(k_refs, -1, -1, -1), *(f.expand(k_refs, -1, -1, -1) for f in tf), *rf, rab)
        rows = slice(at * per_photo, at * per_photo + k_refs)
        arrays["x"][rows] = x13.cpu().numpy().astype(np.float16)
        arrays["ab"][rows] = ab.numpy().astype(np.float16)
        for kind, ref_path, _ in refs:
            meta.append({"photo": path.name, "kind": kind, "reference": ref_path.name,
                         "split": "val" if path in held_out else "train"})
    for array in arrays.values():
        array.flush()
    del arrays
    for name in names:
        (folder / f"{name}.f16.tmp").rename(folder / f"{name}.f16")
    (folder / "pairs.json").write_text(json.dumps({"size": size, "per_photo": per_photo, "pairs": meta,
                                                   "validation_only": validation_only,
                                                   "matched_colour": config.matched_colour}))
    return PairCache.open(folder)


@dataclass
class Draw:
    """The CPU half of an online batch: the views drawn for it, as model-scale L and ab arrays."""

    l: np.ndarray  # (B, 1, S, S) the targets' L
    ab: np.ndarray  # (B, 2, S, S) their true ab
    reference_l: np.ndarray
    reference_ab: np.ndarray
    retrieved: list[bool]
    second_l: np.ndarray | None  # (R, 1, S, S) a second reference for each of the R retrieved pairs, in order
    second_ab: np.ndarray | None


_WORKER_PAIRS: OnlinePairs | None = None  # the OnlinePairs whose photos a forked draw worker reads


def _draw_in_worker(task: tuple[list[int], float, int, bool]) -> Draw:
    photos, self_reference_rate, seed, second_opinion = task
    return _WORKER_PAIRS.draw(photos, self_reference_rate, random.Random(seed), second_opinion)


class OnlinePairs:
    """Pairs made afresh at every step on the training device, instead of read from a PairCache: each
    draw of a photo is a new random crop, and its reference a new view of itself or of one of its five
    nearest other photos. Far more variety than three fixed pairs per photo, at a price: on 2 CPU cores
    the VGG passes and the correspondence take about 3 s a batch of 8, as long as the step itself.
    The draw (crops and Lab conversion, on the CPU) can run in worker processes, ahead of the steps.

    Photo indices are those of ``colour_photos_and_views`` (the same as a PairCache built from the same
    photos). ``held_out`` photos are never a reference.
    """

    def __init__(self, photos: list[Path], held_out: set[Path], config: TrainConfig, vgg: VGGFeatures,
                 device: torch.device) -> None:
        self.size = config.size
        self.vgg = vgg
        self.device = device
        self.corr = Correspondence(matched=config.matched_colour).to(device)
        # Kept at the largest size a crop of 60% of the short side needs, so a draw is only a crop and a resize.
        short_side = round(config.size / 0.6)
        self.colour, self.views, self.rgb = [], [], []
        for path, rgb in colour_photos(photos):  # each photo read once
            self.colour.append(path)
            self.views.append(centre_view(rgb, config.size))
            self.rgb.append(np.asarray(shrunk(Image.fromarray(rgb), short_side)))
        self.ranked = retrieval_ranks(self.views, [path in held_out for path in self.colour], vgg, device)

    def draw(self, photos: list[int], self_reference_rate: float, rng: random.Random,
             second_opinion: bool = False) -> Draw:
        """The views of one batch: per photo a random crop, and a new view of itself (at
        ``self_reference_rate``) or of a near neighbour as its reference; with ``second_opinion``, a retrieved
        pair also gets a second, different neighbour."""
        targets, references, seconds, retrieved = [], [], [], []
        for i in photos:
            targets.append(crop_view(self.rgb[i], self.size, rng))
            if rng.random() < self_reference_rate:
                references.append(augmented_view(self.rgb[i], self.size, rng))
                retrieved.append(False)
            elif second_opinion:
                first, other = rng.sample(self.ranked[i][:5], 2)
                references.append(crop_view(self.rgb[first], self.size, rng))
                seconds.append(crop_view(self.rgb[other], self.size, rng))
                retrieved.append(True)
            else:
                references.append(crop_view(self.rgb[rng.choice(self.ranked[i][:5])], self.size, rng))
                retrieved.append(True)
        second_l, second_ab = lab_arrays(seconds) if seconds else (None, None)
        return Draw(*lab_arrays(targets), *lab_arrays(references), retrieved, second_l, second_ab)

    @torch.no_grad()
    def batch_of(self, draw: Draw, semantic: bool, second_opinion: bool = False) -> Batch:
        """The device half: VGG features and the correspondence of a draw. With ``second_opinion``, a
        retrieved pair gets its second neighbour's warped ab, a self pair its own (as a single chosen
        reference at inference)."""
        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(array).to(self.device)

        l = tensor(draw.l)
        tf = self.vgg(l)[:5]
        x = self._warp(l, tf, tensor(draw.reference_l), tensor(draw.reference_ab))
        second = None
        if second_opinion:
            second = x[:, WARPED_AB].clone()
            rows = [k for k, r in enumerate(draw.retrieved) if r]  # only these need a second correspondence
            if rows:
                second[rows] = self._warp(l[rows], [f[rows] for f in tf], tensor(draw.second_l),
                                          tensor(draw.second_ab))[:, WARPED_AB]
        features = list(tf[2:]) if semantic else []
        return Batch(x, tensor(draw.ab), features, torch.tensor(draw.retrieved, device=self.device), second)

    def batch(self, photos: list[int], self_reference_rate: float, rng: random.Random, semantic: bool,
              second_opinion: bool = False) -> Batch:
        """One batch, drawn here and now (see ``draw`` and ``batch_of``)."""
        return self.batch_of(self.draw(photos, self_reference_rate, rng, second_opinion), semantic, second_opinion)

    def batches(self, chunks: list[list[int]], seeds: list[int], self_reference_rate: float, semantic: bool,
                second_opinion: bool = False, workers: int = 0) -> Iterator[Batch]:
        """The batches of ``chunks`` in order, chunk k drawn with ``random.Random(seeds[k])``: the same batches
        whatever ``workers``. With ``workers`` > 1 the draws run in that many forked processes, ahead of the
        steps, while this process keeps the device busy."""
        tasks = [(chunk, self_reference_rate, seed, second_opinion) for chunk, seed in zip(chunks, seeds)]
        if workers <= 1:
            draws: Iterator[Draw] = (self.draw(c, r, random.Random(s), o) for c, r, s, o in tasks)
            yield from (self.batch_of(d, semantic, second_opinion) for d in draws)
            return
        global _WORKER_PAIRS
        _WORKER_PAIRS = self
        # fork: the workers share the photos already in memory; they touch neither torch nor the device.
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for draw in pool.imap(_draw_in_worker, tasks):
                yield self.batch_of(draw, semantic, second_opinion)

    def _warp(self, l: torch.Tensor, tf: list[torch.Tensor], rl: torch.Tensor, rab: torch.Tensor) -> torch.Tensor:
        return self.corr(l, *tf, *self.vgg(rl)[:5], rab)
