"""What a hostile OptimizedEndpoint spec cannot make the operator do (README, "Threat model"):
the rules decided without an API server. The scenarios on KMock and on the real control plane
are tests/operator/test_tenants.py and tests/cluster/test_tenants.py."""

from __future__ import annotations

import base64
import builtins
import copy
import io
import os
from typing import Any

import pydantic
import pytest

from trilemma.operator import closed_loop
from trilemma.operator.endpoint import Endpoint, OperatorConfig, Outcome, Runtime
from trilemma.operator.metrics import OperatorMetrics
from trilemma.operator.optimize import MAX_CONFIG_JSON_BYTES, model_choice
from trilemma.operator.plans import check_host_path
from trilemma.operator.prometheus import ErrorKind, _decode
from trilemma.operator.resources import HardwarePoolSpec, ModelRef, OptimizedEndpointSpec
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec import HardwarePool, PlanRequest

SPEC: dict[str, Any] = {
    "model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
    "workload": {"promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 2000},
                 "outputTokens": {"kind": "lognormal", "mean": 200, "p90": 400},
                 "arrivals": {"kind": "poisson", "requestsPerSecond": 5}},
    "hardwarePoolRef": {"name": "gpus"},
}
BODY = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "u1"}, "spec": SPEC}


def spec(**changes: Any) -> OptimizedEndpointSpec:
    raw = copy.deepcopy(SPEC)
    raw.update(changes)
    return OptimizedEndpointSpec.model_validate(raw)


def errors(model: type[pydantic.BaseModel], raw: dict[str, Any]) -> str:
    with pytest.raises(pydantic.ValidationError) as caught:
        model.model_validate(raw)
    return str(caught.value)


# ---- 1. the node's filesystem --------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/var/lib/../../etc", "/a/./b", "/a//b", "/models/",
                                  "relative/dir", "/a/b\n"])
def test_a_host_path_that_is_not_a_normalised_directory_is_refused_by_the_schema(path):
    assert "hostPath" in errors(OptimizedEndpointSpec, {
        **SPEC, "serving": {"modelCache": {"hostPath": path}}})


def _pool(*prefixes: str) -> HardwarePoolSpec:
    return HardwarePoolSpec.model_validate({"gpus": [{"gpu": "h100_sxm", "count": 8}],
                                            "modelCacheHostPaths": list(prefixes)})


@pytest.mark.parametrize(("path", "prefixes", "allowed"), [
    ("/var/lib/models", (), False),  # no allow-list: no hostPath at all
    ("/var/lib/models", ("/var/lib/models",), True),
    ("/var/lib/models/llama", ("/var/lib/models",), True),
    ("/var/lib/models-evil", ("/var/lib/models",), False),  # a prefix of the name only
    ("/var/lib", ("/var/lib/models",), False),
    ("/etc", ("/mnt/cache", "/var/lib/models"), False),
])
def test_a_host_path_cache_must_lie_under_a_directory_the_pool_allows(path, prefixes, allowed):
    endpoint = spec(serving={"modelCache": {"hostPath": path}})
    if allowed:
        check_host_path(endpoint, _pool(*prefixes))
        return
    with pytest.raises(Outcome) as caught:
        check_host_path(endpoint, _pool(*prefixes))
    assert caught.value.reason == "HostPathNotAllowed"
    assert f"serving.modelCache.hostPath={path!r}" in caught.value.message
    check_host_path(spec(serving={"modelCache": {"claimName": "weights"}}), _pool(*prefixes))


def test_the_pool_allow_list_is_itself_normalised_and_not_given_to_the_search():
    assert "modelCacheHostPaths" in errors(HardwarePoolSpec, {
        "gpus": [{"gpu": "h100_sxm", "count": 8}], "modelCacheHostPaths": ["/"]})
    pool = _pool("/var/lib/models")
    assert pool.search_pool() == HardwarePool(gpus=pool.gpus)


# ---- 3 and 4. the operator's memory and filesystem -----------------------------------------


@pytest.mark.parametrize("raw", [{"gpus": [{"gpu": "h100_sxm", "count": 10**7}]},
                                 {"gpus": [{"gpu": "h100_sxm", "count": 10**12}]}])
def test_pool_sizes_beyond_the_bound_are_refused(raw):
    message = errors(HardwarePoolSpec, raw)
    assert "gpus.0.count" in message and "less than or equal to 100000" in message


