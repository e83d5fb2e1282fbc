/* A guest virtio-net driver's split-ring work, a batch per call.
 *
 * The guest model (sim/guest.py) decides *when* to work and what it costs;
 * this file does the per-buffer work: consuming used entries (checking every
 * received frame), refilling RX buffers, reclaiming and posting TX chains,
 * publishing avail->idx and the notification-suppression arithmetic.
 *
 * Driver-private state lives in guest RAM (the private block at q->priv), so
 * a destination VF after a migration continues from what is in memory:
 *
 *   0   u16 avail_idx    shadow: next avail ring entry to write; entries up to
 *                        here may be written but not yet published
 *   2   u16 last_used    next used ring entry to consume
 *   4   u16 free_head    free-running index of the next free buffer to take
 *   6   u16 free_tail    free-running index where the next freed buffer goes
 *   8   u16 cb_enabled   0 while the shadow VRING_AVAIL_F_NO_INTERRUPT bit is set
 *                        (Linux: vq->split.avail_flags_shadow), 1 otherwise
 *   10  u16 nslots       for sanity checks after a migration
 *   12  u16 event_triggered  Linux vq->event_triggered: set by vring_interrupt
 *                        with EVENT_IDX, cleared by the enable_cb variants
 *   14  u16 reserved
 *   16  u16 free[nslots] ring of free buffer numbers
 *   ..  u8  state[nslots] 1 while the device holds the buffer
 *
 * Everything the device wrote (used ids, lengths, num_buffers, used->idx)
 * is checked before use; a violation sets q->error and makes every later
 * call fail: the queue is broken, as a real driver would mark it.
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "sim_native.h"
#include "vring_event.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

uint32_t ifc__stream_emit(ifc_stream *s, uint8_t *frame, uint64_t cap);
int ifc__check_one(const uint8_t *frame, uint32_t len, ifc_checker *ck, ifc_check_stats *st);

struct priv {
    uint16_t avail_idx;
    uint16_t last_used;
    uint16_t free_head;
    uint16_t free_tail;
    uint16_t cb_enabled;
    uint16_t nslots;
    uint16_t event_triggered;
    uint16_t reserved;
    uint16_t free[];
};

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct used_elem {
    uint32_t id;
    uint32_t len;
};

#define PRIV(q) ((struct priv *)(void *)((q)->mem + (q)->priv))
#define STATE(q, pv) ((uint8_t *)(pv) + 16 + 2 * (size_t)(q)->nslots)
#define DESC(q) ((struct desc *)(void *)((q)->mem + (q)->desc))
#define AVAIL_FLAGS(q) ((uint16_t *)(void *)((q)->mem + (q)->avail))
#define AVAIL_IDX(q) ((uint16_t *)(void *)((q)->mem + (q)->avail + 2))
#define AVAIL_RING(q) ((uint16_t *)(void *)((q)->mem + (q)->avail + 4))
#define USED_EVENT(q) ((uint16_t *)(void *)((q)->mem + (q)->avail + 4 + 2 * (size_t)(q)->size))
#define USED_FLAGS(q) ((uint16_t *)(void *)((q)->mem + (q)->used))
#define USED_IDX(q) ((uint16_t *)(void *)((q)->mem + (q)->used + 2))
#define USED_RING(q) ((struct used_elem *)(void *)((q)->mem + (q)->used + 4))
#define AVAIL_EVENT(q) ((uint16_t *)(void *)((q)->mem + (q)->used + 4 + 8 * (size_t)(q)->size))

static inline uint16_t load16(const uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store16(uint16_t *p, uint16_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

uint64_t ifc_gvq_priv_size(uint32_t nslots)
{
    return (16 + 3 * (uint64_t)nslots + 63) & ~(uint64_t)63;
}

static int fits(const ifc_gvq *q, uint64_t gpa, uint64_t len)
{
    return gpa <= q->mem_size && len <= q->mem_size - gpa;
}

static int64_t fail(ifc_gvq *q, uint32_t error, uint32_t value)
{
    if (!q->error) {
        q->error = error;
        q->error_value = value;
    }
    return IFC_GERR_RING;
}

int ifc_gvq_init(ifc_gvq *q, int fresh)
{
    if (q == NULL || q->mem == NULL)
        return IFC_GERR_ARG;
    uint32_t size = q->size, n = q->nslots;
    int split = (q->flags & IFC_GVQ_F_TX_SPLIT) != 0;
    int indirect = (q->flags & IFC_GVQ_F_TX_INDIRECT) != 0;
    if (size == 0 || size > 32768 || (size & (size - 1)) || (split && indirect))
        return IFC_GERR_ARG;
    if (n != (split ? size / 2 : size) || n == 0)
        return IFC_GERR_ARG;
    if ((q->hdr_len != 10 && q->hdr_len != 12) || q->buf_size < q->hdr_len)
        return IFC_GERR_ARG;
    if ((q->desc & 15) || (q->avail & 1) || (q->used & 3) || (q->priv & 63))
        return IFC_GERR_ARG;
    if (!fits(q, q->desc, 16ull * size) || !fits(q, q->avail, 6 + 2ull * size)
        || !fits(q, q->used, 6 + 8ull * size) || !fits(q, q->priv, ifc_gvq_priv_size(n))
        || !fits(q, q->bufs, (uint64_t)q->buf_size * n))
        return IFC_GERR_ARG;
    if ((split || indirect) && !fits(q, q->hdrs, 16ull * n))
        return IFC_GERR_ARG;
    if (indirect && ((q->tables & 15) || !fits(q, q->tables, 32ull * n)))
        return IFC_GERR_ARG;
    struct priv *pv = PRIV(q);
    if (fresh) {
        memset(pv, 0, ifc_gvq_priv_size(n));
        for (uint32_t i = 0; i < n; i++)
            pv->free[i] = (uint16_t)i;
        pv->free_tail = (uint16_t)n;   /* n <= 32768: head 0, tail n means all free */
        pv->nslots = (uint16_t)n;
        pv->cb_enabled = 1;
        memset(q->mem + q->desc, 0, 16ull * size);
        memset(q->mem + q->avail, 0, 6 + 2ull * size);
        memset(q->mem + q->used, 0, 6 + 8ull * size);
    } else {
        uint16_t free = (uint16_t)(pv->free_tail - pv->free_head);
        if (pv->nslots != (uint16_t)n || free > n)
            return IFC_GERR_ARG;
    }
    q->error = 0;
    q->error_value = 0;
    q->kick_old = load16(AVAIL_IDX(q));
    q->last_entries = 0;
    return IFC_OK;
}

