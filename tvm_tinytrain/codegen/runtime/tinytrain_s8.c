/* int8 forward kernels: see tinytrain_s8.h for what each computes and its scratch.
 *
 * Convs are a matrix product over packed columns: the reduction of one output pixel (its im2col
 * column, x - zx in int16) is written contiguously to the scratch, two pixels at a time, then
 * every output channel pair reads its two weight rows once for both pixels (2 channels x 2 pixels
 * per inner step). With SMLAD the int8 weights are widened four at a time by SXTB16, which yields
 * (w0, w2) and (w1, w3); the columns are packed in that order within each group of four, so one
 * 32-bit load of the column matches each widened weight pair. Depthwise convs copy one channel's
 * input plane, padded with the zero point, to the scratch (no padding test per MAC) and subtract
 * zx * sum(w) once per channel instead of zx per MAC. */
#include "tinytrain_s8.h"

#include <string.h>

/* inlined where called, so a call with constant sizes gets its own unrolled copy */
#if defined(__GNUC__)
#define TINYTRAIN_S8_SPECIALISED static inline __attribute__((always_inline))
#else
#define TINYTRAIN_S8_SPECIALISED static inline
#endif

#if TINYTRAIN_S8_SIMD && defined(__ARM_FEATURE_DSP)
#define TINYTRAIN_SXTB16(v) ((uint32_t)__sxtb16((int32_t)(v)))
#define TINYTRAIN_SMLAD(a, b, acc) __smlad((int32_t)(a), (int32_t)(b), (acc))
#define TINYTRAIN_SMLABB(a, b, acc) __smlabb((int32_t)(a), (int32_t)(b), (acc))
#define TINYTRAIN_SMLABT(a, b, acc) __smlabt((int32_t)(a), (int32_t)(b), (acc))
#define TINYTRAIN_SMLATB(a, b, acc) __smlatb((int32_t)(a), (int32_t)(b), (acc))
#define TINYTRAIN_SMLATT(a, b, acc) __smlatt((int32_t)(a), (int32_t)(b), (acc))
/* GCC 12's arm_acle.h has no __ror, and GCC does not fold a rotate into SXTB16's operand */
static inline uint32_t tinytrain_sxtb16_ror8(uint32_t v) {
  uint32_t r;
  __asm__("sxtb16 %0, %1, ror #8" : "=r"(r) : "r"(v));
  return r;
}
#elif TINYTRAIN_S8_SIMD
/* the same instructions in C: what the host tests run to check the SMLAD-shaped code */
static inline int32_t tinytrain_lo16(uint32_t v) { return (int16_t)(v & 0xFFFFu); }
static inline int32_t tinytrain_hi16(uint32_t v) { return (int16_t)(v >> 16); }
static inline uint32_t tinytrain_sxtb16(uint32_t v) {
  return ((uint32_t)(int32_t)(int8_t)(v & 0xFFu) & 0xFFFFu) | ((uint32_t)(int8_t)((v >> 16) & 0xFFu) << 16);
}
#define TINYTRAIN_SXTB16(v) tinytrain_sxtb16(v)
#define TINYTRAIN_SMLAD(a, b, acc) \
  ((acc) + tinytrain_lo16(a) * tinytrain_lo16(b) + tinytrain_hi16(a) * tinytrain_hi16(b))
#define TINYTRAIN_SMLABB(a, b, acc) ((acc) + tinytrain_lo16(a) * tinytrain_lo16(b))
#define TINYTRAIN_SMLABT(a, b, acc) ((acc) + tinytrain_lo16(a) * tinytrain_hi16(b))
#define TINYTRAIN_SMLATB(a, b, acc) ((acc) + tinytrain_hi16(a) * tinytrain_lo16(b))
#define TINYTRAIN_SMLATT(a, b, acc) ((acc) + tinytrain_hi16(a) * tinytrain_hi16(b))
static inline uint32_t tinytrain_sxtb16_ror8(uint32_t v) { return TINYTRAIN_SXTB16((v >> 8) | (v << 24)); }
#endif

