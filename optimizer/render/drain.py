"""Pod termination without dropped requests: the preStop drain, the grace period, the PDB.

Part of rendering, used by workloads.py. What happens when Kubernetes deletes a serving pod
(scale-down, rollout of a new configuration, node drain):

1. The pod is marked terminating. *Concurrently*, the endpoint controller removes it from the
   Service's EndpointSlices (kube-proxy / the gateway then stop routing to it, which takes a
   few seconds to propagate) and the kubelet runs the container's preStop hook. SIGTERM is
   sent only after preStop returns; terminationGracePeriodSeconds covers preStop *and* the
   time after SIGTERM, then the kubelet sends SIGKILL (kubernetes.io/docs/concepts/workloads/
   pods/pod-lifecycle/#pod-termination and .../containers/container-lifecycle-hooks/).
2. What the engines do on SIGTERM:
   - vLLM before v0.18 terminates at once and aborts the requests in flight
     (vllm-project/vllm#34730: "Previously, SIGTERM to the API server ... would cause
     immediate process termination without coordinating request handling"). v0.18 added
     `--shutdown-timeout SECONDS` (#34730, re-landed as #36666): reject new requests with
     503 (every path but /live and /metrics, ServiceUnavailableMiddleware) and wait up to
     SECONDS for the ones in flight; its default 0 keeps the immediate abort. KServe
     (kserve/kserve#5496) and the vLLM Kubernetes guide (vllm-project/vllm#43208) pair it
     with a 15 s preStop sleep and terminationGracePeriodSeconds >= sleep + shutdown timeout.
   - SGLang's TokenizerManager handles SIGTERM itself (sglang/srt/managers/
     tokenizer_manager.py, sigterm_watchdog): every 5 s it checks whether a request is left
     (rid_to_state), and kills the process tree once none is; unbounded on its own.

The default image is a later vLLM (the calibrated release, perf/releases.py), so the renderer
also passes --shutdown-timeout (vllm_flags.shutdown_arg), but SIGTERM alone is not enough: an
image pinned by the user may be older, and SGLang's wait is unbounded. The preStop hook
therefore drains explicitly and engine-neutrally, before SIGTERM ever comes: it sleeps
PRESTOP_SLEEP_S (the same 15 s as KServe's, for the endpoint removal to reach every proxy, so
no new request arrives), then polls the engine's own /metrics on localhost until no request
is running or waiting (vLLM's vllm:num_requests_running/_waiting, SGLang's
sglang:num_running_reqs/num_queue_reqs; SGLang serves them because sglang_flags renders
--enable-metrics) on two readings in a row, or until the drain budget is spent. The script
uses only python3's standard library: both engine images are Python images. An engine whose
/metrics does not answer (already gone) ends the wait at once. The router of a disaggregated
plan counts no requests on a metric this script could read, so it sleeps the sleep plus the
whole drain budget (`sleep`, as the renderer's earlier fixed preStop did). Followers of a
multi-node replica serve nothing but must outlive their leader's drain (a lost rank breaks its
collectives), so they poll the leader's /metrics at $LWS_LEADER_ADDRESS.

Grace period: PRESTOP_SLEEP_S + DRAIN_MARGIN x the plan's predicted p99 end-to-end latency +
EXIT_RESERVE_S, rounded up and clamped to [MIN_GRACE_S, MAX_GRACE_S]. A request admitted just
before the endpoint removal needs up to its whole latency; the margin covers the prediction's
error and the tail past p99. Unknown prediction: DEFAULT_E2E_P99_MS.

PodDisruptionBudget: one per workload, maxUnavailable 1, so voluntary evictions (node drains,
autoscaler scale-down) take one serving pod at a time, each draining as above. Not
maxUnavailable 0 (nor minAvailable = replicas): with one replica that blocks every node drain
forever (kubectl drain retries the eviction indefinitely); one replica gets a short gap in
service during an eviction instead, never a dropped in-flight request. PDBs do not govern
Deployment rollouts (those follow the Deployment strategy and the operator's traffic switch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PRESTOP_SLEEP_S = 15       # endpoint removal reaching every proxy (KServe's and vLLM's guide)
# After SIGTERM: vLLM waits up to 5 s for its engine core to stop (vllm-project/vllm#31252),
# SGLang's watchdog looks every 5 s. preStop's wait ends this long before the deadline.
EXIT_RESERVE_S = 10
DRAIN_MARGIN = 2.0         # x the predicted p99 e2e latency: prediction error and the tail
DEFAULT_E2E_P99_MS = 60_000.0  # no prediction: a minute-long generation
MIN_GRACE_S = 30           # Kubernetes' own default: never shorter than an unconfigured pod
# A rollout or node drain waits up to this long per pod; beyond it, a stuck request should not
# hold a node (PDB maxUnavailable 1 serializes the evictions, so N pods can take N x this).
MAX_GRACE_S = 600

# The preStop script. argv: sleep seconds, host (or $VAR naming one), port, budget seconds.
# Polls once a second: a reading costs the engine one /metrics render.
# Exits 0 always: a failed hook only delays SIGTERM, and the wait is the point.
DRAIN_SCRIPT = """\
import os, sys, time, urllib.request
sleep_s, host, port, budget_s = float(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
if host.startswith("$"):
    host = os.environ.get(host[1:], "127.0.0.1")
time.sleep(sleep_s)
names = (b"vllm:num_requests_running", b"vllm:num_requests_waiting",
         b"sglang:num_running_reqs", b"sglang:num_queue_reqs")
deadline, idle = time.monotonic() + budget_s, 0
while time.monotonic() < deadline and idle < 2:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as r:
            body = r.read()
    except Exception:
        break
    busy = sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(names))
    idle = idle + 1 if busy == 0 else 0
    if idle < 2:
        time.sleep(1)
"""


@dataclass(frozen=True, kw_only=True)
class Drain:
    """How a serving pod of one plan terminates: seconds for each phase."""

    grace_s: int               # terminationGracePeriodSeconds
    sleep_s: int = PRESTOP_SLEEP_S

    @property
    def budget_s(self) -> int:
        """How long preStop waits for in-flight requests after its sleep."""
        return max(self.grace_s - self.sleep_s - EXIT_RESERVE_S, 0)

    def pre_stop(self, port: int, *, host: str = "127.0.0.1") -> list[str]:
        """The preStop exec command draining the engine at host:port."""
        return ["python3", "-c", DRAIN_SCRIPT, str(self.sleep_s), host, str(port),
                str(self.budget_s)]

    def router_pre_stop(self) -> list[str]:
        """A router exposes no count of the requests it proxies: it waits out the whole
        budget, which bounds every request admitted before its endpoint removal."""
        return ["sleep", str(self.sleep_s + self.budget_s)]


def plan_drain(e2e_p99_ms: float | None) -> Drain:
    """The Drain for a plan whose predicted p99 end-to-end latency is `e2e_p99_ms`."""
    p99_ms = DEFAULT_E2E_P99_MS if e2e_p99_ms is None or not e2e_p99_ms > 0 else e2e_p99_ms
    wanted = PRESTOP_SLEEP_S + DRAIN_MARGIN * p99_ms / 1000 + EXIT_RESERVE_S
    # Clamp before rounding: an infinite prediction (a plan past saturation) gets the maximum.
    return Drain(grace_s=max(math.ceil(min(wanted, MAX_GRACE_S)), MIN_GRACE_S))
