"""The correspondence on real photos: a shifted or flipped copy of the target must give its colours back."""

import numpy as np
import pytest

from archivecolor.color import lab_to_rgb, normalise_l, rgb_to_lab
from archivecolor.models.layout import WARPED_AB
from archivecolor.pipeline import correspondence_feeds, predict, reference_from_lab
from tests.conftest import colour_photos, data_dir


def _psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


def _reconstruction_psnr(models, transform, n):
    """Mean PSNR against the photo of its L with the warped ab, and with the matched colour, of a transformed copy."""
    scores = {"warped": [], "matched": []}
    for photo in colour_photos(n, (224, 224)):
        lab = rgb_to_lab(photo)
        ref = reference_from_lab("r", np.ascontiguousarray(transform(lab)), 224)
        ref.features = models.features_of(ref.l)
        l = normalise_l(lab[None, None, ..., 0])
        x13, matched = models.correspondence.run(correspondence_feeds(l, models.features_of(l), ref))
        truth = np.round(lab_to_rgb(lab) * 255)
        for name, ab in (("warped", x13[0, WARPED_AB]), ("matched", matched[0])):
            colours = np.dstack([lab[..., 0], ab.transpose(1, 2, 0) * 128])
            scores[name].append(_psnr(np.round(lab_to_rgb(colours) * 255), truth))
    return {name: float(np.mean(v)) for name, v in scores.items()}


def test_shifted_copy_reconstructs_the_colours(models):
    data_dir("kodak24")
    psnr = _reconstruction_psnr(models, lambda lab: np.roll(lab, 20, axis=1), 24)
    # The matched colour is a mean over 8×8 reference cells, so it gives less of a copy's fine colour detail.
    assert psnr["warped"] > 30.0 and psnr["matched"] > 30.0, psnr


def test_flipped_copy_reconstructs_the_colours(models):
    data_dir("kodak24")
    psnr = _reconstruction_psnr(models, lambda lab: lab[:, ::-1], 24)
    # VGG features are not mirror-symmetric, so a flip is harder than a shift, and a cell matches several
    # places: the warped ab samples between them, the matched colour averages their colours.
    assert psnr["warped"] > 28.5 and psnr["matched"] > psnr["warped"] + 0.5, psnr


def test_a_reference_chosen_by_hand_gives_the_unet_its_matched_colour(models):
    """A lone reference chosen by hand gives the U-Net the matched colour in place of the warped ab; a retrieved
    reference, or two chosen ones, give the warped ab the networks were trained on."""
    photos = colour_photos(3, (192, 128))
    refs = [reference_from_lab(f"r{i}", rgb_to_lab(p), 128) for i, p in enumerate(photos[1:])]
    for ref in refs:
        ref.features = models.features_of(ref.l)
    l = normalise_l(rgb_to_lab(photos[0])[None, None, ..., 0])
    x13, matched = models.correspondence.run(correspondence_feeds(l, models.features_of(l), refs[0]))
    assert np.abs(matched[0] - x13[0, WARPED_AB]).mean() * 128 > 1  # the two colours differ, so the choice shows
    chosen, retrieved = (predict(models, l, [refs[:1]], chosen=c)[0] for c in (True, False))
    np.testing.assert_array_equal(chosen.x13[WARPED_AB], matched[0])
    np.testing.assert_array_equal(retrieved.x13[WARPED_AB], x13[0, WARPED_AB])
    np.testing.assert_array_equal(chosen.x13[3:], retrieved.x13[3:])  # the similarity maps are the same
    two = predict(models, l, [refs], chosen=True)[0]
    np.testing.assert_array_equal(two.x13[WARPED_AB], x13[0, WARPED_AB])


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


def _grid_sample(x, grid):
    import torch.nn.functional as F

    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _edge_heavy_grid(torch, batch, h, w):
    """Sampling points in [-1.2, 1.2]: many fall beyond the outer pixel centres, where border padding applies."""
    return (torch.rand(batch, h, w, 2) * 2.4 - 1.2).clamp(-1.0, 1.0)


def test_bilinear_lookup_matches_grid_sample_at_the_borders():
    torch = pytest.importorskip("torch")
    from archivecolor.nets.correspondence import _channels_last, _Raster, _sample

    torch.manual_seed(0)
    x = torch.rand(2, 5, 12, 9)
    grid = _edge_heavy_grid(torch, 2, 7, 11)
    got = _sample(_channels_last(x), _Raster(x).taps(grid)).permute(0, 3, 1, 2)
    assert torch.allclose(got, _grid_sample(x, grid), atol=1e-5)


def test_refinement_equals_scoring_the_nine_resampled_neighbours():
    """The 4x4-neighbourhood refinement against the direct method: resample the reference at each of the nine
    one-pixel shifts of the match with grid_sample, score, soft-argmax the shifted coordinates. A match
    beyond the outer pixel centres is scored from the nearest centre."""
    torch = pytest.importorskip("torch")
    from archivecolor.nets.correspondence import TEMPERATURE, _centred_unit, _refine, _resize_field

    torch.manual_seed(1)
    t, r = torch.rand(2, 16, 10, 14), torch.rand(2, 16, 8, 12)
    flow = _edge_heavy_grid(torch, 2, 5, 7).permute(0, 3, 1, 2)
    grid = _resize_field(flow, t.shape[-2:])
    tn, rn = _centred_unit(t), _centred_unit(r)
    centres = torch.tensor([1.0 - 1.0 / r.shape[3], 1.0 - 1.0 / r.shape[2]])
    scored = torch.maximum(torch.minimum(grid, centres), -centres)
    candidates, scores = [], []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            shift = torch.tensor([dx * 2.0 / r.shape[3], dy * 2.0 / r.shape[2]])
            candidates.append(grid + shift)
            scores.append((tn * _grid_sample(rn, scored + shift)).sum(dim=1))
    weights = torch.softmax(torch.stack(scores, dim=-1) / TEMPERATURE, dim=-1).unsqueeze(-1)
    expected = (torch.stack(candidates, dim=-2) * weights).sum(dim=-2).permute(0, 3, 1, 2)
    assert torch.allclose(_refine(flow, t, r, TEMPERATURE), expected, atol=1e-5)


def test_the_exported_graph_stays_small():
    """The correspondence graph had 6,307 nodes and took ONNX Runtime 2-3 s to open; shared sampling
    taps, the 4x4 refinement and multi-dimensional gathers brought it near 3,000. Guard the structure, not a timing."""
    pytest.importorskip("torch")
    from export.onnx_export import export_correspondence

    assert len(export_correspondence().graph.node) < 3300