#if TINYTRAIN_S8_SIMD
/* 32 bits at any alignment (one LDR on Cortex-M3 and up) */
static inline uint32_t tinytrain_load32(const void* p) {
  uint32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* A pass's columns, for SXTB16: each group of four values (v0, v1, v2, v3) is stored
 * (v0, v2, v1, v3), and a pixel pair's columns are interleaved group by group (pixel 0's group,
 * pixel 1's group, ...), their tails (k % 4 values) after; a lone last pixel's column alone. */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_place(int16_t* pass_cols, const int16_t* col, int32_t k, int32_t q,
                                             int32_t pixels) {
  int32_t lone = q == pixels - 1 && (pixels & 1);
  int32_t lane = lone ? 0 : q & 1, step = lone ? 4 : 8, k4 = k & ~3;
  int16_t* dst = pass_cols + (q & ~1) * k + lane * 4;
  for (int32_t i = 0; i < k4; i += 4, dst += step) {
    dst[0] = col[i];
    dst[1] = col[i + 2];
    dst[2] = col[i + 1];
    dst[3] = col[i + 3];
  }
  dst = pass_cols + (q & ~1) * k + (lone ? 1 : 2) * k4 + lane * (k - k4);
  for (int32_t i = k4; i < k; ++i) *dst++ = col[i];
}

/* the four sums w_a . c_0, w_a . c_1, w_b . c_0, w_b . c_1 over k, from a pixel pair's columns */
static inline void tinytrain_s8_dot_2x2(const int8_t* wa, const int8_t* wb, const int16_t* pair, int32_t k,
                                        int32_t acc[4]) {
  int32_t a0 = 0, a1 = 0, b0 = 0, b1 = 0, k4 = k & ~3;
  const int16_t* c = pair;
#if defined(__ARM_FEATURE_DSP)
  if (k4) {
    const int16_t* end = pair + 2 * k4;
    uint32_t va, vb, wa13, wb13, x02, x13;
    __asm__ volatile(
        "1:\n\t"
        "ldr %[va], [%[wa]], #4\n\t"
        "ldr %[x02], [%[c]], #4\n\t"
        "ldr %[x13], [%[c]], #4\n\t"
        "sxtb16 %[wa13], %[va], ror #8\n\t"
        "sxtb16 %[va], %[va]\n\t"
        "smlad %[a0], %[va], %[x02], %[a0]\n\t"
        "smlad %[a0], %[wa13], %[x13], %[a0]\n\t"
        "ldr %[vb], [%[wb]], #4\n\t"
        "sxtb16 %[wb13], %[vb], ror #8\n\t"
        "sxtb16 %[vb], %[vb]\n\t"
        "smlad %[b0], %[vb], %[x02], %[b0]\n\t"
        "smlad %[b0], %[wb13], %[x13], %[b0]\n\t"
        "ldr %[x02], [%[c]], #4\n\t"
        "ldr %[x13], [%[c]], #4\n\t"
        "smlad %[a1], %[va], %[x02], %[a1]\n\t"
        "smlad %[a1], %[wa13], %[x13], %[a1]\n\t"
        "smlad %[b1], %[vb], %[x02], %[b1]\n\t"
        "smlad %[b1], %[wb13], %[x13], %[b1]\n\t"
        "cmp %[c], %[end]\n\t"
        "bne 1b\n\t"
        : [a0] "+r"(a0), [a1] "+r"(a1), [b0] "+r"(b0), [b1] "+r"(b1), [wa] "+r"(wa), [wb] "+r"(wb),
          [c] "+r"(c), [va] "=&r"(va), [vb] "=&r"(vb), [wa13] "=&r"(wa13), [wb13] "=&r"(wb13),
          [x02] "=&r"(x02), [x13] "=&r"(x13)
        : [end] "r"(end)
        : "cc", "memory");
  }
#else
  for (int32_t i = 0; i < k4; i += 4, c += 8) {
    uint32_t va = tinytrain_load32(wa + i), vb = tinytrain_load32(wb + i);
    uint32_t wa02 = TINYTRAIN_SXTB16(va), wa13 = tinytrain_sxtb16_ror8(va);
    uint32_t wb02 = TINYTRAIN_SXTB16(vb), wb13 = tinytrain_sxtb16_ror8(vb);
    uint32_t x0_02 = tinytrain_load32(c), x0_13 = tinytrain_load32(c + 2);
    uint32_t x1_02 = tinytrain_load32(c + 4), x1_13 = tinytrain_load32(c + 6);
    a0 = TINYTRAIN_SMLAD(wa02, x0_02, a0);
    a0 = TINYTRAIN_SMLAD(wa13, x0_13, a0);
    a1 = TINYTRAIN_SMLAD(wa02, x1_02, a1);
    a1 = TINYTRAIN_SMLAD(wa13, x1_13, a1);
    b0 = TINYTRAIN_SMLAD(wb02, x0_02, b0);
    b0 = TINYTRAIN_SMLAD(wb13, x0_13, b0);
    b1 = TINYTRAIN_SMLAD(wb02, x1_02, b1);
    b1 = TINYTRAIN_SMLAD(wb13, x1_13, b1);
  }
  wa += k4;
  wb += k4;
#endif
  int32_t tail = k - k4;
  for (int32_t i = 0; i < tail; ++i) {
    a0 += wa[i] * c[i];
    a1 += wa[i] * c[tail + i];
    b0 += wb[i] * c[i];
    b1 += wb[i] * c[tail + i];
  }
  acc[0] = a0;
  acc[1] = a1;
  acc[2] = b0;
  acc[3] = b1;
}

/* w . c over k, c a lone pixel's column */
static inline int32_t tinytrain_s8_dot(const int8_t* w, const int16_t* c, int32_t k) {
  int32_t a = 0, i = 0;
  for (; i + 4 <= k; i += 4) {
    uint32_t v = tinytrain_load32(w + i);
    a = TINYTRAIN_SMLAD(TINYTRAIN_SXTB16(v), tinytrain_load32(c + i), a);
    a = TINYTRAIN_SMLAD(tinytrain_sxtb16_ror8(v), tinytrain_load32(c + i + 2), a);
  }
  for (; i < k; ++i) a += w[i] * c[i];
  return a;
}
#else
/* A pass's columns, one after the other. */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_place(int16_t* pass_cols, const int16_t* col, int32_t k, int32_t q,
                                             int32_t pixels) {
  (void)pixels;
  memcpy(pass_cols + q * k, col, (size_t)k * sizeof *col);
}

static inline void tinytrain_s8_dot_2x2(const int8_t* wa, const int8_t* wb, const int16_t* pair, int32_t k,
                                        int32_t acc[4]) {
  const int16_t* c0 = pair;
  const int16_t* c1 = pair + k;
  int32_t a0 = 0, a1 = 0, b0 = 0, b1 = 0;
  for (int32_t i = 0; i < k; ++i) {
    a0 += wa[i] * c0[i];
    a1 += wa[i] * c1[i];
    b0 += wb[i] * c0[i];
    b1 += wb[i] * c1[i];
  }
  acc[0] = a0;
  acc[1] = a1;
  acc[2] = b0;
  acc[3] = b1;
}

static inline int32_t tinytrain_s8_dot(const int8_t* w, const int16_t* c, int32_t k) {
  int32_t a = 0;
  for (int32_t i = 0; i < k; ++i) a += w[i] * c[i];
  return a;
}
#endif

/* How every output of a call is requantized: exactly as tinytrain_s8_requant_fast (no channel can
 * saturate), as tinytrain_s8_requant_right (all shifts <= 0), or in full; whether its clamp is the
 * whole int8 range; and whether every shift is 0 (FAST0, tinytrain_s8_requant_fast0: what the
 * kernels most used take where the call is FAST). */
enum { TINYTRAIN_S8_FULL, TINYTRAIN_S8_RIGHT, TINYTRAIN_S8_FAST, TINYTRAIN_S8_FAST0 };

typedef struct {
  int32_t kind, int8_range, unshifted;
} tinytrain_s8_mode_t;

static tinytrain_s8_mode_t tinytrain_s8_mode(const int32_t* b, const int32_t* shift, int32_t out_c, int32_t k,
                                             int32_t lo, int32_t hi) {
  int32_t fits = 1, right = 1, unshifted = 1;
  for (int32_t o = 0; o < out_c; ++o) {
    fits &= tinytrain_s8_requant_fits(b[o], shift[o], k);
    right &= shift[o] <= 0;
    unshifted &= shift[o] == 0;
  }
  tinytrain_s8_mode_t mode = {fits ? TINYTRAIN_S8_FAST : right ? TINYTRAIN_S8_RIGHT : TINYTRAIN_S8_FULL,
                              lo == -128 && hi == 127, unshifted};
  return mode;
}

TINYTRAIN_S8_SPECIALISED int8_t tinytrain_s8_finish(tinytrain_s8_requant_t q, int32_t acc, int32_t zy,
                                                    int32_t lo, int32_t hi, int32_t kind,
                                                    int32_t int8_range) {
  if (kind == TINYTRAIN_S8_FAST0) { /* zy included */
    int32_t v = tinytrain_s8_requant_fast0(q, acc, zy);
    return int8_range ? tinytrain_s8_output_int8(v, 0) : tinytrain_s8_output(v, 0, lo, hi);
  }
  if (kind == TINYTRAIN_S8_FAST) { /* zy included */
    int32_t v = tinytrain_s8_requant_fast(q, acc);
    return int8_range ? tinytrain_s8_output_int8(v, 0) : tinytrain_s8_output(v, 0, lo, hi);
  }
  int32_t v = kind == TINYTRAIN_S8_RIGHT ? tinytrain_s8_requant_right(q, acc)
                                         : tinytrain_s8_requant_apply(q, acc);
  return int8_range ? tinytrain_s8_output_int8(v, zy) : tinytrain_s8_output(v, zy, lo, hi);
}

/* Output channels requantized from a pass's columns (`pixels` of k, laid out by
 * tinytrain_s8_place), the outputs to y[o * y_stride + pixel]. Each channel's constants are
 * derived once for all the pixels. */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_columns_as(const int8_t* w, const int32_t* b, const int32_t* mult,
                                                      const int32_t* shift, int32_t out_c, int32_t k,
                                                      const int16_t* cols, int32_t pixels, int8_t* y,
                                                      int32_t y_stride, int32_t zy, int32_t lo, int32_t hi,
                                                      int32_t kind, int32_t int8_range) {
  int32_t o = 0;
  for (; o + 2 <= out_c; o += 2) {
    tinytrain_s8_requant_t qa = tinytrain_s8_requant(b[o], mult[o], shift[o], zy);
    tinytrain_s8_requant_t qb = tinytrain_s8_requant(b[o + 1], mult[o + 1], shift[o + 1], zy);
    const int8_t* wa = w + o * k;
    const int8_t* wb = wa + k;
    int8_t* ya = y + o * y_stride;
    int8_t* yb = ya + y_stride;
    int32_t p = 0;
    for (; p + 2 <= pixels; p += 2) {
      int32_t acc[4];
      tinytrain_s8_dot_2x2(wa, wb, cols + p * k, k, acc);
      ya[p] = tinytrain_s8_finish(qa, acc[0], zy, lo, hi, kind, int8_range);
      ya[p + 1] = tinytrain_s8_finish(qa, acc[1], zy, lo, hi, kind, int8_range);
      yb[p] = tinytrain_s8_finish(qb, acc[2], zy, lo, hi, kind, int8_range);
      yb[p + 1] = tinytrain_s8_finish(qb, acc[3], zy, lo, hi, kind, int8_range);
    }
    if (p < pixels) {
      const int16_t* col = cols + p * k;
      ya[p] = tinytrain_s8_finish(qa, tinytrain_s8_dot(wa, col, k), zy, lo, hi, kind, int8_range);
      yb[p] = tinytrain_s8_finish(qb, tinytrain_s8_dot(wb, col, k), zy, lo, hi, kind, int8_range);
    }
  }
  if (o < out_c) { /* the last, odd channel: as a pair with itself */
    tinytrain_s8_requant_t q = tinytrain_s8_requant(b[o], mult[o], shift[o], zy);
    const int8_t* wo = w + o * k;
    int8_t* yo = y + o * y_stride;
    int32_t p = 0;
    for (; p + 2 <= pixels; p += 2) {
      int32_t acc[4];
      tinytrain_s8_dot_2x2(wo, wo, cols + p * k, k, acc);
      yo[p] = tinytrain_s8_finish(q, acc[0], zy, lo, hi, kind, int8_range);
      yo[p + 1] = tinytrain_s8_finish(q, acc[1], zy, lo, hi, kind, int8_range);
    }
    if (p < pixels) {
      yo[p] = tinytrain_s8_finish(q, tinytrain_s8_dot(wo, cols + p * k, k), zy, lo, hi, kind, int8_range);
    }
  }
}

#if TINYTRAIN_S8_SIMD
/* The same for few inputs (k = 8 or 16, a constant here) and the fast requantization to the int8
 * range: one output channel at a time, its k weights widened once into registers for the whole
 * pass, so a pixel costs its column's k / 2 words, k / 2 SMLADs and its requantization (the 2x2
 * product reloads and rewidens the weights for every pixel pair, as much as its k MACs). */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_columns_held(const int8_t* w, const int32_t* b,
                                                        const int32_t* mult, const int32_t* shift,
                                                        int32_t out_c, int32_t k, const int16_t* cols,
                                                        int32_t pixels, int8_t* y, int32_t y_stride,
                                                        int32_t zy, int32_t kind) {
  for (int32_t o = 0; o < out_c; ++o) {
    tinytrain_s8_requant_t q = tinytrain_s8_requant(b[o], mult[o], shift[o], zy);
    uint32_t w02[4], w13[4]; /* k / 4 groups */
    for (int32_t g = 0; g < k / 4; ++g) {
      uint32_t v = tinytrain_load32(w + o * k + 4 * g);
      w02[g] = TINYTRAIN_SXTB16(v);
      w13[g] = tinytrain_sxtb16_ror8(v);
    }
    int8_t* yo = y + o * y_stride;
    const int16_t* pair = cols;
    int32_t p = 0;
    for (; p + 2 <= pixels; p += 2, pair += 2 * k) { /* pixel j's group g at pair + 8 g + 4 j */
      int32_t acc0 = 0, acc1 = 0;
      for (int32_t g = 0; g < k / 4; ++g) {
        acc0 = TINYTRAIN_SMLAD(w02[g], tinytrain_load32(pair + 8 * g), acc0);
        acc0 = TINYTRAIN_SMLAD(w13[g], tinytrain_load32(pair + 8 * g + 2), acc0);
        acc1 = TINYTRAIN_SMLAD(w02[g], tinytrain_load32(pair + 8 * g + 4), acc1);
        acc1 = TINYTRAIN_SMLAD(w13[g], tinytrain_load32(pair + 8 * g + 6), acc1);
      }
      yo[p] = tinytrain_s8_finish(q, acc0, zy, -128, 127, kind, 1);
      yo[p + 1] = tinytrain_s8_finish(q, acc1, zy, -128, 127, kind, 1);
    }
    if (p < pixels) { /* a lone last pixel: its groups one after another */
      int32_t acc = 0;
      for (int32_t g = 0; g < k / 4; ++g) {
        acc = TINYTRAIN_SMLAD(w02[g], tinytrain_load32(pair + 4 * g), acc);
        acc = TINYTRAIN_SMLAD(w13[g], tinytrain_load32(pair + 4 * g + 2), acc);
      }
      yo[p] = tinytrain_s8_finish(q, acc, zy, -128, 127, kind, 1);
    }
  }
}
#endif

static void tinytrain_s8_columns(const int8_t* w, const int32_t* b, const int32_t* mult, const int32_t* shift,
                                 int32_t out_c, int32_t k, const int16_t* cols, int32_t pixels, int8_t* y,
                                 int32_t y_stride, int32_t zy, int32_t lo, int32_t hi,
                                 tinytrain_s8_mode_t mode) {
  int32_t fast0 = mode.kind == TINYTRAIN_S8_FAST && mode.unshifted;
#if TINYTRAIN_S8_SIMD
  if (mode.kind == TINYTRAIN_S8_FAST && mode.int8_range && (k == 8 || k == 16)) {
    /* the sizes and the requantization constants: the loops unrolled, nothing tested per output */
    if (k == 8 && fast0) {
      tinytrain_s8_columns_held(w, b, mult, shift, out_c, 8, cols, pixels, y, y_stride, zy,
                                TINYTRAIN_S8_FAST0);
    } else if (k == 8) {
      tinytrain_s8_columns_held(w, b, mult, shift, out_c, 8, cols, pixels, y, y_stride, zy,
                                TINYTRAIN_S8_FAST);
    } else if (fast0) {
      tinytrain_s8_columns_held(w, b, mult, shift, out_c, 16, cols, pixels, y, y_stride, zy,
                                TINYTRAIN_S8_FAST0);
    } else {
      tinytrain_s8_columns_held(w, b, mult, shift, out_c, 16, cols, pixels, y, y_stride, zy,
                                TINYTRAIN_S8_FAST);
    }
    return;
  }
#endif
  if (fast0 && mode.int8_range && k == 27) { /* a 3x3 conv of an RGB image */
    tinytrain_s8_columns_as(w, b, mult, shift, out_c, 27, cols, pixels, y, y_stride, zy, lo, hi,
                            TINYTRAIN_S8_FAST0, 1);
  } else if (mode.kind == TINYTRAIN_S8_FAST && mode.int8_range && k == 27) {
    tinytrain_s8_columns_as(w, b, mult, shift, out_c, 27, cols, pixels, y, y_stride, zy, lo, hi,
                            TINYTRAIN_S8_FAST, 1);
  } else if (fast0 && mode.int8_range) {
    tinytrain_s8_columns_as(w, b, mult, shift, out_c, k, cols, pixels, y, y_stride, zy, lo, hi,
                            TINYTRAIN_S8_FAST0, 1);
  } else if (mode.kind == TINYTRAIN_S8_FAST && mode.int8_range) {
    tinytrain_s8_columns_as(w, b, mult, shift, out_c, k, cols, pixels, y, y_stride, zy, lo, hi,
                            TINYTRAIN_S8_FAST, 1);
  } else if (mode.kind == TINYTRAIN_S8_FAST) {
    tinytrain_s8_columns_as(w, b, mult, shift, out_c, k, cols, pixels, y, y_stride, zy, lo, hi,
                            TINYTRAIN_S8_FAST, 0);
  } else {
    tinytrain_s8_columns_as(w, b, mult, shift, out_c, k, cols, pixels, y, y_stride, zy, lo, hi, mode.kind, 0);
  }
}

/* a 1x1 conv's column of one pixel: x - zx over its in_c channels (planes hw apart) */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_pixel_column(const int8_t* src, int32_t hw, int32_t in_c,
                                                        int32_t zx, int16_t* col) {
  for (int32_t i = 0; i < in_c; ++i) col[i] = (int16_t)(src[i * hw] - zx);
}

int32_t tinytrain_s8_conv_1x1(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                              int16_t* scratch, int32_t in_c, int32_t hw, int32_t out_c, int32_t pass,
                              int32_t zx, int32_t zy, int32_t lo, int32_t hi) {
  int16_t* col = scratch + pass * in_c; /* one pixel's column, then placed in the pass */
  tinytrain_s8_mode_t mode = tinytrain_s8_mode(b, shift, out_c, in_c, lo, hi);
  for (int32_t p = 0; p < hw; p += pass) {
    int32_t pixels = hw - p < pass ? hw - p : pass;
    for (int32_t q = 0; q < pixels; ++q) {
      if (in_c == 8) { /* few inputs: the column's values unrolled (as many instructions as the MACs) */
        tinytrain_s8_pixel_column(x + p + q, hw, 8, zx, col);
        tinytrain_s8_place(scratch, col, 8, q, pixels);
      } else if (in_c == 16) {
        tinytrain_s8_pixel_column(x + p + q, hw, 16, zx, col);
        tinytrain_s8_place(scratch, col, 16, q, pixels);
      } else {
        tinytrain_s8_pixel_column(x + p + q, hw, in_c, zx, col);
        tinytrain_s8_place(scratch, col, in_c, q, pixels);
      }
    }
    tinytrain_s8_columns(w, b, mult, shift, out_c, in_c, scratch, pixels, y + p, hw, zy, lo, hi, mode);
  }
  return 0;
}

/* im2col column of output pixel (oy, ox): (x - zx) over (channel, ky, kx), 0 where padded */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_im2col(const int8_t* x, int32_t in_c, int32_t h, int32_t wd,
                                                 int32_t kh, int32_t kw, int32_t iy0, int32_t ix0, int32_t zx,
                                                 int16_t* col) {
  if (iy0 >= 0 && iy0 + kh <= h && ix0 >= 0 && ix0 + kw <= wd) { /* all inside: no test per value */
    for (int32_t c = 0; c < in_c; ++c) {
      const int8_t* row = x + c * h * wd + iy0 * wd + ix0;
      for (int32_t ky = 0; ky < kh; ++ky, row += wd) {
        for (int32_t kx = 0; kx < kw; ++kx) *col++ = (int16_t)(row[kx] - zx);
      }
    }
    return;
  }
  for (int32_t c = 0; c < in_c; ++c) {
    const int8_t* plane = x + c * h * wd;
    for (int32_t ky = 0; ky < kh; ++ky) {
      int32_t iy = iy0 + ky;
      if (iy < 0 || iy >= h) {
        for (int32_t kx = 0; kx < kw; ++kx) *col++ = 0;
        continue;
      }
      const int8_t* row = plane + iy * wd;
      for (int32_t kx = 0; kx < kw; ++kx) {
        int32_t ix = ix0 + kx;
        *col++ = (int16_t)(ix >= 0 && ix < wd ? row[ix] - zx : 0);
      }
    }
  }
}

int32_t tinytrain_s8_conv(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                          int16_t* scratch, int32_t in_c, int32_t h, int32_t wd, int32_t out_c, int32_t oh,
                          int32_t ow, int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pt, int32_t pl,
                          int32_t pass, int32_t zx, int32_t zy, int32_t lo, int32_t hi) {
  int32_t k = in_c * kh * kw, pixels_total = oh * ow;
  int16_t* col = scratch + pass * k; /* one pixel's column, then placed in the pass */
  tinytrain_s8_mode_t mode = tinytrain_s8_mode(b, shift, out_c, k, lo, hi);
  int32_t rgb_3x3 = in_c == 3 && kh == 3 && kw == 3;
  for (int32_t p = 0; p < pixels_total; p += pass) {
    int32_t pixels = pixels_total - p < pass ? pixels_total - p : pass;
    for (int32_t q = 0; q < pixels; ++q) {
      int32_t oy = (p + q) / ow, ox = (p + q) % ow;
      if (rgb_3x3) { /* an image's 3x3 stem: the 27 values unrolled */
        tinytrain_s8_im2col(x, 3, h, wd, 3, 3, oy * sh - pt, ox * sw - pl, zx, col);
        tinytrain_s8_place(scratch, col, 27, q, pixels);
      } else {
        tinytrain_s8_im2col(x, in_c, h, wd, kh, kw, oy * sh - pt, ox * sw - pl, zx, col);
        tinytrain_s8_place(scratch, col, k, q, pixels);
      }
    }
    tinytrain_s8_columns(w, b, mult, shift, out_c, k, scratch, pixels, y + p, pixels_total, zy, lo, hi,
                         mode);
  }
  return 0;
}

/* n bytes, four at a time. GCC would turn these loops back into calls of memcpy / memset, which
 * newlib-nano runs a byte at a time: not for these few bytes a row. */
#if defined(__GNUC__) && !defined(__clang__)
#define TINYTRAIN_S8_NO_LIBC_CALLS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define TINYTRAIN_S8_NO_LIBC_CALLS
#endif

TINYTRAIN_S8_NO_LIBC_CALLS static inline void tinytrain_s8_copy(int8_t* dst, const int8_t* src, int32_t n) {
  int32_t i = 0;
  for (; i + 4 <= n; i += 4) memcpy(dst + i, src + i, 4);
  for (; i < n; ++i) dst[i] = src[i];
}

TINYTRAIN_S8_NO_LIBC_CALLS static inline void tinytrain_s8_fill(int8_t* dst, uint32_t word, int32_t n) {
  int32_t i = 0;
  for (; i + 4 <= n; i += 4) memcpy(dst + i, &word, 4);
  for (; i < n; ++i) dst[i] = (int8_t)word;
}

/* A channel's padded plane in the scratch: rows [-pt, rows - pt) x cols [-pl, cols - pl) of its input,
 * zx outside. Its border is the same for every channel: the whole plane is filled with zx once per
 * call (tinytrain_s8_plane_t), then each channel copies only the rows and columns it has inside. */
typedef struct {
  int32_t top, bottom, left, inside; /* inside rows [top, bottom) and columns [left, left + inside) */
} tinytrain_s8_plane_t;

TINYTRAIN_S8_NO_LIBC_CALLS static tinytrain_s8_plane_t tinytrain_s8_plane_fill(int32_t h, int32_t wd,
                                                                               int32_t rows, int32_t cols,
                                                                               int32_t pt, int32_t pl,
                                                                               int32_t zx, int8_t* dst) {
  tinytrain_s8_plane_t plane;
  plane.top = pt < rows ? pt : rows;
  plane.bottom = pt + h < rows ? pt + h : rows;
  plane.left = pl < cols ? pl : cols;
  plane.inside = wd < cols - plane.left ? wd : cols - plane.left;
  if (plane.top > 0 || plane.bottom < rows || plane.left > 0 || plane.left + plane.inside < cols) {
    tinytrain_s8_fill(dst, ((uint32_t)zx & 0xFFu) * 0x01010101u, rows * cols);
  }
  return plane;
}

TINYTRAIN_S8_SPECIALISED void tinytrain_s8_plane_copy(const int8_t* in, int32_t wd, int32_t cols, int32_t pt,
                                                      tinytrain_s8_plane_t plane, int8_t* dst) {
  const int8_t* src = in + (plane.top - pt) * wd;
  dst += plane.top * cols + plane.left;
  for (int32_t r = plane.top; r < plane.bottom; ++r, src += wd, dst += cols) {
    tinytrain_s8_copy(dst, src, plane.inside);
  }
}

#if TINYTRAIN_S8_SIMD
/* 3x3, stride 1, two outputs per step: each kernel row's four inputs a0..a3 in one load,
 * out0 = w0 a0 + w1 a1 + w2 a2, out1 = w0 a1 + w1 a2 + w2 a3 */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_depthwise_3x3_s1(const int8_t* in, int32_t cols, const int8_t* wc,
                                                            int32_t corr, tinytrain_s8_requant_t q,
                                                            int8_t* out, int32_t oh, int32_t ow, int32_t zy,
                                                            int32_t lo, int32_t hi, int32_t kind,
                                                            int32_t int8_range) {
  uint32_t w02[3], w1[3];
  for (int32_t r = 0; r < 3; ++r) {
    w02[r] = ((uint32_t)(int32_t)wc[3 * r] & 0xFFFFu) | ((uint32_t)(int32_t)wc[3 * r + 2] << 16);
    w1[r] = (uint32_t)(int32_t)wc[3 * r + 1] & 0xFFFFu;
  }
  for (int32_t oy = 0; oy < oh; ++oy, out += ow) {
    const int8_t* row = in + oy * cols;
    int32_t ox = 0;
    for (; ox + 2 <= ow; ox += 2) {
      int32_t acc0 = corr, acc1 = corr;
      for (int32_t r = 0; r < 3; ++r) {
        uint32_t a = tinytrain_load32(row + r * cols + ox);
        uint32_t a02 = TINYTRAIN_SXTB16(a), a13 = tinytrain_sxtb16_ror8(a);
        acc0 = TINYTRAIN_SMLAD(w02[r], a02, acc0);
        acc0 = TINYTRAIN_SMLABB(w1[r], a13, acc0);
        acc1 = TINYTRAIN_SMLAD(w02[r], a13, acc1);
        acc1 = TINYTRAIN_SMLABT(w1[r], a02, acc1);
      }
      out[ox] = tinytrain_s8_finish(q, acc0, zy, lo, hi, kind, int8_range);
      out[ox + 1] = tinytrain_s8_finish(q, acc1, zy, lo, hi, kind, int8_range);
    }
    if (ox < ow) {
      int32_t acc = corr;
      for (int32_t r = 0; r < 3; ++r) {
        const int8_t* a = row + r * cols + ox;
        acc += wc[3 * r] * a[0] + wc[3 * r + 1] * a[1] + wc[3 * r + 2] * a[2];
      }
      out[ox] = tinytrain_s8_finish(q, acc, zy, lo, hi, kind, int8_range);
    }
  }
}

/* 3x3, stride 2, two outputs per step from a0..a4: out0 = w0 a0 + w1 a1 + w2 a2,
 * out1 = w0 a2 + w1 a3 + w2 a4. The middle taps of rows 0 and 1 share a register (row 0's low, row 1's
 * high): one value fewer live in the loop. */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_depthwise_3x3_s2(const int8_t* in, int32_t cols, const int8_t* wc,
                                                            int32_t corr, tinytrain_s8_requant_t q,
                                                            int8_t* out, int32_t oh, int32_t ow, int32_t zy,
                                                            int32_t lo, int32_t hi, int32_t kind,
                                                            int32_t int8_range) {
  uint32_t w02[3];
  for (int32_t r = 0; r < 3; ++r) {
    w02[r] = ((uint32_t)(int32_t)wc[3 * r] & 0xFFFFu) | ((uint32_t)(int32_t)wc[3 * r + 2] << 16);
  }
  uint32_t w1_01 = ((uint32_t)(int32_t)wc[1] & 0xFFFFu) | ((uint32_t)(int32_t)wc[4] << 16);
  uint32_t w1_2 = (uint32_t)(int32_t)wc[7] & 0xFFFFu;
  for (int32_t oy = 0; oy < oh; ++oy, out += ow) {
    const int8_t* row = in + 2 * oy * cols;
    int32_t ox = 0;
    for (; ox + 2 <= ow; ox += 2) {
      int32_t acc0 = corr, acc1 = corr;
      for (int32_t r = 0; r < 3; ++r) {
        const int8_t* p = row + r * cols + 2 * ox;
        uint32_t a = tinytrain_load32(p);
        uint32_t a02 = TINYTRAIN_SXTB16(a), a13 = tinytrain_sxtb16_ror8(a);
        acc0 = TINYTRAIN_SMLAD(w02[r], a02, acc0);
        acc1 = TINYTRAIN_SMLABT(w02[r], a02, acc1);
        if (r == 1) {
          acc0 = TINYTRAIN_SMLATB(w1_01, a13, acc0);
          acc1 = TINYTRAIN_SMLATT(w1_01, a13, acc1);
        } else {
          acc0 = TINYTRAIN_SMLABB(r == 0 ? w1_01 : w1_2, a13, acc0);
          acc1 = TINYTRAIN_SMLABT(r == 0 ? w1_01 : w1_2, a13, acc1);
        }
        acc1 = TINYTRAIN_SMLATB(w02[r], (uint32_t)(int32_t)p[4], acc1);
      }
      out[ox] = tinytrain_s8_finish(q, acc0, zy, lo, hi, kind, int8_range);
      out[ox + 1] = tinytrain_s8_finish(q, acc1, zy, lo, hi, kind, int8_range);
    }
    if (ox < ow) {
      int32_t acc = corr;
      for (int32_t r = 0; r < 3; ++r) {
        const int8_t* a = row + r * cols + 2 * ox;
        acc += wc[3 * r] * a[0] + wc[3 * r + 1] * a[1] + wc[3 * r + 2] * a[2];
      }
      out[ox] = tinytrain_s8_finish(q, acc, zy, lo, hi, kind, int8_range);
    }
  }
}
#endif

TINYTRAIN_S8_SPECIALISED void tinytrain_s8_depthwise_any(const int8_t* in, int32_t cols, const int8_t* wc,
                                                         int32_t corr, tinytrain_s8_requant_t q, int8_t* out,
                                                         int32_t oh, int32_t ow, int32_t kh, int32_t kw,
                                                         int32_t sh, int32_t sw, int32_t zy, int32_t lo,
                                                         int32_t hi, int32_t kind, int32_t int8_range) {
  for (int32_t oy = 0; oy < oh; ++oy) {
    for (int32_t ox = 0; ox < ow; ++ox) {
      const int8_t* window = in + oy * sh * cols + ox * sw;
      int32_t acc = corr;
      for (int32_t ky = 0; ky < kh; ++ky) {
        for (int32_t kx = 0; kx < kw; ++kx) acc += wc[ky * kw + kx] * window[ky * cols + kx];
      }
      *out++ = tinytrain_s8_finish(q, acc, zy, lo, hi, kind, int8_range);
    }
  }
}

#if TINYTRAIN_S8_SIMD
/* A channel's taps for SMLAD, row by row: each group of four (w0, w1, w2, w3) as the two words
 * (w0, w2), (w1, w3), SXTB16's order; each of the row's kw % 4 last taps alone in a word. */
static void tinytrain_s8_pack_taps(const int8_t* wc, int32_t kh, int32_t kw, uint8_t* packed) {
  for (int32_t ky = 0; ky < kh; ++ky) {
    const int8_t* row = wc + ky * kw;
    int32_t kx = 0;
    for (; kx + 4 <= kw; kx += 4, packed += 8) {
      uint32_t w02 = ((uint32_t)(int32_t)row[kx] & 0xFFFFu) | ((uint32_t)(int32_t)row[kx + 2] << 16);
      uint32_t w13 = ((uint32_t)(int32_t)row[kx + 1] & 0xFFFFu) | ((uint32_t)(int32_t)row[kx + 3] << 16);
      memcpy(packed, &w02, 4);
      memcpy(packed + 4, &w13, 4);
    }
    for (; kx < kw; ++kx, packed += 4) {
      uint32_t tap = (uint32_t)(int32_t)row[kx] & 0xFFFFu;
      memcpy(packed, &tap, 4);
    }
  }
}

/* any kernel of width >= 4: four taps of a row per load, two SMLADs */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_depthwise_taps(const int8_t* in, int32_t cols,
                                                          const uint8_t* packed, int32_t corr,
                                                          tinytrain_s8_requant_t q, int8_t* out, int32_t oh,
                                                          int32_t ow, int32_t kh, int32_t kw, int32_t sh,
                                                          int32_t sw, int32_t zy, int32_t lo, int32_t hi,
                                                          int32_t kind, int32_t int8_range) {
  int32_t groups = kw / 4, tail = kw % 4;
  for (int32_t oy = 0; oy < oh; ++oy) {
    for (int32_t ox = 0; ox < ow; ++ox) {
      const int8_t* window = in + oy * sh * cols + ox * sw;
      const uint8_t* t = packed;
      int32_t acc = corr;
      for (int32_t ky = 0; ky < kh; ++ky) {
        const int8_t* row = window + ky * cols;
        for (int32_t g = 0; g < groups; ++g, t += 8) {
          uint32_t a = tinytrain_load32(row + 4 * g);
          acc = TINYTRAIN_SMLAD(tinytrain_load32(t), TINYTRAIN_SXTB16(a), acc);
          acc = TINYTRAIN_SMLAD(tinytrain_load32(t + 4), tinytrain_sxtb16_ror8(a), acc);
        }
        for (int32_t i = 0; i < tail; ++i, t += 4) {
          acc = TINYTRAIN_SMLABB(tinytrain_load32(t), (uint32_t)(int32_t)row[4 * groups + i], acc);
        }
      }
      *out++ = tinytrain_s8_finish(q, acc, zy, lo, hi, kind, int8_range);
    }
  }
}
#endif

/* A depthwise call's sizes and data, for the per-channel loop */
typedef struct {
  const int8_t *x, *w;
  const int32_t *b, *mult, *shift;
  int8_t *y, *scratch;
  uint8_t* packed;
  int32_t c, h, wd, oh, ow, kh, kw, sh, sw, pt, rows, cols, zx, zy, lo, hi;
  tinytrain_s8_plane_t plane;
} tinytrain_s8_dw_call_t;

enum { TINYTRAIN_S8_DW_3X3_S1, TINYTRAIN_S8_DW_3X3_S2, TINYTRAIN_S8_DW_TAPS, TINYTRAIN_S8_DW_ANY };

/* Every channel of a call by one kernel: `kernel`, kh, kw, kind and int8_range are constants where the
 * call is specialised, so the kernel, its weight sum and its requantization are inlined into one loop
 * (no call and no dispatch per channel). */
TINYTRAIN_S8_SPECIALISED void tinytrain_s8_depthwise_each(const tinytrain_s8_dw_call_t* d, int32_t kernel,
                                                          int32_t kh, int32_t kw, int32_t kind,
                                                          int32_t int8_range, int32_t map) {
  /* map: the output's height and width where a small square map has its own copy (0: d's) */
  int32_t oh = map ? map : d->oh, ow = map ? map : d->ow, cols = map ? (map - 1) * d->sw + kw : d->cols;
  int32_t zx = d->zx, zy = d->zy, lo = d->lo, hi = d->hi;
  int32_t sh = d->sh, sw = d->sw, plane_size = d->h * d->wd;
  tinytrain_s8_plane_t plane = d->plane;
  const int8_t* wc = d->w;
  int8_t* out = d->y;
  for (int32_t ch = 0; ch < d->c; ++ch, wc += kh * kw, out += oh * ow) {
    tinytrain_s8_plane_copy(d->x + ch * plane_size, d->wd, cols, d->pt, plane, d->scratch);
    int32_t sum = 0;
    for (int32_t i = 0; i < kh * kw; ++i) sum += wc[i];
    int32_t corr = -zx * sum; /* sum w (x - zx) = sum w x - zx sum w, exactly */
    tinytrain_s8_requant_t q = tinytrain_s8_requant(d->b[ch], d->mult[ch], d->shift[ch], zy);
    if (kind == TINYTRAIN_S8_FAST || kind == TINYTRAIN_S8_FAST0) {
      /* 2 acc + bias2 = 2 (sum w x + corr + bias) (tinytrain_s8_requant_fits: no overflow): the sums
       * start at corr + bias, one register fewer */
      corr += d->b[ch];
      q.bias2 = 0;
    }
#if TINYTRAIN_S8_SIMD
    if (kernel == TINYTRAIN_S8_DW_3X3_S1) {
      tinytrain_s8_depthwise_3x3_s1(d->scratch, cols, wc, corr, q, out, oh, ow, zy, lo, hi, kind, int8_range);
      continue;
    }
    if (kernel == TINYTRAIN_S8_DW_3X3_S2) {
      tinytrain_s8_depthwise_3x3_s2(d->scratch, cols, wc, corr, q, out, oh, ow, zy, lo, hi, kind, int8_range);
      continue;
    }
    if (kernel == TINYTRAIN_S8_DW_TAPS) {
      tinytrain_s8_pack_taps(wc, kh, kw, d->packed);
      tinytrain_s8_depthwise_taps(d->scratch, cols, d->packed, corr, q, out, oh, ow, kh, kw, sh, sw, zy, lo,
                                  hi, kind, int8_range);
      continue;
    }
#else
    (void)kernel;
#endif
    tinytrain_s8_depthwise_any(d->scratch, cols, wc, corr, q, out, oh, ow, kh, kw, sh, sw, zy, lo, hi, kind,
                               int8_range);
  }
}

#if TINYTRAIN_S8_SIMD
#if defined(__GNUC__)
#define TINYTRAIN_S8_APART __attribute__((noinline))
#else
#define TINYTRAIN_S8_APART
#endif

/* MobileNetV2's last maps (4x4 outputs of stride 1, 2x2 of stride 2; the fast requantization with no
 * shift, the int8 range), their sizes constant: the loops unrolled. Functions apart, so that their
 * registers are allocated apart from the general kernels'. */
TINYTRAIN_S8_APART static void tinytrain_s8_depthwise_4x4_s1(const tinytrain_s8_dw_call_t* d) {
  tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S1, 3, 3, TINYTRAIN_S8_FAST0, 1, 4);
}

