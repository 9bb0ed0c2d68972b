"""The Plan: per-layer decisions as plain data (printable, serializable, testable)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from clq_compile.spec import QuantSpec


@dataclass(frozen=True)
class PackedWeight:
    """A layer's weight as the graph holds it: int values (two int4 per byte) and float32
    scales, the layout ``torch.ops.clq.quant_linear`` takes."""

    w_q: torch.Tensor
    w_scale: torch.Tensor
    up: torch.Tensor | None = None  # low-rank branch (N, r), in the weight's float dtype
    down: torch.Tensor | None = None  # (r, K)

    @property
    def nbytes(self) -> int:
        return self.w_q.numel() * self.w_q.element_size() + self.w_scale.numel() * 4 + \
            self.lowrank_bytes

    @property
    def lowrank_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.up, self.down) if t is not None)


@dataclass
class TransformPlan:
    """One online input transform, shared by every linear reading the same tensor.

    x ↦ ((x[..., perm] * smooth) · blockdiag(rot)); the inverse is folded into weights.
    ``rot`` is one B×B block repeated along K, or (K/B, B, B), a block of its own for
    each run of B channels (the outlier-aware rotation of ``rotation="adaptive"``).
    """

    perm: torch.Tensor | None = None
    smooth: torch.Tensor | None = None
    rot: torch.Tensor | None = None
    kind: str = "none"  # "hadamard", "random_hadamard", "smooth", ...
    order: str = "none"  # permutation order: "none", "sorted", "zigzag"
    note: str = ""  # e.g. why the Hadamard block differs from the one asked for

    @property
    def block(self) -> int:
        return 0 if self.rot is None else int(self.rot.shape[-1])

    def on(self, device: torch.device | str) -> TransformPlan:
        """This plan with its tensors on ``device`` (plans are built on the CPU from
        calibration statistics; a model on a GPU folds and runs them there)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(self, perm=move(self.perm), smooth=move(self.smooth),
                                   rot=move(self.rot))

    @property
    def is_identity(self) -> bool:
        return self.perm is None and self.smooth is None and self.rot is None

    def describe(self) -> str:
        if self.is_identity:
            return "-"
        parts = [self.kind]
        if self.perm is not None:
            parts.append(f"perm:{self.order}")
        if self.rot is not None:
            parts.append(f"B={self.block}" + (" per-block" if self.rot.dim() == 3 else ""))
        return " ".join(parts)


def timestep_rows(t: torch.Tensor, times: torch.Tensor, a8: torch.Tensor) -> torch.Tensor:
    """(samples, blocks) bool: the policy row of the calibrated timestep nearest each
    sample's timestep (``t``: one per sample, or one for all). Plain tensor ops, so the
    graph carries the choice as data (exported, lowered to ONNX)."""
    t = t.reshape(-1).to(times.dtype)
    return a8[(t.unsqueeze(-1) - times).abs().argmin(dim=-1)]


def a8_eligible(lp: LayerPlan) -> bool:
    """Whether a timestep policy may raise ``lp`` to 8-bit activations: a quantized layer
    with 4-bit integer activations (the widths ``clq::quant_linear``'s ``a8_rows`` picks
    between)."""
    return lp.spec is not None and lp.spec.a_bits == 4 and lp.spec.a_format == "int"


@dataclass
class TimestepPolicy:
    """AdaTSQ's per-timestep, per-block activation precision (option ``timestep_bits``):
    at calibrated timestep ``times[i]``, the 4-bit-activation layers of block
    ``blocks[j]`` quantize activations to 8 bits where ``a8[i, j]``. At run time a call
    takes the row of the calibrated timestep nearest its own (graph input ``input``)."""

    input: str  # the placeholder holding the timestep
    times: torch.Tensor  # (T,) float32
    blocks: list[int]
    a8: torch.Tensor  # (T, len(blocks)) bool

    def column(self, lp: LayerPlan) -> int | None:
        """The policy's column for ``lp``, or None when the policy leaves it alone."""
        if not a8_eligible(lp) or lp.block not in self.blocks:
            return None
        return self.blocks.index(lp.block)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_rows(t, self.times, self.a8)


@dataclass
class LayerPlan:
    name: str
    role: str
    block: int | None
    in_features: int
    out_features: int
    group: int
    spec: QuantSpec | None  # None: stays in full precision
    skip_reason: str = ""
    w_clip: float = 1.0
    a_clip: float = 1.0
    outlier_score: float | None = None  # max over calibration tokens of max_j |x_j|
    target: str = ""  # CLPS target layer
    err_before: float | None = None  # CLPS target error at clip (1, 1)
    err_after: float | None = None  # CLPS target error at the chosen clips
    sqnr_db: float | None = None  # this layer's output SQNR on the calibration data
    rounding: str = "rtn"  # how the weight integers were chosen: "rtn", "gptq"
    rank: int = 0  # low-rank float branch beside the quantized residual (0: none)
    notes: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.spec is not None


