/* Used-ring relay for SW-assisted live migration: mediated split ring ->
 * guest used ring, logging every device-writable buffer.  The semantics are
 * specified in ifcvf_native.h; tests/relay_oracle.py is the same thing in
 * Python and the property tests hold the two equal.
 *
 * Two passes.  Validate reads every guest-controlled value exactly once and
 * records the pages to log in the caller's scratch array; commit writes only
 * from what validate recorded.  So an error anywhere in the batch leaves
 * everything untouched, and a guest rewriting descriptors concurrently cannot
 * make commit use a value validate did not check (no double fetch).
 * Adjacent page ranges are merged while recording, so buffers packed in a
 * pool cost one atomic OR per log byte rather than one per buffer.  Commit
 * copies the used elements from the mediated ring again: that is driver
 * memory the device writes, and slots below its published index are stable
 * until the guest sees them (which only this commit makes possible). */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "ifcvf_native.h"
#include "logbits.h"
#include "memtable.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "virtio 1.0 rings are little-endian; loads here are native");

#define PAGE_SHIFT IFC_LOG_PAGE_SHIFT

/* Split-ring layout offsets. */
#define USED_RING_OFF 4u                     /* used->ring[] after flags, idx */
#define AVAIL_RING_OFF 4u
#define USED_BYTES(size) (6u + 8u * (size))  /* flags, idx, ring, avail_event */
#define AVAIL_BYTES(size) (6u + 2u * (size)) /* flags, idx, ring, used_event */

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
_Static_assert(sizeof(struct desc) == 16, "virtq_desc is 16 bytes");

/* memcpy: guest tables need not be aligned in host memory (indirect tables
 * have no alignment rule); on x86 this is one plain load. */
static inline struct desc load_desc(const uint8_t *table, uint32_t i)
{
    struct desc d;
    memcpy(&d, table + (size_t)i * sizeof d, sizeof d);
    return d;
}

static const int8_t reason_rc[IFC_RELAY_E_COUNT] = {
    [IFC_RELAY_E_NONE] = IFC_OK,
    [IFC_RELAY_E_USED_IDX] = IFC_ERR_RING,
    [IFC_RELAY_E_DESC_ID] = IFC_ERR_RING,
    [IFC_RELAY_E_NEXT] = IFC_ERR_RING,
    [IFC_RELAY_E_LOOP] = IFC_ERR_RING,
    [IFC_RELAY_E_INDIRECT_NEXT] = IFC_ERR_RING,
    [IFC_RELAY_E_INDIRECT_NESTED] = IFC_ERR_RING,
    [IFC_RELAY_E_INDIRECT_POS] = IFC_ERR_RING,
    [IFC_RELAY_E_INDIRECT_LEN] = IFC_ERR_RING,
    [IFC_RELAY_E_INDIRECT_ADDR] = IFC_ERR_MEM,
    [IFC_RELAY_E_BUF_ADDR] = IFC_ERR_MEM,
    [IFC_RELAY_E_BUF_LOG] = IFC_ERR_RANGE,
    [IFC_RELAY_E_SIZE] = IFC_ERR_ARG,
    [IFC_RELAY_E_MEM_TABLE] = IFC_ERR_ARG,
    [IFC_RELAY_E_DESC_ADDR] = IFC_ERR_MEM,
    [IFC_RELAY_E_AVAIL_ADDR] = IFC_ERR_MEM,
    [IFC_RELAY_E_USED_ADDR] = IFC_ERR_MEM,
    [IFC_RELAY_E_ALIGN] = IFC_ERR_ARG,
    [IFC_RELAY_E_USED_LOG] = IFC_ERR_RANGE,
    [IFC_RELAY_E_CAPACITY] = IFC_ERR_ARG,
    [IFC_RELAY_E_MEDIATED] = IFC_ERR_ARG,
    [IFC_RELAY_E_NOT_READY] = IFC_ERR_ARG,
};

