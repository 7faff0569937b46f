/* Cortex-M7 start-up for QEMU's mps2-an500: vector table, .data/.bss, FPU, a painted stack. */
#include <stdint.h>

extern uint32_t _sidata, _sdata, _edata, _sbss, _ebss, _sstack, _estack;
int main(void);
void tinytrain_exit(int code);
void tinytrain_reset(void);
void tinytrain_systick(void);

static void tinytrain_halt(void) {
  tinytrain_exit(99);
  for (;;) {
  }
}

__attribute__((section(".isr_vector"), used)) static void (*const tinytrain_vectors[16])(void) = {
    (void (*)(void))(&_estack), tinytrain_reset, tinytrain_halt, tinytrain_halt, tinytrain_halt,
    tinytrain_halt, tinytrain_halt, 0, 0, 0, 0, tinytrain_halt, tinytrain_halt, 0, tinytrain_halt,
    tinytrain_systick};

#define TINYTRAIN_STACK_PAINT 0xC5C5C5C5u

void tinytrain_reset(void) {
  uint32_t* src = &_sidata;
  for (uint32_t* dst = &_sdata; dst < &_edata;) *dst++ = *src++;
  for (uint32_t* dst = &_sbss; dst < &_ebss;) *dst++ = 0;
  /* paint the stack below this frame, for the high-water mark */
  uint32_t sp;
  __asm__ volatile("mov %0, sp" : "=r"(sp));
  for (uint32_t* p = &_sstack; p < (uint32_t*)(sp - 64u); ++p) *p = TINYTRAIN_STACK_PAINT;
  *(volatile uint32_t*)0xE000ED88u |= 0xFu << 20; /* CPACR: CP10, CP11 full access (the FPU) */
  __asm__ volatile("dsb\n isb");
  tinytrain_exit(main());
  for (;;) {
  }
}

uint32_t tinytrain_stack_used(void) {
  const uint32_t* p = &_sstack;
  while (p < &_estack && *p == TINYTRAIN_STACK_PAINT) ++p;
  return (uint32_t)((uintptr_t)&_estack - (uintptr_t)p);
}

uint32_t tinytrain_stack_reserved(void) { return (uint32_t)((uintptr_t)&_estack - (uintptr_t)&_sstack); }
