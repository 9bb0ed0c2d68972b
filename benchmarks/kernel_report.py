"""What the real launches compiled: per compiled variant of each Triton kernel, its
registers, spills, shared memory, warps/stages, and instruction counts read from its PTX
(async copies, int8/fp MMA, wgmma). Called at the end of a GPU benchmark, after the
autotuner has compiled every config it tried; also records which config each key chose.
"""

from __future__ import annotations

import re
from typing import Any

# PTX mnemonics worth counting: async copies feed the pipeline; mma/wgmma are the tensor
# cores (s8 for the integer GEMMs).
_PATTERNS = {
    "cp_async": r"\bcp\.async\.(?:ca|cg)\b",
    "cp_async_bulk": r"\bcp\.async\.bulk\b",
    "mma_s8": r"\bmma\.sync\.aligned\.[^;]*\.s8\b",
    "mma_any": r"\bmma\.sync\.aligned\b",
    "wgmma": r"\bwgmma\.mma_async\b",
    "ld_local": r"\bld\.local\b",
}


def _compiled(jit_fn: Any) -> list[Any]:
    """CompiledKernel objects a JITFunction holds (layout differs across Triton versions)."""
    out = []
    for entry in getattr(jit_fn, "device_caches", {}).values():
        caches = entry if isinstance(entry, tuple) else (entry,)
        for c in caches:
            if isinstance(c, dict):
                out += [v for v in c.values() if hasattr(v, "metadata")]
    return out


def kernel_rows(name: str, autotuner: Any) -> list[dict[str, Any]]:
    rows = []
    for ck in _compiled(autotuner.fn):
        ptx = ck.asm.get("ptx", "") if hasattr(ck, "asm") else ""
        md = ck.metadata
        row = {
            "kernel": name,
            "num_warps": getattr(md, "num_warps", None),
            "num_stages": getattr(md, "num_stages", None),
            "shared_bytes": getattr(md, "shared", None),
            "n_regs": getattr(ck, "n_regs", None),
            "n_spills": getattr(ck, "n_spills", None),
        }
        row.update({k: len(re.findall(p, ptx)) for k, p in _PATTERNS.items()})
        consts = getattr(md, "constants", None) or {}
        if isinstance(consts, dict):
            row["constexprs"] = {str(k): v for k, v in consts.items()
                                 if isinstance(v, (int, str, bool))}
        rows.append(row)
    return rows


def chosen_configs(name: str, autotuner: Any) -> list[dict[str, Any]]:
    return [{"kernel": name, "key": [str(k) for k in key], "config": str(cfg)}
            for key, cfg in getattr(autotuner, "cache", {}).items()]


def collect() -> dict[str, Any]:
    from clq_compile.lowering.triton import act_quant, qgemm

    tuners = {"qgemm_int": qgemm._int_gemm, "qgemm_grouped": qgemm._grouped_gemm,
              "qgemm_weight_only": qgemm._wo_gemm,
              "rows": act_quant._rows_kernel}
    rows, chosen = [], []
    for name, t in tuners.items():
        try:
            rows += kernel_rows(name, t)
            chosen += chosen_configs(name, t)
        except Exception as e:  # a report must not hide the benchmark's numbers
            rows.append({"kernel": name, "error": repr(e)[:300]})
    return {"compiled": rows, "chosen": chosen}
