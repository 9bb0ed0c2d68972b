"""clq_compile: graph-level W4A4 post-training quantization for diffusion transformers."""

from clq_compile import ops  # noqa: F401 - registers torch.ops.clq.*
from clq_compile.api import quantize
from clq_compile.errors import (
    CalibrationError,
    CaptureError,
    ClqError,
    ConfigError,
    InputError,
    LoadError,
    QuantizationError,
    SaveError,
)
from clq_compile.inspect import inspect
from clq_compile.lowering.onnx import OnnxExportError, export_onnx
from clq_compile.lowering.triton import dispatch as _triton_dispatch
from clq_compile.model import QuantizedModel
from clq_compile.plan import LayerPlan, Plan, TransformPlan
from clq_compile.recipes import available_recipes, register_recipe, resolve_recipe
from clq_compile.record import record_calls
from clq_compile.serialize import load
from clq_compile.spec import QuantSpec, parse_bits

__all__ = [
    "CalibrationError", "CaptureError", "ClqError", "ConfigError", "InputError", "LayerPlan",
    "LoadError", "OnnxExportError", "Plan", "QuantSpec", "QuantizationError", "QuantizedModel",
    "SaveError", "TransformPlan", "available_recipes", "export_onnx", "inspect", "load",
    "parse_bits", "quantize", "record_calls", "register_recipe", "resolve_recipe",
]

# CUDA tensors run the clq ops as Triton kernels; CPU keeps the references.
_triton_dispatch.register()
