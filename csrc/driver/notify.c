/* Notify relay: guest kicks -> doorbells, device interrupts of relayed
 * queues -> used-ring relay -> guest call eventfds.  One epoll set serves
 * both the blocking loop (VFIO backend, a Python thread running C with the
 * GIL released) and the non-blocking step (the simulator, at modelled times),
 * so both run exactly this code. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include "ifcvf_native.h"

enum { KIND_KICK = 0, KIND_INTR = 1, KIND_STOP = 2, KIND_TIMER = 3 };

#define MAX_EVENTS 64
/* Relay calls per interrupt before going back to epoll: a device that keeps
 * producing must not starve the kicks and the stop request. */
#define MAX_RELAY_CALLS 16

static inline uint64_t tag(uint32_t qid, int kind)
{
    return ((uint64_t)qid << 8) | (uint64_t)kind;
}

struct out {
    struct ifc_notify_event *ev;
    uint32_t n, max;
};

static void emit(struct out *o, uint32_t qid, uint32_t kind, int fd, int rc, uint64_t count)
{
    if (o == NULL || o->n >= o->max)
        return;
    o->ev[o->n++] = (struct ifc_notify_event){
        .qid = qid, .kind = kind, .fd = fd, .rc = rc, .count = count,
    };
}

/* Take everything an eventfd holds; 0 when it held nothing (another reader,
 * a spurious wake-up). */
static int drain(int fd)
{
    uint64_t v;
    ssize_t r;
    do
        r = read(fd, &v, sizeof v);
    while (r < 0 && errno == EINTR);
    return r == (ssize_t)sizeof v;
}

