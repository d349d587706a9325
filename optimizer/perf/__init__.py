"""Performance model: kernel costs -> step times -> memory fit -> closed-loop TTFT/TPOT.

Where things are computed: kernel times in `kernels` (fitted forms in `kernel_forms`, the fit
in `fitting`), one engine step in `steps`, memory and KV capacity in `memory`, TTFT/TPOT and
throughput of a closed-loop benchmark in `latency`, engine constants in `engine`, and the
user-facing facade in `estimate`. The names below are the supported API; tests pin the list.
"""

from trilemma.optimizer.perf.engine import EngineFacts, engine_facts
from trilemma.optimizer.perf.estimate import Config, Estimate, resolve
from trilemma.optimizer.perf.latency import ClosedLoopResult, closed_loop
from trilemma.optimizer.perf.memory import MemoryBreakdown
from trilemma.optimizer.perf.parallelism import Parallelism
from trilemma.optimizer.perf.steps import StepModel, StepTime

__all__ = [
    "ClosedLoopResult",
    "Config",
    "EngineFacts",
    "Estimate",
    "MemoryBreakdown",
    "Parallelism",
    "StepModel",
    "StepTime",
    "closed_loop",
    "engine_facts",
    "resolve",
]
