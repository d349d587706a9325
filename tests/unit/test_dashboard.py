"""The chart's Grafana dashboard: it loads (schema version, ids, layout, data sources), each
query is valid PromQL naming only metrics that something exports (the operator, or vLLM and
SGLang as trilemma.simfleet reproduces them), and the chart ships it as a sidecar ConfigMap."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import tools
from tests.support.prometheus import promtool_binary
from trilemma.operator.metrics import OperatorMetrics
from trilemma.simfleet.vllm_metrics import EngineMetrics
from trilemma.tools.dashboard_queries import (
    DASHBOARD,
    DATASOURCE_VARIABLE,
    Dashboard,
    expand,
    metric_names,
)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "trilemma"
# Grafana 11.0 writes schemaVersion 39; an older one would migrate the JSON on load.
MIN_SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${" + DATASOURCE_VARIABLE + "}"}
# SGLang histograms the simulation does not reproduce. time_per_output_token_seconds: SGLang's
# per-request TPOT (python/sglang/srt/metrics/collector.py, TokenizerMetricsCollector), the
# fallback operator/promql.py names after inter_token_latency_seconds.
SGLANG_ONLY = {"sglang:time_per_output_token_seconds"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",), "info": ("_info",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "stateset": ("",), "enum": ("",)}
# Values for Grafana's variables when a query is checked or run outside Grafana.
VARIABLES = {"namespace": "demo", "endpoint": "chat", "__rate_interval": "1m",
             "__interval": "30s", DATASOURCE_VARIABLE: "prometheus"}


def exposed(registry_families: list[tuple[str, str]]) -> set[str]:
    """Every series name the families expose, suffixes included (for labelled metrics with no
    child yet too, which collect() lists without samples)."""
    return {name + suffix for name, kind in registry_families for suffix in SUFFIXES[kind]}


def exported_metric_names() -> set[str]:
    registries = [OperatorMetrics().registry] + [
        EngineMetrics(model_name="m", engine=engine).registry for engine in ("vllm", "sglang")]
    families = [(f.name, f.type) for r in registries for f in r.collect()]
    return exposed(families) | exposed([(name, "histogram") for name in SGLANG_ONLY])


@pytest.fixture(scope="module")
def dashboard() -> Dashboard:
    return Dashboard.load()


def test_the_dashboard_is_current_grafana_json(dashboard):
    doc = json.loads(DASHBOARD.read_text())
    assert dashboard.schema_version >= MIN_SCHEMA_VERSION
    assert doc["uid"] and len(doc["uid"]) <= 40
    ids = [p.id for p in dashboard.panels]
    assert len(ids) == len(set(ids)), ids
    variables = [v["name"] for v in doc["templating"]["list"]]
    assert variables == [DATASOURCE_VARIABLE, "namespace", "endpoint"]


def test_panels_sit_on_the_grid_without_overlapping(dashboard):
    panels = dashboard.panels
    for p in panels:
        assert p.grid.x >= 0 and p.grid.y >= 0 and p.grid.w > 0 and p.grid.h > 0, p.title
        assert p.grid.x + p.grid.w <= 24, p.title
    for i, a in enumerate(panels):
        for b in panels[i + 1:]:
            assert not a.grid.overlaps(b.grid), (a.title, b.title)


def test_every_data_source_is_the_template_variable(dashboard):
    assert dashboard.datasources
    for where, source in dashboard.datasources:
        assert source == DATASOURCE, where


def test_every_panel_queries_something_and_shows_it_in_a_unit(dashboard):
    for p in dashboard.panels:
        if p.type == "row":
            continue
        assert p.targets and p.unit, p.title
        refs = [t.ref for t in p.targets]
        assert len(refs) == len(set(refs)), p.title
        assert p.dashed <= {t.legend for t in p.targets}, p.title


def test_every_metric_a_query_names_is_exported(dashboard):
    known = exported_metric_names()
    for where, expr in dashboard.expressions():
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr}"
        assert names <= known, f"{where}: {sorted(names - known)} is exported by nothing"


def test_a_misspelt_metric_is_caught():
    known = exported_metric_names()
    good = 'sum(rate(vllm:request_success_total{namespace="$namespace"}[$__rate_interval]))'
    assert metric_names(good) == {"vllm:request_success_total"} <= known
    bad = good.replace("request_success_total", "request_sucess_total")
    assert metric_names(bad) - known == {"vllm:request_sucess_total"}


def test_the_tokenizer_skips_functions_keywords_labels_and_durations():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{le="1", x=~"b|c"}[5m]))) '
            'or on (x) group_left (y) b offset 1m unless c{z!="d{e}"} > bool 2 * inf')
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    assert metric_names("sum without (pod) (up)") == {"up"}


def test_exported_names_come_from_the_registries():
    known = exported_metric_names()
    for name in ("trilemma_reconciles_total", "trilemma_optimization_duration_seconds_bucket",
                 "trilemma_endpoint_predicted_ttft_p90_seconds", "trilemma_endpoint_replicas",
                 "vllm:time_to_first_token_seconds_bucket", "sglang:num_running_reqs"):
        assert name in known
    assert "trilemma_reconciles" not in known  # a counter is exposed with _total only


def test_every_query_is_valid_promql(dashboard, tmp_path):
    # promtool parses each as a recording rule: the same parser Prometheus runs.
    rules = [{"record": f"trilemma:dashboard_{i}", "expr": expand(expr, VARIABLES)}
             for i, (_, expr) in enumerate(dashboard.expressions())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool_binary(), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_engine_queries_select_the_endpoint_as_the_operator_does(dashboard):
    # operator/closed_loop.selector: the PodMonitor's trilemma_dev_endpoint and the namespace.
    engine = 'namespace="$namespace", trilemma_dev_endpoint="$endpoint"'
    operator = 'namespace="$namespace", name="$endpoint"'
    for where, expr in dashboard.expressions():
        for name in metric_names(expr):
            if name.startswith(("vllm:", "sglang:")):
                assert f"{name}{{{engine}}}" in expr, where
            elif name.startswith("trilemma_endpoint_"):
                assert f"{name}{{{operator}}}" in expr or where.startswith("variable"), where


# --- the chart ships it -----------------------------------------------------------------------


def _template(*args: str) -> list[dict[str, object]]:
    done = subprocess.run([tools.require_tool("helm"), "template", "t", str(CHART),
                           "--namespace", "ops", *args],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_the_chart_renders_the_dashboard_configmap_for_grafanas_sidecar():
    docs = _template("--set", "dashboards.enabled=true",
                     "--set-json", 'dashboards.annotations={"grafana_folder":"LLM"}')
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    assert cm["metadata"]["namespace"] == "ops"
    assert json.loads(cm["data"]["trilemma-endpoint.json"]) == json.loads(DASHBOARD.read_text())


def test_the_sidecar_label_and_namespace_are_configurable_and_off_by_default():
    docs = _template("--set", "dashboards.enabled=true", "--set", "dashboards.label=dash",
                     "--set", "dashboards.labelValue=yes", "--set", "dashboards.namespace=mon")
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["dash"] == "yes"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "mon"
    assert not [d for d in _template() if d["kind"] == "ConfigMap"]
