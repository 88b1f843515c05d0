"""Named training configurations."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

TRAIN_FOLDERS = ("imagenet-1k-samples", "sun-hays80", "urban100")
TEST_FOLDERS = ("kodak24", "cbsd68", "mcmaster18", "prokudin-gorskii")


@dataclass(frozen=True)
class LossSpec:
    """The ab loss of a training stage: a pixel term, plus a one-sided colourfulness hinge that only a
    prediction duller than ``colourfulness_target`` × the truth's mean chroma pays."""

    pixel: str = "l2"  # l2 (what PSNR measures) or smooth_l1 (the median: bolder colours)
    colourfulness_weight: float = 1.0
    colourfulness_target: float = 0.85
    # Soft ab-histogram distance to the truth's (Hellinger): asks for the truth's spread of colours, which
    # L2's pull to the mean takes away, without rewarding a wrong warped colour as the mean-chroma hinge did.
    histogram_weight: float = 0.0
    # He et al.'s two branches: a pair whose reference is another photo cannot say which of the plausible
    # colours the truth has, so an L2 on its ab teaches the mean, gray. Their perceptual branch trains such
    # pairs on deep features alone (pixel weight 0) and keeps the pixel loss for self references.
    retrieved_pixel_weight: float = 1.0
    # relu5_1 term on retrieved-reference pairs; its mean is about 1/30 of a self pair's smooth-L1 on the
    # shipped model, so 30 gives the two branches about equal say.
    deep_perceptual_weight: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    name: str
    size: int  # square training crops, a multiple of 16
    width: int  # U-Net base width
    epochs: int
    batch_size: int = 8
    lr: float = 2e-4
    # Cosine decay of the learning rate from this (0-based) epoch to ``lr * final_lr_fraction`` at the last
    # epoch; None keeps it constant.
    decay_from: int | None = None
    final_lr_fraction: float = 0.05
    weight_decay: float = 1e-4
    perceptual_weight: float = 0.1
    perceptual_layers: int = 16  # VGG-16 up to relu3_3: deeper layers judge colour by what the object is
    # (until epoch, loss) stages; the last one lasts to the end. The default is the schedule the shipped
    # model was trained with: bold colours first (smooth-L1, hinge at the truth's chroma), one epoch of
    # L2 with a hinge at 85%, then plain L2 (the hinge stages raised validation chroma to 1.2-1.4x the
    # truth's by trusting the warped reference, and cost PSNR: see the model card).
    schedule: tuple[tuple[int, LossSpec], ...] = (
        (2, LossSpec(pixel="smooth_l1", colourfulness_weight=0.5, colourfulness_target=1.0)),
        (3, LossSpec(pixel="l2", colourfulness_weight=1.0, colourfulness_target=0.85)),
        (10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),
    )
    semantic: bool = True  # the U-Net reads the target's VGG features
    self_reference_rate: float = 0.35  # the rest are retrieved (imperfect) references
    retrieved_per_photo: int = 2
    # Train on pairs made afresh at each step (a new crop and reference view every draw) rather than on the
    # precomputed ones, which then serve validation only. On 2 CPU cores it doubles a step.
    online_pairs: bool = False
    # The U-Net also reads a second reference's warped ab: where two references agree, the colour is likely right.
    second_opinion: bool = False
    # The U-Net reads the reference's matched colour (nets.correspondence) in place of its warped ab, for every pair.
    # The pipeline gives it only to a reference chosen by hand: a network trained so would need it for all.
    matched_colour: bool = False
    keep_epochs: bool = True  # a copy of each epoch's checkpoint (epoch<N>.pt), to pick the model from
    # BatchNorms in eval mode while training: a network started from an exported graph has its BatchNorms folded
    # into the convolutions, their statistics gone (set by `--init GRAPH.onnx`)
    frozen_batchnorm: bool = False
    validation_every: int = 20  # every n-th photo (sorted) is held out
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def scaled_to(self, epochs: int, planned: int | None = None) -> TrainConfig:
        """This configuration run for ``epochs`` instead of ``planned`` (default: its own count), the
        learning-rate decay starting at the same fraction of the run. The loss stages keep their epochs."""
        planned = planned or self.epochs
        decay_from = None if self.decay_from is None else round(self.decay_from * epochs / planned)
        return replace(self, epochs=epochs, decay_from=decay_from)

    def loss_at(self, epoch: int) -> LossSpec:
        """The loss of (0-based) ``epoch``."""
        return next((spec for until, spec in self.schedule if epoch < until), self.schedule[-1][1])

    def lr_at(self, epoch: int, epochs: int | None = None) -> float:
        """The learning rate of (0-based) ``epoch`` in a run of ``epochs`` (default: the configuration's)."""
        total = epochs or self.epochs
        if self.decay_from is None or epoch < self.decay_from:
            return self.lr
        progress = min(1.0, (epoch - self.decay_from) / max(1, total - 1 - self.decay_from))
        floor = self.lr * self.final_lr_fraction
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


