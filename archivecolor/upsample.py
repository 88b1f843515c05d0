"""Edge-aware full-resolution chroma: a fast guided filter with the original L as the guide.

The model predicts ab at a small working size. The guided filter's linear coefficients
(ab ≈ A·L + B locally) are fitted at that size, upsampled bilinearly, and applied to the full-size
L, so colour edges land on luminance edges instead of being smeared across them. The output keeps
the original L exactly; out-of-gamut colours lose chroma, never lightness.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from archivecolor.color import lab_to_rgb_keep_l

# Frames (glass-plate edges, film rebates, mounts): near-black or near-white bands that touch the border.
FRAME_DARK_L = 18.0
FRAME_BRIGHT_L = 92.0
FRAME_MAX_FRACTION = 0.3  # a band deeper than this is picture, not frame
# A frame runs along its whole side at about one depth; a dark or bright part of the picture that touches the
# border (night sky, snow, a white wall) does neither. So a side has a frame when FRAME_MIN_COVERAGE of its
# lines start with a band at least a pixel deep; that band's depth (the depth those lines all reach) must be at
# most FRAME_MAX_DEPTH of the side, and a line's band is cut at FRAME_DEPTH_SPREAD × that depth (plus two
# pixels), where most lines must end: chipped plate edges are kept, picture that continues the band's tone is not.
FRAME_MIN_COVERAGE = 0.8
FRAME_MAX_DEPTH = 0.15
FRAME_DEPTH_SPREAD = 2.0
FRAME_DETECT_SIDE = 1024
# Film rebates and plate edges of any tone: lines along a side that are uniform (L spread under
# BAND_MAX_STD over their central 80%) and differ from the picture next to them by BAND_CONTRAST, along a
# straight edge: most pixels of the picture line just inside the band differ (a sky is uniform too, but the
# line below it is still mostly sky).
BAND_MAX_STD = 6.0
BAND_CONTRAST = 8.0
BAND_MAX_FRACTION = 0.05
# The network's output is least reliable next to an edge, the image's (VGG reads zero padding there) or a
# frame's (a step it has never seen in a photo): chroma fades in over this fraction of the short side.
EDGE_TAPER_FRACTION = 0.015
# Next to a frame the network also sees the step from frame to picture (a plate's edge, a mount) and
# paints a stripe of colour along it: chroma fades in over a wider band there.
FRAME_TAPER_FRACTION = 0.05
GUIDE_RADIUS = 2  # in working-size pixels
GUIDE_EPS = 1e-3  # on L/100; larger is smoother, towards plain bilinear
# Pixels recombined at a time (256 rows of a 1536 px scan), bounding memory on huge scans; a strip's
# temporaries stay small enough for the allocator to reuse them rather than grow the heap.
STRIP_PIXELS = 256 * 1536
SMALL_BOX_RADIUS = 3


MAX_ASPECT = 6  # the long side of the working size is at most this many short sides


def working_size(height: int, width: int, short_side: int, multiple: int = 16) -> tuple[int, int]:
    """(h, w) with the short side near ``short_side``, both multiples of ``multiple``, aspect kept.

    The long side is capped at ``MAX_ASPECT * short_side``: a 1×4000 strip would otherwise become a
    256×1,024,000 network input. Such a strip is worked on thinner instead (never under two ``multiple``s).
    """
    scale = min(short_side / min(height, width), MAX_ASPECT * short_side / max(height, width))
    # At least two multiples: the U-Net's reflect padding needs two pixels at its deepest level.
    h = max(2 * multiple, int(round(height * scale / multiple)) * multiple)
    w = max(2 * multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a float32 (H, W) plane with Pillow (bicubic, antialiased when shrinking)."""
    im = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(im.resize((width, height), Image.BICUBIC), dtype=np.float32)


