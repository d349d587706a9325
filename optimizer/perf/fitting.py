"""Calibration: fit the kernel forms to AIConfigurator's measured tables -> calibration.json.

Offline step (`trilemma calibrate`, or the GENERATED_BY line below); the runtime
(`kernels.py`) only reads the JSON. The shared fits come from the vLLM-measured tables in
../shared/data/aic; an engine whose own kernels were measured (SGLang) gets its own fits of
those families under "engines" (`engine_kernels.py` lays them over the shared ones).
pandas, pyarrow, scipy and PyYAML are imported inside the functions that need them, so the
optimizer package never requires the calibration extras.

Every fit minimises the log of predicted/measured latency (relative error) with a soft-L1
loss, in log-parameter space (all parameters are positive), from starting points derived
deterministically from the data. Large tables are thinned by a fixed stride; the recorded
errors use every row of the fit's domain.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import fitting_tables as ft
from trilemma.optimizer.perf import kernel_forms as kf

SCHEMA = 1
SIGNIFICANT_DIGITS = 6
MAX_FIT_ROWS = 6_000  # a stride subsample keeps the whole fit under a minute on 2 cores
CALIBRATED_GPUS = ("a100_sxm", "b200_sxm", "h100_sxm", "h200_sxm", "l40s")
SOURCE = {
    "name": "NVIDIA AIConfigurator v0.11.0",
    "commit": "095f58a51c4ca8e61b66ec108d86f223f8d559ce",
    "license": "Apache-2.0",
    "what": "measured kernel profiles (aic-core/src/aiconfigurator_core/systems/data), "
            "latencies in milliseconds on real GPUs, and the systems/*.yaml datasheet figures",
    "credit": "NVIDIA AIConfigurator v0.11.0 (commit 095f58a51c4ca8e61b66ec108d86f223f8d559ce), "
              "Apache-2.0, measured kernel profiles",
}
GENERATED_BY = ("python -m trilemma.optimizer.perf.fitting --aic ../shared/data/aic "
                "--sglang-tables <aiconfigurator_core>/systems/data "
                "--out optimizer/perf/data/calibration.json")
# SGLang runs its own kernels where vLLM's differ: FA3 / TRT-LLM attention, FA3's MLA kernel
# (Hopper) and TRT-LLM's (Blackwell), its fused-MoE and GEMM paths. AIConfigurator measured
# them with SGLang 0.5.14; its 0.12.0 wheel ships the tables (the [compare] extra installs it).
# Collectives are NCCL's and the same under both engines, so they stay shared.
ENGINE_TABLES = {"sglang": "0.5.14"}
# DeepEP (SGLang's --moe-a2a-backend deepep) was last measured with SGLang 0.5.12.
DEEPEP_VERSION = "0.5.12"
# The GPUs SGLang's own fits are made for: those it is validated on and Hopper's H200 (the
# H100's kernels). L40S's SGLang tables mix Triton and FlashInfer rows a single form fits
# poorly (p90 error up to 138%), so it keeps the shared fits.
ENGINE_GPUS = ("b200_sxm", "h100_sxm", "h200_sxm")
ENGINE_SOURCE = {
    "sglang": {
        "name": "NVIDIA AIConfigurator 0.12.0 (PyPI wheel aiconfigurator-core 0.12.0)",
        "license": "Apache-2.0",
        "what": "measured SGLang 0.5.14 kernel profiles (aiconfigurator_core/systems/data/"
                "<gpu>/{gemm,attention,mla,moe}/sglang/0.5.14) and DeepEP's dispatch and "
                "combine (<gpu>/comm/sglang/0.5.12/wideep_deepep_*), latencies in milliseconds",
        "credit": "NVIDIA AIConfigurator 0.12.0, Apache-2.0, measured SGLang kernel profiles",
    },
}
PARAM_NAMES = kf.FORM_PARAMS
RESIDUAL_MIN_ROWS = 20  # a residual cell needs this many measured shapes to be trusted
RATE_HEADROOM = 1.5
START_EFFICIENCY = 0.6
PHYSICAL_RATES = ("flops", "gemm_flops", "attn_flops", "mem_bw")
# Bounds in the parameters' own units (ms, FLOP/s, bytes/s, elements); wide on purpose.
BOUNDS: dict[str, tuple[float, float]] = {
    "host_ms": (1e-4, 2.0), "host_large_ms": (1e-4, 2.0), "launch_ms": (1e-4, 2.0),
    "ep_launch_ms": (1e-5, 2.0),
    "flops": (1e11, 1e17), "gemm_flops": (1e11, 1e17), "attn_flops": (1e11, 1e17),
    "exp_rate": (1e9, 1e17), "mem_bw": (1e9, 1e14), "sharpness": (1.0, 20.0),
    "m_half": (1e-2, 1e4), "prep_bytes": (1e-3, 32.0), "tile_s": (1e-13, 1e-4),
    "seq_s": (1e-13, 1e-4), "rows_half": (1.0, 1e10), "act_bytes": (1e-3, 100.0),
    "skew_pl101": (1.0, 1e3), "skew_pl12": (1.0, 1e3), "alpha_ms": (1e-4, 10.0),
    "alg_bw": (1e6, 1e13), "alpha2_ms": (1e-4, 10.0), "alg_bw2": (1e6, 1e13),
}


def round_sig(value: float, digits: int = SIGNIFICANT_DIGITS) -> float:
    """Round to significant digits so the JSON is byte-stable across reruns."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits - 1}e}")


