"""`trilemma demo`: the closed loop on this machine, printed as a timeline.

Everything listens on loopback, in this process except Prometheus:

    a Kubernetes API (a real control plane, or KMock) + the real operator (Kopf, in-process)
      -> a HardwarePool and an OptimizedEndpoint -> the operator's plan
      -> a simulated vLLM fleet serving the plan's configuration (trilemma.simfleet)
      -> a real Prometheus scraping it, with the labels a PodMonitor would add
      -> steady traffic matching the spec, then a shift (prompts x4, or the rate x4)
      -> the operator's re-tune check sees the drift, re-plans and rolls out.

KMock runs no controllers, so there the demo plays the Deployment controller: it marks each
new Deployment available, and says so. The simulated fleet keeps serving the first plan's
configuration: the demo ends once the rollout is through and the shifted traffic has been
observed over a whole window, and compares what the operator estimated from Prometheus with
what the load generator sent.

One concern a module: scenario (the pool, the endpoint, the traffic), timeline, watcher (polls
the endpoint, keeps the story's state), controller (the stand-in Deployment controller),
scoring (the result, estimates against loadgen's truth), api (the API-server calls it makes),
story (the run once the operator is up), emulated / cluster (the two control planes), process
(signals, logging, environment), run (picks the control plane), command (the CLI). This
module re-exports what callers use.
"""

from trilemma.tools.demo.command import SUBCOMMAND, summary_lines
from trilemma.tools.demo.run import run_demo
from trilemma.tools.demo.scenario import (
    MODEL,
    WINDOW_S,
    DemoOptions,
    endpoint_manifest,
    phases,
    pool_manifest,
)
from trilemma.tools.demo.scoring import (
    EXIT_INTERRUPTED,
    EXIT_MISSING_EXTRA,
    EXIT_NO_PROMETHEUS,
    EXIT_NO_ROLLOUT,
    EXIT_ROLLED_OUT,
    DemoResult,
    Estimate,
    errors,
)

__all__ = ["EXIT_INTERRUPTED", "EXIT_MISSING_EXTRA", "EXIT_NO_PROMETHEUS", "EXIT_NO_ROLLOUT",
           "EXIT_ROLLED_OUT", "MODEL", "SUBCOMMAND", "WINDOW_S", "DemoOptions", "DemoResult",
           "Estimate", "endpoint_manifest", "errors", "phases", "pool_manifest", "run_demo",
           "summary_lines"]
