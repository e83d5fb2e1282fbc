/* The guest memory table: the rules a table must meet before any guest
 * address is translated through it (see ifcvf_native.h). */
#include <stdint.h>
#include <stddef.h>
#include "ifcvf_native.h"

int ifc_mem_table_check(const struct ifc_mem_table *mem)
{
    if (mem == NULL || mem->nregions > IFC_MEM_MAX_REGIONS)
        return IFC_ERR_ARG;
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct ifc_mem_region *r = &mem->regions[i];
        /* Inclusive ends keep a region that ends exactly at 2**64 legal. */
        if (r->size == 0 || r->hva == 0)
            return IFC_ERR_ARG;
        if (r->gpa + (r->size - 1) < r->gpa || r->hva + (r->size - 1) < r->hva)
            return IFC_ERR_ARG;
#if UINTPTR_MAX < UINT64_MAX
        if (r->hva + (r->size - 1) > UINTPTR_MAX)
            return IFC_ERR_ARG;   /* not addressable on this host */
#endif
        for (uint32_t j = 0; j < i; j++) {
            const struct ifc_mem_region *o = &mem->regions[j];
            if (r->gpa <= o->gpa + (o->size - 1) && o->gpa <= r->gpa + (r->size - 1))
                return IFC_ERR_ARG;   /* overlapping GPAs: two host addresses */
        }
    }
    return IFC_OK;
}
