/* The C surface of ifcvf._native (the driver's C: dirty-log marking, guest
 * memory table, used-ring relay, notify loop), shared by the C sources in
 * csrc/driver/ and the cffi cdef.  csrc/driver/build_native.py feeds
 * csrc/common/ifc_common.h and then this file to cffi's cdef with every
 * preprocessor line except plain integer #defines removed, so keep
 * declarations cdef-clean. */
#ifndef IFCVF_NATIVE_H
#define IFCVF_NATIVE_H

#include "ifc_common.h"

#define IFC_LOG_PAGE_SHIFT 12  /* vhost log: one bit per 4 KiB guest page */

/* Mark every 4 KiB page touched by [gpa, gpa + len) in the vhost dirty log
 * (bit n of the log = guest page n) with atomic OR, after a release fence so
 * the data writes are visible before the bits.  Checks the whole range against
 * log_size first: out of range returns IFC_ERR_RANGE and writes nothing.
 * len == 0 marks nothing and succeeds. */
int ifc_log_mark(uint8_t *log, uint64_t log_size, uint64_t gpa, uint64_t len);

/* ------------------------------------------------------------------------
 * Guest memory table (csrc/driver/memtable.c)
 *
 * Guest-physical addresses (GPAs) from rings and descriptors are only ever
 * used after translation through this table: a range is valid when it lies
 * entirely inside one region.  ifc_mem_table_check is what every consumer
 * calls on a table before trusting it: nregions <= 8, every region non-empty,
 * gpa + size and hva + size do not wrap, hva != 0, and no two regions overlap
 * in GPA space (so a GPA has exactly one host address).
 * ------------------------------------------------------------------------ */
#define IFC_MEM_MAX_REGIONS 8

#define IFC_ERR_RING -3       /* guest ring contents break the split-ring rules */
#define IFC_ERR_MEM -4        /* a guest range lies outside the memory table */
#define IFC_ERR_SYS -5        /* a system call failed (errno in the context) */
#define IFC_ERR_BUSY -6       /* already running / stepping concurrently */

struct ifc_mem_region {
    uint64_t gpa;     /* guest-physical start */
    uint64_t size;    /* bytes */
    uint64_t hva;     /* host address of gpa */
};

struct ifc_mem_table {
    uint32_t nregions;
    uint32_t reserved;
    struct ifc_mem_region regions[8];   /* IFC_MEM_MAX_REGIONS */
};

/* IFC_OK, or IFC_ERR_ARG for a table that breaks a rule above. */
int ifc_mem_table_check(const struct ifc_mem_table *mem);

