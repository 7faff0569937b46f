/* expf and logf of the artifact: the same float operations on every target, so the host
 * build and the Cortex-M build of one artifact give bit-identical results whatever their
 * libm. Cody-Waite range reduction and polynomials; within 2 ulp of the exact result. */
#include <stdint.h>
#include <string.h>

#include "tinytrain_internal.h"

static float tinytrain_from_bits(uint32_t bits) {
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

static uint32_t tinytrain_to_bits(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return bits;
}

float tinytrain_expf(float x) {
  if (x != x) return x;
  if (x > 88.7228394f) return tinytrain_from_bits(0x7f800000u);
  if (x < -103.972084f) return 0.0f;
  /* x = n ln2 + r, |r| <= ln2 / 2 */
  float t = x * 1.44269504f;
  int32_t n = (int32_t)(t + (t >= 0.0f ? 0.5f : -0.5f));
  float fn = (float)n;
  float r = (x - fn * 0.693145752f) - fn * 1.42860677e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  /* scale by 2^n in two exact steps, so subnormal results need no special case */
  int32_t half = n / 2;
  return p * tinytrain_from_bits((uint32_t)(half + 127) << 23) *
         tinytrain_from_bits((uint32_t)(n - half + 127) << 23);
}

float tinytrain_logf(float x) {
  if (x != x || x == tinytrain_from_bits(0x7f800000u)) return x;
  if (x < 0.0f) return tinytrain_from_bits(0x7fc00000u);
  if (x == 0.0f) return tinytrain_from_bits(0xff800000u);
  int32_t e = 0;
  if (x < 1.17549435e-38f) { /* subnormal: make it normal first */
    x *= 8388608.0f;
    e = -23;
  }
  uint32_t bits = tinytrain_to_bits(x);
  e += (int32_t)((bits >> 23) & 0xffu) - 127;
  float m = tinytrain_from_bits((bits & 0x007fffffu) | 0x3f800000u); /* [1, 2) */
  if (m > 1.41421354f) {
    m *= 0.5f;
    e += 1;
  }
  /* log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172 */
  float f = m - 1.0f;
  float s = f / (2.0f + f);
  float z = s * s;
  float p = 1.0f / 11.0f;
  p = p * z + 1.0f / 9.0f;
  p = p * z + 1.0f / 7.0f;
  p = p * z + 1.0f / 5.0f;
  p = p * z + 1.0f / 3.0f;
  float fe = (float)e;
  float log_m = 2.0f * s + 2.0f * s * z * p;
  return fe * 0.693145752f + (log_m + fe * 1.42860677e-6f);
}
