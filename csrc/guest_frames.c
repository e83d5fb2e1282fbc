/* Test frames for the simulated datapath: fill, check, sequence tracking.
 *
 * A frame carries its own identity (flow, sequence number, length) and a
 * payload that is a pure function of (flow, seq), so a checker can verify
 * every byte without keeping a copy of what was sent.  The payload is a
 * stream of 64-bit little-endian words w_k = base + k * STEP, base a mix of
 * (flow, seq): any changed byte changes one word, and a payload of another
 * frame (another base) differs from the first word on.  Generating and
 * checking are a vectorisable add per 8 bytes. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "ifcvf_native.h"

#define STEP 0x9E3779B97F4A7C15ull

/* The payload loops are the hot spot at 1500 B: let gcc vectorise them
 * whatever the build-wide optimisation level. */
#if defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((optimize("O3")))
#else
#define HOT
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the simulated datapath assumes a little-endian host"
#endif

static inline uint64_t mix(uint32_t flow, uint64_t seq)
{
    /* splitmix64 finaliser over (flow, seq) */
    uint64_t z = seq * 0xBF58476D1CE4E5B9ull ^ ((uint64_t)flow << 32 | flow) ^ 0x94D049BB133111EBull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

HOT void ifc_frame_fill(uint8_t *frame, uint32_t len, const uint8_t *macs, uint32_t flow, uint64_t seq)
{
    if (frame == NULL || len < IFC_TF_HDR_LEN)
        return;
    if (macs)
        memcpy(frame, macs, 12);
    else
        memset(frame, 0, 12);
    frame[12] = IFC_TF_ETHERTYPE >> 8;
    frame[13] = IFC_TF_ETHERTYPE & 0xff;
    put32(frame + 14, IFC_TF_MAGIC);
    put32(frame + 18, flow);
    put64(frame + 22, seq);
    put32(frame + 30, len);
    uint8_t *p = frame + IFC_TF_HDR_LEN;
    uint32_t n = len - IFC_TF_HDR_LEN;
    uint64_t w = mix(flow, seq);
    uint32_t words = n / 8;
    for (uint32_t k = 0; k < words; k++)
        put64(p + 8 * (size_t)k, w + STEP * k);
    if (n & 7) {
        uint64_t last = w + STEP * words;
        memcpy(p + 8 * (size_t)words, &last, n & 7);
    }
}

HOT int ifc_frame_check(const uint8_t *frame, uint32_t len, uint32_t *flow_out, uint64_t *seq_out)
{
    if (frame == NULL || len < IFC_TF_HDR_LEN)
        return IFC_TF_RUNT;
    uint32_t flow = get32(frame + 18);
    uint64_t seq = get64(frame + 22);
    if (flow_out)
        *flow_out = flow;
    if (seq_out)
        *seq_out = seq;
    if (frame[12] != (IFC_TF_ETHERTYPE >> 8) || frame[13] != (IFC_TF_ETHERTYPE & 0xff)
        || get32(frame + 14) != IFC_TF_MAGIC)
        return IFC_TF_NOT_TEST;
    if (get32(frame + 30) != len)
        return IFC_TF_BAD_LENGTH;
    const uint8_t *p = frame + IFC_TF_HDR_LEN;
    uint32_t n = len - IFC_TF_HDR_LEN;
    uint64_t w = mix(flow, seq);
    uint32_t words = n / 8;
    uint64_t diff = 0;
    for (uint32_t k = 0; k < words; k++)
        diff |= get64(p + 8 * (size_t)k) ^ (w + STEP * k);
    if (n & 7) {
        uint64_t last = w + STEP * words, got = 0;
        memcpy(&got, p + 8 * (size_t)words, n & 7);
        diff |= (got ^ last) & ((1ull << (8 * (n & 7))) - 1);
    }
    return diff ? IFC_TF_BAD_PAYLOAD : IFC_TF_OK;
}

/* --- sources -------------------------------------------------------------- */

static inline uint32_t stream_next(ifc_stream *s, uint32_t *flow, uint64_t *seq)
{
    uint32_t f = s->flow_cursor;
    *flow = s->flow_base + f;
    *seq = s->seq[f]++;
    if (++s->run_pos >= s->flow_run) {
        s->run_pos = 0;
        s->flow_cursor = f + 1 == s->nflows ? 0 : f + 1;
    }
    uint32_t len = s->sizes[s->size_cursor];
    s->size_cursor = s->size_cursor + 1 == s->nsizes ? 0 : s->size_cursor + 1;
    return len;
}

static int stream_ok(const ifc_stream *s)
{
    return s && s->seq && s->sizes && s->nflows && s->nsizes && s->flow_run
           && s->flow_cursor < s->nflows && s->size_cursor < s->nsizes;
}

uint64_t ifc_stream_peek_bytes(const ifc_stream *s, uint32_t n)
{
    if (!stream_ok(s))
        return 0;
    uint64_t total = 0;
    uint32_t c = s->size_cursor;
    for (uint32_t i = 0; i < n; i++) {
        total += s->sizes[c];
        c = c + 1 == s->nsizes ? 0 : c + 1;
    }
    return total;
}

/* Used by guest_ring.c too: the next frame of s written at frame (cap bytes
 * available).  Returns its length, or 0 when it does not fit / is invalid. */
uint32_t ifc__stream_emit(ifc_stream *s, uint8_t *frame, uint64_t cap);

uint32_t ifc__stream_emit(ifc_stream *s, uint8_t *frame, uint64_t cap)
{
    uint32_t len = s->sizes[s->size_cursor];
    if (len < IFC_TF_HDR_LEN || len > cap)
        return 0;
    uint32_t flow;
    uint64_t seq;
    stream_next(s, &flow, &seq);
    ifc_frame_fill(frame, len, s->macs, flow, seq);
    s->frames++;
    s->bytes += len;
    return len;
}

int64_t ifc_stream_fill(ifc_stream *s, uint8_t *data, uint64_t cap, uint32_t *lengths, uint32_t n)
{
    if (!stream_ok(s) || (n && (data == NULL || lengths == NULL)))
        return IFC_GERR_ARG;
    uint64_t off = 0;
    uint32_t i;
    for (i = 0; i < n; i++) {
        uint32_t want = s->sizes[s->size_cursor];
        if (want < IFC_TF_HDR_LEN)
            return i ? (int64_t)i : IFC_GERR_ARG;
        if (want > cap - off)
            break;
        uint32_t len = ifc__stream_emit(s, data + off, cap - off);
        lengths[i] = len;
        off += len;
    }
    return i;
}

/* --- checking ----------------------------------------------------------- */

/* Used by guest_ring.c too: check one frame into ck/st; returns 1 if it failed. */
int ifc__check_one(const uint8_t *frame, uint32_t len, ifc_checker *ck, ifc_check_stats *st);

int ifc__check_one(const uint8_t *frame, uint32_t len, ifc_checker *ck, ifc_check_stats *st)
{
    uint32_t flow = 0;
    uint64_t seq = 0;
    st->frames++;
    st->bytes += len;
    int why = ifc_frame_check(frame, len, &flow, &seq);
    uint32_t index = flow - ck->flow_base;
    if (why == IFC_TF_OK && (flow < ck->flow_base || index >= ck->nflows))
        why = IFC_TF_BAD_FLOW;
    if (why != IFC_TF_OK) {
        st->corrupted++;
        switch (why) {
        case IFC_TF_RUNT: st->runt++; break;
        case IFC_TF_NOT_TEST: st->not_test++; break;
        case IFC_TF_BAD_LENGTH: st->bad_length++; break;
        case IFC_TF_BAD_FLOW: st->bad_flow++; break;
        default: st->bad_payload++; break;
        }
        st->last_bad_reason = (uint32_t)why;
        st->last_bad_flow = flow;
        st->last_bad_seq = seq;
        return 1;
    }
    st->good++;
    ifc_flow *f = &ck->flows[index];
    if (seq >= f->next) {
        uint64_t gap = seq - f->next;
        st->lost += (int64_t)gap;
        st->in_order++;
        f->seen = gap >= 63 ? 1 : (f->seen << (gap + 1)) | 1;
        f->next = seq + 1;
    } else {
        uint64_t back = f->next - 1 - seq;
        if (back >= 64) {
            st->stale++;
        } else if (f->seen >> back & 1) {
            st->duplicates++;
        } else {
            f->seen |= 1ull << back;
            st->out_of_order++;
            st->lost--;
        }
    }
    return 0;
}

int64_t ifc_frames_check(const uint8_t *data, uint64_t size, const uint32_t *lengths, uint32_t n,
                         ifc_checker *ck, ifc_check_stats *st)
{
    if (ck == NULL || st == NULL || (ck->nflows && ck->flows == NULL)
        || (n && (data == NULL || lengths == NULL)))
        return IFC_GERR_ARG;
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += lengths[i];
    if (total > size)
        return IFC_GERR_ARG;
    int64_t bad = 0;
    uint64_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        bad += ifc__check_one(data + off, lengths[i], ck, st);
        off += lengths[i];
    }
    return bad;
}
