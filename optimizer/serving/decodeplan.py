"""The fast engine's decode plan: a request's whole decode planned when it starts decoding.

Split from engine.py, whose FastEngine carries these methods (see its docstring for why the
plan makes the engine fast), as functions of the engine: `add_decoder` plans a decode,
`drop_decoder` takes it out of the plan after some of its steps, `decoder_need` reads one
step's blocks of one decode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from trilemma.optimizer.serving.scheduler import verify_yields

if TYPE_CHECKING:
    from trilemma.optimizer.serving.engine import FastEngine


def add_decoder(eng: FastEngine, i: int, t0: int) -> None:
    st = eng.st
    prompt, g0 = st.prompt[i], st.generated[i]
    left = st.output[i] - g0
    st.decoding[i] = True
    st.t0[i] = t0
    st.g0[i] = g0
    eng.n_dec += 1
    eng.ctx_sum += prompt + g0
    pf = eng.pf
    if pf is not None:
        pf.p_sum += prompt
        pf.o_sum += st.output[i]
        if left > pf.ratio.r.clip:
            pf.long[i] = None
    if eng.spec is None:
        # Needs a block at step t iff (prompt + g0 + (t - t0) - 1) % block == 0.
        r = (prompt + g0 - 1 - t0) % eng.block
        st.residue[i] = r
        eng.residues[r] += 1
        last = t0 + left - 1
    else:
        tokens = verify_yields(eng.spec, eng.rng, left)
        cum = tokens.cumsum()
        m = int(cum.searchsorted(left)) + 1
        tokens, cum = tokens[:m], cum[:m]
        # KV slots at each step: what was generated before it, plus the verify tokens.
        slots = cum - tokens + (prompt + g0 - 1 + eng.q)
        tokens[-1] -= int(cum[-1]) - left
        blocks = -(-slots // eng.block) - st.held[i]
        need = np.empty_like(blocks)  # per-step differences (np.diff costs ~10x more)
        need[0] = blocks[0] - st.own[i]
        np.subtract(blocks[1:], blocks[:-1], out=need[1:])
        if t0 + m > len(eng.plan_tokens):
            grow_plan(eng, t0 + m)
        eng.plan_tokens[t0:t0 + m] += tokens
        eng.plan_blocks[t0:t0 + m] += need
        st.plan_tokens[i] = tokens
        st.plan_blocks[i] = need
        last = t0 + m - 1
    st.finish_step[i] = last
    waiting = eng.finishing.get(last)
    if waiting is None:
        eng.finishing[last] = [i]
    else:
        waiting.append(i)


def grow_plan(eng: FastEngine, size: int) -> None:
    size = max(2 * len(eng.plan_tokens), size + 1024)
    for name in ("plan_tokens", "plan_blocks"):
        old = getattr(eng, name)
        grown = np.zeros(size, dtype=np.int64)
        grown[:len(old)] = old
        setattr(eng, name, grown)


def drop_decoder(eng: FastEngine, i: int, done: int) -> None:
    """Take request i out of the plan after `done` decode steps; settle its tokens and
    blocks."""
    st = eng.st
    prompt = st.prompt[i]
    st.decoding[i] = False
    eng.n_dec -= 1
    pf = eng.pf
    if pf is not None:
        pf.p_sum -= prompt
        pf.o_sum -= st.output[i]
        pf.long.pop(i, None)
    if eng.spec is None:
        g = st.g0[i] + done
        eng.residues[st.residue[i]] -= 1
        st.own[i] = -(-(prompt + g - 1) // eng.block) - st.held[i]
    else:
        tokens, need = st.plan_tokens[i], st.plan_blocks[i]
        assert tokens is not None and need is not None
        g = st.g0[i] + int(tokens[:done].sum())
        st.own[i] += int(need[:done].sum())
        if done < len(tokens):
            t0 = st.t0[i]
            eng.plan_tokens[t0 + done:t0 + len(tokens)] -= tokens[done:]
            eng.plan_blocks[t0 + done:t0 + len(tokens)] -= need[done:]
        st.plan_tokens[i] = st.plan_blocks[i] = None
    st.generated[i] = g
    eng.ctx_sum -= prompt + g


def decoder_need(eng: FastEngine, i: int, tick: int) -> int:
    st = eng.st
    if eng.spec is None:
        return 1 if (st.residue[i] + tick) % eng.block == 0 else 0
    need = st.plan_blocks[i]
    j = tick - st.t0[i]
    return int(need[j]) if need is not None and 0 <= j < len(need) else 0