CONFIGS = {
    # About 2 hours on 2 CPU cores: a narrower U-Net at 160 px.
    "cpu-small": TrainConfig(name="cpu-small", size=160, width=32, epochs=12),
    # cpu-small carried on from its epoch 6 to 12 with the learning rate decayed over the added epochs:
    # epochs 7-9 with a mild colourfulness floor (70% of the truth's chroma) under L2, which made the
    # network as colourful as the truth but cost PSNR and LPIPS (model card), then plain L2 again.
    "cpu-long": TrainConfig(
        name="cpu-long", size=160, width=32, epochs=12, decay_from=6,
        schedule=(
            (2, LossSpec(pixel="smooth_l1", colourfulness_weight=0.5, colourfulness_target=1.0)),
            (3, LossSpec(pixel="l2", colourfulness_weight=1.0, colourfulness_target=0.85)),
            (6, LossSpec(pixel="l2", colourfulness_weight=0.0)),
            (9, LossSpec(pixel="l2", colourfulness_weight=0.3, colourfulness_target=0.7)),
            (10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),
        )),
    # The shipped epoch 4 fine-tuned for 4 epochs on L2 + a soft ab-histogram distance to the truth,
    # with the learning rate halved and decayed (start from a copy of cpu-small/epoch4.pt as last.pt).
    "cpu-hist": TrainConfig(
        name="cpu-hist", size=160, width=32, epochs=8, lr=1e-4, decay_from=4, final_lr_fraction=0.1,
        schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0, histogram_weight=0.2)),)),
    # cpu-small's epoch 4 fine-tuned with He et al.'s two-branch loss: self references keep smooth-L1 on ab,
    # retrieved references are judged by perceptual features only (start from a copy of
    # cpu-small/epoch4.pt as last.pt).
    "cpu-branch": TrainConfig(
        name="cpu-branch", size=160, width=32, epochs=9, lr=1e-4, decay_from=4, final_lr_fraction=0.1,
        schedule=((10**6, LossSpec(pixel="smooth_l1", colourfulness_weight=0.0, retrieved_pixel_weight=0.0,
                                   deep_perceptual_weight=30.0)),)),
    # cpu-small's epoch 4 fine-tuned on online pairs (a fresh crop and reference view at every draw) with
    # plain L2, the learning rate halved and decayed (start from a copy of cpu-small/epoch4.pt as last.pt).
    # Its epoch 8 was the default two models ago.
    "cpu-online": TrainConfig(
        name="cpu-online", size=160, width=32, epochs=8, lr=1e-4, decay_from=4, final_lr_fraction=0.1,
        online_pairs=True, schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),)),
    # cpu-online's epoch 8 given a second opinion (its first convolution widened, the new channels at zero) and
    # fine-tuned 3 epochs on the precomputed pairs, whose two retrieved references per photo are each other's
    # second opinion (its epoch 2 was the previous default):
    # python -m training train --config cpu-second --init runs/cpu-online/epoch8.pt --pairs runs/pairs-160
    "cpu-second": TrainConfig(
        name="cpu-second", size=160, width=32, epochs=3, lr=1e-4, decay_from=0, final_lr_fraction=0.1,
        second_opinion=True, schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),)),
    # cpu-second's epoch 2 (the previous default) carried on with online pairs, each retrieved pair drawing its
    # second opinion from another neighbour: python -m training train --config cpu-second-online
    # --init runs/cpu-second/epoch2.pt --pairs runs/pairs-160. Its epoch 3 is the shipped model, exported with
    # its colour scaled back up: python -m export --checkpoint runs/cpu-second-online/epoch3.pt --graph unet
    # --chroma-gain 1.24 (+0.32 dB on validation but duller, chroma 0.72 of the truth's; the gain, chosen on
    # validation, gives 22.56 dB at 0.88 against the previous default's 22.58 at 0.79; model card)
    "cpu-second-online": TrainConfig(
        name="cpu-second-online", size=160, width=32, epochs=4, lr=6e-5, decay_from=1, final_lr_fraction=0.25,
        online_pairs=True, second_opinion=True, schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),)),
    # cpu-second-online's epoch 3 given one epoch on the precomputed pairs with a mild colourfulness floor
    # (85% of the truth's chroma, weight 0.3) at a low learning rate, to win back the colour that the online
    # epochs lost (it overshot: chroma 1.29, 21.11 dB): python -m training train --config cpu-second-colour
    # --init runs/cpu-second-online/epoch3.pt --pairs runs/pairs-160
    "cpu-second-colour": TrainConfig(
        name="cpu-second-colour", size=160, width=32, epochs=1, lr=3e-5, second_opinion=True,
        schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.3, colourfulness_target=0.85)),)),
    # cpu-second-colour's epoch 1 settled by one epoch of plain L2 on the precomputed pairs: after a colourfulness
    # floor, low-rate L2 gives back most of the PSNR and keeps much of the colour (cpu-long epochs 10-11; here
    # 22.24 dB, chroma 0.88: under the shipped model's 22.50):
    # python -m training train --config cpu-second-settle --init runs/cpu-second-colour/epoch1.pt --pairs runs/pairs-160
    "cpu-second-settle": TrainConfig(
        name="cpu-second-settle", size=160, width=32, epochs=1, lr=5e-5, second_opinion=True,
        schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),)),
    # The shipped recipe and width on a GPU, run by `training/device_job.sh`: online pairs from the start, up to
    # 150 epochs with the second half decayed (--fit-to-time shortens both to the time a lent machine gives);
    # 160 px because the photos travel in the bundle.
    "gpu-online": TrainConfig(name="gpu-online", size=160, width=32, epochs=150, batch_size=16, decay_from=75,
                              online_pairs=True, second_opinion=True),
    # The packaged model trained on from its exported graph on a GPU (its training checkpoint is gone):
    # INIT=archivecolor/models/assets/unet.onnx CONFIG=gpu-finetune bash training/device_job.sh OUT MINUTES. Plain
    # L2, decayed throughout; its BatchNorms stay frozen (they are folded in the graph). One CPU epoch at 5e-5 cost
    # 0.2 dB of validation PSNR at equal chroma, at 1e-5 it held the model within 0.04 dB (model card).
    "gpu-finetune": TrainConfig(name="gpu-finetune", size=160, width=32, epochs=150, batch_size=16, lr=1e-5,
                                decay_from=0, final_lr_fraction=0.2, online_pairs=True, second_opinion=True,
                                schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),)),
    # The packaged model taught the matched colour in place of the warped ab (it was trained on the warp): python -m
    # training train --config cpu-attention --init archivecolor/models/assets/unet.onnx. After one epoch 0.37 dB
    # under the packaged model at equal chroma on its validation pairs (model card, "The matched colour").
    "cpu-attention": TrainConfig(name="cpu-attention", size=160, width=32, epochs=3, batch_size=16, lr=3e-5,
                                 decay_from=0, final_lr_fraction=1 / 3, online_pairs=True, second_opinion=True,
                                 matched_colour=True,
                                 schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),)),
    # The GPU run's best epoch settled for one epoch on online pairs from the full-resolution photos (the bundle's
    # are smaller): python -m training train --config cpu-gpu-settle --init runs/gpu-online/best.pt
    "cpu-gpu-settle": TrainConfig(
        name="cpu-gpu-settle", size=160, width=32, epochs=1, lr=3e-5, online_pairs=True, second_opinion=True,
        schedule=((10**6, LossSpec(pixel="l2", colourfulness_weight=0.0)),)),
    # The 0.1.0 model's recipe, kept for the ablation: L2 + relu2_2 perceptual, no semantic prior.
    "cpu-small-v1": TrainConfig(name="cpu-small-v1", size=160, width=32, epochs=12, perceptual_layers=9,
                                semantic=False, schedule=((10**6, LossSpec(colourfulness_weight=0.0)),)),
    # The seed's schedule for a GPU: 10 epochs at 224 px, full-width U-Net.
    "full": TrainConfig(name="full", size=224, width=64, epochs=10),
}
