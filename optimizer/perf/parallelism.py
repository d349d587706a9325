"""How one replica of a model is split over GPUs, and which splits a model admits.

vLLM's vocabulary: tensor parallel (`--tensor-parallel-size`), pipeline parallel
(`--pipeline-parallel-size`), data parallel attention (`--data-parallel-size`, one attention
replica per rank) and expert parallel (`--enable-expert-parallel`: the MoE experts are spread
over all tp*dp GPUs instead of being tensor-sliced over them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.errors import InputError


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    """One replica's layout. GPUs per replica = tp * pp * dp."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: bool = False

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def moe_group(self) -> int:
        """GPUs that share one MoE layer's experts: every tp and dp rank of a pipeline stage."""
        return self.tp * self.dp

    @property
    def moe_tp(self) -> int:
        return 1 if self.ep else self.moe_group

    @property
    def moe_ep(self) -> int:
        return self.moe_group if self.ep else 1

    def summary(self) -> str:
        parts = [f"TP{self.tp}"]
        if self.pp > 1:
            parts.append(f"PP{self.pp}")
        if self.dp > 1:
            parts.append(f"DP{self.dp}")
        if self.ep:
            parts.append(f"EP{self.moe_ep}")
        return " ".join(parts)


def check(arch: ModelArch, par: Parallelism) -> None:
    """Raise InputError naming the first field of `par` that `arch` cannot be split by."""
    for name, value in (("tp", par.tp), ("pp", par.pp), ("dp", par.dp)):
        if value < 1:
            raise InputError(name, value, "must be a positive integer")
    reason = _reasons(arch, np.array([par.tp]), np.array([par.pp]), np.array([par.dp]),
                      np.array([par.ep]))
    for field, why in reason:
        if why[0]:
            raise InputError(field, getattr(par, field), why[0])


def feasible(arch: ModelArch, tp: np.ndarray, pp: np.ndarray, dp: np.ndarray,
             ep: np.ndarray) -> np.ndarray:
    """Vectorized: True where the layout can run `arch` (the search's first pruning step)."""
    ok = np.ones(np.broadcast(tp, pp, dp, ep).shape, dtype=bool)
    for _, why in _reasons(arch, tp, pp, dp, ep):
        ok &= why == ""
    return ok


def _reasons(arch: ModelArch, tp: np.ndarray, pp: np.ndarray, dp: np.ndarray,
             ep: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Per layout field, an array of '' (fine) or the reason it cannot run."""
    tp, pp, dp, ep = np.broadcast_arrays(np.asarray(tp), np.asarray(pp), np.asarray(dp),
                                         np.asarray(ep, dtype=bool))
    shape = tp.shape
    tp_why = np.full(shape, "", dtype=object)
    heads = arch.num_heads
    tp_why[heads % tp != 0] = f"does not divide the {heads} attention heads of {arch.id}"
    if arch.mla is None:
        kv = arch.num_kv_heads
        # vLLM replicates KV heads when tp > kv heads, which needs tp to be a multiple of them.
        bad_kv = (kv % tp != 0) & (tp % kv != 0)
        tp_why[(tp_why == "") & bad_kv] = (
            f"neither divides nor is a multiple of the {kv} KV heads of {arch.id}")
    pp_why = np.full(shape, "", dtype=object)
    pp_why[pp > arch.num_layers] = f"exceeds the {arch.num_layers} layers of {arch.id}"
    dp_why = np.full(shape, "", dtype=object)
    ep_why = np.full(shape, "", dtype=object)
    if arch.moe is None:
        ep_why[ep] = f"{arch.id} has no experts to spread"
    else:
        experts = arch.moe.num_experts
        group = tp * dp
        ep_why[ep & (experts % group != 0)] = (
            f"{experts} experts of {arch.id} do not split evenly over tp*dp GPUs")
        width = arch.moe.expert_intermediate_size
        dp_why[~ep & (width % group != 0)] = (
            f"expert width {width} of {arch.id} does not split over tp*dp GPUs; "
            "use expert parallelism")
    if arch.moe is None:
        dp_why[dp > 1] = "attention data parallelism is only modelled for MoE models; " \
                         "use more replicas for a dense model"
    return [("tp", tp_why), ("pp", pp_why), ("dp", dp_why), ("ep", ep_why)]
