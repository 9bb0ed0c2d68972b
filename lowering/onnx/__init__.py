"""ONNX lowering: ``export_onnx`` writes opset-21 models for onnxruntime.

Targets: "qdq" (portable INT4/INT8 Q/DQ, exact) and "ort-cpu" (MatMulInteger /
MatMulNBits forms that ORT's CPU kernels run fast, same arithmetic).
"""

from .errors import OnnxExportError
from .export import TARGETS, export_onnx
from .session import ort_feeds, ort_run, ort_session, session_options

__all__ = [
    "OnnxExportError", "TARGETS", "export_onnx", "ort_feeds", "ort_run", "ort_session",
    "session_options",
]
