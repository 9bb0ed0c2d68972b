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
from clq_compile.quant import dequantize
from clq_compile.testing import lzs_threshold_row
from tests.onnx.onnx_probes import assert_exact_calls
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
    """A whole tiny PixArt with LZS activations (RTN): ORT against the quantized model,
    by ``onnx_probes.assert_exact`` (the derivation is in test_onnx_models' docstring):
    each layer's int8 stage (Clip(Round(x / s))) may differ from the reference's only by
    ±1 at a rounding tie, and the reference run on ORT's own int8 codes and scales (its
    own FLAG stage on them) matches ORT to float32 rounding, FP32_TOL. Upstream float
    drift, which differs with each CPU's kernels, can flip such a tie and cascade: an
    int4-sized step that moves the plain output by as much as the quantization noise,
    so no fixed SQNR floor on it holds on every CPU. Calls 7-12 at batch 3: on an AVX2
    CPU calls 11 and 12 each flip one tie (call 12's cascades into 700 codes), which the
    check must accept."""
    assert_exact_calls(export_case("pixart", "w4a4", activations="lzs"), range(7, 13))
