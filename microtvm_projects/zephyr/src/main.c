/* Zephyr template: the port of common/tinytrain_port.h, nothing else.
 *
 * - byte link: the console UART (chosen zephyr,console), received by interrupt into a static ring
 *   buffer, sent by polling; the console, printk and the boot banner are off (prj.conf), so every
 *   byte on the UART is the protocol's.
 * - cost: the DWT cycle counter, widened to 64 bits (a 1 s timer sees every 32-bit wrap).
 * - stack: k_thread_stack_space_get on the main thread (CONFIG_INIT_STACKS paints it).
 * - persistent region: the flash partition storage_partition through the flash_area API; slot 0 and
 *   slot 1 are its two halves, each starting on an erase page (the overlays in boards/ place it).
 *
 * The protocol, persistence and checks are the C files of common/, compiled and tested through the host and
 * QEMU templates. This file needs a Zephyr tree to build (see README.md). */
#include <zephyr/device.h>
#include <zephyr/devicetree.h>
#include <zephyr/drivers/flash.h>
#include <zephyr/drivers/uart.h>
#include <zephyr/kernel.h>
#include <zephyr/storage/flash_map.h>
#include <zephyr/sys/ring_buffer.h>

#include "tinytrain_port.h"

/* ---- the byte link ------------------------------------------------------------------------- */

#define TINYTRAIN_RX_BYTES 1024
static const struct device* const tinytrain_uart = DEVICE_DT_GET(DT_CHOSEN(zephyr_console));
RING_BUF_DECLARE(tinytrain_rx, TINYTRAIN_RX_BYTES);
K_SEM_DEFINE(tinytrain_rx_ready, 0, 1);

static void tinytrain_uart_isr(const struct device* dev, void* user_data) {
  ARG_UNUSED(user_data);
  while (uart_irq_update(dev) && uart_irq_is_pending(dev)) {
    if (!uart_irq_rx_ready(dev)) continue;
    uint8_t chunk[32];
    int got = uart_fifo_read(dev, chunk, sizeof chunk);
    if (got <= 0) break;
    /* bytes that do not fit are dropped: that frame's CRC fails and the device refuses it */
    ring_buf_put(&tinytrain_rx, chunk, (uint32_t)got);
    k_sem_give(&tinytrain_rx_ready);
  }
}

int tinytrain_port_read(void* buf, size_t n) {
  uint8_t* p = (uint8_t*)buf;
  while (n) {
    unsigned int key = irq_lock(); /* the ISR is the only other user of the ring */
    uint32_t got = ring_buf_get(&tinytrain_rx, p, (uint32_t)n);
    irq_unlock(key);
    if (got == 0) {
      k_sem_take(&tinytrain_rx_ready, K_FOREVER); /* a board's link never ends: wait */
      continue;
    }
    p += got;
    n -= got;
  }
  return 0;
}

int tinytrain_port_write(const void* buf, size_t n) {
  const uint8_t* p = (const uint8_t*)buf;
  for (size_t i = 0; i < n; ++i) uart_poll_out(tinytrain_uart, p[i]);
  return 0;
}

void tinytrain_port_flush(void) {} /* uart_poll_out returns once the byte is handed to the UART */

/* ---- cost: DWT cycles ---------------------------------------------------------------------- */

#define TINYTRAIN_DEMCR (*(volatile uint32_t*)0xE000EDFCu)
#define TINYTRAIN_DWT_CTRL (*(volatile uint32_t*)0xE0001000u)
#define TINYTRAIN_DWT_CYCCNT (*(volatile uint32_t*)0xE0001004u)
#define TINYTRAIN_DWT_LAR (*(volatile uint32_t*)0xE0001FB0u) /* Cortex-M7: locked until written */

static uint32_t tinytrain_cycles_high, tinytrain_cycles_last;

uint64_t tinytrain_port_cost(void) {
  unsigned int key = irq_lock();
  uint32_t now = TINYTRAIN_DWT_CYCCNT;
  if (now < tinytrain_cycles_last) tinytrain_cycles_high++;
  tinytrain_cycles_last = now;
  uint64_t cycles = ((uint64_t)tinytrain_cycles_high << 32) | now;
  irq_unlock(key);
  return cycles;
}

