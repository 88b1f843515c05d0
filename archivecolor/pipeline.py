"""Colorize images with references: the pure core that the runner, the benchmark and Python users call.

Stages, all on ONNX Runtime: VGG features of the target L and of each reference, the
correspondence (warped reference ab + 10 similarity maps), optional per-pixel fusion of several
references, the U-Net, and the edge-aware recombination with the original L at full size.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from archivecolor.color import denormalise_ab, global_transfer, normalise_ab, normalise_l, rgb_to_lab
from archivecolor.errors import ImageReadError, UsageError
from archivecolor.imageio import Scan, from_upright, read_image, to_upright
from archivecolor.models.layout import FORWARD_MAPS, MEMBER, SECOND_AB, SEMANTIC_INPUTS, WARPED_AB
from archivecolor.models.registry import DEFAULT_BACKBONE, features_name
from archivecolor.models.session import ModelSession, networks_in, open_precision, open_session, resolve_precision
from archivecolor.models.weights import sha256_file
from archivecolor.upsample import box_mean, recombine, resize_plane, working_size

DEFAULT_WORKING_SIZE = 256
FEATURE_MAPS = ("f1", "f2", "f3", "f4", "f5")
EMBEDDING_OUTPUT = "embedding_gem"  # the retrieval embedding; the graph's other, embedding_avg, is the seed's


@dataclass
class Models:
    """The three graphs of the method, each verified and opened once."""

    features: ModelSession
    correspondence: ModelSession
    unet: ModelSession
    backbone: str = DEFAULT_BACKBONE
    precision: str = "fp32"

    @classmethod
    def open(cls, provider: str = "auto", home: Path | None = None, backbone: str = DEFAULT_BACKBONE,
             threads: int = 0, unet_path: Path | None = None, precision: str = "auto") -> Models:
        """The installed graphs; ``unet_path`` replaces the U-Net with a user's own export; ``precision``
        int8 runs the VGG features and the U-Net as installed by ``models pull --int8`` (``auto``: int8 on
        the CPU where installed, see ``resolve_precision``)."""
        precision = resolve_precision(precision, provider, home)
        return cls(
            open_precision(features_name(backbone), precision, provider, home, threads),
            open_session("correspondence", provider, home, threads),
            open_precision("unet", "fp32" if unet_path else precision, provider, home, threads, unet_path),
            backbone,
            precision,
        )

    @property
    def provider(self) -> str:
        return self.unet.provider

    def hashes(self) -> dict[str, str]:
        return {s.name: s.model.sha256 for s in (self.features, self.correspondence, self.unet)}

    def embed(self, l_batch: np.ndarray) -> np.ndarray:
        """Retrieval embeddings (B, 512), L2-normalised, of L/100 batches (B, 1, h, w)."""
        return self.features.run({"l": l_batch}, [EMBEDDING_OUTPUT])[0]

    def features_of(self, l_batch: np.ndarray) -> list[np.ndarray]:
        return self.features.run({"l": l_batch}, list(FEATURE_MAPS))

    def target_features(self, l_batch: np.ndarray) -> TargetFeatures:
        """The matching features of targets and, from the same pass, their retrieval embeddings."""
        *maps, embedding = self.features.run({"l": l_batch}, [*FEATURE_MAPS, EMBEDDING_OUTPUT])
        return TargetFeatures(maps, embedding)

    def semantic_inputs(self) -> list[str]:
        """The target-feature inputs this U-Net reads as its semantic prior (none for a 13-channel-only U-Net)."""
        return [i.name for i in self.unet.session.get_inputs() if i.name in SEMANTIC_INPUTS]

    @property
    def second_opinion(self) -> bool:
        """Whether this U-Net reads a second reference's warped ab (then a target wants two references)."""
        return any(i.name == SECOND_AB for i in self.unet.session.get_inputs())

    @property
    def members(self) -> int:
        """How many networks the U-Net graph holds: an ensemble gives each reference's turn to another."""
        return networks_in(self.unet.session)

    @property
    def references_wanted(self) -> int:
        """How many retrieved references a target needs at least: two for a second opinion."""
        return 2 if self.second_opinion else 1


@dataclass
class TargetFeatures:
    """One VGG pass over a batch of targets: what the correspondence and U-Net read, and what retrieval reads."""

    maps: list[np.ndarray]  # f1..f5, each (B, C, h/s, w/s)
    embedding: np.ndarray  # (B, 512) GeM of conv5_3, L2-normalised

    def select(self, rows: list[int]) -> TargetFeatures:
        if rows == list(range(len(self.embedding))):
            return self  # no copy of the whole batch's maps
        return TargetFeatures([f[rows] for f in self.maps], self.embedding[rows])


