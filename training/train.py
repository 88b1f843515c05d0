"""The training loop: AdamW on a robust ab loss + perceptual loss + a colourfulness hinge; checkpointed, resumable.

Plain L2 on ab rewards the mean of the plausible colours, which is gray: the textbook cause of muted
output. Smooth-L1 rewards the median instead, and a one-sided hinge on each image's mean chroma
penalises only a prediction that is duller than the truth.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from archivecolor.models.layout import L_CHANNEL, WARPED_AB
from archivecolor.nets.colour import lab_to_rgb
from archivecolor.nets.unet import ColorUNet, load_checkpoint, unet_from_graph
from archivecolor.nets.vgg import VGGFeatures
from training.config import TrainConfig
from training.data import Batch, OnlinePairs, PairCache, build_pairs, list_photos, split

SMOOTH_L1_BETA = 0.04  # in ab/128 units (about 5 ab units): L2 below, L1 above
DEEP_PERCEPTUAL_LAYERS = 26  # VGG-16 up to relu5_1, the layer of He et al.'s perceptual loss


def chroma(ab: torch.Tensor) -> torch.Tensor:
    """Per-pixel chroma (B, 1, H, W) of ab/128 (B, 2, H, W)."""
    return ab.pow(2).sum(dim=1, keepdim=True).add(1e-8).sqrt()


def colourfulness_hinge(ab_pred: torch.Tensor, ab_true: torch.Tensor, target: float = 1.0) -> torch.Tensor:
    """How much duller than ``target`` × the truth the prediction is, per image mean chroma; zero when vivid enough."""
    shortfall = target * chroma(ab_true).mean(dim=(1, 2, 3)) - chroma(ab_pred).mean(dim=(1, 2, 3))
    return F.relu(shortfall).mean()


HISTOGRAM_BINS = 12  # per axis, over ab/128 in [-0.75, 0.75] (ab ±96)
HISTOGRAM_POOL = 4  # histograms of the 4x4-averaged ab: the colour distribution, not the texture


def soft_histogram(ab: torch.Tensor) -> torch.Tensor:
    """Differentiable ab histograms (B, bins²) of ab/128 (B, 2, H, W): Gaussian votes into a fixed grid."""
    ab = F.avg_pool2d(ab, HISTOGRAM_POOL).flatten(2)  # (B, 2, N)
    centres = torch.linspace(-0.75, 0.75, HISTOGRAM_BINS, device=ab.device)
    sigma = centres[1] - centres[0]
    votes_a = torch.exp(-0.5 * ((ab[:, :1] - centres.view(1, -1, 1)) / sigma) ** 2)  # (B, bins, N)
    votes_b = torch.exp(-0.5 * ((ab[:, 1:] - centres.view(1, -1, 1)) / sigma) ** 2)
    hist = torch.einsum("bin,bjn->bij", votes_a, votes_b).flatten(1)
    return hist / hist.sum(dim=1, keepdim=True).clamp(min=1e-8)


def histogram_distance(ab_pred: torch.Tensor, ab_true: torch.Tensor) -> torch.Tensor:
    """Mean squared Hellinger distance between the soft ab histograms, in [0, 2]."""
    root_pred = soft_histogram(ab_pred).add(1e-8).sqrt()
    root_true = soft_histogram(ab_true).add(1e-8).sqrt()
    return (root_pred - root_true).pow(2).sum(dim=1).mean()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_slim(ckpt: dict, model: dict[str, torch.Tensor], out: Path, **extra) -> dict:
    """Write ``model`` (floating-point tensors as float16: loading casts them back) with ``ckpt``'s epoch,
    configuration and history, no optimiser, atomically; returns what was written."""
    slim = {k: ckpt[k] for k in ("epoch", "config", "history", "backbone", "weight_source") if k in ckpt}
    slim.update(extra, model={k: v.half() if v.is_floating_point() else v for k, v in model.items()})
    tmp = out.with_name(out.name + ".tmp")
    torch.save(slim, tmp)
    tmp.replace(out)
    return slim


def slim_checkpoint(checkpoint: Path, out: Path) -> int:
    """Write ``checkpoint``'s model, configuration and history without the optimiser, floating-point tensors
    as float16; returns the bytes written."""
    ckpt = load_checkpoint(checkpoint)
    write_slim(ckpt, ckpt["model"], out)
    return out.stat().st_size


def average_checkpoints(checkpoints: list[Path], out: Path) -> dict:
    """Write the mean of ``checkpoints``' weights (BatchNorm statistics too) as a slim checkpoint with the last one's
    configuration and history; returns it. Late epochs of one run scatter around a good point (their validation
    PSNR spread over 0.5 dB on the first GPU run), and their mean lies nearer it than a single one; unlike the
    epoch with the best validation PSNR, a mean of epochs fixed in advance is not picked on the validation photos,
    so they can still judge it."""
    if not checkpoints:
        raise ValueError("no checkpoints to average")
    loaded = [load_checkpoint(path) for path in checkpoints]
    last = loaded[-1]
    mismatched = [str(path) for path, c in zip(checkpoints, loaded) if c["model"].keys() != last["model"].keys()]
    if mismatched:
        raise ValueError(f"{', '.join(mismatched)}: another network than {checkpoints[-1]}'s; average one run's epochs")
    # counters (BatchNorm's batches seen) are not averaged: the last one's
    model = {name: sum(c["model"][name].float() for c in loaded) / len(loaded) if tensor.is_floating_point() else tensor
             for name, tensor in last["model"].items()}
    return write_slim(last, model, out, averaged_epochs=[int(c["epoch"]) for c in loaded])


def psnr_rgb(l01: torch.Tensor, ab_pred: torch.Tensor, ab_true: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB, MAX=1) between the RGB images of two ab predictions on the same L."""
    a = lab_to_rgb(l01, ab_pred)
    b = lab_to_rgb(l01, ab_true)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return -10.0 * torch.log10(mse)


