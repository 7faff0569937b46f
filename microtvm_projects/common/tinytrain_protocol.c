/* The device side of the framed byte protocol, version 4 (see tinytrain_protocol.h): frames are
 * found, checked (header, then CRC, then values) and only then applied. */
#include "tinytrain_protocol.h"

#include <string.h>

#include "tinytrain_model.h"
#include "tinytrain_persist.h"

enum {
  TINYTRAIN_ST_OK = 0,
  TINYTRAIN_ST_CHECKSUM = 1,
  TINYTRAIN_ST_LENGTH = 2,
  TINYTRAIN_ST_COMMAND = 3,
  TINYTRAIN_ST_KERNEL = 4,
  TINYTRAIN_ST_NONFINITE_STEP = 5,
  TINYTRAIN_ST_RATE = 6,
  TINYTRAIN_ST_LABEL = 7,
  TINYTRAIN_ST_NONFINITE_VALUE = 8,
  TINYTRAIN_ST_REGION = 9,
};

/* the largest 'S' chunk: the arena stages it */
#define TINYTRAIN_CHUNK_BYTES \
  ((TINYTRAIN_ARENA_BYTES < TINYTRAIN_RAM_BYTES ? TINYTRAIN_ARENA_BYTES : TINYTRAIN_RAM_BYTES) & ~3u)

