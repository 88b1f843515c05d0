import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from archivecolor import __version__
from archivecolor.cli import app

runner = CliRunner()


def _commands(group: typer.Typer, prefix=()):
    for cmd in group.registered_commands:
        yield (*prefix, cmd.name or cmd.callback.__name__.replace("_", "-")), cmd.callback
    for sub in group.registered_groups:
        yield from _commands(sub.typer_instance, (*prefix, sub.name))


def test_version_and_help():
    assert runner.invoke(app, ["--version"]).output.strip() == f"archivecolor {__version__}"
    assert "Colorize archival grayscale scans" in runner.invoke(app, ["--help"]).output


@pytest.mark.parametrize("path,callback", list(_commands(app)), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_command_has_help_with_an_example(path, callback):
    assert callback.__doc__ and "Example: archivecolor" in callback.__doc__, path
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_errors_are_one_line_with_exit_codes(tmp_path):
    missing = runner.invoke(app, ["catalog", "stats", "--catalog", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 1 and missing.output.startswith("Error: ") and "Traceback" not in missing.output
    usage = runner.invoke(app, ["verify", str(tmp_path / "nope")])
    assert usage.exit_code == 2 and "not a folder" in usage.output


def test_inference_commands_do_not_import_torch():
    code = ("import sys; import archivecolor.cli, archivecolor.runner, archivecolor.catalog, archivecolor.pipeline; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_models_list_shows_providers(models_home):
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "CPUExecutionProvider" in result.output and "unet" in result.output


def test_bench_modes_cannot_be_combined_by_mistake(tmp_path):
    both = runner.invoke(app, ["bench", str(tmp_path), "--pairs", str(tmp_path)])
    assert both.exit_code == 2 and "one benchmark at a time" in both.output
    speed_only = runner.invoke(app, ["bench", str(tmp_path), "--top-k", "3"])
    assert speed_only.exit_code == 2 and "only apply to --speed" in speed_only.output
    retrieval_and_speed = runner.invoke(app, ["bench", "--retrieval", "--speed", str(tmp_path)])
    assert retrieval_and_speed.exit_code == 2 and "--retrieval and --speed" in retrieval_and_speed.output


def test_bench_from_the_command_line_writes_a_report_of_the_chosen_methods(tmp_path, models_home):
    from PIL import Image

    from tests.conftest import colour_photos

    photos = colour_photos(4, (128, 96))
    tests, refs = tmp_path / "tests", tmp_path / "refs"
    for folder, picked in ((tests, photos[:2]), (refs, photos[2:])):
        folder.mkdir()
        for i, photo in enumerate(picked):
            Image.fromarray(photo).save(folder / f"{folder.name}{i}.png")
    out = tmp_path / "report"
    result = runner.invoke(app, ["bench", str(tests), "--references", str(refs), "--methods", "gray,exemplar",
                                 "--size", "96", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["methods"]) == {"gray", "exemplar"} and saved["methods"]["exemplar"]["n"] == 2
    assert "exemplar" in result.output and (out / "report.md").stat().st_size > 0
    unknown = runner.invoke(app, ["bench", str(tests), "--references", str(refs), "--methods", "gray,sepia"])
    assert unknown.exit_code == 2 and "sepia" in unknown.output
    # --same-scene: no catalogue, and every method but top-k, which needs several references.
    same = runner.invoke(app, ["bench", str(tests), "--same-scene", "--size", "96", "--out", str(tmp_path / "same")])
    assert same.exit_code == 0, same.output
    assert list(json.loads((tmp_path / "same" / "report.json").read_text())["methods"]) == [
        "gray", "global", "warp-only", "exemplar"]
    with_catalogue = runner.invoke(app, ["bench", str(tests), "--same-scene", "--references", str(refs)])
    assert with_catalogue.exit_code == 2 and "leave out --catalog and --references" in with_catalogue.output