static const char *const reason_text[IFC_RELAY_E_COUNT] = {
    [IFC_RELAY_E_NONE] = "no error",
    [IFC_RELAY_E_USED_IDX] = "mediated used index is more than the ring size ahead",
    [IFC_RELAY_E_DESC_ID] = "used element id is not below the ring size",
    [IFC_RELAY_E_NEXT] = "descriptor next is not below its table size",
    [IFC_RELAY_E_LOOP] = "descriptor chain is longer than its table (a loop)",
    [IFC_RELAY_E_INDIRECT_NEXT] = "INDIRECT descriptor also has NEXT",
    [IFC_RELAY_E_INDIRECT_NESTED] = "INDIRECT descriptor inside an indirect table",
    [IFC_RELAY_E_INDIRECT_POS] = "INDIRECT descriptor is not the head of its chain",
    [IFC_RELAY_E_INDIRECT_LEN] = "indirect table length is zero, not a multiple of 16 "
                                 "or more than 16 * ring size",
    [IFC_RELAY_E_INDIRECT_ADDR] = "indirect table is not inside one guest memory region",
    [IFC_RELAY_E_BUF_ADDR] = "device-writable buffer is not inside one guest memory region",
    [IFC_RELAY_E_BUF_LOG] = "device-writable buffer ends past the dirty log",
    [IFC_RELAY_E_SIZE] = "ring size is not a power of two in 1..32768",
    [IFC_RELAY_E_MEM_TABLE] = "memory table is invalid (count, empty, wrapping or overlapping regions)",
    [IFC_RELAY_E_DESC_ADDR] = "descriptor table is not inside one guest memory region",
    [IFC_RELAY_E_AVAIL_ADDR] = "avail ring is not inside one guest memory region",
    [IFC_RELAY_E_USED_ADDR] = "used ring is not inside one guest memory region",
    [IFC_RELAY_E_ALIGN] = "ring address is misaligned (desc 16, avail 2, used 4)",
    [IFC_RELAY_E_USED_LOG] = "used ring log address range ends past the dirty log",
    [IFC_RELAY_E_CAPACITY] = "scratch capacity is missing or below the ring size",
    [IFC_RELAY_E_MEDIATED] = "mediated ring address is NULL or misaligned",
    [IFC_RELAY_E_NOT_READY] = "queue is not initialised, or no result buffer",
};

const char *ifc_relay_reason_text(uint32_t reason)
{
    return reason < IFC_RELAY_E_COUNT ? reason_text[reason] : "unknown reason";
}

static int fail(struct ifc_relay_result *res, uint32_t reason, uint16_t idx, uint32_t desc,
                int indirect, uint64_t value, uint32_t len)
{
    res->rc = reason_rc[reason];
    res->count = 0;
    res->new_idx = res->old_idx;
    res->signal = 0;
    res->more = 0;
    res->reason = reason;
    res->err_idx = idx;
    res->err_desc = desc;
    res->err_indirect = (uint8_t)indirect;
    res->err_value = value;
    res->err_len = len;
    return res->rc;
}

/* ---- validate pass ------------------------------------------------------ */

/* The validate pass is the hot loop (about 4 ns an entry for one-descriptor
 * chains here, see `ifcvf bench relay`): everything it calls is forced
 * inline so its state stays in registers. */
#define HOT static inline __attribute__((always_inline))

struct vstate {
    const struct ifc_mem_table *mem;
    struct ifc_relay_range *scratch;
    uint64_t win_lo, win_size;      /* GPA window inside both the last region hit and
                                     * the log: a buffer inside it needs no other test */
    uint64_t log_pages;             /* pages the log covers; all of them without a log */
    uint64_t cur_first, cur_last;   /* the open range, not yet in scratch (NO_RANGE) */
    uint32_t nranges;               /* closed ranges in scratch */
    uint32_t budget;                /* writable descriptors the batch may still take */
    uint32_t size;
    uint32_t hint;                  /* memory region of the last hit */
    uint8_t overflow;               /* the entry does not fit: validate only */
    /* where validation failed */
    uint32_t f_desc, f_len;
    int f_level;
    uint64_t f_value;
};

/* cur_first of "no open range": no page can merge with it (pages < 2**52). */
#define NO_RANGE UINT64_MAX

HOT uint32_t fault(struct vstate *v, uint32_t reason, uint32_t desc, int level, uint64_t value,
                   uint32_t len)
{
    v->f_desc = desc;
    v->f_level = level;
    v->f_value = value;
    v->f_len = len;
    return reason;
}

/* A device-writable buffer [addr, addr + len), len >= 1: inside one region
 * and, pages first..last, inside the log. */
