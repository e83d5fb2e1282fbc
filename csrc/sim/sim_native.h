/* The C surface of sim._native (the simulator's C: the device's ring engines
 * and PCIe/wire timing, the guest driver's rings, test frames, and QEMU's side
 * of the dirty log), shared by the C sources in csrc/sim/ and the cffi cdef.
 * csrc/sim/build_native.py feeds csrc/common/ifc_common.h and then this file
 * to cffi's cdef with every preprocessor line except plain integer #defines
 * removed, so keep declarations cdef-clean.  Nothing here comes from the
 * driver's C (csrc/driver/): the model is independent hardware. */
#ifndef SIM_NATIVE_H
#define SIM_NATIVE_H

#include "ifc_common.h"

/* ==========================================================================
 * QEMU's side of the vhost dirty log (sim/migration.py, csrc/sim/qemu_log.c).
 * ========================================================================== */
/* What QEMU does during a migration iteration, while the device keeps writing:
 * for each 64-bit word, a cheap read and, if non-zero, an atomic exchange with
 * 0; the old value is stored in out (which must hold log_size bytes).  A tail
 * shorter than 8 bytes is exchanged bytewise.  Returns the number of set bits
 * fetched, or IFC_ERR_ARG. */
int64_t ifc_log_fetch_clear(uint8_t *log, uint64_t log_size, uint8_t *out);

/* ==========================================================================
 * QEMU's RAM migration stream (sim/migration.py, csrc/sim/qemu_ram.c).
 * Guest RAM is a memfd: pages nobody wrote are holes, found with
 * lseek(SEEK_DATA/SEEK_HOLE) and never touched, so resident memory follows the
 * pages the guest used, not its size.
 * ========================================================================== */
#define IFC_RAM_PAGE 4096
#define IFC_RAM_PAGE_HEADER 8     /* QEMU's be64 (page offset | flags) before each page */

/* One side's RAM: its mapping, and the file (and offset in it) it maps. */
struct ifc_ram {
    uint8_t *mem;
    uint64_t pages;
    int fd;
    int64_t offset;
    /* A span of the mapping [known_start, known_end) found to hold data by an
     * earlier call (zero-filled: none).  Data never turns back into a hole
     * (nothing punches guest RAM), so it stays true across calls and spares
     * the lseek(SEEK_HOLE) scan that finds a big extent's end: that scan walks
     * the whole extent, once per call otherwise. */
    int64_t known_start;
    int64_t known_end;
};

struct ifc_ram_sent {
    uint64_t consumed;       /* pages of the list handled */
    uint64_t bytes;          /* bytes on the migration stream */
    uint64_t zero_pages;     /* sent as zero-page records (never written, or all zeros) */
    uint64_t normal_pages;   /* sent whole */
};

/* Send pages[0..n) (page numbers, ascending for speed) from src to dst as
 * QEMU does, until ``budget`` stream bytes are reached: a zero page becomes a
 * 9-byte record and is written at dst only if dst's page is not zero already;
 * any other page is copied.  Returns the pages handled (also in
 * sent->consumed), IFC_ERR_RANGE for a page outside either RAM, IFC_ERR_ARG. */
int64_t ifc_ram_send(struct ifc_ram *src, struct ifc_ram *dst,
                     const uint32_t *pages, uint64_t n, uint64_t budget,
                     struct ifc_ram_sent *sent);

/* The pages whose contents differ between a and b (holes read as zeros, and
 * are never touched); the first max_out are stored in out.  Returns how many
 * differ, or IFC_ERR_ARG. */
int64_t ifc_ram_compare(const struct ifc_ram *a, const struct ifc_ram *b,
                        uint32_t *out, uint64_t max_out);

/* Fill npages pages from first_page with deterministic non-zero data: memory a
 * running guest has used (its kernel, page cache, heap). */
void ifc_ram_fill(uint8_t *mem, uint64_t first_page, uint64_t npages, uint64_t seed);

/* ==========================================================================
 * Guest side of the simulated datapath (sim/traffic.py, sim/guest.py).
 * Sources: csrc/sim/guest_frames.c (test frames, checker),
 * csrc/sim/guest_ring.c (a guest virtio-net driver's split-ring work).  Every function works on a
 * whole batch so Python crosses into C once per wake-up, never per frame.
 * Virtio rings are little-endian; these run on little-endian hosts only.
 * ========================================================================== */
#define IFC_GERR_ARG -101        /* a bad argument: NULL, a frame too short or too long */
#define IFC_GERR_RING -102       /* the device wrote what a driver must refuse; see ifc_gvq.error */