static inline uint32_t num_free(const struct priv *pv)
{
    return (uint16_t)(pv->free_tail - pv->free_head);
}

int ifc_gvq_rebase(ifc_gvq *q, uint16_t idx)
{
    if (q == NULL || q->mem == NULL)
        return IFC_GERR_ARG;
    struct priv *pv = PRIV(q);
    if (num_free(pv) != q->nslots || pv->avail_idx != load16(AVAIL_IDX(q))
        || pv->last_used != load16(USED_IDX(q)))
        return IFC_GERR_ARG;
    pv->avail_idx = pv->last_used = idx;
    store16(AVAIL_IDX(q), idx);
    store16(USED_IDX(q), idx);
    store16(USED_EVENT(q), pv->cb_enabled ? idx : 0);
    q->kick_old = idx;
    return IFC_OK;
}

static inline void put_free(const ifc_gvq *q, struct priv *pv, uint32_t slot)
{
    pv->free[pv->free_tail & (q->nslots - 1)] = (uint16_t)slot;
    pv->free_tail++;
}

static inline void trail_used_event(ifc_gvq *q, struct priv *pv)
{
    /* virtqueue_get_buf_ctx_split (virtio_ring.c 787-843): after each buffer,
     * while the shadow NO_INTERRUPT bit is clear, used_event = last_used_idx
     * (virtio_store_mb).  A poll entered from an interrupt skipped the
     * disable (event_triggered), so used_event follows consumption and the
     * device may interrupt again during the poll; a poll entered any other
     * way leaves used_event where virtqueue_disable_cb put it (0).  One
     * store per batch: the batch is one instant of simulated time. */
    if (pv->cb_enabled && (q->flags & IFC_GVQ_F_EVENT_IDX)) {
        store16(USED_EVENT(q), pv->last_used);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
}

static inline uint16_t used_ahead(ifc_gvq *q, struct priv *pv, int64_t *err)
{
    uint16_t used_idx = load16(USED_IDX(q));
    uint16_t ahead = (uint16_t)(used_idx - pv->last_used);
    *err = 0;
    if (ahead > q->size)
        *err = fail(q, IFC_GVQ_E_USED_IDX, used_idx);
    return ahead;
}

int64_t ifc_gvq_rx(ifc_gvq *q, uint32_t budget, ifc_checker *ck, ifc_check_stats *st)
{
    if (q == NULL || ck == NULL || st == NULL)
        return IFC_GERR_ARG;
    if (q->error)
        return IFC_GERR_RING;
    q->last_entries = 0;
    struct priv *pv = PRIV(q);
    int64_t err;
    uint32_t ahead = used_ahead(q, pv, &err);
    if (err)
        return err;
    uint8_t *state = STATE(q, pv);
    const struct used_elem *ring = USED_RING(q);
    uint32_t mask = q->size - 1, hdr = q->hdr_len, bs = q->buf_size;
    int mrg = (q->flags & IFC_GVQ_F_MRG) != 0;
    uint16_t last = pv->last_used;
    uint32_t frames = 0, entries = 0;
    while (frames < budget && entries < ahead) {
        struct used_elem e = ring[(uint16_t)(last + entries) & mask];
        if (e.id >= q->nslots)
            return fail(q, IFC_GVQ_E_ID, e.id);
        if (!state[e.id])
            return fail(q, IFC_GVQ_E_NOT_POSTED, e.id);
        if (e.len < hdr || e.len > bs)
            return fail(q, IFC_GVQ_E_LEN, e.len);
        uint8_t *buf = q->mem + q->bufs + (uint64_t)e.id * bs;
        uint32_t nb = 1;
        if (hdr == 12) {
            uint16_t num_buffers;
            memcpy(&num_buffers, buf + 10, 2);
            if (num_buffers == 0 || (!mrg && num_buffers != 1))
                return fail(q, IFC_GVQ_E_NUM_BUFFERS, num_buffers);
            nb = num_buffers;
        }
        if (nb > ahead - entries)
            return fail(q, IFC_GVQ_E_PARTIAL, nb);
        if (nb == 1) {
            state[e.id] = 0;
            put_free(q, pv, e.id);
            ifc__check_one(buf + hdr, e.len - hdr, ck, st);
        } else {
            uint32_t total = e.len - hdr;
            if (q->scratch == NULL || total > q->scratch_size)
                return fail(q, IFC_GVQ_E_TOO_LONG, total);
            memcpy(q->scratch, buf + hdr, total);
            state[e.id] = 0;
            for (uint32_t k = 1; k < nb; k++) {
                struct used_elem m = ring[(uint16_t)(last + entries + k) & mask];
                if (m.id >= q->nslots)
                    return fail(q, IFC_GVQ_E_ID, m.id);
                if (!state[m.id])
                    return fail(q, IFC_GVQ_E_NOT_POSTED, m.id);
                if (m.len > bs)
                    return fail(q, IFC_GVQ_E_LEN, m.len);
                if (m.len > q->scratch_size - total)
                    return fail(q, IFC_GVQ_E_TOO_LONG, total + m.len);
                memcpy(q->scratch + total, q->mem + q->bufs + (uint64_t)m.id * bs, m.len);
                total += m.len;
                state[m.id] = 0;
            }
            for (uint32_t k = 0; k < nb; k++)
                put_free(q, pv, ring[(uint16_t)(last + entries + k) & mask].id);
            ifc__check_one(q->scratch, total, ck, st);
        }
        entries += nb;
        frames++;
    }
    pv->last_used = (uint16_t)(last + entries);
    q->last_entries = entries;
    q->completed += entries;
    trail_used_event(q, pv);
    return frames;
}

int64_t ifc_gvq_refill(ifc_gvq *q, uint32_t max)
{
    if (q == NULL)
        return IFC_GERR_ARG;
    if (q->error)
        return IFC_GERR_RING;
    struct priv *pv = PRIV(q);
    uint8_t *state = STATE(q, pv);
    struct desc *desc = DESC(q);
    uint16_t *ring = AVAIL_RING(q);
    uint32_t mask = q->size - 1, smask = q->nslots - 1, n = num_free(pv);
    if (n > max)
        n = max;
    uint16_t idx = pv->avail_idx, head = pv->free_head;
    for (uint32_t i = 0; i < n; i++) {
        uint16_t slot = pv->free[(uint16_t)(head + i) & smask];
        if (slot >= q->nslots || state[slot]) {
            pv->free_head = (uint16_t)(head + i);
            pv->avail_idx = (uint16_t)(idx + i);
            q->made_available += i;
            return fail(q, IFC_GVQ_E_PRIV, slot);
        }
        desc[slot].addr = q->bufs + (uint64_t)slot * q->buf_size;
        desc[slot].len = q->buf_size;
        desc[slot].flags = VRING_DESC_F_WRITE;
        desc[slot].next = 0;
        state[slot] = 1;
        ring[(uint16_t)(idx + i) & mask] = slot;
    }
    pv->free_head = (uint16_t)(head + n);
    pv->avail_idx = (uint16_t)(idx + n);
    q->made_available += n;
    return n;
}

int64_t ifc_gvq_tx_reclaim(ifc_gvq *q)
{
    if (q == NULL)
        return IFC_GERR_ARG;
    if (q->error)
        return IFC_GERR_RING;
    struct priv *pv = PRIV(q);
    int64_t err;
    uint32_t ahead = used_ahead(q, pv, &err);
    if (err)
        return err;
    uint8_t *state = STATE(q, pv);
    const struct used_elem *ring = USED_RING(q);
    uint32_t mask = q->size - 1;
    int split = (q->flags & IFC_GVQ_F_TX_SPLIT) != 0;
    uint16_t last = pv->last_used;
    for (uint32_t i = 0; i < ahead; i++) {
        uint32_t id = ring[(uint16_t)(last + i) & mask].id, slot = id;
        if (split) {
            if (id & 1)
                return fail(q, IFC_GVQ_E_ID, id);
            slot = id / 2;
        }
        if (slot >= q->nslots)
            return fail(q, IFC_GVQ_E_ID, id);
        if (!state[slot])
            return fail(q, IFC_GVQ_E_NOT_POSTED, id);
        state[slot] = 0;
        put_free(q, pv, slot);
        /* progress is kept per entry so a failure leaves a consistent block */
        pv->last_used = (uint16_t)(last + i + 1);
    }
    q->completed += ahead;
    trail_used_event(q, pv);
    return ahead;
}

/* --- TX: one frame per slot, as a single descriptor (header + frame), a
 * split pair (header, frame) or an indirect table of those two ---------- */

/* Zero slot's net header and return where its frame goes. */
static uint64_t tx_header(ifc_gvq *q, uint16_t slot)
{
    uint64_t buf = q->bufs + (uint64_t)slot * q->buf_size;
    if (!(q->flags & (IFC_GVQ_F_TX_SPLIT | IFC_GVQ_F_TX_INDIRECT))) {
        memset(q->mem + buf, 0, q->hdr_len);
        return buf + q->hdr_len;
    }
    memset(q->mem + q->hdrs + 16ull * slot, 0, q->hdr_len);
    return buf;
}

/* The largest frame a slot takes. */
static uint32_t tx_room(const ifc_gvq *q)
{
    int single = !(q->flags & (IFC_GVQ_F_TX_SPLIT | IFC_GVQ_F_TX_INDIRECT));
    return single ? q->buf_size - q->hdr_len : q->buf_size;
}

/* Write slot's descriptors for a len-byte frame; the chain's head. */
static uint32_t tx_chain(ifc_gvq *q, uint16_t slot, uint32_t len)
{
    struct desc *desc = DESC(q);
    uint32_t hdr = q->hdr_len;
    uint64_t buf = q->bufs + (uint64_t)slot * q->buf_size;
    if (q->flags & IFC_GVQ_F_TX_SPLIT) {
        uint32_t head = 2u * slot;
        desc[head] = (struct desc){q->hdrs + 16ull * slot, hdr, VRING_DESC_F_NEXT, (uint16_t)(head + 1)};
        desc[head + 1] = (struct desc){buf, len, 0, 0};
        return head;
    }
    if (q->flags & IFC_GVQ_F_TX_INDIRECT) {
        uint64_t t = q->tables + 32ull * slot;
        struct desc *table = (struct desc *)(void *)(q->mem + t);
        table[0] = (struct desc){q->hdrs + 16ull * slot, hdr, VRING_DESC_F_NEXT, 1};
        table[1] = (struct desc){buf, len, 0, 0};
        desc[slot] = (struct desc){t, 32, VRING_DESC_F_INDIRECT, 0};
        return slot;
    }
    desc[slot] = (struct desc){buf, hdr + len, 0, 0};
    return slot;
}

/* The slot leaves the free list and its chain joins the avail ring (the
 * index is published later, per batch). */
static void tx_make_available(ifc_gvq *q, struct priv *pv, uint8_t *state, uint16_t slot,
                              uint32_t head)
{
    pv->free_head++;
    state[slot] = 1;
    AVAIL_RING(q)[pv->avail_idx & (q->size - 1)] = (uint16_t)head;
    pv->avail_idx++;
}

int64_t ifc_gvq_tx_post(ifc_gvq *q, uint32_t max, ifc_stream *s)
{
    if (q == NULL || s == NULL || s->seq == NULL || s->sizes == NULL || !s->nflows || !s->nsizes
        || !s->flow_run || s->flow_cursor >= s->nflows || s->size_cursor >= s->nsizes)
        return IFC_GERR_ARG;
    if (q->error)
        return IFC_GERR_RING;
    struct priv *pv = PRIV(q);
    uint8_t *state = STATE(q, pv);
    uint32_t smask = q->nslots - 1;
    uint32_t n = num_free(pv);
    if (n > max)
        n = max;
    uint32_t done = 0;
    for (; done < n; done++) {
        uint16_t slot = pv->free[pv->free_head & smask];
        if (slot >= q->nslots || state[slot]) {
            q->made_available += done;
            return fail(q, IFC_GVQ_E_PRIV, slot);
        }
        uint64_t frame = tx_header(q, slot);
        uint32_t len = ifc__stream_emit(s, q->mem + frame, tx_room(q));
        if (!len)
            break;
        tx_make_available(q, pv, state, slot, tx_chain(q, slot, len));
    }
    q->made_available += done;
    if (done == 0 && n > 0)
        return IFC_GERR_ARG;   /* the next frame does not fit a buffer */
    return done;
}

int ifc_gvq_publish(ifc_gvq *q)
{
    if (q == NULL || q->error)
        return 0;
    struct priv *pv = PRIV(q);
    uint16_t new_idx = pv->avail_idx;
    if (load16(AVAIL_IDX(q)) == new_idx)
        return 0;
    store16(AVAIL_IDX(q), new_idx);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int need;
    if (q->flags & IFC_GVQ_F_EVENT_IDX) {
        uint16_t event = load16(AVAIL_EVENT(q));
        need = vring_need_event(event, new_idx, q->kick_old);   /* since the last decision */
    } else {
        need = !(load16(USED_FLAGS(q)) & VRING_USED_F_NO_NOTIFY);
    }
    q->kick_old = new_idx;
    return need;
}

void ifc_gvq_disable_cb(ifc_gvq *q)
{
    /* virtqueue_disable_cb (virtio_ring.c 2308-2322 -> split 845-859): a
     * no-op while event_triggered is set; otherwise, if the shadow flag lacks
     * NO_INTERRUPT, set it and, with EVENT_IDX, write used_event = 0 ("a
     * hack": avail->flags untouched), else avail->flags = NO_INTERRUPT.
     * Plain stores, no barrier. */
    if (q == NULL)
        return;
    struct priv *pv = PRIV(q);
    if (pv->event_triggered || !pv->cb_enabled)
        return;
    pv->cb_enabled = 0;
    if (q->flags & IFC_GVQ_F_EVENT_IDX)
        __atomic_store_n(USED_EVENT(q), 0, __ATOMIC_RELAXED);
    else
        __atomic_store_n(AVAIL_FLAGS(q), VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);
}

static void clear_shadow(ifc_gvq *q, struct priv *pv)
{
    if (!pv->cb_enabled) {
        pv->cb_enabled = 1;
        if (!(q->flags & IFC_GVQ_F_EVENT_IDX))
            __atomic_store_n(AVAIL_FLAGS(q), 0, __ATOMIC_RELAXED);
    }
}

int ifc_gvq_enable_cb_prepare(ifc_gvq *q)
{
    /* virtqueue_enable_cb_prepare (2337-2346 -> split 861-884): clear
     * event_triggered and the shadow bit (avail->flags written only without
     * EVENT_IDX), always used_event = last_used_idx as a plain store (the
     * barrier comes in virtqueue_poll); returns that index. */
    if (q == NULL || q->error)
        return -1;
    struct priv *pv = PRIV(q);
    pv->event_triggered = 0;
    clear_shadow(q, pv);
    __atomic_store_n(USED_EVENT(q), pv->last_used, __ATOMIC_RELAXED);
    return pv->last_used;
}

int ifc_gvq_poll(ifc_gvq *q, uint16_t opaque)
{
    /* virtqueue_poll (2358-2368): virtio_mb, then used->idx != opaque. */
    if (q == NULL || q->error)
        return 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return load16(USED_IDX(q)) != opaque;
}

int ifc_gvq_enable_cb_delayed(ifc_gvq *q)
{
    /* virtqueue_enable_cb_delayed (-> split 894-928): clear event_triggered
     * and the shadow bit, bufs = (avail_idx_shadow - last_used) * 3/4,
     * used_event = last_used + bufs (virtio_store_mb); false (0) when more
     * than bufs entries are already used. */
    if (q == NULL || q->error)
        return 1;
    struct priv *pv = PRIV(q);
    pv->event_triggered = 0;
    clear_shadow(q, pv);
    uint16_t bufs = (uint16_t)((uint16_t)(pv->avail_idx - pv->last_used) * 3 / 4);
    store16(USED_EVENT(q), (uint16_t)(pv->last_used + bufs));
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return (uint16_t)(load16(USED_IDX(q)) - pv->last_used) > bufs ? 0 : 1;
}

int ifc_gvq_interrupt(ifc_gvq *q)
{
    /* vring_interrupt (2445-2473), the ring part: IRQ_NONE (0) when
     * !more_used (last_used_idx == used->idx); with EVENT_IDX set
     * event_triggered; 1: the caller runs the queue's callback. */
    if (q == NULL || q->error)
        return 0;
    struct priv *pv = PRIV(q);
    if (load16(USED_IDX(q)) == pv->last_used)
        return 0;
    if (q->flags & IFC_GVQ_F_EVENT_IDX)
        pv->event_triggered = 1;
    return 1;
}

int ifc_gvq_napi_complete(ifc_gvq *q, int complete_done)
{
    /* virtqueue_napi_complete (virtio_net.c 395-407): enable_cb_prepare;
     * napi_complete_done true -> virtqueue_poll re-check, and on a hit
     * virtqueue_napi_schedule (napi_schedule_prep succeeds: the state was
     * just cleared), whose disable_cb now really runs (event_triggered was
     * cleared); napi_complete_done false (NAPIF_STATE_MISSED: NAPI polls
     * again by itself) -> virtqueue_disable_cb.  1: poll again. */
    int opaque = ifc_gvq_enable_cb_prepare(q);
    if (opaque < 0)
        return 0;
    if (complete_done) {
        if (!ifc_gvq_poll(q, (uint16_t)opaque))
            return 0;
    }
    ifc_gvq_disable_cb(q);
    return 1;
}

uint32_t ifc_gvq_num_free(const ifc_gvq *q)
{
    if (q == NULL)
        return 0;
    return num_free(PRIV(q));
}

uint32_t ifc_gvq_pending(const ifc_gvq *q)
{
    if (q == NULL)
        return 0;
    const struct priv *pv = PRIV(q);
    return (uint16_t)(load16(USED_IDX(q)) - pv->last_used);
}

uint32_t ifc_gvq_in_flight(const ifc_gvq *q)
{
    if (q == NULL)
        return 0;
    return q->nslots - num_free(PRIV(q));
}

/* --- several steps per call (sim/guest.py: one C call where it made three) --- */

int64_t ifc_gvq_rx_poll(ifc_gvq *q, uint32_t budget, ifc_checker *ck, ifc_check_stats *st,
                        uint32_t refill_max, int64_t *refilled)
{
    /* virtnet_receive (virtio_net.c 1542-1587): up to budget packets (a
     * mergeable frame is one packet however many buffers it spans), then
     * refill only if num_free > min(budget, ring size) / 2: try_fill_recv
     * (1446-1473) adds buffers until none is free or an allocation fails
     * (refill_max: how many allocations succeed).  q->refill_wanted says
     * whether the refill ran (the free count then), so the caller can tell
     * a failed allocation (refilled < refill_wanted: refill_work follows). */
    if (refilled)
        *refilled = 0;
    if (q != NULL)
        q->refill_wanted = 0;
    int64_t n = ifc_gvq_rx(q, budget, ck, st);
    if (n < 0)
        return n;
    uint32_t nf = num_free(PRIV(q)), lim = budget < q->size ? budget : q->size;
    if (nf > lim / 2) {
        q->refill_wanted = nf;
        int64_t r = ifc_gvq_refill(q, refill_max);
        if (refilled)
            *refilled = r;
    }
    return n;
}

void ifc_gvq_tx_xmit(ifc_gvq *q, int64_t want, uint32_t stop_free, ifc_stream *s,
                     struct ifc_gvq_xmit *out)
{
    /* The steps and early returns of GuestNet._tx_work between computing
     * want and settling the credit, in the same order (each reap is
     * disable_cb then free_old_xmit_skbs). */
    memset(out, 0, sizeof *out);
    if (want <= 0)
        return;
    ifc_gvq_disable_cb(q);
    if (ifc_gvq_tx_reclaim(q) < 0) {
        out->broken = 1;
        return;
    }
    int64_t room = (int64_t)ifc_gvq_num_free(q) - (int64_t)stop_free + 1;
    if (want > room)
        want = room;
    if (want <= 0)
        return;
    out->sent = 1;
    uint64_t before = s->bytes;
    int64_t n = 0;
    if (want > 1) {
        int64_t got = ifc_gvq_tx_post(q, (uint32_t)(want - 1), s);
        if (got < 0) {
            out->broken = 1;
            return;
        }
        n = got;
    }
    for (;;) {                  /* the last packet: kick = !xmit_more */
        ifc_gvq_disable_cb(q);
        if (ifc_gvq_tx_reclaim(q) < 0) {
            out->frames = n;
            out->broken = 1;
            return;
        }
        if (ifc_gvq_enable_cb_delayed(q))
            break;
    }
    int64_t got = ifc_gvq_tx_post(q, 1, s);
    if (got < 0) {
        out->frames = n;
        out->broken = 1;
        return;
    }
    out->frames = n + got;
    out->bytes = s->bytes - before;
    out->num_free = ifc_gvq_num_free(q);
}

int64_t ifc_gvq_tx_clean(ifc_gvq *q)
{
    for (;;) {
        ifc_gvq_disable_cb(q);
        int64_t r = ifc_gvq_tx_reclaim(q);
        if (r < 0)
            return r;
        if (ifc_gvq_enable_cb_delayed(q))
            break;
    }
    return ifc_gvq_num_free(q);
}

int64_t ifc_gvq_tx_post_frame(ifc_gvq *q, const uint8_t *frame, uint32_t len)
{
    if (q == NULL || frame == NULL || len == 0)
        return IFC_GERR_ARG;
    if (q->error)
        return IFC_GERR_RING;
    if (len > tx_room(q))
        return IFC_GERR_ARG;
    struct priv *pv = PRIV(q);
    uint8_t *state = STATE(q, pv);
    if (num_free(pv) == 0)
        return 0;
    uint16_t slot = pv->free[pv->free_head & (q->nslots - 1)];
    if (slot >= q->nslots || state[slot])
        return fail(q, IFC_GVQ_E_PRIV, slot);
    memcpy(q->mem + tx_header(q, slot), frame, len);
    tx_make_available(q, pv, state, slot, tx_chain(q, slot, len));
    q->made_available += 1;
    return 1;
}
