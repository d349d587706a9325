"""Which planned engine flag an extra argument would set, read the way the engine reads it.

Users may append arguments to a rendered command (an OptimizedEndpoint's
serving.extraArgs). An argument that sets a flag the plan decided would silently change the
configuration the predictions were made for, so the caller refuses it; an exact string match
is not enough, because both engines parse argv with argparse plus their own rewriting:

- argparse: `--flag=value`, unique-prefix abbreviations (`allow_abbrev` is on in both engines:
  vLLM `--tensor 8`, SGLang `--tp 8`), single-dash prefixes even without it (vLLM `-t 8` is
  `-tp 8`), values attached to two-letter short options (`-qfp8`);
- vLLM's FlexibleArgumentParser: `_` for `-` in long names, dotted JSON keys
  (`--speculative-config.method=ngram` replaces the whole JSON value), `--no-<flag>` for every
  boolean, `-O<n>`, and `--config FILE` (a YAML file that can set any flag);
- SGLang: several names per setting (`--tp-size`/`--tensor-parallel-size`, `--ep`), and
  `--config FILE` too.

Sources: vLLM 0.10.2-0.12.0 (vllm/utils/argparse_utils.py, vllm/engine/arg_utils.py) and SGLang
0.5.3-0.5.9 (sglang/srt/server_args.py), with the aliases later releases added; the union is
used, since the image tag a user runs is theirs to choose. Refusing is conservative: a prefix
of a planned flag is refused even where the engine would call it ambiguous.
"""

from __future__ import annotations

import re

from trilemma.optimizer.catalog import Engine
from trilemma.optimizer.render.ir import RenderPlan

# Single-dash aliases of vLLM's serve (0.10-0.34) -> the long flags they set. -O is
# --compilation-config before 0.12 and --optimization-level after: both.
_VLLM_SHORT: dict[str, tuple[str, ...]] = {
    "-q": ("--quantization",), "-tp": ("--tensor-parallel-size",),
    "-pp": ("--pipeline-parallel-size",), "-dp": ("--data-parallel-size",),
    "-dpn": ("--data-parallel-rank",), "-dpr": ("--data-parallel-start-rank",),
    "-dpl": ("--data-parallel-size-local",), "-dpa": ("--data-parallel-address",),
    "-dpp": ("--data-parallel-rpc-port",), "-dpb": ("--data-parallel-backend",),
    "-dcp": ("--decode-context-parallel-size",), "-asc": ("--api-server-count",),
    "-O": ("--compilation-config", "--optimization-level"),
    "-cc": ("--compilation-config",), "-pcp": ("--prefill-context-parallel-size",),
    "-dph": ("--data-parallel-hybrid-lb",), "-dpe": ("--data-parallel-external-lb",),
    "-n": ("--nnodes",), "-r": ("--node-rank",), "-ac": ("--attention-config",),
    "-ep": ("--enable-expert-parallel",), "-sc": ("--speculative-config",),
    "-dc": ("--diffusion-config",), "-dpm": ("--data-parallel-multi-port-external-lb",),
}
# Long names that set another flag's setting.
_VLLM_LONG: dict[str, tuple[str, ...]] = {
    "--model": ("model",),  # 0.12 moves it into the positional MODEL
    "--device-memory-utilization": ("--gpu-memory-utilization",),
    "--spec-method": ("--speculative-config",), "--spec-model": ("--speculative-config",),
    "--spec-tokens": ("--speculative-config",),
}
# SGLang: every name of one setting maps to all of them (which one is canonical changed in
# 0.5.15: --tp-size became the primary name of --tensor-parallel-size).
_SGLANG_GROUPS: tuple[tuple[str, ...], ...] = (
    ("--tensor-parallel-size", "--tp-size"),
    ("--pipeline-parallel-size", "--pp-size"),
    ("--data-parallel-size", "--dp-size"),
    ("--expert-parallel-size", "--ep-size", "--ep"),
    ("--model-path", "--model"),
    ("--dist-init-addr", "--nccl-init-addr"),
    ("--speculative-draft-model-path", "--speculative-draft-model"),
    ("--decode-context-parallel-size", "--dcp-size"),
    ("--attention-context-parallel-size", "--attn-cp-size"),
    ("--attention-data-parallel-size", "--attn-dp-size"),
    ("--moe-data-parallel-size", "--moe-dp-size"),
    ("--enable-hierarchical-cache", "--enable-hicache"),
)
_CONFIG_FILE = "--config"
_NUMBER = re.compile(r"^-\d|^-\.\d")


