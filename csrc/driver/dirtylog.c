/* Marking the vhost dirty log.  The log is shared with the front-end, which
 * clears it with atomic exchanges while we set bits, so every set is an atomic
 * OR: a plain read-modify-write could resurrect or lose a bit.  (The
 * front-end's fetch-and-clear is the simulator's: csrc/sim/qemu_log.c.) */
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