/* A test frame: dst MAC, src MAC, ethertype 0x88B5 (big-endian), then the
 * test header (little-endian): magic u32, flow u32, seq u64, length u32 (the
 * frame's own length, without FCS), then a payload derived from (flow, seq). */
#define IFC_TF_HDR_LEN 34
#define IFC_TF_ETHERTYPE 0x88B5
#define IFC_TF_MAGIC 0x46434649

/* Why a frame failed its check (ifc_check_stats.last_bad_reason). */
#define IFC_TF_OK 0
#define IFC_TF_RUNT 1            /* shorter than the headers */
#define IFC_TF_NOT_TEST 2        /* wrong ethertype or magic */
#define IFC_TF_BAD_LENGTH 3      /* the length field disagrees with the frame's length */
#define IFC_TF_BAD_FLOW 4        /* flow outside the checker's range */
#define IFC_TF_BAD_PAYLOAD 5     /* payload differs from the pattern of (flow, seq) */

/* A frame source: flows taken round robin (flow_run frames each), frame
 * lengths cycled from a table, one sequence counter per flow. */
typedef struct ifc_stream {
    uint8_t macs[12];            /* destination then source MAC */
    uint32_t flow_base;          /* flow ids are flow_base + 0 .. nflows - 1 */
    uint32_t nflows;
    uint32_t flow_run;           /* consecutive frames per flow (>= 1) */
    uint32_t flow_cursor;        /* index of the current flow */
    uint32_t run_pos;            /* frames of the current flow's run produced so far */
    uint64_t *seq;               /* nflows next sequence numbers */
    const uint32_t *sizes;       /* frame lengths in buffer bytes (no FCS), cycled */
    uint32_t nsizes;
    uint32_t size_cursor;
    uint64_t frames;             /* frames produced */
    uint64_t bytes;              /* buffer bytes produced */
} ifc_stream;

typedef struct ifc_flow {
    uint64_t next;               /* highest sequence number received + 1 */
    uint64_t seen;               /* bit i: sequence number next - 1 - i was received */
} ifc_flow;

typedef struct ifc_checker {
    uint32_t flow_base;
    uint32_t nflows;
    ifc_flow *flows;             /* nflows entries, zeroed at start */
} ifc_checker;

typedef struct ifc_check_stats {
    uint64_t frames;             /* frames checked */
    uint64_t bytes;              /* their buffer bytes */
    uint64_t good;               /* frames that passed every check */
    uint64_t corrupted;          /* frames that failed one (the next five split it) */
    uint64_t runt;
    uint64_t not_test;
    uint64_t bad_length;
    uint64_t bad_flow;
    uint64_t bad_payload;
    uint64_t in_order;           /* good frames above every earlier one of their flow */
    uint64_t out_of_order;       /* good frames that filled an earlier gap */
    uint64_t duplicates;         /* good frames whose sequence number was already received */
    uint64_t stale;              /* good frames more than 64 behind: late or duplicate */
    int64_t lost;                /* sequence numbers skipped and not (yet) filled */
    uint64_t last_bad_seq;
    uint32_t last_bad_flow;
    uint32_t last_bad_reason;    /* IFC_TF_* of the last failed frame */
} ifc_check_stats;

/* One frame of length len at frame (len >= IFC_TF_HDR_LEN). */
void ifc_frame_fill(uint8_t *frame, uint32_t len, const uint8_t *macs, uint32_t flow, uint64_t seq);
/* IFC_TF_OK or why the frame is not the intact test frame it claims to be;
 * flow and seq (may be NULL) get the header's values. */
int ifc_frame_check(const uint8_t *frame, uint32_t len, uint32_t *flow, uint64_t *seq);
/* Buffer bytes of the next n frames of s (nothing is consumed). */
uint64_t ifc_stream_peek_bytes(const ifc_stream *s, uint32_t n);
/* The next n frames of s back to back in data (cap bytes); lengths[i] gets
 * each length.  Returns the frames written (fewer if cap runs out) or an error. */
int64_t ifc_stream_fill(ifc_stream *s, uint8_t *data, uint64_t cap, uint32_t *lengths, uint32_t n);
/* Check n frames back to back in data (size bytes), updating flows and stats.
 * Returns the frames that failed, or IFC_GERR_ARG. */
int64_t ifc_frames_check(const uint8_t *data, uint64_t size, const uint32_t *lengths, uint32_t n,
                         ifc_checker *ck, ifc_check_stats *st);

/* One virtqueue as the guest driver sees it.  Everything the guest must find
 * again after a migration (shadow avail index, last used index, free buffers,
 * per-flow TX sequence numbers) lives in guest RAM in the private block at
 * priv; this struct holds only addresses and host-side counters. */
