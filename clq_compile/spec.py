"""Quantization specs: what bits and granularity a weight / activation gets."""

from __future__ import annotations

from dataclasses import dataclass

from clq_compile.errors import ConfigError

BITS_CHOICES = (4, 8, 16)


@dataclass(frozen=True)
class QuantSpec:
    """Bits and grouping for one linear's weight and activation.

    ``w_group``/``a_group`` of 0 mean per output channel / per token; a positive value is a
    group size along the reduction dimension K. ``a_bits=16`` means activations stay in float
    (weight-only quantization).
    """

    w_bits: int = 4
    a_bits: int = 4
    w_group: int = 0
    a_group: int = 0

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

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"

    def with_groups(self, w_group: int | None = None, a_group: int | None = None) -> QuantSpec:
        return QuantSpec(
            self.w_bits,
            self.a_bits,
            self.w_group if w_group is None else w_group,
            self.a_group if a_group is None else a_group,
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