def box_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)² window for each of (H, W, ...) with windows clipped at the borders."""
    def along(a: np.ndarray, axis: int) -> np.ndarray:
        n = a.shape[axis]
        if r <= SMALL_BOX_RADIUS:  # a few shifted adds beat a float64 running sum
            a = np.moveaxis(a, axis, 0)
            total = np.array(a, dtype=np.float32)
            for d in range(1, min(r, n - 1) + 1):
                total[d:] += a[:-d]
                total[:-d] += a[d:]
            idx = np.arange(n)
            count = (np.minimum(idx + r, n - 1) - np.maximum(idx - r, 0) + 1).astype(np.float32)
            return np.moveaxis(total / count.reshape((n,) + (1,) * (a.ndim - 1)), 0, axis)
        c = np.cumsum(a, axis=axis, dtype=np.float64)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        idx = np.arange(n)
        hi = np.minimum(idx + r + 1, n)
        lo = np.maximum(idx - r, 0)
        shape = [1] * a.ndim
        shape[axis] = n
        return (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)) / (hi - lo).reshape(shape)

    return along(along(x, 0), 1).astype(np.float32)


def guided_coefficients(guide: np.ndarray, src: np.ndarray, r: int = GUIDE_RADIUS, eps: float = GUIDE_EPS):
    """Guided-filter coefficients A, B (h, w, C) so that src ≈ A·guide + B, guide (h, w) in [0, 1]."""
    g = guide[..., None]
    mean_g = box_mean(g, r)
    mean_s = box_mean(src, r)
    cov = box_mean(g * src, r) - mean_g * mean_s
    var = box_mean(g * g, r) - mean_g * mean_g
    a = cov / (var + eps)
    b = mean_s - a * mean_g
    return box_mean(a, r), box_mean(b, r)


def bilinear_rows(low: np.ndarray, height: int, width: int, y0: int, y1: int) -> np.ndarray:
    """Rows [y0, y1) of ``low`` (h, w, C) bilinearly resized to (height, width, C), pixel centres aligned.

    Pillow's C resampler with a source box: the same rows as resizing the whole plane, without holding it.
    """
    h, w = low.shape[:2]
    box = (0.0, y0 * h / height, float(w), y1 * h / height)
    planes = [Image.fromarray(np.ascontiguousarray(low[..., c], dtype=np.float32), mode="F")
              .resize((width, y1 - y0), Image.BILINEAR, box=box) for c in range(low.shape[2])]
    return np.stack([np.asarray(p, dtype=np.float32) for p in planes], axis=-1)


def _run_from_start(flags: np.ndarray) -> np.ndarray:
    """Per row of a boolean (n, m) array, how many leading entries are True."""
    stops = ~flags
    return np.where(stops.any(axis=1), stops.argmax(axis=1), flags.shape[1])


def _uniform_band_depth(lines: np.ndarray) -> int:
    """How many rows from the top of ``lines`` (h, w) form a uniform band unlike the picture below it."""
    h, w = lines.shape
    core = lines[:, int(0.1 * w) : max(int(0.9 * w), int(0.1 * w) + 1)]
    spread, level = core.std(axis=1), core.mean(axis=1)
    limit = max(1, int(h * BAND_MAX_FRACTION))
    depth = 0  # the band ends where a line is not uniform or its level steps away from the edge's
    while depth < limit and spread[depth] < BAND_MAX_STD and abs(level[depth] - level[0]) < BAND_CONTRAST / 2:
        depth += 1
    if depth == 0 or depth >= h - 1:
        return 0
    band = level[:depth].mean()
    inner = level[depth : depth + max(2, depth)].mean()
    stepped = np.mean(np.abs(core[min(depth + 1, h - 1)] - band) >= BAND_CONTRAST / 2)
    return depth if abs(band - inner) >= BAND_CONTRAST and stepped >= 0.5 else 0


def _frame_depths(runs: list[np.ndarray], lengths: list[int]) -> list[np.ndarray]:
    """Per side, per line across it, how deep that side's frame reaches (0 where it has none), from ``runs``:
    per side, how many extreme pixels each line starts with; ``lengths``: each side's line length."""
    sides = []
    for run, length in zip(runs, lengths):
        depth = float(np.quantile(run, 1.0 - FRAME_MIN_COVERAGE))
        cut = int(FRAME_DEPTH_SPREAD * depth) + 2
        plausible = 1 <= depth <= FRAME_MAX_DEPTH * length
        straight = np.mean(run <= cut) >= 0.5  # a frame's lines end within the cut; a sky's go on into the picture
        sides.append((depth, cut, plausible, straight))
    # A frame goes round the picture: a side whose band runs on into dark picture (black clothes against a black
    # plate edge) is frame too where another side's band is straight and about as deep.
    anchor = max((depth for depth, _, plausible, straight in sides if plausible and straight), default=None)
    around = FRAME_DEPTH_SPREAD * anchor + 2 if anchor is not None else 0.0
    return [np.minimum(run, cut) if plausible and (straight or depth <= around) else np.zeros_like(run)
            for run, (depth, cut, plausible, straight) in zip(runs, sides)]


