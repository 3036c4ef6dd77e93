"""Encodings: what a stored row is, as a frozen value object.

Names (the strings users type): ``f32``, ``f16``, ``absmax8/4/2``, ``absmean8/4/2``, ``sign1``.
A quantized name may carry ``-global`` (one scale for the whole set, as QLESS does; made only
by requantize) and/or ``-centered`` (quantize the residual from a per-set centroid).

Row layout (the contract between quant, kernels and store):
- each row is ``row_bytes`` bytes, a multiple of 8 so kernels may view rows as uint64;
- ``f32``/``f16``: little-endian floats; ``sign1``: bit j = (x_j > 0), little bit order
  (``np.packbits(bitorder="little")``); k-bit: ``level + 2**(k-1)`` as an unsigned k-bit
  field, 8/k fields per byte, lowest bits first; padding holds level 0 (or bit 0 for sign1).
- each row carries two float32 side values: ``scale`` (dequantized = level * scale) and
  ``norm`` (the L2 norm of the stored levels, so cos(a, b) = <la, lb> / (norm_a * norm_b)).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnknownNameError

FLOAT_KINDS = ("f32", "f16")
# What ingest writes unless told otherwise: the fidelity benchmark's choice
# (benchmarks/results/fidelity.json, real SmolLM2 gradients): f16 the master, absmax8 the
# faithful one (top-5% overlap with f32 0.997), sign1-centered the 1-bit one (0.72 symmetric,
# 0.82 asymmetric, against 0.63 / 0.72 for plain sign1 at the same bits).
DEFAULT_ENCODINGS = ("f16", "absmax8", "sign1-centered")
QUANT_KINDS = ("absmax", "absmean")
QUANT_BITS = (8, 4, 2)


@dataclass(frozen=True)
class Encoding:
    """One way of storing a vector: kind (f32, f16, absmax, absmean, sign), bits, scale mode."""

    kind: str
    bits: int
    global_scale: bool = False
    centered: bool = False

    @property
    def name(self) -> str:
        base = self.kind if self.kind in FLOAT_KINDS else f"{self.kind}{self.bits}"
        return base + ("-global" if self.global_scale else "") + ("-centered" if self.centered else "")

    @property
    def is_float(self) -> bool:
        return self.kind in FLOAT_KINDS

    @property
    def levels(self) -> int:
        """Largest quantized level L (levels run -L..L); 1 for sign."""
        return 1 if self.kind == "sign" else 2 ** (self.bits - 1) - 1

    def row_bytes(self, dim: int) -> int:
        """Bytes of one packed row of `dim` values, padded to a multiple of 8."""
        raw = (dim * self.bits + 7) // 8
        return (raw + 7) // 8 * 8

    def __str__(self) -> str:
        return self.name


def all_names() -> list[str]:
    """Every plain encoding name, lowest precision last."""
    return ["f32", "f16"] + [f"{k}{b}" for k in QUANT_KINDS for b in QUANT_BITS] + ["sign1"]


def parse_encoding(name: str) -> Encoding:
    """Parse an encoding name such as ``absmax4`` or ``absmax8-global``; raise on unknown."""
    text = name.strip().lower()
    base, *suffixes = text.split("-")
    unknown = [s for s in suffixes if s not in ("global", "centered")]
    enc = None
    if base == "f32":
        enc = Encoding("f32", 32)
    elif base == "f16":
        enc = Encoding("f16", 16)
    elif base == "sign1":
        enc = Encoding("sign", 1)
    else:
        for kind in QUANT_KINDS:
            if base.startswith(kind) and base[len(kind):] in {str(b) for b in QUANT_BITS}:
                enc = Encoding(kind, int(base[len(kind):]))
    if enc is None or unknown or len(set(suffixes)) != len(suffixes):
        raise UnknownNameError(
            f"unknown encoding {name!r}: expected one of {', '.join(all_names())}"
            " (quantized ones may add -global and/or -centered)"
        )
    global_scale = "global" in suffixes
    centered = "centered" in suffixes
    if (global_scale or centered) and enc.is_float:
        raise UnknownNameError(f"unknown encoding {name!r}: {base} takes no -global/-centered")
    if global_scale and enc.kind == "sign":
        raise UnknownNameError(f"unknown encoding {name!r}: sign1 has no scale to make global")
    return Encoding(enc.kind, enc.bits, global_scale, centered)
