"""pareto_front: the fast path agrees with the definition and refuses bad input."""

from __future__ import annotations

import numpy as np
import pytest

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search.pareto import Sense, pareto_front, pareto_front_reference


@pytest.mark.parametrize("seed", range(20))
def test_fast_front_equals_reference_on_random_points(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(1, 1500 if seed == 0 else 300)), int(rng.integers(1, 5))
    # Rounded values make ties and duplicates, the cases a sort-based front gets wrong.
    pts = np.round(rng.random((n, d)) * 10)
    senses = [Sense.MIN if b else Sense.MAX for b in rng.random(d) < 0.5]
    np.testing.assert_array_equal(pareto_front(pts, senses), pareto_front_reference(pts, senses))


def test_front_keeps_trade_offs_and_drops_dominated_points() -> None:
    pts = [[1, 5], [2, 2], [5, 1], [3, 3], [2, 2]]
    assert pareto_front(pts, [Sense.MIN, Sense.MIN]).tolist() == [0, 1, 2, 4]


def test_max_sense_flips_the_comparison() -> None:
    assert pareto_front([[1.0], [3.0], [2.0]], [Sense.MAX]).tolist() == [1]


@pytest.mark.parametrize(("points", "senses"), [
    ([1.0, 2.0], [Sense.MIN]),
    ([[1.0, 2.0]], [Sense.MIN]),
    ([[1.0, float("nan")]], [Sense.MIN, Sense.MIN]),
    ([[1.0]], ["min"]),
])
def test_rejects_malformed_points_or_senses(points: object, senses: list) -> None:
    with pytest.raises(InputError):
        pareto_front(points, senses)  # type: ignore[arg-type]
