"""The calibration photos that `archivecolor models pull --int8` quantizes with.

Public-domain Prokudin-Gorskii colour reconstructions, none of them a test or example photo, scaled to
a short side of 192 px. Each photo is a target (its L) and the next one its reference, so the U-Net
is calibrated on real correspondence inputs. Written once into the package assets:

    python -m export --calibration-photos ../shared/data/prokudin-gorskii/colour
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from archivecolor.models.quantize import CALIBRATION_DIR, CALIBRATION_SHORT_SIDE

# Not in examples/ nor among the portraits of the skin check; historical, so close to what users colorize.
CALIBRATION_PHOTOS = ("cathedral", "flowers", "icon", "melons", "sculpture", "tobolsk", "train")


def write_calibration_photos(source: Path, folder: Path = CALIBRATION_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in CALIBRATION_PHOTOS:
        with Image.open(source / f"{name}.jpg") as image:
            rgb = image.convert("RGB")
            scale = CALIBRATION_SHORT_SIDE / min(rgb.size)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
        path = folder / f"pg-{name}.jpg"
        rgb.save(path, quality=90, optimize=True)
        written.append(path)
    return written
