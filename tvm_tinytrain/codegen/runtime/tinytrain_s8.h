/* int8 forward kernels for Cortex-M (and any C11 target): conv 1x1, depthwise, conv, linear.
 *
 * Layouts: activations NCHW int8 (batch 1), weights OIHW int8, bias int32, per output channel a
 * 31-bit multiplier and a shift (TFLite's QuantizeMultiplier), zero points and the output clamp
 * [lo, hi] as int32_t scalars. Each kernel computes what relay_passes/int8_ops.py's TE kernel
 * computes, bit for bit: the int32 accumulator of (x - zx) * w, then the requantization below.
 * The scratch is the caller's (the arena); its size is tvm_tinytrain/codegen/s8_kernels.py's
 * *_scratch functions. Every pointer is non-const and every kernel returns int32_t 0: the
 * prototypes TVM prints for a T.call_extern, which must match these.
 *
 * Under __ARM_FEATURE_DSP (Cortex-M4/M7/M33) the inner products use SMLAD (two 16-bit MACs per
 * instruction); elsewhere plain C loops. Integer sums are exact, so both give the same bits;
 * TINYTRAIN_S8_SIMD=1 forces the SMLAD-shaped code (with the intrinsics written in C) on any
 * target, which is how the host tests check it. */
#ifndef TINYTRAIN_S8_H_
#define TINYTRAIN_S8_H_

#include <stdint.h>

#ifndef TINYTRAIN_S8_SIMD
#if defined(__ARM_FEATURE_DSP)
#define TINYTRAIN_S8_SIMD 1
#else
#define TINYTRAIN_S8_SIMD 0
#endif
#endif

#if TINYTRAIN_S8_SIMD && defined(__ARM_FEATURE_DSP)
#include <arm_acle.h>
#endif

/* A channel's requantization constants, derived once per channel from its bias, multiplier and
 * shift and the output zero point. */
typedef struct {
  int32_t bias, mult, left, right, mask, half, bias2, round_zy, right1;
} tinytrain_s8_requant_t;

static inline tinytrain_s8_requant_t tinytrain_s8_requant(int32_t bias, int32_t mult, int32_t shift,
                                                          int32_t zy) {
  tinytrain_s8_requant_t q;
  q.bias = bias;
  q.mult = mult;
  q.left = shift > 0 ? shift : 0;
  q.right = shift > 0 ? 0 : -shift;
  q.mask = (int32_t)((1u << q.right) - 1u);
  q.half = q.mask >> 1;
  q.bias2 = (int32_t)((uint32_t)bias << 1);
  /* 2^right + zy 2^(right + 1), and right + 1: used only where right is in [0, 21] */
  q.round_zy = q.right <= 21 ? (int32_t)(1u << q.right) + zy * (1 << (q.right + 1)) : 0;
  q.right1 = q.right + 1;
  return q;
}

/* acc + bias, saturated to [INT32_MIN, INT32_MAX] >> max(shift, 0), then TFLite's
 * MultiplyByQuantizedMultiplier: SaturatingRoundingDoublingHighMul (one 64-bit product) and
 * RoundingDivideByPOT. relay_passes/int8_arith.py's saturating_bias_add and
 * multiply_by_quantized_multiplier, step for step; the truncating division of the product by 2^31
 * after its nudge is the arithmetic shift of (product + 2^30), exactly. */
static inline int32_t tinytrain_s8_requant_apply(tinytrain_s8_requant_t q, int32_t acc) {
  int32_t scaled;
  if (q.left == 0) {
#if TINYTRAIN_S8_SIMD && defined(__ARM_FEATURE_DSP)
    scaled = __qadd(acc, q.bias);
#else
    int64_t total = (int64_t)acc + q.bias;
    scaled = (int32_t)(total > INT32_MAX ? INT32_MAX : total < INT32_MIN ? INT32_MIN : total);
#endif
  } else {
    int64_t limit = (int64_t)(INT32_MAX >> q.left);
    int64_t total = (int64_t)acc + q.bias;
    total = total > limit ? limit : total < -limit - 1 ? -limit - 1 : total;
    scaled = (int32_t)((uint32_t)(int32_t)total << q.left);
  }
  int32_t high = (int32_t)(((int64_t)scaled * q.mult + ((int64_t)1 << 30)) >> 31);
  int32_t threshold = q.half + (high < 0);
  return (high >> q.right) + ((high & q.mask) > threshold);
}

