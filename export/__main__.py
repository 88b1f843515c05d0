"""``python -m export --checkpoint runs/cpu-small/last.pt``: write the ONNX graphs into the package."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help="Export the networks to ONNX (package assets + registry).")


@app.command()
def main(
    checkpoint: Path = typer.Option(None, help="training checkpoint for the U-Net (omit to keep the packaged one)"),
) -> None:
    """Export VGG templates, the correspondence and (with --checkpoint) the U-Net.

    Example: python -m export --checkpoint runs/cpu-small/last.pt
    """
    from export.onnx_export import export_all

    registry = export_all(checkpoint)
    for name, entry in registry["models"].items():
        typer.echo(f"{name:16} {entry['size']:>10,} B  {entry['sha256'][:12]}  {entry['file']}")


if __name__ == "__main__":
    app()
