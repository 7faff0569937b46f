/* The framed byte protocol every template speaks, version 4 (tvm_tinytrain.micro is the host side).
 *
 * request:  0xA5 0x5A cmd:u8 id:u8 len:u32 payload[len] crc:u32
 * response: 0x5A 0xA5 status:u8 id:u8 len:u32 payload[len] crc:u32
 * Integers little-endian; crc is CRC-32 (zlib's) over cmd/status, id, len and payload. The response
 * echoes the request's id, so a host that gave up on an answer (timeout) can drop it when it comes.
 *
 * The device finds a request by a sliding-window scan for the two magic bytes (they differ, so a
 * stray byte never hides the next frame). It checks the header before reading any payload: an
 * unknown command is answered at once with status 3 and a length that is not the command's with
 * status 2, neither consuming the declared payload. It reads the payload, then checks the CRC
 * (status 1), then the values; only then does a command change anything. A refused frame changes
 * nothing. After a frame cut short, the host sends up to (longest frame + 8) zero bytes to finish
 * it (answered with status 1) and goes on.
 *
 * cmd 'I' info     -> u32 version, arena, input, label, output, params, state bytes, model id
 *                     (TINYTRAIN_MODEL_ID), boot source (0 slot 0, 1 slot 1, 2 compiled-in), boot
 *                     sequence (0 for compiled-in), boot reasons (TINYTRAIN_BOOT_* flags of
 *                     tinytrain_persist.h), slot bytes (0: no persistent region)
 *     'T' train    input | label -> f32 loss, u64 cost of the step, u32 tinytrain_train_step's status
 *     'P' predict  input -> logits, u64 cost
 *     'G' get      -> the RAM block: trainable parameters then optimizer state
 *     'S' set      u32 offset | bytes -> (nothing): bytes written into the RAM block at offset.
 *                  A chunk is at most min(arena, RAM block) bytes, offset and size multiples of 4,
 *                  inside the RAM block (else status 2); it is staged in the arena and written
 *                  only when its CRC holds, no float32 value in it is inf/NaN (status 8, u32 index
 *                  of the tensor) and the learning rate in it is finite and >= 0 (status 6).
 *     'R' reset    -> (nothing): the RAM block back to the compiled-in values (slots untouched)
 *     'L' rate     f32 learning rate -> (nothing): the learning rate of the next steps (status 6
 *                  and the rate unchanged for inf, NaN or a negative rate)
 *     'M' memory   -> u32 stack bytes used (high-water mark), u32 stack bytes reserved
 *     'W' save     -> u32 sequence: the RAM block written to the older slot (status 9: no region or
 *                  the port failed; the newest valid slot stays as it was)
 *     'E' erase    -> (nothing): both slots erased, the next boot is from the compiled-in values
 *     'Q' quit     -> (nothing), then the program ends
 * status 0 ok, 1 bad checksum, 2 bad length (or 'S' chunk out of bounds), 3 unknown command,
 * 4 kernel failure, 5 non-finite step (not applied: the payload's status says what,
 * TINYTRAIN_NONFINITE_* of tinytrain_model.h), 6 bad learning rate, 7 label out of range (not
 * applied), 8 non-finite value, 9 persistent region missing or failed.
 * The cost unit is the port's: nanoseconds on the host, instructions on QEMU, cycles on a board. */
#ifndef TINYTRAIN_PROTOCOL_H_
#define TINYTRAIN_PROTOCOL_H_

#include <stddef.h>
#include <stdint.h>

#include "tinytrain_port.h"

#define TINYTRAIN_PROTOCOL_VERSION 4u
#define TINYTRAIN_REQUEST_MAGIC0 0xA5u
#define TINYTRAIN_REQUEST_MAGIC1 0x5Au
#define TINYTRAIN_RESPONSE_MAGIC0 0x5Au
#define TINYTRAIN_RESPONSE_MAGIC1 0xA5u

/* Serve requests until 'Q' or the end of input. Returns 0 after 'Q', 1 at end of input. */
int tinytrain_serve(void);

/* CRC-32 (zlib's): start with crc = 0. */
uint32_t tinytrain_crc32(uint32_t crc, const void* data, size_t n);

#endif