/* the same for a channel whose shift is <= 0 (every channel of most layers) */
static inline int32_t tinytrain_s8_requant_right(tinytrain_s8_requant_t q, int32_t acc) {
#if TINYTRAIN_S8_SIMD && defined(__ARM_FEATURE_DSP)
  int32_t scaled = __qadd(acc, q.bias);
#else
  int64_t total = (int64_t)acc + q.bias;
  int32_t scaled = (int32_t)(total > INT32_MAX ? INT32_MAX : total < INT32_MIN ? INT32_MIN : total);
#endif
  int32_t high = (int32_t)(((int64_t)scaled * q.mult + ((int64_t)1 << 30)) >> 31);
  int32_t threshold = q.half + (high < 0);
  return (high >> q.right) + ((high & q.mask) > threshold);
}

/* The same PLUS THE OUTPUT ZERO POINT, in five instructions on Cortex-M, where nothing saturates:
 * shift in [-21, 0] and |acc + bias| <= 2^29 (tinytrain_s8_requant_fits). Then 2 (acc + bias) fits
 * in int32, and (2 (acc + bias) mult + 2^31) >> 32 (one SMMULR) is the doubling high multiply's
 * x = ((acc + bias) mult + 2^30) >> 31, |x| <= 2^29; RoundingDivideByPOT's
 * (x >> e) + (remainder > threshold), plus zy, is (x + 2^(e - 1) + zy 2^e - (x < 0)) >> e, which is
 * (2 x + 2^e + zy 2^(e + 1) - (x < 0)) >> (e + 1) (the numerator doubled is even, so the odd 1
 * it loses against 2 (x < 0) never crosses a multiple of 2^(e + 1)): a form that holds for e = 0 too
 * (x itself), whose sum stays within int32 for e <= 21. */
static inline int32_t tinytrain_s8_requant_fast(tinytrain_s8_requant_t q, int32_t acc) {
  int32_t doubled = acc * 2 + q.bias2;
  int32_t high;
#if TINYTRAIN_S8_SIMD && defined(__ARM_FEATURE_DSP)
  __asm__("smmulr %0, %1, %2" : "=r"(high) : "r"(doubled), "r"(q.mult));
#else
  high = (int32_t)(((int64_t)doubled * q.mult + ((int64_t)1 << 31)) >> 32);
#endif
  return (high * 2 + q.round_zy - (int32_t)((uint32_t)high >> 31)) >> q.right1;
}

/* tinytrain_s8_requant_fast where shift is 0: x + zy, in three instructions on Cortex-M (SMMLAR
 * adds zy 2^32, a multiple of 2^32, to the product before its rounded high half) */
static inline int32_t tinytrain_s8_requant_fast0(tinytrain_s8_requant_t q, int32_t acc, int32_t zy) {
  int32_t doubled = acc * 2 + q.bias2;
#if TINYTRAIN_S8_SIMD && defined(__ARM_FEATURE_DSP)
  int32_t v;
  __asm__("smmlar %0, %1, %2, %3" : "=r"(v) : "r"(doubled), "r"(q.mult), "r"(zy));
  return v;
#else
  return (int32_t)(((int64_t)doubled * q.mult + ((int64_t)1 << 31)) >> 32) + zy;
#endif
}

/* 1 when tinytrain_s8_requant_fast is exact for every accumulator of k products of (x - zx) in
 * [-255, 255] and w in [-128, 127], with this bias and shift */
static inline int32_t tinytrain_s8_requant_fits(int32_t bias, int32_t shift, int32_t k) {
  int64_t largest = (int64_t)k * 255 * 128 + (bias < 0 ? -(int64_t)bias : bias);
  return shift <= 0 && shift >= -21 && largest <= ((int64_t)1 << 29);
}

