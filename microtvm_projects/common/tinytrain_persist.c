/* The two-slot persistent region (see tinytrain_persist.h). */
#include "tinytrain_persist.h"

#include <string.h>

#include "tinytrain_model.h"
#include "tinytrain_port.h"
#include "tinytrain_protocol.h"

static tinytrain_boot_t tinytrain_boot;
/* the slot holding the newest valid save and its sequence; -1 when neither holds one */
static int32_t tinytrain_newest = -1;
static uint32_t tinytrain_newest_sequence;
static uint8_t tinytrain_block_buf[TINYTRAIN_MAX_WRITE_BLOCK];

static void tinytrain_le32(uint8_t* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t tinytrain_get_le32(const uint8_t* p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t tinytrain_round_up(uint32_t n, uint32_t block) { return (n + block - 1u) / block * block; }

/* the write block, or 0 when the port's cannot be used */
static uint32_t tinytrain_write_block(void) {
  uint32_t b = tinytrain_port_write_block();
  if (b == 0u || b > TINYTRAIN_MAX_WRITE_BLOCK || (b & (b - 1u))) return 0u;
  return b;
}

static uint32_t tinytrain_header_span(uint32_t block) {
  return tinytrain_round_up(TINYTRAIN_SLOT_HEADER_BYTES, block);
}

uint32_t tinytrain_persist_slot_need(void) {
  uint32_t block = tinytrain_write_block();
  if (!block) return 0xFFFFFFFFu;
  return tinytrain_header_span(block) + tinytrain_round_up(TINYTRAIN_RAM_BYTES, block);
}

static int tinytrain_region_usable(void) {
  return tinytrain_write_block() != 0u && tinytrain_port_slot_bytes() != 0u &&
         tinytrain_port_slot_bytes() >= tinytrain_persist_slot_need();
}

/* The CRC of a slot: model id, sequence, length, then the payload. */
static uint32_t tinytrain_slot_crc(const uint8_t* head, const void* payload) {
  uint32_t crc = tinytrain_crc32(0, head + 4, 12);
  return tinytrain_crc32(crc, payload, TINYTRAIN_RAM_BYTES);
}

/* Slot k's header: 0 and its sequence when it names this artifact, else a TINYTRAIN_BOOT_* flag. */
static uint32_t tinytrain_header(uint32_t k, uint8_t* head, uint32_t* sequence) {
  if (tinytrain_port_slot_read(k, 0, head, TINYTRAIN_SLOT_HEADER_BYTES)) return TINYTRAIN_BOOT_READ_FAILED;
  int erased = 1;
  for (uint32_t i = 0; i < TINYTRAIN_SLOT_HEADER_BYTES; ++i) erased &= head[i] == 0xFFu;
  if (erased) return TINYTRAIN_BOOT_EMPTY;
  if (tinytrain_get_le32(head) != TINYTRAIN_SLOT_MAGIC) return TINYTRAIN_BOOT_CORRUPT;
  if (tinytrain_get_le32(head + 4) != TINYTRAIN_MODEL_ID) return TINYTRAIN_BOOT_OTHER_MODEL;
  if (tinytrain_get_le32(head + 12) != TINYTRAIN_RAM_BYTES) return TINYTRAIN_BOOT_CORRUPT;
  *sequence = tinytrain_get_le32(head + 8);
  return 0;
}

/* Load slot k (its header read as head) into the RAM block: 0, or a TINYTRAIN_BOOT_* flag and the
 * RAM block as tinytrain_init sets it. */
static uint32_t tinytrain_load(uint32_t k, const uint8_t* head) {
  uint8_t* ram = (uint8_t*)tinytrain_params_buffer();
  uint32_t why = 0;
  if (tinytrain_port_slot_read(k, tinytrain_header_span(tinytrain_write_block()), ram, TINYTRAIN_RAM_BYTES))
    why = TINYTRAIN_BOOT_READ_FAILED;
  else if (tinytrain_slot_crc(head, ram) != tinytrain_get_le32(head + 16))
    why = TINYTRAIN_BOOT_CORRUPT;
  if (why) tinytrain_init();
  return why;
}

void tinytrain_persist_boot(void) {
  tinytrain_boot.source = TINYTRAIN_BOOT_COMPILED_IN;
  tinytrain_boot.sequence = 0;
  tinytrain_boot.reasons = 0;
  tinytrain_newest = -1;
  if (!tinytrain_region_usable()) {
    tinytrain_boot.reasons = TINYTRAIN_BOOT_NO_REGION;
    return;
  }
  uint8_t head[2][TINYTRAIN_SLOT_HEADER_BYTES];
  uint32_t seq[2] = {0, 0}, why[2];
  for (uint32_t k = 0; k < 2u; ++k) why[k] = tinytrain_header(k, head[k], &seq[k]);
  /* the newer one first (sequence numbers compared modulo 2^32) */
  uint32_t first = (why[1] == 0 && (why[0] != 0 || (int32_t)(seq[1] - seq[0]) > 0)) ? 1u : 0u;
  for (uint32_t i = 0; i < 2u; ++i) {
    uint32_t k = i ? 1u - first : first;
    if (why[k] == 0) why[k] = tinytrain_load(k, head[k]);
    if (why[k] == 0) {
      tinytrain_boot.source = k;
      tinytrain_boot.sequence = seq[k];
      tinytrain_newest = (int32_t)k;
      tinytrain_newest_sequence = seq[k];
      if (i == 0 && why[1u - k] == 0) why[1u - k] = TINYTRAIN_BOOT_OLDER; /* valid header, not loaded */
      break;
    }
  }
  for (uint32_t k = 0; k < 2u; ++k) {
    if (k != tinytrain_boot.source) tinytrain_boot.reasons |= why[k] << (8u * k);
  }
}

const tinytrain_boot_t* tinytrain_persist_boot_info(void) { return &tinytrain_boot; }

/* Program n bytes of src at offset of slot k, the last block padded with 0xFF. */
static int tinytrain_program(uint32_t k, uint32_t offset, const uint8_t* src, uint32_t n, uint32_t block) {
  uint32_t whole = n / block * block;
  for (uint32_t done = 0; done < whole; done += block) {
    if (tinytrain_port_slot_program(k, offset + done, src + done, block)) return -1;
  }
  if (whole < n) {
    memset(tinytrain_block_buf, 0xFF, block);
    memcpy(tinytrain_block_buf, src + whole, n - whole);
    if (tinytrain_port_slot_program(k, offset + whole, tinytrain_block_buf, block)) return -1;
  }
  return 0;
}

int tinytrain_persist_save(uint32_t* sequence) {
  if (!tinytrain_region_usable()) return -1;
  uint32_t block = tinytrain_write_block();
  uint32_t k = tinytrain_newest < 0 ? 0u : 1u - (uint32_t)tinytrain_newest;
  uint32_t next = tinytrain_newest < 0 ? 1u : tinytrain_newest_sequence + 1u;
  const uint8_t* ram = (const uint8_t*)tinytrain_params_buffer();
  uint8_t head[TINYTRAIN_SLOT_HEADER_BYTES];
  tinytrain_le32(head, TINYTRAIN_SLOT_MAGIC);
  tinytrain_le32(head + 4, TINYTRAIN_MODEL_ID);
  tinytrain_le32(head + 8, next);
  tinytrain_le32(head + 12, TINYTRAIN_RAM_BYTES);
  tinytrain_le32(head + 16, tinytrain_slot_crc(head, ram));
  /* the slot about to be erased is no longer a save to fall back on */
  if (tinytrain_port_slot_erase(k)) return -1;
  if (tinytrain_program(k, tinytrain_header_span(block), ram, TINYTRAIN_RAM_BYTES, block)) return -1;
  if (tinytrain_program(k, 0, head, sizeof head, block)) return -1; /* the commit: header last */
  tinytrain_newest = (int32_t)k;
  tinytrain_newest_sequence = next;
  *sequence = next;
  return 0;
}

int tinytrain_persist_erase(void) {
  if (!tinytrain_region_usable()) return -1;
  int rc = tinytrain_port_slot_erase(0) | tinytrain_port_slot_erase(1);
  tinytrain_newest = -1;
  return rc ? -1 : 0;
}
