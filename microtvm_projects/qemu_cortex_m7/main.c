/* QEMU Cortex-M7 template: the device served over semihosting (the host's stdin and stdout),
 * costs in instructions from SysTick under -icount shift=0. The persistent region is a host file
 * through semihosting (build/tinytrain.slots, relative to QEMU's folder), with flash semantics and
 * an optional emulated delay per programmed write block (make FLASH_DELAY_US=...). make PROFILE=1 adds
 * the per-kernel profile (below), written to build/profile.bin at exit. */
#include <stdint.h>
#include <string.h>

#include "tinytrain_model.h"
#include "tinytrain_persist.h"
#include "tinytrain_port.h"

uint32_t tinytrain_stack_used(void);
uint32_t tinytrain_stack_reserved(void);

static int32_t tinytrain_semihost(uint32_t op, void* arg) {
  register uint32_t r0 __asm__("r0") = op;
  register void* r1 __asm__("r1") = arg;
  __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
  return (int32_t)r0;
}

void tinytrain_exit(int code) {
  uint32_t block[2] = {0x20026u, (uint32_t)code}; /* ADP_Stopped_ApplicationExit */
  tinytrain_semihost(0x20u, block);                /* SYS_EXIT_EXTENDED */
}

static int32_t tinytrain_in = -1, tinytrain_out = -1;

static int32_t tinytrain_open(const char* path, uint32_t mode) {
  uint32_t block[3] = {(uint32_t)(uintptr_t)path, mode, (uint32_t)strlen(path)};
  return tinytrain_semihost(0x01u, block); /* SYS_OPEN */
}

int tinytrain_port_read(void* buf, size_t n) {
  uint8_t* p = (uint8_t*)buf;
  while (n) {
    uint32_t block[3] = {(uint32_t)tinytrain_in, (uint32_t)(uintptr_t)p, (uint32_t)n};
    int32_t left = tinytrain_semihost(0x06u, block); /* SYS_READ: returns bytes not read */
    size_t got = n - (size_t)left;
    if (left < 0 || got == 0) return -1;
    p += got;
    n -= got;
  }
  return 0;
}

int tinytrain_port_write(const void* buf, size_t n) {
  uint32_t block[3] = {(uint32_t)tinytrain_out, (uint32_t)(uintptr_t)buf, (uint32_t)n};
  return tinytrain_semihost(0x05u, block) == 0 ? 0 : -1; /* SYS_WRITE */
}

void tinytrain_port_flush(void) {}

/* SysTick on the processor clock, wrapping every 2^24 ticks; under -icount shift=0 on mps2
 * one tick is 40 instructions (25 MHz SysTick against 1 instruction per virtual ns). */
#define SYST_CSR (*(volatile uint32_t*)0xE000E010u)
#define SYST_RVR (*(volatile uint32_t*)0xE000E014u)
#define SYST_CVR (*(volatile uint32_t*)0xE000E018u)
static volatile uint32_t tinytrain_wraps;

void tinytrain_systick(void) { tinytrain_wraps++; }

static uint64_t tinytrain_clock(void) {
  uint32_t wraps, now;
  do {
    wraps = tinytrain_wraps;
    now = SYST_CVR;
  } while (wraps != tinytrain_wraps);
  return ((uint64_t)wraps * 0x1000000u + (0xFFFFFFu - now)) * 40u;
}

#ifdef TINYTRAIN_PROFILE
/* ---- the per-kernel profile (make PROFILE=1): each kernel's slot accumulates the instructions
 * since the clock's last reading, the previous mark or the protocol's reading just before the step
 * (or predict) began, so a step's slots sum to its cost less what runs after its last kernel. A mark's
 * own instructions land in the next kernel's slot; the clock counts in steps of 40 instructions.
 * The table goes to build/profile.bin when the device exits: "TTPF", version, slots, marks lost to
 * slots beyond the table, then per slot the instructions (uint64) and the marks (uint32), all
 * little-endian. */
static uint64_t tinytrain_profile_last;
static uint64_t tinytrain_profile_cost[TINYTRAIN_PROFILE_SLOTS];
static uint32_t tinytrain_profile_marks[TINYTRAIN_PROFILE_SLOTS];
static uint32_t tinytrain_profile_lost;

void tinytrain_profile_kernel(uint32_t slot) {
  uint64_t now = tinytrain_clock();
  if (slot < TINYTRAIN_PROFILE_SLOTS) {
    tinytrain_profile_cost[slot] += now - tinytrain_profile_last;
    tinytrain_profile_marks[slot]++;
  } else {
    tinytrain_profile_lost++;
  }
  tinytrain_profile_last = now;
}
#endif

uint64_t tinytrain_port_cost(void) {
  uint64_t now = tinytrain_clock();
#ifdef TINYTRAIN_PROFILE
  tinytrain_profile_last = now;
#endif
  return now;
}

void tinytrain_port_stack(uint32_t* used, uint32_t* reserved) {
  *used = tinytrain_stack_used();
  *reserved = tinytrain_stack_reserved();
}

/* ---- the persistent region: a host file of two slots, through semihosting */
static int32_t tinytrain_slots = -1;

uint32_t tinytrain_port_slot_bytes(void) {
  return tinytrain_slots < 0 ? 0u : (tinytrain_persist_slot_need() + 255u) / 256u * 256u;
}

uint32_t tinytrain_port_write_block(void) { return TINYTRAIN_WRITE_BLOCK; }