class Trainer:
    def __init__(self, config: TrainConfig, data_root: Path, out: Path, device: str = "auto",
                 weights: Path | None = None, console: Console | None = None, pairs_dir: Path | None = None,
                 workers: int = 0) -> None:
        self.config = config
        self.workers = workers
        self.out = out
        self.console = console or Console()
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick its fastest convolutions
        seed_everything(config.seed)
        self.vgg, self.weight_source = VGGFeatures.pretrained(weights, download_dir=out / "downloads")
        self.vgg.to(self.device)
        photos = list_photos(data_root)
        if not photos:
            raise SystemExit(f"no training photos under {data_root}; pass --data pointing at shared/data")
        _, val_photos = split(photos, config.validation_every)
        held_out = set(val_photos)
        per = 1 + config.retrieved_per_photo
        self.online = None
        if config.online_pairs:
            # Online runs draw their training pairs at each step: only the validation photos' are precomputed.
            self.online = OnlinePairs(photos, held_out, config, self.vgg, self.device)
            self.pairs = self._pairs(photos, held_out, pairs_dir or out / f"pairs-{config.size}-val", True,
                                     (self.online.colour, self.online.views, self.online.ranked))
            self.train_photos = [i for i, path in enumerate(self.online.colour) if path not in held_out]
        else:
            folder = pairs_dir or out / f"pairs-{config.size}"
            self.pairs = self._pairs(photos, held_out, folder, False)
            if self.pairs.validation_only:
                raise SystemExit(f"{folder}: holds only the validation pairs (an online run made it); pass --pairs "
                                 "with another folder to precompute every photo's pairs")
            self.train_photos = [i for i in range(len(self.pairs.meta) // per) if self.pairs.meta[i * per]["split"] == "train"]
        self.val_rows = [row for turns in self.pairs.validation_turns() for row in turns]
        self.model = ColorUNet(width=config.width, semantic=config.semantic,
                               second_opinion=config.second_opinion).to(self.device)
        self.optimiser = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.epoch = 0
        self.history: list[dict] = []

    def _pairs(self, photos: list[Path], held_out: set[Path], folder: Path, validation_only: bool,
               neighbours: tuple | None = None) -> PairCache:
        with self._progress() as bar:
            task = bar.add_task("pairs", total=len(photos))
            return build_pairs(photos, folder, self.config, self.vgg, self.device, held_out=held_out,
                               progress=lambda done, total: bar.update(task, completed=done, total=total),
                               validation_only=validation_only, neighbours=neighbours)

    def _progress(self) -> Progress:
        return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)

    # --- checkpoints -------------------------------------------------------------------------
    def save(self) -> None:
        ckpt = {
            "model": self.model.state_dict(), "optimiser": self.optimiser.state_dict(), "epoch": self.epoch,
            "config": self.config.as_dict(), "history": self.history, "backbone": "vgg16",
            "weight_source": self.weight_source.__dict__,
            "rng": {"python": list(random.getstate()[1]), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
                    "numpy_pos": int(np.random.get_state()[2]), "torch": torch.get_rng_state()},
        }
        tmp = self.out / "last.pt.tmp"
        torch.save(ckpt, tmp)
        tmp.replace(self.out / "last.pt")
        (self.out / "history.json").write_text(json.dumps(self.history, indent=2))

    def initialise(self, checkpoint: Path) -> None:
        """Start from another run's weights (epoch, optimiser and history start afresh). Where this U-Net's first
        convolution reads more channels than the checkpoint's (a second opinion), the new channels start at
        zero, so the network starts as the checkpoint's and learns to use them. An exported graph (``.onnx``, such
        as the packaged model, whose training checkpoint may be gone) gives its weights too; its BatchNorms are
        folded, so they stay frozen (``frozen_batchnorm``)."""
        if checkpoint.suffix == ".onnx":
            self.initialise_from_graph(checkpoint)
            return
        state = load_checkpoint(checkpoint, self.device)["model"]
        own = self.model.state_dict()
        for name, tensor in state.items():
            if name in own and own[name].shape != tensor.shape and own[name].dim() == 4 \
                    and own[name].shape[1] > tensor.shape[1] and own[name].shape[0] == tensor.shape[0]:
                wide = torch.zeros_like(own[name])
                wide[:, : tensor.shape[1]] = tensor
                state[name] = wide
        self.model.load_state_dict(state)

    def initialise_from_graph(self, path: Path) -> None:
        try:
            net = unet_from_graph(path, member=None)
        except ValueError as exc:
            raise SystemExit(str(exc)) from exc
        wanted = (self.config.width, self.config.semantic, self.config.second_opinion)
        if (net.width, net.semantic, net.second_opinion) != wanted:
            raise SystemExit(f"{path}: a U-Net of width {net.width}, semantic prior {net.semantic}, second opinion "
                             f"{net.second_opinion}; --config {self.config.name} trains width {wanted[0]}, "
                             f"{wanted[1]}, {wanted[2]}: pick a configuration that matches it")
        self.model.load_state_dict(net.state_dict())
        self.config = replace(self.config, frozen_batchnorm=True)

    def train_mode(self) -> None:
        self.model.train()
        if self.config.frozen_batchnorm:
            for module in self.model.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.eval()

    def resume(self) -> bool:
        path = self.out / "last.pt"
        if not path.exists():
            return False
        ckpt = load_checkpoint(path, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.optimiser.load_state_dict(ckpt["optimiser"])
        self.epoch = ckpt["epoch"]
        self.history = ckpt["history"]
        # A run fitted to its time (--fit-to-time) goes on with the schedule it was fitted to.
        saved = ckpt.get("config", {})
        self.config = replace(self.config, epochs=saved.get("epochs", self.config.epochs),
                              decay_from=saved.get("decay_from", self.config.decay_from),
                              frozen_batchnorm=saved.get("frozen_batchnorm", False))
        rng = ckpt["rng"]
        random.setstate((3, tuple(rng["python"]), None))
        np.random.set_state(("MT19937", rng["numpy"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
        torch.set_rng_state(rng["torch"].cpu())
        return True

    # --- steps ---------------------------------------------------------------------------------
    def _batch(self, cache: PairCache, rows: list[int]) -> Batch:
        """The 13-channel inputs, the true ab, the target features (for the semantic prior) and which pairs
        have a retrieved reference, of ``rows``."""
        rows = sorted(rows)

        def tensor(array: np.ndarray, index: list[int] | tuple[list[int], slice]) -> torch.Tensor:
            return torch.from_numpy(np.asarray(array[index], dtype=np.float32)).to(self.device)

        photos = [cache.photo_of(r) for r in rows]
        semantic = [tensor(a, photos) for a in cache.semantic.values()] if self.config.semantic else []
        retrieved = torch.tensor([cache.meta[r]["kind"] == "retrieved" for r in rows], device=self.device)
        second = None
        if self.config.second_opinion:
            # Only the two warped-ab channels of those rows are read, not all 13.
            second = tensor(cache.x, ([cache.second_of(r) for r in rows], WARPED_AB))
        return Batch(tensor(cache.x, rows), tensor(cache.ab, rows), semantic, retrieved, second)

    def _features(self, rgb: torch.Tensor, deep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Channel-normalised perceptual features of RGB images: the configured layer, and relu5_1 if ``deep``."""
        h = (rgb - self.vgg.mean) / self.vgg.std
        shallow = None
        for i, layer in enumerate(self.vgg.features[: DEEP_PERCEPTUAL_LAYERS if deep else self.config.perceptual_layers]):
            h = layer(h)
            if i == self.config.perceptual_layers - 1:
                shallow = h
        return F.normalize(shallow, dim=1), F.normalize(h, dim=1) if deep else None

    def loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, ab_true = batch.x, batch.ab
        ab_pred, _ = self.model(x, *batch.inputs())
        cfg = self.config
        spec = cfg.loss_at(self.epoch)
        if spec.pixel == "smooth_l1":
            pixel = F.smooth_l1_loss(ab_pred, ab_true, beta=SMOOTH_L1_BETA, reduction="none")
        else:
            pixel = F.mse_loss(ab_pred, ab_true, reduction="none")
        # Per pair, so a retrieved reference's pixel term can weigh less than a self reference's.
        pixel_weight = torch.where(batch.retrieved, spec.retrieved_pixel_weight, 1.0)
        pixel = (pixel.mean(dim=(1, 2, 3)) * pixel_weight).mean()
        l01 = x[:, L_CHANNEL]
        deep = spec.deep_perceptual_weight > 0
        with torch.no_grad():
            target, target_deep = self._features(lab_to_rgb(l01, ab_true), deep)
        pred, pred_deep = self._features(lab_to_rgb(l01, ab_pred), deep)
        perceptual = F.mse_loss(pred, target)
        hinge = colourfulness_hinge(ab_pred, ab_true, spec.colourfulness_target)
        total = pixel + cfg.perceptual_weight * perceptual + spec.colourfulness_weight * hinge
        if deep:
            per_pair = (pred_deep - target_deep).pow(2).mean(dim=(1, 2, 3))
            total = total + spec.deep_perceptual_weight * (per_pair * batch.retrieved).mean()
        if spec.histogram_weight:
            total = total + spec.histogram_weight * histogram_distance(ab_pred, ab_true)
        return total, ab_pred

    def epoch_rows(self) -> list[int]:
        """One pair per photo: its self reference at the configured rate, else a retrieved one. With
        online pairs, the photos themselves: each draw makes its own pair."""
        if self.online is not None:
            photos = list(self.train_photos)
            random.shuffle(photos)
            return photos
        per = 1 + self.config.retrieved_per_photo
        rows = []
        for photo in self.train_photos:
            k = 0 if random.random() < self.config.self_reference_rate else random.randint(1, per - 1)
            rows.append(photo * per + k)
        random.shuffle(rows)
        return rows

    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        rows = self.val_rows
        model_psnr, gray_psnr, warp_psnr, losses, pred_chroma, true_chroma = [], [], [], [], [], []
        for start in range(0, len(rows), 16):
            batch = self._batch(self.pairs, rows[start : start + 16])
            x, ab = batch.x, batch.ab
            loss, pred = self.loss(batch)
            losses.append(loss.item() * len(x))
            l01 = x[:, L_CHANNEL]
            model_psnr.append(psnr_rgb(l01, pred, ab))
            gray_psnr.append(psnr_rgb(l01, torch.zeros_like(ab), ab))
            warp_psnr.append(psnr_rgb(l01, x[:, WARPED_AB], ab))
            pred_chroma.append(chroma(pred).mean(dim=(1, 2, 3)))
            true_chroma.append(chroma(ab).mean(dim=(1, 2, 3)))
        self.train_mode()
        return {
            "val_loss": sum(losses) / len(rows),
            "val_psnr": torch.cat(model_psnr).mean().item(),
            "val_psnr_gray": torch.cat(gray_psnr).mean().item(),
            "val_psnr_warp": torch.cat(warp_psnr).mean().item(),
            # Mean chroma of the prediction over the truth's: 1.0 is as vivid as the photos.
            "val_chroma_ratio": (torch.cat(pred_chroma).mean() / torch.cat(true_chroma).mean()).item(),
        }

    def epoch_batches(self, rows: list[int]) -> Iterator[Batch]:
        """The batches of one epoch's ``rows``, each mirrored at random. Online pairs are drawn by
        ``self.workers`` processes (0: here), each batch from its own seed, so the run is the same whatever
        the number of workers."""
        size = self.config.batch_size
        chunks = [rows[start : start + size] for start in range(0, len(rows) - size + 1, size)]
        if self.online is not None:
            seeds = [random.getrandbits(32) for _ in chunks]
            batches = self.online.batches(chunks, seeds, self.config.self_reference_rate, self.config.semantic,
                                          self.config.second_opinion, self.workers)
        else:
            batches = (self._batch(self.pairs, chunk) for chunk in chunks)
        for batch in batches:
            yield batch.flipped() if random.random() < 0.5 else batch

    def fit(self, epochs: int | None = None, max_minutes: float | None = None, fit_to_time: bool = False) -> list[dict]:
        """Train to ``epochs``; with ``max_minutes``, stop after the first epoch that ends past that time
        (every epoch is checkpointed, so ``--resume`` carries on). With ``fit_to_time`` instead, the second
        epoch's duration (the first one warms up: 2-4x slower on a GPU) sets the run's length to the epochs that
        fit in ``max_minutes`` (at least one more, never more than asked) and scales the learning-rate decay to
        it, and the run goes to that end: a run on a machine of unknown speed still finishes its schedule,
        about in time."""
        total = epochs or self.config.epochs
        deadline = None if max_minutes is None else time.time() + 60 * max_minutes
        timed = 0  # epochs of this call; the second one's duration is the estimate (the first warms up)
        self.train_mode()
        with self._progress() as bar:
            task = bar.add_task("epochs", total=total, completed=self.epoch)
            while self.epoch < total:
                started = time.time()
                for group in self.optimiser.param_groups:
                    group["lr"] = self.config.lr_at(self.epoch, total)
                rows = self.epoch_rows()
                running = 0.0
                steps = 0
                sub = bar.add_task(f"epoch {self.epoch + 1}", total=len(rows) // self.config.batch_size)
                for batch in self.epoch_batches(rows):
                    loss, _ = self.loss(batch)
                    self.optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimiser.step()
                    running += loss.item()
                    steps += 1
                    bar.advance(sub)
                bar.remove_task(sub)
                self.epoch += 1
                record = {"epoch": self.epoch, "train_loss": running / max(1, steps),
                          "lr": self.optimiser.param_groups[0]["lr"],
                          "seconds": round(time.time() - started, 1), **self.validate()}
                self.history.append(record)
                self.save()
                if self.config.keep_epochs:
                    shutil.copyfile(self.out / "last.pt", self.out / f"epoch{self.epoch}.pt")
                self.console.print(
                    f"epoch {record['epoch']}: loss {record['train_loss']:.4f} val PSNR {record['val_psnr']:.2f} dB "
                    f"(gray {record['val_psnr_gray']:.2f}, warp {record['val_psnr_warp']:.2f}) "
                    f"chroma {record['val_chroma_ratio']:.2f} of the truth's, {record['seconds']} s"
                )
                timed += 1
                if fit_to_time and deadline is not None and timed == 2 and self.epoch < total:
                    fits = self.epoch + int((deadline - time.time()) / (time.time() - started))
                    if fits < total:
                        self.config = self.config.scaled_to(max(self.epoch + 1, fits), total)
                        total = self.config.epochs
                        self.console.print(f"{total} epochs fit in {max_minutes} minutes; the schedule is scaled "
                                           f"to them (decay from epoch {self.config.decay_from})")
                bar.update(task, completed=self.epoch, total=total)
                if deadline is not None and not fit_to_time and time.time() > deadline and self.epoch < total:
                    self.console.print(f"stopped after epoch {self.epoch}: past {max_minutes} minutes; --resume goes on")
                    break
        return self.history
