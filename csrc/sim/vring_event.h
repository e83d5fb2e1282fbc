/* The simulator's one vring_need_event (virtio 1.x 2.7.10), shared by the
 * device's engines (simdp.c) and the guest's rings (guest_ring.c).  The
 * driver keeps its own (csrc/driver/relay.c): the model is independent. */
#ifndef SIM_VRING_EVENT_H
#define SIM_VRING_EVENT_H
#include <stdint.h>

/* Did an index moving old -> new_idx pass event (the other side asked to
 * be told once it does)? */
static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

#endif
