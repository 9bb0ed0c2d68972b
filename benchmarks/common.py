"""Shared helpers for the GPU benchmarks: device check, timing, environment record and
result files. Benchmarks are not tests: they need a CUDA GPU and exit non-zero with a
clear message without one; nothing is ever written unless it was measured."""

from __future__ import annotations

import datetime as dt
import json
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
# --dry-run (benchmarks/run_gpu.sh --dry-run, tests/benchmarks/test_run_gpu_dry.py): every
# stage on CPU under the Triton interpreter at tiny shapes, timed once, written to
# CLQ_BENCH_DRY_DIR, so the plumbing is checked before GPU time is spent. Never a
# measurement.
DRY_RUN = False


def results_dir() -> Path:
    import os

    if DRY_RUN:
        return Path(os.environ.get("CLQ_BENCH_DRY_DIR", "/tmp/clq_bench_dry"))
    return RESULTS_DIR


def require_cuda(name: str, dry_run: bool = False) -> torch.device:
    """The CUDA device, or exit(2) saying why nothing was measured; with ``dry_run`` the
    CPU (plumbing only)."""
    global DRY_RUN
    if dry_run:
        import os

        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            sys.stderr.write(f"{name} --dry-run needs TRITON_INTERPRET=1\n")
            sys.exit(2)
        DRY_RUN = True
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.stderr.write(
            f"{name}: needs a CUDA GPU and none is available "
            f"(torch {torch.__version__}); nothing was measured or written.\n"
        )
        sys.exit(2)
    return torch.device("cuda")


def device_slug() -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (result file names)."""
    if DRY_RUN:
        return "dry-run"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment() -> dict[str, Any]:
    """What a reader needs to reproduce or compare a results file."""
    import triton

    if DRY_RUN:
        return {"device": "cpu (dry run: plumbing only, not a measurement)",
                "torch": torch.__version__, "triton": triton.__version__}
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(),
        "capability": f"sm_{props.major}{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_info() -> dict[str, Any]:
    """The CPU a CPU benchmark ran on (model, logical CPUs, int8 dot-product extensions)."""
    import os

    info: dict[str, Any] = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["model"] = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                             if line.startswith("model name"))
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
        info["int8_dot"] = sorted({f for f in flags if "vnni" in f or f.startswith("amx")})
    except (OSError, StopIteration):
        pass
    return info


def bench_ms(fn: Callable[[], Any], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench: flushes L2 before each
    repetition, warms up first, reports the median). Dry run: one call, wall clock."""
    if DRY_RUN:
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def write_results(name: str, rows: list[dict[str, Any]], meta: dict[str, Any],
                  partial: bool = False) -> Path:
    """Write benchmarks/results/<name>_<device-slug>.json and print the table.
    ``partial``: a checkpoint while the run goes on (marked so, no table printed), so a
    stage stopped at its time limit still leaves the rows it measured."""
    from tabulate import tabulate

    out_dir = results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}_{device_slug()}.json"
    payload = {"benchmark": name, "environment": environment(), "meta": meta, "rows": rows}
    if partial:
        payload["partial"] = "stopped before the end: rows so far"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if partial:
        return path
    sys.stdout.write(tabulate(rows, headers="keys", floatfmt=".3g") + "\n")
    sys.stdout.write(f"wrote {path}\n")
    return path


def import_kernels() -> tuple[Any, Any, Any]:
    """(act_quant, qgemm, dispatch) modules, compiled mode (refuses TRITON_INTERPRET
    outside a dry run)."""
    import os

    if not DRY_RUN and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.stderr.write("unset TRITON_INTERPRET to benchmark compiled kernels\n")
        sys.exit(2)
    from clq_compile.lowering.triton import act_quant, dispatch, qgemm

    return act_quant, qgemm, dispatch
