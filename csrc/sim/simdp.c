/* The device side of the simulated IFCVF datapath: split-ring work for the
 * queue engines in sim/engines.py, a batch (one engine round) per call.
 *
 * Every guest address here is an IOVA: it is translated through the
 * function's IOMMU segment table (struct ifc_dp_mem, built from the model's
 * mappings) and bounds-checked before a byte is touched.  A chain is walked
 * and validated completely before anything is written for it, so a hostile
 * chain changes nothing but the queue's error record.
 *
 * Virtio rings are little-endian; like the rest of csrc/, this runs on
 * little-endian hosts only.  The semantics are specified next to the
 * declarations in sim_native.h (section "Device side of the simulated
 * datapath"). */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "sim_native.h"
#include "logbits.h"
#include "vring_event.h"

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1
#define USED_F_NO_NOTIFY 1

struct vdesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static inline uint16_t ld16(const uint8_t *p)
{
    return __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_ACQUIRE);
}

static inline void st16(uint8_t *p, uint16_t v)
{
    __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELEASE);
}

/* ---------------------------------------------------------------- IOMMU */

static const struct ifc_dp_seg *seg_find(const struct ifc_dp_mem *m, uint64_t iova)
{
    uint32_t lo = 0, hi = m->nsegs;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (m->segs[mid].iova <= iova)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo == 0)
        return NULL;
    const struct ifc_dp_seg *s = &m->segs[lo - 1];
    if (iova - s->iova >= s->size)
        return NULL;
    return s;
}

/* 1 when [iova, iova + len) is mapped (over any number of adjacent segments);
 * else 0 with *bad = the first unmapped address. */
static int range_mapped(const struct ifc_dp_mem *m, uint64_t iova, uint64_t len, uint64_t *bad)
{
    if (len == 0)
        return 1;
    uint64_t end = iova + len;
    if (end < iova) {
        *bad = iova;
        return 0;
    }
    uint64_t cur = iova;
    while (cur < end) {
        const struct ifc_dp_seg *s = seg_find(m, cur);
        if (s == NULL) {
            *bad = cur;
            return 0;
        }
        uint64_t seg_end = s->iova + s->size;
        cur = seg_end < end ? seg_end : end;
    }
    return 1;
}

/* The host address of [iova, iova + len) when it lies in one segment. */
static uint8_t *host_range(const struct ifc_dp_mem *m, uint64_t iova, uint64_t len)
{
    const struct ifc_dp_seg *s = seg_find(m, iova);
    if (s == NULL)
        return NULL;
    uint64_t off = iova - s->iova;
    if (len > s->size - off)
        return NULL;
    return s->host + off;
}

/* Copies over segments; the caller has checked range_mapped. */
static void copy_from_guest(const struct ifc_dp_mem *m, uint64_t iova, uint8_t *dst, uint64_t len)
{
    while (len) {
        const struct ifc_dp_seg *s = seg_find(m, iova);
        if (s == NULL)
            return; /* cannot happen after range_mapped; never touch unmapped memory */
        uint64_t off = iova - s->iova, take = s->size - off;
        if (take > len)
            take = len;
        memcpy(dst, s->host + off, take);
        dst += take;
        iova += take;
        len -= take;
    }
}

static void copy_to_guest(const struct ifc_dp_mem *m, uint64_t iova, const uint8_t *src, uint64_t len)
{
    while (len) {
        const struct ifc_dp_seg *s = seg_find(m, iova);
        if (s == NULL)
            return;
        uint64_t off = iova - s->iova, take = s->size - off;
        if (take > len)
            take = len;
        memcpy(s->host + off, src, take);
        src += take;
        iova += take;
        len -= take;
    }
}

/* Pieces of [addr, addr + len) when split at multiples of unit (a power of two). */
static inline uint32_t chunks(uint64_t addr, uint64_t len, uint32_t unit)
{
    if (len == 0)
        return 0;
    return (uint32_t)(((addr + len - 1) / unit) - (addr / unit) + 1);
}

/* ------------------------------------------------------------ queues */

static int fail(struct ifc_dp_vq *q, uint32_t code, uint16_t idx, uint32_t head, uint32_t desc,
                uint32_t indirect, uint64_t value, uint64_t iova, uint64_t len)
{
    if (!q->error) {
        q->error = code;
        q->err_idx = idx;
        q->err_head = head;
        q->err_desc = desc;
        q->err_indirect = indirect;
        q->err_value = value;
        q->err_iova = iova;
        q->err_len = len;
    }
    return IFC_DP_ERR;
}