@pytest.mark.parametrize(("path", "value"), [
    (("workload", "arrivals", "requestsPerSecond"), 1e9),
    (("workload", "promptTokens"), {"kind": "fixed", "value": 10**9}),
    (("workload", "promptTokens"), {"kind": "histogram", "values": list(range(1, 5000)),
                                    "weights": [1.0] * 4999}),
    (("slo",), {"ttftMs": {"p90": 1e12}}),
])
def test_every_number_and_list_that_sizes_a_search_is_bounded(path, value):
    raw = copy.deepcopy(SPEC)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(pydantic.ValidationError):
        OptimizedEndpointSpec.model_validate(raw)
    request = {k: v for k, v in raw.items() if k != "hardwarePoolRef"}
    request["hardware"] = {"gpus": [{"gpu": "h100_sxm", "count": 8}]}
    with pytest.raises(pydantic.ValidationError):
        PlanRequest.model_validate(request)


@pytest.fixture
def no_file_opened(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> list[str]:
    """Fails the test if anything opens a file while the spec's id is resolved (after
    tmp_path, which pytest creates by opening a lock file)."""
    opened: list[str] = []

    def refuse(name: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(name))
        raise AssertionError(f"opened {name}")

    monkeypatch.setattr(builtins, "open", refuse)
    monkeypatch.setattr(io, "open", refuse)
    monkeypatch.setattr(os, "open", refuse)
    return opened


@pytest.mark.parametrize("model_id", ["/dev/zero", "/proc/self/environ", "../../etc/passwd",
                                      "/nonexistent/weights", "~/.kube/config"])
def test_a_model_id_is_never_opened_and_its_error_does_not_say_what_the_path_holds(
        model_id, no_file_opened, tmp_path):
    ref = ModelRef.model_validate({"id": model_id})
    with pytest.raises(InputError) as caught:
        model_choice(ref, None, None, tmp_path)
    assert no_file_opened == []
    assert caught.value.field == "model.id"
    assert caught.value.value == model_id
    # Identical whatever the path is (exists, a device, unreadable): no oracle.
    other = ModelRef.model_validate({"id": "/no/such/file"})
    with pytest.raises(InputError) as same:
        model_choice(other, None, None, tmp_path)
    assert caught.value.why == same.value.why
    assert "not a bundled model id" in caught.value.why


def test_a_bundled_id_in_any_spelling_still_resolves(tmp_path):
    choice, served = model_choice(ModelRef.model_validate(
        {"id": "META-LLAMA/Llama-3.1-8B-Instruct"}), None, None, tmp_path)
    assert choice.arch.id == "meta-llama/Llama-3.1-8B"
    assert served == "META-LLAMA/Llama-3.1-8B-Instruct"


def test_a_config_map_config_over_the_size_cap_is_refused_before_parsing(tmp_path):
    ref = ModelRef.model_validate({"configMap": {"name": "cfg"}, "servedModel": "x/y"})
    with pytest.raises(InputError) as caught:
        model_choice(ref, 0, " " * (MAX_CONFIG_JSON_BYTES + 1), tmp_path)
    assert caught.value.field == "models.0.configMap"
    assert not (tmp_path / "models").exists()


# ---- 2 and 6. Prometheus: credentials and other tenants' series ----------------------------


class FakeKube:
    """The reads _token makes, counted."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.gets: list[str] = []

    async def get(self, ref: Any) -> Any:
        self.gets.append(str(ref))
        return self.objects.get(str(ref))


def runtime(kube: FakeKube, **config: Any) -> Runtime:
    return Runtime(kube=kube, optimizer=None, config=OperatorConfig(**config),  # type: ignore[arg-type]
                   metrics=OperatorMetrics(), events=lambda *_: None)


def secret(value: bytes) -> dict[str, Any]:
    return {"Secret team-a/prom": {"data": {"token": base64.b64encode(value).decode()}}}


@pytest.mark.parametrize("url", ["http://evil.example:9090", "http://prom:9090@evil",
                                 "http://prom:9090.evil", "https://prom:9090"])
async def test_a_spec_cannot_send_the_operator_to_its_own_url(url):
    rt = runtime(FakeKube(secret(b"t0ken")), prometheus_url="http://prom:9090",
                 prometheus_secret_names=("prom",))
    ep = Endpoint.of(BODY)
    endpoint = spec(prometheus={"url": url, "authSecret": {"name": "prom"}})
    assert await closed_loop.observe(rt, ep, endpoint, "vllm") is None
    condition = ep.status["conditions"][0]
    assert condition["status"] == "False"
    assert "prometheus.url" in condition["message"] and "allowedUrls" in condition["message"]
    assert rt.kube.gets == []  # the Secret was not even read


def test_allowed_urls_match_exactly():
    config = OperatorConfig(prometheus_url="http://prom:9090",
                            prometheus_urls=("http://team-prom.monitoring:9090/",))
    assert config.allows_prometheus_url("http://prom:9090/")
    assert config.allows_prometheus_url("http://team-prom.monitoring:9090")
    assert not config.allows_prometheus_url("http://team-prom.monitoring:9090/../evil")
    assert not OperatorConfig().allows_prometheus_url("http://prom:9090")


async def test_only_allow_listed_secret_names_are_read():
    kube = FakeKube(secret(b"t0ken"))
    ep = Endpoint.of(BODY)
    endpoint = spec(prometheus={"authSecret": {"name": "prom"}})
    with pytest.raises(InputError) as caught:
        await closed_loop._token(runtime(kube, prometheus_url="http://p"), ep, endpoint)
    assert caught.value.field == "prometheus.authSecret.name"
    assert kube.gets == []
    assert await closed_loop._token(runtime(kube, prometheus_secret_names=("prom",)), ep,
                                    endpoint) == "t0ken"
    assert kube.gets == ["Secret team-a/prom"]  # in the endpoint's own namespace


@pytest.mark.parametrize("value", [b"\xff\xfe not utf-8", b"tok\r\nX-Injected: 1", b"a b",
                                   b"", b"x" * 9000])
async def test_a_secret_that_is_no_bearer_token_is_reported_without_its_value(value):
    rt = runtime(FakeKube(secret(value)), prometheus_secret_names=("prom",))
    with pytest.raises(InputError) as caught:
        await closed_loop._token(rt, Endpoint.of(BODY),
                                 spec(prometheus={"authSecret": {"name": "prom"}}))
    assert "not a bearer token" in caught.value.why
    assert "Injected" not in str(caught.value) and "utf" not in str(caught.value)


def test_a_response_body_is_never_copied_into_the_error():
    leak = "<html>SECRET-CONTENT of whatever answered</html>"
    with pytest.raises(Exception) as caught:
        _decode(leak, 403, "http://prom:9090/api/v1/query", "up")
    assert caught.value.kind is ErrorKind.BAD_QUERY  # type: ignore[attr-defined]
    assert "SECRET" not in str(caught.value)
    api = '{"status": "error", "errorType": "bad_data", "error": "parse error at char 3"}'
    with pytest.raises(Exception) as caught:
        _decode(api, 400, "http://prom:9090/api/v1/query", "up(")
    assert "parse error at char 3" in str(caught.value)  # the API's own error stays


@pytest.mark.parametrize(("selector", "words"), [
    ({"namespace": "other-team"}, ["namespace", "may only narrow"]),
    ({"trilemma_dev_endpoint": "their-chat"}, ["trilemma_dev_endpoint"]),
    ({"bad-key": "x"}, ["bad-key", "Prometheus label name"]),
    ({"0x": "x"}, ["0x"]),
])
def test_a_label_selector_cannot_replace_the_operators_matchers(selector, words):
    message = errors(OptimizedEndpointSpec, {**SPEC, "prometheus": {"labelSelector": selector}})
    for word in words:
        assert word in message


def test_the_spec_selector_narrows_the_operators_matchers():
    ep = Endpoint.of(BODY)
    assert closed_loop.selector(ep, spec(prometheus={"labelSelector": {"cluster": "prod"}})) == {
        "cluster": "prod", "namespace": "team-a", "trilemma_dev_endpoint": "chat"}


# ---- 11. engine pods -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned() -> tuple[Any, Any]:
    from trilemma.optimizer.search import SearchSettings, ServingConfig, plan

    request = PlanRequest.model_validate({
        **{k: v for k, v in SPEC.items() if k != "hardwarePoolRef"},
        "hardware": {"gpus": [{"gpu": "h100_sxm", "count": 8}]},
        "bounds": {"allowDisaggregation": False}})
    config = ServingConfig.from_dict(
        plan(request, settings=SearchSettings(workers=1)).to_dict()["recommended"]["config"])
    return config, request.hardware.gpus[0]


def test_an_allowed_host_path_cache_is_mounted_where_the_engine_caches(planned):
    from trilemma.operator import children
    from trilemma.optimizer.render.workloads import CACHE_MOUNT

    config, group = planned
    kids = children.build(config, spec(serving={"modelCache": {"hostPath": "/var/lib/models"}}),
                          children.Owner("chat", "team-a", "u1"), group)
    pod = kids.workloads[0]["spec"]["template"]["spec"]
    assert {"name": "model-cache", "hostPath": {"path": "/var/lib/models",
                                                "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert {"name": "model-cache", "mountPath": CACHE_MOUNT} in pod["containers"][0][
        "volumeMounts"]


def test_every_rendered_engine_pod_is_hardened(planned):
    from trilemma.operator import children

    config, group = planned
    kids = children.build(config, spec(), children.Owner("chat", "team-a", "u1"), group)
    for workload in kids.workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
        assert "hostPath" not in str(pod["volumes"])
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