def frame_mask(l_low: np.ndarray) -> np.ndarray:
    """Where the image is its frame, (h, w) float32 in [0, 1]: 1 inside a frame band, feathered over two pixels.

    ``l_low``: (h, w) float32 CIELAB L in [0, 100] at any resolution.

    A frame band is a run of near-black or near-white pixels (most of each 3×3 neighbourhood) that starts
    at the image border and goes straight inward, in rows from the left and right edges and in columns
    from the top and bottom, along most of its side and at about one depth (``_frame_depths``). Such bands are kept
    neutral: the network has no colour to give a black glass-plate edge or a white mount. So are
    uniform bands of any tone along a side (a film rebate, a plate's edge) that stand apart from the
    picture next to them (``_uniform_band_depth``).
    """
    h, w = l_low.shape
    mask = np.zeros((h, w), dtype=bool)
    raw = (l_low <= FRAME_DARK_L) | (l_low >= FRAME_BRIGHT_L)  # one class: a white mount around a black plate edge
    # A pixel counts when most of its 3×3 neighbourhood is extreme: dust and scratches do not stop a band.
    extreme = box_mean(raw[..., None].astype(np.float32), 1)[..., 0] >= 0.6
    views = [np.rot90(extreme, side) for side in range(4)]  # each side's edge is row 0
    runs = [np.minimum(_run_from_start(view.T), int(view.shape[0] * FRAME_MAX_FRACTION)) for view in views]
    for side, (view, depth) in enumerate(zip(views, _frame_depths(runs, [view.shape[0] for view in views]))):
        mask |= np.rot90(np.arange(view.shape[0])[:, None] < depth[None, :], -side)
    for side in range(4):
        lines = np.rot90(l_low, side)  # the side's edge is row 0
        depth = _uniform_band_depth(lines)
        if depth:
            band = np.zeros(lines.shape, dtype=bool)
            band[:depth] = True
            mask |= np.rot90(band, -side)
    # Grow by two pixels so that, after the step is softened and upsampled bilinearly, the frame's inner
    # edge still gets no chroma at full size.
    grown = box_mean(mask[..., None].astype(np.float32), 2)[..., 0] > 0
    return box_mean(grown[..., None].astype(np.float32), 1)[..., 0]


def _ramp(inside: np.ndarray, depth: int) -> np.ndarray:
    """0 on the border of ``inside`` (h, w bool), beyond which is outside, rising about linearly to 1 at
    ``depth`` pixels in."""
    if inside.all():  # the window's share of a rectangle is the product of its shares along each side
        rows, cols = (box_mean(np.pad(np.ones(n, np.float32), depth)[:, None, None], depth)[depth:-depth, 0, 0]
                      for n in inside.shape)
        share = rows[:, None] * cols[None, :]
    else:
        padded = np.pad(inside.astype(np.float32), depth)
        share = box_mean(padded[..., None], depth)[..., 0][depth:-depth, depth:-depth]
    return np.clip(2.0 * share - 1.0, 0.0, 1.0)


