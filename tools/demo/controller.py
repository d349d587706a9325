"""The endpoint's Deployments as the demo reports them, and, on KMock, the Deployment controller
the demo stands in for.

KMock runs no controllers and no pods, so nothing would ever mark a Deployment available: the
demo patches its status as the Deployment controller and the kubelet would. On a real control
plane those controllers (and kwok) do it; the demo only reports it.
"""

from __future__ import annotations

from trilemma.tools.demo.api import DemoApi
from trilemma.tools.demo.scenario import NAMESPACE
from trilemma.tools.demo.timeline import Timeline


class Deployments:
    """What the demo has seen of the endpoint's Deployments; `step` reports (and, without
    controllers, brings up) what changed since the last one."""

    def __init__(self, api: DemoApi, timeline: Timeline, *, controllers: bool) -> None:
        self.api = api
        self.timeline = timeline
        # True on a real control plane: its Deployment controller and kwok bring Deployments
        # up; the demo only reports it. False on KMock, where the demo plays that part.
        self.controllers = controllers
        self.names: set[str] = set()  # the Deployments that exist
        self.available: set[str] = set()  # reported available (real control plane)
        self.explained_standing_in = False  # said once why the demo marks them available

    async def step(self) -> None:
        live = {d["metadata"]["name"]: d
                for d in self.api.list("apps/v1", "Deployment", NAMESPACE)}
        for name in sorted(set(live) - self.names):
            self.names.add(name)
            replicas = live[name]["spec"].get("replicas", 1)
            self.timeline.add("deploy", f"Deployment {name} created ({replicas} replica(s))")
        for name in sorted(self.names - set(live)):
            self.names.discard(name)
            self.timeline.add("removed", f"Deployment {name} deleted by the operator")
        for name, dep in sorted(live.items()):
            replicas = dep["spec"].get("replicas", 1)
            have = (dep.get("status") or {}).get("availableReplicas")
            if self.controllers:
                self._report_available(name, replicas, have)
            elif have != replicas:
                await self._stand_in(name, replicas, have)

    async def _stand_in(self, name: str, replicas: int, have: int | None) -> None:
        """New, or scaled in place: either way no controller will bring it up on KMock."""
        scaled = f" at {replicas} replica(s)" if have else ""
        await self.api.patch("apps/v1", "Deployment", NAMESPACE, name, {"status": {
            "replicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas}})
        why = ("" if self.explained_standing_in else
               " (KMock runs no controllers and no pods: the demo stands in for the "
               "Deployment controller and the kubelet)")
        self.explained_standing_in = True
        self.timeline.add("kubelet", f"Deployment {name} marked available{scaled}{why}")

    def _report_available(self, name: str, replicas: int, have: int | None) -> None:
        if have != replicas:
            self.available.discard(name)
            return
        if name in self.available:
            return
        self.available.add(name)
        pods = self.api.list("v1", "Pod", NAMESPACE)
        nodes = sorted({p["spec"].get("nodeName") or "?" for p in pods
                        if p["metadata"]["name"].startswith(f"{name}-")})
        self.timeline.add("kubelet", f"Deployment {name} available ({replicas} replica(s)): "
                                     f"kube-scheduler placed its pods on {', '.join(nodes)}, "
                                     f"kwok marked them Ready, the Deployment controller "
                                     f"counted them")
