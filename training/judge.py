"""Judge U-Nets on the validation photos as the pipeline runs them: each photo's two retrieved references take a
turn giving the colours (the other is the second opinion), and the turns are averaged. A candidate is a training
checkpoint or an exported graph (an ensemble too), scored at several chroma gains: how the shipped models were
chosen (model card)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from archivecolor.bench.metrics import colorfulness, rgb01_to_uint8
from archivecolor.models.layout import MEMBER, SECOND_AB, WARPED_AB
from archivecolor.nets.colour import lab_to_rgb
from training.data import PairCache
from training.train import chroma, psnr_rgb

BATCH = 16


@dataclass
class Verdict:
    """A candidate at one chroma gain: mean validation PSNR (dB), chroma over the truth's, mean colourfulness (the
    benchmark's measure, in RGB) over the truth's, and each photo's PSNR.

    Both colour measures, because they part: the mean chroma counts a flat tint as fully as colour that varies
    across the picture, colourfulness counts it at 0.3 (a flat cast scaled up buys chroma, not colourfulness)."""

    candidate: str
    gain: float
    psnr: float
    chroma_ratio: float
    colourfulness_ratio: float
    per_photo: list[float]

    def as_dict(self) -> dict:
        return {"candidate": self.candidate, "gain": self.gain, "psnr": round(self.psnr, 4),
                "chroma_ratio": round(self.chroma_ratio, 4), "colourfulness_ratio": round(self.colourfulness_ratio, 4),
                "per_photo": [round(p, 4) for p in self.per_photo]}


def _rows(cache: PairCache, rows: list[int]) -> dict[str, np.ndarray]:
    """The U-Net's inputs for ``rows`` (float32), by graph input name."""
    photos = [cache.photo_of(r) for r in rows]
    feeds = {"x13": np.asarray(cache.x[rows], dtype=np.float32)}
    feeds.update({name: np.asarray(array[photos], dtype=np.float32) for name, array in cache.semantic.items()})
    feeds[SECOND_AB] = np.asarray(cache.x[[cache.second_of(r) for r in rows]][:, WARPED_AB], dtype=np.float32)
    return feeds


class _Network:
    """A candidate U-Net: ab/128 without its chroma gain for a batch of rows, each coloured by network ``member``."""

    def __init__(self, path: Path) -> None:
        if path.suffix == ".onnx":
            import onnxruntime as ort

            from archivecolor.models.session import chroma_gain_in, networks_in
            from archivecolor.models.store import widen_float16

            try:
                self.session = ort.InferenceSession(widen_float16(path.read_bytes()),
                                                    providers=["CPUExecutionProvider"])
            except Exception as exc:  # protobuf's and ONNX Runtime's errors have no common public type
                raise ValueError(f"{path}: not an ONNX graph ONNX Runtime can run ({exc}); pass an exported U-Net") from exc
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.gain, self.members = chroma_gain_in(self.session), networks_in(self.session)
            self.unet = None
        else:
            from export.onnx_export import load_unet

            try:
                self.unet, _ = load_unet(path)
            except Exception as exc:  # torch.load's and pickle's errors have no common public type
                raise ValueError(f"{path}: not a U-Net training checkpoint ({type(exc).__name__}); pass a "
                                 f"checkpoint (.pt) or an exported graph (.onnx)") from exc
            self.inputs, self.gain, self.members = self.unet.input_names(), 1.0, 1

    def __call__(self, feeds: dict[str, np.ndarray], member: np.ndarray) -> np.ndarray:
        if self.unet is not None:
            with torch.no_grad():
                return self.unet(*(torch.from_numpy(feeds[name]) for name in self.inputs))[0].numpy()
        wanted = {name: feeds[name] for name in self.inputs if name != MEMBER}
        if MEMBER in self.inputs:
            wanted[MEMBER] = member
        return self.session.run(["ab"], wanted)[0] / self.gain


def _predict(network: _Network, cache: PairCache, rows: list[int], member: np.ndarray, batch: int = BATCH) -> np.ndarray:
    return np.concatenate([network(_rows(cache, rows[i : i + batch]), member[i : i + batch])
                           for i in range(0, len(rows), batch)])


def _colourfulness(l01: torch.Tensor, ab: torch.Tensor) -> float:
    """Mean Hasler–Süsstrunk colourfulness of the 8-bit RGB images, as the benchmark measures it."""
    rgb = rgb01_to_uint8(lab_to_rgb(l01, ab).permute(0, 2, 3, 1).numpy())
    return float(np.mean([colorfulness(image) for image in rgb]))


