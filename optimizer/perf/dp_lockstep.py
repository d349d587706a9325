"""Attention data parallelism under vLLM: ranks schedule alone, MoE layers keep them in step.

With `--data-parallel-size` and expert parallelism every DP rank runs its own scheduler over
its own requests, but each MoE layer gathers all ranks' tokens (and a rank with nothing to do
runs a dummy batch so the collectives still meet: vllm/v1/engine/core.py DPEngineCoreProc).
Two consequences for a closed loop:

- A prefill chunk belongs to one rank: the other ranks bring their decode tokens to that
  step's MoE, not a chunk of their own. Pricing a mixed step as if every rank prefilled
  (`tokens x dp`) charges the MoE dp times the prefill it runs. Only the benchmark's first
  wave, when every rank receives its requests at once, prefills on all ranks together.
- The ranks move in lockstep, so a rank's decode step lasts as long as the slowest rank's
  step: it is stretched to a mixed step whenever ANY rank runs one, 1 - (1 - share)^dp of
  the steps when each rank runs one in `share` of its own.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.perf.arrays import FloatArray


def moe_tokens(tokens: np.ndarray, dec_tokens: np.ndarray, pf_tokens: np.ndarray,
               dp: np.ndarray, pf_ranks: npt.ArrayLike | None) -> FloatArray:
    """Tokens entering a MoE layer from all DP ranks: every rank's decode tokens, plus the
    prefill chunk of each of the `pf_ranks` ranks that carry one (None: every rank, i.e. the
    rank's whole batch times dp)."""
    if pf_ranks is None:
        out: FloatArray = tokens * dp
        return out
    ranks = np.minimum(np.asarray(pf_ranks, dtype=np.float64), dp)
    gathered: FloatArray = np.maximum(dec_tokens * dp + pf_tokens * ranks, 1.0)
    return gathered


def stretched_share(share: np.ndarray, dp: np.ndarray, lockstep: bool) -> FloatArray:
    """Share of a rank's steps that last a mixed step: its own `share`, or under lockstep
    (MoE layers across DP ranks) the steps where any of the dp ranks runs one."""
    if not lockstep:
        return share
    out: FloatArray = np.where(dp > 1, 1.0 - (1.0 - share) ** dp, share)
    return out
