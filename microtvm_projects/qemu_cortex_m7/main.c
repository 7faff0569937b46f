/* QEMU Cortex-M7 template: the training step served over semihosting (the host's stdin and
 * stdout), costs in instructions from SysTick under -icount shift=0. */
#include <stdint.h>
#include <string.h>

#include "tinytrain_model.h"
#include "tinytrain_protocol.h"

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

uint64_t tinytrain_port_cost(void) {
  uint32_t wraps, now;
  do {
    wraps = tinytrain_wraps;
    now = SYST_CVR;
  } while (wraps != tinytrain_wraps);
  return ((uint64_t)wraps * 0x1000000u + (0xFFFFFFu - now)) * 40u;
}

void tinytrain_port_stack(uint32_t* used, uint32_t* reserved) {
  *used = tinytrain_stack_used();
  *reserved = tinytrain_stack_reserved();
}

int main(void) {
  SYST_RVR = 0xFFFFFFu;
  SYST_CVR = 0;
  SYST_CSR = 7u; /* processor clock, interrupt, enable */
  tinytrain_in = tinytrain_open("/dev/stdin", 1u);   /* "rb" */
  tinytrain_out = tinytrain_open("/dev/stdout", 5u); /* "wb" */
  if (tinytrain_in < 0 || tinytrain_out < 0) return 2;
  tinytrain_init();
  return tinytrain_serve() == 0 ? 0 : 1;
}