/* ------------------------------------------------------------------------
 * Used-ring relay for SW-assisted live migration (csrc/driver/relay.c)
 *
 * The device writes used elements into a mediated split ring owned by the
 * driver; ifc_relay_used copies them to the guest's used ring and logs every
 * device-writable buffer of each relayed chain in the vhost dirty log.
 *
 * One call (ifc_relay_used), precisely:
 *  0. n = (u16)(mediated used->idx [acquire] - last).  n > size: error
 *     USED_IDX.  Entries last, last+1, ... are examined in order; the call
 *     stops before entry k when k == max_entries (max_entries 0 = no limit) or
 *     when entry k is valid but its writable descriptors would bring the
 *     call's total above cfg.capacity (entries past a stop are not examined).
 *  1. Validate each entry (slot = idx & (size-1)), reading guest memory once:
 *     id = element id, id >= size: DESC_ID.  Walk the chain from desc[id]
 *     with a limit of n_max = size descriptors; for each descriptor, in order:
 *       - visiting more than n_max descriptors: LOOP (the chain loops);
 *       - INDIRECT: inside an indirect table: INDIRECT_NESTED; not the head
 *         of the ring chain: INDIRECT_POS; with NEXT: INDIRECT_NEXT;
 *         len == 0, len % 16 or len / 16 > size: INDIRECT_LEN; [addr, addr+len)
 *         not inside one region: INDIRECT_ADDR; else walk that table from
 *         entry 0 with n_max = len / 16 and stop (the WRITE flag of the
 *         INDIRECT descriptor itself is ignored, as the spec requires);
 *       - WRITE and len > 0: [addr, addr+len) must lie inside one region
 *         (BUF_ADDR) and, when a log is set, its last page inside the log
 *         (BUF_LOG).  Read-only and zero-length buffers are not checked:
 *         the relay neither reads nor logs them;
 *       - NEXT: next >= n_max: NEXT; else continue at next.
 *  2. Any error: nothing is written anywhere (no guest byte, no log bit, no
 *     mediated byte, last unchanged), res describes it, the return value is
 *     IFC_ERR_RING / IFC_ERR_MEM / IFC_ERR_RANGE (see the reason list).
 *  3. Commit (only if count > 0), from the values read in step 1:
 *     release fence; set the log bits of every writable buffer (atomic OR);
 *     copy the count elements (id, len) from the mediated to the guest used
 *     ring; guest used->flags = mediated used->flags; with EVENT_IDX guest
 *     avail_event (used->ring[size]) = mediated avail_event; store guest
 *     used->idx = last + count with release ordering; with LOG_USED set the
 *     log bits of the used-ring bytes written (flags+idx, the element slots,
 *     avail_event with EVENT_IDX) at used_log_gpa + offset; with EVENT_IDX
 *     the mediated used_event (mediated avail->ring[size]) = last + count;
 *     full fence; last += count.
 *  4. res->signal (count > 0 only): with EVENT_IDX, the guest's used_event
 *     (guest avail->ring[size], read after the full fence) lies in [old, new)
 *     (virtio's vring_need_event); else the guest avail->flags lack
 *     NO_INTERRUPT.
 *     Whether or not entries were relayed, the guest used->flags and (with
 *     EVENT_IDX) avail_event follow the mediated ones (logged like the
 *     used ring when they change): the device moves them without completing.
 *     res->kick: the device asked to be kicked (a new avail_event, or
 *     NO_NOTIFY cleared) while the guest, deciding from the stale copy,
 *     has already published past that point (avail->idx, read after a full
 *     fence): the guest will not kick, so the caller kicks for it.
 *     res->more: mediated used->idx (re-read) != last, i.e. call again.
 *     res->poll: NONE when the device holds no guest buffer (avail->idx ==
 *     mediated used->idx; a kick brings new ones), SLOW when it will
 *     interrupt for its next entries (EVENT_IDX: guest used_event in
 *     [mediated used->idx, avail->idx); else no NO_INTERRUPT), FAST when it
 *     would complete them silently or `more` is set.
 * Returns count (>= 0) or a negative error.  Calls on one queue are
 * serialised by a spin lock in the queue, so a catch-up from another thread
 * is safe while the notify loop runs.
 * ------------------------------------------------------------------------ */
#define IFC_VRING_DESC_F_NEXT 1
#define IFC_VRING_DESC_F_WRITE 2
#define IFC_VRING_DESC_F_INDIRECT 4
#define IFC_VRING_AVAIL_F_NO_INTERRUPT 1
#define IFC_VRING_USED_F_NO_NOTIFY 1
#define IFC_VRING_MAX_SIZE 32768

#define IFC_RELAY_F_EVENT_IDX 1   /* VIRTIO_RING_F_EVENT_IDX negotiated */
#define IFC_RELAY_F_LOG_USED 2    /* VHOST_VRING_F_LOG: log used-ring writes */
#define IFC_RELAY_POLL_NONE 0     /* res->poll: the device holds no buffer to complete */
#define IFC_RELAY_POLL_SLOW 1     /* it will interrupt: a slow safety poll is enough */
#define IFC_RELAY_POLL_FAST 2     /* it may complete entries silently: poll soon */

/* Reasons (res->reason).  For per-call reasons err_idx is the failing entry's
 * used index and err_desc the descriptor (in the ring, or err_indirect: in the
 * indirect table) being examined; err_value is: USED_IDX the mediated index
 * read (err_idx = last), DESC_ID the id, NEXT the next field, LOOP the table
 * size (err_desc = the descriptor it would visit next), INDIRECT_NEXT/NESTED/
 * POS the flags, INDIRECT_LEN the length, INDIRECT_ADDR and BUF_* the address
 * (err_len the length).  Set-up reasons give the offending address, size,
 * capacity or region count.  Per-call reasons, with the return code: */
