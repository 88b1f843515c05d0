"""The whole pipeline on a small fixed input, against a stored output.

A change to the model, the correspondence, the U-Net or the full-size recombination shows up here as a
drop in PSNR against ``tests/golden/church-192.png``. When such a change is intended, regenerate it:
``ARCHIVECOLOR_REGENERATE_GOLDEN=1 pytest tests/test_golden.py`` (and say so in the commit).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from PIL import Image

from archivecolor.imageio import read_image
from archivecolor.runner import RunOptions, colorize_folder
from tests.conftest import ROOT

GOLDEN = ROOT / "tests" / "golden" / "church-192.png"
MIN_PSNR = 40.0  # tolerates ONNX Runtime's numeric differences between versions and machines, nothing more


def test_a_small_scan_colorizes_as_the_stored_golden_output(tmp_path, models_home):
    scans = tmp_path / "scans"
    scans.mkdir()
    with Image.open(ROOT / "examples" / "scans" / "church.jpg") as im:
        small = im.convert("L").resize((192, round(192 * im.height / im.width)), Image.BICUBIC)
    small.save(scans / "church-192.png")
    out = tmp_path / "out"
    report = colorize_folder(scans, RunOptions(out=out, reference=ROOT / "examples" / "references" / "pg-lake.jpg"))
    assert report.count("done") == 1
    produced = out / "church-192.png"
    if os.environ.get("ARCHIVECOLOR_REGENERATE_GOLDEN"):
        shutil.copyfile(produced, GOLDEN)
    ours = read_image(produced).pixels.astype(np.float64)
    golden = read_image(GOLDEN).pixels.astype(np.float64)
    assert ours.shape == golden.shape
    mse = np.mean((ours - golden) ** 2)
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-12))
    assert psnr >= MIN_PSNR, f"{psnr:.1f} dB against {GOLDEN}; regenerate it if the change is intended"
    lightness_kept = np.abs(ours.mean(axis=-1) - np.asarray(small, dtype=np.float64)).mean()
    assert lightness_kept < 8.0  # colour was added to the scan, the scan itself is still there
