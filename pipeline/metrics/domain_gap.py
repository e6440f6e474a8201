"""Domain gap: the proxy A-distance between two sets of feature vectors.

Ben-David et al. (2007, 2010) bound a classifier's target error by its source error plus
the A-distance between the domains; Ganin et al. (2016, DANN, section 5.1.4) estimate it
from the error ε of a classifier trained to tell the domains apart: d_A = 2(1 - 2ε). Here
ε is the test error of a linear domain classifier (L2-regularised logistic regression,
`pipeline.clip.probes.linear_probe`, on rows centred on the fit half's mean and scaled to
unit length) fit on one half of class-balanced rows (the larger domain subsampled to the
smaller, seeded) and scored on the other half. d_A is 2 for domains a line separates, 0
for domains it cannot tell apart (ε = 0.5; a negative d_A is chance noise). The interval
is the Wilson score interval of ε over the test rows (a binomial count), mapped to d_A.

d_A saturates: a shift that a line separates gives 2 however small it is next to the rows'
spread (on issue 20's offset control the adversarially trained prefix still scored 2.0
while its domains' distance had shrunk 3-fold). `centroid_gap` is the scale beside it:
the distance between the two domains' mean rows over the mean distance of a source row to
its mean (0: the same centre; 1: centres a typical row's spread apart).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

HOW = (
    "proxy A-distance d_A = 2(1 - 2ε) (Ganin et al. 2016, 5.1.4): ε the test error of a "
    "linear domain classifier (L2 logistic regression, L-BFGS, on rows centred on the fit "
    "half's mean and unit-normalised) fit on half of class-balanced rows (the larger domain "
    "subsampled to the smaller, seeded), scored on the other half; interval: the Wilson score "
    "interval of ε over the test rows, mapped to d_A. 2: separable, 0: indistinguishable; "
    "centroid_gap: ‖mean target - mean source‖ / mean ‖source row - mean source‖"
)


def centroid_gap(source: np.ndarray, target: np.ndarray) -> float:
    """‖mean(target) - mean(source)‖ / mean ‖source row - mean(source)‖ (module docstring)."""
    s, t = np.asarray(source, dtype=np.float64), np.asarray(target, dtype=np.float64)
    centre = s.mean(0)
    spread = float(np.linalg.norm(s - centre, axis=1).mean())
    return round(float(np.linalg.norm(t.mean(0) - centre)) / max(spread, 1e-12), 4)


def wilson(errors: int, n: int, level: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion errors / n."""
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proxy_a_distance(
    source: np.ndarray, target: np.ndarray, seed: int = 0, level: float = 0.95
) -> dict[str, float | int | list[float]]:
    """d_A between the rows of `source` and `target` (each (n, d)), with ε and intervals."""
    import torch

    from pipeline.clip.probes import linear_probe

    n = min(len(source), len(target))
    if n < 4:
        raise ValueError(f"proxy A-distance needs at least 4 rows per domain, got {n}")
    rng = np.random.default_rng([seed, 1007])
    fit, test = [], []
    for rows in (source, target):
        pick = rng.permutation(len(rows))[:n]
        fit.append(np.asarray(rows, dtype=np.float64)[pick[: n // 2]])
        test.append(np.asarray(rows, dtype=np.float64)[pick[n // 2 :]])
    centre = np.concatenate(fit).mean(0)

    def prepare(parts: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.concatenate(parts) - centre).float()
        y = torch.cat([torch.full((len(p),), d, dtype=torch.long) for d, p in enumerate(parts)])
        return torch.nn.functional.normalize(x, dim=-1), y

    (x_fit, y_fit), (x_test, y_test) = prepare(fit), prepare(test)
    with torch.enable_grad():
        accuracy = linear_probe(x_fit, y_fit, x_test, y_test, n_classes=2, seed=seed)
    n_test = len(y_test)
    errors = round((1 - accuracy) * n_test)
    lo, hi = wilson(errors, n_test, level)
    eps = errors / n_test
    return {
        "a_distance": round(2 * (1 - 2 * eps), 4),
        "a_distance_ci": [round(2 * (1 - 2 * hi), 4), round(2 * (1 - 2 * lo), 4)],
        "error": round(eps, 4),
        "error_ci": [round(lo, 4), round(hi, 4)],
        "n_fit": len(y_fit),
        "n_test": n_test,
    }