static inline int32_t tinytrain_s8_requantize(int32_t acc, int32_t bias, int32_t mult, int32_t shift) {
  tinytrain_s8_requant_t q = tinytrain_s8_requant(bias, mult, shift, 0);
  return tinytrain_s8_requant_apply(q, acc);
}

/* TFLite's fully connected rounding: (acc + bias, saturated) * mult * 2^(shift - 31), rounded once
 * half up (int8_arith.multiply_single_rounding); the int64 result truncated to int32 as TIR casts it. */
static inline int32_t tinytrain_s8_requantize_once(int32_t acc, int32_t bias, int32_t mult, int32_t shift) {
  int64_t total = (int64_t)acc + bias;
  total = total > INT32_MAX ? INT32_MAX : total < INT32_MIN ? INT32_MIN : total;
  int64_t bits = 31 - (int64_t)shift;
  return (int32_t)((total * mult + ((int64_t)1 << (bits - 1))) >> bits);
}

/* v + zy clamped to [lo, hi] (lo, hi within int8) */
static inline int8_t tinytrain_s8_output(int32_t v, int32_t zy, int32_t lo, int32_t hi) {
  v += zy;
  return (int8_t)(v < lo ? lo : v > hi ? hi : v);
}

/* v + zy clamped to [-128, 127] (one SSAT) */
static inline int8_t tinytrain_s8_output_int8(int32_t v, int32_t zy) {
#if TINYTRAIN_S8_SIMD && defined(__ARM_FEATURE_DSP)
  return (int8_t)__ssat(v + zy, 8);
#else
  return tinytrain_s8_output(v, zy, -128, 127);
#endif
}

/* 1x1 conv, stride 1, no padding, groups 1: y[o, p] over hw pixels, `pass` pixels at a time
 * (even). scratch: (pass + 1) * in_c int16 (their columns, and one being packed). */
int32_t tinytrain_s8_conv_1x1(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                              int16_t* scratch, int32_t in_c, int32_t hw, int32_t out_c, int32_t pass,
                              int32_t zx, int32_t zy, int32_t lo, int32_t hi);

/* Depthwise conv (groups == in_c == out_c == c), any kernel, stride and padding (top pt, left pl;
 * the output size says the rest). scratch, int8: one padded input plane,
 * ((oh - 1) * sh + kh) * ((ow - 1) * sw + kw) bytes, 4 bytes, then a channel's taps widened for SMLAD,
 * 4 * kh * (2 * (kw / 4) + kw % 4) bytes.
 * IN PLACE: y may equal x when oh * ow <= h * w. Channel c's plane is copied to the scratch before
 * its output is written, and that output lands on y[c * oh * ow .. (c + 1) * oh * ow), which lies
 * within input channels 0..c, already consumed; input channels > c are never touched. */
int32_t tinytrain_s8_depthwise(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                               int8_t* scratch, int32_t c, int32_t h, int32_t wd, int32_t oh, int32_t ow,
                               int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pt, int32_t pl,
                               int32_t zx, int32_t zy, int32_t lo, int32_t hi);

/* Conv, groups 1, any kernel, stride and padding (top pt, left pl; the output size says the rest),
 * `pass` output pixels at a time (even). scratch: (pass + 1) * in_c * kh * kw int16 (their im2col
 * columns, and one being packed). */
int32_t tinytrain_s8_conv(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                          int16_t* scratch, int32_t in_c, int32_t h, int32_t wd, int32_t out_c, int32_t oh,
                          int32_t ow, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pt, int32_t pl,
                          int32_t pass, int32_t zx, int32_t zy, int32_t lo, int32_t hi);

/* Fully connected, one row: y[o] = requantize_once(sum_k (x[k] - zx) * w[o, k], b[o]).
 * scratch: 2 * k int16. */
int32_t tinytrain_s8_linear(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                            int16_t* scratch, int32_t k, int32_t out_c, int32_t zx, int32_t zy, int32_t lo,
                            int32_t hi);

#endif