#define IFC_GVQ_F_MRG 1          /* VIRTIO_NET_F_MRG_RXBUF: RX frames may span buffers */
#define IFC_GVQ_F_EVENT_IDX 2    /* VIRTIO_F_EVENT_IDX */
#define IFC_GVQ_F_TX_SPLIT 4     /* TX chains: header descriptor -> data descriptor */
#define IFC_GVQ_F_TX_INDIRECT 8  /* TX chains: one INDIRECT descriptor -> table (header, data) */

#define IFC_GVQ_E_ID 1           /* used id outside the ring, or not a chain head */
#define IFC_GVQ_E_NOT_POSTED 2   /* used id names a buffer the device does not hold */
#define IFC_GVQ_E_LEN 3          /* used length beyond the buffer or below the net header */
#define IFC_GVQ_E_NUM_BUFFERS 4  /* num_buffers 0, or > 1 without MRG_RXBUF */
#define IFC_GVQ_E_PARTIAL 5      /* num_buffers more than the used entries published */
#define IFC_GVQ_E_TOO_LONG 6     /* a merged frame longer than the scratch buffer */
#define IFC_GVQ_E_USED_IDX 7     /* used idx more than the ring size ahead */
#define IFC_GVQ_E_PRIV 8         /* the private block in guest RAM is corrupt (a bad migration) */

typedef struct ifc_gvq {
    uint8_t *mem;                /* guest RAM: GPA 0 is mem[0] */
    uint64_t mem_size;
    uint64_t desc;               /* ring GPAs */
    uint64_t avail;
    uint64_t used;
    uint64_t priv;               /* GPA of the driver-private block (ifc_gvq_priv_size bytes) */
    uint64_t bufs;               /* GPA of buffer 0; buffer i at bufs + i * buf_size */
    uint64_t hdrs;               /* TX split/indirect: net header i at hdrs + 16 * i */
    uint64_t tables;             /* TX indirect: table i (2 descriptors) at tables + 32 * i */
    uint8_t *scratch;            /* RX: where frames merged over buffers are gathered */
    uint32_t scratch_size;
    uint32_t size;               /* ring entries, a power of two */
    uint32_t nslots;             /* buffers: size, or size / 2 with TX_SPLIT */
    uint32_t buf_size;
    uint32_t hdr_len;            /* virtio-net header: 12 or 10 */
    uint32_t flags;              /* IFC_GVQ_F_* */
    uint32_t error;              /* first IFC_GVQ_E_*, 0 while healthy (then every call fails) */
    uint32_t error_value;        /* the offending id, length or index */
    uint16_t kick_old;           /* avail idx at the last kick decision */
    uint16_t reserved;
    uint32_t last_entries;       /* used entries the last ifc_gvq_rx consumed */
    uint32_t refill_wanted;      /* free buffers when the last rx_poll refilled, 0: it did not */
    uint32_t reserved2;
    uint64_t completed;          /* used entries consumed, all time */
    uint64_t made_available;     /* chains posted, all time */
} ifc_gvq;

/* Bytes of the private block for nslots buffers (a multiple of 64). */
uint64_t ifc_gvq_priv_size(uint32_t nslots);
/* Check q's addresses against mem_size; with fresh != 0 also write a fresh
 * private block (every buffer free, indexes 0) and clear the ring headers. */
int ifc_gvq_init(ifc_gvq *q, int fresh);
/* Start every index of a fresh queue (nothing posted yet) at idx instead of
 * 0, as a ring restored after a migration would be; IFC_GERR_ARG otherwise. */
int ifc_gvq_rebase(ifc_gvq *q, uint16_t idx);
/* RX: consume up to budget frames from the used ring and check each one.
 * Returns frames consumed or IFC_GERR_RING. */
int64_t ifc_gvq_rx(ifc_gvq *q, uint32_t budget, ifc_checker *ck, ifc_check_stats *st);
/* RX: make up to max free buffers available (avail->idx is not published). */
int64_t ifc_gvq_refill(ifc_gvq *q, uint32_t max);
/* TX: take back every completed chain.  Returns chains reclaimed or IFC_GERR_RING. */
int64_t ifc_gvq_tx_reclaim(ifc_gvq *q);
/* TX: write up to max frames of s into free buffers and post their chains
 * (avail->idx is not published).  Returns frames posted or an error. */
int64_t ifc_gvq_tx_post(ifc_gvq *q, uint32_t max, ifc_stream *s);
/* Publish the shadow avail index; 1 when the device asked to be kicked for it. */
int ifc_gvq_publish(ifc_gvq *q);
/* Linux 6.1 virtio_ring, where interrupts are decided (facts in
 * ../shared/reference/linux-virtio-net.md A.1-A.3; csrc/sim/guest_ring.c names
 * the functions).  virtqueue_disable_cb: no-op while event_triggered; else
 * sets the shadow NO_INTERRUPT bit (if clear) and writes used_event = 0
 * (EVENT_IDX) or avail->flags = NO_INTERRUPT. */
