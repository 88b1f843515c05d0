"""``python -m export --checkpoint runs/cpu-small/last.pt``: write the ONNX graphs into the package."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, help="Export the networks to ONNX (package assets + registry).")


@app.command()
def main(
    checkpoint: Path = typer.Option(None, help="training checkpoint for the U-Net (omit to keep the packaged one)"),
    unet_only: bool = typer.Option(False, "--unet-only", help="write only the U-Net (same as --graph unet)"),
    graph: list[str] = typer.Option(
        None, "--graph", help="write only this graph (features, correspondence or unet; repeatable); the others "
        "stay byte for byte, and keeping features keeps catalogues valid"),
    calibration_photos: Path = typer.Option(
        None, "--calibration-photos", help="rewrite the packaged int8 calibration photos from this folder of "
        "Prokudin-Gorskii colour reconstructions (../shared/data/prokudin-gorskii/colour)"),
    chroma_gain: float = typer.Option(
        1.0, min=0.5, max=2.0, help="scale the U-Net's output ab by this (chosen on validation photos: bolder "
        "colour for some PSNR; the model card gives the shipped model's)"),
    ensemble_with: list[Path] = typer.Option(
        None, "--ensemble-with", exists=True, dir_okay=False, help="an exported U-Net graph (.onnx) that joins the "
        "checkpoint's network in an ensemble (repeatable): each of a scan's reference turns goes to another network, "
        "these first; --chroma-gain then applies to the ensemble"),
) -> None:
    """Export VGG templates, the correspondence and (with --checkpoint) the U-Net.

    Example: python -m export --checkpoint runs/cpu-small/last.pt
    """
    from export.onnx_export import GRAPHS, export_all

    if calibration_photos is not None:
        from export.calibration import write_calibration_photos

        for path in write_calibration_photos(calibration_photos):
            typer.echo(f"calibration photo {path}")
        if not graph and not unet_only and checkpoint is None:
            return
    graphs = tuple(graph or (["unet"] if unet_only else GRAPHS))
    unknown = sorted(set(graphs) - set(GRAPHS))
    if unknown:
        raise typer.BadParameter(f"unknown graph {', '.join(unknown)}; choose from {', '.join(GRAPHS)}",
                                 param_hint="--graph")
    if graphs == ("unet",) and checkpoint is None:
        raise typer.BadParameter("exporting only the U-Net needs --checkpoint")
    if ensemble_with and (checkpoint is None or "unet" not in graphs):
        raise typer.BadParameter("an ensemble is made with the U-Net: add --checkpoint (and --graph unet)",
                                 param_hint="--ensemble-with")
    try:
        registry = export_all(checkpoint, graphs=graphs, chroma_gain=chroma_gain,
                              ensemble_with=tuple(ensemble_with or ()))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ensemble-with") from exc
    for name, entry in registry["models"].items():
        typer.echo(f"{name:16} {entry['size']:>10,} B  {entry['sha256'][:12]}  {entry['file']}")


if __name__ == "__main__":
    app()
