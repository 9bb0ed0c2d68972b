"""FusePrologues' LayerNorm + adaLN rule: what it fuses computes what the graph computed,
bit for bit, at both IR levels (torch.export's aten ops, the torch-level ops a Dynamo
graph holds); what it declines stays in the graph, with the reason logged."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from clq_compile.passes.graph_utils import is_cast, op_name
from clq_compile.passes.prologues import FusePrologues
from clq_compile.passes.rewrite import QUANT_LINEAR
from clq_compile.quant import quantize_weight

K, N = 64, 32


class _Block(torch.nn.Module):
    """norm → ``* (1 + scale) + shift`` → one clq.quant_linear, adaLN as DiT blocks do."""

    def __init__(self, affine: bool = False, extra_reader: bool = False,
                 scale_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        w_q, w_s = quantize_weight(torch.randn(N, K, generator=g), 4)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_s", w_s)
        self.norm = torch.nn.LayerNorm(K, eps=1e-6, elementwise_affine=affine)
        self.extra_reader, self.scale_dtype = extra_reader, scale_dtype

    def forward(self, x, scale, shift):
        h = self.norm(x)
        if self.scale_dtype is not None:
            scale = scale.to(self.scale_dtype)
        y = h * (1 + scale) + shift
        out = torch.ops.clq.quant_linear.default(y, self.w_q, self.w_s, None, 4, 4, 0, 1.0)
        return out + h.sum() if self.extra_reader else out


def _inputs(dtype=torch.float32, per="sample"):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 9, K, generator=g) * 3 + 5).to(dtype)
    mod = (2, 1, K) if per == "sample" else (2, 9, K) if per == "token" else (1, 9, K)
    scale, shift = (torch.randn(mod, generator=g).to(dtype) * 0.3 for _ in range(2))
    return x, scale, shift


class _Inline(fx.Tracer):
    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return False


def _graph(model: torch.nn.Module, inputs: tuple, level: str) -> fx.GraphModule:
    if level == "aten":
        return torch.export.export(model, inputs).module()
    # Modules inlined, as Dynamo inlines them: F.layer_norm, operator.mul / add.
    gm = fx.GraphModule(model, _Inline().trace(model))
    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(*inputs)
    return gm


def _fused(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target == QUANT_LINEAR and
            len(n.args) > 11 and n.args[11] == "layer_norm"]


@pytest.mark.parametrize("level", ["aten", "torch"])
@pytest.mark.parametrize(("dtype", "per"), [(torch.float32, "sample"),
                                            (torch.bfloat16, "sample"),
                                            (torch.float32, "token")])
def test_norm_and_modulation_fuse_bit_exactly(level, dtype, per):
    model = _Block()  # no parameters in the norm: the activation dtype is the inputs'
    inputs = _inputs(dtype, per)
    gm = _graph(model, inputs, level)
    with torch.no_grad():
        before = gm(*inputs)
    result = FusePrologues()(gm)
    assert result.modified
    (q,) = _fused(result.gm)
    assert q.args[0].op == "placeholder"  # reads x itself: norm, mul, add are gone
    assert set(q.kwargs) >= {"pro_mul", "pro_add", "norm_eps"}
    assert q.kwargs["norm_eps"] == 1e-6
    names = {str(n.target) for n in result.gm.graph.nodes}
    assert not any("layer_norm" in t for t in names)
    with torch.no_grad():
        assert torch.equal(result.gm(*inputs), before)


@pytest.mark.parametrize(("model", "per", "reason"), [
    (_Block(affine=True), "sample", "affine"),
    (_Block(extra_reader=True), "sample", "also read elsewhere"),
    (_Block(scale_dtype=torch.bfloat16), "sample", "type promotion"),
    (_Block(), "frame", "one row per sample or token"),
])
def test_declined_matches_stay_and_say_why(model, per, reason, caplog):
    inputs = _inputs(per=per)
    gm = _graph(model, inputs, "aten")
    with torch.no_grad():
        before = gm(*inputs)
    with caplog.at_level(logging.DEBUG, logger="clq_compile.passes.prologues"):
        result = FusePrologues()(gm)
    assert not _fused(result.gm)
    assert reason in caplog.text
    with torch.no_grad():
        assert torch.equal(result.gm(*inputs), before)


def test_norm_without_modulation_fuses_too():
    """A LayerNorm read straight by the quantizer (no adaLN) is the same rule with both
    modulation steps absent."""

    class Plain(_Block):
        def forward(self, x, scale, shift):
            return torch.ops.clq.quant_linear.default(F.layer_norm(x, (K,)), self.w_q,
                                                      self.w_s, None, 4, 4, 0, 1.0)

    inputs = _inputs()
    gm = _graph(Plain(), inputs, "aten")
    before = gm(*inputs)
    result = FusePrologues()(gm)
    (q,) = _fused(result.gm)
    assert "pro_mul" not in q.kwargs and q.kwargs["norm_eps"] == 1e-5
    assert torch.equal(result.gm(*inputs), before)


class _Shared(_Block):
    """One transform read by two quantizers with different clips (as CLPS leaves q/k/v):
    the norm and modulation fuse into the transform, in front of both."""

    def forward(self, x, scale, shift):
        t = torch.ops.clq.transform.default(self.norm(x) * (1 + scale) + shift, None, None,
                                            None)
        return [torch.ops.clq.quant_linear.default(t, self.w_q, self.w_s, None, 4, 4, 0, c)
                for c in (1.0, 0.9)]


class _Fp32Casts(_Block):
    """Wan's spelling: the norm on ``x.float()``, the result ``.type_as(x)``, identities in
    fp32 (export keeps them, each with a dtype assertion)."""

    def forward(self, x, scale, shift):
        y = (self.norm(x.float()).float() * (1 + scale) + shift).type_as(x)
        return torch.ops.clq.quant_linear.default(y, self.w_q, self.w_s, None, 4, 4, 0, 1.0)


@pytest.mark.parametrize("level", ["aten", "torch"])
@pytest.mark.parametrize("model", [_Shared(), _Fp32Casts()], ids=["transform", "casts"])
def test_into_a_shared_transform_and_through_inert_casts(model, level):
    inputs = _inputs()
    gm = _graph(model, inputs, level)
    with torch.no_grad():
        before = gm(*inputs)
    result = FusePrologues()(gm)
    assert result.modified
    fused = [n for n in result.gm.graph.nodes if n.op == "call_function" and
             n.kwargs.get("norm_eps") == 1e-6]
    assert len(fused) == 1
    assert fused[0].target == (torch.ops.clq.transform.default if isinstance(model, _Shared)
                               else QUANT_LINEAR)
    # reads x (or the x.float() in front of the norm): the norm, the casts after it, the
    # mul and the shift's add are gone; the add making the operand 1 + scale stays
    left = [op_name(n) for n in result.gm.graph.nodes if n.op == "call_function"]
    assert not {"layer_norm", "mul", "type_as"} & set(left) and left.count("add") == 1, left
    with torch.no_grad():
        after = result.gm(*inputs)
    for a, b in zip(after if isinstance(after, list) else [after],
                    before if isinstance(before, list) else [before], strict=True):
        assert torch.equal(a, b)


def test_fuse_transforms_leaves_a_transform_holding_a_prologue():
    """A transform that already holds a prologue has no slot for it in its one
    quant_linear (whose own prologue slot follows the transform's): it stays a node."""
    from clq_compile.passes.share_inputs import FuseTransforms

    class One(_Block):
        def forward(self, x, scale, shift):
            t = torch.ops.clq.transform.default(x, None, None, None, "layer_norm",
                                                pro_mul=scale, pro_add=shift)
            return torch.ops.clq.quant_linear.default(t, self.w_q, self.w_s, None, 4, 4, 0, 1.0)

    inputs = _inputs()
    gm = _graph(One(), inputs, "aten")
    before = gm(*inputs)
    result = FuseTransforms()(gm)
    assert not result.modified
    assert torch.equal(result.gm(*inputs), before)


@pytest.mark.parametrize("level", ["aten", "torch"])
def test_a_norm_run_in_fp32_for_a_bf16_model_fuses_in_fp32(level):
    """Wan's FP32LayerNorm in a bf16 model: norm and modulation in fp32 on ``x.float()``,
    then cast to bf16. The fused op reads the bf16 x, computes in fp32 (``pro_fp32``) and
    rounds once, as the graph did: bit for bit; the float32 copy of x is gone too."""
    x, scale, shift = _inputs()
    inputs = (x.bfloat16(), scale, shift)
    gm = _graph(_Fp32Casts(), inputs, level)
    with torch.no_grad():
        before = gm(*inputs)
    result = FusePrologues()(gm)
    (q,) = [n for n in result.gm.graph.nodes if n.target == QUANT_LINEAR]
    assert q.args[11] == "layer_norm" and q.kwargs["pro_fp32"] is True
    assert q.args[0].op == "placeholder"  # the bf16 x, not a float32 copy
    assert not [n for n in result.gm.graph.nodes if is_cast(n)]  # nor is the copy made
    with torch.no_grad():
        after = result.gm(*inputs)
    assert after.dtype == torch.bfloat16 and torch.equal(after, before)
