"""Hand-written modules holding clq ops the way the rewrite pass leaves them, for tests
that need one layer in isolation (and a stand-in for what export_onnx reads from a
QuantizedModel)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from clq_compile.capture import capture, export_program
from clq_compile.hadamard import hadamard
from clq_compile.quant import quantize_weight
from clq_compile.signature import params_of
from clq_compile.twinlog import twinlog_weight


class QLinear(torch.nn.Module):
    """transform (optional) → quant_linear, with buffers as the rewrite pass makes them."""

    def __init__(self, k: int, n: int, w_bits: int, a_bits: int, w_group: int = 0,
                 a_group: int = 0, a_clip: float = 1.0, rot_block: int = 0,
                 seed: int = 0, a_format: str = "int", w_format: str = "int") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g)
        w_q, w_scale = twinlog_weight(w) if w_format == "twinlog" else \
            quantize_weight(w, w_bits, w_group)
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", torch.randn(n, generator=g))
        self.spec = (w_bits, a_bits, a_group, a_clip)
        formats = {"a_format": a_format, "w_format": w_format}
        self.format = {k: v for k, v in formats.items() if v != "int"}
        self.rotate = rot_block > 0
        if self.rotate:
            self.register_buffer("perm", torch.randperm(k, generator=g))
            self.register_buffer("smooth", torch.rand(k, generator=g) + 0.5)
            self.register_buffer("rot", hadamard(rot_block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotate:
            x = torch.ops.clq.transform(x, self.perm, self.smooth, self.rot)
        return torch.ops.clq.quant_linear(x, self.w_q, self.w_scale, self.bias, *self.spec,
                                          **self.format)


def as_qm(module: torch.nn.Module, x: torch.Tensor) -> SimpleNamespace:
    """What export_onnx reads from a QuantizedModel, for a hand-written module."""
    params = params_of(module.forward)
    c = capture(module, params, {params[0].name: x})
    return SimpleNamespace(
        graph_module=c.gm, call_spec=c.call_spec,
        exported_program=lambda: export_program(c.gm, c.example, c.dynamic_shapes))