def judge(candidates: list[Path], cache: PairCache, gains: list[float], ceilings: bool = False) -> list[Verdict]:
    """Each candidate at each chroma gain (absolute: a graph's own gain is taken out first) on the validation photos.

    An ensemble gives turn k to network k mod M, as the pipeline does; the photos are the cache's validation photos
    with their retrieved references. With ``ceilings``, also what bounds the candidate: gray; its colours reduced to
    each photo's mean colour (how much its spatial colour adds); its colours moved to the truth's mean colour (what a
    right overall cast would give); and the photo's own colours as its lone reference (what a reference of the
    photo's very content would give, as a user's well-chosen one can).
    """
    turns = cache.validation_turns()
    if not turns:
        raise ValueError("the pair cache holds no validation photos with retrieved references")
    rows = [r for photo in turns for r in photo]
    first = [photo[0] for photo in turns]
    truth = torch.from_numpy(np.asarray(cache.ab[first], dtype=np.float32))
    l01 = torch.from_numpy(np.asarray(cache.x[first][:, :1], dtype=np.float32))
    turn_of = np.array([k for photo in turns for k in range(len(photo))])
    starts = np.cumsum([0] + [len(photo) for photo in turns])
    true_chroma, true_colourfulness = chroma(truth).mean(), _colourfulness(l01, truth)

    def verdict(name: str, gain: float, ab: torch.Tensor) -> Verdict:
        per_photo = psnr_rgb(l01, ab, truth)
        return Verdict(name, gain, per_photo.mean().item(), (chroma(ab).mean() / true_chroma).item(),
                       _colourfulness(l01, ab) / true_colourfulness, per_photo.tolist())

    verdicts = [verdict("gray", 1.0, torch.zeros_like(truth))] if ceilings else []
    for path in candidates:
        network = _Network(path)
        predicted = _predict(network, cache, rows, turn_of % network.members)
        mean = torch.from_numpy(np.stack([predicted[a:b].mean(axis=0) for a, b in zip(starts[:-1], starts[1:])]))
        variants = {str(path): mean}
        if ceilings:
            own_cast = mean.mean(dim=(2, 3), keepdim=True)
            variants[f"{path} [its mean colour only]"] = own_cast.expand_as(mean).contiguous()
            variants[f"{path} [the truth's mean colour]"] = mean - own_cast + truth.mean(dim=(2, 3), keepdim=True)
            variants[f"{path} [own colours as reference]"] = _own_reference(network, cache, first)
        for name, ab in variants.items():
            verdicts.extend(verdict(name, gain, ab * gain) for gain in gains)
    return verdicts


def _own_reference(network: _Network, cache: PairCache, first_rows: list[int]) -> torch.Tensor:
    """The network's colours for each validation photo given its self reference (a crop of the photo itself) alone:
    its own second opinion, coloured by every network of an ensemble and averaged, as the pipeline runs a lone
    reference."""
    own = [cache.photo_of(row) * cache.per_photo for row in first_rows]
    if any(cache.meta[row]["kind"] != "self" for row in own):
        raise ValueError("the pair cache holds no self references for its validation photos; pass one a training run "
                         "built (pairs-<size> or pairs-<size>-val), or leave out --ceilings")
    # Each row once per network, interleaved, in batches of whole rounds: every batch holds rows for every network,
    # which ONNX Runtime needs (it cannot run a network on an empty share of a batch).
    m = network.members
    predicted = _predict(network, cache, [row for row in own for _ in range(m)], np.tile(np.arange(m), len(own)),
                         batch=max(1, BATCH // m) * m)
    return torch.from_numpy(predicted.reshape(len(own), m, *predicted.shape[1:]).mean(axis=1))


def open_validation_pairs(pairs: Path | None, data: Path, config_name: str, weights: Path | None = None,
                          progress=None) -> PairCache:
    """The validation pairs: the cache at ``pairs`` (a full cache or an online run's ``pairs-<size>-val``), else the
    validation-only cache of ``config_name`` built under ``runs/`` from the photos in ``data`` (``progress(done,
    total)`` is told of each photo read)."""
    from training.config import CONFIGS

    if pairs is not None:
        if not (pairs / "pairs.json").exists():
            raise ValueError(f"{pairs}: no finished pair cache (pairs.json); pass a training run's pairs-<size> or "
                             "pairs-<size>-val folder, or leave --pairs out to build the validation pairs")
        return PairCache.open(pairs)
    from archivecolor.nets.vgg import VGGFeatures
    from training.data import build_pairs, list_photos, split

    config = CONFIGS[config_name]
    photos = list_photos(data)
    if not photos:
        raise ValueError(f"no training photos under {data}; pass --data pointing at shared/data")
    _, held_out = split(photos, config.validation_every)
    vgg, _ = VGGFeatures.pretrained(weights)
    folder = Path("runs") / f"pairs-{config.size}-val"
    return build_pairs(photos, folder, config, vgg, torch.device("cpu"), held_out=set(held_out),
                       validation_only=True, progress=progress)

