import numpy as np
import pytest
from skimage import color as skcolor

from archivecolor import color
from tests.conftest import colour_photos


def test_rgb_to_lab_matches_skimage_on_random_and_real():
    rng = np.random.default_rng(1)
    random = rng.random((200, 300, 3), dtype=np.float32)
    for rgb in [random, colour_photos(2)[0].astype(np.float32) / 255, colour_photos(2)[1].astype(np.float32) / 255]:
        ours = color.rgb_to_lab(rgb)
        ref = skcolor.rgb2lab(rgb)
        assert ours.dtype == np.float32
        assert np.abs(ours - ref).max() < 1e-3


def test_lab_to_rgb_matches_skimage_in_gamut():
    rgb = np.random.default_rng(2).random((100, 100, 3), dtype=np.float32)
    lab = skcolor.rgb2lab(rgb)
    assert np.abs(color.lab_to_rgb(lab) - skcolor.lab2rgb(lab)).max() < 1e-3


def test_round_trip():
    rgb = np.random.default_rng(3).random((64, 64, 3), dtype=np.float32)
    assert np.abs(color.lab_to_rgb(color.rgb_to_lab(rgb)) - rgb).max() < 1e-4


def test_accepts_8_and_16_bit():
    rgb8 = colour_photos(1)[0]
    rgb16 = rgb8.astype(np.uint16) * 257
    assert np.abs(color.rgb_to_lab(rgb8) - color.rgb_to_lab(rgb16)).max() < 1e-3
    with pytest.raises(TypeError):
        color.rgb_to_lab(rgb8.astype(np.int32))


def test_normalisation_helpers():
    assert color.normalise_l(np.array([0.0, 50.0, 100.0])).tolist() == [0.0, 0.5, 1.0]
    assert color.normalise_ab(np.array([-128.0, 64.0])).tolist() == [-1.0, 0.5]
    assert color.denormalise_ab(color.normalise_ab(np.array([12.5, -99.0]))).tolist() == [12.5, -99.0]


def test_out_of_gamut_is_clipped_per_channel():
    lab = np.array([[50.0, 120.0, -120.0], [95.0, -100.0, 100.0]], dtype=np.float32)
    rgb = color.lab_to_rgb(lab)
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert np.allclose(rgb, np.clip(skcolor.lab2rgb(lab[None])[0], 0, 1), atol=2e-3)


def test_keep_l_gamut_mapping_keeps_lightness():
    rng = np.random.default_rng(4)
    lab = np.stack([rng.uniform(0, 100, 5000), rng.uniform(-128, 127, 5000), rng.uniform(-128, 127, 5000)], -1)
    rgb = color.lab_to_rgb_keep_l(lab.astype(np.float32))
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert np.abs(color.rgb_to_lab(rgb)[..., 0] - lab[..., 0]).max() < 0.05


def test_gray_l_round_trip():
    g = np.arange(256, dtype=np.uint8)
    assert np.abs(np.round(color.l_to_gray(color.gray_to_l(g)) * 255) - g).max() == 0


def test_toned_print_counts_as_gray_but_photo_does_not():
    gray = colour_photos(1)[0].mean(axis=-1)
    sepia = np.stack([gray * 1.0, gray * 0.85, gray * 0.65], -1).clip(0, 255).astype(np.uint8)
    assert color.is_near_gray(sepia)
    assert not color.is_near_gray(colour_photos(1)[0])


def test_torch_twin_agrees():
    torch = pytest.importorskip("torch")
    from archivecolor.nets.colour import lab_to_rgb as torch_lab_to_rgb

    lab = color.rgb_to_lab(colour_photos(1, (64, 48))[0])
    l = torch.from_numpy(lab[..., 0] / 100)[None, None]
    ab = torch.from_numpy(lab[..., 1:].transpose(2, 0, 1) / 128)[None].requires_grad_(True)
    out = torch_lab_to_rgb(l, ab)
    assert np.abs(out[0].detach().numpy().transpose(1, 2, 0) - color.lab_to_rgb(lab)).max() < 1e-3
    out.sum().backward()
    assert torch.isfinite(ab.grad).all() and ab.grad.abs().sum() > 0


def test_torch_gray_twin_agrees():
    """The gray the VGG graph builds from L is the gray a black-and-white print of that L shows."""
    torch = pytest.importorskip("torch")
    from archivecolor.nets.colour import l_to_gray_srgb

    l = np.linspace(0, 100, 1001, dtype=np.float32)
    got = l_to_gray_srgb(torch.from_numpy(l / 100)).numpy()
    assert np.abs(got - color.l_to_gray(l)).max() < 1e-5


def test_one_16_to_8_bit_conversion_rounds_to_the_nearest_level():
    from archivecolor.color import to_uint8

    x = np.arange(65536, dtype=np.uint16)
    y = to_uint8(x)
    assert y.dtype == np.uint8 and y[0] == 0 and y[-1] == 255
    assert np.abs(y.astype(np.float64) - x / 257.0).max() <= 0.5 + 1e-9
    assert np.all(np.diff(y.astype(np.int64)) >= 0)
    assert to_uint8(np.array([7], np.uint8))[0] == 7


def test_integer_gray_is_looked_up_with_the_same_values_as_computed():
    """uint8 and uint16 gray go through a table of every level; it must give exactly the computed L."""
    rng = np.random.default_rng(5)
    for dtype in (np.uint8, np.uint16):
        scan = rng.integers(0, np.iinfo(dtype).max + 1, (37, 53), dtype=dtype)
        scan[0, :2] = (0, np.iinfo(dtype).max)
        looked_up = color.gray_to_l(scan)
        assert looked_up.dtype == np.float32 and looked_up.shape == scan.shape
        np.testing.assert_array_equal(looked_up, color.gray_to_l(color.to_unit_float(scan)))
