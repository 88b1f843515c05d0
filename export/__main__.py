"""``python -m export --checkpoint runs/cpu-small/last.pt``: write the ONNX graphs into the package."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help="Export the networks to ONNX (package assets + registry).")


@app.command()
def main(
    checkpoint: Path = typer.Option(None, help="training checkpoint for the U-Net (omit to keep the packaged one)"),
    unet_only: bool = typer.Option(False, "--unet-only", help="write only the U-Net; keep the VGG and correspondence graphs"),
) -> None:
    """Export VGG templates, the correspondence and (with --checkpoint) the U-Net.

    Example: python -m export --checkpoint runs/cpu-small/last.pt
    """
    from export.onnx_export import export_all

    if unet_only and checkpoint is None:
        raise typer.BadParameter("--unet-only needs --checkpoint")
    registry = export_all(checkpoint, unet_only=unet_only)
    for name, entry in registry["models"].items():
        typer.echo(f"{name:16} {entry['size']:>10,} B  {entry['sha256'][:12]}  {entry['file']}")


if __name__ == "__main__":
    app()
