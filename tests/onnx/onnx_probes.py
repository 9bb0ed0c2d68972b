"""Test helpers: look inside an exported model's activation quantizers and compare them
with the reference, so exactness claims are measured rather than assumed.

An activation quantizer in the ONNX graph is found by its ``QuantizeLinear`` node (LZS:
the ``Round`` of its int8 stage), whose torch.onnx metadata names the
``clq.quant_linear`` FX node it was translated from (and through it the weight buffer,
which identifies the layer in ``qm.graph_module``). A layer may hold several: per-sample
bits (``a8_rows``) quantize to 8 bits and to ``a_bits`` and pick rows with a Where.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from clq_compile.lowering.onnx import ort_feeds, ort_session
from clq_compile.lzs import lzs_decode, lzs_encode
from clq_compile.ops import (
    apply_prologue,
    quant_linear_reference,
    sample_mask,
    transform_reference,
)
from clq_compile.quant import quantize_with_scale, symmetric_scale

QUANT_LINEAR = torch.ops.clq.quant_linear.default
_FX_ARGS = re.compile(r"clq\.quant_linear\.default\]\(args = \(%(\w+), %(\w+),")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def quant_linears(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.target is QUANT_LINEAR]


def act_key(node: fx.Node) -> tuple[Any, ...]:
    """Layers with the same input, input transform and activation spec share one run-time
    quantizer."""
    return (node.args[0], *node.args[5:8], *node.args[8:])


def _arguments(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """A ``clq::quant_linear`` call's arguments (or an FX node's) by name, defaults filled
    in."""
    call = inspect.signature(quant_linear_reference).bind(*args, **kwargs)
    call.apply_defaults()
    return dict(call.arguments)


class Spec(NamedTuple):
    """One run-time quantizer: integer codes of ``bits`` per ``group`` (0: per token) at
    ``clip``; ``lzs``: QuaRTZ's int8 stage (codes clamped to ±127; the FLAG stage per
    ``a_group`` follows it)."""

    bits: int
    group: int
    clip: float
    lzs: bool = False


def quantizer_specs(a: dict[str, Any]) -> list[Spec]:
    """The run-time quantizers of a quant_linear call with arguments ``a``, in the order
    ``forced_activation`` takes their codes."""
    if a["a_format"] == "lzs":
        return [Spec(8, 0, a["a_clip"], lzs=True)]
    if a["a_bits"] >= 16:
        return []
    spec = Spec(a["a_bits"], a["a_group"], a["a_clip"])
    return [spec] if a["a8_rows"] is None else [Spec(8, a["a_group"], 1.0), spec]


def forced_activation(a: dict[str, Any], x: torch.Tensor,
                      codes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The activation the product sees, built the reference's way from given integer
    ``codes`` and scales (one pair per ``quantizer_specs(a)``): q·s, LZS's FLAG stage on
    the int8 codes, or per-sample rows picked by ``a8_rows``."""
    if a["a_format"] == "lzs":
        (c, s), group = codes[0], a["a_group"]
        return lzs_decode(*lzs_encode(c.to(torch.int8), group), group).float() * s
    deq = [c.float() * s for c, s in codes]
    if a["a8_rows"] is not None:
        return torch.where(sample_mask(a["a8_rows"], x), deq[0], deq[1])
    return deq[0]


@dataclass(frozen=True)
class ActProbe:
    """One activation quantizer: ONNX value names of its input, scale and codes."""

    layer: fx.Node  # a quant_linear node of qm.graph_module using this quantizer
    x: str
    scale: str
    codes: str
    carrier: str  # "u8": uint8 q + 128 ("ort-cpu"); "dq": dequantized q·s; "int": q
    spec: Spec

    @property
    def key(self) -> tuple[Any, ...]:
        return (act_key(self.layer), self.spec)