def bounds(name: str, key: str, sheet: dict[str, Any]) -> tuple[float, float]:
    """A parameter's bounds; compute and memory rates may not pass the datasheet by much.

    The tables re-run one layer's buffers, so small working sets are served from L2 at
    beyond-DRAM rates; an unbounded fit explains that with an impossible DRAM bandwidth,
    which would then mislead every cold-cache shape and the datasheet defaults.
    """
    lo, hi = BOUNDS[name]
    ref = kf.rate_reference(name, key, sheet) if name in PHYSICAL_RATES else None
    return (lo, min(hi, RATE_HEADROOM * ref)) if ref else (lo, hi)


def _start(name: str, p: ft.FitProblem, sheet: dict[str, Any]) -> float:
    """Rates start at a typical efficiency of their datasheet peak, the rest from the data."""
    ref = kf.rate_reference(name, p.key, sheet) if name in PHYSICAL_RATES else None
    return START_EFFICIENCY * ref if ref else p.x0[name]


def fit_problem(p: ft.FitProblem, sheet: dict[str, Any]) -> dict[str, Any]:
    """Least squares in log space for one problem; returns its JSON entry."""
    from scipy.optimize import least_squares

    names = PARAM_NAMES[p.form]
    # Parameters the table cannot identify are pinned; rates at a typical efficiency.
    fixed = {n: _start(n, p, sheet) if n in PHYSICAL_RATES else v for n, v in p.fixed.items()}
    free = [n for n in names if n not in fixed]
    box = np.log([bounds(n, p.key, sheet) for n in free])
    lo, hi = box[:, 0], box[:, 1]
    x0 = np.clip(np.log([_start(n, p, sheet) for n in free]), lo + 0.01, hi - 0.01)
    fit_rows = _stride(len(p.latency_ms))
    log_y = np.log(p.latency_ms)

    def full(theta: np.ndarray) -> np.ndarray:
        values = dict(zip(free, np.exp(theta), strict=True))
        return np.array([values[n] if n in values else fixed[n] for n in names])

    def residual(theta: np.ndarray) -> np.ndarray:
        r: np.ndarray = (np.log(p.predict(full(theta))) - log_y)[fit_rows]
        return r

    result = least_squares(residual, x0, bounds=(lo, hi), method="trf", loss="soft_l1",
                           f_scale=0.1, max_nfev=300, ftol=1e-6, xtol=1e-6, gtol=1e-6)
    x = full(result.x)
    pred = p.predict(x)
    constants = dict(p.constants)
    if p.form == "gemm" and p.shapes is not None:
        grid = _gemm_residual_grid(pred, p.latency_ms, *p.shapes)
        constants["residual_log_ratio"] = grid
        pred = pred * kf.gemm_residual_factor(grid, *p.shapes)
    ape = np.abs(pred / p.latency_ms - 1.0)
    return {
        "form": p.form,
        "params": {n: round_sig(float(v)) for n, v in zip(names, x, strict=True)},
        "constants": constants,
        "fixed": sorted(fixed),
        "n": len(p.latency_ms),
        "median_ape": round(float(np.median(ape)), 4),
        "p90_ape": round(float(np.quantile(ape, 0.9)), 4),
        **p.meta,
    }