@dataclass
class Reference:
    """A colour reference prepared at working size: its features are computed once and reused."""

    key: str
    l: np.ndarray  # (1, 1, h, w) L/100
    ab: np.ndarray  # (1, 2, h, w) ab/128
    features: list[np.ndarray] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    sha256: str = ""  # of the file as it was read (not as a catalogue remembers it)

    def lab(self) -> np.ndarray:
        """(h, w, 3) CIELAB at working size."""
        return np.dstack([self.l[0, 0] * 100.0, denormalise_ab(self.ab[0].transpose(1, 2, 0))])


def upright_lab(scan: Scan) -> np.ndarray:
    """(H, W, 3) CIELAB of a colour scan, shown upright."""
    pixels = scan.pixels if scan.pixels.ndim == 3 else np.dstack([scan.pixels] * 3)
    return rgb_to_lab(to_upright(pixels, scan.orientation))


def resize_lab(lab: np.ndarray, short_side: int) -> np.ndarray:
    h, w = working_size(lab.shape[0], lab.shape[1], short_side)
    return np.dstack([resize_plane(lab[..., c], h, w) for c in range(3)])


def reference_from_lab(key: str, lab: np.ndarray, short_side: int, meta: dict | None = None) -> Reference:
    small = resize_lab(lab, short_side)
    return Reference(key, normalise_l(small[None, None, ..., 0]),
                     normalise_ab(small[..., 1:]).transpose(2, 0, 1)[None].copy(), meta=meta or {})


def read_colour_reference(path: Path) -> Scan:
    """Decode a reference photo; a gray or toned one is refused, since it has no colours to give."""
    scan = read_image(path)
    if scan.pixels.ndim == 2 or any("treated as gray" in w for w in scan.warnings):
        raise ImageReadError(f"{path}: the reference is grayscale or toned, so it has no colours to give; "
                             f"choose a colour photo")
    return scan


def load_reference(path: Path, key: str, short_side: int, meta: dict | None = None) -> Reference:
    """Read a colour reference and prepare it at working size; records the sha256 of what it read."""
    digest = sha256_file(path)
    reference = reference_from_lab(key, upright_lab(read_colour_reference(path)), short_side, meta)
    reference.sha256 = digest
    return reference


# About three references' features at working size 256: enough for runs that reuse a few references;
# each reference more would hold 45 MB for a scan that may never come.
REFERENCE_CACHE_BYTES = 128 * 2**20


class ReferenceCache:
    """LRU of prepared references keyed by sha256 (many scans share one reference), bounded in bytes:
    a reference's features at working size 256 take about 45 MB."""

    def __init__(self, models: Models, max_bytes: int = REFERENCE_CACHE_BYTES) -> None:
        self.models = models
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, Reference] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0  # reading and preparing references, their VGG features included

    @staticmethod
    def size_of(ref: Reference) -> int:
        return ref.l.nbytes + ref.ab.nbytes + sum(f.nbytes for f in ref.features)

    def get(self, key: str, load) -> Reference:
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        started = time.perf_counter()
        ref = load()
        ref.features = self.models.features_of(ref.l)
        self.seconds += time.perf_counter() - started
        self.items[key] = ref
        self.bytes += self.size_of(ref)
        while self.bytes > self.max_bytes and len(self.items) > 1:
            _, evicted = self.items.popitem(last=False)
            self.bytes -= self.size_of(evicted)
        return ref

    def load(self, path: Path, sha256: str, short_side: int, meta: dict | None = None) -> Reference:
        """The reference at ``path`` (known by ``sha256``) prepared at ``short_side``, read once."""
        return self.get(sha256, lambda: load_reference(path, sha256, short_side, meta))


@dataclass
class Prediction:
    """Model output for one target at working size (upright)."""

    ab: np.ndarray  # (h, w, 2) CIELAB a, b
    l: np.ndarray  # (h, w) CIELAB L, the guide
    trust: np.ndarray  # (h, w) in (0, 1): how much the reference colour was believed
    x13: np.ndarray  # (13, h, w) the U-Net input (warped ab and similarity maps) of the first reference's turn
    shares: list[float]  # per reference, its share of the colour
    similarity: list[float]  # per reference, mean target→reference similarity
    # The U-Net's other inputs in graph order, each (1, C, h', w'), of the first reference's turn: target
    # features, a second opinion, an ensemble's member.
    unet_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    cast: float = 0.0  # how far the mean colour was moved to a chosen reference's (CHOSEN_REFERENCE_CAST or 0)


