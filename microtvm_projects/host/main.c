/* Host template: the device served over stdin / stdout (framed byte protocol). The persistent
 * region is a file beside the binary (build/tinytrain_host.slots; TINYTRAIN_SLOTS overrides it),
 * with flash semantics: erase fills a slot with 0xFF, program writes whole write blocks, each
 * after an optional emulated delay (make FLASH_DELAY_US=...) so a test can cut a save short. */
#define _POSIX_C_SOURCE 200809L
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "tinytrain_model.h"
#include "tinytrain_persist.h"
#include "tinytrain_port.h"

int tinytrain_port_read(void* buf, size_t n) { return fread(buf, 1, n, stdin) == n ? 0 : -1; }

int tinytrain_port_write(const void* buf, size_t n) { return fwrite(buf, 1, n, stdout) == n ? 0 : -1; }

void tinytrain_port_flush(void) { fflush(stdout); }

uint64_t tinytrain_port_cost(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void tinytrain_port_stack(uint32_t* used, uint32_t* reserved) { *used = 0; *reserved = 0; }

/* ---- the persistent region: a file of two slots */
static int tinytrain_slots_fd = -1;

uint32_t tinytrain_port_slot_bytes(void) {
  return tinytrain_slots_fd < 0 ? 0u : (tinytrain_persist_slot_need() + 255u) / 256u * 256u;
}

uint32_t tinytrain_port_write_block(void) { return TINYTRAIN_WRITE_BLOCK; }

static void tinytrain_flash_delay(uint32_t blocks) {
  uint64_t ns = (uint64_t)TINYTRAIN_FLASH_DELAY_US * 1000u * blocks;
  if (!ns) return;
  struct timespec t = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
  while (nanosleep(&t, &t)) {
  }
}

static int tinytrain_slot_ok(uint32_t slot, uint32_t offset, uint32_t n) {
  uint32_t bytes = tinytrain_port_slot_bytes();
  return slot < 2u && offset <= bytes && n <= bytes - offset;
}

int tinytrain_port_slot_read(uint32_t slot, uint32_t offset, void* buf, uint32_t n) {
  if (!tinytrain_slot_ok(slot, offset, n)) return -1;
  off_t at = (off_t)slot * tinytrain_port_slot_bytes() + offset;
  return pread(tinytrain_slots_fd, buf, n, at) == (ssize_t)n ? 0 : -1;
}

int tinytrain_port_slot_program(uint32_t slot, uint32_t offset, const void* buf, uint32_t n) {
  if (!tinytrain_slot_ok(slot, offset, n) || offset % TINYTRAIN_WRITE_BLOCK || n % TINYTRAIN_WRITE_BLOCK)
    return -1;
  const uint8_t* p = (const uint8_t*)buf;
  off_t at = (off_t)slot * tinytrain_port_slot_bytes() + offset;
  for (uint32_t done = 0; done < n; done += TINYTRAIN_WRITE_BLOCK) {
    tinytrain_flash_delay(1);
    if (pwrite(tinytrain_slots_fd, p + done, TINYTRAIN_WRITE_BLOCK, at + done) != TINYTRAIN_WRITE_BLOCK) return -1;
  }
  return fdatasync(tinytrain_slots_fd) ? -1 : 0;
}

static int tinytrain_fill(off_t at, uint32_t n) {
  uint8_t ones[256];
  memset(ones, 0xFF, sizeof ones);
  for (uint32_t done = 0; done < n; done += sizeof ones) {
    size_t k = n - done < sizeof ones ? n - done : sizeof ones;
    if (pwrite(tinytrain_slots_fd, ones, k, at + done) != (ssize_t)k) return -1;
  }
  return 0;
}

int tinytrain_port_slot_erase(uint32_t slot) {
  if (slot >= 2u || tinytrain_slots_fd < 0) return -1;
  uint32_t bytes = tinytrain_port_slot_bytes();
  tinytrain_flash_delay(4);
  if (tinytrain_fill((off_t)slot * bytes, bytes)) return -1;
  return fdatasync(tinytrain_slots_fd) ? -1 : 0;
}

/* Open (or create, erased) the region file; without one the device runs with no region. */
static void tinytrain_open_slots(const char* argv0) {
  char path[4096];
  const char* env = getenv("TINYTRAIN_SLOTS");
  if (env) {
    snprintf(path, sizeof path, "%s", env);
  } else {
    const char* slash = strrchr(argv0, '/');
    int dir = slash ? (int)(slash - argv0) : 1;
    snprintf(path, sizeof path, "%.*s/tinytrain_host.slots", dir, slash ? argv0 : ".");
  }
  tinytrain_slots_fd = open(path, O_RDWR | O_CREAT, 0644);
  if (tinytrain_slots_fd < 0) return;
  off_t size = lseek(tinytrain_slots_fd, 0, SEEK_END);
  uint32_t need = 2u * tinytrain_port_slot_bytes();
  if (size < (off_t)need && (tinytrain_fill(size, need - (uint32_t)size) || fdatasync(tinytrain_slots_fd))) {
    close(tinytrain_slots_fd);
    tinytrain_slots_fd = -1;
  }
}

int main(int argc, char** argv) {
  tinytrain_open_slots(argc > 0 ? argv[0] : "./tinytrain_host");
  return tinytrain_device_run();
}