HOT uint32_t check_buffer(struct vstate *v, uint64_t addr, uint32_t len, uint64_t *first,
                          uint64_t *last)
{
    uint64_t off = addr - v->win_lo;
    *first = addr >> PAGE_SHIFT;
    *last = (addr + len - 1) >> PAGE_SHIFT;
    /* Fast path: inside the window (no wrap possible: the window is). */
    if (__builtin_expect(off < v->win_size && len <= v->win_size - off, 1))
        return IFC_RELAY_E_NONE;
    if (ifc_mem_translate(v->mem, addr, len, &v->hint) == NULL)
        return IFC_RELAY_E_BUF_ADDR;
    if (*last >= v->log_pages)
        return IFC_RELAY_E_BUF_LOG;
    /* Move the window to this region, clipped to what the log covers. */
    const struct ifc_mem_region *r = &v->mem->regions[v->hint];
    uint64_t log_end = v->log_pages >= (UINT64_MAX >> PAGE_SHIFT) ? UINT64_MAX
                                                                  : v->log_pages << PAGE_SHIFT;
    v->win_lo = r->gpa;
    v->win_size = log_end <= r->gpa ? 0 : (log_end - r->gpa < r->size ? log_end - r->gpa : r->size);
    return IFC_RELAY_E_NONE;
}

/* Merge pages first..last into the open range, or close it and open anew. */
HOT void add_range(struct vstate *v, uint64_t first, uint64_t last)
{
    if (first <= v->cur_last + 1 && last + 1 >= v->cur_first) {   /* overlap or adjacent */
        v->cur_first = first < v->cur_first ? first : v->cur_first;
        v->cur_last = last > v->cur_last ? last : v->cur_last;
        return;
    }
    if (v->cur_first != NO_RANGE) {
        /* closed + open + this one <= writes taken <= capacity: the slot exists. */
        v->scratch[v->nranges].first_page = v->cur_first;
        v->scratch[v->nranges].last_page = v->cur_last;
        v->nranges++;
    }
    v->cur_first = first;
    v->cur_last = last;
}

/* A writable buffer inside a chain walk: check, then take it if it fits. */
HOT uint32_t on_write(struct vstate *v, uint64_t addr, uint32_t len)
{
    uint64_t first, last;
    uint32_t reason = check_buffer(v, addr, len, &first, &last);
    if (reason)
        return reason;
    if (v->overflow || v->budget == 0) {
        v->overflow = 1;    /* keep validating the entry, record nothing */
        return IFC_RELAY_E_NONE;
    }
    v->budget--;
    add_range(v, first, last);
    return IFC_RELAY_E_NONE;
}

/* The checks every descriptor of a chain gets except INDIRECT handling:
 * the writable buffer, then NEXT.  *next is set when the chain goes on. */
HOT uint32_t visit(struct vstate *v, const struct desc *d, uint32_t i, int level, uint32_t n_max,
                   uint32_t *next, int *more)
{
    if ((d->flags & IFC_VRING_DESC_F_WRITE) && d->len) {
        uint32_t reason = on_write(v, d->addr, d->len);
        if (reason)
            return fault(v, reason, i, level, d->addr, d->len);
    }
    *more = (d->flags & IFC_VRING_DESC_F_NEXT) != 0;
    if (*more && d->next >= n_max)
        return fault(v, IFC_RELAY_E_NEXT, i, level, d->next, d->len);
    *next = d->next;
    return IFC_RELAY_E_NONE;
}

/* An indirect table of n_max descriptors, from entry 0. */
HOT uint32_t walk_indirect(struct vstate *v, const uint8_t *table, uint32_t n_max)
{
    uint32_t i = 0, count = 0, next = 0;
    int more = 1;
    while (more) {
        if (count == n_max)
            return fault(v, IFC_RELAY_E_LOOP, i, 1, n_max, 0);
        count++;
        struct desc d = load_desc(table, i);
        if (d.flags & IFC_VRING_DESC_F_INDIRECT)
            return fault(v, IFC_RELAY_E_INDIRECT_NESTED, i, 1, d.flags, d.len);
        uint32_t reason = visit(v, &d, i, 1, n_max, &next, &more);
        if (reason)
            return reason;
        i = next;
    }
    return IFC_RELAY_E_NONE;
}

