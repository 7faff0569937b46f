/* The device side of the framed byte protocol (see tinytrain_protocol.h). */
#include "tinytrain_protocol.h"

#include <string.h>

#include "tinytrain_model.h"

#define TINYTRAIN_PROTOCOL_VERSION 3u

static uint32_t tinytrain_crc32(uint32_t crc, const uint8_t* p, size_t n) {
  crc = ~crc;
  while (n--) {
    crc ^= *p++;
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

static void tinytrain_put_u32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t tinytrain_get_u32(const uint8_t* p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Read n payload bytes into dst (or discard them when dst is NULL), updating the crc. */
static int tinytrain_receive(void* dst, size_t n, uint32_t* crc) {
  uint8_t scratch[64];
  uint8_t* out = (uint8_t*)dst;
  while (n) {
    size_t chunk = out ? n : (n < sizeof scratch ? n : sizeof scratch);
    uint8_t* p = out ? out : scratch;
    if (tinytrain_port_read(p, chunk)) return -1;
    *crc = tinytrain_crc32(*crc, p, chunk);
    if (out) out += chunk;
    n -= chunk;
  }
  return 0;
}

static void tinytrain_respond(uint8_t status, const void* a, uint32_t na, const void* b, uint32_t nb) {
  uint8_t head[7] = {'T', 'R', status};
  tinytrain_put_u32(head + 3, na + nb);
  uint32_t crc = tinytrain_crc32(0, head + 2, 5);
  crc = tinytrain_crc32(crc, (const uint8_t*)a, na);
  crc = tinytrain_crc32(crc, (const uint8_t*)b, nb);
  uint8_t tail[4];
  tinytrain_put_u32(tail, crc);
  tinytrain_port_write(head, sizeof head);
  if (na) tinytrain_port_write(a, na);
  if (nb) tinytrain_port_write(b, nb);
  tinytrain_port_write(tail, sizeof tail);
  tinytrain_port_flush();
}

static _Alignas(8) uint8_t tinytrain_label[TINYTRAIN_LABEL_BYTES];
static _Alignas(8) uint8_t tinytrain_logits[TINYTRAIN_OUTPUT_BYTES];

int tinytrain_serve(void) {
  for (;;) {
    uint8_t head[7];
    if (tinytrain_port_read(head, 2)) return 1;
    if (head[0] != 'T' || head[1] != 'T') continue; /* resynchronise on the magic */
    if (tinytrain_port_read(head + 2, 5)) return 1;
    uint8_t cmd = head[2];
    uint32_t len = tinytrain_get_u32(head + 3);
    uint32_t crc = tinytrain_crc32(0, head + 2, 5);
    uint8_t* input = (uint8_t*)tinytrain_input_buffer();
    uint8_t* ram = (uint8_t*)tinytrain_params_buffer();
    uint32_t ram_bytes = TINYTRAIN_PARAMS_BYTES + TINYTRAIN_STATE_BYTES;
    uint8_t rate[4];
    /* where the payload goes */
    uint32_t expect = 0;
    uint8_t *dst1 = NULL, *dst2 = NULL;
    uint32_t n1 = 0;
    if (cmd == 'T') { expect = TINYTRAIN_INPUT_BYTES + TINYTRAIN_LABEL_BYTES; dst1 = input; n1 = TINYTRAIN_INPUT_BYTES; dst2 = tinytrain_label; }
    else if (cmd == 'P') { expect = TINYTRAIN_INPUT_BYTES; dst1 = input; n1 = expect; }
    else if (cmd == 'S') { expect = ram_bytes; dst1 = ram; n1 = expect; }
    else if (cmd == 'L') { expect = 4; dst1 = rate; n1 = expect; }
    int bad_length = len != expect;
    if (bad_length) {
      if (tinytrain_receive(NULL, len, &crc)) return 1;
    } else {
      if (tinytrain_receive(dst1, n1, &crc)) return 1;
      if (tinytrain_receive(dst2, len - n1, &crc)) return 1;
    }
    uint8_t tail[4];
    if (tinytrain_port_read(tail, 4)) return 1;
    if (tinytrain_get_u32(tail) != crc) { tinytrain_respond(1, NULL, 0, NULL, 0); continue; }
    if (cmd != 'T' && cmd != 'P' && cmd != 'S' && cmd != 'I' && cmd != 'G' && cmd != 'R' && cmd != 'M' &&
        cmd != 'L' && cmd != 'Q') { tinytrain_respond(3, NULL, 0, NULL, 0); continue; }
    if (bad_length) { tinytrain_respond(2, NULL, 0, NULL, 0); continue; }
    switch (cmd) {
      case 'I': {
        uint8_t info[28];
        uint32_t v[7] = {TINYTRAIN_PROTOCOL_VERSION, TINYTRAIN_ARENA_BYTES, TINYTRAIN_INPUT_BYTES,
                         TINYTRAIN_LABEL_BYTES, TINYTRAIN_OUTPUT_BYTES, TINYTRAIN_PARAMS_BYTES,
                         TINYTRAIN_STATE_BYTES};
        for (int i = 0; i < 7; ++i) tinytrain_put_u32(info + 4 * i, v[i]);
        tinytrain_respond(0, info, sizeof info, NULL, 0);
        break;
      }
      case 'T': {
        float loss = 0.0f;
        uint64_t t0 = tinytrain_port_cost();
        int rc = tinytrain_train_step((const tinytrain_input_t*)input, (const tinytrain_label_t*)tinytrain_label, &loss);
        uint64_t cost = tinytrain_port_cost() - t0;
        uint8_t out[16];
        memcpy(out, &loss, 4);
        memcpy(out + 4, &cost, 8);
        tinytrain_put_u32(out + 12, (uint32_t)rc);
        tinytrain_respond(rc == TINYTRAIN_OK ? 0 : rc == TINYTRAIN_KERNEL_FAILED ? 4 : 5, out, sizeof out, NULL, 0);
        break;
      }
      case 'P': {
        uint64_t t0 = tinytrain_port_cost();
        int rc = tinytrain_predict((const tinytrain_input_t*)input, (tinytrain_output_t*)tinytrain_logits);
        uint64_t cost = tinytrain_port_cost() - t0;
        tinytrain_respond(rc ? 4 : 0, tinytrain_logits, TINYTRAIN_OUTPUT_BYTES, &cost, 8);
        break;
      }
      case 'G': tinytrain_respond(0, ram, ram_bytes, NULL, 0); break;
      case 'S': tinytrain_respond(0, NULL, 0, NULL, 0); break;
      case 'R': tinytrain_init(); tinytrain_respond(0, NULL, 0, NULL, 0); break;
      case 'L': {
        float lr;
        memcpy(&lr, rate, sizeof lr);
        tinytrain_respond(tinytrain_set_learning_rate(lr) ? 6 : 0, NULL, 0, NULL, 0);
        break;
      }
      case 'M': {
        uint32_t used = 0, reserved = 0;
        uint8_t out[8];
        tinytrain_port_stack(&used, &reserved);
        tinytrain_put_u32(out, used);
        tinytrain_put_u32(out + 4, reserved);
        tinytrain_respond(0, out, 8, NULL, 0);
        break;
      }
      default: /* 'Q' */
        tinytrain_respond(0, NULL, 0, NULL, 0);
        return 0;
    }
  }
}