void ifc_gvq_disable_cb(ifc_gvq *q);
/* virtqueue_enable_cb_prepare: clears event_triggered and the shadow bit,
 * used_event = last_used (plain store); returns last_used (-1: broken). */
int ifc_gvq_enable_cb_prepare(ifc_gvq *q);
/* virtqueue_poll: full barrier, then 1 if used->idx != opaque. */
int ifc_gvq_poll(ifc_gvq *q, uint16_t opaque);
/* virtqueue_enable_cb_delayed: used_event = last_used + 3/4 of the chains
 * outstanding; 0 (false) when more than that are already used. */
int ifc_gvq_enable_cb_delayed(ifc_gvq *q);
/* vring_interrupt, the ring part: 0 (IRQ_NONE) when no new used entry;
 * else sets event_triggered with EVENT_IDX and returns 1. */
int ifc_gvq_interrupt(ifc_gvq *q);
/* virtqueue_napi_complete: enable_cb_prepare, then (complete_done) the
 * virtqueue_poll re-check, or (!complete_done: NAPIF_STATE_MISSED)
 * disable_cb.  1 when NAPI polls again (the disable then really ran). */
int ifc_gvq_napi_complete(ifc_gvq *q, int complete_done);
/* Buffers the driver holds (not posted to the device). */
uint32_t ifc_gvq_num_free(const ifc_gvq *q);
/* Used entries the device published that the guest has not consumed. */
uint32_t ifc_gvq_pending(const ifc_gvq *q);
/* Chains the guest posted that the device has not completed (buffers in flight). */
uint32_t ifc_gvq_in_flight(const ifc_gvq *q);
/* virtnet_receive: ifc_gvq_rx, then (unless it failed) the refill only if
 * num_free > min(budget, size) / 2: ifc_gvq_refill(q, refill_max) with its
 * result in *refilled (0 when not called); q->refill_wanted = the free count
 * when it ran, else 0.  Returns what ifc_gvq_rx did. */
int64_t ifc_gvq_rx_poll(ifc_gvq *q, uint32_t budget, ifc_checker *ck, ifc_check_stats *st,
                        uint32_t refill_max, int64_t *refilled);

/* What one call of ifc_gvq_tx_xmit did. */
struct ifc_gvq_xmit {
    int64_t frames;              /* frames posted */
    uint64_t bytes;              /* their buffer bytes (no FCS) */
    uint32_t num_free;           /* free buffers after the batch (when sent) */
    uint32_t sent;               /* 1: the batch got past its room check (want > 0 after it) */
    uint32_t broken;             /* 1: a reap or post failed (the ring error is in q) */
    uint32_t reserved;
};
/* A batch of start_xmit calls (sim/guest.py _tx_work, its ring part, in one
 * call): disable_cb + reap, want = min(want, num_free - stop_free + 1); if
 * want > 0: post want - 1 frames, then do { disable_cb; reap } while
 * (!enable_cb_delayed), post the last one.  Stops at the first failure
 * (out->broken, out->frames what was posted before it, as the Python did). */
void ifc_gvq_tx_xmit(ifc_gvq *q, int64_t want, uint32_t stop_free, ifc_stream *s,
                     struct ifc_gvq_xmit *out);
/* virtnet_poll_cleantx's loop: do { disable_cb; reap } while
 * (!enable_cb_delayed).  Returns num_free after it, or the reap's error. */
int64_t ifc_gvq_tx_clean(ifc_gvq *q);

/* ==========================================================================
 * Device side of the simulated datapath (sim/engines.py, sim/wire.py).
 * Source: csrc/sim/simdp.c.  One call per engine round (a batch of chains),
 * never per frame.  Every guest address is an IOVA translated through the
 * function's IOMMU segment table and bounds-checked; a chain is validated
 * completely before anything is written for it.
 * ========================================================================== */
#define IFC_DP_ERR -201           /* the queue's rings break the rules: see ifc_dp_vq.error */

/* ifc_dp_vq.flags: what the driver negotiated */
#define IFC_DP_F_EVENT_IDX 1      /* VIRTIO_F_EVENT_IDX: used_event / avail_event */
#define IFC_DP_F_INDIRECT 2       /* VIRTIO_F_INDIRECT_DESC */
#define IFC_DP_F_MRG 4            /* VIRTIO_NET_F_MRG_RXBUF */

#define IFC_DP_CPL_OVERHEAD 20    /* bytes of a completion TLP beyond its payload (framing 8 + header 12) */

