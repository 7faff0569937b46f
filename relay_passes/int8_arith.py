"""TFLite's integer arithmetic as TIR expressions, and the rounding of integer updates.

``multiply_by_quantized_multiplier`` is TFLite's requantization (a 31-bit fixed-point
multiplier and a shift, rounded twice); ``integer_step`` rounds an updated int8
weight or int32 bias back to its type (nearest, or stochastic without random state).
"""

from __future__ import annotations

import math

from tvm import tirx


def quantize_multiplier(real: float) -> tuple[int, int]:
    """``real ≈ mult · 2^(shift − 31)``, mult in [2^30, 2^31): TFLite's QuantizeMultiplier."""
    if real == 0:
        return 0, 0
    frac, shift = math.frexp(real)
    mult = round(frac * (1 << 31))
    if mult == 1 << 31:
        mult //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return int(mult), int(shift)

def _i64(v) -> tirx.PrimExpr:
    return tirx.const(v, "int64") if isinstance(v, int) else v.astype("int64")

def _i32(v) -> tirx.PrimExpr:
    return tirx.const(v, "int32") if isinstance(v, int) else v.astype("int32")

def multiply_by_quantized_multiplier(x, mult, shift) -> tirx.PrimExpr:
    """TFLite's MultiplyByQuantizedMultiplier on an int32 value, in TFLite's own types:
    SaturatingRoundingDoublingHighMul (int32 operands, their one product in int64) then
    RoundingDivideByPOT (int32, round half away). On a Cortex-M7 the product is a single
    SMULL and the rest 32-bit: about 45 instructions per output, where the same steps in
    int64 took about 95. A Python-int ``shift`` (per-tensor) folds the shift arithmetic
    into constants."""
    one, zero = tirx.const(1, "int32"), tirx.const(0, "int32")
    if isinstance(shift, int):
        left, right = tirx.const(1 << max(shift, 0), "int32"), tirx.const(max(-shift, 0), "int32")
        mask = tirx.const((1 << max(-shift, 0)) - 1, "int32")
    else:
        shift = _i32(shift)
        left = one << tirx.max(shift, zero)
        right = tirx.max(-shift, zero)
        # (1 << right) − 1 in uint32: defined in C for every right ≤ 31
        mask = ((tirx.const(1, "uint32") << right.astype("uint32")) - tirx.const(1, "uint32")).astype("int32")
    ab = (_i32(x) * left).astype("int64") * _i32(mult).astype("int64")
    nudge = tirx.Select(ab >= tirx.const(0, "int64"), tirx.const(1 << 30, "int64"),
                        tirx.const(1 - (1 << 30), "int64"))
    high = tirx.truncdiv(ab + nudge, tirx.const(1 << 31, "int64")).astype("int32")
    threshold = (mask >> one) + tirx.Select(high < zero, one, zero)
    return (high >> right) + tirx.Select(tirx.bitwise_and(high, mask) > threshold, one, zero)

def saturating_bias_add(acc, b, shift=0) -> tirx.PrimExpr:
    """``acc + b`` in int32, saturated where it would overflow, and to ``[INT32_MIN, INT32_MAX] >> s``
    with ``s = max(shift, 0)`` so the requantization's ``x · 2^s`` cannot overflow either. Where
    nothing overflows it is the plain sum (TFLite's); a bias an update drove towards the int32 limit
    saturates the output instead of being undefined behaviour in C."""
    total = _i64(acc) + _i64(b)
    s = tirx.max(_i64(shift), tirx.const(0, "int64")) if not isinstance(shift, int) else max(shift, 0)
    hi = tirx.const(2**31 - 1, "int64") >> (s if not isinstance(s, int) else tirx.const(s, "int64"))
    return tirx.max(tirx.min(total, hi), -hi - tirx.const(1, "int64")).astype("int32")


def multiply_single_rounding(x, mult, shift) -> tirx.PrimExpr:
    """``x·mult·2^(shift−31)`` rounded once, half up: what TFLite's reference int8 fully
    connected kernel computes (its conv kernels round twice, as above)."""
    x, mult = _i64(x), _i64(mult)
    total = tirx.const(31, "int64") - _i64(shift)
    one = tirx.const(1, "int64")
    return (x * mult + (one << (total - one))) >> total

def _clamp_int8(v, zy: int, lo: int, hi: int) -> tirx.PrimExpr:
    v = _i32(v) + tirx.const(zy, "int32")
    return tirx.max(tirx.min(v, tirx.const(hi, "int32")), tirx.const(lo, "int32")).astype("int8")

ROUNDINGS = ("stochastic", "nearest")

def flat_index(shape, index) -> tirx.PrimExpr:
    """Row-major position of the index tuple ``index`` in ``shape``."""
    flat = index[0]
    for size, i in zip(shape[1:], index[1:]):
        flat = flat * int(size) + i
    return flat

def integer_step(w, delta, index, shape, lo: float, hi: float, rounding: str) -> tirx.PrimExpr:
    """``w − delta`` back in w's integer type, clipped to [lo, hi].

    ``nearest`` rounds half away from zero: a step under half a unit is lost.
    ``stochastic`` (the default for training) takes ``floor(w − delta + u)`` with
    ``u ∈ [0, 1)`` from an integer hash of the element's index and of delta's bits, so
    the expected update is the float update however small; it is reproducible bit for
    bit on every target (no random state).
    """
    value = w.astype("float32") - delta
    if rounding == "nearest":
        new = tirx.round(value)
    else:
        def u32(v):
            return tirx.const(v, "uint32")

        def times(a, c: int):
            # a·c mod 2^32, computed in 64 bits: TVM's LLVM backend marks a uint32 multiply `nuw`
            # (no unsigned wrap), so LLVM may compute a product that wraps as it likes; it did, for
            # some weight shapes. C wraps uint32 legally; both give these bits.
            wide = a.astype("uint64") * tirx.const(c, "uint64")
            return (wide & tirx.const(0xFFFFFFFF, "uint64")).astype("uint32")

        h = tirx.reinterpret("uint32", delta) ^ times(flat_index(shape, index).astype("uint32"), 0x9E3779B9)
        h = h ^ (h >> u32(16))
        h = times(h, 0x7FEB352D)
        h = h ^ (h >> u32(15))
        h = times(h, 0x846CA68B)
        h = h ^ (h >> u32(16))
        uniform = (h >> u32(8)).astype("float32") * tirx.const(1.0 / (1 << 24), "float32")
        new = tirx.floor(value + uniform)
    clipped = tirx.max(tirx.min(new, tirx.const(hi, "float32")), tirx.const(lo, "float32"))
    # a NaN step (a NaN gradient) leaves the element as it was: casting NaN to an integer is
    # undefined behaviour in C (an infinite one clips to lo or hi)
    return tirx.Select(tirx.isnan(new), w, clipped.astype(w.dtype))
