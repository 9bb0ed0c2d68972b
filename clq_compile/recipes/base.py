"""What every recipe config shares: options (validated where they enter) and the spec
they turn ``bits`` into."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from clq_compile.annotations import linear_info
from clq_compile.budget import BUDGET_BITS
from clq_compile.errors import ConfigError
from clq_compile.fisher import HESSIANS
from clq_compile.lowrank import check_rank
from clq_compile.options import (
    boolean,
    choice,
    group_size,
    integer,
    names,
    option,
    optional,
    real,
    validate_fields,
)
from clq_compile.passes.find_linears import weight_tensor
from clq_compile.passes.roles import ROLES
from clq_compile.runner import PlanContext
from clq_compile.spec import A_FORMATS, LZS_GROUPS, QuantSpec, parse_bits

__all__ = ["PlanContext", "RecipeConfig"]


@dataclass(frozen=True)
class RecipeConfig:
    """Options every recipe takes. ``w_group``/``a_group``: None = as ``bits`` says,
    0 = per channel / per token, else a group size along K."""

    name: ClassVar[str] = ""
    w_group: int | None = option(None, group_size)
    a_group: int | None = option(None, group_size)
    skip_roles: tuple[str, ...] = option(("embed", "modulation", "final"), names(ROLES))
    window: int = option(3, integer(0))  # blocks downstream that cross-layer chains cover
    # Weight rounding after the recipe's plan: "rtn" (nearest) or "gptq" (error-
    # compensating, from each layer's calibration Hessian; ``damp`` is its dampening as a
    # fraction of the mean diagonal, ``act_order`` rounds the busiest inputs first).
    # "twinlog": LRQ-DiT's twin-log codes (4-bit, a table per output row; clq_compile.twinlog).
    weights: str = option("rtn", choice("rtn", "gptq", "twinlog"))
    damp: float = option(0.01, real(0.0, 1.0, lo_open=True))
    act_order: bool = option(True, boolean)
    # GPTQ's Hessian: the plain sum over calibration calls, or AdaTSQ's per-layer sum
    # weighted by each call's Fisher sensitivity (clq_compile.fisher).
    hessian: str = option("uniform", choice(*HESSIANS))
    # A rank-``lowrank`` 16-bit branch beside each quantized weight (SVDQuant's form);
    # one that outweighs a layer's packed weight is refused (``check_layers``).
    lowrank: int = option(0, integer(0))
    # Mixed precision: promote the most sensitive layers to ``budget_bits`` ("fp": full
    # precision) while they hold at most a ``budget`` fraction of the quantized weights.
    # "auto": the cheapest step up (a4 -> a8 at the same weights, which costs no bytes;
    # w4a8 -> w8a8; weight-only or w8a8 -> fp).
    budget: float = option(0.0, real(0.0, 1.0))
    budget_bits: str = option("auto", choice("auto", *BUDGET_BITS))
    # How activations are coded (``A_FORMATS``): "lzs" is QuaRTZ's leading-zero
    # suppression, 4-bit codes with a shift per ``a_group`` (default 16) along K.
    activations: str = option("int", choice(*A_FORMATS))
    # D²Quant's deviation-aware correction: a bias after each norm that follows an
    # attention block, the mean FP-minus-quantized shift there (clq_compile.dac).
    dac: bool = option(False, boolean)
    # D²Quant's dual-scale quantizer on MLP down-projections: a per-input-channel weight
    # scale, exact as a factor of the input transform's smooth (clq_compile.dsq).
    # ``dsq_iters`` alternating rounds (the error still fell at 32 on the shapes DiT).
    dsq: bool = option(False, boolean)
    dsq_iters: int = option(32, integer(1))
    # AdaTSQ's timestep-aware precision: an average activation bit-width in [4, 8]; per
    # calibrated timestep and block, 4- or 8-bit activations (clq_compile.timestep_bits).
    timestep_bits: float | None = option(None, optional(real(4.0, 8.0)))
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.hessian != "uniform" and self.weights != "gptq":
            raise ConfigError(
                f"option hessian={self.hessian!r} weights GPTQ's Hessian; it needs "
                f"weights='gptq', got weights={self.weights!r}")

    def check_layers(self, ctx: PlanContext) -> None:
        """The checks that need the analyzed graph's layers, run before planning: a
        ``lowrank`` branch must not outweigh a quantized layer's packed weight."""
        if not self.lowrank:
            return
        infos = [linear_info(node) for node in ctx.nodes.values()]
        shapes = {i.name: (i.in_features, i.out_features) for i in infos if not i.skip_reason}
        if shapes:
            dtype = weight_tensor(ctx.gm, ctx.nodes[next(iter(shapes))], load=False).dtype
            check_rank(self.lowrank, shapes, ctx.spec, dtype)

    @property
    def calibrates(self) -> bool:
        """Whether planning needs calibration data (the recipe's or the rounding's)."""
        return self.needs_calibration or self.weights != "rtn" or self.budget > 0 or \
            self.dac or self.timestep_bits is not None

    def spec_for(self, bits: QuantSpec) -> QuantSpec:
        """``bits`` with this config's group sizes; an activation group with weight-only
        bits is a contradiction, not something to ignore."""
        spec = bits.with_groups(self.w_group, self.a_group)
        if self.activations == "lzs":
            spec = self._lzs_spec(spec)
        if self.weights == "twinlog":
            if spec.w_bits != 4 or spec.w_group:
                raise ConfigError(
                    f"option weights='twinlog' codes each weight row in 4 bits through its "
                    f"own table: it needs 4-bit weights per row, got bits={spec.name!r} "
                    f"with w_group={spec.w_group} (drop w_group, or use weights='rtn')")
            if self.dsq:
                raise ConfigError(
                    "option dsq=True fits input-channel scales to integer weight rounding; "
                    "weights='twinlog' codes weights on its own grid: use one of them")
            spec = dataclasses.replace(spec, w_format="twinlog")
        if self.timestep_bits is not None and (spec.a_bits != 4 or spec.a_format != "int"):
            raise ConfigError(
                f"option timestep_bits={self.timestep_bits} chooses 4- or 8-bit integer "
                f"activations per timestep: it needs bits with 4-bit integer activations "
                f"(e.g. 'w4a4'), got {spec.name!r}")
        if spec.a_bits == 16 and spec.a_group:
            raise ConfigError(
                f"option a_group={spec.a_group} has no effect with weight-only bits "
                f"{spec.name} (activations stay in float): drop it or quantize activations")
        if self.budget and self.budget_bits != "auto":
            to = self.budget_spec(spec)
            higher = to is None or (to.w_bits >= spec.w_bits and to.a_bits >= spec.a_bits
                                    and to.name != spec.name)
            if not higher:
                raise ConfigError(
                    f"option budget_bits={self.budget_bits!r} is not above bits={spec.name!r} "
                    f"(it must raise weight or activation bits and lower neither): use "
                    f"'auto' or one of {[b for b in BUDGET_BITS if b != spec.name]}")
        return spec

    def _lzs_spec(self, spec: QuantSpec) -> QuantSpec:
        if spec.a_bits != 4:
            raise ConfigError(
                f"option activations='lzs' codes activations in 4 bits; bits={spec.name!r} "
                f"has a_bits={spec.a_bits}: use bits='w4a4' (or a QuantSpec with a_bits=4)")
        group = LZS_GROUPS[0] if self.a_group is None else self.a_group
        if group not in LZS_GROUPS:
            raise ConfigError(
                f"option a_group={self.a_group!r} is not allowed with activations='lzs': "
                f"expected one of {list(LZS_GROUPS)} (the shift's group along K)")
        return QuantSpec(spec.w_bits, 4, spec.w_group, group, "lzs")

    def budget_spec(self, spec: QuantSpec) -> QuantSpec | None:
        """What ``budget`` promotes layers of ``spec`` to (None: full precision)."""
        if self.budget_bits == "auto":
            if spec.a_bits == 4:
                return QuantSpec(spec.w_bits, 8, w_format=spec.w_format)
            return parse_bits("w8a8") if (spec.w_bits, spec.a_bits) == (4, 8) else None
        return None if self.budget_bits == "fp" else parse_bits(self.budget_bits)
