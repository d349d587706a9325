"""The fast engines' scheduler state per request (arrays of plain ints, one slot a request).

Split from engine.py, whose FastEngine reads and writes it, to keep modules small.
"""

from __future__ import annotations

import numpy as np

from trilemma.optimizer.serving.requests import RequestStream


class SeqState:
    """Scheduler state per request, shared by all fast engines of a run (a request is on one
    engine at a time; the prefill engine only frees its blocks after the hand-off). `prompt`
    and `output` hold the requests' prompt_tokens and output_tokens, short as in Seq."""

    def __init__(self, workload: RequestStream) -> None:
        n = len(workload)
        self.prompt: list[int] = workload.prompt_tokens.tolist()
        self.output: list[int] = workload.output_tokens.tolist()
        self.prefix_id: list[int] = workload.prefix_id.tolist()
        self.prefix_tokens: list[int] = workload.prefix_tokens.tolist()
        self.generated = [0] * n
        self.computed = [0] * n  # tokens whose KV the current engine holds
        self.target = [0] * n  # tokens to prefill before the next token is sampled
        self.own = [0] * n  # blocks owned (lazily updated while decoding)
        self.held = [0] * n  # cached blocks in use: the first `held` of its prefix hashes
        self.kv_ready = [False] * n
        self.decoding = [False] * n
        # The decode plan, set when a request starts decoding.
        self.t0 = [0] * n  # the engine step of its first decode
        self.g0 = [0] * n  # tokens generated before it
        self.residue = [0] * n
        self.finish_step = [0] * n
        self.plan_tokens: list[np.ndarray | None] = [None] * n
        self.plan_blocks: list[np.ndarray | None] = [None] * n
