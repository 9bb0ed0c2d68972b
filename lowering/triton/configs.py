"""Tile configurations for the kernels, kept as plain data so a test can check every tile
the kernels may use against the GPU compiler's ``tl.dot`` minimums without a GPU.

Under ``TRITON_INTERPRET=1`` each kernel gets exactly one config: the interpreter cannot
autotune over several (it benchmarks with a GPU driver it does not have), and bigger tiles
mean fewer interpreted program instances, i.e. faster CPU tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Smallest tl.dot extent we ever emit in M, N and K. The NVIDIA backend accepts M,N >= 1
# (it pads) but K >= 32 for 8-bit operands; 16 everywhere keeps wgmma/mma tiles whole.
MIN_DOT = 16


def interpreting() -> bool:
    """Whether ``@triton.jit`` interprets (read the way triton.knobs reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@dataclass(frozen=True)
class GemmTile:
    """Output tile of the quantized GEMM; BLOCK_K is chosen per call (it must divide the
    scale group), so it is not part of the autotuned tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8


@dataclass(frozen=True)
class RowTile:
    """Rows per program of the activation-quantize / transform kernel."""

    block_m: int
    num_warps: int
    num_stages: int = 2


# Int GEMMs (W4A4/W4A8/W8A8): compute-bound at DiT sizes, large tiles.
GPU_INT_GEMM_TILES: tuple[GemmTile, ...] = (
    GemmTile(128, 128, 8, 3),
    GemmTile(128, 256, 8, 3),
    GemmTile(256, 128, 8, 3),
    GemmTile(64, 128, 4, 4),
    GemmTile(128, 64, 4, 4),
)
# Grouped scales (a second fp32 accumulator beside the int32 one): the 128x128+ tiles spill
# on sm_80/sm_89 (compile_check: 24-1800 B), so these stay at 64x128 / 128x64.
GPU_GROUPED_GEMM_TILES: tuple[GemmTile, ...] = (
    GemmTile(128, 64, 4, 4),
    GemmTile(64, 128, 4, 4),
    GemmTile(64, 64, 4, 3),
)
# Weight-only (W4A16): memory-bound at small M, narrow M tiles, wide N.
GPU_WO_GEMM_TILES: tuple[GemmTile, ...] = (
    GemmTile(16, 64, 4, 4),
    GemmTile(16, 128, 4, 4),
    GemmTile(32, 128, 4, 4),
    GemmTile(64, 128, 4, 3),
    GemmTile(128, 128, 8, 3),
)
GPU_ROW_TILES: tuple[RowTile, ...] = (
    RowTile(16, 4),
    RowTile(32, 4),
    RowTile(32, 8),
    RowTile(64, 8),
)
INTERPRET_GEMM_TILES: tuple[GemmTile, ...] = (GemmTile(32, 32, 4, 1),)
INTERPRET_ROW_TILES: tuple[RowTile, ...] = (RowTile(16, 4, 1),)

# Preferred K tile (logical elements, before packing). Per-group scales cap it at the group.
GPU_BLOCK_K = 128
INTERPRET_BLOCK_K = 64
# Row-kernel K tile: wide tiles amortize the per-tile work on GPU; a multiple of the
# Hadamard block and of the activation group is taken when those are wider.
GPU_ROW_BLOCK_K = 256
INTERPRET_ROW_BLOCK_K = 64
MAX_ROW_BLOCK_K = 1024  # a (16, 1024) fp32 tile is the most a row program holds

# Rotation (Hadamard) block sizes the fused kernel supports (a tl.dot against a B×B tile).
MIN_ROT_BLOCK = 16
MAX_ROT_BLOCK = 256
# A Sylvester Hadamard block above FACTOR_INNER runs factored (a FACTOR_INNER² dot plus
# butterflies); another rotation runs as one dense B×B dot, which above MAX_DENSE_ROT
# overflows shared memory or spills (a dense 128 needed 133-164 KB, a 256 525+ KB).
FACTOR_INNER = 16
MAX_DENSE_ROT = 64


def m_bucket(m: int) -> int:
    """Autotune bucket of a row count: the next power of two, capped at 16384 (beyond that
    the best tile no longer changes). Kernels key on this, not on M, so a new token count
    reuses the tuned config instead of re-benchmarking (which CUDA-graph capture forbids)."""
    return min(1 << max(m - 1, 0).bit_length(), 16384)


def single_config() -> bool:
    """``CLQ_TRITON_SINGLE_CONFIG=1``: compile only each kernel's first (default) tile.
    The GPU test run sets it: correctness does not depend on the tile, and autotuning
    every parametrized test over all tiles costs minutes of compilation."""
    return os.environ.get("CLQ_TRITON_SINGLE_CONFIG", "0") == "1"


def _pick(tiles: tuple, interpret_tiles: tuple, interpret: bool | None) -> tuple:
    interpret = interpreting() if interpret is None else interpret
    if interpret:
        return interpret_tiles
    return tiles[:1] if single_config() else tiles


def int_gemm_tiles(interpret: bool | None = None) -> tuple[GemmTile, ...]:
    return _pick(GPU_INT_GEMM_TILES, INTERPRET_GEMM_TILES, interpret)


def grouped_gemm_tiles(interpret: bool | None = None) -> tuple[GemmTile, ...]:
    return _pick(GPU_GROUPED_GEMM_TILES, INTERPRET_GEMM_TILES, interpret)


def weight_only_tiles(interpret: bool | None = None) -> tuple[GemmTile, ...]:
    return _pick(GPU_WO_GEMM_TILES, INTERPRET_GEMM_TILES, interpret)


def row_tiles(interpret: bool | None = None) -> tuple[RowTile, ...]:
    return _pick(GPU_ROW_TILES, INTERPRET_ROW_TILES, interpret)


def preferred_block_k(interpret: bool | None = None) -> int:
    interpret = interpreting() if interpret is None else interpret
    return INTERPRET_BLOCK_K if interpret else GPU_BLOCK_K


def preferred_row_block_k(interpret: bool | None = None) -> int:
    interpret = interpreting() if interpret is None else interpret
    return INTERPRET_ROW_BLOCK_K if interpret else GPU_ROW_BLOCK_K


def min_gemm_block_k(a_kind: str, w_packed: bool) -> int:
    """Smallest BLOCK_K for a GEMM variant. When either operand is packed int4 the kernel
    issues two dots over de-interleaved halves (BLOCK_K/2 deep each); 8-bit dots need a
    depth of 32 on NVIDIA, float ones 16."""
    depth = 32 if a_kind in ("int4", "int8") else MIN_DOT
    split = a_kind == "int4" or w_packed
    return depth * (2 if split else 1)


def gemm_dots(
    tile: GemmTile, block_k: int, a_kind: str, w_packed: bool
) -> list[tuple[int, int, int]]:
    """(M, N, K) of every tl.dot the GEMM kernel issues for this tile."""
    split = a_kind == "int4" or w_packed
    depth = block_k // 2 if split else block_k
    return [(tile.block_m, tile.block_n, depth)] * (2 if split else 1)


def row_dots(tile: RowTile, block_k: int, rot_block: int) -> list[tuple[int, int, int]]:
    """(M, N, K) of the rotation tl.dot in the row kernel for a Hadamard block: the
    (BLOCK_M, BLOCK_K) tile is viewed as (BLOCK_M*BLOCK_K/D, D) rows and multiplied by a
    D×D tile, D = min(B, FACTOR_INNER) (the rest of a larger block is butterflies)."""
    d = min(rot_block, FACTOR_INNER)
    return [(tile.block_m * block_k // d, d, d)]