/* ifc_dp_vq.error: the first violation, kept; every later fetch/fill fails. */
#define IFC_DP_E_NONE 0
#define IFC_DP_E_SIZE 1               /* queue size not a power of two in 1..32768 */
#define IFC_DP_E_RING_ALIGN 2         /* desc not 16-, avail not 2-, used not 4-aligned */
#define IFC_DP_E_DESC_ADDR 3          /* descriptor table (16*size) not mapped; err_iova = first hole */
#define IFC_DP_E_AVAIL_ADDR 4         /* avail ring (6+2*size) not mapped */
#define IFC_DP_E_USED_ADDR 5          /* used ring (6+8*size) not mapped */
#define IFC_DP_E_RING_SPLIT 6         /* a ring is mapped but spans two mappings (model limit) */
#define IFC_DP_E_AVAIL_IDX 7          /* avail->idx more than size ahead of last_avail; value = idx */
#define IFC_DP_E_HEAD_ID 8            /* avail entry (chain head) >= size; value = id */
#define IFC_DP_E_NEXT 9               /* next >= table size; value = next */
#define IFC_DP_E_LOOP 10              /* chain longer than its table: a loop */
#define IFC_DP_E_INDIRECT_FEATURE 11  /* INDIRECT without VIRTIO_F_INDIRECT_DESC */
#define IFC_DP_E_INDIRECT_NESTED 12   /* INDIRECT inside an indirect table */
#define IFC_DP_E_INDIRECT_POS 13      /* INDIRECT not the chain head */
#define IFC_DP_E_INDIRECT_NEXT 14     /* INDIRECT together with NEXT */
#define IFC_DP_E_INDIRECT_LEN 15      /* table len 0, % 16, or more than size entries */
#define IFC_DP_E_INDIRECT_ADDR 16     /* table not mapped; err_iova = first hole */
#define IFC_DP_E_BUF_ADDR 17          /* buffer not mapped (or wraps); err_iova = first hole */
#define IFC_DP_E_TX_WRITABLE 18       /* device-writable buffer in a TX chain */
#define IFC_DP_E_RX_READONLY 19       /* device-readable buffer in an RX chain */
#define IFC_DP_E_RX_SHORT 20          /* MRG_RXBUF buffer shorter than the net header */
#define IFC_DP_E_COUNT 21

/* One IOMMU mapping: [iova, iova + size) is host memory at host. */
struct ifc_dp_seg {
    uint64_t iova;
    uint64_t size;
    uint8_t *host;
};

/* The function's IOMMU domain: segments sorted by iova, not overlapping. */
struct ifc_dp_mem {
    struct ifc_dp_seg *segs;
    uint32_t nsegs;
    uint32_t reserved;
};

struct ifc_dp_buf {
    uint64_t addr;
    uint32_t len;
    uint32_t reserved;
};

/* What one call did, for the PCIe timing model (counts add up over calls). */
struct ifc_dp_round {
    uint32_t chains;          /* avail entries consumed */
    uint32_t frames;          /* TX: frames produced; RX: frames placed in buffers */
    uint32_t dropped;         /* frames dropped (the next four split it) */
    uint32_t runts;           /* TX: chain shorter than header + min_frame */
    uint32_t oversize;        /* frame longer than max_frame */
    uint32_t too_big;         /* RX without MRG_RXBUF: frame larger than the buffer chain */
    uint32_t starved;         /* RX: stopped for lack of buffers */
    uint32_t ring_reqs;       /* avail ring read requests (2 when the batch wraps) */
    uint32_t ring_bytes;
    uint32_t desc_levels;     /* dependent descriptor reads of the longest chain */
    uint32_t desc_reqs;       /* descriptor / indirect table read requests (coalesced) */
    uint32_t desc_cpls;       /* their completion TLPs */
    uint64_t desc_bytes;
    uint32_t data_reqs;       /* TX: read requests (MRRS); RX: write TLPs (MPS) */
    uint32_t data_cpls;       /* TX: completion TLPs */
    uint64_t data_bytes;      /* bytes read (TX, header included) or written (RX) */
    uint64_t out_bytes;       /* TX: frame bytes produced */
    uint64_t frame_bytes;     /* RX: frame bytes placed */
    uint64_t in_bytes;        /* RX: bytes of the frames consumed (placed or dropped) */
};

