"""Colour quality on real photos with the shipped model: neutral frames, no border fringes, skin tones."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from archivecolor.color import rgb_to_lab
from archivecolor.imageio import read_image
from archivecolor.runner import RunOptions, colorize_folder
from tests.conftest import ROOT, colour_photos, data_dir, gray_of

EXAMPLES = ROOT / "examples"


def chroma_of(path: Path) -> np.ndarray:
    pixels = read_image(path).pixels
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    lab = rgb_to_lab(pixels if pixels.ndim == 3 else np.dstack([pixels] * 3))
    return np.hypot(lab[..., 1], lab[..., 2])


def test_a_framed_scan_keeps_its_frame_neutral(tmp_path, models_home):
    photo = gray_of(colour_photos(1, (480, 320))[0])
    framed = np.full((400, 560), 250, np.uint8)  # a white mount ...
    framed[16:-16, 16:-16] = 12  # ... around the black edge of a glass plate ...
    framed[40:-40, 40:-40] = photo  # ... around the picture
    rng = np.random.default_rng(0)
    framed[20:36, 100:300] = np.clip(framed[20:36, 100:300] + rng.integers(0, 30, (16, 200)), 0, 255)  # dust
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(framed).save(scans / "plate.png")
    reference = tmp_path / "ref.png"
    Image.fromarray(colour_photos(3, (320, 240))[2]).save(reference)
    out = tmp_path / "out"
    assert colorize_folder(scans, RunOptions(out=out, reference=reference)).count("done") == 1
    c = chroma_of(out / "plate.png")
    frame = np.ones(c.shape, bool)
    frame[40:-40, 40:-40] = False
    assert c[frame].max() < 3.0  # the mount, the plate edge and the frame's inner edge stay neutral
    assert np.median(c[48:-48, 48:-48]) > 3.0  # while the picture is coloured


def test_no_coloured_fringe_along_the_edges_of_the_example_scans(tmp_path, models_home):
    out = tmp_path / "out"
    report = colorize_folder(EXAMPLES / "scans", RunOptions(out=out, reference=EXAMPLES / "references" / "pg-lake.jpg"))
    assert report.count("done") == 4
    for result in report.results:
        c = chroma_of(out / result.output)
        b = max(2, min(c.shape) // 100)  # the outer 1%
        for name, outer, inner in (("top", c[:b], c[b : 4 * b]), ("bottom", c[-b:], c[-4 * b : -b]),
                                   ("left", c[:, :b], c[:, b : 4 * b]), ("right", c[:, -b:], c[:, -4 * b : -b])):
            # A fringe is chroma that rises towards the edge; a neutral frame's band stays under C* 3.
            assert outer.mean() < max(3.0, inner.mean() + 1.0), (result.output, name, outer.mean(), inner.mean())


SKIN = {"lady.jpg", "self_portrait.jpg", "three_generations.jpg", "emir.jpg"}


def skin_mask(lab: np.ndarray) -> np.ndarray:
    """Pixels that are skin-coloured in the true colours: warm, moderately saturated, mid-light."""
    hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1]))
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    return (lab[..., 0] > 35) & (lab[..., 0] < 85) & (chroma > 12) & (chroma < 45) & (hue > 25) & (hue < 70)


@pytest.mark.parametrize("name", sorted(SKIN))
def test_people_get_skin_tones_not_gray_blue(name, tmp_path, models_home):
    folder = data_dir("prokudin-gorskii") / "colour"
    truth = Image.open(folder / name).convert("RGB")
    truth.thumbnail((640, 640))
    truth = np.asarray(truth)
    scans = tmp_path / "scans"
    scans.mkdir()
    Image.fromarray(gray_of(truth)).save(scans / "people.png")
    reference = data_dir("he2018-demo") / "examplar-based" / "input" / "ref4.JPEG"  # a colour portrait
    out = tmp_path / "out"
    assert colorize_folder(scans, RunOptions(out=out, reference=reference)).count("done") == 1
    truth_lab = rgb_to_lab(truth)
    ours = rgb_to_lab(np.asarray(Image.open(out / "people.png").convert("RGB")))
    mask = skin_mask(truth_lab)
    assert mask.mean() > 0.005, "the photo should show some skin"
    a, b = ours[mask, 1].mean(), ours[mask, 2].mean()
    hue = np.degrees(np.arctan2(b, a))
    assert b > 4.0 and 10.0 < hue < 90.0, (name, a, b, hue)  # warm (skin), not gray-blue
