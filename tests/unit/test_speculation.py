"""Speculative decoding: parsing, the tokens-per-step formula, the fitted acceptance model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trilemma.optimizer.catalog import fit_speculation, speculation
from trilemma.optimizer.catalog.speculation import DraftKind, SpecConfig, SpecMethod
from trilemma.optimizer.errors import InputError

DRAFTING = [m for m in SpecMethod if m is not SpecMethod.NONE]
RAW = speculation.load_raw()


# ---- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,method,k,model",
    [
        ("none", SpecMethod.NONE, 0, None),
        (" NONE ", SpecMethod.NONE, 0, None),
        ("eagle3:3", SpecMethod.EAGLE3, 3, None),
        ("EAGLE-3:2", SpecMethod.EAGLE3, 2, None),
        ("eagle:5", SpecMethod.EAGLE, 5, None),
        ("ngram:4", SpecMethod.NGRAM, 4, None),
        ("n-gram:1", SpecMethod.NGRAM, 1, None),
        ("mtp:1", SpecMethod.MTP, 1, None),
        ("mtp:16", SpecMethod.MTP, 16, None),
        ("draft:meta-llama/Llama-3.2-1B:4", SpecMethod.DRAFT, 4, "meta-llama/Llama-3.2-1B"),
    ],
)
def test_parse_spec_reads_method_k_and_draft_model(text, method, k, model):
    spec = speculation.parse_spec(text)
    assert (spec.method, spec.k, spec.draft_model) == (method, k, model)
    assert speculation.parse_spec(spec.text()) == spec  # text() is the inverse


@pytest.mark.parametrize(
    "text,why",
    [
        ("medusa:3", "unknown speculation method"),
        ("eagle3:0", "between 1 and 16"),
        ("eagle3:17", "between 1 and 16"),
        ("ngram:-1", "between 1 and 16"),
        ("none:3", "no draft-token count"),
        ("eagle3", "expected eagle3:<k>"),
        ("eagle3:x", "must be an integer"),
        ("ngram:some/model:3", "expected ngram:<k>"),
        ("draft:4", "needs a model"),
        ("draft:meta-llama/Llama-3.2-1B", "needs the draft-token count"),
        ("draft::4", "needs a model"),
        ("", "empty"),
    ],
)
def test_parse_spec_rejects_bad_text_naming_field_value_and_why(text, why):
    with pytest.raises(InputError) as err:
        speculation.parse_spec(text, field="spec.speculation")
    assert err.value.field == "spec.speculation"
    assert err.value.value == text
    assert why in err.value.why


@pytest.mark.parametrize(
    "kwargs,why",
    [
        ({"method": SpecMethod.EAGLE, "k": 0}, "between 1 and 16"),
        ({"method": SpecMethod.NONE, "k": 2}, "no draft-token count"),
        ({"method": SpecMethod.DRAFT, "k": 2}, "needs the draft model"),
        ({"method": SpecMethod.MTP, "k": 2, "draft_model": "x"}, "only the draft method"),
    ],
)
def test_a_spec_config_refuses_inconsistent_fields(kwargs, why):
    with pytest.raises(InputError) as err:
        SpecConfig(**kwargs)
    assert err.value.field == "spec" and why in err.value.why


# ---- tokens per step -------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(0, 17))
def test_no_acceptance_yields_one_token_and_full_acceptance_k_plus_one(k):
    assert speculation.expected_tokens_per_step(0.0, k) == 1.0
    assert speculation.expected_tokens_per_step(1.0, k) == k + 1


@pytest.mark.parametrize("k", [1, 3, 7, 16])
def test_tokens_per_step_approach_the_limits_continuously(k):
    near_zero = speculation.expected_tokens_per_step(1e-9, k)
    near_one = speculation.expected_tokens_per_step(1 - 1e-9, k)
    assert near_zero == pytest.approx(1.0, abs=1e-8)
    assert near_one == pytest.approx(k + 1, rel=1e-6)


@pytest.mark.parametrize("a", [0.1, 0.5, 0.73, 0.9, 0.99])
@pytest.mark.parametrize("k", [1, 2, 4, 10])
def test_tokens_per_step_equal_the_closed_form(a, k):
    closed = (1 - a ** (k + 1)) / (1 - a)
    assert speculation.expected_tokens_per_step(a, k) == pytest.approx(closed, rel=1e-12)


def test_tokens_per_step_are_vectorized_over_acceptance():
    a = np.array([[0.0, 0.5], [0.8, 1.0]])
    out = speculation.expected_tokens_per_step(a, 3)
    assert out.shape == (2, 2)
    assert out[1, 1] == 4.0 and out[0, 0] == 1.0


@pytest.mark.parametrize("a,k,field", [(1.2, 3, "acceptance"), (-0.1, 3, "acceptance"),
                                       (float("nan"), 3, "acceptance"), (0.5, -1, "k"),
                                       (0.5, 2.5, "k")])
def test_tokens_per_step_reject_impossible_inputs(a, k, field):
    with pytest.raises(InputError) as err:
        speculation.expected_tokens_per_step(a, k)
    assert err.value.field == field


@pytest.mark.parametrize("a", [0.0, 0.2, 0.6, 0.85, 1.0])
@pytest.mark.parametrize("k", [1, 3, 5, 10])
def test_acceptance_from_tokens_inverts_tokens_per_step(a, k):
    tau = speculation.expected_tokens_per_step(a, k)
    assert speculation.acceptance_from_tokens_per_step(tau, k) == pytest.approx(a, abs=1e-12)


def test_acceptance_from_tokens_refuses_more_tokens_than_k_plus_one():
    with pytest.raises(InputError):
        speculation.acceptance_from_tokens_per_step(4.5, 3)


# ---- acceptance model ------------------------------------------------------------------------


@pytest.mark.parametrize("method", DRAFTING, ids=lambda m: m.value)
def test_acceptance_rises_with_predictability_and_stays_a_probability(method):
    p = np.linspace(0.0, 1.0, 21)
    a = speculation.acceptance_rate(method, p)
    assert a.shape == p.shape
    assert np.all(np.diff(a) >= 0)
    assert np.all((a >= 0.0) & (a < 1.0))


@pytest.mark.parametrize("method", DRAFTING, ids=lambda m: m.value)
def test_acceptance_at_the_ends_is_the_shipped_a_lo_and_a_hi(method):
    entry = RAW["methods"][method.value]
    lo, hi = speculation.acceptance_rate(method, [0.0, 1.0])
    assert (lo, hi) == (entry["a_lo"], entry["a_hi"])


def test_no_speculation_accepts_nothing():
    assert np.all(speculation.acceptance_rate(SpecMethod.NONE, [0.0, 0.5, 1.0]) == 0.0)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_predictability_outside_zero_to_one_is_an_input_error(p):
    with pytest.raises(InputError) as err:
        speculation.acceptance_rate(SpecMethod.EAGLE3, p)
    assert err.value.field == "output_predictability"


def test_a_learned_drafter_beats_prompt_lookup_on_chat():
    chat = {m: float(speculation.acceptance_rate(m, 0.5)) for m in DRAFTING}
    assert chat[SpecMethod.EAGLE3] > chat[SpecMethod.NGRAM]
    assert chat[SpecMethod.EAGLE] > chat[SpecMethod.NGRAM]


# ---- drafting cost ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,kind",
    [(SpecMethod.NONE, "none"), (SpecMethod.NGRAM, "none"), (SpecMethod.DRAFT, "model"),
     (SpecMethod.EAGLE, "layers"), (SpecMethod.EAGLE3, "layers"), (SpecMethod.MTP, "layers")],
)
def test_draft_cost_kind_per_method_compares_equal_to_its_string(method, kind):
    cost = speculation.draft_cost(method)
    assert cost.kind == kind and cost.kind is DraftKind(kind)
    assert (cost.layers >= 1.0) == (kind == "layers")
    assert 0.0 <= cost.lm_head_fraction <= 1.0


def test_layer_drafters_cost_about_one_target_layer_per_token():
    for method in (SpecMethod.EAGLE, SpecMethod.EAGLE3, SpecMethod.MTP):
        assert 1.0 <= speculation.draft_cost(method).layers <= 1.5
        assert speculation.draft_cost(method).note


# ---- the shipped fit -------------------------------------------------------------------------


@pytest.mark.parametrize("method", DRAFTING, ids=lambda m: m.value)
def test_every_method_ships_a_fit_with_its_rows_and_error(method):
    entry = RAW["methods"][method.value]
    fit = entry["fit"]
    assert fit["rows_used"] == len(entry["rows"]) >= 2
    for key in ("rmse_acceptance", "rmse_tokens_per_step", "mean_abs_rel_error_tokens",
                "max_abs_rel_error_tokens"):
        assert 0.0 <= fit[key] < 1.0
    # What we ship: every method within 15% mean relative error in tokens per step.
    assert fit["mean_abs_rel_error_tokens"] < 0.15
    assert entry["caveats"]


def _fit_rows():
    for method, entry in RAW["methods"].items():
        for row in entry["rows"]:
            yield method, row


@pytest.mark.parametrize("method,row", list(_fit_rows()),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_every_fit_row_is_cited_and_its_dataset_mapped_with_a_reason(method, row):
    assert row["source"] and row["derivation"]
    mapping = RAW["predictability"][row["dataset"]]
    assert mapping["p"] == row["p"] and mapping["why"]
    assert 1.0 <= row["tokens_per_step"] <= row["k"] + 1
    tau = speculation.expected_tokens_per_step(row["a"], row["k"])
    # a is stored to 4 decimals; d(tau)/da is below 15 for these k, so 1e-3 relative holds.
    assert tau == pytest.approx(row["tokens_per_step"], rel=1e-3)


def test_every_excluded_csv_group_says_why():
    assert RAW["excluded"]
    for group in RAW["excluded"]:
        assert group["why"] and group["rows"] >= 1


@pytest.mark.parametrize(
    "p,a,how",
    [
        ([0.0, 0.5, 1.0], [0.2, 0.5, 0.8], "least squares"),
        ([0.0, 0.5, 1.0], [0.8, 0.5, 0.2], "flat"),
        ([0.2, 0.4, 0.9], [0.0, 0.05, 0.7], "a_lo at its bound 0"),
    ],
)
def test_the_fit_is_least_squares_kept_monotone_and_inside_zero_to_one(p, a, how):
    lo, hi, said = fit_speculation.fit_line(np.array(p), np.array(a), None)
    assert 0.0 <= lo <= hi <= fit_speculation.A_MAX
    assert how in said
    if how == "least squares":
        assert (lo, hi) == pytest.approx((0.2, 0.8))


def test_a_borrowed_spread_fits_only_the_level():
    lo, hi, said = fit_speculation.fit_line(np.array([0.5, 0.5]), np.array([0.6, 0.7]), 0.2)
    assert hi - lo == pytest.approx(0.2) and lo + 0.1 == pytest.approx(0.65)
    assert "borrowed" in said


@pytest.mark.skipif(not fit_speculation.DEFAULT_CSV.is_file(),
                    reason="../shared/data/validation/speculative.csv not present")
def test_the_shipped_fit_is_what_the_fit_script_makes_from_the_csv():
    shipped = Path(fit_speculation.OUTPUT).read_text(encoding="utf-8")
    rebuilt = fit_speculation.render(fit_speculation.build(fit_speculation.DEFAULT_CSV))
    assert shipped == rebuilt, "rerun: python -m trilemma.optimizer.catalog.fit_speculation"
