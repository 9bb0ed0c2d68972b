"""The error export_onnx raises when a graph cannot become an ONNX model."""

from __future__ import annotations

from clq_compile.errors import ClqError


class OnnxExportError(ClqError):
    """torch.export or torch.onnx could not lower the graph; ``op`` names the culprit.

    ``op`` is the FX target (e.g. ``aten.some_op.default``) whose capture or translation
    failed, or None when the failure is not tied to one op.
    """

    def __init__(self, message: str, op: str | None = None) -> None:
        super().__init__(message)
        self.op = op
