"""Errors users can catch by name: each says which input, op or option is at fault."""

from __future__ import annotations


class ClqError(Exception):
    """Base class of every error clq_compile raises on purpose."""


class CaptureError(ClqError):
    """torch.export could not capture the model; the message names the op or input."""


class CalibrationError(ClqError):
    """Calibration inputs are empty, non-finite, or do not match the model."""


class ConfigError(ClqError, ValueError):
    """An unknown recipe, bits string, or an option outside its allowed values."""


class QuantizationError(ClqError, ValueError):
    """A tensor cannot be quantized as asked (non-finite values, bad shapes)."""


class InputError(ClqError, ValueError):
    """A quantized model was called with inputs its graph cannot take; the message names
    the input, the size or value it was captured with, and the remedy."""


class SaveError(ClqError, OSError):
    """A quantized model or ONNX file could not be written or read back; names the path."""


class LoadError(ClqError, ValueError):
    """A saved model directory is missing, incomplete, corrupt or from a newer format."""