def decided_flags(plan: RenderPlan) -> frozenset[str]:
    """Every flag the plan decides, emitted or left at the engine's default on purpose (a
    plan without speculation decides --speculative-config too), in canonical spelling."""
    engine = plan.engine
    flags = {a.flag for w in plan.workers
             for a in (*w.args, *w.leader_args, *w.follower_args)}
    return frozenset(n for f in flags for n in _names(engine, _long_form(engine, f)))


def overridden_flag(engine: Engine, token: str, decided: frozenset[str]) -> str | None:
    """The decided flag that argv token `token` would set, or None. A value (no leading dash,
    or a negative number) sets nothing; `--config` is reported as itself (it can set any)."""
    if not token.startswith("-") or _NUMBER.match(token) or token in ("-", "--"):
        return None
    key = token.split("=", 1)[0]
    if key.startswith("--"):
        key = _long_form(engine, key)
        if _CONFIG_FILE.startswith(key) and len(key) >= len("--conf"):
            return _CONFIG_FILE
        targets = _names(engine, key)
        hit = sorted(targets & decided)
        if hit:
            return _canonical(engine, hit[0])
        # An abbreviation: argparse expands a unique prefix of any long option.
        prefixed = sorted(f for f in decided if f.startswith("--") and f.startswith(key)
                          and len(key) > 2)
        return _canonical(engine, prefixed[0]) if prefixed else None
    if engine is not Engine.VLLM:
        return None  # SGLang has no single-dash options but -h
    key = key.split(".", 1)[0]  # -cc.level, -O.level: dotted keys of the JSON flags
    for short in _vllm_short_matches(key):
        hit = sorted(set(short) & decided)
        if hit:
            return hit[0]
    return None


def _long_form(engine: Engine, flag: str) -> str:
    """A long flag as the engine reads it: vLLM folds `_` into `-` before the first `.`,
    drops a dotted JSON key, and reads `--no-x` as setting x. (SGLang would refuse the `_`
    spelling outright; folding it refuses nothing that works.)"""
    if not flag.startswith("--"):
        return flag
    flag = flag.split(".", 1)[0].replace("_", "-")
    if flag.startswith("--no-"):
        flag = "--" + flag.removeprefix("--no-")
    return flag


def _names(engine: Engine, flag: str) -> set[str]:
    """`flag` and every other name that sets the same setting."""
    names = {flag}
    if engine is Engine.VLLM:
        names.update(_VLLM_LONG.get(flag, ()))
    else:
        for group in _SGLANG_GROUPS:
            if flag in group:
                names.update(group)
    return names


def _canonical(engine: Engine, flag: str) -> str:
    """One name per setting in messages: the first of its SGLang group."""
    if engine is Engine.SGLANG:
        for group in _SGLANG_GROUPS:
            if flag in group:
                return group[0]
    return flag


def _vllm_short_matches(key: str) -> list[tuple[str, ...]]:
    """What the single-dash aliases `key` can mean set: exact, a prefix (argparse expands
    single-dash prefixes whatever allow_abbrev says), or an alias with its value attached
    (`-qfp8`, `-O3`, `-n2`)."""
    if key in _VLLM_SHORT:
        return [_VLLM_SHORT[key]]
    found = [t for a, t in _VLLM_SHORT.items() if a.startswith(key) and len(key) > 1]
    found += [t for a, t in _VLLM_SHORT.items() if key.startswith(a) and len(a) == 2]
    return found