def _distance_along_lines(outside: np.ndarray) -> np.ndarray:
    """Per pixel, the distance to the nearest ``outside`` pixel in the same row or column (inf if none):
    exact for frames, which are bands along the sides."""
    def along(mask: np.ndarray, axis: int) -> np.ndarray:
        shape = [1, 1]
        shape[axis] = mask.shape[axis]
        idx = np.arange(mask.shape[axis], dtype=np.float32).reshape(shape)
        before = np.maximum.accumulate(np.where(mask, idx, -np.inf), axis=axis)
        after = np.flip(np.minimum.accumulate(np.flip(np.where(mask, idx, np.inf), axis), axis=axis), axis)
        return np.minimum(idx - before, after - idx)

    return np.minimum(along(outside, 1), along(outside, 0))


def fade_in_from_edges(keep: np.ndarray) -> np.ndarray:
    """``keep`` (h, w) in [0, 1] (0 in frames) with chroma also fading in from every edge: over
    ``EDGE_TAPER_FRACTION`` of the short side from the image's edges, over ``FRAME_TAPER_FRACTION`` from
    a frame's inner edge."""
    inside = keep > 0.5
    short = min(keep.shape)
    fade = _ramp(inside, max(1, int(round(EDGE_TAPER_FRACTION * short))))
    if not inside.all():
        depth = max(1, FRAME_TAPER_FRACTION * short)
        fade = np.minimum(fade, np.clip(_distance_along_lines(~inside) / depth, 0.0, 1.0))
    return fade * keep


def recombine(
    lightness: np.ndarray, ab_low: np.ndarray, l_low: np.ndarray, dtype: type = np.uint8, edge_aware: bool = True,
    neutral_frames: bool = True, colour_strength: float = 1.0,
) -> np.ndarray:
    """Full-resolution RGB from the original L and the model's low-resolution ab.

    lightness: (H, W) float32 L in [0, 100], the original scan's. ab_low: (h, w, 2) float32 CIELAB
    a, b at working size. l_low: (h, w) float32 L in [0, 100] at working size (the guide).
    neutral_frames: keep frames (``frame_mask``) free of chroma and fade chroma in from the edges of the
    image and of the frames (``fade_in_from_edges``). colour_strength: scales the chroma (``run --colour-strength``).
    Returns (H, W, 3) ``dtype`` (uint8 or uint16) sRGB whose L equals ``lightness`` up to quantisation.
    """
    height, width = lightness.shape
    if colour_strength != 1.0:
        ab_low = ab_low * np.float32(colour_strength)
    if edge_aware:
        coef_a, coef_b = guided_coefficients(l_low / 100.0, ab_low)
        low = np.concatenate([coef_a, coef_b], axis=-1)
    else:
        low = ab_low
    keep = None
    if neutral_frames:  # found at up to FRAME_DETECT_SIDE px, where thin plate edges survive the downsizing
        scale = min(1.0, FRAME_DETECT_SIDE / max(height, width))
        detect = lightness if scale == 1.0 else resize_plane(lightness, max(1, round(height * scale)),
                                                               max(1, round(width * scale)))
        keep = fade_in_from_edges(1.0 - frame_mask(detect))[..., None]
    top = np.iinfo(dtype).max
    out = np.empty((height, width, 3), dtype=dtype)
    rows = max(1, STRIP_PIXELS // width)
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        l_strip = lightness[y0:y1]
        up = bilinear_rows(low, height, width, y0, y1)
        ab = up[..., 0:2] * (l_strip[..., None] / 100.0) + up[..., 2:4] if edge_aware else up
        if keep is not None:  # applied at full size, after the guided filter, so no colour bleeds into a frame
            ab = ab * bilinear_rows(keep, height, width, y0, y1)
        lab = np.concatenate([l_strip[..., None], ab], axis=-1)
        out[y0:y1] = np.round(lab_to_rgb_keep_l(lab) * top).astype(dtype)
    return out