/* A chain of the ring's descriptor table from head i. */
HOT uint32_t walk_ring(struct vstate *v, const uint8_t *table, uint32_t i)
{
    uint32_t count = 0, next = 0;
    int more = 1;
    while (more) {
        if (count == v->size)
            return fault(v, IFC_RELAY_E_LOOP, i, 0, v->size, 0);
        count++;
        struct desc d = load_desc(table, i);
        if (d.flags & IFC_VRING_DESC_F_INDIRECT) {
            if (count > 1)
                return fault(v, IFC_RELAY_E_INDIRECT_POS, i, 0, d.flags, d.len);
            if (d.flags & IFC_VRING_DESC_F_NEXT)
                return fault(v, IFC_RELAY_E_INDIRECT_NEXT, i, 0, d.flags, d.len);
            if (d.len == 0 || d.len % sizeof(struct desc) || d.len / sizeof(struct desc) > v->size)
                return fault(v, IFC_RELAY_E_INDIRECT_LEN, i, 0, d.len, d.len);
            const uint8_t *sub = ifc_mem_translate(v->mem, d.addr, d.len, &v->hint);
            if (sub == NULL)
                return fault(v, IFC_RELAY_E_INDIRECT_ADDR, i, 0, d.addr, d.len);
            /* The WRITE flag of the INDIRECT descriptor itself is ignored. */
            return walk_indirect(v, sub, d.len / (uint32_t)sizeof(struct desc));
        }
        uint32_t reason = visit(v, &d, i, 0, v->size, &next, &more);
        if (reason)
            return reason;
        i = next;
    }
    return IFC_RELAY_E_NONE;
}

/* ---- commit pass -------------------------------------------------------- */

static inline void log_bytes(uint8_t *log, uint64_t gpa, uint64_t len)
{
    ifc_log_set_pages(log, gpa >> PAGE_SHIFT, (gpa + len - 1) >> PAGE_SHIFT);
}

/* The used-ring bytes this batch wrote, at the ring's log address (vhost
 * VHOST_VRING_F_LOG semantics).  Init checked the whole ring fits the log. */
static void log_used_ring(const struct ifc_relay_queue *q, uint32_t slot0, uint32_t first,
                          uint32_t second)
{
    uint8_t *log = q->cfg.log;
    uint64_t base = q->cfg.used_log_gpa;
    log_bytes(log, base, USED_RING_OFF);                      /* flags, idx */
    log_bytes(log, base + USED_RING_OFF + 8ull * slot0, 8ull * first);
    if (second)
        log_bytes(log, base + USED_RING_OFF, 8ull * second);
    if (q->cfg.flags & IFC_RELAY_F_EVENT_IDX)
        log_bytes(log, base + USED_RING_OFF + 8ull * q->cfg.size, 2);   /* avail_event */
}

static inline int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    /* virtio: interrupt when event lies in [old, new) of the indexes written,
     * i.e. the guest asked to be told once used->idx passes event. */
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

#define MIRROR_FLAGS 1
#define MIRROR_EVENT 2

/* Copy the device's used->flags and (EVENT_IDX) avail_event to the guest
 * ring; MIRROR_* bits of what changed.  They steer the guest's kicks, and
 * the device moves them without completing anything (an RX queue that ran
 * dry asks to be kicked at the next buffer), so they must not wait for a
 * used entry. */
static int mirror_header(const struct ifc_relay_queue *q, const uint8_t *m_used)
{
    uint8_t *used = q->used;
    int changed = 0;
    uint16_t flags = __atomic_load_n((const uint16_t *)m_used, __ATOMIC_RELAXED);
    if (__atomic_load_n((uint16_t *)used, __ATOMIC_RELAXED) != flags) {
        __atomic_store_n((uint16_t *)used, flags, __ATOMIC_RELAXED);
        changed |= MIRROR_FLAGS;
    }
    if (q->cfg.flags & IFC_RELAY_F_EVENT_IDX) {
        const size_t off = USED_RING_OFF + 8u * q->cfg.size;
        uint16_t event = __atomic_load_n((const uint16_t *)(m_used + off), __ATOMIC_RELAXED);
        if (__atomic_load_n((uint16_t *)(used + off), __ATOMIC_RELAXED) != event) {
            __atomic_store_n((uint16_t *)(used + off), event, __ATOMIC_RELAXED);
            changed |= MIRROR_EVENT;
        }
    }
    return changed;
}

/* After a mirror that asked for kicks (and a full fence): did the guest
 * publish past the point the device asked about while it still read the
 * old copy?  Then it did not kick and will not: the device, which re-read
 * avail->idx before the guest published, waits for buffers it already
 * has.  This is the device's half of the avail_event handshake (write the
 * event, fence, re-read the index), done here because the device's write
 * went to the mediated ring.  A kick too many is harmless. */
