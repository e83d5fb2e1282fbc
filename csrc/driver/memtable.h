/* Private to csrc/: translating guest-physical ranges through a checked
 * memory table.  Every guest address goes through here before it is used. */
#ifndef IFC_MEMTABLE_H
#define IFC_MEMTABLE_H

#include <stdint.h>
#include "ifcvf_native.h"

static inline int ifc_region_holds(const struct ifc_mem_region *r, uint64_t gpa, uint64_t last)
{
    /* Unsigned differences: gpa below r->gpa wraps to a value >= r->size
     * because the checked table guarantees r->gpa + r->size does not wrap. */
    return gpa - r->gpa < r->size && last - r->gpa < r->size;
}

/* Host address of [gpa, gpa + len) when it lies inside one region, else NULL.
 * len must be >= 1; a range that wraps the address space is refused.  *hint
 * is the region to try first (runs of buffers mostly share a region) and is
 * updated on a hit.  The table must have passed ifc_mem_table_check. */
static inline uint8_t *ifc_mem_translate(const struct ifc_mem_table *m, uint64_t gpa,
                                         uint64_t len, uint32_t *hint)
{
    uint64_t last = gpa + len - 1;
    if (last < gpa)
        return NULL;
    uint32_t h = *hint;
    if (h < m->nregions && ifc_region_holds(&m->regions[h], gpa, last))
        return (uint8_t *)(uintptr_t)(m->regions[h].hva + (gpa - m->regions[h].gpa));
    for (uint32_t i = 0; i < m->nregions; i++) {
        const struct ifc_mem_region *r = &m->regions[i];
        if (ifc_region_holds(r, gpa, last)) {
            *hint = i;
            return (uint8_t *)(uintptr_t)(r->hva + (gpa - r->gpa));
        }
    }
    return NULL;
}

#endif
