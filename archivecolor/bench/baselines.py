"""What the exemplar method is compared with, besides gray."""

from __future__ import annotations

import numpy as np

L_BINS = 16


def global_transfer(l_target: np.ndarray, ref_lab: np.ndarray) -> np.ndarray:
    """Reinhard-style global transfer: match the reference's L statistics to the target's, then give
    each target pixel the mean reference ab of its L band. Returns (H, W, 2) ab."""
    rl = ref_lab[..., 0].ravel()
    rl = (rl - rl.mean()) / (rl.std() + 1e-6) * (l_target.std() + 1e-6) + l_target.mean()
    edges = np.quantile(rl, np.linspace(0, 1, L_BINS + 1)[1:-1])
    ref_bin = np.digitize(rl, edges)
    ab = ref_lab[..., 1:].reshape(-1, 2)
    means = np.stack([ab[ref_bin == k].mean(axis=0) if np.any(ref_bin == k) else ab.mean(axis=0)
                      for k in range(L_BINS)])
    return means[np.digitize(l_target, edges)].astype(np.float32)