/* One virtqueue as the device works it. */
struct ifc_dp_vq {
    struct ifc_dp_mem *mem;
    uint64_t desc_iova;
    uint64_t avail_iova;
    uint64_t used_iova;
    uint8_t *desc;            /* host addresses, set by ifc_dp_vq_bind */
    uint8_t *avail;
    uint8_t *used;
    struct ifc_dp_buf *bufs;  /* scratch for one chain's buffers, bufs_cap >= size */
    uint32_t bufs_cap;
    uint32_t size;
    uint32_t flags;           /* IFC_DP_F_* */
    uint32_t hdr_len;         /* virtio-net header: 12 (VERSION_1 or MRG_RXBUF) or 10 */
    uint32_t max_frame;       /* longest frame (buffer bytes, no FCS) accepted */
    uint32_t min_frame;       /* TX: shorter chains (after the header) are runts */
    uint32_t mps;             /* PCIe max payload size: write TLP split */
    uint32_t mrrs;            /* max read request size: read request split */
    uint32_t cpl_unit;        /* read completions split at this (MPS or RCB) */
    uint16_t last_avail;      /* next avail entry to take */
    uint16_t last_used;       /* used->idx as last published */
    uint16_t avail_seen;      /* avail->idx read by the last fetch/fill */
    uint16_t reserved;
    uint32_t error;           /* IFC_DP_E_*, 0 while healthy */
    uint32_t err_head;        /* chain head of the violation */
    uint32_t err_desc;        /* descriptor index in its table */
    uint32_t err_indirect;    /* 1: err_desc indexes an indirect table */
    uint16_t err_idx;         /* free-running avail index of the chain */
    uint16_t reserved2;
    uint64_t err_value;       /* the offending value (id, next, flags, len, addr, idx) */
    uint64_t err_iova;        /* memory errors: the first unmapped address */
    uint64_t err_len;
    /* descriptor-read coalescing state (private) */
    uint64_t rd_start;
    uint64_t rd_end;
    uint32_t rd_len;
    uint32_t rd_open;
};

/* Hardware dirty logging: bit p of the bitmap at IOVA [base, end) = guest page p. */
struct ifc_dp_log {
    uint64_t base;
    uint64_t end;
    uint32_t on;
    uint32_t word_open;
    uint64_t skip_threshold;  /* skip a mark when splitmix64(rng) >> 1 < this; 2^63 = all */
    uint64_t rng;             /* splitmix64 state */
    uint64_t *skipped;        /* pages whose mark was skipped (first skipped_cap kept) */
    uint32_t skipped_cap;
    uint32_t skipped_n;       /* skipped marks since the caller last reset it */
    uint64_t marks;           /* page marks attempted */
    uint64_t set;             /* bits set */
    uint64_t skips;
    uint64_t words;           /* distinct consecutive 8-byte log words written (PCIe cost) */
    uint64_t last_word;
    uint64_t range_faults;    /* pages beyond [base, end): not written */
    uint64_t last_range_fault;        /* the page of the latest one */
    uint64_t unmapped_faults; /* log IOVA not mapped: not written */
    uint64_t last_unmapped_fault;     /* the log IOVA of the latest one */
    uint64_t cache_iova;      /* last log segment (private) */
    uint64_t cache_size;
    uint8_t *cache_host;
};

/* Translate the rings of q (IOVAs, size, bufs set by the caller).
 * IFC_OK, or IFC_DP_ERR with q->error set. */
int ifc_dp_vq_bind(struct ifc_dp_vq *q);

/* TX: take up to max_chains chains from the avail ring, validate each, and
 * gather every frame (the bytes after the hdr_len-byte net header) back to
 * back into out.  ids[k] gets the head of the k-th chain taken (all of them:
 * dropped runts/oversize frames too, whose used len is 0); lengths[i] and
 * cum[i] (downstream PCIe bytes including completion overhead up to the end
 * of frame i) the i-th frame produced.  Returns the chains taken
 * (q->last_avail moves by it); on a violation the chains before it are
 * returned and q->error is set; IFC_DP_ERR if the queue had failed before. */
int64_t ifc_dp_tx_fetch(struct ifc_dp_vq *q, uint32_t max_chains, uint8_t *out, uint64_t out_cap,
                        uint32_t *lengths, uint32_t *ids, uint64_t *cum, struct ifc_dp_round *r);

/* RX: place frames (back to back in data, nframes lengths) into chains from
 * the avail ring: a 12- or 10-byte net header (all zero but num_buffers:
 * 1, or the buffers used with MRG_RXBUF) then the frame.  Without MRG_RXBUF
 * a frame bigger than its chain is dropped (too_big) and the chain kept for
 * the next frame; with it a frame spans chains.  The used entries to publish
 * go to ids/lens (capacity ids_cap).  Stops when frames run out, the ring
 * has no buffer (starved), max_chains are taken (a frame first in the call
 * may exceed it) or a violation is found (q->error; nothing written for that
 * chain or the frame it was for).  Every written byte range's 4 KiB pages
 * are marked in log (if on).  Returns the frames consumed (placed or dropped). */
