/* The C surface of ifcvf, shared by the C sources and the cffi cdef.
 * build_native.py feeds this file to cffi's cdef with every preprocessor line
 * except plain integer #defines removed, so keep declarations cdef-clean. */

/* Errors are negative; 0 or a count means success. */
#define IFC_OK 0
#define IFC_ERR_RANGE -1      /* an address or length past the end of the log */
#define IFC_ERR_ARG -2        /* a malformed argument (NULL pointer, overflow) */

#define IFC_LOG_PAGE_SHIFT 12  /* vhost log: one bit per 4 KiB guest page */

/* Mark every 4 KiB page touched by [gpa, gpa + len) in the vhost dirty log
 * (bit n of the log = guest page n) with atomic OR, after a release fence so
 * the data writes are visible before the bits.  Checks the whole range against
 * log_size first: out of range returns IFC_ERR_RANGE and writes nothing.
 * len == 0 marks nothing and succeeds. */
int ifc_log_mark(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len);

/* What QEMU does during a migration iteration, while the device keeps writing:
 * for each 64-bit word, a cheap read and, if non-zero, an atomic exchange with
 * 0; the old value is stored in out (which must hold log_size bytes).  A tail
 * shorter than 8 bytes is exchanged bytewise.  Returns the number of set bits
 * fetched, or IFC_ERR_ARG. */
int64_t ifc_log_fetch_clear(uint8_t *log, uint64_t log_size, uint8_t *out);