#define IFC_RELAY_E_NONE 0
#define IFC_RELAY_E_USED_IDX 1         /* RING: mediated used->idx > size ahead */
#define IFC_RELAY_E_DESC_ID 2          /* RING: used element id >= size */
#define IFC_RELAY_E_NEXT 3             /* RING: next >= table size */
#define IFC_RELAY_E_LOOP 4             /* RING: chain longer than its table */
#define IFC_RELAY_E_INDIRECT_NEXT 5    /* RING: INDIRECT together with NEXT */
#define IFC_RELAY_E_INDIRECT_NESTED 6  /* RING: INDIRECT inside an indirect table */
#define IFC_RELAY_E_INDIRECT_POS 7     /* RING: INDIRECT not at the chain head */
#define IFC_RELAY_E_INDIRECT_LEN 8     /* RING: indirect len 0, % 16 or > 16*size */
#define IFC_RELAY_E_INDIRECT_ADDR 9    /* MEM: indirect table outside guest memory */
#define IFC_RELAY_E_BUF_ADDR 10        /* MEM: writable buffer outside guest memory */
#define IFC_RELAY_E_BUF_LOG 11         /* RANGE: writable buffer past the log */
/* Set-up reasons (ifc_relay_queue_init / _set_log): */
#define IFC_RELAY_E_SIZE 12            /* ARG: size not a power of two in 1..32768 */
#define IFC_RELAY_E_MEM_TABLE 13       /* ARG: memory table fails ifc_mem_table_check */
#define IFC_RELAY_E_DESC_ADDR 14       /* MEM: desc table (16*size) outside memory */
#define IFC_RELAY_E_AVAIL_ADDR 15      /* MEM: avail ring (6+2*size) outside memory */
#define IFC_RELAY_E_USED_ADDR 16       /* MEM: used ring (6+8*size) outside memory */
#define IFC_RELAY_E_ALIGN 17           /* ARG: a ring misaligned (16/2/4, GPA or host) */
#define IFC_RELAY_E_USED_LOG 18        /* RANGE: used ring log range past the log */
#define IFC_RELAY_E_CAPACITY 19        /* ARG: capacity < size or no scratch */
#define IFC_RELAY_E_MEDIATED 20        /* ARG: mediated ring pointer NULL/misaligned */
#define IFC_RELAY_E_NOT_READY 21       /* ARG: queue not initialised / NULL result */
#define IFC_RELAY_E_COUNT 22

/* One log range of the validate pass: guest pages first..last inclusive. */
struct ifc_relay_range {
    uint64_t first_page;
    uint64_t last_page;
};

struct ifc_relay_config {
    uint32_t size;            /* ring size, power of two <= 32768 */
    uint32_t flags;           /* IFC_RELAY_F_* */
    uint64_t desc_gpa;        /* guest desc table (16-aligned) */
    uint64_t avail_gpa;       /* guest avail ring (2-aligned) */
    uint64_t used_gpa;        /* guest used ring (4-aligned) */
    uint64_t used_log_gpa;    /* LOG_USED: log address of the guest used ring */
    uint64_t m_avail;         /* host address of the mediated avail ring */
    uint64_t m_used;          /* host address of the mediated used ring */
    uint8_t *log;             /* vhost log, NULL: no logging */
    uint64_t log_size;        /* bytes */
    struct ifc_relay_range *scratch;  /* capacity entries, owned by the caller */
    uint32_t capacity;        /* writable descriptors per call, >= size */
    uint16_t last_idx;        /* first used index to relay (the vring base) */
    uint16_t reserved;
};

struct ifc_relay_result {
    int32_t rc;               /* the return value */
    uint32_t count;           /* entries relayed */
    uint16_t old_idx;         /* last before the call */
    uint16_t new_idx;         /* last after it */
    uint8_t signal;           /* the guest asked for an interrupt */
    uint8_t more;             /* entries remain: call again */
    uint8_t err_indirect;     /* err_desc indexes an indirect table */
    uint8_t poll;             /* IFC_RELAY_POLL_*: look again without an interrupt? */
    uint32_t reason;          /* IFC_RELAY_E_* */
    uint16_t err_idx;         /* free-running used index of the failing entry */
    uint8_t kick;             /* ring the device's doorbell for the guest (see below) */
    uint8_t reserved2;
    uint32_t err_desc;        /* descriptor index of the failure in its table */
    uint32_t err_len;         /* len of the failing descriptor, if relevant */
    uint64_t err_value;       /* the offending value (id, next, flags, len, addr) */
};