def _gemm_residual_grid(pred: np.ndarray, measured: np.ndarray, m: np.ndarray, n: np.ndarray,
                        k: np.ndarray) -> list[list[float]]:
    """Median log(measured/predicted) per (m, n*k) cell of kernel_forms' residual grid.

    Each n*k column is made non-decreasing in m (weighted pool-adjacent-violators), so the
    corrected time keeps the form's promise that more tokens never make a GEMM faster.
    """
    i, j = kf.gemm_residual_cells(m, n, k)
    rows, cols = len(kf.RESIDUAL_LOG2_M_EDGES) + 1, len(kf.RESIDUAL_LOG2_NK_EDGES) + 1
    log_ratio = np.log(measured / pred)
    grid = [[0.0] * cols for _ in range(rows)]
    for c in range(cols):
        values, weights = [], []
        for r in range(rows):
            cell = log_ratio[(i == r) & (j == c)]
            trusted = cell.size >= RESIDUAL_MIN_ROWS
            values.append(float(np.median(cell)) if trusted else 0.0)
            weights.append(float(cell.size) if trusted else 1.0)
        for r, v in enumerate(_nondecreasing(values, weights)):
            grid[r][c] = round(v, 4)
    return grid


def _nondecreasing(values: list[float], weights: list[float]) -> list[float]:
    """Weighted isotonic (non-decreasing) regression by pool-adjacent-violators."""
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [b[0] for b in blocks for _ in range(int(b[2]))]


def _stride(n: int) -> np.ndarray:
    if n <= MAX_FIT_ROWS:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, MAX_FIT_ROWS).round().astype(np.int64))


def _tables(gpu_dir: Path, family: str, name: str, framework: str = "*",
            version: str = "*") -> Iterator[tuple[Path, str, str]]:
    """(path, framework, version) of every `name` table of one family, sorted."""
    for path in sorted(gpu_dir.glob(f"{family}/{framework}/{version}/{name}")):
        yield path, path.parent.parent.name, path.parent.name


def _read(path: Path) -> Any:
    import pandas as pd

    df = pd.read_parquet(path)
    # Sorting by every column fixes the row order whatever the file's: the stride subsample
    # and so the fitted parameters are a function of the table's content alone.
    return df.sort_values(list(df.columns), kind="mergesort").reset_index(drop=True)


def gpu_problems(aic_root: Path, gpu: str) -> Iterator[ft.FitProblem]:
    """Every table of one GPU in the shared data (vLLM's kernels and NCCL)."""
    yield from _problems(aic_root / "profiles" / gpu, aic_root)
    for path, framework, version in _tables(aic_root / "profiles" / gpu, "comm", "*.parquet"):
        yield from ft.comm_problems(_read(path), path, aic_root, version,
                                    custom=framework != "nccl")


