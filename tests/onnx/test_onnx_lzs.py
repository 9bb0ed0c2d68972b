"""QuaRTZ's LZS activations (``a_format="lzs"``) in ONNX: the coding is built from float
ops that are each exact on small integers (see ``activation.lzs_fake_quantize``), then the
target's weight-only form multiplies the decoded values.

One layer fed from the graph input sees the same float32 input in ORT and torch, so the
codes must be identical; the inputs sit on rounding ties of the int8 stage (see
``test_onnx_layers.tie_input``), so a division replaced by a reciprocal or another
rounding would show. What remains is the float32 dot product: the outputs may differ by
twice γ·(|x̂|·|Ŵ|ᵀ + |b|), γ = n·u/(1 − n·u), n = K + 3 (Higham §3.1), as for every
other layer. A wrong FLAG moves a value by at least one LZS step, far outside that bound.
"""

from __future__ import annotations

import pytest
import torch

from clq_compile.lowering.onnx import export_onnx, ort_run, ort_session
from clq_compile.lzs import lzs_fake_quantize
from clq_compile.ops import unpack_weight, weight_group
from clq_compile.qlinear import sqnr
from clq_compile.quant import dequantize
from clq_compile.testing import lzs_threshold_row
from tests.onnx.onnx_tiny_layers import QLinear, as_qm
from tests.onnx.test_onnx_layers import float_dot_bound, tie_input


def _bound(module: QLinear, x: torch.Tensor, group: int, clip: float) -> torch.Tensor:
    w = dequantize(unpack_weight(module.w_q, 4), module.w_scale,
                   weight_group(x.shape[-1], module.w_scale))
    return float_dot_bound(lzs_fake_quantize(x.float(), group, clip), w, module.bias)


@pytest.mark.parametrize("target", ["qdq", "ort-cpu"])
@pytest.mark.parametrize(("group", "w_group", "clip"), [(16, 0, 1.0), (32, 64, 0.9)])
def test_lzs_layer_matches_reference_on_ties(tmp_path, target, group, w_group, clip):
    module = QLinear(128, 48, 4, 4, w_group, group, clip, a_format="lzs")
    x = tie_input((2, 5, 128), 8, 0, clip)
    x[0, 0, :group] *= 1e-3  # one group far below its token's absmax: FLAG 0
    path = export_onnx(as_qm(module, x), tmp_path / "lzs.onnx", target=target)
    x3 = tie_input((3, 5, 128), 8, 0, clip, seed=1)  # another batch
    x3[1, 2, group:2 * group] *= 1e-2
    x3[2, 4] = lzs_threshold_row(128, group, clip)
    (got,) = ort_run(ort_session(path), (x3,), {})
    ref = module(x3)
    err = (torch.from_numpy(got).double() - ref.double()).abs()
    assert (err <= _bound(module, x3, group, clip)).all()
    int_codes = QLinear(128, 48, 4, 4, w_group, group, clip)(x3)  # same weights, int4
    assert (int_codes - ref).abs().max() > 100 * err.max()  # the format is visible


def test_lzs_model_exports_and_runs(export_case):
    """A whole tiny PixArt with LZS activations (RTN): ORT against the quantized model.
    Upstream float drift can flip a tie and cascade (test_onnx_models), which measured at
    most ~15 % of the quantization error: the ORT output must sit at least 10 dB closer
    to the quantized model than the quantized model is to the float one."""
    case = export_case("pixart", "w4a4", activations="lzs")
    inputs = case.inputs(7, 2)
    (got,) = ort_run(ort_session(case.path), (), inputs)
    with torch.no_grad():
        ref = case.qm(**inputs)[0]
        fp = case.model(**inputs)[0]
    assert sqnr(ref, torch.from_numpy(got)) > sqnr(fp, ref) + 10.0
