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
#include "sim_native.h"

#define STEP 0x9E3779B97F4A7C15ull

/* The payload loops are the hot spot at 1500 B: let gcc vectorise them
 * whatever the build-wide optimisation level. */
#if defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((optimize("O3")))
#else
#define HOT
#endif

/* gcc does not vectorise the payload loops by itself (w + STEP * k needs a
 * 64-bit vector multiply, or it gives up on the induction): spell the lanes
 * out with the generic vector extension, two 16-byte vectors of two words
 * (SSE2 on x86-64, NEON on arm64; wider vectors spill without AVX). */
#if defined(__GNUC__)
#define HAVE_VEC 1
typedef uint64_t v2u64 __attribute__((vector_size(16)));
#else
#define HAVE_VEC 0
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

/* slack: bytes after the frame the caller lets us scribble on (0, or >= 8:
 * the last partial word is then stored whole, not byte by byte). */
static inline void frame_fill(uint8_t *frame, uint32_t len, const uint8_t *macs, uint32_t flow,
                              uint64_t seq, uint64_t slack);

HOT void ifc_frame_fill(uint8_t *frame, uint32_t len, const uint8_t *macs, uint32_t flow, uint64_t seq)
{
    frame_fill(frame, len, macs, flow, seq, 0);
}

/* The payload of (flow, seq): n bytes at p. */
HOT static inline void payload_fill(uint8_t *p, uint32_t n, uint64_t w, uint64_t slack)
{
    uint32_t words = n / 8;
    uint32_t k = 0;
#if HAVE_VEC
    /* Four words per step in four lanes, each advancing by 4 * STEP (a
     * plain add: no vector multiply needed). */
    if (words >= 4) {
        v2u64 a = {w, w + STEP}, b = {w + 2 * STEP, w + 3 * STEP};
        const v2u64 step = {4 * STEP, 4 * STEP};
        for (; k + 4 <= words; k += 4) {
            memcpy(p + 8 * (size_t)k, &a, sizeof a);
            memcpy(p + 8 * (size_t)k + 16, &b, sizeof b);
            a += step;
            b += step;
        }
    }
#endif
    for (; k < words; k++)
        put64(p + 8 * (size_t)k, w + STEP * k);
    uint32_t r = n & 7;
    if (r) {
        uint64_t last = w + STEP * words;
        if (slack >= 8)
            put64(p + 8 * (size_t)words, last);     /* the bytes past len get overwritten */
        else if (words)
            /* The payload's last 8 bytes in one store, overlapping the last
             * whole word with the same bytes (a memcpy of n & 7 bytes is a
             * library call). */
            put64(p + n - 8, (w + STEP * (words - 1)) >> (8 * r) | last << (64 - 8 * r));
        else
            memcpy(p, &last, r);
    }
}

HOT static inline void frame_fill(uint8_t *frame, uint32_t len, const uint8_t *macs, uint32_t flow,
                                  uint64_t seq, uint64_t slack)
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
    payload_fill(frame + IFC_TF_HDR_LEN, len - IFC_TF_HDR_LEN, mix(flow, seq), slack);
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
    uint32_t k = 0;
#if HAVE_VEC
    if (words >= 4) {
        v2u64 a = {w, w + STEP}, b = {w + 2 * STEP, w + 3 * STEP}, acc = {0, 0};
        const v2u64 step = {4 * STEP, 4 * STEP};
        for (; k + 4 <= words; k += 4) {
            v2u64 ga, gb;
            memcpy(&ga, p + 8 * (size_t)k, sizeof ga);
            memcpy(&gb, p + 8 * (size_t)k + 16, sizeof gb);
            acc |= (ga ^ a) | (gb ^ b);
            a += step;
            b += step;
        }
        diff = acc[0] | acc[1];
    }
#endif
    for (; k < words; k++)
        diff |= get64(p + 8 * (size_t)k) ^ (w + STEP * k);
    uint32_t r = n & 7;
    if (r) {
        uint64_t last = w + STEP * words, got = 0;
        if (words) {
            /* The payload's last 8 bytes in one load: the partial word is
             * its top r bytes (a memcpy of r bytes is a library call). */
            got = get64(p + n - 8) >> (64 - 8 * r);
        } else {
            memcpy(&got, p, r);
        }
        diff |= got ^ (last & ((1ull << (8 * r)) - 1));
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
    frame_fill(frame, len, s->macs, flow, seq, 0);
    s->frames++;
    s->bytes += len;
    return len;
}

int64_t ifc_stream_fill(ifc_stream *s, uint8_t *data, uint64_t cap, uint32_t *lengths, uint32_t n)
{
    if (!stream_ok(s) || (n && (data == NULL || lengths == NULL)))
        return IFC_GERR_ARG;
    uint64_t off = 0;
    uint32_t i = 0;
    if (s->nsizes == 1 && s->sizes[0] >= IFC_TF_HDR_LEN) {
        /* One size: the header is the same but for flow and seq, so it is
         * built once and copied (what frame_fill writes, byte for byte). */
        uint32_t len = s->sizes[0];
        uint8_t tmpl[IFC_TF_HDR_LEN];
        frame_fill(tmpl, IFC_TF_HDR_LEN, s->macs, 0, 0, 0);
        put32(tmpl + 30, len);
        /* A run of frames of one flow at a time (what stream_next would give:
         * the flow's next sequence numbers, then the next flow). */
        while (i < n && len <= cap - off) {
            uint32_t f = s->flow_cursor, flow = s->flow_base + f;
            uint32_t k = s->run_pos < s->flow_run ? s->flow_run - s->run_pos : 1;
            uint64_t room = (cap - off) / len, seq = s->seq[f];
            if (k > n - i)
                k = n - i;
            if (k > room)
                k = (uint32_t)room;
            put32(tmpl + 18, flow);
            for (uint32_t j = 0; j < k; j++, i++, off += len) {
                uint8_t *fr = data + off;
                memcpy(fr, tmpl, IFC_TF_HDR_LEN);
                put64(fr + 22, seq + j);
                payload_fill(fr + IFC_TF_HDR_LEN, len - IFC_TF_HDR_LEN, mix(flow, seq + j),
                             cap - off - len);
                lengths[i] = len;
            }
            s->seq[f] = seq + k;
            s->run_pos += k;
            if (s->run_pos >= s->flow_run) {
                s->run_pos = 0;
                s->flow_cursor = f + 1 == s->nflows ? 0 : f + 1;
            }
            s->frames += k;
            s->bytes += (uint64_t)k * len;
        }
        return i;
    }
    for (; i < n; i++) {
        uint32_t want = s->sizes[s->size_cursor];
        if (want < IFC_TF_HDR_LEN)
            return i ? (int64_t)i : IFC_GERR_ARG;
        if (want > cap - off)
            break;
        /* Frames go back to back: the next one overwrites whatever a whole-word
         * store spilled past this one, so only the buffer's end needs care. */
        uint32_t flow;
        uint64_t seq;
        stream_next(s, &flow, &seq);
        frame_fill(data + off, want, s->macs, flow, seq, cap - off - want);
        s->frames++;
        s->bytes += want;
        lengths[i] = want;
        off += want;
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