@dataclass
class StageTimes:
    features: float = 0.0
    correspondence: float = 0.0
    unet: float = 0.0

    def add(self, other: StageTimes) -> None:
        self.features += other.features
        self.correspondence += other.correspondence
        self.unet += other.unet


def turns(candidates: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """For a second-opinion U-Net: each reference in turn gives the colours (its 13-channel input) and the
    others, fused per pixel, are its second opinion (their warped ab, (2, h, w)); a reference alone is its own.
    Averaging the turns uses every reference's colours: on the validation pairs, 0.09 dB above the first
    reference's turn alone (model card)."""
    if len(candidates) == 1:
        return [(candidates[0], candidates[0][WARPED_AB])]
    return [(first, fuse(candidates[:k] + candidates[k + 1 :])[0][WARPED_AB]) for k, first in enumerate(candidates)]


def fuse(candidates: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, keep the 13-channel input of the reference with the highest (smoothed) similarity."""
    if len(candidates) == 1:
        return candidates[0], np.zeros(candidates[0].shape[-2:], dtype=np.int64)
    scores = np.stack([box_mean(c[FORWARD_MAPS].mean(axis=0)[..., None], 2)[..., 0] for c in candidates])
    chosen = scores.argmax(axis=0)
    stacked = np.stack(candidates)  # (K, 13, h, w)
    fused = np.take_along_axis(stacked, chosen[None, None], axis=0)[0]
    return fused, chosen


@dataclass
class UNetRows:
    """The U-Net's feeds for a batch of targets: one row per pass, ``owners`` the target of each row."""

    feeds: dict[str, np.ndarray]
    owners: np.ndarray
    shares: list[list[float]]  # per target, each reference's share of the colour
    similarity: list[list[float]]  # per target, each reference's mean target→reference similarity


def correspondence_feeds(l: np.ndarray, target_maps: list[np.ndarray], reference: Reference) -> dict[str, np.ndarray]:
    """The correspondence graph's inputs for one target (L (1, 1, h, w) and its feature maps) and a reference."""
    feeds = {"l": l, "ref_ab": reference.ab}
    feeds.update({f"tf{k + 1}": target_maps[k] for k in range(5)})
    feeds.update({f"rf{k + 1}": reference.features[k] for k in range(5)})
    return feeds


def unet_rows(models: Models, l_batch: np.ndarray, references: list[list[Reference]], targets: TargetFeatures,
              matched: list[bool] | None = None) -> UNetRows:
    """Run the correspondence for every target and reference and lay out the U-Net's rows.

    A second-opinion U-Net runs one row per reference turn; an ensemble gives turn k to member k mod M, and a
    target with fewer turns than members runs them again until every member has coloured it once. ``matched``:
    per target, whether its references give their matched colour in place of their warped ab.
    """
    feats = targets.maps
    networks = models.members
    inputs, seconds, owners, members, shares, sims = [], [], [], [], [], []
    for i, refs in enumerate(references):
        target = [f[i : i + 1] for f in feats]
        candidates = []
        for ref in refs:
            feeds = correspondence_feeds(l_batch[i : i + 1], target, ref)
            if matched and matched[i]:  # its colours without the warp's swirls (nets.correspondence)
                x13, matched = models.correspondence.run(feeds)
                x13[:, WARPED_AB] = matched
            else:  # ONNX Runtime then skips the matched colour's nodes
                (x13,) = models.correspondence.run(feeds, ["x13"])
            candidates.append(x13[0])
        if models.second_opinion:  # where the references agree, their colour is likely right
            passes = turns(candidates)
            shares.append([1.0 / len(candidates)] * len(candidates))
        else:
            fused, pick = fuse(candidates)
            passes = [(fused, None)]
            shares.append([float((pick == k).mean()) for k in range(len(candidates))])
        for k in range(max(len(passes), networks)):
            first, second = passes[k % len(passes)]
            inputs.append(first)
            seconds.append(second)
            owners.append(i)
            members.append(k % networks)
        sims.append([float(c[FORWARD_MAPS].mean()) for c in candidates])
    owners = np.asarray(owners)
    rows_maps = targets.select(owners.tolist()).maps  # one row per U-Net pass; no copy with one pass a target
    feeds = {"x13": np.stack(inputs).astype(np.float32)}
    feeds.update({name: rows_maps[SEMANTIC_INPUTS[name]] for name in models.semantic_inputs()})
    if models.second_opinion:
        feeds[SECOND_AB] = np.stack(seconds).astype(np.float32)
    if networks > 1:
        feeds[MEMBER] = np.asarray(members, dtype=np.int64)
    return UNetRows(feeds, owners, shares, sims)


# A reference chosen by hand is most often of the scan's own scene, whose overall colour is more often right than
# the network's: moving the prediction's mean colour halfway to the mean of the global transfer from that
# reference gained 0.34 dB on the validation halves and 0.39 dB (LPIPS -0.003) on `bench --same-scene`, at 2%
# less colourfulness (model card). A retrieved reference's overall colour is no better than the network's guess.
CHOSEN_REFERENCE_CAST = 0.5


def reference_cast(l: np.ndarray, reference: Reference) -> np.ndarray:
    """The mean ab (2,) that global transfer from ``reference`` gives a target of lightness ``l`` (h, w; 0–100)."""
    return global_transfer(l, reference.lab()).reshape(-1, 2).mean(axis=0)


def predict(models: Models, l_batch: np.ndarray, references: list[list[Reference]],
            times: StageTimes | None = None, features: TargetFeatures | None = None,
            chosen: bool = False, chosen_cast: float = 0.0) -> list[Prediction]:
    """Colorize a batch of same-size targets.

    l_batch: (B, 1, h, w) float32 L/100, h and w multiples of 16. references: for each target, one
    or more prepared references (features filled). ``features``: the targets' own VGG pass where it
    was already run (for retrieval). ``chosen``: the references were chosen by hand (not retrieved); a target
    coloured from one of them alone is given its matched colour (``MATCHED_AB``) and moves its mean colour
    ``chosen_cast`` of the way to that reference's (``CHOSEN_REFERENCE_CAST``). Returns one Prediction per target.
    """
    times = times if times is not None else StageTimes()
    t0 = time.perf_counter()
    targets = features or models.target_features(l_batch)
    t1 = time.perf_counter()
    lone_chosen = [chosen and len(refs) == 1 for refs in references]
    rows = unet_rows(models, l_batch, references, targets, lone_chosen)
    t2 = time.perf_counter()
    ab, trust = models.unet.run(rows.feeds)
    t3 = time.perf_counter()
    times.features += t1 - t0
    times.correspondence += t2 - t1
    times.unet += t3 - t2
    x = rows.feeds["x13"]
    predictions = []
    for i in range(len(references)):
        own = np.flatnonzero(rows.owners == i)
        first = own[0]
        colours, l = denormalise_ab(ab[own].mean(axis=0).transpose(1, 2, 0)), l_batch[i, 0] * 100.0
        cast = chosen_cast if lone_chosen[i] else 0.0
        if cast:
            colours = colours + cast * (reference_cast(l, references[i][0]) - colours.reshape(-1, 2).mean(axis=0))
        predictions.append(Prediction(
            colours, l, trust[own, 0].mean(axis=0), x[first], rows.shares[i], rows.similarity[i],
            {name: f[first : first + 1] for name, f in rows.feeds.items() if name != "x13"}, cast))
    return predictions


def working_l(upright: np.ndarray, short_side: int) -> np.ndarray:
    """Upright L (H, W) at working size: (1, 1, h, w) float32 L/100."""
    h, w = working_size(upright.shape[0], upright.shape[1], short_side)
    return normalise_l(resize_plane(upright, h, w))[None, None]


def target_l(scan: Scan, short_side: int) -> np.ndarray:
    """The scan's upright L/100 at working size, (1, 1, h, w) float32."""
    return working_l(to_upright(scan.lightness(), scan.orientation), short_side)


MAX_COLOUR_STRENGTH = 2.0


def check_colour_strength(value: float) -> None:
    """Refuse a ``--colour-strength`` outside 0 (gray) to ``MAX_COLOUR_STRENGTH``."""
    if not 0.0 <= value <= MAX_COLOUR_STRENGTH:
        raise UsageError(f"--colour-strength {value}: use 0 (gray) to {MAX_COLOUR_STRENGTH:g} (twice the model's "
                         "colour); 1 is the model's own")


def render(scan: Scan, prediction: Prediction, lightness: np.ndarray | None = None,
           colour_strength: float = 1.0) -> np.ndarray:
    """Full-resolution RGB (stored orientation, the scan's bit depth) with the scan's own L, the predicted
    chroma scaled by ``colour_strength``."""
    lightness = scan.lightness() if lightness is None else lightness
    ab_low = from_upright(prediction.ab, scan.orientation)
    l_low = from_upright(prediction.l, scan.orientation)
    dtype = np.uint16 if scan.bit_depth == 16 else np.uint8
    return recombine(lightness, ab_low, l_low, dtype, colour_strength=colour_strength)
