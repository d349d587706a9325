"""The fast engine's decode plan: a request's whole decode planned when it starts decoding.

Split from engine.py, whose FastEngine carries these methods (see its docstring for why the
plan makes the engine fast): `_add_decoder` plans a decode, `_drop_decoder` takes it out of
the plan after some of its steps, `_decoder_need` reads one step's blocks of one decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from trilemma.optimizer.serving.scheduler import verify_yields

if TYPE_CHECKING:
    from trilemma.optimizer.serving.engine import FastEngine


class DecodePlan:
    """FastEngine's decode-plan methods; `self` is the FastEngine."""

    def _add_decoder(self: FastEngine, i: int, t0: int) -> None:
        st = self.st
        prompt, g0 = st.prompt[i], st.generated[i]
        left = st.output[i] - g0
        st.decoding[i] = True
        st.t0[i] = t0
        st.g0[i] = g0
        self.n_dec += 1
        self.ctx_sum += prompt + g0
        pf = self.pf
        if pf is not None:
            pf.p_sum += prompt
            pf.o_sum += st.output[i]
            if left > pf.ratio.r.clip:
                pf.long[i] = None
        if self.spec is None:
            # Needs a block at step t iff (prompt + g0 + (t - t0) - 1) % block == 0.
            r = (prompt + g0 - 1 - t0) % self.block
            st.residue[i] = r
            self.residues[r] += 1
            last = t0 + left - 1
        else:
            tokens = verify_yields(self.spec, self.rng, left)
            cum = tokens.cumsum()
            m = int(cum.searchsorted(left)) + 1
            tokens, cum = tokens[:m], cum[:m]
            # KV slots at each step: what was generated before it, plus the verify tokens.
            slots = cum - tokens + (prompt + g0 - 1 + self.q)
            tokens[-1] -= int(cum[-1]) - left
            blocks = -(-slots // self.block) - st.held[i]
            need = np.empty_like(blocks)  # per-step differences (np.diff costs ~10x more)
            need[0] = blocks[0] - st.own[i]
            np.subtract(blocks[1:], blocks[:-1], out=need[1:])
            if t0 + m > len(self.plan_tokens):
                self._grow_plan(t0 + m)
            self.plan_tokens[t0:t0 + m] += tokens
            self.plan_blocks[t0:t0 + m] += need
            st.plan_tokens[i] = tokens
            st.plan_blocks[i] = need
            last = t0 + m - 1
        st.finish_step[i] = last
        waiting = self.finishing.get(last)
        if waiting is None:
            self.finishing[last] = [i]
        else:
            waiting.append(i)

    def _grow_plan(self: FastEngine, size: int) -> None:
        size = max(2 * len(self.plan_tokens), size + 1024)
        for name in ("plan_tokens", "plan_blocks"):
            old = getattr(self, name)
            grown = np.zeros(size, dtype=np.int64)
            grown[:len(old)] = old
            setattr(self, name, grown)

    def _drop_decoder(self: FastEngine, i: int, done: int) -> None:
        """Take request i out of the plan after `done` decode steps; settle its tokens and
        blocks."""
        st = self.st
        prompt = st.prompt[i]
        st.decoding[i] = False
        self.n_dec -= 1
        pf = self.pf
        if pf is not None:
            pf.p_sum -= prompt
            pf.o_sum -= st.output[i]
            pf.long.pop(i, None)
        if self.spec is None:
            g = st.g0[i] + done
            self.residues[st.residue[i]] -= 1
            st.own[i] = -(-(prompt + g - 1) // self.block) - st.held[i]
        else:
            tokens, need = st.plan_tokens[i], st.plan_blocks[i]
            assert tokens is not None and need is not None
            g = st.g0[i] + int(tokens[:done].sum())
            st.own[i] += int(need[:done].sum())
            if done < len(tokens):
                t0 = st.t0[i]
                self.plan_tokens[t0 + done:t0 + len(tokens)] -= tokens[done:]
                self.plan_blocks[t0 + done:t0 + len(tokens)] -= need[done:]
            st.plan_tokens[i] = st.plan_blocks[i] = None
        st.generated[i] = g
        self.ctx_sum -= prompt + g

    def _decoder_need(self: FastEngine, i: int, tick: int) -> int:
        st = self.st
        if self.spec is None:
            return 1 if (st.residue[i] + tick) % self.block == 0 else 0
        need = st.plan_blocks[i]
        j = tick - st.t0[i]
        return int(need[j]) if need is not None and 0 <= j < len(need) else 0