def _problems(gpu_dir: Path, root: Path, framework: str = "*",
              version: str = "*") -> Iterator[ft.FitProblem]:
    """The compute kernels' tables (GEMM, attention, MLA, MoE) under one GPU's folder."""
    def tables(family: str, name: str) -> Iterator[tuple[Path, str, str]]:
        return _tables(gpu_dir, family, name, framework, version)

    for path, _, ver in tables("gemm", "gemm_perf.parquet"):
        yield from ft.gemm_problems(_read(path), path, root, ver)
    for phase in ("context", "generation"):
        for path, _, ver in tables("attention", f"{phase}_attention_perf.parquet"):
            yield from ft.attention_problems(_read(path), phase, path, root, ver)
        for module, name in ((True, f"mla_{phase}_module_perf.parquet"),
                             (False, f"{phase}_mla_perf.parquet")):
            for path, _, ver in tables("mla", name):
                yield from ft.mla_problems(_read(path), phase, path, root, ver, module=module)
    for path, _, ver in tables("moe", "moe_perf.parquet"):
        yield from ft.moe_problems(_read(path), path, root, ver)


def read_datasheet(aic_root: Path, gpu: str) -> dict[str, Any]:
    """The AIConfigurator system file's figures the runtime extrapolates with."""
    import yaml

    raw = yaml.safe_load((aic_root / "systems" / f"{gpu}.yaml").read_text())
    g, node = raw["gpu"], raw["node"]
    flops = {key: float(g[f"{name}_tc_flops"]) for key, name in
             (("bf16", "bfloat16"), ("fp8", "fp8"), ("int8", "int8"), ("fp4", "fp4"))
             if f"{name}_tc_flops" in g}
    return {"dense_flops": flops, "memory_bw": float(g["mem_bw"]),
            "intra_node_bw": float(node["intra_node_bw"]),
            "inter_node_bw": float(node["inter_node_bw"]),
            "gpus_per_node": int(node["num_gpus_per_node"]),
            "p2p_latency_ms": float(node["p2p_latency"]) * 1e3,
            "source": f"systems/{gpu}.yaml"}


def fit_gpu(aic_root: Path, gpu: str) -> dict[str, Any]:
    sheet = read_datasheet(aic_root, gpu)
    fits = {p.key: fit_problem(p, sheet) for p in gpu_problems(aic_root, gpu)}
    versions = sorted({f["version"] for k, f in fits.items() if not k.startswith("comm/")})
    return {"datasheet": sheet, "engine": "vllm",
            "engine_versions": versions, "fits": dict(sorted(fits.items()))}


def datasheet_defaults(gpus: dict[str, Any]) -> dict[str, Any]:
    """Per fit key: median parameters over calibrated GPUs, rates relative to their datasheet.

    A GPU with no calibration multiplies the relative rates by its own datasheet figures.
    """
    keys = sorted({k for g in gpus.values() for k in g["fits"]})
    out: dict[str, Any] = {}
    for key in keys:
        entries = [(name, g) for name, g in gpus.items() if key in g["fits"]]
        fit0 = entries[0][1]["fits"][key]
        params: dict[str, float] = {}
        for pname in fit0["params"]:
            values = []
            for _, g in entries:
                value = g["fits"][key]["params"][pname]
                ref = kf.rate_reference(pname, key, g["datasheet"])
                values.append(value / ref if ref else value)
            params[pname] = round_sig(float(np.median(values)))
        out[key] = {"form": fit0["form"], "params": params, "constants": fit0["constants"],
                    "relative": sorted(p for p in params if p in kf.RATE_REFERENCE),
                    "from": [name for name, _ in entries]}
    return out


def fit_engine(engine: str, tables_root: Path, gpus: dict[str, Any]) -> dict[str, Any]:
    """One engine's own compute-kernel fits per calibrated GPU (`gpus`: the shared fits, for
    their datasheets). `tables_root` holds <gpu>/<family>/<engine>/<version>/*.parquet."""
    version = ENGINE_TABLES[engine]
    out: dict[str, Any] = {}
    for gpu, entry in gpus.items():
        if gpu not in ENGINE_GPUS:
            continue
        # Table paths are recorded from the package folder: aiconfigurator_core/systems/...
        problems = [*_problems(tables_root / gpu, tables_root.parents[2], engine, version),
                    *_deepep_problems(tables_root / gpu, tables_root.parents[2], engine)]
        fits = {p.key: fit_problem(p, entry["datasheet"]) for p in problems}
        if fits:
            out[gpu] = {"engine_versions": sorted({f["version"] for f in fits.values()}),
                        "fits": dict(sorted(fits.items()))}
    if not out:
        raise _no_tables(engine, tables_root)
    return {"source": ENGINE_SOURCE[engine], "gpus": out}


