"""Length distributions: the figures a spec gives come back out, and sampling is deterministic
per seed and matches the distribution."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from trilemma.optimizer import spec

N = 20_000
DISTRIBUTIONS = {
    "fixed": spec.FixedLengths(kind="fixed", value=500),
    "lognormal": spec.LognormalLengths(kind="lognormal", mean=5000, p90=9000),
    "lognormal_tight": spec.LognormalLengths(kind="lognormal", mean=120_000, p90=135_000),
    "histogram_values": spec.HistogramLengths(kind="histogram", values=[100, 400, 2000],
                                              weights=[5, 3, 2]),
    "histogram_edges": spec.HistogramLengths(kind="histogram", edges=[500, 2000, 4000, 16000],
                                             weights=[0.2, 0.5, 0.3]),
}
IDS = list(DISTRIBUTIONS)


@pytest.mark.parametrize("name", IDS)
def test_sampling_is_deterministic_for_a_seed(name):
    dist = DISTRIBUTIONS[name]
    a = dist.sample(1000, np.random.default_rng(7))
    b = dist.sample(1000, np.random.default_rng(7))
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    if name != "fixed":
        assert not np.array_equal(a, dist.sample(1000, np.random.default_rng(8)))


@pytest.mark.parametrize("name", IDS)
def test_sample_mean_matches_the_distribution_mean(name):
    dist = DISTRIBUTIONS[name]
    draws = dist.sample(N, np.random.default_rng(1))
    assert draws.mean() == pytest.approx(dist.mean_tokens(), rel=0.03)
    assert draws.min() >= 1


@pytest.mark.parametrize("name", IDS)
def test_sample_percentiles_match_the_distribution_percentiles(name):
    dist = DISTRIBUTIONS[name]
    draws = dist.sample(N, np.random.default_rng(2))
    for pct, value in ((50, dist.p50_tokens()), (90, dist.p90_tokens())):
        assert np.percentile(draws, pct) == pytest.approx(value, rel=0.04)


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("cap", [1, 300, 1500, 5000, 116_000, 1e9])
def test_expected_min_matches_a_monte_carlo_estimate(name, cap):
    dist = DISTRIBUTIONS[name]
    draws = dist.sample(N, np.random.default_rng(3))
    assert dist.expected_min(cap) == pytest.approx(np.minimum(draws, cap).mean(), rel=0.03)


def test_a_lognormal_reproduces_its_mean_and_p90():
    dist = spec.LognormalLengths(kind="lognormal", mean=2500, p90=4000)
    assert dist.mean_tokens() == 2500
    assert dist.p90_tokens() == pytest.approx(4000)
    assert dist.p50_tokens() < dist.mean_tokens()


@pytest.mark.parametrize(("p90", "why"), [
    (2500, "p90 must exceed the mean"),
    (2000, "p90 must exceed the mean"),
    (5700, "no lognormal has p90 above 2.273 x its mean"),
])
def test_a_lognormal_rejects_a_p90_no_lognormal_has(p90, why):
    with pytest.raises(pydantic.ValidationError, match=why):
        spec.LognormalLengths(kind="lognormal", mean=2500, p90=p90)


def test_a_histogram_of_values_reports_its_weighted_figures():
    dist = DISTRIBUTIONS["histogram_values"]
    assert dist.mean_tokens() == pytest.approx(0.5 * 100 + 0.3 * 400 + 0.2 * 2000)
    assert dist.p50_tokens() == 100
    assert dist.p90_tokens() == 2000
    assert dist.expected_min(300) == pytest.approx(0.5 * 100 + 0.5 * 300)


def test_a_histogram_of_bins_interpolates_inside_a_bin():
    dist = DISTRIBUTIONS["histogram_edges"]
    assert dist.mean_tokens() == pytest.approx(0.2 * 1250 + 0.5 * 3000 + 0.3 * 10000)
    assert dist.p50_tokens() == pytest.approx(2000 + 2000 * 0.3 / 0.5)
    assert dist.expected_min(100) == pytest.approx(100)  # every bin lies above the cap


def test_sampling_needs_a_numpy_generator():
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        DISTRIBUTIONS["lognormal"].sample(10, np.random.RandomState(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("pct", [0, 100, -5, 150])
def test_percentiles_are_strictly_between_0_and_100(pct):
    with pytest.raises(ValueError, match="strictly between"):
        DISTRIBUTIONS["fixed"].percentile_tokens(pct)
