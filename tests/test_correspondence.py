"""The correspondence on real photos: a shifted or flipped copy of the target must give its colours back."""

import numpy as np
import pytest

from archivecolor.color import lab_to_rgb, normalise_l, rgb_to_lab
from archivecolor.pipeline import predict, reference_from_lab
from tests.conftest import colour_photos, data_dir


def _psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


def _reconstruction_psnr(models, transform, n):
    scores = []
    for photo in colour_photos(n, (224, 224)):
        lab = rgb_to_lab(photo)
        ref = reference_from_lab("r", np.ascontiguousarray(transform(lab)), 224)
        ref.features = models.features_of(ref.l)
        pred = predict(models, normalise_l(lab[None, None, ..., 0]), [[ref]])[0]
        warped = np.dstack([lab[..., 0], pred.x13[1:3].transpose(1, 2, 0) * 128])
        scores.append(_psnr(np.round(lab_to_rgb(warped) * 255), np.round(lab_to_rgb(lab) * 255)))
    return float(np.mean(scores))


def test_shifted_copy_reconstructs_the_colours(models):
    data_dir("kodak24")
    psnr = _reconstruction_psnr(models, lambda lab: np.roll(lab, 20, axis=1), 24)
    assert psnr > 30.0, psnr


def test_flipped_copy_reconstructs_the_colours(models):
    data_dir("kodak24")
    psnr = _reconstruction_psnr(models, lambda lab: lab[:, ::-1], 24)
    # VGG features are not mirror-symmetric, so a flip is harder than a shift.
    assert psnr > 28.5, psnr


def test_maps_are_bounded_and_the_graph_is_differentiable():
    torch = pytest.importorskip("torch")
    from archivecolor.nets.correspondence import Correspondence
    from archivecolor.nets.vgg import FEATURE_CHANNELS

    feats = [torch.rand(1, c, 64 >> i, 48 >> i, requires_grad=True) for i, c in enumerate(FEATURE_CHANNELS)]
    ref_ab = (torch.rand(1, 2, 32, 48) - 0.5).requires_grad_(True)
    out = Correspondence()(torch.rand(1, 1, 64, 48), *feats, *[f.detach() + 0.1 for f in feats], ref_ab)
    assert out.shape == (1, 13, 64, 48)
    assert out[:, 3:].abs().max() <= 1.0 + 1e-5
    out[:, 1:].sum().backward()
    assert ref_ab.grad.abs().sum() > 0 and all(f.grad is not None for f in feats)


def test_a_photo_matched_to_itself_warps_back_its_own_colours(models):
    """Dense matching at 512x384: with the reference's own L as the target, every feature finds itself,
    so the warped ab is the reference's and the forward similarity is near 1."""
    from archivecolor.models.layout import FORWARD_MAPS, WARPED_AB

    photo = colour_photos(1, (512, 384))[0]
    lab = rgb_to_lab(photo)
    ref = reference_from_lab("r", lab, 384)
    ref.features = models.features_of(ref.l)
    pred = predict(models, ref.l, [[ref]])[0]
    assert pred.ab.shape == (384, 512, 2)
    warped = pred.x13[WARPED_AB] * 128
    error = np.abs(warped - ref.ab[0] * 128).mean()
    assert error < 3.0, error
    assert pred.x13[FORWARD_MAPS].mean() > 0.9
