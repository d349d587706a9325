"""PromQL builders, and the metric names they share with the simulated engines' /metrics."""

import re
import subprocess

import pytest
import yaml

from tests.support.prometheus import promtool_binary
from trilemma.operator import estimator, promql
from trilemma.optimizer.catalog.engines import Engine
from trilemma.simfleet import vllm_metrics
from trilemma.simfleet.vllm_metrics import EngineMetrics

VLLM = promql.scope("vllm", {"model_name": "m"}, 900)
SGLANG = promql.scope("sglang", {"model_name": "m"}, 900)


# --- selectors and windows ---------------------------------------------------------------------


def test_label_values_are_escaped_as_promql_strings():
    assert (promql.label_matchers({"model_name": 'a"b\\c\nd'})
            == '{model_name="a\\"b\\\\c\\nd"}')


def test_matchers_are_sorted_so_equal_selectors_give_equal_queries():
    assert promql.label_matchers({"b": "2", "a": "1"}) == '{a="1",b="2"}'
    assert promql.label_matchers({}) == ""


@pytest.mark.parametrize("name", ["model-name", "1abc", "", 'a"b'])
def test_rejects_label_names_prometheus_cannot_have(name):
    with pytest.raises(ValueError, match="label name"):
        promql.label_matchers({name: "x"})


@pytest.mark.parametrize(("seconds", "text"), [(900, "900s"), (30.0, "30s"), (1, "1s")])
def test_windows_are_whole_seconds(seconds, text):
    assert promql.duration(seconds) == text


@pytest.mark.parametrize("seconds", [0, -5, 1.5])
def test_rejects_windows_that_are_not_whole_positive_seconds(seconds):
    with pytest.raises(ValueError):
        promql.scope("vllm", {}, seconds)


def test_an_empty_selector_takes_every_series():
    s = promql.scope("vllm", {}, 60)
    assert promql.request_rate(s) == "sum(rate(vllm:request_success_total[60s]))"


# --- the queries, per engine -------------------------------------------------------------------


def test_request_rate_sums_every_finish_reason_and_replica():
    assert (promql.request_rate(VLLM)
            == 'sum(rate(vllm:request_success_total{model_name="m"}[900s]))')
    assert (promql.request_rate(SGLANG)
            == 'sum(rate(sglang:num_requests_total{model_name="m"}[900s]))')


def test_mean_lengths_divide_rates_of_sum_by_count():
    assert promql.mean_prompt_tokens(VLLM) == (
        'sum(rate(vllm:request_prompt_tokens_sum{model_name="m"}[900s])) / '
        'sum(rate(vllm:request_prompt_tokens_count{model_name="m"}[900s]))')
    # SGLang has no length histogram by default: its token and request counters instead.
    assert promql.mean_output_tokens(SGLANG) == (
        'sum(rate(sglang:generation_tokens_total{model_name="m"}[900s])) / '
        'sum(rate(sglang:num_requests_total{model_name="m"}[900s]))')


def test_quantiles_sum_buckets_by_le_before_interpolating():
    assert promql.prompt_tokens_quantile(VLLM, 0.9) == (
        'histogram_quantile(0.9, sum by (le) '
        '(rate(vllm:request_prompt_tokens_bucket{model_name="m"}[900s])))')
    assert promql.ttft_quantile(SGLANG, 0.99) == (
        'histogram_quantile(0.99, sum by (le) '
        '(rate(sglang:time_to_first_token_seconds_bucket{model_name="m"}[900s])))')


@pytest.mark.parametrize("q", [0, 1, 1.5, -0.1])
def test_rejects_quantiles_outside_zero_one(q):
    with pytest.raises(ValueError, match="quantile"):
        promql.output_tokens_quantile(VLLM, q)


def test_itl_falls_back_to_the_older_per_token_histogram():
    query = promql.itl_quantile(VLLM, 0.5)
    first, second = query.split(" or ")
    assert "vllm:inter_token_latency_seconds_bucket" in first
    assert "vllm:time_per_output_token_seconds_bucket" in second


def test_prefix_share_is_zero_not_absent_when_no_hit_has_happened_yet():
    assert promql.prefix_hit_share(SGLANG) == (
        '(sum(rate(sglang:cached_tokens_total{model_name="m"}[900s])) / '
        'sum(rate(sglang:prompt_tokens_total{model_name="m"}[900s]))) '
        'or (0 * sum(rate(sglang:prompt_tokens_total{model_name="m"}[900s])))')