struct ifc_relay_queue {
    struct ifc_relay_config cfg;
    struct ifc_mem_table mem;   /* a checked copy */
    uint8_t *desc;              /* host addresses of the guest rings */
    uint8_t *avail;
    uint8_t *used;
    uint64_t log_pages;         /* pages the log covers (log_size * 8) */
    uint64_t relayed;           /* entries relayed, all calls */
    uint64_t calls;             /* calls that relayed something */
    uint64_t pages_logged;      /* buffer pages marked in the log (a page per buffer range) */
    uint32_t lock;              /* spin lock serialising calls */
    uint16_t last;              /* next used index to relay */
    uint16_t ready;             /* set by a successful init */
};

/* Validate cfg and mem (translating the guest rings), copy them into q and
 * make it ready; with EVENT_IDX also set the mediated used_event = last_idx
 * so the device interrupts at its first entry.  IFC_OK, or a negative code
 * with res describing the reason (q is then not ready). */
int ifc_relay_queue_init(struct ifc_relay_queue *q, const struct ifc_relay_config *cfg,
                         const struct ifc_mem_table *mem, struct ifc_relay_result *res);

/* Replace the log (NULL: stop logging) and the LOG_USED setting; checked like
 * init (USED_LOG); on error the queue keeps its old log. */
int ifc_relay_queue_set_log(struct ifc_relay_queue *q, uint8_t *log, uint64_t log_size,
                            uint32_t log_used, uint64_t used_log_gpa,
                            struct ifc_relay_result *res);

/* Relay up to max_entries (0: all) used entries; see the semantics above. */
int ifc_relay_used(struct ifc_relay_queue *q, uint32_t max_entries, struct ifc_relay_result *res);

/* A static string for a reason code ("unknown reason" past the table). */
const char *ifc_relay_reason_text(uint32_t reason);

/* ------------------------------------------------------------------------
 * Notify relay (csrc/driver/notify.c): one epoll loop over the kick eventfds
 * of the queues and the interrupt eventfds of the relayed queues.
 *   kick:      drain the eventfd (8-byte read), then write the queue index to
 *              the doorbell with one 16-bit volatile store; doorbell 0 means
 *              "record it" (a KICK_FORWARD event for Python, step mode only).
 *   interrupt: drain, relay used entries (up to 16 calls while `more`, then
 *              re-signal the interrupt fd so the loop comes back), and write
 *              1 to the guest call fd when the guest asked for it.  A relay
 *              error marks the queue broken (its error kept) and the queue is
 *              not relayed again; its interrupts are still drained.
 * Run blocks in epoll_wait until ifc_notify_stop (a stop eventfd): it then
 * finishes the batch of ready fds it woke up with (at most 64, so every fd
 * signalled before the stop is handled) and returns.  Step polls once with
 * timeout 0 and reports what it did as events.  Run and step refuse to run
 * concurrently (IFC_ERR_BUSY); catch-up may run alongside either.
 * ------------------------------------------------------------------------ */
#define IFC_NOTIFY_EV_KICK 1          /* doorbell written */
#define IFC_NOTIFY_EV_KICK_FORWARD 2  /* doorbell 0: caller must ring it */
#define IFC_NOTIFY_EV_RELAY 3         /* count = entries relayed */
#define IFC_NOTIFY_EV_SIGNAL 4        /* guest call fd written (fd = that fd) */
#define IFC_NOTIFY_EV_REARM 5         /* interrupt fd re-signalled (fd = it) */
#define IFC_NOTIFY_EV_BROKEN 6        /* relay failed now; see the queue error */
#define IFC_NOTIFY_EVENTS_PER_FD 4    /* at most this many events per fd event */
#define IFC_NOTIFY_MAX_QUEUES 256