int64_t ifc_dp_rx_fill(struct ifc_dp_vq *q, const uint8_t *data, const uint32_t *lengths,
                       uint32_t nframes, uint32_t max_chains, uint32_t *ids, uint32_t *lens,
                       uint32_t ids_cap, struct ifc_dp_log *log, struct ifc_dp_round *r);

/* Write n used elements, then used->idx (release); returns 1 when the driver
 * wants an interrupt for them (EVENT_IDX: vring_need_event(used_event, new,
 * old); else avail->flags lacks NO_INTERRUPT), 0 if not, or an error. */
int ifc_dp_publish(struct ifc_dp_vq *q, const uint32_t *ids, const uint32_t *lens, uint32_t n);

/* The engine goes idle: ask for kicks (EVENT_IDX: avail_event = last_avail;
 * else used->flags = 0) and re-check; 1 when avail has entries after all. */
int ifc_dp_notify_enable(struct ifc_dp_vq *q);
/* The engine is busy: without EVENT_IDX set VRING_USED_F_NO_NOTIFY. */
void ifc_dp_notify_disable(struct ifc_dp_vq *q);
const char *ifc_dp_error_text(uint32_t code);
/* avail->idx (which 0) or used->idx (which 1) as in memory; 0x10000 if unbound. */
uint32_t ifc_dp_ring_idx(const struct ifc_dp_vq *q, uint32_t which);

/* Wire: frames leave back to back from max(earliest, *free_tick, ready[i])
 * (ready may be NULL); time in ticks, tpc per cycle and tpb per byte; a frame
 * occupies max(len, min_len) + overhead bytes.  departs[i] = cycle its last
 * bit leaves, arrivals[i] (may be NULL) = departs[i] + propagation.  Returns
 * the last departure cycle; *free_tick moves to the end of the last frame. */
int64_t ifc_wire_schedule(const uint32_t *lengths, uint32_t n, const int64_t *ready, int64_t earliest,
                          int64_t *departs, int64_t *arrivals, int64_t propagation,
                          uint64_t *free_tick, uint64_t tpc, uint64_t tpb, uint32_t overhead,
                          uint32_t min_len);
/* How many leading frames of lengths[0..n) fit in room bytes, in order (the
 * first that does not fit ends it); *bytes = their total (may be NULL). */
uint32_t ifc_frames_fit(const uint32_t *lengths, uint32_t n, uint64_t room, uint64_t *bytes);
/* out[i] = ceil((base_tick + cum[i] * tpb) / tpc): when frame i's data is in. */
void ifc_dp_ready_times(const uint64_t *cum, uint32_t n, uint64_t base_tick, uint64_t tpb,
                        uint64_t tpc, int64_t *out);

/* PCIe link timing (sim/pcie_link.py): two pipes of busy intervals in ticks
 * (tpc ticks per cycle, tpb per byte).  A reservation fills the idle gaps
 * from its start time on and returns the tick its last byte is through;
 * intervals that ended before now are dropped; with every slot in use the
 * smallest gap is closed (counted busy). */
#define IFC_PIPE_SLOTS 32
#define IFC_LINK_REQ_BYTES 24         /* MRd, 64-bit address: framing 8 + header 16 */
#define IFC_LINK_WRITE_OVERHEAD 24    /* MWr, 64-bit address: framing 8 + header 16 */

struct ifc_pipe {
    uint32_t n;
    uint32_t reserved;
    uint64_t start[32];           /* IFC_PIPE_SLOTS */
    uint64_t end[32];
};

struct ifc_link {
    uint64_t tpc;                 /* ticks per cycle */
    uint64_t tpb;                 /* ticks per byte */
    uint64_t rd_lat;              /* read round trip, ticks */
    int64_t wr_lat_cycles;        /* posted write until visible, cycles */
    uint32_t mps;
    uint32_t reserved;
    struct ifc_pipe up;           /* device -> host */
    struct ifc_pipe down;         /* host -> device */
    uint64_t up_bytes;            /* bytes on each direction, overhead included */
    uint64_t down_bytes;
    uint64_t reads;
    uint64_t writes;
};

uint64_t ifc_pipe_reserve(struct ifc_pipe *p, uint64_t t, uint64_t dur, uint64_t now);
/* A read issued at cycle: returns the tick its last completion byte is in.
 * control != 0: unqueued (one latency plus its own bytes), bytes still reserved. */
uint64_t ifc_link_read(struct ifc_link *l, int64_t now, int64_t cycle, uint32_t reqs,
                       uint64_t payload, uint32_t cpls, uint32_t control);
/* The dependent control reads of an engine round (avail idx, ring, descriptor
 * levels); returns the cycle the last descriptor is in. */
