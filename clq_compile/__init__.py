"""clq_compile: graph-level W4A4 post-training quantization for diffusion transformers."""

from clq_compile import ops  # noqa: F401 - registers torch.ops.clq.*
from clq_compile.api import QuantizedModel, quantize
from clq_compile.errors import (
    CalibrationError,
    CaptureError,
    ClqError,
    ConfigError,
    QuantizationError,
)
from clq_compile.inspect import inspect
from clq_compile.lowering.onnx import OnnxExportError, export_onnx
from clq_compile.lowering.triton import dispatch as _triton_dispatch
from clq_compile.plan import LayerPlan, Plan, TransformPlan
from clq_compile.recipes import available_recipes, register_recipe, resolve_recipe
from clq_compile.spec import QuantSpec, parse_bits

__all__ = [
    "CalibrationError", "CaptureError", "ClqError", "ConfigError", "LayerPlan", "OnnxExportError",
    "Plan", "QuantSpec", "QuantizationError", "QuantizedModel", "TransformPlan",
    "available_recipes", "export_onnx", "inspect", "parse_bits", "quantize", "register_recipe",
    "resolve_recipe",
]

# CUDA tensors run the clq ops as Triton kernels; CPU keeps the references.
_triton_dispatch.register()