struct ifc_notify_queue {
    int32_t kick_fd;          /* guest kick eventfd, -1: none */
    int32_t intr_fd;          /* device interrupt eventfd (relayed queues), -1: none */
    int32_t call_fd;          /* guest call eventfd, -1: none */
    uint32_t poll_ns;         /* relayed: poll again this long from now, 0: no poll */
    uint64_t doorbell;        /* host address of the 16-bit doorbell, 0: forward */
    struct ifc_relay_queue *relay;    /* NULL: not relayed */
    uint64_t kicks;           /* kicks taken (doorbell written or forwarded) */
    uint64_t interrupts;      /* device interrupts taken */
    uint64_t relayed;         /* used entries relayed */
    uint64_t signals;         /* guest call fd writes */
    uint64_t polls;           /* relays without an interrupt (timer polls) */
    uint64_t relay_kicks;     /* doorbells rung for the guest (res->kick) */
    uint32_t poll_advice;     /* IFC_RELAY_POLL_* of the last relay */
    int32_t broken;           /* 0, or the relay error code */
    uint32_t broken_claim;    /* first error wins */
    struct ifc_relay_result error;    /* valid once broken != 0 */
};

struct ifc_notify_event {
    uint32_t qid;
    uint32_t kind;            /* IFC_NOTIFY_EV_* */
    int32_t fd;               /* SIGNAL/REARM: the fd written; else -1 */
    int32_t rc;               /* BROKEN: the error code */
    uint64_t count;           /* RELAY: entries */
};

struct ifc_notify_ctx {
    struct ifc_notify_queue *queues;  /* nqueues entries, owned by the caller */
    uint32_t nqueues;
    int32_t epfd;
    int32_t stop_fd;
    uint32_t busy;            /* run or step in progress */
    int32_t sys_errno;        /* errno of the last IFC_ERR_SYS */
    uint32_t poll_min_ns;     /* adaptive poll period bounds, 0: no polls (ifc_notify_set_poll) */
    uint32_t poll_max_ns;
    uint64_t wakeups;         /* epoll_wait returns with events */
    int32_t timer_fd;         /* run(): the poll timer, -1: none */
    uint32_t timer_ns;        /* run(): the period the timer is armed with, 0: disarmed */
};

/* Create the epoll set and the stop eventfd; fds are made O_NONBLOCK. */
int ifc_notify_init(struct ifc_notify_ctx *ctx, struct ifc_notify_queue *queues, uint32_t nqueues);
/* Loop until stopped; IFC_ERR_ARG if a queue has a kick fd but no doorbell. */
int ifc_notify_run(struct ifc_notify_ctx *ctx);
/* Ask run to return (async-signal-safe; works before run starts, too). */
int ifc_notify_stop(struct ifc_notify_ctx *ctx);
/* Handle what is pending without blocking; events out, returns how many. */
int ifc_notify_step(struct ifc_notify_ctx *ctx, struct ifc_notify_event *out, uint32_t max_out);
/* Relay queue qid now (as an interrupt would); events out as for step. */
int ifc_notify_catch_up(struct ifc_notify_ctx *ctx, uint32_t qid,
                        struct ifc_notify_event *out, uint32_t max_out);
/* Adaptive polls of the relayed queues.  A device reads used_event (or
 * avail->flags) from the *guest's* avail ring, which the guest sets from the
 * used index the relay showed it: whenever the guest's value lies behind the
 * device's index (Linux writes 0 there entering NAPI other than from an
 * interrupt, and moves it entry by entry while it polls), the device
 * completes entries without interrupting, and only a poll finds them.  After
 * every relay of a queue (see res->poll): FAST -> poll again min_ns later,
 * doubling up to max_ns while polls find nothing; SLOW (the device will
 * interrupt) -> a safety poll every max_ns, since the guest may move
 * used_event back at any time; NONE (the device holds no buffer) -> also
 * every max_ns, since the device asks for its kick in the mediated ring
 * after draining it and only a poll copies that to the guest (res->kick),
 * and a kick of that queue brings the next poll to min_ns.  run() uses a
 * timerfd; a simulator asks ifc_notify_next_poll and calls ifc_notify_poll
 * at modelled times.  min_ns 0 turns polling off. */
int ifc_notify_set_poll(struct ifc_notify_ctx *ctx, uint32_t min_ns, uint32_t max_ns);
/* The earliest poll period any relayed queue asks for, 0: none. */
uint32_t ifc_notify_next_poll(const struct ifc_notify_ctx *ctx);
/* Relay every queue that asked for a poll, now; events out as for step. */
int ifc_notify_poll(struct ifc_notify_ctx *ctx, struct ifc_notify_event *out, uint32_t max_out);
/* Close the epoll and stop fds (not the queue fds, which the caller owns). */
void ifc_notify_close(struct ifc_notify_ctx *ctx);

#endif