@dataclass
class Plan:
    recipe: str
    spec: QuantSpec
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    transforms: dict[int, TransformPlan] = field(default_factory=dict)  # by group id
    meta: dict[str, Any] = field(default_factory=dict)  # timings, calibration counts
    # Weights solved against calibration data (GPTQ), by layer name; a layer absent here
    # is rounded to nearest from its float weight when the graph is built.
    weights: dict[str, PackedWeight] = field(default_factory=dict)
    # DAC biases (float32, one per channel), each added after the norm that follows the
    # attention-output layer it is keyed by (option ``dac``, clq_compile.dac).
    dac: dict[str, torch.Tensor] = field(default_factory=dict)
    timesteps: TimestepPolicy | None = None  # option ``timestep_bits`` (clq_compile.timestep_bits)

    def quantized_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers.values() if lp.quantized]

    def transform_of(self, layer: LayerPlan) -> TransformPlan | None:
        tp = self.transforms.get(layer.group)
        return None if tp is None or tp.is_identity else tp

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary; tensors are reduced to their shapes."""

        def plain(obj: Any) -> Any:
            if isinstance(obj, torch.Tensor):
                return {"tensor": list(obj.shape)}
            if dataclasses.is_dataclass(obj):
                d = {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
                return d
            if isinstance(obj, dict):
                return {str(k): plain(v) for k, v in obj.items()}
            if isinstance(obj, list | tuple):
                return [plain(v) for v in obj]
            return obj

        return plain(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    # -- exact round trip (save/load): JSON for the data, tensors kept apart ------------
    def to_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        transforms = {}
        for g, tp in self.transforms.items():
            d = {"kind": tp.kind, "order": tp.order, "note": tp.note}
            for k in ("perm", "smooth", "rot"):
                t = getattr(tp, k)
                if t is not None:
                    tensors[f"plan.t{g}.{k}"] = t.detach().contiguous()
                d[k] = t is not None
            transforms[str(g)] = d
        layers = {}
        for name, lp in self.layers.items():
            d = {f.name: getattr(lp, f.name) for f in dataclasses.fields(lp)}
            d["spec"] = None if lp.spec is None else dataclasses.asdict(lp.spec)
            layers[name] = d
        for name, pw in self.weights.items():
            for k in ("w_q", "w_scale", "up", "down"):
                if getattr(pw, k) is not None:
                    tensors[f"plan.w.{name}.{k}"] = getattr(pw, k).contiguous()
        for name, bias in self.dac.items():
            tensors[f"plan.dac.{name}"] = bias.detach().contiguous()
        ts = self.timesteps
        if ts is not None:
            tensors["plan.timesteps.times"] = ts.times.contiguous()
            tensors["plan.timesteps.a8"] = ts.a8.contiguous()
        state = {"recipe": self.recipe, "spec": dataclasses.asdict(self.spec),
                 "layers": layers, "transforms": transforms, "weights": list(self.weights),
                 "dac": list(self.dac),
                 "timesteps": None if ts is None else {"input": ts.input, "blocks": ts.blocks},
                 "meta": json.loads(json.dumps(self.meta, default=str))}
        return state, tensors

    @classmethod
    def from_state(cls, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Plan:
        plan = cls(recipe=state["recipe"], spec=QuantSpec(**state["spec"]),
                   meta=dict(state.get("meta", {})))
        for name, d in state["layers"].items():
            d = dict(d)
            d["spec"] = None if d["spec"] is None else QuantSpec(**d["spec"])
            plan.layers[name] = LayerPlan(**d)
        for g, d in state["transforms"].items():
            plan.transforms[int(g)] = TransformPlan(
                **{k: tensors[f"plan.t{g}.{k}"] if d[k] else None
                   for k in ("perm", "smooth", "rot")},
                kind=d["kind"], order=d["order"], note=d["note"])
        for name in state.get("weights", []):
            plan.weights[name] = PackedWeight(
                *(tensors.get(f"plan.w.{name}.{k}") for k in ("w_q", "w_scale", "up", "down")))
        plan.dac = {name: tensors[f"plan.dac.{name}"] for name in state.get("dac", [])}
        ts = state.get("timesteps")
        if ts is not None:
            plan.timesteps = TimestepPolicy(ts["input"], tensors["plan.timesteps.times"],
                                            list(ts["blocks"]), tensors["plan.timesteps.a8"])
        return plan
