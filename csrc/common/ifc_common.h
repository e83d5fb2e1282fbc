/* What both native modules share, included by csrc/driver/ifcvf_native.h and
 * csrc/sim/sim_native.h.  Each build script also feeds this file to cffi's
 * cdef (before the module's own header), so keep it cdef-clean: plain integer
 * #defines and declarations only.  Each module adds codes of its own (the
 * driver -3..-6, the simulator's guest -101.., its device -201..). */
#ifndef IFC_COMMON_H
#define IFC_COMMON_H

/* Errors are negative; 0 or a count means success. */
#define IFC_OK 0
#define IFC_ERR_RANGE -1      /* an address or length past the end of the log */
#define IFC_ERR_ARG -2        /* a malformed argument (NULL pointer, overflow) */

#endif
