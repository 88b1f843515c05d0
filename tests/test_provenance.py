"""The sidecar as a typed record: written and read through the schema, on a real run's output."""

import json
from dataclasses import replace

import pytest
from PIL import Image

from archivecolor.provenance import OutputRecord, Sidecar, SourceRecord, read_sidecar, verify, write_sidecar
from archivecolor.runner import RunOptions, colorize_folder
from tests.conftest import ROOT, colour_photos, gray_of


@pytest.fixture(scope="module")
def run(tmp_path_factory, models_home):
    root = tmp_path_factory.mktemp("prov")
    scans = root / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(colour_photos(1, (192, 128))[0])).save(scans / "one.png")
    out = root / "out"
    report = colorize_folder(scans, RunOptions(out=out, reference=ROOT / "examples" / "references" / "kodim05.jpg"))
    assert report.count("done") == 1
    return out


def test_a_written_sidecar_reads_back_as_the_same_record(run):
    record = read_sidecar(run / "one.png.json")
    assert isinstance(record, Sidecar)
    assert isinstance(record.source, SourceRecord) and isinstance(record.output, OutputRecord)
    assert record.source.path == "one.png" and record.source.root == "../scans"
    assert (record.source.width, record.source.height, record.output.format) == (192, 128, "PNG")
    assert record.parameters["precision"] == "fp32" and set(record.models) == {"vgg16_features", "correspondence", "unet"}
    assert Sidecar.from_document(record.to_document()) == record
    document = json.loads((run / "one.png.json").read_text())
    assert record.to_document() == document  # the file holds exactly the record


def test_an_invalid_record_is_never_written(run, tmp_path):
    record = read_sidecar(run / "one.png.json")
    broken = replace(record, models={"unet": "not a sha256"})
    with pytest.raises(ValueError, match="refusing to write an invalid sidecar.*models"):
        write_sidecar(tmp_path / "x.png", broken)
    assert not (tmp_path / "x.png.json").exists()


def test_verify_names_a_sidecar_that_breaks_the_schema(run, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(run, out)
    (tmp_path / "scans").symlink_to(run.parent / "scans")
    document = json.loads((out / "one.png.json").read_text())
    document["output"]["bit_depth"] = "eight"
    (out / "one.png.json").write_text(json.dumps(document))
    report = verify(out)
    assert report.ok == [] and len(report.unreadable) == 1
    assert "one.png.json" in report.unreadable[0] and "bit_depth" in report.unreadable[0]
    assert report.orphaned == ["one.png"]  # without a valid sidecar, nothing certifies the output