def _layer_by_placeholder(gm: fx.GraphModule) -> dict[str, fx.Node]:
    out = {}
    for n in quant_linears(gm):
        w = n.args[1]
        out["b_" + str(w.target).replace(".", "_")] = n
    return out


def activation_probes(gm: fx.GraphModule, model: ir.Model) -> list[ActProbe]:
    layers = _layer_by_placeholder(gm)
    probes = []
    for node in model.graph:
        if node.op_type not in ("QuantizeLinear", "Round"):
            continue
        m = _FX_ARGS.search(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
        if m is None:
            continue
        layer = layers[m.group(2)]
        specs = quantizer_specs(_arguments(*layer.args, **layer.kwargs))
        probe = _lzs_probe if node.op_type == "Round" else _int_probe
        probes.append(probe(node, layer, specs))
    return probes


def _int_probe(node: ir.Node, layer: fx.Node, specs: list[Spec]) -> ActProbe:
    """A QuantizeLinear: signed codes dequantized by the DequantizeLinear after it (of a
    layer's quantizers, the one of the Q's width: per-sample bits have 8 and ``a_bits``),
    or uint8 q + 128, clipped to the layer's bits below 8 ("ort-cpu")."""
    out = node.outputs[0]
    unsigned = len(node.inputs) > 2 and node.inputs[2] is not None
    consumers = [c for c in out.consumers()
                 if c.op_type == ("Clip" if unsigned else "DequantizeLinear")]
    codes = consumers[0].outputs[0] if consumers else out
    if unsigned:
        spec = specs[-1]
    else:
        bits = 4 if node.attributes["output_dtype"].as_int() == ir.DataType.INT4 else 8
        (spec,) = [s for s in specs if s.bits == bits]
    return ActProbe(layer, node.inputs[0].name, node.inputs[1].name, codes.name,
                    "u8" if unsigned else "dq", spec)


def _lzs_probe(node: ir.Node, layer: fx.Node, specs: list[Spec]) -> ActProbe:
    """LZS's int8 stage: Clip(Round(Div(x, s)), ±127), the codes as floats."""
    div = node.inputs[0].producer()
    (clip,) = node.outputs[0].consumers()
    (spec,) = specs
    return ActProbe(layer, div.inputs[0].name, div.inputs[1].name, clip.outputs[0].name,
                    "int", spec)


def probed_session(path: Path, probes: list[ActProbe]) -> Any:
    """An ORT session on a copy of the model that also outputs every probed value."""
    model = ir.load(path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    for p in probes:
        for name in (p.x, p.scale, p.codes):
            v = values[name]
            if v not in model.graph.outputs:
                model.graph.outputs.append(v)
    probed = path.with_name(path.stem + "_probed.onnx")
    ir.save(model, probed)
    return ort_session(probed)


def _expand(scale: torch.Tensor, k: int) -> torch.Tensor:
    return scale.repeat_interleave(k // scale.shape[-1], dim=-1)


def ort_codes(p: ActProbe, got: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes, their scale expanded to the codes' shape) ORT computed for ``p``."""
    x = torch.from_numpy(got[p.x])
    s = _expand(torch.from_numpy(got[p.scale]).float(), x.shape[-1])
    c = torch.from_numpy(got[p.codes])
    if p.carrier == "u8":
        return c.long() - 128, s
    if p.carrier == "dq":
        return torch.round(c / s).long(), s
    return c.long(), s


def hooked(gm: fx.GraphModule, hook: Callable[..., torch.Tensor]) -> fx.GraphModule:
    """A view of ``gm`` (same buffers, same call signature) whose quant_linear calls go to
    ``hook(original_node, *args)``."""
    graph = copy.deepcopy(gm.graph)
    originals = {n.name: n for n in gm.graph.nodes}
    for n in graph.nodes:
        if n.target is QUANT_LINEAR:
            n.target = _bind(hook, originals[n.name])
    return fx.GraphModule(gm, graph)


def _bind(hook: Callable[..., torch.Tensor], node: fx.Node) -> Callable[..., torch.Tensor]:
    def call(*args: Any, **kwargs: Any) -> torch.Tensor:
        return hook(node, *args, **kwargs)

    call.__name__ = f"probe_{node.name}"
    return call


@dataclass
class FlipReport:
    """How ORT's activation codes differ from the reference's.

    "Local" compares each quantizer with the reference quantizer fed the input the
    teacher-forced reference computed for that layer (i.e. given the same upstream codes
    as ORT): only float32 rounding separates the two inputs, so a local flip must sit on
    a rounding tie. "Cascade" compares with the plain reference run: once one tie has
    flipped, downstream inputs differ by a quantization step's consequences, and later
    layers then disagree far from ties; that is the network's sensitivity, not a
    lowering error, and is only reported.
    """

    total: int  # quantized activation values compared
    flipped: int  # local flips
    max_code_step: int  # largest local |code difference| (a tie flip is 1)
    max_tie_distance: float  # local flips' distance from a rounding tie, in code units
    cascade_flipped: int  # codes differing from the plain (unforced) reference run

    @property
    def fraction(self) -> float:
        return self.flipped / max(self.total, 1)


def _codes_and_ties(x: torch.Tensor, spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference codes of x, and each value's distance from a rounding tie."""
    s = symmetric_scale(x, spec.bits, spec.group, spec.clip)
    r = x / _expand(s, x.shape[-1])
    codes = quantize_with_scale(x, s, spec.bits, spec.group).long()
    if spec.lzs:
        codes = codes.clamp(-127, 127)
    return codes, ((r - r.floor()) - 0.5).abs()


def _first_inputs(qm: Any, args: tuple, kwargs: dict,
                  forced: dict[tuple, tuple[torch.Tensor, torch.Tensor]] | None
                  ) -> tuple[dict, Any]:
    """Run the reference (teacher-forced with ORT's activation codes and scales when
    ``forced`` is given); return each activation quantizer's input and the outputs."""
    seen: dict[tuple, torch.Tensor] = {}

    def hook(node: fx.Node, *call: Any, **kw: Any) -> torch.Tensor:
        a = _arguments(*call, **kw)
        # the quantizer's input: after the prologue and transform the op may hold
        x = apply_prologue(a["x"], a["prologue"], a["pro_mul"], a["pro_add"], a["norm_eps"],
                           a["pro_fp32"])
        x = transform_reference(x, a["perm"], a["smooth"], a["rot"])
        keys = [(act_key(node), spec) for spec in quantizer_specs(a)]
        for key in keys:
            seen.setdefault(key, x.detach().float())
        if forced is None or not keys:
            return quant_linear_reference(**a)
        xq = forced_activation(a, x, [forced[k] for k in keys]).to(x.dtype)
        return quant_linear_reference(xq, a["w_q"], a["w_scale"], a["bias"], a["w_bits"], 16,
                                      0, 1.0, w_format=a["w_format"])

    call, _ = qm.call_spec.normalize(args, kwargs)  # the graph takes the keyword layout
    with torch.no_grad():
        out = hooked(qm.graph_module, hook)(**call)
    return seen, out


def compare_activations(
    qm: Any, session: Any, probes: list[ActProbe], args: tuple, kwargs: dict
) -> tuple[list[np.ndarray], FlipReport, torch.Tensor]:
    """Run ORT (probed) and the reference; return ORT's outputs, the flip report, and
    the reference's first output evaluated on ORT's own activation codes ("teacher
    forced"): with the forced codes the reference and ORT follow the same trajectory, so
    their difference is float32 rounding alone, even where a tie flipped a code. What the
    reference builds from the codes (q·s, LZS's FLAG stage, the rows ``a8_rows`` picks)
    it builds itself, so a file that builds it otherwise fails the forced comparison.
    """
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, ort_feeds(session, args, kwargs)), strict=True))
    probe_names = {n for p in probes for n in (p.x, p.scale, p.codes)}
    outputs = [got[n] for n in names if n not in probe_names]
    ort = {p.key: ort_codes(p, got) for p in probes}
    plain, _ = _first_inputs(qm, args, kwargs, None)
    local, forced_out = _first_inputs(qm, args, kwargs, ort)
    total = flipped = step = cascade = 0
    tie = 0.0
    for key, (codes, _) in ort.items():
        ref_codes, dist = _codes_and_ties(local[key], key[1])
        diff = (codes - ref_codes).abs()
        total += diff.numel()
        flipped += int((diff > 0).sum())
        step = max(step, int(diff.max()))
        if diff.any():
            tie = max(tie, float(dist[diff > 0].max()))
        cascade += int((codes != _codes_and_ties(plain[key], key[1])[0]).sum())
    report = FlipReport(total, flipped, step, tie, cascade)
    return outputs, report, pytree.tree_leaves(forced_out)[0]


FP32_TOL = 1e-5  # justified in test_onnx_models' docstring
# The quantization error (qm vs float model) must dwarf FP32_TOL, or a lowering that did
# not quantize at all could pass. W8A8 on SD3/Flux is ~60 dB (rel. error ~9e-4), so the
# margin asked is 30x rather than 100x; any margin above 1x already catches that case.
TEETH = 30
MAX_FLIP_FRACTION = 1e-3
TIE_DISTANCE = 1e-3
RUN_BATCH = 3  # cases are exported at batch 2: this exercises the dynamic batch dim


def assert_exact(case: Any, batch: int = RUN_BATCH, seed: int = 7) -> dict[str, float]:
    """ORT output of ``case`` vs its QuantizedModel: local flips are rare tie flips, and
    the teacher-forced reference matches to float32 rounding. Returns the measurements."""
    return assert_exact_calls(case, [seed], batch)[0]


def assert_exact_calls(case: Any, seeds: Sequence[int], batch: int = RUN_BATCH
                       ) -> list[dict[str, float]]:
    """:func:`assert_exact` on the calls ``case.inputs(seed, b=batch)``, one probed ORT
    session for all of them (tie flips are rare: catching one takes many calls)."""
    return assert_exact_inputs(case, [case.inputs(seed, b=batch) for seed in seeds])


def assert_exact_inputs(case: Any, calls: Sequence[dict[str, Any]]
                        ) -> list[dict[str, float]]:
    """:func:`assert_exact` on the given calls (forward keyword arguments)."""
    probes = activation_probes(case.qm.graph_module, ir.load(case.path))
    session = probed_session(case.path, probes)
    return [_assert_call(case, session, probes, kwargs) for kwargs in calls]


def _assert_call(case: Any, session: Any, probes: list[ActProbe], kwargs: dict
                 ) -> dict[str, float]:
    outputs, flips, forced = compare_activations(case.qm, session, probes, (), kwargs)
    got = torch.from_numpy(outputs[0])
    with torch.no_grad():
        ref = pytree.tree_leaves(case.qm(**kwargs))[0]
        fp = pytree.tree_leaves(case.model(**kwargs))[0]
    assert got.shape == ref.shape
    assert rel_err(ref, fp) > TEETH * FP32_TOL, "quantization invisible: the test has no teeth"
    assert rel_err(got, forced) <= FP32_TOL
    assert flips.fraction <= MAX_FLIP_FRACTION
    assert flips.max_code_step <= 1
    assert flips.max_tie_distance <= TIE_DISTANCE
    if not flips.flipped and not flips.cascade_flipped:
        assert rel_err(got, ref) <= FP32_TOL
    return dict(forced=rel_err(got, forced), unforced=rel_err(got, ref), flips=flips.flipped,
                flip_fraction=flips.fraction, tie_distance=flips.max_tie_distance,
                cascade_flips=flips.cascade_flipped, quant_err=rel_err(ref, fp))
