"""He et al.'s demo pairs with their own references, side by side with their published outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from archivecolor.bench.metrics import ab_histogram_overlap, colorfulness, rgb01_to_uint8
from archivecolor.bench.report import gray_rgb
from archivecolor.color import lab_to_rgb, normalise_l, rgb_to_lab
from archivecolor.errors import UsageError
from archivecolor.imageio import read_image, to_upright
from archivecolor.models.weights import sha256_file
from archivecolor.pipeline import (
    CHOSEN_REFERENCE_CAST,
    Models,
    check_colour_strength,
    predict,
    reference_from_lab,
    upright_lab,
)
from archivecolor.upsample import recombine, resize_plane
from archivecolor.upsample import working_size as fit_working_size


def run_pairs(pairs_dir: Path, out: Path, provider: str = "auto", home: Path | None = None,
              working_size: int = 256, model_path: Path | None = None, precision: str = "auto",
              colour_strength: float = 1.0) -> dict:
    """Colorize He et al.'s demo pairs with their given references; compare with their outputs in res/."""
    check_colour_strength(colour_strength)
    listing = pairs_dir / "pairs.txt"
    if not listing.is_file():
        raise UsageError(f"{listing}: missing; pass a folder with input/, res/ and pairs.txt")
    out.mkdir(parents=True, exist_ok=True)
    models = Models.open(provider, home, unet_path=model_path, precision=precision)
    rows = []
    for line in listing.read_text().split("\n"):
        parts = line.split()
        if len(parts) < 2:
            continue
        target, ref = pairs_dir / "input" / parts[0], pairs_dir / "input" / parts[1]
        theirs = pairs_dir / "res" / f"{Path(parts[0]).stem}_{Path(parts[1]).stem}.png"
        scan = read_image(target)
        lightness = to_upright(scan.lightness(), scan.orientation)
        h, w = fit_working_size(*lightness.shape, working_size)
        l_low = resize_plane(lightness, h, w)
        ref_lab = upright_lab(read_image(ref))
        ref_rgb = rgb01_to_uint8(lab_to_rgb(ref_lab))
        reference = reference_from_lab(sha256_file(ref), ref_lab, working_size)
        reference.features = models.features_of(reference.l)
        pred = predict(models, normalise_l(l_low)[None, None], [[reference]], chosen=True,
                       chosen_cast=CHOSEN_REFERENCE_CAST)[0]
        ours = recombine(lightness, pred.ab, pred.l, colour_strength=colour_strength)
        row = {"target": parts[0], "reference": parts[1],
               "ours": {"colorfulness": colorfulness(ours), "ab_overlap": ab_histogram_overlap(rgb_to_lab(ours), ref_lab)}}
        their_img = None
        if theirs.exists():
            their_img = np.asarray(Image.open(theirs).convert("RGB"))
            row["he2018"] = {"colorfulness": colorfulness(their_img),
                             "ab_overlap": ab_histogram_overlap(rgb_to_lab(their_img), ref_lab)}
        rows.append((row, gray_rgb(lightness), ref_rgb, ours, their_img))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3 * len(rows)), squeeze=False)
    for r, (row, gray, ref, ours, theirs) in enumerate(rows):
        for c, (title, img) in enumerate((("target", gray), ("reference", ref), ("archivecolor", ours),
                                          ("He et al. 2018", theirs))):
            if img is not None:
                axes[r, c].imshow(img)
            axes[r, c].set_title(f"{row['target']}: {title}" if c == 0 else title, fontsize=8)
            axes[r, c].axis("off")
    fig.tight_layout()
    fig.savefig(out / "pairs.png", dpi=70)
    plt.close(fig)
    summary = {"pairs": [r[0] for r in rows], "precision": models.precision, "models": models.hashes()}
    for who in ("ours", "he2018"):
        vals = [r[0][who] for r in rows if who in r[0]]
        if vals:
            summary[who] = {k: float(np.mean([v[k] for v in vals])) for k in ("colorfulness", "ab_overlap")}
    (out / "pairs.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
