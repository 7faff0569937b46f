/* Learned values that survive power loss: the RAM block (trainable parameters, then optimizer
 * state) in one of two slots of the port's persistent region.
 *
 * A slot: header {magic, model id, sequence, length, crc32 over model id, sequence, length and
 * payload}, padded to the write block, then the payload (the RAM block), padded too. A save erases
 * the older slot, programs the payload, then the header last: a save cut short leaves no valid
 * header, and the other slot, untouched, is still the newest valid one. Boot takes the newest slot
 * (highest sequence) whose magic, model id, length and CRC hold, else the other, else the
 * compiled-in values, and remembers which and why. */
#ifndef TINYTRAIN_PERSIST_H_
#define TINYTRAIN_PERSIST_H_

#include <stdint.h>

#define TINYTRAIN_SLOT_MAGIC 0x54545331u /* "1STT" */
#define TINYTRAIN_SLOT_HEADER_BYTES 20u
#define TINYTRAIN_MAX_WRITE_BLOCK 256u

/* Why a slot was not used, per slot k (0, 1): flag << (8 * k); TINYTRAIN_BOOT_NO_REGION alone. */
#define TINYTRAIN_BOOT_EMPTY 1u        /* erased or never written */
#define TINYTRAIN_BOOT_CORRUPT 2u      /* a header or a CRC that does not hold (a torn save) */
#define TINYTRAIN_BOOT_OTHER_MODEL 4u  /* written by another artifact (model id) */
#define TINYTRAIN_BOOT_READ_FAILED 8u  /* the port could not read it */
#define TINYTRAIN_BOOT_OLDER 16u       /* valid, but the other slot is newer */
#define TINYTRAIN_BOOT_NO_REGION 0x10000u /* the port has no persistent region (or it is too small) */

#define TINYTRAIN_BOOT_COMPILED_IN 2u

typedef struct {
  uint32_t source;   /* 0 or 1: that slot; TINYTRAIN_BOOT_COMPILED_IN */
  uint32_t sequence; /* of the slot loaded; 0 for the compiled-in values */
  uint32_t reasons;  /* TINYTRAIN_BOOT_* flags */
} tinytrain_boot_t;

/* Load the newest valid slot into the RAM block (after tinytrain_init); what was loaded and why. */
void tinytrain_persist_boot(void);
const tinytrain_boot_t* tinytrain_persist_boot_info(void);
/* Save the RAM block to the older slot; 0 and *sequence, or -1 (the newest valid slot unchanged). */
int tinytrain_persist_save(uint32_t* sequence);
/* Erase both slots; 0 or -1. */
int tinytrain_persist_erase(void);
/* Bytes one slot needs for this artifact (header and payload, padded to the write block). */
uint32_t tinytrain_persist_slot_need(void);

#endif