uint32_t tinytrain_crc32(uint32_t crc, const void* data, size_t n) {
  const uint8_t* p = (const uint8_t*)data;
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

static void tinytrain_respond(uint8_t status, uint8_t id, const void* a, uint32_t na, const void* b,
                              uint32_t nb) {
  uint8_t head[8] = {TINYTRAIN_RESPONSE_MAGIC0, TINYTRAIN_RESPONSE_MAGIC1, status, id};
  tinytrain_put_u32(head + 4, na + nb);
  uint32_t crc = tinytrain_crc32(0, head + 2, 6);
  crc = tinytrain_crc32(crc, a, na);
  crc = tinytrain_crc32(crc, b, nb);
  uint8_t tail[4];
  tinytrain_put_u32(tail, crc);
  tinytrain_port_write(head, sizeof head);
  if (na) tinytrain_port_write(a, na);
  if (nb) tinytrain_port_write(b, nb);
  tinytrain_port_write(tail, sizeof tail);
  tinytrain_port_flush();
}

static void tinytrain_status(uint8_t status, uint8_t id) { tinytrain_respond(status, id, NULL, 0, NULL, 0); }

/* Read n bytes into dst, updating the crc. */
static int tinytrain_receive(void* dst, uint32_t n, uint32_t* crc) {
  if (n && tinytrain_port_read(dst, n)) return -1;
  *crc = tinytrain_crc32(*crc, dst, n);
  return 0;
}

/* The payload length a command takes; 'S' takes any in its bounds. -1: unknown command. */
static int tinytrain_length_ok(uint8_t cmd, uint32_t len) {
  switch (cmd) {
    case 'I': case 'G': case 'R': case 'M': case 'W': case 'E': case 'Q': return len == 0;
    case 'T': return len == TINYTRAIN_INPUT_BYTES + TINYTRAIN_LABEL_BYTES;
    case 'P': return len == TINYTRAIN_INPUT_BYTES;
    case 'L': return len == 4;
    case 'S': return len > 4 && len - 4 <= TINYTRAIN_CHUNK_BYTES && len % 4 == 0;
    default: return -1;
  }
}

static int tinytrain_finite(uint32_t bits) { return (bits & 0x7F800000u) != 0x7F800000u; }

/* Check an 'S' chunk (n bytes for the RAM block at offset, at p): a status and the tensor's index. */
static uint8_t tinytrain_check_chunk(uint32_t offset, const uint8_t* p, uint32_t n, uint32_t* index) {
  if (offset % 4 || offset > TINYTRAIN_RAM_BYTES || n > TINYTRAIN_RAM_BYTES - offset) return TINYTRAIN_ST_LENGTH;
  for (uint32_t t = 0; t < TINYTRAIN_RAM_TENSORS; ++t) {
    const tinytrain_ram_tensor_t* r = &tinytrain_ram_tensors[t];
    uint32_t lo = r->offset > offset ? r->offset : offset;
    uint32_t hi = r->offset + r->bytes < offset + n ? r->offset + r->bytes : offset + n;
    if (!r->float32 || lo >= hi) continue;
    *index = t;
    for (uint32_t at = lo; at + 4 <= hi; at += 4) {
      uint32_t bits = tinytrain_get_u32(p + (at - offset));
      if (!tinytrain_finite(bits)) return r->learning_rate ? TINYTRAIN_ST_RATE : TINYTRAIN_ST_NONFINITE_VALUE;
      if (r->learning_rate && (bits & 0x80000000u) && bits != 0x80000000u) return TINYTRAIN_ST_RATE;
    }
  }
  return TINYTRAIN_ST_OK;
}

static _Alignas(8) uint8_t tinytrain_label[TINYTRAIN_LABEL_BYTES];
static _Alignas(8) uint8_t tinytrain_logits[TINYTRAIN_OUTPUT_BYTES];

/* Serve one checked frame. Returns 1 after 'Q'. */
static int tinytrain_dispatch(uint8_t cmd, uint8_t id, uint8_t* payload, uint32_t len) {
  uint8_t* ram = (uint8_t*)tinytrain_params_buffer();
  switch (cmd) {
    case 'I': {
      const tinytrain_boot_t* boot = tinytrain_persist_boot_info();
      uint32_t v[12] = {TINYTRAIN_PROTOCOL_VERSION, TINYTRAIN_ARENA_BYTES, TINYTRAIN_INPUT_BYTES,
                        TINYTRAIN_LABEL_BYTES, TINYTRAIN_OUTPUT_BYTES, TINYTRAIN_PARAMS_BYTES,
                        TINYTRAIN_STATE_BYTES, TINYTRAIN_MODEL_ID, boot->source, boot->sequence,
                        boot->reasons, tinytrain_port_slot_bytes()};
      uint8_t info[sizeof v];
      for (int i = 0; i < 12; ++i) tinytrain_put_u32(info + 4 * i, v[i]);
      tinytrain_respond(TINYTRAIN_ST_OK, id, info, sizeof info, NULL, 0);
      break;
    }
    case 'T': {
      float loss = 0.0f;
      uint64_t t0 = tinytrain_port_cost();
      int rc = tinytrain_train_step((const tinytrain_input_t*)payload, (const tinytrain_label_t*)tinytrain_label,
                                    &loss);
      uint64_t cost = tinytrain_port_cost() - t0;
      uint8_t out[16];
      memcpy(out, &loss, 4);
      memcpy(out + 4, &cost, 8);
      tinytrain_put_u32(out + 12, (uint32_t)rc);
      uint8_t status = rc == TINYTRAIN_OK ? TINYTRAIN_ST_OK
                       : rc == TINYTRAIN_KERNEL_FAILED ? TINYTRAIN_ST_KERNEL
                       : rc == TINYTRAIN_BAD_LABEL ? TINYTRAIN_ST_LABEL
                                                   : TINYTRAIN_ST_NONFINITE_STEP;
      tinytrain_respond(status, id, out, sizeof out, NULL, 0);
      break;
    }
    case 'P': {
      uint64_t t0 = tinytrain_port_cost();
      int rc = tinytrain_predict((const tinytrain_input_t*)payload, (tinytrain_output_t*)tinytrain_logits);
      uint64_t cost = tinytrain_port_cost() - t0;
      tinytrain_respond(rc ? TINYTRAIN_ST_KERNEL : TINYTRAIN_ST_OK, id, tinytrain_logits, TINYTRAIN_OUTPUT_BYTES,
                        &cost, 8);
      break;
    }
    case 'G': tinytrain_respond(TINYTRAIN_ST_OK, id, ram, TINYTRAIN_RAM_BYTES, NULL, 0); break;
    case 'S': {
      const uint8_t* chunk = (const uint8_t*)tinytrain_arena_buffer();
      uint32_t offset = tinytrain_get_u32(payload), index = 0, n = len - 4;
      uint8_t status = tinytrain_check_chunk(offset, chunk, n, &index);
      if (status == TINYTRAIN_ST_OK) memcpy(ram + offset, chunk, n);
      uint8_t out[4];
      tinytrain_put_u32(out, index);
      tinytrain_respond(status, id, out, status == TINYTRAIN_ST_OK || status == TINYTRAIN_ST_LENGTH ? 0 : 4, NULL, 0);
      break;
    }
    case 'R': tinytrain_init(); tinytrain_status(TINYTRAIN_ST_OK, id); break;
    case 'L': {
      float lr;
      memcpy(&lr, payload, sizeof lr);
      tinytrain_status(tinytrain_set_learning_rate(lr) ? TINYTRAIN_ST_RATE : TINYTRAIN_ST_OK, id);
      break;
    }
    case 'M': {
      uint32_t used = 0, reserved = 0;
      uint8_t out[8];
      tinytrain_port_stack(&used, &reserved);
      tinytrain_put_u32(out, used);
      tinytrain_put_u32(out + 4, reserved);
      tinytrain_respond(TINYTRAIN_ST_OK, id, out, 8, NULL, 0);
      break;
    }
    case 'W': {
      uint32_t sequence = 0;
      uint8_t out[4];
      int rc = tinytrain_persist_save(&sequence);
      tinytrain_put_u32(out, sequence);
      tinytrain_respond(rc ? TINYTRAIN_ST_REGION : TINYTRAIN_ST_OK, id, out, rc ? 0 : 4, NULL, 0);
      break;
    }
    case 'E': tinytrain_status(tinytrain_persist_erase() ? TINYTRAIN_ST_REGION : TINYTRAIN_ST_OK, id); break;
    default: /* 'Q' */
      tinytrain_status(TINYTRAIN_ST_OK, id);
      return 1;
  }
  return 0;
}

int tinytrain_serve(void) {
  uint8_t last = 0;
  for (;;) {
    /* a sliding-window scan for the magic: a stray byte never hides the next frame */
    uint8_t byte;
    if (tinytrain_port_read(&byte, 1)) return 1;
    int found = last == TINYTRAIN_REQUEST_MAGIC0 && byte == TINYTRAIN_REQUEST_MAGIC1;
    last = byte;
    if (!found) continue;
    last = 0;
    uint8_t head[6];
    if (tinytrain_port_read(head, sizeof head)) return 1;
    uint8_t cmd = head[0], id = head[1];
    uint32_t len = tinytrain_get_u32(head + 2);
    int ok = tinytrain_length_ok(cmd, len);
    if (ok <= 0) { /* answered at once: the declared payload is not consumed */
      tinytrain_status(ok < 0 ? TINYTRAIN_ST_COMMAND : TINYTRAIN_ST_LENGTH, id);
      continue;
    }
    /* where the payload goes: the sample in place in the arena; 'L' and the offset of 'S' in
     * `small`, then the rest of 'S' (a chunk) staged in the arena; the label of 'T' aside */
    uint8_t small[4];
    uint8_t* payload = (uint8_t*)tinytrain_arena_buffer();
    uint8_t* rest = NULL;
    uint32_t crc = tinytrain_crc32(0, head, sizeof head), first = len;
    if (cmd == 'T' || cmd == 'P') payload = (uint8_t*)tinytrain_input_buffer();
    if (cmd == 'T') rest = tinytrain_label;
    if (cmd == 'S') rest = payload;
    if (cmd == 'L' || cmd == 'S') payload = small;
    if (rest) first = cmd == 'T' ? TINYTRAIN_INPUT_BYTES : 4u;
    if (tinytrain_receive(payload, first, &crc)) return 1;
    if (rest && tinytrain_receive(rest, len - first, &crc)) return 1;
    uint8_t tail[4];
    if (tinytrain_port_read(tail, 4)) return 1;
    if (tinytrain_get_u32(tail) != crc) {
      tinytrain_status(TINYTRAIN_ST_CHECKSUM, id);
      continue;
    }
    if (tinytrain_dispatch(cmd, id, payload, len)) return 0;
  }
}