def test_spec_acceptance_uses_counters_for_vllm_and_the_gauge_for_sglang():
    assert promql.spec_acceptance(VLLM) == (
        'sum(rate(vllm:spec_decode_num_accepted_tokens_total{model_name="m"}[900s])) / '
        'sum(rate(vllm:spec_decode_num_draft_tokens_total{model_name="m"}[900s]))')
    assert (promql.spec_acceptance(SGLANG)
            == 'avg(avg_over_time(sglang:spec_accept_rate{model_name="m"}[900s]) > 0)')


def test_burstiness_differences_the_counter_over_non_overlapping_steps():
    query = promql.burstiness_cv(VLLM, 60)
    counter = 'vllm:request_success_total{model_name="m"}'
    counts = f"sum(clamp_min({counter} - {counter} offset 60s, 0))"
    assert query == (f"stddev_over_time(({counts})[900s:60s]) / "
                     f"sqrt(avg_over_time(({counts})[900s:60s]))")


def test_burstiness_needs_a_step_shorter_than_the_window():
    with pytest.raises(ValueError, match="shorter than the window"):
        promql.burstiness_cv(VLLM, 900)


def test_staleness_keeps_the_last_fresh_sample_across_stale_markers():
    assert promql.staleness_seconds(VLLM, 15) == (
        'time() - max(max_over_time(timestamp(vllm:request_success_total{model_name="m"})'
        '[900s:15s]))')


def test_gauges_average_over_time_then_over_replicas():
    assert (promql.mean_kv_cache_usage(SGLANG)
            == 'avg(avg_over_time(sglang:token_usage{model_name="m"}[900s]))')
    assert (promql.mean_waiting(VLLM)
            == 'sum(avg_over_time(vllm:num_requests_waiting{model_name="m"}[900s]))')
    assert promql.mean_queue_wait_seconds(SGLANG).startswith(
        'sum(rate(sglang:queue_time_seconds_sum{model_name="m"}[900s])) / ')


@pytest.mark.parametrize("engine", list(Engine))
def test_queries_name_only_their_own_engines_metrics(engine):
    other = {Engine.VLLM: "sglang:", Engine.SGLANG: "vllm:"}[engine]
    queries = estimator.workload_queries(engine, {"model_name": "m"}, 900)
    assert queries and not any(other in q for q in queries.values())


