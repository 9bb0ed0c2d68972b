"""LRQ-DiT's twin-log weights (``w_format="twinlog"``) in ONNX: the codes stay 4-bit in
the file (UINT4, (K, N)), widen exactly (DequantizeLinear, scale 1) and index each row's
table (``GatherElements``), so the weight ORT multiplies is the reference's value for
value. Both targets take the float Q/DQ form for these layers (no integer GEMM takes a
table). The activation codes are exact as in test_onnx_layers (the same ops on the same
input, tie inputs); what remains is the float32 dot product, bounded as there."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from clq_compile.lowering.onnx import export_onnx, ort_run, ort_session
from clq_compile.lzs import lzs_fake_quantize
from clq_compile.quant import fake_quantize
from clq_compile.twinlog import twinlog_values
from tests.onnx.onnx_tiny_layers import QLinear, as_qm
from tests.onnx.test_onnx_layers import float_dot_bound, tie_input


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
@pytest.mark.parametrize("a_format", ["int", "lzs"])
def test_twinlog_layer_matches_reference(tmp_path, target, a_format):
    group = 16 if a_format == "lzs" else 0
    module = QLinear(128, 48, 4, 4, 0, group, 0.9, a_format=a_format, w_format="twinlog")
    x = tie_input((2, 5, 128), 8 if a_format == "lzs" else 4, 0, 0.9)
    path = export_onnx(as_qm(module, x), tmp_path / "tl.onnx", target=target)
    x3 = tie_input((3, 5, 128), 8 if a_format == "lzs" else 4, 0, 0.9, seed=1)
    (got,) = ort_run(ort_session(path), (x3,), {})
    ref = module(x3)
    w = twinlog_values(module.w_q, module.w_scale)
    xq = lzs_fake_quantize(x3, 16, 0.9) if a_format == "lzs" else fake_quantize(x3, 4, 0, 0.9)
    bound = float_dot_bound(xq, w, module.bias)
    assert ((torch.from_numpy(got).double() - ref.double()).abs() <= bound).all()
    consts = [v.const_value for v in ir.load(path).graph.initializers.values()]
    codes = [c for c in consts if c.dtype == ir.DataType.UINT4]
    assert len(codes) == 1 and tuple(codes[0].shape) == (128, 48)
    stored = codes[0].numpy().astype(np.int64).T
    assert np.array_equal(np.take_along_axis(module.w_scale.numpy(), stored, axis=1),
                          w.numpy())  # the file's codes index the reference values