/* Busy-wait us microseconds of emulated time (one instruction per virtual ns under -icount 0). */
static void tinytrain_flash_delay(uint32_t us) {
  uint64_t until = tinytrain_port_cost() + (uint64_t)us * 1000u;
  while (tinytrain_port_cost() < until) {
  }
}

static int tinytrain_seek(uint32_t slot, uint32_t offset, uint32_t n) {
  uint32_t bytes = tinytrain_port_slot_bytes();
  if (slot >= 2u || offset > bytes || n > bytes - offset) return -1;
  uint32_t block[2] = {(uint32_t)tinytrain_slots, slot * bytes + offset};
  return tinytrain_semihost(0x0Au, block) == 0 ? 0 : -1; /* SYS_SEEK */
}

static int tinytrain_file_write(const void* buf, uint32_t n) {
  uint32_t block[3] = {(uint32_t)tinytrain_slots, (uint32_t)(uintptr_t)buf, n};
  return tinytrain_semihost(0x05u, block) == 0 ? 0 : -1; /* SYS_WRITE: bytes not written */
}

int tinytrain_port_slot_read(uint32_t slot, uint32_t offset, void* buf, uint32_t n) {
  if (tinytrain_seek(slot, offset, n)) return -1;
  uint32_t block[3] = {(uint32_t)tinytrain_slots, (uint32_t)(uintptr_t)buf, n};
  return tinytrain_semihost(0x06u, block) == 0 ? 0 : -1; /* SYS_READ: bytes not read */
}

int tinytrain_port_slot_program(uint32_t slot, uint32_t offset, const void* buf, uint32_t n) {
  if (offset % TINYTRAIN_WRITE_BLOCK || n % TINYTRAIN_WRITE_BLOCK || tinytrain_seek(slot, offset, n)) return -1;
  const uint8_t* p = (const uint8_t*)buf;
  for (uint32_t done = 0; done < n; done += TINYTRAIN_WRITE_BLOCK) {
    tinytrain_flash_delay(TINYTRAIN_FLASH_DELAY_US);
    if (tinytrain_file_write(p + done, TINYTRAIN_WRITE_BLOCK)) return -1;
  }
  return 0;
}

static int tinytrain_fill(uint32_t n) {
  static const uint8_t ones[64] = {
      0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
      0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
      0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
      0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF};
  for (uint32_t done = 0; done < n; done += sizeof ones) {
    if (tinytrain_file_write(ones, n - done < sizeof ones ? n - done : sizeof ones)) return -1;
  }
  return 0;
}

int tinytrain_port_slot_erase(uint32_t slot) {
  uint32_t bytes = tinytrain_port_slot_bytes();
  if (tinytrain_seek(slot, 0, bytes)) return -1;
  tinytrain_flash_delay(4u * TINYTRAIN_FLASH_DELAY_US);
  return tinytrain_fill(bytes);
}

/* Open the region file ("r+b"), or create it erased ("w+b"); without it there is no region. */
static void tinytrain_open_slots(void) {
  tinytrain_slots = tinytrain_open("build/tinytrain.slots", 3u);
  if (tinytrain_slots >= 0) {
    uint32_t block[1] = {(uint32_t)tinytrain_slots};
    int32_t size = tinytrain_semihost(0x0Cu, block); /* SYS_FLEN */
    if (size >= (int32_t)(2u * tinytrain_port_slot_bytes())) return;
    uint32_t close_block[1] = {(uint32_t)tinytrain_slots};
    tinytrain_semihost(0x02u, close_block); /* SYS_CLOSE */
  }
  tinytrain_slots = tinytrain_open("build/tinytrain.slots", 7u);
  if (tinytrain_slots < 0) return;
  if (tinytrain_fill(2u * tinytrain_port_slot_bytes())) tinytrain_slots = -1;
}

#ifdef TINYTRAIN_PROFILE
static int tinytrain_write_all(int32_t file, const void* buf, uint32_t n) {
  uint32_t block[3] = {(uint32_t)file, (uint32_t)(uintptr_t)buf, n};
  return tinytrain_semihost(0x05u, block) == 0 ? 0 : -1; /* SYS_WRITE: bytes not written */
}

static void tinytrain_profile_write(void) {
  int32_t file = tinytrain_open("build/profile.bin", 5u); /* "wb" */
  if (file < 0) return;
  uint32_t head[4] = {0x46505454u /* "TTPF" */, 1u, TINYTRAIN_PROFILE_SLOTS, tinytrain_profile_lost};
  tinytrain_write_all(file, head, sizeof head);
  tinytrain_write_all(file, tinytrain_profile_cost, sizeof tinytrain_profile_cost);
  tinytrain_write_all(file, tinytrain_profile_marks, sizeof tinytrain_profile_marks);
  uint32_t close_block[1] = {(uint32_t)file};
  tinytrain_semihost(0x02u, close_block); /* SYS_CLOSE */
}
#endif

int main(void) {
  SYST_RVR = 0xFFFFFFu;
  SYST_CVR = 0;
  SYST_CSR = 7u; /* processor clock, interrupt, enable */
  tinytrain_in = tinytrain_open("/dev/stdin", 1u);   /* "rb" */
  tinytrain_out = tinytrain_open("/dev/stdout", 5u); /* "wb" */
  if (tinytrain_in < 0 || tinytrain_out < 0) return 2;
  tinytrain_open_slots();
  int rc = tinytrain_device_run();
#ifdef TINYTRAIN_PROFILE
  tinytrain_profile_write();
#endif
  return rc;
}