TINYTRAIN_S8_APART static void tinytrain_s8_depthwise_2x2_s2(const tinytrain_s8_dw_call_t* d) {
  tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S2, 3, 3, TINYTRAIN_S8_FAST0, 1, 2);
}

/* MobileNetV2's 3x3 layers at any other size, apart too */
TINYTRAIN_S8_APART static void tinytrain_s8_depthwise_3x3_s1_fast0(const tinytrain_s8_dw_call_t* d) {
  tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S1, 3, 3, TINYTRAIN_S8_FAST0, 1, 0);
}

TINYTRAIN_S8_APART static void tinytrain_s8_depthwise_3x3_s2_fast0(const tinytrain_s8_dw_call_t* d) {
  tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S2, 3, 3, TINYTRAIN_S8_FAST0, 1, 0);
}
#endif

/* the call's channels by the kernel specialised for its shape and mode */
static void tinytrain_s8_depthwise_dispatch(const tinytrain_s8_dw_call_t* d, tinytrain_s8_mode_t mode) {
  int32_t fast_int8 = mode.kind == TINYTRAIN_S8_FAST && mode.int8_range;
  int32_t kh = d->kh, kw = d->kw;
#if TINYTRAIN_S8_SIMD
  if (kh == 3 && kw == 3 && d->sh == 1 && d->sw == 1) {
    if (fast_int8 && mode.unshifted && d->oh == 4 && d->ow == 4) {
      tinytrain_s8_depthwise_4x4_s1(d);
    } else if (fast_int8 && mode.unshifted) {
      tinytrain_s8_depthwise_3x3_s1_fast0(d);
    } else if (fast_int8) {
      tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S1, 3, 3, TINYTRAIN_S8_FAST, 1, 0);
    } else {
      tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S1, 3, 3, mode.kind, mode.int8_range, 0);
    }
    return;
  }
  if (kh == 3 && kw == 3 && d->sh == 2 && d->sw == 2) {
    if (fast_int8 && mode.unshifted && d->oh == 2 && d->ow == 2) {
      tinytrain_s8_depthwise_2x2_s2(d);
    } else if (fast_int8 && mode.unshifted) {
      tinytrain_s8_depthwise_3x3_s2_fast0(d);
    } else if (fast_int8) {
      tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S2, 3, 3, TINYTRAIN_S8_FAST, 1, 0);
    } else {
      tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_3X3_S2, 3, 3, mode.kind, mode.int8_range, 0);
    }
    return;
  }
  if (kw >= 4) {
    if (fast_int8 && kh == 5 && kw == 5) { /* constant sizes: the tap loops unrolled */
      tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_TAPS, 5, 5, TINYTRAIN_S8_FAST, 1, 0);
    } else if (fast_int8 && kh == 7 && kw == 7) {
      tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_TAPS, 7, 7, TINYTRAIN_S8_FAST, 1, 0);
    } else {
      tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_TAPS, kh, kw, mode.kind, mode.int8_range, 0);
    }
    return;
  }
