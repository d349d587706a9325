"""`trilemma demo` on a real control plane (trilemma.simfleet.cluster) instead of KMock.

The same story (trilemma.tools.demo.story), with the cluster doing its own part:
kube-apiserver stores and validates the objects, the Deployment controller and kube-scheduler
place the engine pods on a fake 8-GPU H100 node, kwok marks them Ready. The operator runs in
this process with the admin credentials (the cluster tests run it as the chart's
ServiceAccount); the simulated vLLM fleet in this process stands in for the engine
containers, which kwok does not run. Needs no KMock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from trilemma.simfleet.cluster import GPU_TAINT, ClusterApi, LocalCluster, NodeGroup
from trilemma.simfleet.prometheus_server import free_port
from trilemma.tools.demo.process import environment, interruptible
from trilemma.tools.demo.scenario import NAMESPACE, RESYNC_S, DemoOptions, operator_config
from trilemma.tools.demo.scoring import DemoResult
from trilemma.tools.demo.story import tell
from trilemma.tools.demo.timeline import Timeline
from trilemma.tools.demo.watcher import Watcher
from trilemma.tools.devcluster import install_crds

# The nodes of the pool the demo declares (2 x 8 h100_sxm), labelled and tainted as NVIDIA's GPU
# operator does. Two: a rollout runs the new configuration beside the old one, and the re-plan
# after the prompt shift may take a whole node while the old one still holds a GPU.
NODES = (NodeGroup("h100", 2, 8, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                   (GPU_TAINT,)),)


async def run_on_cluster(options: DemoOptions, timeline: Timeline,
                         binary: str | None, tmp: Path, bin_dir: Path) -> DemoResult:
    # Imported here: `trilemma --help` imports every command's module, and this pulls in
    # Kopf and the operator's handlers.
    from trilemma.tools.inprocess import Operator

    timeline.say("trilemma demo: the closed loop on this machine - a real Kubernetes control "
                 "plane (kube-apiserver, etcd, controllers, scheduler) with a kwok GPU node, "
                 "the operator in-process, a simulated vLLM fleet and a real Prometheus, all "
                 "on loopback")
    cluster = LocalCluster(bin_dir, tmp / "cluster", NODES)
    await asyncio.to_thread(cluster.start)
    try:
        await asyncio.to_thread(install_crds, cluster)
        cluster.apply([{"apiVersion": "v1", "kind": "Namespace",
                        "metadata": {"name": NAMESPACE}}])
        env = {"KUBECONFIG": str(cluster.admin_kubeconfig), "KUBERNETES_SERVICE_HOST": None,
               "TRILEMMA_RESYNC_SECONDS": f"{RESYNC_S:g}"}
        prometheus_port = free_port()
        operator = Operator(config=operator_config(prometheus_port))
        with environment(env):
            await operator.start(timeout_s=30)
            try:
                with interruptible():
                    timeline.add("start", f"kube-apiserver {bin_dir.parent.name} at "
                                          f"{cluster.server}; the operator runs in-process "
                                          f"(resync every {RESYNC_S:g} s)")
                    watcher = Watcher(options, timeline, ClusterApi(cluster),
                                      controllers=True)
                    return await tell(watcher, binary, tmp, prometheus_port, operator.metrics)
            finally:
                await operator.stop()
    finally:
        await asyncio.to_thread(cluster.stop)
