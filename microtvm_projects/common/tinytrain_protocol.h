/* The framed byte protocol every template speaks (tvm_tinytrain.micro is the host side).
 *
 * request:  'T' 'T' cmd:u8 len:u32 payload[len] crc:u32
 * response: 'T' 'R' status:u8 len:u32 payload[len] crc:u32
 * Integers little-endian; crc is CRC-32 (zlib's) over cmd/status, len and payload.
 *
 * cmd 'I' info     -> u32 version, arena, input, label, output, params, state bytes
 *     'T' train    input | label -> f32 loss, u64 cost of the step, u32 tinytrain_train_step's status
 *     'P' predict  input -> logits, u64 cost
 *     'G' get      -> trainable parameters then optimizer state (the RAM block)
 *     'S' set      trainable parameters then optimizer state -> (nothing)
 *     'R' reset    -> (nothing): parameters back to their initial values
 *     'L' rate     f32 learning rate -> (nothing): the learning rate of the next steps (status 6
 *                  and the rate unchanged for inf, NaN or a negative rate)
 *     'M' memory   -> u32 stack bytes used (high-water mark), u32 stack bytes reserved
 *     'Q' quit     -> (nothing), then the program ends
 * status 0 ok, 1 bad checksum, 2 bad length, 3 unknown command, 4 kernel failure, 5 non-finite
 * step (not applied: the payload's status says what, TINYTRAIN_NONFINITE_* of tinytrain_model.h),
 * 6 bad learning rate.
 * The cost unit is the port's: nanoseconds on the host, instructions on QEMU. */
#ifndef TINYTRAIN_PROTOCOL_H_
#define TINYTRAIN_PROTOCOL_H_

#include <stddef.h>
#include <stdint.h>

/* What a template provides. */
int tinytrain_port_read(void* buf, size_t n);         /* exactly n bytes; 0, or -1 at end of input */
int tinytrain_port_write(const void* buf, size_t n);  /* 0, or -1 */
void tinytrain_port_flush(void);
uint64_t tinytrain_port_cost(void);                    /* a monotonic counter */
void tinytrain_port_stack(uint32_t* used, uint32_t* reserved);

/* Serve requests until 'Q' or the end of input. Returns 0 after 'Q', 1 at end of input. */
int tinytrain_serve(void);

#endif