int64_t ifc_link_fetch(struct ifc_link *l, int64_t now, int64_t cycle, const struct ifc_dp_round *r);
/* Posted writes from cycle; returns the cycle the last byte has left. */
int64_t ifc_link_write(struct ifc_link *l, int64_t now, int64_t cycle, uint32_t tlps, uint64_t payload);
/* n used elements after in_flight unpublished ones, plus used->idx, from cycle;
 * returns the cycle they are visible in host memory. */
int64_t ifc_link_used_write(struct ifc_link *l, int64_t now, int64_t cycle, const struct ifc_dp_vq *q,
                            uint32_t in_flight, uint32_t n);

/* One engine round's timeline (cycles). */
struct ifc_dp_times {
    int64_t fetched;              /* descriptors in */
    int64_t data_in;              /* TX: last data completion in; RX: last data write sent */
    int64_t visible;              /* used elements + used->idx visible to the driver */
};

/* A whole TX round: zero r, ifc_dp_tx_fetch, then its timing on the link
 * (control reads, data read, ready[i] per frame, used write after in_flight
 * unpublished entries).  Returns what ifc_dp_tx_fetch returned. */
int64_t ifc_dp_tx_round(struct ifc_dp_vq *q, struct ifc_link *l, int64_t now, uint32_t max_chains,
                        uint8_t *out, uint64_t out_cap, uint32_t *lengths, uint32_t *ids,
                        uint64_t *cum, int64_t *ready, uint32_t in_flight,
                        struct ifc_dp_round *r, struct ifc_dp_times *t);
/* The timing of an RX round whose fills are summed in r: control reads, data
 * (and log_words 8-byte dirty-log) writes, used write. */
void ifc_dp_rx_timing(struct ifc_link *l, int64_t now, const struct ifc_dp_vq *q,
                      const struct ifc_dp_round *r, uint32_t in_flight, uint64_t log_words,
                      struct ifc_dp_times *t);

/* The RX FIFO of an RX engine: batches from the wire waiting, in order, for
 * RX buffers.  A ring of segments (head .. head + n - 1, modulo cap); the
 * caller keeps the memory they point to alive until a segment is consumed. */
struct ifc_dp_fifo_seg {
    const uint8_t *data;      /* the next frame's bytes */
    const uint32_t *lengths;  /* the next frame's length */
    uint32_t count;           /* frames left in the segment */
    uint32_t reserved;
    uint64_t nbytes;          /* their bytes */
};

struct ifc_dp_fifo {
    struct ifc_dp_fifo_seg *segs;
    uint32_t cap;
    uint32_t head;
    uint32_t n;
    uint32_t reserved;
    uint64_t frames;          /* frames waiting, all segments */
    uint64_t bytes;           /* their bytes */
};

/* Append a segment; -1 (nothing changed) when the ring is full. */
int ifc_dp_fifo_push(struct ifc_dp_fifo *f, const uint8_t *data, const uint32_t *lengths,
                     uint32_t count, uint64_t nbytes);
/* Move the segments, in order, to segs[0 .. n) of a bigger array (cap >= n). */
void ifc_dp_fifo_move(struct ifc_dp_fifo *f, struct ifc_dp_fifo_seg *segs, uint32_t cap);
/* One RX round: ifc_dp_rx_fill over the FIFO's segments from the head (at
 * most max_chains used entries, stopping early when starved, on an error, or
 * when a segment is left part-consumed), then ifc_dp_rx_timing with the dirty
 * log's words when log is not NULL.  r is zeroed first.  Returns how many
 * segments were consumed whole (the caller drops their memory). */
uint32_t ifc_dp_rx_round(struct ifc_dp_vq *q, struct ifc_link *l, int64_t now,
                         struct ifc_dp_fifo *f, uint32_t max_chains, uint32_t *ids,
                         uint32_t *lens, uint32_t ids_cap, struct ifc_dp_log *log,
                         uint32_t in_flight, struct ifc_dp_round *r, struct ifc_dp_times *t);

/* sim/switch.py: frames [ends[k-1], ends[k]) share their first 12 bytes
 * (destination and source MAC); a frame shorter than that is a run alone.
 * Returns the runs written (at most cap); stops at a frame beyond size. */
uint32_t ifc_frames_mac_runs(const uint8_t *data, uint64_t size, const uint32_t *lengths,
                             uint32_t n, uint32_t *ends, uint32_t cap);
/* The guest driver sends one frame it built itself (a gratuitous ARP): like
 * ifc_gvq_tx_post with one frame of len bytes.  1 posted, 0 no free slot,
 * or an error. */
int64_t ifc_gvq_tx_post_frame(ifc_gvq *q, const uint8_t *frame, uint32_t len);

#endif