static uint8_t kick_for_guest(const struct ifc_relay_queue *q, const uint8_t *m_used, int mirrored)
{
    const uint8_t *avail = q->avail;
    uint16_t avail_idx = __atomic_load_n((const uint16_t *)(avail + 2), __ATOMIC_RELAXED);
    if (q->cfg.flags & IFC_RELAY_F_EVENT_IDX) {
        if (!(mirrored & MIRROR_EVENT))
            return 0;
        uint16_t event = __atomic_load_n((const uint16_t *)(m_used + USED_RING_OFF + 8u * q->cfg.size),
                                         __ATOMIC_RELAXED);
        uint16_t past = (uint16_t)(avail_idx - event);
        return past >= 1 && past <= q->cfg.size;
    }
    uint16_t flags = __atomic_load_n((const uint16_t *)m_used, __ATOMIC_RELAXED);
    return (mirrored & MIRROR_FLAGS) && !(flags & IFC_VRING_USED_F_NO_NOTIFY);
}

/* Whether the relay must look again without an interrupt (IFC_RELAY_POLL_*).
 * The device reads used_event (or avail->flags) from the *guest's* avail
 * ring, which the guest sets from what the relay showed it, not from what
 * the device wrote to the mediated ring.  The device interrupts for its
 * next entries only if used_event lies among the buffers it holds, i.e. in
 * [m_idx, avail->idx); otherwise it completes them silently.  Read the
 * guest side first, then the device's index: an entry completed after that
 * read decides with a used_event at least as new as the one read here. */
static uint8_t poll_advice(const struct ifc_relay_queue *q, const uint8_t *m_used, uint16_t last,
                           uint8_t *more)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    const uint8_t *avail = q->avail;
    const uint32_t size = q->cfg.size;
    uint16_t avail_idx = __atomic_load_n((const uint16_t *)(avail + 2), __ATOMIC_RELAXED);
    int armed;
    uint16_t m_idx;
    if (q->cfg.flags & IFC_RELAY_F_EVENT_IDX) {
        uint16_t used_event = __atomic_load_n((const uint16_t *)(avail + AVAIL_RING_OFF + 2u * size),
                                              __ATOMIC_RELAXED);
        m_idx = __atomic_load_n((const uint16_t *)(m_used + 2), __ATOMIC_ACQUIRE);
        armed = (uint16_t)(used_event - m_idx) < (uint16_t)(avail_idx - m_idx);
    } else {
        uint16_t aflags = __atomic_load_n((const uint16_t *)avail, __ATOMIC_RELAXED);
        m_idx = __atomic_load_n((const uint16_t *)(m_used + 2), __ATOMIC_ACQUIRE);
        armed = !(aflags & IFC_VRING_AVAIL_F_NO_INTERRUPT);
    }
    *more = m_idx != last;
    uint16_t held = (uint16_t)(avail_idx - m_idx);
    if (*more)
        return IFC_RELAY_POLL_FAST;
    if (held == 0 || held > size)
        return IFC_RELAY_POLL_NONE;   /* nothing to complete (or a guest index no device accepts) */
    return armed ? IFC_RELAY_POLL_SLOW : IFC_RELAY_POLL_FAST;
}

static void log_used_header(const struct ifc_relay_queue *q)
{
    uint8_t *log = q->cfg.log;
    uint64_t base = q->cfg.used_log_gpa;
    log_bytes(log, base, USED_RING_OFF);
    if (q->cfg.flags & IFC_RELAY_F_EVENT_IDX)
        log_bytes(log, base + USED_RING_OFF + 8ull * q->cfg.size, 2);
}

