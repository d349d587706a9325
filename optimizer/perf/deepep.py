"""DeepEP: SGLang's all-to-all for expert-parallel MoE layers under attention DP.

With `--enable-dp-attention` each rank holds its own requests' tokens. SGLang's default
(`--moe-a2a-backend none`) gathers every rank's tokens into each MoE layer and scatters the
result back (all-gather + reduce-scatter, priced in steps.py). With `--moe-a2a-backend deepep`
a rank instead dispatches each token only to the ranks that hold one of its top-k experts and
combines the expert outputs back: traffic grows with the distinct ranks a token needs, not
with the number of ranks. `--deepep-mode auto` (SGLang's default) runs the normal kernels for
prefill batches and the low-latency ones for CUDA-graph decode batches.

Measured: AIConfigurator's DeepEP tables (SGLang 0.5.12, one 8-GPU node), fitted per GPU
under calibration.json's engines.sglang as `deepep/<mode>/<dispatch|combine>` in the
collectives' form over the payload (kernel_forms.deepep_payload_bytes). A group wider than
the NVLink domain sends the share of its payload bound for other domains over the scale-out
links on top (datasheet rate: no multi-node DeepEP was measured).
"""

from __future__ import annotations

import numpy as np

from trilemma.optimizer.catalog.gpus import Gpu
from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.perf import kernel_forms as kf
from trilemma.optimizer.perf import kernels
from trilemma.optimizer.perf.arrays import FloatArray
from trilemma.optimizer.perf.engine import EngineFacts
from trilemma.optimizer.perf.kernel_rules import Fit

MODES = ("normal", "low_latency")
OPS = ("dispatch", "combine")


def supported(arch: ModelArch, facts: EngineFacts) -> bool:
    """Whether the engine runs this model's expert-parallel MoE over DeepEP (under DP)."""
    return arch.moe is not None and arch.architecture in facts.deepep_architectures


def runs(arch: ModelArch, gpu: Gpu, facts: EngineFacts, dp: int, ep: bool) -> bool:
    """Whether a worker of this layout runs DeepEP: the rule `StepModel` prices and the SGLang
    renderer writes as --moe-a2a-backend deepep (one predicate, so they never disagree)."""
    if dp <= 1 or not ep or not supported(arch, facts):
        return False
    from trilemma.optimizer.perf.steps import kernels_datasheet  # steps imports this module

    km = kernels.kernel_model(gpu.key, datasheet=kernels_datasheet(gpu), cuda_graphs=True,
                              engine=facts.engine.value)
    return DeepEP.for_model(km, gpu, arch, facts) is not None


class DeepEP:
    """DeepEP's cost per MoE layer on one GPU type, for one model's token width and top-k."""

    def __init__(self, km: kernels.KernelModel, gpu: Gpu, arch: ModelArch,
                 fits: dict[tuple[str, str], Fit]) -> None:
        assert arch.moe is not None
        self.km = km
        self.hidden = float(arch.hidden_size)
        self.topk = float(arch.moe.experts_per_token)
        self.domain = float(gpu.nvlink_reach(gpu.gpus_per_node))
        self.fits = fits

    @classmethod
    def for_model(cls, km: kernels.KernelModel, gpu: Gpu, arch: ModelArch,
                  facts: EngineFacts) -> DeepEP | None:
        """The model's DeepEP, or None where the engine does not run it for this model or
        the GPU has no DeepEP measurements (itself or a calibrated sibling's)."""
        if not supported(arch, facts):
            return None
        fits = {(mode, op): km.measured(f"deepep/{mode}/{op}") for mode in MODES for op in OPS}
        if any(fit is None for fit in fits.values()):
            return None
        return cls(km, gpu, arch, {k: f for k, f in fits.items() if f is not None})

    def layer_ms(self, tokens: np.ndarray, prefill: np.ndarray,
                 group: np.ndarray) -> FloatArray:
        """Dispatch + combine of one MoE layer: `tokens` per rank, `prefill` where the step
        is a prefill batch (normal kernels; else low-latency), `group` ranks in the EP group."""
        payload = kf.deepep_payload_bytes(tokens, self.hidden, self.topk, group)
        out: FloatArray = np.zeros(np.broadcast(payload, prefill).shape)
        for mode, where in (("normal", prefill), ("low_latency", ~prefill)):
            if not np.any(where):
                continue
            t = sum((kf.collective_ms(self.fits[(mode, op)].params, payload) for op in OPS),
                    start=np.zeros_like(payload))
            out = np.where(where, t, out)
        outside = np.maximum(1.0 - self.domain / np.maximum(group, 1.0), 0.0)
        if np.any(outside > 0.0):
            # Both directions cross the scale-out links for the share bound off-domain.
            out = out + np.where(outside > 0.0,
                                 2.0 * self.km.p2p_ms(payload * outside, True), 0.0)
        return out
