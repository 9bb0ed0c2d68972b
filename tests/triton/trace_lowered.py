"""What Inductor receives from a lowered graph, checked without a GPU (run by
test_lower_trace.py in a process with ``TRITON_INTERPRET=0``).

Tiny PixArt W4A4 (quarot) through the clq backend, lowered for a given GPU generation,
then traced the way ``torch.compile`` traces it for Inductor (Dynamo + AOTAutograd,
functionalized): the forward graph Inductor would compile is captured and its calls
counted. A user-defined Triton kernel shows as ``triton_kernel_wrapper_functional``;
an opaque custom op would show under its own name. No kernel is launched: CPU tensors
stand in for GPU ones (the device check is bypassed here, and only here), and without a
GPU driver torch assumes each kernel writes all its tensor arguments (a warning), which
changes nothing about which kernels appear. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
from collections import Counter

assert os.environ.get("TRITON_INTERPRET", "0") == "0", "needs the compiled (JIT) kernels"

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402

import clq_compile as clq  # noqa: E402
import clq_compile.backend as be  # noqa: E402
from clq_compile.lowering.triton import dispatch  # noqa: E402
from clq_compile.testing import recording_backend, tiny_pixart  # noqa: E402


class _Captured(Exception):
    pass


def _calls(gm: torch.fx.GraphModule) -> dict[str, int]:
    c: Counter[str] = Counter()
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(n.target):
            fn = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            while hasattr(fn, "fn"):  # Autotuner -> JITFunction -> python function
                fn = fn.fn
            c[f"triton:{fn.__name__}"] += 1
        elif getattr(n.target, "namespace", "") in ("clq", "clq_triton") or \
                "_scaled_mm" in str(n.target):
            c[str(n.target)] += 1
    return dict(c)


def main() -> None:
    dispatch.device_reason = lambda x: ""  # CPU tensors stand in for GPU ones (tracing only)
    model, inputs = tiny_pixart()
    model = model.to(torch.bfloat16)
    x = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
         else v for k, v in inputs(2).items()}
    runs, keep = recording_backend()
    with torch.no_grad():
        torch.compile(model, backend=keep, fullgraph=True, options={
            "recipe": "quarot", "bits": "w4a4", "inductor": False, "kernels": False})(**x)
    run, ex = runs[0]
    report = {"quantized_model": _quantized_model(model, x)}
    for cap in ((8, 0), (9, 0)):
        inner, packers = be.split_packers(run.graph_module)
        flat = [*ex, *(t for p, i in packers for t in p(ex[i]))]
        before = _calls(inner)  # the pass rewrites inner in place
        lowered, convert, lowering = be.lower_inputs(inner, flat, cap)
        report[f"sm_{cap[0]}{cap[1]}"] = {"clq_before": before,
                                           "declined": lowering.declined,
                                           "inductor_sees": _inductor_sees(lowered,
                                                                           convert(flat))}
    print(json.dumps(report))


def _inductor_sees(fn, args=(), kwargs=None) -> dict[str, int]:
    """The calls in the forward graph torch.compile would hand Inductor for ``fn``."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        raise _Captured

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(fn, backend=aot_autograd(fw_compiler=capture),
                          fullgraph=True)(*args, **(kwargs or {}))
    except Exception as e:  # the capture stops compilation on purpose
        if not graphs:
            raise RuntimeError("nothing reached the compiler") from e
    return _calls(graphs[0])


def _quantized_model(model, x) -> dict:
    """``torch.compile(qm)`` of a QuantizedModel lowered for sm_90 (bf16: fp8 route)."""
    qm = clq.quantize(model, [x], recipe="quarot", bits="w4a4")
    declined = qm.lower((9, 0))
    return {"clq_before": _calls(qm.graph_module), "declined": declined,
            "inductor_sees": _inductor_sees(qm, kwargs=x)}


if __name__ == "__main__":
    main()
