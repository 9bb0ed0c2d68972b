"""export_onnx fails loudly and by name: an untranslatable op, a bad target or opset."""

from __future__ import annotations

import pytest
import torch

from clq_compile.errors import ClqError, ConfigError
from clq_compile.lowering.onnx import OnnxExportError, export_onnx
from tests.onnx.onnx_tiny_layers import QLinear, as_qm


@torch.library.custom_op("clq_onnx_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """An op with no ONNX translation anywhere."""
    return x * 2


@mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class WithMystery(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = QLinear(64, 16, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.clq_onnx_test.mystery(self.inner(x))


def test_untranslatable_op_is_named(tmp_path):
    with pytest.raises(OnnxExportError) as info:
        export_onnx(as_qm(WithMystery(), torch.randn(2, 3, 64)), tmp_path / "m.onnx")
    assert isinstance(info.value, ClqError)
    assert info.value.op is not None and "clq_onnx_test.mystery" in info.value.op
    assert "clq_onnx_test.mystery" in str(info.value)


def test_unknown_target_and_old_opset_are_config_errors(tmp_path):
    qm = as_qm(QLinear(64, 16, 4, 4), torch.randn(2, 3, 64))
    with pytest.raises(ConfigError, match="target"):
        export_onnx(qm, tmp_path / "a.onnx", target="tensorrt")
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(qm, tmp_path / "b.onnx", opset=18)