def test_every_query_of_both_engines_is_valid_promql(tmp_path):
    # promtool parses each as a recording rule: the same parser Prometheus runs.
    rules = [{"record": f"trilemma:check_{engine.value}_{name}", "expr": query}
             for engine in Engine
             for name, query in estimator.workload_queries(
                 engine, {"model_name": 'we"ird\\name'}, 900).items()]
    rules.append({"record": "trilemma:check_running", "expr": promql.mean_running(VLLM)})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "trilemma", "rules": rules}]}))
    done = subprocess.run([promtool_binary(), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the names, as the simulated engines expose them -------------------------------------------


def _exposition(engine: Engine) -> str:
    metrics = EngineMetrics(model_name="m", engine=engine, max_model_len=4096)
    metrics.request_finished(prompt_tokens=1200, output_tokens=3, cached_tokens=512,
                             ttft_s=0.2, inter_token_s=[0.02, 0.03], e2e_s=0.25, queue_s=0.01)
    metrics.spec_decode(drafts=2, draft_tokens=6, accepted_tokens=4)
    metrics.set_load(running=3, waiting=1, kv_cache_usage=0.4)
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return body.decode()


def _exposed_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0]
            for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.parametrize("engine", list(Engine))
def test_the_simulated_engine_exposes_every_name_the_queries_read(engine):
    names = promql.METRIC_NAMES[engine]
    exposed = _exposed_names(_exposition(engine))
    wanted = {names.requests, names.prompt_sum, names.prompt_count, names.output_sum,
              names.output_count, names.prefix_hits, names.prefix_queries, names.running,
              names.waiting, names.kv_usage, names.itl[0] + "_bucket",
              f"{names.prompt_histogram}_bucket", f"{names.output_histogram}_bucket",
              f"{names.ttft}_bucket", f"{names.queue_time}_sum", f"{names.queue_time}_count"}
    wanted |= {n for n in (names.spec_accepted, names.spec_drafted, names.spec_accept_rate)
               if n is not None}
    assert wanted <= exposed, wanted - exposed


def test_vllm_series_carry_model_name_and_engine_index():
    text = _exposition(Engine.VLLM)
    assert ('vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0'
            in text)
    # Every reason exists from the start, at 0, as vLLM registers them.
    for reason in vllm_metrics.VLLM_FINISH_REASONS:
        assert f'finished_reason="{reason}"' in text
    assert 'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 512.0' in text
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4' in text


def test_vllm_token_buckets_are_1_2_5_up_to_max_model_len():
    assert vllm_metrics.build_1_2_5_buckets(4096) == (
        1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    assert vllm_metrics.build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    text = _exposition(Engine.VLLM)
    les = re.findall(r'vllm:request_prompt_tokens_bucket\{engine="0",le="([^"]+)"', text)
    assert les == ["1.0", "2.0", "5.0", "10.0", "20.0", "50.0", "100.0", "200.0", "500.0",
                   "1000.0", "2000.0", "+Inf"]


def test_vllm_latency_histograms_use_vllms_buckets():
    text = _exposition(Engine.VLLM)
    ttft = re.findall(r'vllm:time_to_first_token_seconds_bucket\{engine="0",le="([^"]+)"', text)
    assert [float(x) for x in ttft[:-1]] == list(vllm_metrics.VLLM_TTFT_BUCKETS)
    assert len(vllm_metrics.VLLM_TTFT_BUCKETS) == 22
    assert len(vllm_metrics.VLLM_ITL_BUCKETS) == 19
    assert len(vllm_metrics.VLLM_REQUEST_LATENCY_BUCKETS) == 21
    # Each inter-token gap is one observation, in the new and the deprecated family alike.
    for family in ("inter_token_latency_seconds", "time_per_output_token_seconds"):
        assert f'vllm:{family}_count{{engine="0",model_name="m"}} 2.0' in text


def test_vllm_spec_decode_counters_appear_only_once_speculation_runs():
    metrics = EngineMetrics(model_name="m")
    assert "spec_decode" not in metrics.exposition()[0].decode()
    metrics.spec_decode(drafts=1, draft_tokens=3, accepted_tokens=2)
    text = metrics.exposition()[0].decode()
    assert 'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 2.0' in text


def test_sglang_separates_tokenizer_and_scheduler_labels():
    text = _exposition(Engine.SGLANG)
    assert 'sglang:num_requests_total{model_name="m"} 1.0' in text
    assert 'sglang:cached_tokens_total{model_name="m"} 512.0' in text
    assert ('sglang:num_queue_reqs{engine_type="unified",model_name="m",moe_ep_rank="0",'
            'pp_rank="0",tp_rank="0"} 1.0') in text
    # Hits over lookups since the previous scheduler log, as SGLang's scheduler reports it.
    assert re.search(r'sglang:cache_hit_rate\{[^}]*\} 0\.4266', text)
    # (accepted + one bonus per draft) / (drafted + bonus) = (4 + 2) / (6 + 2).
    assert re.search(r'sglang:spec_accept_rate\{[^}]*\} 0\.75$', text, re.MULTILINE)


def test_sglang_counts_an_abort_on_its_own_counter_only():
    metrics = EngineMetrics(model_name="m", engine="sglang")
    metrics.request_finished(prompt_tokens=10, output_tokens=0, cached_tokens=0, ttft_s=0,
                             inter_token_s=[], e2e_s=0.1, queue_s=0, finished_reason="abort")
    text = metrics.exposition()[0].decode()
    assert 'sglang:num_aborted_requests_total{model_name="m"} 1.0' in text
    assert "sglang:num_requests_total{" not in text


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"cached_tokens": 20}, "exceeds prompt_tokens"),
    ({"prompt_tokens": -1}, ">= 0"),
    ({"ttft_s": float("nan")}, "durations"),
    ({"finished_reason": "bored"}, "finished_reason"),
])
def test_rejects_impossible_requests(kwargs, match):
    request = {"prompt_tokens": 10, "output_tokens": 2, "cached_tokens": 0, "ttft_s": 0.1,
               "inter_token_s": [0.01], "e2e_s": 0.2, "queue_s": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        EngineMetrics(model_name="m").request_finished(**request)


def test_rejects_more_accepted_than_drafted_tokens_and_kv_usage_over_one():
    metrics = EngineMetrics(model_name="m")
    with pytest.raises(ValueError, match="exceeds draft_tokens"):
        metrics.spec_decode(drafts=1, draft_tokens=3, accepted_tokens=4)
    with pytest.raises(ValueError, match="share 0-1"):
        metrics.set_load(running=1, waiting=0, kv_cache_usage=1.5)
