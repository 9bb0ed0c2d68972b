"""Quantization specs: what bits and granularity a weight / activation gets."""

from __future__ import annotations

from dataclasses import dataclass

from clq_compile.errors import ConfigError
from clq_compile.lzs import GROUPS as LZS_GROUPS

BITS_CHOICES = (4, 8, 16)
# How quantized activations are coded. "int": symmetric integers of ``a_bits``. "lzs":
# QuaRTZ's leading-zero suppression (clq_compile.lzs): int8 per token, then 4-bit codes
# with a power-of-two shift per K-group of ``a_group`` (16 or 32) values.
A_FORMATS = ("int", "lzs")
# How quantized weights are coded. "int": symmetric integers with per-channel/group
# scales. "twinlog": LRQ-DiT's twin-log codes (clq_compile.twinlog), 4-bit, decoded
# through a per-row table of 16 values.
W_FORMATS = ("int", "twinlog")


@dataclass(frozen=True)
class QuantSpec:
    """Bits and grouping for one linear's weight and activation.

    ``w_group``/``a_group`` of 0 mean per output channel / per token; a positive value is a
    group size along the reduction dimension K. ``a_bits=16`` means activations stay in float
    (weight-only quantization). ``a_format``: see ``A_FORMATS``.
    """

    w_bits: int = 4
    a_bits: int = 4
    w_group: int = 0
    a_group: int = 0
    a_format: str = "int"
    w_format: str = "int"

    def __post_init__(self) -> None:
        if self.w_bits not in (4, 8):
            raise ConfigError(f"w_bits must be 4 or 8, got {self.w_bits}")
        if self.a_bits not in BITS_CHOICES:
            raise ConfigError(f"a_bits must be one of {BITS_CHOICES}, got {self.a_bits}")
        for name in ("w_group", "a_group"):
            g = getattr(self, name)
            if g < 0 or (g and g % 2):
                raise ConfigError(
                    f"{name} must be 0 (per channel/token) or a positive even size, got {g}"
                )
        if self.a_format not in A_FORMATS:
            raise ConfigError(f"a_format must be one of {A_FORMATS}, got {self.a_format!r}")
        if self.w_format not in W_FORMATS:
            raise ConfigError(f"w_format must be one of {W_FORMATS}, got {self.w_format!r}")
        if self.w_format == "twinlog" and (self.w_bits != 4 or self.w_group):
            raise ConfigError(
                "w_format='twinlog' codes each weight row in 4 bits through its own table: "
                f"needs w_bits=4 and w_group=0, got w_bits={self.w_bits}, "
                f"w_group={self.w_group}")
        if self.a_format == "lzs" and (self.a_bits != 4 or self.a_group not in LZS_GROUPS):
            raise ConfigError(
                f"a_format='lzs' codes activations in 4 bits per group of {LZS_GROUPS}: "
                f"needs a_bits=4 and a_group in {LZS_GROUPS}, got a_bits={self.a_bits}, "
                f"a_group={self.a_group}")

    @property
    def name(self) -> str:
        name = f"w{self.w_bits}a{self.a_bits}"
        if self.w_format != "int":
            name += f"-{self.w_format}"
        if self.a_format != "int":
            name += f"-{self.a_format}{self.a_group}"
        return name

    @property
    def op_kwargs(self) -> dict[str, str]:
        """The ``clq.quant_linear`` keyword arguments for this spec's formats (none for
        the default integer ones, so those graphs keep the op's plain form)."""
        formats = {"a_format": self.a_format, "w_format": self.w_format}
        return {k: v for k, v in formats.items() if v != "int"}

    def with_groups(self, w_group: int | None = None, a_group: int | None = None) -> QuantSpec:
        return QuantSpec(
            self.w_bits,
            self.a_bits,
            self.w_group if w_group is None else w_group,
            self.a_group if a_group is None else a_group,
            self.a_format,
            self.w_format,
        )


_NAMED = {
    "w4a4": QuantSpec(4, 4),
    "w4a8": QuantSpec(4, 8),
    "w8a8": QuantSpec(8, 8),
    "w4a16": QuantSpec(4, 16),
}


def parse_bits(bits: str | QuantSpec) -> QuantSpec:
    """Accept "w4a4"-style names or a QuantSpec; anything else is a ConfigError."""
    if isinstance(bits, QuantSpec):
        return bits
    if isinstance(bits, str) and bits.lower() in _NAMED:
        return _NAMED[bits.lower()]
    raise ConfigError(
        f"unknown bits {bits!r}; choose one of {sorted(_NAMED)} or pass a clq.QuantSpec"
    )