static int relay_locked(struct ifc_relay_queue *q, uint32_t max_entries, struct ifc_relay_result *res)
{
    const uint32_t size = q->cfg.size, mask = size - 1;
    const uint16_t last = q->last;
    uint8_t *m_used = (uint8_t *)(uintptr_t)q->cfg.m_used;
    res->old_idx = res->new_idx = last;

    uint16_t m_idx = __atomic_load_n((uint16_t *)(m_used + 2), __ATOMIC_ACQUIRE);
    uint32_t pending = (uint16_t)(m_idx - last);
    if (pending > size)
        return fail(res, IFC_RELAY_E_USED_IDX, last, 0, 0, m_idx, 0);
    uint32_t n = pending;
    if (max_entries && max_entries < n)
        n = max_entries;

    struct vstate v = {
        .mem = &q->mem, .scratch = q->cfg.scratch, .budget = q->cfg.capacity, .size = size,
        .log_pages = q->cfg.log != NULL ? q->log_pages : UINT64_MAX,
        .cur_first = NO_RANGE, .cur_last = NO_RANGE - 1,   /* win_size 0: first use searches */
    };
    const uint8_t *desc = q->desc;
    uint32_t k;
    for (k = 0; k < n; k++) {
        uint16_t idx = (uint16_t)(last + k);
        uint32_t id;
        memcpy(&id, m_used + USED_RING_OFF + 8u * (idx & mask), sizeof id);
        if (id >= size)
            return fail(res, IFC_RELAY_E_DESC_ID, idx, 0, 0, id, 0);
        uint32_t reason = IFC_RELAY_E_NONE;
        struct desc d = load_desc(desc, id);
        if (__builtin_expect(!(d.flags & (IFC_VRING_DESC_F_NEXT | IFC_VRING_DESC_F_INDIRECT)), 1)) {
            /* The common case, one descriptor: walk_ring's checks, inline, and
             * no state to take back since it is decided before anything is taken. */
            if ((d.flags & IFC_VRING_DESC_F_WRITE) && d.len) {
                uint64_t first, lastp;
                reason = check_buffer(&v, d.addr, d.len, &first, &lastp);
                if (__builtin_expect(reason != IFC_RELAY_E_NONE, 0))
                    return fail(res, reason, idx, id, 0, d.addr, d.len);
                if (v.budget == 0)
                    break;      /* valid but does not fit: the next call starts here */
                v.budget--;
                add_range(&v, first, lastp);
            }
            continue;
        }
        /* A chain: where this entry starts, to take it back if it does not fit. */
        const uint32_t saved_n = v.nranges, saved_budget = v.budget;
        const uint64_t saved_first = v.cur_first, saved_last = v.cur_last;
        reason = walk_ring(&v, desc, id);
        if (reason != IFC_RELAY_E_NONE)
            return fail(res, reason, idx, v.f_desc, v.f_level, v.f_value, v.f_len);
        if (v.overflow) {
            v.nranges = saved_n;
            v.budget = saved_budget;
            v.cur_first = saved_first;
            v.cur_last = saved_last;
            break;
        }
    }
    if (v.cur_first != NO_RANGE) {   /* close the open range: closed + 1 <= capacity */
        v.scratch[v.nranges].first_page = v.cur_first;
        v.scratch[v.nranges].last_page = v.cur_last;
        v.nranges++;
    }
    const uint32_t count = k;
    const uint16_t new_idx = (uint16_t)(last + count);
    int mirrored;
    if (count) {
        uint8_t *used = q->used;
        uint8_t *log = q->cfg.log;
        if (log != NULL && v.nranges) {
            __atomic_thread_fence(__ATOMIC_RELEASE);   /* buffer data before bits */
            for (uint32_t r = 0; r < v.nranges; r++) {
                ifc_log_set_pages(log, v.scratch[r].first_page, v.scratch[r].last_page);
                q->pages_logged += v.scratch[r].last_page - v.scratch[r].first_page + 1;
            }
        }
        uint32_t slot0 = last & mask;
        uint32_t first = count < size - slot0 ? count : size - slot0;
        uint32_t second = count - first;
        memcpy(used + USED_RING_OFF + 8u * slot0, m_used + USED_RING_OFF + 8u * slot0, 8u * first);
        if (second)
            memcpy(used + USED_RING_OFF, m_used + USED_RING_OFF, 8u * second);
        mirrored = mirror_header(q, m_used);
        /* Elements and flags before the index the guest polls. */
        __atomic_store_n((uint16_t *)(used + 2), new_idx, __ATOMIC_RELEASE);
        if (log != NULL && (q->cfg.flags & IFC_RELAY_F_LOG_USED)) {
            __atomic_thread_fence(__ATOMIC_RELEASE);
            log_used_ring(q, slot0, first, second);
        }
        if (q->cfg.flags & IFC_RELAY_F_EVENT_IDX) {
            /* Ask the device to interrupt us at its next entry. */
            uint16_t *m_used_event = (uint16_t *)(uintptr_t)(q->cfg.m_avail + AVAIL_RING_OFF + 2ull * size);
            __atomic_store_n(m_used_event, new_idx, __ATOMIC_RELAXED);
        }
        /* Our stores (guest idx, mediated used_event) before the loads that
         * decide on interrupts; otherwise both sides can miss each other. */
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        res->kick = kick_for_guest(q, m_used, mirrored);
        const uint8_t *avail = q->avail;
        if (q->cfg.flags & IFC_RELAY_F_EVENT_IDX) {
            uint16_t used_event = __atomic_load_n((const uint16_t *)(avail + AVAIL_RING_OFF + 2u * size),
                                                  __ATOMIC_RELAXED);
            res->signal = (uint8_t)need_event(used_event, new_idx, last);
        } else {
            uint16_t aflags = __atomic_load_n((const uint16_t *)avail, __ATOMIC_RELAXED);
            res->signal = !(aflags & IFC_VRING_AVAIL_F_NO_INTERRUPT);
        }
        q->last = new_idx;
        q->relayed += count;
        q->calls++;
    } else if ((mirrored = mirror_header(q, m_used)) != 0) {
        if (q->cfg.log != NULL && (q->cfg.flags & IFC_RELAY_F_LOG_USED)) {
            __atomic_thread_fence(__ATOMIC_RELEASE);
            log_used_header(q);
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        res->kick = kick_for_guest(q, m_used, mirrored);
    }
    res->rc = (int32_t)count;
    res->count = count;
    res->new_idx = new_idx;
    res->poll = poll_advice(q, m_used, new_idx, &res->more);
    return (int)count;
}

static inline void lock_queue(struct ifc_relay_queue *q)
{
    while (__atomic_exchange_n(&q->lock, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(&q->lock, __ATOMIC_RELAXED)) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
}

static inline void unlock_queue(struct ifc_relay_queue *q)
{
    __atomic_store_n(&q->lock, 0, __ATOMIC_RELEASE);
}

int ifc_relay_used(struct ifc_relay_queue *q, uint32_t max_entries, struct ifc_relay_result *res)
{
    if (res == NULL)
        return IFC_ERR_ARG;
    memset(res, 0, sizeof *res);
    if (q == NULL)
        return fail(res, IFC_RELAY_E_NOT_READY, 0, 0, 0, 0, 0);
    lock_queue(q);
    int rc = q->ready ? relay_locked(q, max_entries, res)
                      : fail(res, IFC_RELAY_E_NOT_READY, 0, 0, 0, 0, 0);
    unlock_queue(q);
    return rc;
}

/* ---- set-up ------------------------------------------------------------- */

static int check_used_log(const struct ifc_relay_config *cfg, uint8_t *log, uint64_t log_size,
                          uint32_t flags, uint64_t used_log_gpa, struct ifc_relay_result *res)
{
    if (log == NULL || !(flags & IFC_RELAY_F_LOG_USED))
        return IFC_OK;
    uint64_t len = USED_BYTES((uint64_t)cfg->size);
    uint64_t last = used_log_gpa + len - 1;
    if (last < used_log_gpa || ((last >> PAGE_SHIFT) >> 3) >= log_size)
        return fail(res, IFC_RELAY_E_USED_LOG, 0, 0, 0, used_log_gpa, (uint32_t)len);
    return IFC_OK;
}

/* Translate one guest ring: GPA alignment, whole extent inside one region,
 * host alignment (the atomics on it need natural alignment). */
static uint8_t *map_ring(const struct ifc_mem_table *mem, uint64_t gpa, uint64_t len, uint64_t align,
                         uint32_t addr_reason, struct ifc_relay_result *res, int *rc)
{
    uint32_t hint = 0;
    if (gpa % align) {
        *rc = fail(res, IFC_RELAY_E_ALIGN, 0, 0, 0, gpa, (uint32_t)len);
        return NULL;
    }
    uint8_t *host = ifc_mem_translate(mem, gpa, len, &hint);
    if (host == NULL) {
        *rc = fail(res, addr_reason, 0, 0, 0, gpa, (uint32_t)len);
        return NULL;
    }
    if ((uintptr_t)host % align) {
        *rc = fail(res, IFC_RELAY_E_ALIGN, 0, 0, 0, gpa, (uint32_t)len);
        return NULL;
    }
    *rc = IFC_OK;
    return host;
}

int ifc_relay_queue_init(struct ifc_relay_queue *q, const struct ifc_relay_config *cfg,
                         const struct ifc_mem_table *mem, struct ifc_relay_result *res)
{
    if (res == NULL)
        return IFC_ERR_ARG;
    memset(res, 0, sizeof *res);
    if (q == NULL || cfg == NULL || mem == NULL)
        return fail(res, IFC_RELAY_E_NOT_READY, 0, 0, 0, 0, 0);
    q->ready = 0;
    uint32_t size = cfg->size;
    if (size == 0 || size > IFC_VRING_MAX_SIZE || (size & (size - 1)))
        return fail(res, IFC_RELAY_E_SIZE, 0, 0, 0, size, 0);
    if (ifc_mem_table_check(mem) != IFC_OK)
        return fail(res, IFC_RELAY_E_MEM_TABLE, 0, 0, 0, mem->nregions, 0);

    struct ifc_mem_table copy;
    memset(&copy, 0, sizeof copy);
    copy.nregions = mem->nregions;
    memcpy(copy.regions, mem->regions, mem->nregions * sizeof mem->regions[0]);

    int rc;
    uint8_t *desc = map_ring(&copy, cfg->desc_gpa, 16ull * size, 16, IFC_RELAY_E_DESC_ADDR, res, &rc);
    if (desc == NULL)
        return rc;
    uint8_t *avail = map_ring(&copy, cfg->avail_gpa, AVAIL_BYTES((uint64_t)size), 2,
                              IFC_RELAY_E_AVAIL_ADDR, res, &rc);
    if (avail == NULL)
        return rc;
    uint8_t *used = map_ring(&copy, cfg->used_gpa, USED_BYTES((uint64_t)size), 4,
                             IFC_RELAY_E_USED_ADDR, res, &rc);
    if (used == NULL)
        return rc;
    if (cfg->m_avail == 0 || cfg->m_avail % 2)
        return fail(res, IFC_RELAY_E_MEDIATED, 0, 0, 0, cfg->m_avail, 0);
    if (cfg->m_used == 0 || cfg->m_used % 4)
        return fail(res, IFC_RELAY_E_MEDIATED, 0, 0, 0, cfg->m_used, 0);
    if (cfg->scratch == NULL || cfg->capacity < size)
        return fail(res, IFC_RELAY_E_CAPACITY, 0, 0, 0, cfg->capacity, 0);
    rc = check_used_log(cfg, cfg->log, cfg->log_size, cfg->flags, cfg->used_log_gpa, res);
    if (rc)
        return rc;

    q->cfg = *cfg;
    q->mem = copy;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->log_pages = cfg->log_size > UINT64_MAX / 8 ? UINT64_MAX : cfg->log_size * 8;
    q->relayed = 0;
    q->calls = 0;
    q->pages_logged = 0;
    q->lock = 0;
    q->last = cfg->last_idx;
    if (cfg->flags & IFC_RELAY_F_EVENT_IDX) {
        uint16_t *m_used_event = (uint16_t *)(uintptr_t)(cfg->m_avail + AVAIL_RING_OFF + 2ull * size);
        __atomic_store_n(m_used_event, cfg->last_idx, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&q->ready, 1, __ATOMIC_RELEASE);
    return IFC_OK;
}

int ifc_relay_queue_set_log(struct ifc_relay_queue *q, uint8_t *log, uint64_t log_size,
                            uint32_t log_used, uint64_t used_log_gpa, struct ifc_relay_result *res)
{
    if (res == NULL)
        return IFC_ERR_ARG;
    memset(res, 0, sizeof *res);
    if (q == NULL)
        return fail(res, IFC_RELAY_E_NOT_READY, 0, 0, 0, 0, 0);
    lock_queue(q);
    int rc;
    uint32_t flags = (q->cfg.flags & ~(uint32_t)IFC_RELAY_F_LOG_USED) |
                     (log_used ? IFC_RELAY_F_LOG_USED : 0);
    if (!q->ready)
        rc = fail(res, IFC_RELAY_E_NOT_READY, 0, 0, 0, 0, 0);
    else
        rc = check_used_log(&q->cfg, log, log_size, flags, used_log_gpa, res);
    if (rc == IFC_OK) {
        q->cfg.log = log;
        q->cfg.log_size = log == NULL ? 0 : log_size;
        q->cfg.flags = flags;
        q->cfg.used_log_gpa = used_log_gpa;
        q->log_pages = q->cfg.log_size > UINT64_MAX / 8 ? UINT64_MAX : q->cfg.log_size * 8;
    }
    unlock_queue(q);
    return rc;
}
