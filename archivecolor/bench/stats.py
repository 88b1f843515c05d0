"""Means with 95% confidence intervals and paired t-tests (scipy)."""

from __future__ import annotations

import math

import numpy as np


def mean_ci(values: list[float]) -> dict:
    from scipy import stats

    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    half = float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "ci95": [float(x.mean() - half), float(x.mean() + half)], "n": int(len(x))}


def paired_test(a: list[float], b: list[float]) -> dict:
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return {"t": None, "p": None, "mean_diff": None}
    t, p = stats.ttest_rel(x[ok], y[ok])
    return {"t": float(t), "p": float(p), "mean_diff": float((x[ok] - y[ok]).mean())}