#endif
  if (fast_int8) {
    tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_ANY, kh, kw, TINYTRAIN_S8_FAST, 1, 0);
  } else {
    tinytrain_s8_depthwise_each(d, TINYTRAIN_S8_DW_ANY, kh, kw, mode.kind, mode.int8_range, 0);
  }
}

int32_t tinytrain_s8_depthwise(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                               int8_t* scratch, int32_t c, int32_t h, int32_t wd, int32_t oh, int32_t ow,
                               int32_t kh, int32_t kw, int32_t sh, int32_t sw, int32_t pt, int32_t pl,
                               int32_t zx, int32_t zy, int32_t lo, int32_t hi) {
  tinytrain_s8_dw_call_t d;
  d.x = x;
  d.w = w;
  d.b = b;
  d.mult = mult;
  d.shift = shift;
  d.y = y;
  d.scratch = scratch;
  d.c = c;
  d.h = h;
  d.wd = wd;
  d.oh = oh;
  d.ow = ow;
  d.kh = kh;
  d.kw = kw;
  d.sh = sh;
  d.sw = sw;
  d.pt = pt;
  d.rows = (oh - 1) * sh + kh;
  d.cols = (ow - 1) * sw + kw;
  d.zx = zx;
  d.zy = zy;
  d.lo = lo;
  d.hi = hi;
  d.packed = (uint8_t*)scratch + d.rows * d.cols + 4; /* the taps, for SMLAD */
  d.plane = tinytrain_s8_plane_fill(h, wd, d.rows, d.cols, pt, pl, zx, scratch);
  tinytrain_s8_depthwise_dispatch(&d, tinytrain_s8_mode(b, shift, c, kh * kw, lo, hi));
  return 0;
}

int32_t tinytrain_s8_linear(int8_t* x, int8_t* w, int32_t* b, int32_t* mult, int32_t* shift, int8_t* y,
                            int16_t* scratch, int32_t k, int32_t out_c, int32_t zx, int32_t zy, int32_t lo,
                            int32_t hi) {
  int16_t* col = scratch + k;
  for (int32_t i = 0; i < k; ++i) col[i] = (int16_t)(x[i] - zx);
  tinytrain_s8_place(scratch, col, k, 0, 1);
  for (int32_t o = 0; o < out_c; ++o) {
    int32_t acc = tinytrain_s8_dot(w + o * k, scratch, k);
    y[o] = tinytrain_s8_output(tinytrain_s8_requantize_once(acc, b[o], mult[o], shift[o]), zy, lo, hi);
  }
  return 0;
}
