/* Ethernet addressing for the simulated network (sim/switch.py): split a batch
 * of frames into runs that share their first 12 bytes (destination and source
 * MAC), so a switch learns and forwards a run at a time. */
#include <stdint.h>
#include <string.h>

#include "sim_native.h"

uint32_t ifc_frames_mac_runs(const uint8_t *data, uint64_t size, const uint32_t *lengths,
                             uint32_t n, uint32_t *ends, uint32_t cap)
{
    if (data == NULL || lengths == NULL || ends == NULL || cap == 0)
        return 0;
    uint32_t runs = 0, i = 0;
    uint64_t off = 0, run_off = 0;
    for (; i < n; i++) {
        uint32_t len = lengths[i];
        if (off + len > size)
            break;
        if (i && (len < 12 || lengths[i - 1] < 12 || memcmp(data + off, data + run_off, 12) != 0)) {
            ends[runs++] = i;
            if (runs == cap)
                return runs;
            run_off = off;
        }
        off += len;
    }
    if (i)
        ends[runs++] = i;
    return runs;
}
