/* vhost dirty-log primitives.  The log is shared with the front-end, which
 * clears it with atomic exchanges while we set bits, so every set is an atomic
 * OR and every clear an atomic exchange: a plain read-modify-write could
 * resurrect or lose a bit. */
#include <stdint.h>
#include <stddef.h>
#include "ifcvf_native.h"

static inline void or_byte(uint8_t *p, uint8_t mask)
{
    __atomic_fetch_or(p, mask, __ATOMIC_RELAXED);
}

int ifc_log_mark(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        return IFC_OK;
    if (log == NULL)
        return IFC_ERR_ARG;
    uint64_t last = gpa + len - 1;
    if (last < gpa)                       /* wraps the address space */
        return IFC_ERR_RANGE;
    uint64_t first_page = gpa >> IFC_LOG_PAGE_SHIFT;
    uint64_t last_page = last >> IFC_LOG_PAGE_SHIFT;
    if ((last_page >> 3) >= log_size)
        return IFC_ERR_RANGE;

    __atomic_thread_fence(__ATOMIC_RELEASE);

    uint64_t byte = first_page >> 3, last_byte = last_page >> 3;
    uint8_t lo = (uint8_t)(0xffu << (first_page & 7));
    uint8_t hi = (uint8_t)(0xffu >> (7 - (last_page & 7)));
    if (byte == last_byte) {
        or_byte(log + byte, lo & hi);
        return IFC_OK;
    }
    or_byte(log + byte, lo);
    /* Whole bytes in between: OR with 0xff, a byte at a time until 8-aligned,
     * then 64-bit words (large buffers, e.g. 64 KiB TSO frames, span many). */
    for (byte++; byte < last_byte && ((uintptr_t)(log + byte) & 7); byte++)
        or_byte(log + byte, 0xff);
    for (; byte + 8 <= last_byte; byte += 8)
        __atomic_fetch_or((uint64_t *)(void *)(log + byte), UINT64_MAX, __ATOMIC_RELAXED);
    for (; byte < last_byte; byte++)
        or_byte(log + byte, 0xff);
    or_byte(log + last_byte, hi);
    return IFC_OK;
}

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
