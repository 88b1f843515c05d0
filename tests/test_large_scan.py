"""A 10000×8000 16-bit TIFF scan must go through without running out of memory (slow)."""

import os
import resource
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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    print(f"10000x8000 16-bit TIFF: peak RSS {peak_gb:.2f} GB")
    result = tifffile.imread(out / "huge.tif")
    assert result.shape == (8000, 10000, 3) and result.dtype == np.uint16
    assert peak_gb < 12