int ifc_dp_vq_bind(struct ifc_dp_vq *q)
{
    if (q == NULL || q->mem == NULL || q->bufs == NULL)
        return IFC_ERR_ARG;
    uint32_t size = q->size;
    if (size == 0 || size > 32768 || (size & (size - 1)) || q->bufs_cap < size)
        return fail(q, IFC_DP_E_SIZE, q->last_avail, 0, 0, 0, size, 0, 0);
    if ((q->desc_iova & 15) || (q->avail_iova & 1) || (q->used_iova & 3))
        return fail(q, IFC_DP_E_RING_ALIGN, q->last_avail, 0, 0, 0, 0,
                    (q->desc_iova & 15) ? q->desc_iova : (q->avail_iova & 1) ? q->avail_iova : q->used_iova, 0);
    struct { uint64_t iova, len; uint8_t **host; uint32_t code; } rings[3] = {
        {q->desc_iova, 16ull * size, &q->desc, IFC_DP_E_DESC_ADDR},
        {q->avail_iova, 6 + 2ull * size, &q->avail, IFC_DP_E_AVAIL_ADDR},
        {q->used_iova, 6 + 8ull * size, &q->used, IFC_DP_E_USED_ADDR},
    };
    for (int i = 0; i < 3; i++) {
        uint64_t bad = 0;
        if (!range_mapped(q->mem, rings[i].iova, rings[i].len, &bad))
            return fail(q, rings[i].code, q->last_avail, 0, 0, 0, 0, bad, rings[i].len);
        uint8_t *h = host_range(q->mem, rings[i].iova, rings[i].len);
        if (h == NULL)
            return fail(q, IFC_DP_E_RING_SPLIT, q->last_avail, 0, 0, 0, i, rings[i].iova, rings[i].len);
        *rings[i].host = h;
    }
    return IFC_OK;
}

/* Account one descriptor-sized read at iova in the round (coalescing
 * contiguous reads into one request up to MRRS, never across 4 KiB). */
static inline void desc_read(struct ifc_dp_vq *q, struct ifc_dp_round *r, uint64_t iova, uint32_t len)
{
    if (r == NULL)
        return;
    if (q->rd_open && iova == q->rd_end && q->rd_len + len <= q->mrrs
        && (q->rd_start >> 12) == ((iova + len - 1) >> 12)) {
        q->rd_end += len;
        q->rd_len += len;
    } else {
        if (q->rd_open)
            r->desc_cpls += chunks(q->rd_start, q->rd_len, q->cpl_unit);
        q->rd_open = 1;
        q->rd_start = iova;
        q->rd_end = iova + len;
        q->rd_len = len;
        r->desc_reqs++;
    }
    r->desc_bytes += len;
}

static inline void desc_read_flush(struct ifc_dp_vq *q, struct ifc_dp_round *r)
{
    if (q->rd_open) {
        r->desc_cpls += chunks(q->rd_start, q->rd_len, q->cpl_unit);
        q->rd_open = 0;
    }
}

/* Walk and validate the chain at head; its buffers go to q->bufs.
 * want_write: 1 for RX (every buffer device-writable), 0 for TX. */
static int walk(struct ifc_dp_vq *q, uint16_t idx, uint32_t head, int want_write,
                uint32_t *nbufs, uint64_t *total, struct ifc_dp_round *r)
{
    uint32_t size = q->size;
    if (head >= size)
        return fail(q, IFC_DP_E_HEAD_ID, idx, head, head, 0, head, 0, 0);
    const uint8_t *table = q->desc;     /* NULL: read descriptors through the IOMMU */
    uint64_t table_iova = q->desc_iova;
    uint32_t tsize = size, i = head, visited = 0, nb = 0, levels = 1, in_indirect = 0;
    uint64_t sum = 0;
    for (;;) {
        if (++visited > tsize)
            return fail(q, IFC_DP_E_LOOP, idx, head, i, in_indirect, visited, 0, 0);
        struct vdesc d;
        uint64_t d_iova = table_iova + 16ull * i;
        if (table)
            memcpy(&d, table + 16ull * i, 16);
        else
            copy_from_guest(q->mem, d_iova, (uint8_t *)&d, 16);
        desc_read(q, r, d_iova, 16);
        if (d.flags & DESC_F_INDIRECT) {
            if (!(q->flags & IFC_DP_F_INDIRECT))
                return fail(q, IFC_DP_E_INDIRECT_FEATURE, idx, head, i, in_indirect, d.flags, 0, 0);
            if (in_indirect)
                return fail(q, IFC_DP_E_INDIRECT_NESTED, idx, head, i, 1, d.flags, d.addr, d.len);
            if (visited != 1)
                return fail(q, IFC_DP_E_INDIRECT_POS, idx, head, i, 0, d.flags, d.addr, d.len);
            if (d.flags & DESC_F_NEXT)
                return fail(q, IFC_DP_E_INDIRECT_NEXT, idx, head, i, 0, d.flags, d.addr, d.len);
            if (d.len == 0 || (d.len & 15) || d.len / 16 > size)
                return fail(q, IFC_DP_E_INDIRECT_LEN, idx, head, i, 0, d.len, d.addr, d.len);
            uint64_t bad = 0;
            if (!range_mapped(q->mem, d.addr, d.len, &bad))
                return fail(q, IFC_DP_E_INDIRECT_ADDR, idx, head, i, 0, d.addr, bad, d.len);
            table = host_range(q->mem, d.addr, d.len);  /* NULL if it spans mappings */
            table_iova = d.addr;
            tsize = d.len / 16;
            i = 0;
            visited = 0;
            in_indirect = 1;
            levels++;
            if (r)
                desc_read_flush(q, r);  /* the table is a new, dependent read */
            continue;
        }
        int writable = (d.flags & DESC_F_WRITE) != 0;
        if (want_write && !writable)
            return fail(q, IFC_DP_E_RX_READONLY, idx, head, i, in_indirect, d.flags, d.addr, d.len);
        if (!want_write && writable)
            return fail(q, IFC_DP_E_TX_WRITABLE, idx, head, i, in_indirect, d.flags, d.addr, d.len);
        if (d.len) {
            uint64_t bad = 0;
            if (!range_mapped(q->mem, d.addr, d.len, &bad))
                return fail(q, IFC_DP_E_BUF_ADDR, idx, head, i, in_indirect, d.addr, bad, d.len);
            q->bufs[nb].addr = d.addr;
            q->bufs[nb].len = d.len;
            nb++;
            sum += d.len;
        }
        if (!(d.flags & DESC_F_NEXT))
            break;
        if (d.next >= tsize)
            return fail(q, IFC_DP_E_NEXT, idx, head, i, in_indirect, d.next, 0, 0);
        if (d.next != i + 1)
            levels++;                   /* not in the same prefetched line: a dependent read */
        i = d.next;
    }
    if (r && levels > r->desc_levels)
        r->desc_levels = levels;
    *nbufs = nb;
    *total = sum;
    return IFC_OK;
}