def _no_tables(engine: str, tables_root: Path) -> InputError:
    return InputError(f"{engine}_tables", str(tables_root),
                      f"no {engine} {ENGINE_TABLES[engine]} kernel tables of "
                      f"{', '.join(ENGINE_GPUS)} there")


def _deepep_problems(gpu_dir: Path, root: Path, engine: str) -> Iterator[ft.FitProblem]:
    for mode, name, columns in ft.DEEPEP_TABLES:
        for path, _, version in _tables(gpu_dir, "comm", name, engine, DEEPEP_VERSION):
            yield from ft.deepep_problems(_read(path), mode, columns, path, root, version)


def fit_all(aic_root: Path, engine_tables: dict[str, Path] | None = None) -> dict[str, Any]:
    """Fit every calibrated GPU found under `aic_root`, then each engine's own kernels from
    `engine_tables` (engine -> tables root); the calibration document."""
    aic_root = Path(aic_root)
    gpus = {g: fit_gpu(aic_root, g) for g in CALIBRATED_GPUS
            if (aic_root / "profiles" / g).is_dir()}
    engines = {name: fit_engine(name, Path(root), gpus)
               for name, root in sorted((engine_tables or {}).items())}
    return {"schema": SCHEMA, "source": SOURCE, "generated_by": GENERATED_BY,
            "units": {"time": "ms", "rates": "FLOP/s and bytes/s", "*_s": "seconds"},
            "gpus": gpus, "datasheet_defaults": datasheet_defaults(gpus), "engines": engines}


def installed_sglang_tables() -> Path:
    """The measured SGLang tables inside the installed aiconfigurator-core wheel (found, not
    imported: importing it loads all of AIConfigurator)."""
    from importlib.util import find_spec

    spec = find_spec("aiconfigurator_core")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("sglang_tables", None, "not given, and aiconfigurator-core (which "
                         "ships them) is not installed: pip install 'trilemma[compare]'")
    return Path(next(iter(spec.submodule_search_locations))) / "systems" / "data"


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, indent=1, separators=(",", ": ")) + "\n"


def default_output() -> Path:
    """The packaged calibration file (what `trilemma calibrate` rewrites by default)."""
    from importlib import resources

    return Path(str(resources.files("trilemma.optimizer.perf").joinpath(
        "data/calibration.json")))


def write_calibration(aic_root: Path, out: Path, sglang_tables: Path | None = None, *,
                      shared_only: bool = False) -> None:
    """Fit and write the calibration; `shared_only` leaves out the engines' own kernels (a
    check of the shared fits where the SGLang tables are not installed)."""
    engines = {} if shared_only else {"sglang": sglang_tables or installed_sglang_tables()}
    for engine, root in engines.items():  # refused before minutes of fitting, not after
        version = ENGINE_TABLES[engine]
        if not any(Path(root).glob(f"*/*/{engine}/{version}/*.parquet")):
            raise _no_tables(engine, Path(root))
    Path(out).write_text(dumps(fit_all(Path(aic_root), engines)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aic", type=Path, required=True, help="AIConfigurator data root")
    parser.add_argument("--sglang-tables", type=Path, default=None,
                        help="SGLang kernel tables (default: the installed aiconfigurator-core's)")
    parser.add_argument("--shared-only", action="store_true",
                        help="fit the shared tables only (no engine's own kernels)")
    parser.add_argument("--out", type=Path, required=True, help="calibration.json to write")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    write_calibration(args.aic, args.out, args.sglang_tables, shared_only=args.shared_only)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
