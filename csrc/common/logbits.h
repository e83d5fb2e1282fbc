/* Private to csrc/: setting bits in the vhost dirty log.  Shared by the
 * driver's dirty-log marking and used-ring relay (csrc/driver/) and the
 * simulated device's logging (csrc/sim/simdp.c), so all of them set bits the
 * same way (atomic OR: the front-end clears words with atomic exchanges
 * meanwhile).  Compiled into each module that includes it; not in any cdef. */
#ifndef IFC_LOGBITS_H
#define IFC_LOGBITS_H

#include <stdint.h>

static inline void ifc_log_or_byte(uint8_t *p, uint8_t mask)
{
    __atomic_fetch_or(p, mask, __ATOMIC_RELAXED);
}

/* Set the bits of guest pages first..last (inclusive).  The caller has
 * checked (last >> 3) < log size and issued the release fence that orders the
 * data writes before the bits. */
static inline void ifc_log_set_pages(uint8_t *log, uint64_t first, uint64_t last)
{
    uint64_t byte = first >> 3, last_byte = last >> 3;
    uint8_t lo = (uint8_t)(0xffu << (first & 7));
    uint8_t hi = (uint8_t)(0xffu >> (7 - (last & 7)));
    if (byte == last_byte) {
        ifc_log_or_byte(log + byte, lo & hi);
        return;
    }
    ifc_log_or_byte(log + byte, lo);
    /* Whole bytes in between: OR with 0xff, a byte at a time until 8-aligned,
     * then 64-bit words (large buffers, e.g. 64 KiB TSO frames, span many). */
    for (byte++; byte < last_byte && ((uintptr_t)(log + byte) & 7); byte++)
        ifc_log_or_byte(log + byte, 0xff);
    for (; byte + 8 <= last_byte; byte += 8)
        __atomic_fetch_or((uint64_t *)(void *)(log + byte), UINT64_MAX, __ATOMIC_RELAXED);
    for (; byte < last_byte; byte++)
        ifc_log_or_byte(log + byte, 0xff);
    ifc_log_or_byte(log + last_byte, hi);
}

#endif
