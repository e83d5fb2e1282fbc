/* vhost dirty-log primitives.  The log is shared with the front-end, which
 * clears it with atomic exchanges while we set bits, so every set is an atomic
 * OR and every clear an atomic exchange: a plain read-modify-write could
 * resurrect or lose a bit. */
#include <stdint.h>
#include <stddef.h>
#include "ifcvf_native.h"
#include "logbits.h"

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
    ifc_log_set_pages(log, first_page, last_page);
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
