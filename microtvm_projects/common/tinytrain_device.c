/* The device: what every template's main runs after its own port set-up (tinytrain_port.h). */
#include "tinytrain_model.h"
#include "tinytrain_persist.h"
#include "tinytrain_port.h"
#include "tinytrain_protocol.h"

int tinytrain_device_run(void) {
  tinytrain_init();
  tinytrain_persist_boot();
  return tinytrain_serve() == 0 ? 0 : 1;
}
