"""The simulator's workload: validation and the samplers for lengths, arrivals and prefixes."""

import numpy as np
import pytest

from trilemma.optimizer import serving
from trilemma.optimizer.errors import InputError


def _workload(**over):
    n = 4
    fields = dict(prompt_tokens=np.full(n, 100), output_tokens=np.full(n, 10),
                  prefix_id=np.full(n, -1), prefix_tokens=np.zeros(n),
                  arrival_ms=np.arange(n, dtype=float))
    fields.update(over)
    return serving.RequestStream(**fields)


@pytest.mark.parametrize("over,field", [
    (dict(prompt_tokens=np.array([100, 0, 100, 100])), "prompt_tokens"),
    (dict(output_tokens=np.array([10, 10, 0, 10])), "output_tokens"),
    (dict(output_tokens=np.full(3, 10)), "output_tokens"),
    (dict(prefix_id=np.array([0, -1, -1, -1]), prefix_tokens=np.array([100, 0, 0, 0])),
     "prefix_tokens"),
    (dict(prefix_tokens=np.array([5, 0, 0, 0])), "prefix_tokens"),
    (dict(prefix_id=np.array([-2, -1, -1, -1])), "prefix_id"),
    (dict(arrival_ms=np.array([0.0, 2.0, 1.0, 3.0])), "arrival_ms"),
    (dict(arrival_ms=np.array([0.0, np.nan, 1.0, 3.0])), "arrival_ms"),
    (dict(mode=serving.LoadMode.CLOSED), "concurrency"),
    (dict(concurrency=4), "concurrency"),
])
def test_workload_rejects_inconsistent_rows_naming_the_field(over, field):
    with pytest.raises(InputError) as err:
        _workload(**over)
    assert err.value.field == field


def test_workload_arrays_are_read_only_copies():
    prompts = np.full(4, 100)
    w = _workload(prompt_tokens=prompts)
    prompts[0] = 7
    assert w.prompt_tokens[0] == 100
    with pytest.raises(ValueError):
        w.prompt_tokens[0] = 1


@pytest.mark.parametrize("mean,p90", [(200.0, 350.0), (1000.0, 1800.0), (50.0, 60.0)])
def test_lognormal_lengths_have_the_requested_mean_and_p90(mean, p90):
    x = serving.Lognormal(mean=mean, p90=p90).sample(np.random.default_rng(0), 200_000)
    assert x.mean() == pytest.approx(mean, rel=0.02)
    assert np.percentile(x, 90) == pytest.approx(p90, rel=0.02)


@pytest.mark.parametrize("mean,p90", [(100.0, 90.0), (100.0, 300.0), (0.5, 2.0)])
def test_lognormal_refuses_a_p90_no_lognormal_has(mean, p90):
    with pytest.raises(InputError):
        serving.Lognormal(mean=mean, p90=p90).sample(np.random.default_rng(0), 10)


def test_histogram_lengths_fall_in_the_bins_in_proportion_to_the_counts():
    h = serving.Histogram(edges=(10, 20, 100), counts=(3.0, 1.0))
    x = h.sample(np.random.default_rng(0), 40_000)
    assert x.min() >= 10 and x.max() < 100
    assert np.mean(x < 20) == pytest.approx(0.75, abs=0.01)


@pytest.mark.parametrize("cv", [0.5, 1.0, 4.0])
def test_gamma_arrivals_have_the_rate_and_burstiness_asked_for(cv):
    t = serving.Gamma(rate_per_s=20.0, cv=cv).sample(np.random.default_rng(1), 200_000)
    gaps = np.diff(t)
    assert t[0] == 0.0 and np.all(gaps >= 0)
    assert 1e3 / gaps.mean() == pytest.approx(20.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_poisson_is_gamma_with_unit_cv():
    a = serving.Poisson(rate_per_s=3.0).sample(np.random.default_rng(2), 100)
    b = serving.Gamma(rate_per_s=3.0, cv=1.0).sample(np.random.default_rng(2), 100)
    np.testing.assert_array_equal(a, b)


def test_prefix_reuse_marks_the_share_of_requests_and_keeps_their_prompts_longer():
    rng = np.random.default_rng(3)
    w = serving.sample_requests(rng, requests=20_000, prompt_tokens=serving.Fixed(tokens=100),
                                output_tokens=serving.Fixed(tokens=5), arrivals=serving.Offline(),
                                prefix=serving.SharedPrefixes(tokens=300, share=0.4, prefixes=5))
    shared = w.prefix_id >= 0
    assert shared.mean() == pytest.approx(0.4, abs=0.01)
    assert set(np.unique(w.prefix_id[shared])) == set(range(5))
    assert np.all(w.prompt_tokens[shared] == 301) and np.all(w.prompt_tokens[~shared] == 100)
    assert np.all(w.prefix_tokens[shared] == 300) and np.all(w.prefix_tokens[~shared] == 0)


@pytest.mark.parametrize("arrivals,mode,concurrency", [
    (serving.Poisson(rate_per_s=1.0), serving.LoadMode.OPEN, 0),
    (serving.Timestamps(ms=(0.0, 5.0, 5.0)), serving.LoadMode.OPEN, 0),
    (serving.ClosedLoop(concurrency=2), serving.LoadMode.CLOSED, 2),
    (serving.Offline(), serving.LoadMode.OFFLINE, 0),
])
def test_sample_requests_records_how_the_client_sends(arrivals, mode, concurrency):
    w = serving.sample_requests(np.random.default_rng(0), requests=3,
                                prompt_tokens=serving.Fixed(tokens=10),
                                output_tokens=serving.Fixed(tokens=2), arrivals=arrivals)
    assert (w.mode, w.concurrency, len(w)) == (mode, concurrency, 3)


def test_sampling_is_a_pure_function_of_the_generator():
    def draw(seed):
        return serving.sample_requests(
            np.random.default_rng(seed), requests=50,
            prompt_tokens=serving.Lognormal(mean=500, p90=900),
            output_tokens=serving.Fixed(tokens=20),
            arrivals=serving.Gamma(rate_per_s=2.0, cv=2.0),
            prefix=serving.SharedPrefixes(tokens=64, share=0.5))
    a, b, c = draw(7), draw(7), draw(8)
    for name in ("prompt_tokens", "prefix_id", "arrival_ms"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.arrival_ms, c.arrival_ms)
