import numpy as np

from archivecolor import upsample
from archivecolor.color import gray_to_l, l_to_gray, rgb_to_lab
from archivecolor.upsample import recombine, resize_plane, working_size
from tests.conftest import colour_photos, gray_of


def _low(ab: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.dstack([resize_plane(ab[..., c], h, w) for c in range(2)])


def test_output_keeps_the_original_luminance_8_bit():
    photo = colour_photos(1)[0]
    gray = gray_of(photo)
    lightness = gray_to_l(gray)
    ab = rgb_to_lab(photo)[..., 1:] * 1.8  # push some colours out of gamut on purpose
    h, w = working_size(*gray.shape, 64)
    rgb = recombine(lightness, _low(ab, h, w), resize_plane(lightness, h, w), np.uint8)
    assert rgb.shape == photo.shape and rgb.dtype == np.uint8
    back = np.round(l_to_gray(rgb_to_lab(rgb)[..., 0]) * 255)
    assert np.abs(back - gray).max() <= 1


def test_output_keeps_the_original_luminance_16_bit():
    gray16 = gray_of(colour_photos(1)[0]).astype(np.uint16) * 257
    lightness = gray_to_l(gray16)
    ab = np.random.default_rng(0).normal(0, 40, (16, 24, 2)).astype(np.float32)
    rgb = recombine(lightness, ab, resize_plane(lightness, 16, 24), np.uint16)
    assert rgb.dtype == np.uint16
    assert np.abs(rgb_to_lab(rgb)[..., 0] - lightness).max() < 0.05


def test_colour_bleeds_less_than_bilinear_across_a_sharp_edge():
    h = w = 512
    lightness = np.full((h, w), 30.0, np.float32)
    lightness[:, 261:] = 80.0  # an edge that does not fall on a low-resolution pixel boundary
    truth = np.zeros((h, w, 2), np.float32)
    truth[:, :261] = (55.0, 40.0)
    truth[:, 261:] = (-35.0, 45.0)
    low_h, low_w = 32, 32
    ab_low = _low(truth, low_h, low_w)
    l_low = resize_plane(lightness, low_h, low_w)
    band = slice(261 - 24, 261 + 24)

    def edge_error(edge_aware: bool) -> float:
        rgb = recombine(lightness, ab_low, l_low, np.uint16, edge_aware=edge_aware)
        return float(np.abs(rgb_to_lab(rgb)[:, band, 1:] - truth[:, band]).mean())

    guided, bilinear = edge_error(True), edge_error(False)
    assert guided < 0.7 * bilinear, (guided, bilinear)


def test_strips_join_seamlessly(monkeypatch):
    lightness = gray_to_l(gray_of(colour_photos(1)[0]))
    ab = np.random.default_rng(1).normal(0, 30, (32, 48, 2)).astype(np.float32)
    l_low = resize_plane(lightness, 32, 48)
    whole = recombine(lightness, ab, l_low)
    monkeypatch.setattr(upsample, "STRIP_PIXELS", 37 * lightness.shape[1])
    assert np.array_equal(recombine(lightness, ab, l_low), whole)


def test_working_size_keeps_aspect_in_multiples_of_16():
    assert working_size(512, 768, 256) == (256, 384)
    h, w = working_size(3000, 4500, 256)
    assert h % 16 == 0 and w % 16 == 0 and h == 256 and abs(w / h - 1.5) < 0.05


def test_chroma_fades_in_from_a_frame_over_a_wider_band_than_from_the_image_edge():
    from archivecolor.upsample import EDGE_TAPER_FRACTION, FRAME_TAPER_FRACTION, fade_in_from_edges

    h, w = 400, 600
    unframed = fade_in_from_edges(np.ones((h, w), dtype=np.float32))
    edge = int(EDGE_TAPER_FRACTION * h)
    assert unframed[0, w // 2] < 0.1 and unframed[edge + 1, w // 2] == 1 and unframed[h // 2, w // 2] == 1
    keep = np.ones((h, w), dtype=np.float32)
    keep[:20] = 0  # a frame band along the top, as thin as a plate's edge
    framed = fade_in_from_edges(keep)
    depth = FRAME_TAPER_FRACTION * h
    column = framed[:, w // 2]
    assert column[:20].max() == 0
    assert 0.4 < column[20 + int(depth / 2)] < 0.6  # half way through the band, half the chroma
    assert column[20 + int(depth) + 1] == 1 and framed[h // 2, w // 2] == 1
    assert np.all(np.diff(column[20 : 20 + int(depth)]) >= 0)  # rises without a step


def test_dark_or_bright_picture_at_the_border_is_not_a_frame_but_a_chipped_plate_edge_is():
    """Black clothes, dark blinds and a white sky touch the border of these photos: no frame, so they keep
    their chroma. Put inside a thin black plate edge whose depth wanders, each gets that edge masked all
    round, and the dark picture next to the edge is not taken for more frame."""
    from PIL import Image

    from tests.conftest import data_dir

    photos = [data_dir("imagenet-1k-samples") / "n02667093_abaya.jpg", data_dir("urban100") / "img_040.jpg",
              data_dir("sun-hays80") / "inn_outdoor_sun_bqdcyxucavdyycwk.jpg"]
    rng = np.random.default_rng(0)
    for path in photos:
        rgb = np.asarray(Image.open(path).convert("RGB").resize((256, 256), Image.BICUBIC))
        lightness = rgb_to_lab(rgb)[..., 0].astype(np.float32)
        assert upsample.frame_mask(lightness).mean() < 0.01, path.name
        framed = np.pad(lightness, 10, constant_values=6.0)  # a black plate edge, 10 px ...
        for side in range(4):  # ... chipped: 4 to 16 px deep along each side
            view = np.rot90(framed, side)
            depth = np.clip(10 + rng.integers(-6, 7, view.shape[1]), 4, 16)
            for col, d in enumerate(depth):
                view[:d, col] = 6.0 if d > 10 else view[:d, col]
        mask = upsample.frame_mask(framed)
        assert mask[:4].min() == 1 and mask[-4:].min() == 1 and mask[:, :4].min() == 1 and mask[:, -4:].min() == 1
        assert mask[40:-40, 40:-40].max() == 0, path.name  # the picture's own dark parts keep their chroma