static void signal_fd(int fd)
{
    uint64_t one = 1;
    ssize_t r;
    do
        r = write(fd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
    /* EAGAIN means the counter is saturated: the reader will wake anyway. */
}

static void ring_doorbell(struct ifc_notify_queue *nq, uint32_t qid, struct out *o)
{
    if (nq->doorbell) {
        /* One exact 16-bit store: the notify register takes the queue index. */
        *(volatile uint16_t *)(uintptr_t)nq->doorbell = (uint16_t)qid;
        emit(o, qid, IFC_NOTIFY_EV_KICK, -1, 0, 1);
    } else {
        emit(o, qid, IFC_NOTIFY_EV_KICK_FORWARD, -1, 0, 1);
    }
}

static void do_kick(struct ifc_notify_ctx *ctx, uint32_t qid, struct out *o)
{
    struct ifc_notify_queue *nq = &ctx->queues[qid];
    if (!drain(nq->kick_fd))
        return;
    __atomic_fetch_add(&nq->kicks, 1, __ATOMIC_RELAXED);
    if (nq->relay != NULL && ctx->poll_min_ns && nq->poll_advice == IFC_RELAY_POLL_NONE)
        nq->poll_ns = ctx->poll_min_ns;   /* new buffers: see soon whether it interrupts for them */
    ring_doorbell(nq, qid, o);
}

static void mark_broken(struct ifc_notify_queue *nq, const struct ifc_relay_result *res)
{
    if (__atomic_exchange_n(&nq->broken_claim, 1, __ATOMIC_ACQ_REL))
        return;   /* the first error is the one kept */
    nq->error = *res;
    __atomic_store_n(&nq->broken, res->rc, __ATOMIC_RELEASE);
}

/* The queue's next poll from the relay's advice (see ifc_notify_set_poll). */
static void plan_poll(struct ifc_notify_ctx *ctx, struct ifc_notify_queue *nq, uint32_t advice,
                      uint64_t relayed)
{
    uint32_t next = 0;
    if (ctx->poll_min_ns == 0)
        next = 0;
    else if (advice != IFC_RELAY_POLL_FAST)
        /* SLOW: the guest may move used_event back at any time.  NONE: the
         * device that drained the ring asks for a kick in the mediated ring
         * a moment later, after this look; the guest, reading the old copy,
         * may never kick.  A slow poll mirrors it and kicks for the guest. */
        next = ctx->poll_max_ns;
    else if (relayed || nq->poll_advice != IFC_RELAY_POLL_FAST || nq->poll_ns == 0)
        next = ctx->poll_min_ns;   /* found work, or just became unsafe: look again soon */
    else
        next = nq->poll_ns >= ctx->poll_max_ns / 2 ? ctx->poll_max_ns : 2 * nq->poll_ns;
    nq->poll_advice = advice;
    nq->poll_ns = next;
}

/* Relay what the device has produced; entries or a negative error. */
static int relay_queue(struct ifc_notify_ctx *ctx, uint32_t qid, struct out *o)
{
    struct ifc_notify_queue *nq = &ctx->queues[qid];
    int broken = __atomic_load_n(&nq->broken, __ATOMIC_ACQUIRE);
    if (broken)
        return broken;
    struct ifc_relay_result res;
    uint64_t total = 0;
    int signal = 0, more = 0, kick = 0, rc = 0;
    for (int i = 0; i < MAX_RELAY_CALLS; i++) {
        rc = ifc_relay_used(nq->relay, 0, &res);
        if (rc < 0)
            break;
        total += (uint64_t)rc;
        signal |= res.signal;
        kick |= res.kick;
        more = res.more;
        if (!more)
            break;
    }
    if (kick && (nq->doorbell || nq->kick_fd >= 0)) {
        __atomic_fetch_add(&nq->relay_kicks, 1, __ATOMIC_RELAXED);
        ring_doorbell(nq, qid, o);
    }
    plan_poll(ctx, nq, rc < 0 ? IFC_RELAY_POLL_NONE : res.poll, total);
    if (total) {
        __atomic_fetch_add(&nq->relayed, total, __ATOMIC_RELAXED);
        emit(o, qid, IFC_NOTIFY_EV_RELAY, -1, 0, total);
    }
    if (rc < 0) {
        mark_broken(nq, &res);
        emit(o, qid, IFC_NOTIFY_EV_BROKEN, -1, rc, 0);
    }
    if (signal && nq->call_fd >= 0) {
        signal_fd(nq->call_fd);
        __atomic_fetch_add(&nq->signals, 1, __ATOMIC_RELAXED);
        emit(o, qid, IFC_NOTIFY_EV_SIGNAL, nq->call_fd, 0, 1);
    }
    if (rc >= 0 && more && nq->intr_fd >= 0) {
        /* Still more: come back through epoll rather than loop here, and do
         * not rely on another device interrupt (used_event may be past it). */
        signal_fd(nq->intr_fd);
        emit(o, qid, IFC_NOTIFY_EV_REARM, nq->intr_fd, 0, 0);
    }
    return rc < 0 ? rc : (int)(total > INT32_MAX ? INT32_MAX : total);
}

static void do_intr(struct ifc_notify_ctx *ctx, uint32_t qid, struct out *o)
{
    struct ifc_notify_queue *nq = &ctx->queues[qid];
    if (!drain(nq->intr_fd))
        return;
    __atomic_fetch_add(&nq->interrupts, 1, __ATOMIC_RELAXED);
    relay_queue(ctx, qid, o);
}

/* The timer poll: relay every queue that asked for one. */
static void poll_due(struct ifc_notify_ctx *ctx, struct out *o)
{
    for (uint32_t qid = 0; qid < ctx->nqueues; qid++) {
        struct ifc_notify_queue *nq = &ctx->queues[qid];
        if (nq->relay != NULL && nq->poll_ns) {
            __atomic_fetch_add(&nq->polls, 1, __ATOMIC_RELAXED);
            relay_queue(ctx, qid, o);
        }
    }
}

uint32_t ifc_notify_next_poll(const struct ifc_notify_ctx *ctx)
{
    uint32_t next = 0;
    if (ctx == NULL)
        return 0;
    for (uint32_t qid = 0; qid < ctx->nqueues; qid++) {
        uint32_t p = ctx->queues[qid].poll_ns;
        if (ctx->queues[qid].relay != NULL && p && (next == 0 || p < next))
            next = p;
    }
    return next;
}

/* run(): (re)arm the timer when a poll is wanted sooner than it would fire,
 * disarm it when none is. */
static void arm_poll(struct ifc_notify_ctx *ctx)
{
    if (ctx->timer_fd < 0)
        return;
    uint32_t next = ifc_notify_next_poll(ctx);
    if (next == ctx->timer_ns || (next && ctx->timer_ns && next > ctx->timer_ns))
        return;
    struct itimerspec its;
    memset(&its, 0, sizeof its);
    its.it_value.tv_sec = next / 1000000000u;
    its.it_value.tv_nsec = next % 1000000000u;
    if (timerfd_settime(ctx->timer_fd, 0, &its, NULL) == 0)
        ctx->timer_ns = next;
}

/* Handle one batch of epoll events; returns 1 when a stop request was seen. */
static int handle(struct ifc_notify_ctx *ctx, const struct epoll_event *evs, int n, struct out *o)
{
    int stop = 0;
    for (int i = 0; i < n; i++) {
        uint64_t data = evs[i].data.u64;
        uint32_t qid = (uint32_t)(data >> 8);
        switch ((int)(data & 0xff)) {
        case KIND_STOP:
            drain(ctx->stop_fd);
            stop = 1;
            break;
        case KIND_KICK:
            if (qid < ctx->nqueues)
                do_kick(ctx, qid, o);
            break;
        case KIND_INTR:
            if (qid < ctx->nqueues)
                do_intr(ctx, qid, o);
            break;
        case KIND_TIMER:
            drain(ctx->timer_fd);
            ctx->timer_ns = 0;
            poll_due(ctx, o);
            break;
        default:
            break;
        }
    }
    return stop;
}

static int make_nonblocking(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    return (fl & O_NONBLOCK) ? 0 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int watch(struct ifc_notify_ctx *ctx, int fd, uint64_t data)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = EPOLLIN;
    ev.data.u64 = data;
    if (make_nonblocking(fd) < 0 || epoll_ctl(ctx->epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        ctx->sys_errno = errno;
        return IFC_ERR_SYS;
    }
    return IFC_OK;
}

void ifc_notify_close(struct ifc_notify_ctx *ctx)
{
    if (ctx == NULL)
        return;
    if (ctx->epfd >= 0)
        close(ctx->epfd);
    if (ctx->stop_fd >= 0)
        close(ctx->stop_fd);
    if (ctx->timer_fd >= 0)
        close(ctx->timer_fd);
    ctx->epfd = ctx->stop_fd = ctx->timer_fd = -1;
}

int ifc_notify_init(struct ifc_notify_ctx *ctx, struct ifc_notify_queue *queues, uint32_t nqueues)
{
    if (ctx == NULL)
        return IFC_ERR_ARG;
    memset(ctx, 0, sizeof *ctx);
    ctx->epfd = ctx->stop_fd = ctx->timer_fd = -1;
    if ((nqueues && queues == NULL) || nqueues > IFC_NOTIFY_MAX_QUEUES)
        return IFC_ERR_ARG;
    for (uint32_t i = 0; i < nqueues; i++) {
        const struct ifc_notify_queue *nq = &queues[i];
        if (nq->intr_fd >= 0 && (nq->relay == NULL || !nq->relay->ready))
            return IFC_ERR_ARG;   /* an interrupt to relay needs a relay queue */
        if (nq->doorbell % 2)
            return IFC_ERR_ARG;   /* the 16-bit store needs natural alignment */
    }
    ctx->queues = queues;
    ctx->nqueues = nqueues;
    ctx->epfd = epoll_create1(EPOLL_CLOEXEC);
    ctx->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (ctx->epfd < 0 || ctx->stop_fd < 0) {
        ctx->sys_errno = errno;
        ifc_notify_close(ctx);
        return IFC_ERR_SYS;
    }
    int rc = watch(ctx, ctx->stop_fd, tag(0, KIND_STOP));
    for (uint32_t i = 0; rc == IFC_OK && i < nqueues; i++) {
        if (queues[i].kick_fd >= 0)
            rc = watch(ctx, queues[i].kick_fd, tag(i, KIND_KICK));
        if (rc == IFC_OK && queues[i].intr_fd >= 0)
            rc = watch(ctx, queues[i].intr_fd, tag(i, KIND_INTR));
    }
    if (rc != IFC_OK)
        ifc_notify_close(ctx);
    return rc;
}

int ifc_notify_run(struct ifc_notify_ctx *ctx)
{
    if (ctx == NULL || ctx->epfd < 0)
        return IFC_ERR_ARG;
    for (uint32_t i = 0; i < ctx->nqueues; i++)
        if (ctx->queues[i].kick_fd >= 0 && !ctx->queues[i].doorbell)
            return IFC_ERR_ARG;   /* nobody would forward that kick */
    if (__atomic_exchange_n(&ctx->busy, 1, __ATOMIC_ACQUIRE))
        return IFC_ERR_BUSY;
    struct epoll_event evs[MAX_EVENTS];
    int rc = IFC_OK;
    arm_poll(ctx);
    for (;;) {
        int n = epoll_wait(ctx->epfd, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            ctx->sys_errno = errno;
            rc = IFC_ERR_SYS;
            break;
        }
        __atomic_fetch_add(&ctx->wakeups, 1, __ATOMIC_RELAXED);
        if (handle(ctx, evs, n, NULL))
            break;
        arm_poll(ctx);
    }
    __atomic_store_n(&ctx->busy, 0, __ATOMIC_RELEASE);
    return rc;
}

int ifc_notify_stop(struct ifc_notify_ctx *ctx)
{
    if (ctx == NULL || ctx->stop_fd < 0)
        return IFC_ERR_ARG;
    signal_fd(ctx->stop_fd);
    return IFC_OK;
}

int ifc_notify_step(struct ifc_notify_ctx *ctx, struct ifc_notify_event *out, uint32_t max_out)
{
    if (ctx == NULL || ctx->epfd < 0 || out == NULL || max_out < IFC_NOTIFY_EVENTS_PER_FD)
        return IFC_ERR_ARG;
    /* Take only as many fds as the output can describe; the rest stay
     * readable (level-triggered) for the next step. */
    uint32_t max_fds = max_out / IFC_NOTIFY_EVENTS_PER_FD;
    if (max_fds > MAX_EVENTS)
        max_fds = MAX_EVENTS;
    if (__atomic_exchange_n(&ctx->busy, 1, __ATOMIC_ACQUIRE))
        return IFC_ERR_BUSY;
    struct epoll_event evs[MAX_EVENTS];
    struct out o = {.ev = out, .n = 0, .max = max_out};
    int n;
    do
        n = epoll_wait(ctx->epfd, evs, (int)max_fds, 0);
    while (n < 0 && errno == EINTR);
    int rc;
    if (n < 0) {
        ctx->sys_errno = errno;
        rc = IFC_ERR_SYS;
    } else {
        if (n > 0)
            __atomic_fetch_add(&ctx->wakeups, 1, __ATOMIC_RELAXED);
        handle(ctx, evs, n, &o);   /* a stop request means nothing to a step */
        rc = (int)o.n;
    }
    __atomic_store_n(&ctx->busy, 0, __ATOMIC_RELEASE);
    return rc;
}

int ifc_notify_catch_up(struct ifc_notify_ctx *ctx, uint32_t qid,
                        struct ifc_notify_event *out, uint32_t max_out)
{
    if (ctx == NULL || qid >= ctx->nqueues || ctx->queues[qid].relay == NULL)
        return IFC_ERR_ARG;
    if (max_out && out == NULL)
        return IFC_ERR_ARG;
    struct out o = {.ev = out, .n = 0, .max = max_out};
    /* Safe while run() is active: the relay queue's lock serialises calls. */
    relay_queue(ctx, qid, &o);
    return (int)o.n;
}

int ifc_notify_set_poll(struct ifc_notify_ctx *ctx, uint32_t min_ns, uint32_t max_ns)
{
    if (ctx == NULL || ctx->epfd < 0 || (min_ns && max_ns < min_ns))
        return IFC_ERR_ARG;
    if (min_ns && ctx->timer_fd < 0) {
        ctx->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        if (ctx->timer_fd < 0) {
            ctx->sys_errno = errno;
            return IFC_ERR_SYS;
        }
        int rc = watch(ctx, ctx->timer_fd, tag(0, KIND_TIMER));
        if (rc != IFC_OK)
            return rc;
    }
    ctx->poll_min_ns = min_ns;
    ctx->poll_max_ns = min_ns ? max_ns : 0;
    /* Until a relay says otherwise, assume the device may complete silently. */
    for (uint32_t qid = 0; qid < ctx->nqueues; qid++)
        if (ctx->queues[qid].relay != NULL)
            ctx->queues[qid].poll_ns = min_ns;
    return IFC_OK;
}

int ifc_notify_poll(struct ifc_notify_ctx *ctx, struct ifc_notify_event *out, uint32_t max_out)
{
    if (ctx == NULL || (max_out && out == NULL))
        return IFC_ERR_ARG;
    struct out o = {.ev = out, .n = 0, .max = max_out};
    poll_due(ctx, &o);
    return (int)o.n;
}
