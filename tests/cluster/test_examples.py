"""The samples users apply first, on a real control plane: admission by the CRDs' schemas and
CEL rules, a plan deployed onto fake GPU nodes, pods that really schedule (GPU capacity, node
selectors, taints) and become Ready, status and printer columns as kubectl shows them.

What is emulated: the kubelet (kwok marks the scheduled pods Running and Ready without
starting the vLLM container) and the GPUs (a node's `nvidia.com/gpu` capacity).
"""

from __future__ import annotations

import json

from tests.cluster.kube_helpers import (
    deployments,
    items,
    load_examples,
    phase_is,
    status,
    wait_for,
)
from tests.support.cluster import OperatorProcess
from trilemma.simfleet.cluster import LocalCluster


def _storage(namespace: str) -> list[dict]:
    """What the chatbot sample expects to exist: its Hugging Face token and a model-cache claim
    (bound statically to a volume, as there is no provisioner)."""
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token",
                                                              "namespace": namespace},
         "stringData": {"token": "not-a-real-token"}},
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{namespace}-hf"},
         "spec": {"capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteMany"],
                  "storageClassName": "", "nfs": {"server": "127.0.0.1", "path": "/hf"},
                  "claimRef": {"namespace": namespace, "name": "hf-cache"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": "hf-cache", "namespace": namespace},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "",
                  "volumeName": f"{namespace}-hf", "resources": {"requests": {"storage": "1Ti"}}}},
    ]


def test_samples_deploy_onto_fake_gpu_nodes_and_become_ready(cluster: LocalCluster,
                                                             operator: OperatorProcess) -> None:
    for ns in ("llm", "research"):
        cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": ns, "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}])
    cluster.apply(_storage("llm"))
    cluster.apply(load_examples("hardwarepool.yaml", "chatbot-endpoint.yaml",
                                "configmap-model.yaml", "recommend-only.yaml"))
    # The autoscaled sample's endpoint (its ScaledObject needs KEDA, which this cluster lacks).
    cluster.apply([d for d in load_examples("autoscaled-endpoint.yaml")
                   if d["kind"] == "OptimizedEndpoint"])

    st = phase_is(cluster, "llm", "support-chat", "Ready", timeout_s=240)
    active = st["activeConfiguration"]
    deps = deployments(cluster, "llm", "support-chat")
    assert [d["metadata"]["name"] for d in deps] == [f"support-chat-{active['hash']}"]
    dep = deps[0]
    assert dep["status"]["availableReplicas"] == dep["spec"]["replicas"] == active["replicas"]
    # The pods were placed by the real scheduler onto nodes of the planned GPU type, through the
    # pool's node selector and taint tolerations, and kwok made them Ready.
    pods = items(cluster, "pods", "llm", f"trilemma.dev/config-hash={active['hash']}")
    assert len(pods) == active["replicas"]
    gpu_nodes = {"h100_sxm": "h100-", "l40s": "l40s-"}
    for pod in pods:
        assert pod["spec"]["nodeName"].startswith(gpu_nodes[active["gpu"]]), pod["spec"]
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True"
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == active["gpus"] // active["replicas"]
    conditions = {c["type"]: c["status"] for c in st["conditions"]}
    assert conditions["Ready"] == conditions["Deployed"] == "True"
    assert st["predictions"]["ttftP90Ms"] <= 1000 and st["predictions"]["tpotP90Ms"] <= 40
    assert st["allocatedGpus"] == {active["gpu"]: active["gpus"]}

    # The model described by a ConfigMap plans and deploys too; recommend-only creates nothing.
    phase_is(cluster, "llm", "support-ft", "Ready", timeout_s=240)
    research = wait_for(lambda: (s := status(cluster, "research", "research-assistant")).get(
        "activeConfiguration") and s, "the recommend-only plan", timeout_s=240)
    assert research["phase"] == "Pending" and "recommend-only" in research["message"]
    assert deployments(cluster, "research", "research-assistant") == []

    # The externally owned count is deployed as written, and /scale reports it.
    scaled = phase_is(cluster, "llm", "summarizer", "Ready", timeout_s=240)
    assert scaled["replicas"] == 2 and scaled["scaling"]["owner"] == "external"
    assert [d["spec"]["replicas"] for d in deployments(cluster, "llm", "summarizer")] == [2]
    cm = json.loads(cluster.kubectl("get", "configmap", "summarizer-plan", "-n", "llm", "-o",
                                    "json").stdout)
    assert "keda-scaledobject.yaml" in cm["data"]

    # What `kubectl get oe` shows: the printer columns the CRD declares.
    table = cluster.kubectl("get", "oe", "-n", "llm").stdout.splitlines()
    header = table[0].split()
    assert header[:2] == ["NAME", "MODEL"] and "PHASE" in header, table
    row = next(line for line in table if line.startswith("support-chat "))
    assert "Ready" in row and active["gpu"] in row and "TP" in row, table
    wide = json.loads(cluster.kubectl("get", "oe", "-A", "-o", "json").stdout)
    assert {i["metadata"]["name"] for i in wide["items"]} >= {
        "support-chat", "support-ft", "research-assistant"}

    # Nothing refused the operator's ServiceAccount (RBAC) or its request bodies.
    assert operator.problems() == [], operator.problems()

    # Pod Security: the engine pods were admitted under `baseline` (the namespace enforces it);
    # `restricted` refuses them for one thing only, what the vLLM/SGLang images need: root
    # (privilege escalation, capabilities and seccomp are all set; README, "Threat model").
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "restricted-probe",
        "labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}])
    probe = {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "probe", "namespace": "restricted-probe"},
             "spec": dep["spec"]["template"]["spec"]}
    refused = cluster.kubectl("create", "--dry-run=server", "-f", "-", input=json.dumps(probe),
                              check=False)
    assert refused.returncode != 0 and 'violates PodSecurity "restricted' in refused.stderr
    assert "runAsNonRoot" in refused.stderr, refused.stderr
    for met in ("allowPrivilegeEscalation", "capabilities", "seccompProfile"):
        assert met not in refused.stderr, refused.stderr

    # Deleting an endpoint: the finalizer and the real garbage collector remove its children.
    cluster.kubectl("delete", "oe", "support-ft", "-n", "llm", "--wait=true", "--timeout=60s")
    wait_for(lambda: not deployments(cluster, "llm", "support-ft")
             and not items(cluster, "configmaps", "llm", "trilemma.dev/endpoint=support-ft"),
             "support-ft's children removed", timeout_s=60)
    assert status(cluster, "llm", "support-chat")["phase"] == "Ready"
