"""Int4 byte layout: the kernels must write and read the ONNX INT4 order (element 2i in
the low nibble, 2i+1 in the high nibble, two's complement), per DESIGN.md §4, checked
against ONNX's own packer and against bytes worked out by hand from the spec."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from clq_compile.lowering.triton.act_quant import rotate_quantize
from clq_compile.lowering.triton.qgemm import quant_matmul
from clq_compile.quant import quantize
from tests.triton.helpers import assert_equal


def _onnx_pack(values: torch.Tensor) -> torch.Tensor:
    """Rows of int4 values packed by onnx.helper.make_tensor(INT4) (one row at a time,
    so each row starts on a byte boundary as ours do)."""
    rows = []
    for row in values.tolist():
        t = onnx.helper.make_tensor("t", onnx.TensorProto.INT4, [len(row)], row)
        rows.append(np.asarray(t.int32_data, dtype=np.uint8))
    return torch.from_numpy(np.stack(rows)).view(torch.int8)


def test_act_quant_bytes_match_onnx_packing(device) -> None:
    """Quantize with the kernel; its packed bytes equal ONNX's packing of the reference
    integers."""
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    q_packed, _ = rotate_quantize(x.to(device), None, None, None, 4, 0, 1.0)
    ints = quantize(x, 4, 0).q
    assert_equal(q_packed, _onnx_pack(ints), "packed int4 bytes")


def test_act_quant_hand_packed_bytes(device) -> None:
    """Row absmax 7 gives scale 1, so the integers are the inputs rounded half to even:
    [1, -2, 7, -7, 0, 3, 6.5->6, -0.5->0, 2.5->2, -3.5->-4]. Pairs (low, high) by the spec:
    (1, -2) -> 0x1 | 0xE<<4 = 0xE1 = -31; (7, -7) -> 0x97 = -105; (0, 3) -> 0x30 = 48;
    (6, 0) -> 0x06 = 6; (2, -4) -> 0xC2 = -62; zero padding -> 0."""
    row = [1.0, -2.0, 7.0, -7.0, 0.0, 3.0, 6.5, -0.5, 2.5, -3.5]
    x = torch.tensor([row + [0.0] * 22], device=device)
    q, s = rotate_quantize(x, None, None, None, 4, 0, 1.0)
    assert s.item() == 1.0
    expected = [-31, -105, 48, 6, -62] + [0] * 11
    assert q.cpu().flatten().tolist() == expected


def test_gemm_reads_onnx_packed_weights(device) -> None:
    """ONNX-packed int4 weights through the W4A8 kernel give the same int32 sums as the
    unpacked integers through the W8A8 kernel: the GEMM unpacks nibbles in ONNX order."""
    g = torch.Generator().manual_seed(1)
    n, k, m = 24, 64, 16
    w_int = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    a_int = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    ones_m, ones_n = torch.ones(m, 1, device=device), torch.ones(n, 1, device=device)
    packed = quant_matmul(a_int.to(device), ones_m, _onnx_pack(w_int).to(device), ones_n, None,
                          a_bits=8, w_bits=4, out_dtype=torch.float32, store_acc=True)
    unpacked = quant_matmul(a_int.to(device), ones_m, w_int.to(device), ones_n, None,
                            a_bits=8, w_bits=8, out_dtype=torch.float32, store_acc=True)
    assert_equal(packed, unpacked, "int32 sums from ONNX-packed vs unpacked weights")
    assert_equal(packed, (a_int.int() @ w_int.int().t()), "int32 sums vs exact")
