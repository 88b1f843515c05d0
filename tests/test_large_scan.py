"""A 10000×8000 16-bit TIFF scan must go through without running out of memory (slow)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.conftest import colour_photos, gray_of


@pytest.mark.slow
def test_huge_16bit_tiff_peak_memory(tmp_path, models_home):
    scans = tmp_path / "scans"
    scans.mkdir()
    tile = gray_of(colour_photos(1, (1000, 800))[0]).astype(np.uint16) * 257
    big = np.tile(tile, (10, 10))  # 8000 rows × 10000 columns
    tifffile.imwrite(scans / "huge.tif", big, compression="zlib")
    reference = tmp_path / "ref.jpg"
    Image.fromarray(colour_photos(2, (512, 384))[1]).save(reference)
    env = dict(os.environ, ARCHIVECOLOR_HOME=str(models_home))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "archivecolor", "run", str(scans), "--out", str(out), "--reference", str(reference),
           "--quiet"]
    # os.wait4 gives this run's own peak; RUSAGE_CHILDREN would be the largest of every child this pytest
    # process has waited for (a heavier earlier test's included).
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, stderr
    peak_gb = usage.ru_maxrss / 1024**2
    print(f"10000x8000 16-bit TIFF: peak RSS {peak_gb:.2f} GB")
    result = tifffile.imread(out / "huge.tif")
    assert result.shape == (8000, 10000, 3) and result.dtype == np.uint16
    assert peak_gb < 12
