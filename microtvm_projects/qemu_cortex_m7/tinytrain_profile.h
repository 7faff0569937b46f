/* The per-kernel profile (make PROFILE=1): force-included into every source of a profiling build, so
 * the generated executor's marks (tinytrain_model.c, under #ifdef TINYTRAIN_PROFILE) see their
 * declaration. main.c implements it. */
#ifndef TINYTRAIN_PROFILE_H_
#define TINYTRAIN_PROFILE_H_

#include <stdint.h>

/* After kernel `slot` returns: add the instructions since the clock's last reading (the previous
 * mark, or the protocol's reading just before the step or predict began) to the slot. */
void tinytrain_profile_kernel(uint32_t slot);

#endif