static uint32_t avail_entry(const struct ifc_dp_vq *q, uint16_t idx)
{
    const uint8_t *p = q->avail + 4 + 2 * (size_t)(idx & (q->size - 1));
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline void account_ring_read(const struct ifc_dp_vq *q, struct ifc_dp_round *r, uint32_t n)
{
    if (n == 0)
        return;
    uint32_t slot = q->last_avail & (q->size - 1);
    r->ring_reqs += (slot + n > q->size) ? 2 : 1;
    r->ring_bytes += 2 * n;
}

/* --------------------------------------------------------------- TX */

int64_t ifc_dp_tx_fetch(struct ifc_dp_vq *q, uint32_t max_chains, uint8_t *out, uint64_t out_cap,
                        uint32_t *lengths, uint32_t *ids, uint64_t *cum, struct ifc_dp_round *r)
{
    if (q == NULL || r == NULL || q->desc == NULL || (max_chains && (out == NULL || lengths == NULL
                                                                     || ids == NULL || cum == NULL)))
        return IFC_ERR_ARG;
    if (q->error)
        return IFC_DP_ERR;
    uint16_t avail_idx = ld16(q->avail + 2);
    q->avail_seen = avail_idx;
    uint16_t n = (uint16_t)(avail_idx - q->last_avail);
    if (n > q->size)
        return fail(q, IFC_DP_E_AVAIL_IDX, q->last_avail, 0, 0, 0, avail_idx, 0, 0);
    uint32_t take = n < max_chains ? n : max_chains;
    uint32_t k = 0, frames = 0;
    uint64_t pos = 0, link = 0;
    q->rd_open = 0;
    for (; k < take; k++) {
        uint16_t idx = (uint16_t)(q->last_avail + k);
        uint32_t head = avail_entry(q, idx), nb = 0;
        uint64_t total = 0;
        if (walk(q, idx, head, 0, &nb, &total, r) != IFC_OK)
            break;
        uint64_t hdr = q->hdr_len;
        if (total < hdr + q->min_frame || total - hdr > q->max_frame) {
            if (total < hdr + q->min_frame)
                r->runts++;
            else
                r->oversize++;
            r->dropped++;
            ids[k] = head;
            continue;
        }
        uint64_t payload = total - hdr;
        if (pos + payload > out_cap)
            break;                      /* the caller sized out for max_chains frames */
        /* The device reads every buffer of the chain (header included) and
         * keeps the bytes after the header. */
        uint64_t skip = hdr;
        for (uint32_t b = 0; b < nb; b++) {
            uint64_t a = q->bufs[b].addr, l = q->bufs[b].len;
            r->data_reqs += chunks(a, l, q->mrrs);
            uint32_t c = chunks(a, l, q->cpl_unit);
            r->data_cpls += c;
            r->data_bytes += l;
            link += l + (uint64_t)c * IFC_DP_CPL_OVERHEAD;
            if (skip >= l) {
                skip -= l;
                continue;
            }
            copy_from_guest(q->mem, a + skip, out + pos, l - skip);
            pos += l - skip;
            skip = 0;
        }
        lengths[frames] = (uint32_t)payload;
        cum[frames] = link;
        frames++;
        ids[k] = head;
    }
    desc_read_flush(q, r);
    account_ring_read(q, r, k + (q->error ? 1 : 0));
    q->last_avail = (uint16_t)(q->last_avail + k);
    r->chains += k;
    r->frames += frames;
    r->out_bytes += pos;
    return k;
}

/* --------------------------------------------------------------- log */

static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Mark the pages of [iova, iova + len) the device just wrote. */
static void log_mark(struct ifc_dp_log *log, const struct ifc_dp_mem *m, uint64_t iova, uint64_t len)
{
    if (log == NULL || !log->on || len == 0)
        return;
    uint64_t first = iova >> 12, last = (iova + len - 1) >> 12;
    for (uint64_t page = first; page <= last; page++) {
        log->marks++;
        if (log->skip_threshold && (splitmix64(&log->rng) >> 1) < log->skip_threshold) {
            if (log->skipped_n < log->skipped_cap)
                log->skipped[log->skipped_n] = page;
            log->skipped_n++;
            log->skips++;
            continue;
        }
        uint64_t byte_iova = log->base + (page >> 3);
        if (byte_iova < log->base || byte_iova >= log->end) {
            log->last_range_fault = page;
            log->range_faults++;
            continue;
        }
        uint8_t *p;
        if (log->cache_host && byte_iova - log->cache_iova < log->cache_size) {
            p = log->cache_host + (byte_iova - log->cache_iova);
        } else {
            const struct ifc_dp_seg *s = seg_find(m, byte_iova);
            if (s == NULL) {
                log->last_unmapped_fault = byte_iova;
                log->unmapped_faults++;
                continue;
            }
            log->cache_iova = s->iova;
            log->cache_size = s->size;
            log->cache_host = s->host;
            p = s->host + (byte_iova - s->iova);
        }
        ifc_log_or_byte(p, (uint8_t)(1u << (page & 7)));
        log->set++;
        uint64_t word = byte_iova >> 3;
        if (!log->word_open || word != log->last_word) {
            log->word_open = 1;
            log->last_word = word;
            log->words++;
        }
    }
}

/* --------------------------------------------------------------- RX */

/* Write the virtual stream (net header, then frame) into the chain's buffers
 * from stream offset `from`; returns bytes written into this chain. */
static uint64_t scatter(struct ifc_dp_vq *q, uint32_t nb, const uint8_t *hdr, uint32_t hdr_len,
                        const uint8_t *frame, uint64_t frame_len, uint64_t from,
                        struct ifc_dp_log *log, struct ifc_dp_round *r)
{
    uint64_t stream = hdr_len + frame_len, written = 0, s = from;
    for (uint32_t b = 0; b < nb && s < stream; b++) {
        uint64_t a = q->bufs[b].addr, room = q->bufs[b].len;
        uint64_t w = stream - s < room ? stream - s : room;
        uint64_t done = 0;
        if (s < hdr_len) {
            uint64_t h = hdr_len - s < w ? hdr_len - s : w;
            copy_to_guest(q->mem, a, hdr + s, h);
            done = h;
        }
        if (done < w)
            copy_to_guest(q->mem, a + done, frame + (s + done - hdr_len), w - done);
        r->data_reqs += chunks(a, w, q->mps);
        r->data_bytes += w;
        log_mark(log, q->mem, a, w);
        s += w;
        written += w;
    }
    return written;
}

int64_t ifc_dp_rx_fill(struct ifc_dp_vq *q, const uint8_t *data, const uint32_t *lengths,
                       uint32_t nframes, uint32_t max_chains, uint32_t *ids, uint32_t *lens,
                       uint32_t ids_cap, struct ifc_dp_log *log, struct ifc_dp_round *r)
{
    if (q == NULL || r == NULL || q->desc == NULL || (nframes && (data == NULL || lengths == NULL))
        || (ids_cap && (ids == NULL || lens == NULL)))
        return IFC_ERR_ARG;
    if (max_chains > ids_cap)
        max_chains = ids_cap;
    if (q->error)
        return IFC_DP_ERR;
    uint16_t avail_idx = ld16(q->avail + 2);
    q->avail_seen = avail_idx;
    uint16_t avail = (uint16_t)(avail_idx - q->last_avail);
    if (avail > q->size)
        return fail(q, IFC_DP_E_AVAIL_IDX, q->last_avail, 0, 0, 0, avail_idx, 0, 0);
    int mrg = (q->flags & IFC_DP_F_MRG) != 0;
    uint32_t hdr_len = q->hdr_len, used = 0, f = 0;
    uint64_t off = 0;
    uint8_t hdr[12];
    q->rd_open = 0;
    for (; f < nframes; off += lengths[f], f++) {
        uint64_t len = lengths[f];
        if (len > q->max_frame) {
            r->oversize++;
            r->dropped++;
            continue;
        }
        uint64_t need = hdr_len + len;
        if (used >= max_chains)
            break;
        if (used >= avail) {
            r->starved = 1;
            break;
        }
        const uint8_t *frame = data + off;
        memset(hdr, 0, sizeof hdr);
        if (!mrg) {
            uint16_t idx = (uint16_t)(q->last_avail + used);
            uint32_t head = avail_entry(q, idx), nb = 0;
            uint64_t total = 0;
            if (walk(q, idx, head, 1, &nb, &total, r) != IFC_OK)
                goto out;
            if (total < need) {
                /* Too big for the buffer: dropped, the buffer stays for the next frame. */
                r->too_big++;
                r->dropped++;
                continue;
            }
            if (hdr_len == 12)
                hdr[10] = 1;            /* num_buffers = 1 (virtio 5.1.6.4) */
            __atomic_thread_fence(__ATOMIC_RELEASE);
            uint64_t w = scatter(q, nb, hdr, hdr_len, frame, len, 0, log, r);
            ids[used] = head;
            lens[used] = (uint32_t)w;
            used++;
        } else {
            /* Phase 1: find enough buffers, validating each; nothing written yet. */
            uint64_t cap = 0;
            uint32_t c = 0;
            while (cap < need) {
                if (used + c >= ids_cap || (used && used + c >= max_chains))
                    goto out;           /* the frame waits for the next round (a frame
                                         * first in its round may exceed the budget) */
                if (used + c >= avail) {
                    r->starved = 1;
                    goto out;
                }
                uint16_t idx = (uint16_t)(q->last_avail + used + c);
                uint32_t head = avail_entry(q, idx), nb = 0;
                uint64_t total = 0;
                if (walk(q, idx, head, 1, &nb, &total, r) != IFC_OK)
                    goto out;
                if (total < hdr_len) {
                    fail(q, IFC_DP_E_RX_SHORT, idx, head, head, 0, total, 0, total);
                    goto out;
                }
                cap += total;
                c++;
            }
            /* Phase 2: write the frame over the c buffers (walked again: they
             * were validated, and every access stays bounds-checked anyway). */
            uint16_t nbuf = (uint16_t)c;
            memcpy(hdr + 10, &nbuf, 2);
            __atomic_thread_fence(__ATOMIC_RELEASE);
            uint64_t from = 0;
            uint32_t first = used;
            for (uint32_t j = 0; j < c; j++) {
                uint16_t idx = (uint16_t)(q->last_avail + used);
                uint32_t head = avail_entry(q, idx), nb = 0;
                uint64_t total = 0;
                if (walk(q, idx, head, 1, &nb, &total, NULL) != IFC_OK) {
                    used = first;       /* changed under us: publish none of this frame */
                    goto out;
                }
                uint64_t w = scatter(q, nb, hdr, hdr_len, frame, len, from, log, r);
                from += w;
                ids[used] = head;
                lens[used] = (uint32_t)w;
                used++;
            }
        }
        r->frames++;
        r->frame_bytes += len;
    }
out:
    desc_read_flush(q, r);
    account_ring_read(q, r, used + (q->error ? 1 : 0));
    q->last_avail = (uint16_t)(q->last_avail + used);
    r->chains += used;
    r->in_bytes += off;
    return f;
}

/* ---------------------------------------------------- completion, notify */

int ifc_dp_publish(struct ifc_dp_vq *q, const uint32_t *ids, const uint32_t *lens, uint32_t n)
{
    if (q == NULL || q->used == NULL || (n && (ids == NULL || lens == NULL)) || n > q->size)
        return IFC_ERR_ARG;
    if (n == 0)
        return 0;
    uint32_t mask = q->size - 1;
    uint16_t old = q->last_used;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *e = q->used + 4 + 8 * (size_t)((uint16_t)(old + i) & mask);
        memcpy(e, &ids[i], 4);
        memcpy(e + 4, &lens[i], 4);
    }
    uint16_t new_idx = (uint16_t)(old + n);
    st16(q->used + 2, new_idx);
    q->last_used = new_idx;
    /* The used index must be visible before the device samples used_event /
     * the flags (the driver does the mirror image: write used_event, then
     * re-read used->idx). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (q->flags & IFC_DP_F_EVENT_IDX) {
        uint16_t event = ld16(q->avail + 4 + 2 * (size_t)q->size);
        return vring_need_event(event, new_idx, old);
    }
    return !(ld16(q->avail) & AVAIL_F_NO_INTERRUPT);
}

int ifc_dp_notify_enable(struct ifc_dp_vq *q)
{
    if (q == NULL || q->used == NULL || q->avail == NULL)
        return IFC_ERR_ARG;
    if (q->flags & IFC_DP_F_EVENT_IDX)
        st16(q->used + 4 + 8 * (size_t)q->size, q->last_avail);
    else
        st16(q->used, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return ld16(q->avail + 2) != q->last_avail;
}

void ifc_dp_notify_disable(struct ifc_dp_vq *q)
{
    if (q == NULL || q->used == NULL)
        return;
    if (!(q->flags & IFC_DP_F_EVENT_IDX))
        st16(q->used, USED_F_NO_NOTIFY);
}

uint32_t ifc_dp_ring_idx(const struct ifc_dp_vq *q, uint32_t which)
{
    if (q == NULL || q->avail == NULL || q->used == NULL)
        return 0x10000;
    return which ? ld16(q->used + 2) : ld16(q->avail + 2);
}

static const char *const dp_errors[IFC_DP_E_COUNT] = {
    [IFC_DP_E_NONE] = "no error",
    [IFC_DP_E_SIZE] = "queue size is not a power of two in 1..32768",
    [IFC_DP_E_RING_ALIGN] = "ring address misaligned (desc 16, avail 2, used 4)",
    [IFC_DP_E_DESC_ADDR] = "descriptor table is not mapped",
    [IFC_DP_E_AVAIL_ADDR] = "avail ring is not mapped",
    [IFC_DP_E_USED_ADDR] = "used ring is not mapped",
    [IFC_DP_E_RING_SPLIT] = "ring crosses IOMMU mappings",
    [IFC_DP_E_AVAIL_IDX] = "avail idx more than the queue size ahead",
    [IFC_DP_E_HEAD_ID] = "descriptor id out of range",
    [IFC_DP_E_NEXT] = "next index out of range",
    [IFC_DP_E_LOOP] = "descriptor chain longer than its table (loop)",
    [IFC_DP_E_INDIRECT_FEATURE] = "INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC",
    [IFC_DP_E_INDIRECT_NESTED] = "INDIRECT descriptor inside an indirect table",
    [IFC_DP_E_INDIRECT_POS] = "INDIRECT descriptor not at the chain head",
    [IFC_DP_E_INDIRECT_NEXT] = "INDIRECT descriptor with NEXT",
    [IFC_DP_E_INDIRECT_LEN] = "indirect table length 0, not a multiple of 16, or longer than the queue",
    [IFC_DP_E_INDIRECT_ADDR] = "indirect table is not mapped",
    [IFC_DP_E_BUF_ADDR] = "buffer is not mapped",
    [IFC_DP_E_TX_WRITABLE] = "device-writable buffer in a TX chain",
    [IFC_DP_E_RX_READONLY] = "device-readable buffer in an RX chain",
    [IFC_DP_E_RX_SHORT] = "mergeable RX buffer shorter than the net header",
};

const char *ifc_dp_error_text(uint32_t code)
{
    if (code >= IFC_DP_E_COUNT || dp_errors[code] == NULL)
        return "unknown error";
    return dp_errors[code];
}

/* ---------------------------------------------------------------- wire */

static inline int64_t ceil_div(uint64_t a, uint64_t b)
{
    return (int64_t)((a + b - 1) / b);
}

int64_t ifc_wire_schedule(const uint32_t *lengths, uint32_t n, const int64_t *ready, int64_t earliest,
                          int64_t *departs, int64_t *arrivals, int64_t propagation,
                          uint64_t *free_tick, uint64_t tpc, uint64_t tpb, uint32_t overhead,
                          uint32_t min_len)
{
    if (free_tick == NULL || tpc == 0 || (n && (lengths == NULL || departs == NULL)))
        return IFC_ERR_ARG;
    uint64_t t = earliest > 0 ? (uint64_t)earliest * tpc : 0;
    if (*free_tick > t)
        t = *free_tick;
    int64_t last = ceil_div(t, tpc);
    for (uint32_t i = 0; i < n; i++) {
        if (ready && ready[i] > 0 && (uint64_t)ready[i] * tpc > t)
            t = (uint64_t)ready[i] * tpc;
        uint32_t len = lengths[i] < min_len ? min_len : lengths[i];
        t += ((uint64_t)len + overhead) * tpb;
        last = ceil_div(t, tpc);
        departs[i] = last;
        if (arrivals)
            arrivals[i] = last + propagation;
    }
    *free_tick = t;
    return last;
}

uint32_t ifc_frames_fit(const uint32_t *lengths, uint32_t n, uint64_t room, uint64_t *bytes)
{
    uint64_t sum = 0;
    uint32_t i = 0;
    if (lengths != NULL)
        for (; i < n && sum + lengths[i] <= room; i++)
            sum += lengths[i];
    if (bytes)
        *bytes = sum;
    return i;
}

void ifc_dp_ready_times(const uint64_t *cum, uint32_t n, uint64_t base_tick, uint64_t tpb,
                        uint64_t tpc, int64_t *out)
{
    if (cum == NULL || out == NULL || tpc == 0)
        return;
    for (uint32_t i = 0; i < n; i++)
        out[i] = ceil_div(base_tick + cum[i] * tpb, tpc);
}

/* ------------------------------------------------------------- PCIe link */

static void pipe_prune(struct ifc_pipe *p, uint64_t now)
{
    uint32_t k = 0;
    while (k < p->n && p->end[k] <= now)
        k++;
    if (k) {
        memmove(p->start, p->start + k, (p->n - k) * sizeof p->start[0]);
        memmove(p->end, p->end + k, (p->n - k) * sizeof p->end[0]);
        p->n -= k;
    }
}

/* Make room for one more interval by closing the smallest gap (the pipe
 * then counts that gap as busy: conservative, and rare). */
static void pipe_squeeze(struct ifc_pipe *p)
{
    uint32_t best = 0;
    uint64_t gap = UINT64_MAX;
    for (uint32_t i = 0; i + 1 < p->n; i++) {
        uint64_t g = p->start[i + 1] - p->end[i];
        if (g < gap) {
            gap = g;
            best = i;
        }
    }
    p->end[best] = p->end[best + 1];
    memmove(p->start + best + 1, p->start + best + 2, (p->n - best - 2) * sizeof p->start[0]);
    memmove(p->end + best + 1, p->end + best + 2, (p->n - best - 2) * sizeof p->end[0]);
    p->n--;
}

static void pipe_insert(struct ifc_pipe *p, uint32_t i, uint64_t s, uint64_t e)
{
    /* join a neighbour when touching, else insert */
    if (i > 0 && p->end[i - 1] == s) {
        p->end[i - 1] = e;
        if (i < p->n && p->start[i] == e) {
            p->end[i - 1] = p->end[i];
            memmove(p->start + i, p->start + i + 1, (p->n - i - 1) * sizeof p->start[0]);
            memmove(p->end + i, p->end + i + 1, (p->n - i - 1) * sizeof p->end[0]);
            p->n--;
        }
        return;
    }
    if (i < p->n && p->start[i] == e) {
        p->start[i] = s;
        return;
    }
    memmove(p->start + i + 1, p->start + i, (p->n - i) * sizeof p->start[0]);
    memmove(p->end + i + 1, p->end + i, (p->n - i) * sizeof p->end[0]);
    p->start[i] = s;
    p->end[i] = e;
    p->n++;
}

uint64_t ifc_pipe_reserve(struct ifc_pipe *p, uint64_t t, uint64_t dur, uint64_t now)
{
    pipe_prune(p, now);
    if (dur == 0)
        return t;
    if (p->n == 0 || t >= p->end[p->n - 1]) {
        if (p->n && t == p->end[p->n - 1]) {
            p->end[p->n - 1] = t + dur;
        } else {
            if (p->n == IFC_PIPE_SLOTS)
                pipe_squeeze(p);
            p->start[p->n] = t;
            p->end[p->n] = t + dur;
            p->n++;
        }
        return t + dur;
    }
    uint32_t i = 0;
    while (i < p->n && p->end[i] <= t)
        i++;
    uint64_t cursor = t, left = dur;
    while (left) {
        if (i < p->n && p->start[i] <= cursor) {
            if (p->end[i] > cursor)
                cursor = p->end[i];
            i++;
            continue;
        }
        uint64_t take = left;
        if (i < p->n && p->start[i] - cursor < take)
            take = p->start[i] - cursor;
        if (p->n == IFC_PIPE_SLOTS) {
            pipe_squeeze(p);
            /* the intervals moved: find our place again */
            i = 0;
            while (i < p->n && p->end[i] <= cursor)
                i++;
            continue;
        }
        pipe_insert(p, i, cursor, cursor + take);
        cursor += take;
        left -= take;
        i = i > 0 ? i - 1 : 0;          /* the busy interval now holding cursor, or the next */
        while (i < p->n && p->end[i] <= cursor)
            i++;
    }
    return cursor;
}

static inline int64_t to_cycle(const struct ifc_link *l, uint64_t tick)
{
    return (int64_t)((tick + l->tpc - 1) / l->tpc);
}

static inline void account(struct ifc_link *l, uint64_t up, uint64_t down)
{
    l->up_bytes += up;
    l->down_bytes += down;
}

uint64_t ifc_link_read(struct ifc_link *l, int64_t now, int64_t cycle, uint32_t reqs,
                       uint64_t payload, uint32_t cpls, uint32_t control)
{
    uint64_t tpb = l->tpb, nowt = (uint64_t)now * l->tpc, start = (uint64_t)cycle * l->tpc;
    uint64_t req_bytes = (uint64_t)(reqs ? reqs : 1) * IFC_LINK_REQ_BYTES;
    uint64_t down = payload + (uint64_t)cpls * IFC_DP_CPL_OVERHEAD, end;
    if (control) {
        ifc_pipe_reserve(&l->up, start, req_bytes * tpb, nowt);
        end = start + IFC_LINK_REQ_BYTES * tpb + l->rd_lat + down * tpb;
        ifc_pipe_reserve(&l->down, end - down * tpb, down * tpb, nowt);
    } else {
        uint64_t sent = ifc_pipe_reserve(&l->up, start, IFC_LINK_REQ_BYTES * tpb, nowt);
        if (req_bytes > IFC_LINK_REQ_BYTES)
            ifc_pipe_reserve(&l->up, sent, (req_bytes - IFC_LINK_REQ_BYTES) * tpb, nowt);
        end = ifc_pipe_reserve(&l->down, sent + l->rd_lat, down * tpb, nowt);
    }
    account(l, req_bytes, down);
    l->reads++;
    return end;
}

int64_t ifc_link_fetch(struct ifc_link *l, int64_t now, int64_t cycle, const struct ifc_dp_round *r)
{
    uint64_t tpb = l->tpb, nowt = (uint64_t)now * l->tpc, start = (uint64_t)cycle * l->tpc;
    uint32_t levels = r->desc_levels ? r->desc_levels : 1;
    uint64_t reads = 1 + (r->ring_reqs ? 1 : 0) + (r->desc_reqs ? levels : 0);
    uint64_t reqs = 1 + (uint64_t)r->ring_reqs + r->desc_reqs;
    uint64_t down = 2 + (uint64_t)r->ring_bytes + r->desc_bytes
                    + (1 + (uint64_t)r->ring_reqs + r->desc_cpls) * IFC_DP_CPL_OVERHEAD;
    uint64_t end = start + reads * (IFC_LINK_REQ_BYTES * tpb + l->rd_lat) + down * tpb;
    ifc_pipe_reserve(&l->up, start, reqs * IFC_LINK_REQ_BYTES * tpb, nowt);
    ifc_pipe_reserve(&l->down, end - down * tpb, down * tpb, nowt);
    account(l, reqs * IFC_LINK_REQ_BYTES, down);
    l->reads += reads;
    return to_cycle(l, end);
}

int64_t ifc_link_write(struct ifc_link *l, int64_t now, int64_t cycle, uint32_t tlps, uint64_t payload)
{
    if (tlps == 0)
        return cycle;
    uint64_t bytes = payload + (uint64_t)tlps * IFC_LINK_WRITE_OVERHEAD;
    uint64_t end = ifc_pipe_reserve(&l->up, (uint64_t)cycle * l->tpc, bytes * l->tpb,
                                    (uint64_t)now * l->tpc);
    account(l, bytes, 0);
    l->writes++;
    return to_cycle(l, end);
}

int64_t ifc_link_used_write(struct ifc_link *l, int64_t now, int64_t cycle, const struct ifc_dp_vq *q,
                            uint32_t in_flight, uint32_t n)
{
    uint32_t size = q->size, slot = (uint32_t)((q->last_used + in_flight) & (size - 1));
    uint32_t first = n < size - slot ? n : size - slot;
    uint64_t addr = q->used_iova + 4 + 8ull * slot;
    uint32_t tlps = chunks(addr, 8ull * first, l->mps) + chunks(q->used_iova + 4, 8ull * (n - first), l->mps);
    return ifc_link_write(l, now, cycle, tlps + 1, 8ull * n + 2) + l->wr_lat_cycles;
}

/* ------------------------------------------------------- whole rounds */

int64_t ifc_dp_tx_round(struct ifc_dp_vq *q, struct ifc_link *l, int64_t now, uint32_t max_chains,
                        uint8_t *out, uint64_t out_cap, uint32_t *lengths, uint32_t *ids,
                        uint64_t *cum, int64_t *ready, uint32_t in_flight,
                        struct ifc_dp_round *r, struct ifc_dp_times *t)
{
    if (l == NULL || t == NULL || r == NULL || (max_chains && ready == NULL))
        return IFC_ERR_ARG;
    memset(r, 0, sizeof *r);
    memset(t, 0, sizeof *t);
    int64_t n = ifc_dp_tx_fetch(q, max_chains, out, out_cap, lengths, ids, cum, r);
    if (n < 0)
        return n;                       /* the queue failed: no timing matters any more */
    t->fetched = ifc_link_fetch(l, now, now, r);
    t->data_in = t->fetched;
    t->visible = now;
    if (n == 0)
        return 0;
    if (r->frames) {
        uint64_t end = ifc_link_read(l, now, t->fetched, r->data_reqs, r->data_bytes, r->data_cpls, 0);
        t->data_in = to_cycle(l, end);
        uint64_t span = cum[r->frames - 1] * l->tpb;
        ifc_dp_ready_times(cum, r->frames, end > span ? end - span : 0, l->tpb, l->tpc, ready);
    }
    t->visible = ifc_link_used_write(l, now, t->data_in, q, in_flight, (uint32_t)n);
    return n;
}

void ifc_dp_rx_timing(struct ifc_link *l, int64_t now, const struct ifc_dp_vq *q,
                      const struct ifc_dp_round *r, uint32_t in_flight, uint64_t log_words,
                      struct ifc_dp_times *t)
{
    if (l == NULL || q == NULL || r == NULL || t == NULL)
        return;
    t->fetched = ifc_link_fetch(l, now, now, r);
    t->data_in = t->fetched;
    t->visible = now;
    if (!r->chains)
        return;
    t->data_in = ifc_link_write(l, now, t->fetched, r->data_reqs + (uint32_t)log_words,
                                r->data_bytes + 8 * log_words);
    t->visible = ifc_link_used_write(l, now, t->data_in, q, in_flight, r->chains);
}

/* ------------------------------------------------------------ RX FIFO */

int ifc_dp_fifo_push(struct ifc_dp_fifo *f, const uint8_t *data, const uint32_t *lengths,
                     uint32_t count, uint64_t nbytes)
{
    if (f == NULL || f->segs == NULL || f->n >= f->cap)
        return -1;
    struct ifc_dp_fifo_seg *s = &f->segs[(f->head + f->n) % f->cap];
    s->data = data;
    s->lengths = lengths;
    s->count = count;
    s->reserved = 0;
    s->nbytes = nbytes;
    f->n++;
    f->frames += count;
    f->bytes += nbytes;
    return 0;
}

void ifc_dp_fifo_move(struct ifc_dp_fifo *f, struct ifc_dp_fifo_seg *segs, uint32_t cap)
{
    if (f == NULL || segs == NULL || cap < f->n)
        return;
    for (uint32_t i = 0; i < f->n; i++)
        segs[i] = f->segs[(f->head + i) % f->cap];
    f->segs = segs;
    f->cap = cap;
    f->head = 0;
}

uint32_t ifc_dp_rx_round(struct ifc_dp_vq *q, struct ifc_link *l, int64_t now,
                         struct ifc_dp_fifo *f, uint32_t max_chains, uint32_t *ids,
                         uint32_t *lens, uint32_t ids_cap, struct ifc_dp_log *log,
                         uint32_t in_flight, struct ifc_dp_round *r, struct ifc_dp_times *t)
{
    if (q == NULL || f == NULL || r == NULL || t == NULL || ids == NULL || lens == NULL)
        return 0;
    memset(r, 0, sizeof *r);
    uint32_t used = 0, popped = 0;
    while (f->n && f->segs) {
        struct ifc_dp_fifo_seg *s = &f->segs[f->head];
        uint64_t before = r->in_bytes;
        /* (a fill with no chains left still drops oversize frames at the head) */
        int64_t got = ifc_dp_rx_fill(q, s->data, s->lengths, s->count, max_chains - used,
                                     ids + used, lens + used,
                                     used < ids_cap ? ids_cap - used : 0, log, r);
        used = r->chains;
        if (got < 0)
            break;
        uint64_t consumed = r->in_bytes - before;
        f->frames -= (uint64_t)got;
        f->bytes -= consumed;
        if ((uint64_t)got == s->count) {
            f->head = f->head + 1 == f->cap ? 0 : f->head + 1;
            f->n--;
            popped++;
        } else {
            s->data += consumed;
            s->lengths += got;
            s->count -= (uint32_t)got;
            s->nbytes -= consumed;
            break;
        }
        if (used >= max_chains || q->error || r->starved)
            break;
    }
    ifc_dp_rx_timing(l, now, q, r, in_flight, log ? log->words : 0, t);
    return popped;
}
