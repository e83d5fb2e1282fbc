/* QEMU's side of the vhost dirty log, for the simulator's QEMU role
 * (sim/migration.py): fetch and clear the log while the device and the
 * back-end keep setting bits with atomic OR, so every clear is an atomic
 * exchange: a plain read-modify-write could resurrect or lose a bit. */
#include <stdint.h>
#include <stddef.h>
#include "sim_native.h"

int64_t ifc_log_fetch_clear(uint8_t *log, uint64_t log_size, uint8_t *out)
{
    if ((log == NULL || out == NULL) && log_size)
        return IFC_ERR_ARG;
    int64_t bits = 0;
    uint64_t i = 0;
    /* Bytes until the log pointer is 8-aligned, then words, then the tail. */
    for (; i < log_size && ((uintptr_t)(log + i) & 7); i++) {
        uint8_t v = log[i] ? __atomic_exchange_n(log + i, 0, __ATOMIC_ACQ_REL) : 0;
        out[i] = v;
        bits += __builtin_popcount(v);
    }
    for (; i + 8 <= log_size; i += 8) {
        uint64_t *w = (uint64_t *)(void *)(log + i);
        uint64_t v = *(volatile uint64_t *)w ? __atomic_exchange_n(w, 0, __ATOMIC_ACQ_REL) : 0;
        __builtin_memcpy(out + i, &v, 8);
        bits += __builtin_popcountll(v);
    }
    for (; i < log_size; i++) {
        uint8_t v = log[i] ? __atomic_exchange_n(log + i, 0, __ATOMIC_ACQ_REL) : 0;
        out[i] = v;
        bits += __builtin_popcount(v);
    }
    return bits;
}
