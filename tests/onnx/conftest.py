"""Shared, cached exports: quantizing and exporting a tiny DiT takes seconds, and several
tests look at the same file (checker, node counts, exactness, dynamic batch)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import clq_compile as clq
from clq_compile.lowering.onnx import export_onnx
from clq_compile.testing import TINY_MODELS

logging.getLogger("onnx_ir").setLevel(logging.WARNING)
logging.getLogger("onnxscript").setLevel(logging.WARNING)


@dataclass
class Case:
    """A quantized tiny model, its float original, its input factory and its ONNX file."""

    arch: str
    bits: str
    target: str
    qm: Any
    model: torch.nn.Module
    inputs: Callable[..., dict[str, Any]]
    path: Path


@pytest.fixture(scope="session")
def export_case(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Case]:
    """``export_case(arch, bits, target, **options)``: quantized (RTN unless ``recipe=``
    says otherwise, calibrated and exported at batch 2) once per session."""
    root = tmp_path_factory.mktemp("onnx")
    quantized: dict[tuple, tuple] = {}
    cases: dict[tuple, Case] = {}

    def get(arch: str, bits: str = "w4a4", target: str = "qdq", **options: Any) -> Case:
        qkey = (arch, bits, tuple(sorted(options.items())))
        if qkey not in quantized:
            model, inputs = TINY_MODELS[arch](batch=2)
            opts = {"recipe": "rtn", **options}
            qm = clq.quantize(model, [inputs(0), inputs(1)], bits=bits, measure=False,
                              extra_shapes=None, **opts)
            quantized[qkey] = (qm, model, inputs)
        key = (*qkey, target)
        if key not in cases:
            qm, model, inputs = quantized[qkey]
            tag = "_".join([arch, bits, target, *(f"{k}{v}" for k, v in sorted(options.items()))])
            path = export_onnx(qm, root / f"{tag}.onnx", target=target)
            cases[key] = Case(arch, bits, target, qm, model, inputs, path)
        return cases[key]

    return get