/* 2^32 cycles last 8.9 s at 480 MHz: reading the counter every second sees every wrap */
static void tinytrain_cycles_tick(struct k_timer* timer) {
  ARG_UNUSED(timer);
  (void)tinytrain_port_cost();
}
K_TIMER_DEFINE(tinytrain_cycles_timer, tinytrain_cycles_tick, NULL);

static void tinytrain_cycles_start(void) {
  TINYTRAIN_DEMCR |= 1u << 24; /* TRCENA */
  TINYTRAIN_DWT_LAR = 0xC5ACCE55u;
  TINYTRAIN_DWT_CYCCNT = 0;
  TINYTRAIN_DWT_CTRL |= 1u; /* CYCCNTENA */
  k_timer_start(&tinytrain_cycles_timer, K_SECONDS(1), K_SECONDS(1));
}

/* ---- stack --------------------------------------------------------------------------------- */

void tinytrain_port_stack(uint32_t* used, uint32_t* reserved) {
  size_t unused = 0;
  k_tid_t self = k_current_get();
  size_t size = self->stack_info.size;
  if (k_thread_stack_space_get(self, &unused) != 0) unused = size;
  *used = (uint32_t)(size - unused);
  *reserved = (uint32_t)size;
}

/* ---- the persistent region: storage_partition, two halves ---------------------------------- */

static const struct flash_area* tinytrain_area;
static uint32_t tinytrain_half, tinytrain_block = 1;

/* Open storage_partition; 0 slot bytes (no persistent region) unless both halves start on an erase
 * page and the flash's write block is a power of two. */
static void tinytrain_region_open(void) {
  const struct flash_area* fa;
  if (flash_area_open(FIXED_PARTITION_ID(storage_partition), &fa) != 0) return;
  const struct device* dev = flash_area_get_device(fa);
  uint32_t half = (uint32_t)fa->fa_size / 2u;
  size_t block = flash_get_write_block_size(dev);
  struct flash_pages_info first, second;
  if (half == 0 || block == 0 || (block & (block - 1u)) != 0 || half % block != 0 ||
      flash_get_page_info_by_offs(dev, fa->fa_off, &first) != 0 ||
      flash_get_page_info_by_offs(dev, fa->fa_off + half, &second) != 0 ||
      first.start_offset != (off_t)fa->fa_off || second.start_offset != (off_t)(fa->fa_off + half)) {
    flash_area_close(fa);
    return;
  }
  tinytrain_area = fa;
  tinytrain_half = half;
  tinytrain_block = (uint32_t)block;
}

uint32_t tinytrain_port_slot_bytes(void) { return tinytrain_area ? tinytrain_half : 0u; }

uint32_t tinytrain_port_write_block(void) { return tinytrain_block; }

static int tinytrain_slot_ok(uint32_t slot, uint32_t offset, uint32_t n) {
  return tinytrain_area != NULL && slot < 2u && offset <= tinytrain_half && n <= tinytrain_half - offset;
}

int tinytrain_port_slot_read(uint32_t slot, uint32_t offset, void* buf, uint32_t n) {
  if (!tinytrain_slot_ok(slot, offset, n)) return -1;
  return flash_area_read(tinytrain_area, (off_t)(slot * tinytrain_half + offset), buf, n) == 0 ? 0 : -1;
}

int tinytrain_port_slot_erase(uint32_t slot) {
  if (!tinytrain_slot_ok(slot, 0, tinytrain_half)) return -1;
  return flash_area_erase(tinytrain_area, (off_t)(slot * tinytrain_half), tinytrain_half) == 0 ? 0 : -1;
}

int tinytrain_port_slot_program(uint32_t slot, uint32_t offset, const void* buf, uint32_t n) {
  if (!tinytrain_slot_ok(slot, offset, n)) return -1;
  return flash_area_write(tinytrain_area, (off_t)(slot * tinytrain_half + offset), buf, n) == 0 ? 0 : -1;
}

/* ---- main ---------------------------------------------------------------------------------- */

int main(void) {
  if (!device_is_ready(tinytrain_uart)) return 2;
  tinytrain_cycles_start();
  tinytrain_region_open();
  uart_irq_callback_user_data_set(tinytrain_uart, tinytrain_uart_isr, NULL);
  uart_irq_rx_enable(tinytrain_uart);
  return tinytrain_device_run();
}
