import numpy as np
import pytest

from pipeline.metrics.domain_gap import proxy_a_distance, wilson


def test_wilson_matches_the_textbook_interval():
    lo, hi = wilson(
        10, 100, 0.95
    )  # Newcombe (1998) / statsmodels proportion_confint(method="wilson")
    assert lo == pytest.approx(0.05523, abs=1e-4) and hi == pytest.approx(0.17437, abs=1e-4)


def test_separable_domains_are_far_apart_and_one_domain_is_not():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    far = proxy_a_distance(
        rng.normal(size=(300, 16)), rng.normal(size=(400, 16)) + np.eye(16)[0] * 3
    )
    same = proxy_a_distance(a[:150], a[150:])
    assert far["a_distance"] > 1.6 and far["a_distance_ci"][0] > 1.3
    assert same["a_distance_ci"][0] <= 0 <= same["a_distance_ci"][1] + 0.05
    assert far["n_fit"] == 300 and far["n_test"] == 300  # balanced: 300 per domain, halves
    assert same["error_ci"][0] <= same["error"] <= same["error_ci"][1]


def test_too_few_rows_is_an_error():
    with pytest.raises(ValueError, match="at least 4 rows"):
        proxy_a_distance(np.zeros((3, 2)), np.ones((10, 2)))


def test_centroid_gap_measures_a_shift_in_units_of_the_source_spread():
    from pipeline.metrics.domain_gap import centroid_gap

    src = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # spread 1 around 0
    assert centroid_gap(src, src + [0.0, 3.0]) == 3.0
    assert centroid_gap(src, src[::-1]) == 0.0
    # d_A saturates for any shift a line separates; the centroid gap keeps its scale
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 2)) * [1.0, 0.01]
    small, large = a[200:] + [0.0, 0.1], a[200:] + [0.0, 1.0]
    assert proxy_a_distance(a[:200], small)["a_distance"] > 1.9
    assert proxy_a_distance(a[:200], large)["a_distance"] > 1.9
    assert centroid_gap(a[:200], large) > 5 * centroid_gap(a[:200], small)
