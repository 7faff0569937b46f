/* Host template: the training step served over stdin / stdout (framed byte protocol). */
#define _POSIX_C_SOURCE 199309L
#include <stdio.h>
#include <time.h>

#include "tinytrain_model.h"
#include "tinytrain_protocol.h"

int tinytrain_port_read(void* buf, size_t n) { return fread(buf, 1, n, stdin) == n ? 0 : -1; }

int tinytrain_port_write(const void* buf, size_t n) { return fwrite(buf, 1, n, stdout) == n ? 0 : -1; }

void tinytrain_port_flush(void) { fflush(stdout); }

uint64_t tinytrain_port_cost(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void tinytrain_port_stack(uint32_t* used, uint32_t* reserved) { *used = 0; *reserved = 0; }

int main(void) {
  tinytrain_init();
  return tinytrain_serve() == 0 ? 0 : 1;
}
