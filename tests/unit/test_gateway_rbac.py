"""The operator may create the endpoint picker's Role only if it holds every right the Role
grants (RBAC's escalation check): the operator's rules must cover the rendered Role."""

from trilemma.operator import rbac
from trilemma.operator.kube import PLURALS
from trilemma.optimizer import render
from trilemma.optimizer.search import ServingConfig, WorkerConfig


def _granted(rules) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_the_operator_holds_every_right_the_pickers_role_grants():
    config = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(gpu="h100_sxm"))
    objects = render.manifests(config, name="chat", engine="vllm", namespace="llm",
                               inference_pool=render.InferencePoolOptions())
    role = next(o for o in objects if o["kind"] == "Role")
    wanted = _granted(role["rules"])
    assert wanted and wanted <= _granted(rbac.NAMESPACED_RULES), wanted - _granted(
        rbac.NAMESPACED_RULES)


def test_the_operator_may_create_update_and_delete_everything_the_gateway_renders():
    config = ServingConfig(model="Qwen/Qwen3-8B", worker=WorkerConfig(gpu="h100_sxm"))
    objects = render.manifests(config, name="chat", engine="vllm", namespace="llm",
                               inference_pool=render.InferencePoolOptions())
    granted = _granted(rbac.NAMESPACED_RULES)
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        plural = PLURALS[obj["kind"]]  # the operator's API paths name it so too
        for verb in ("get", "list", "create", "patch", "delete"):
            assert (group, plural, verb) in granted, (obj["kind"], verb)
