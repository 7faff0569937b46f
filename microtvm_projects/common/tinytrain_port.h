/* The port contract: what every template (host, QEMU, Zephyr, library) provides to the device side in
 * common/ (tinytrain_protocol.c, tinytrain_persist.c), and the one entry point its main calls.
 *
 * A template's main does its own set-up (clocks, UART, semihosting, files...), then returns
 * tinytrain_device_run(). Everything below is called from that one thread; nothing is re-entrant. */
#ifndef TINYTRAIN_PORT_H_
#define TINYTRAIN_PORT_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The byte link */
int tinytrain_port_read(void* buf, size_t n);         /* exactly n bytes: 0; -1 at end of input / error */
int tinytrain_port_write(const void* buf, size_t n);  /* 0, or -1 */
void tinytrain_port_flush(void);
uint64_t tinytrain_port_cost(void);                    /* monotonic: ns (host), instructions (QEMU), cycles (board) */
void tinytrain_port_stack(uint32_t* used, uint32_t* reserved);

/* The persistent region: two slots (0 and 1), each erased and programmed on its own (flash semantics). */
uint32_t tinytrain_port_slot_bytes(void);    /* bytes of one slot; 0 when the port has no persistent region */
uint32_t tinytrain_port_write_block(void);   /* program granularity: offsets and lengths given to program are multiples */
int tinytrain_port_slot_read(uint32_t slot, uint32_t offset, void* buf, uint32_t n);   /* 0 or -1 */
int tinytrain_port_slot_erase(uint32_t slot);                                           /* 0 or -1 */
int tinytrain_port_slot_program(uint32_t slot, uint32_t offset, const void* buf, uint32_t n); /* 0 or -1 */

/* Notes for port writers:
 * - read blocks until n bytes arrived (a port may give up after its own timeout and return -1).
 * - write_block is a power of two >= 1 (1 when any byte may be programmed alone). The device side
 *   always passes an offset and a length that are multiples of it, and programs each byte at most once
 *   between two erases of its slot; after an erase every byte reads 0xFF.
 * - A port without a persistent region returns 0 from slot_bytes and -1 from the three slot calls
 *   (they are then never called). */

/* The device: tinytrain_init, boot from the newest valid slot (else the other, else the compiled-in
 * weights), then serve requests until 'Q' or the end of input. Returns 0 after 'Q', 1 at end of input
 * or a link error. */
int tinytrain_device_run(void);

#ifdef __cplusplus
}
#endif

/* The emulated region of the host and QEMU ports (make FLASH_DELAY_US=, WRITE_BLOCK=): a delay per
 * programmed block, so a test can cut a save short, and the program granularity. */
#ifndef TINYTRAIN_FLASH_DELAY_US
#define TINYTRAIN_FLASH_DELAY_US 0
#endif
#ifndef TINYTRAIN_WRITE_BLOCK
#define TINYTRAIN_WRITE_BLOCK 16
#endif

#endif
