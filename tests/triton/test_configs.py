"""Every tile the kernels may launch must compile on a GPU, and the interpreter must run
with exactly one autotune config. Checked here because CI has no GPU: the interpreter
accepts dot shapes (8x8) that the NVIDIA compiler rejects."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import min_dot_size

from clq_compile.lowering.triton import configs
from clq_compile.lowering.triton.support import Unsupported, plan_gemm, plan_rows
from tests.triton.conftest import ON_GPU

_OPERAND_TYPES = {"int4": tl.int8, "int8": tl.int8, "float": tl.bfloat16}
_K_CASES = (32, 64, 96, 1152, 3072, 4608, 12288)
_GROUPS = (1, 2, 4, 8, 9, 16)  # scale columns: per row and K/64, K/128... where they divide


def _nvidia_min(dtype: tl.dtype) -> tuple[int, int, int]:
    check = min_dot_size(GPUTarget("cuda", 90, 32))
    return check(dtype, dtype)


def _assert_dot_ok(shape: tuple[int, int, int], dtype: tl.dtype, what: str) -> None:
    m, n, k = shape
    nv = _nvidia_min(dtype)
    floor = (max(configs.MIN_DOT, nv[0]), max(configs.MIN_DOT, nv[1]), max(configs.MIN_DOT, nv[2]))
    assert m >= floor[0] and n >= floor[1] and k >= floor[2], f"{what}: dot {shape} < {floor}"


@pytest.mark.parametrize("interpret", [False, True], ids=["gpu-configs", "interpreter-configs"])
def test_gemm_tiles_satisfy_dot_minimums(interpret: bool) -> None:
    """All (tile, planned BLOCK_K) pairs of every GEMM variant, over DiT-like K and group
    choices, give tl.dot extents >= 16 and >= the NVIDIA backend's own minimum."""
    checked = 0
    variants = [(4, 4), (8, 4), (8, 8), (4, 8), (16, 4), (16, 8)]
    for (a_bits, w_bits), k, ga, gw in itertools.product(variants, _K_CASES, _GROUPS, _GROUPS):
        try:
            plan = plan_gemm(a_bits, w_bits, k, ga, gw, torch.bfloat16, interpret=interpret)
        except Unsupported:
            continue
        tiles = (configs.weight_only_tiles(interpret) if plan.a_kind == "float"
                 else configs.grouped_gemm_tiles(interpret) if plan.grouped
                 else configs.int_gemm_tiles(interpret))
        for tile in tiles:
            for shape in configs.gemm_dots(tile, plan.block_k, plan.a_kind, plan.w_packed):
                _assert_dot_ok(shape, _OPERAND_TYPES[plan.a_kind], f"{plan} {tile}")
                checked += 1
    assert checked > 100  # the sweep really covered the variants


@pytest.mark.parametrize("interpret", [False, True], ids=["gpu-configs", "interpreter-configs"])
def test_row_tiles_satisfy_dot_minimums(interpret: bool) -> None:
    """The rotation dot of the act-quant kernel, for every supported Hadamard block."""
    checked = 0
    for b, k, group in itertools.product((16, 32, 64, 128, 256), (256, 1152, 4608), (0, 64, 128)):
        if k % b:
            continue
        x = torch.empty(1, k)
        plan = plan_rows(x, None, None, torch.empty(b, b), 4, group, interpret=interpret)
        assert plan.block_k % b == 0 and (group == 0 or plan.block_k % group == 0)
        for tile in configs.row_tiles(interpret):
            for shape in configs.row_dots(tile, plan.block_k, b):
                _assert_dot_ok(shape, tl.float32, f"{plan} {tile}")
                checked += 1
    assert checked >= 40


def test_interpreter_runs_one_config_per_kernel() -> None:
    """Autotuning over several configs fails under the interpreter ("0 active drivers")."""
    from clq_compile.lowering.triton import act_quant, qgemm

    assert configs.interpreting() is not ON_GPU
    tuners = [(qgemm._int_gemm, configs.int_gemm_tiles()),
              (qgemm._wo_gemm, configs.weight_only_tiles()),
              (qgemm._grouped_gemm, configs.grouped_gemm_tiles()),
              (act_quant._rows_kernel, configs.row_tiles())]
    for tuner, tiles in tuners:
        assert len(tuner.configs) == len(tiles)
        if not ON_GPU:
            assert len(tuner.configs) == 1


def test_kernels_are_interpreted_in_ci() -> None:
    """conftest.py must set TRITON_INTERPRET before the kernel modules are imported;
    otherwise CPU runs would try to compile for a GPU that is not there."""
    from triton.runtime.interpreter import InterpretedFunction

    from clq_compile.lowering.triton import act_quant, jit_helpers, qgemm

    for fn in (qgemm._qgemm_kernel, act_quant._rows_kernel.fn, jit_helpers.round_half_even):
        assert isinstance(fn, InterpretedFunction) is not ON_GPU, fn


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (lambda: plan_gemm(4, 4, 96, 2, 1, torch.bfloat16), "allows K tiles of at most 16"),
        (lambda: plan_gemm(4, 4, 256, 4, 3, torch.bfloat16), "do not divide"),
        (lambda: plan_gemm(4, 4, 384, 2, 3, torch.bfloat16), "do not nest"),
        (lambda: plan_gemm(3, 4, 256, 1, 1, torch.bfloat16), "3-bit"),
        (lambda: plan_rows(torch.empty(2, 64), None, None, torch.empty(8, 8), 4, 0), "block 8"),
        (lambda: plan_rows(torch.empty(2, 96), None, None, None, 4, 48), "group 48"),
        (lambda: plan_rows(torch.empty(2, 63), None, None, None, 4, 0), "even K"),
        (lambda: plan_rows(torch.empty(2, 64, dtype=torch.int8), None, None, None, 4, 0), "dtype"),
    ],
)
def test_unsupported_calls_name_the_reason(call, reason: str) -> None:
    with pytest.raises(Unsupported, match=reason):
        call()
