/* QEMU's RAM migration stream, for the simulator's QEMU role (sim/migration.py).
 *
 * Guest RAM in the simulator is a memfd, so memory nobody wrote is a hole that
 * costs nothing.  Touching a hole through a shared mapping allocates it, even
 * for a read, so everything here asks the file where its data is
 * (lseek SEEK_DATA/SEEK_HOLE) before it reads a page: a 16 GiB guest that
 * touched 1 GiB stays near 1 GiB resident on both sides.
 *
 * What goes on the stream is what QEMU 7.2 sends (migration/ram.c): a page of
 * zeros is a zero-page record (an 8-byte page header and one byte), any other
 * page its header and its 4096 bytes.  The destination leaves a page that is
 * already zero alone, as QEMU's receiving side does. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include "sim_native.h"

/* Where a file's data is, asked as a forward-moving cursor: callers walk pages
 * in ascending order, so one lseek pair per extent crossed, not per page. */
struct extents {
    struct ifc_ram *ram;   /* its known data span is kept up to date (NULL: not kept) */
    int fd;
    int64_t base;          /* file offset of the mapping's first byte */
    int64_t data_start;    /* the next data extent at or after the last query */
    int64_t data_end;
    int64_t queried;       /* the offset that query was made from */
    int error;
};

static void extents_init(struct extents *e, struct ifc_ram *ram, int fd, int64_t base)
{
    e->ram = ram;
    e->fd = fd;
    e->base = base;
    e->data_start = e->data_end = e->queried = -1;
    e->error = 0;
}

static void extents_query(struct extents *e, int64_t off)
{
    int64_t at = e->base + off;
    int64_t start = lseek(e->fd, at, SEEK_DATA);
    e->queried = off;
    if (start < 0) {
        /* ENXIO: nothing but holes from here to the end of the file. */
        if (errno != ENXIO)
            e->error = errno;
        e->data_start = e->data_end = INT64_MAX;
        return;
    }
    int64_t end = lseek(e->fd, start, SEEK_HOLE);
    if (end < 0) {
        e->error = errno;
        end = INT64_MAX;
    }
    e->data_start = start - e->base;
    e->data_end = end == INT64_MAX ? INT64_MAX : end - e->base;
    if (e->ram && !e->error && e->data_start < e->data_end) {
        e->ram->known_start = e->data_start;
        e->ram->known_end = e->data_end;
    }
}

/* Whether [off, off + len) may hold data (any byte of it inside an extent). */
static int extents_has_data(struct extents *e, int64_t off, int64_t len)
{
    if (e->ram && e->ram->known_start <= off && off < e->ram->known_end)
        return 1;
    if (e->queried < 0 || off < e->queried || off >= e->data_end)
        extents_query(e, off);
    return e->data_start < off + len;
}

/* The next offset at or after off that may hold data (INT64_MAX: none). */
static int64_t extents_next_data(struct extents *e, int64_t off)
{
    if (e->queried < 0 || off < e->queried || off >= e->data_end)
        extents_query(e, off);
    return e->data_start > off ? e->data_start : off;
}

static int page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)(const void *)p;
    for (unsigned i = 0; i < IFC_RAM_PAGE / 8; i += 4)
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3])
            return 0;
    return 1;
}

/* Pages that land in holes of the destination go through its file, a run of
 * them per pwrite: the page cache takes a whole page as written, where a store
 * through the mapping first faults it in zero-filled (3x the time for a fresh
 * guest).  Both reach the same memory (the mapping is MAP_SHARED); anything
 * pwrite does not take is copied through the mapping. */
struct copy_run {
    const struct ifc_ram *src, *dst;
    int64_t off, len;      /* pending: [off, off + len) of both mappings */
};

static void copy_run_flush(struct copy_run *r)
{
    int64_t off = r->off, len = r->len;
    r->len = 0;
    while (len > 0) {
        ssize_t w = pwrite(r->dst->fd, r->src->mem + off, (size_t)len, r->dst->offset + off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += w;
        len -= w;
    }
    if (len > 0)
        memcpy(r->dst->mem + off, r->src->mem + off, (size_t)len);
}

static void copy_run_add(struct copy_run *r, int64_t off)
{
    if (r->len && r->off + r->len == off) {
        r->len += IFC_RAM_PAGE;
        return;
    }
    copy_run_flush(r);
    r->off = off;
    r->len = IFC_RAM_PAGE;
}

int64_t ifc_ram_send(struct ifc_ram *src, struct ifc_ram *dst,
                     const uint32_t *pages, uint64_t n, uint64_t budget,
                     struct ifc_ram_sent *sent)
{
    if (!src || !dst || !sent || (n && !pages) || !src->mem || !dst->mem)
        return IFC_ERR_ARG;
    struct extents s, d;
    extents_init(&s, src, src->fd, src->offset);
    extents_init(&d, dst, dst->fd, dst->offset);
    memset(sent, 0, sizeof *sent);
    struct copy_run run = {src, dst, 0, 0};
    uint64_t i = 0;
    for (; i < n && sent->bytes < budget; i++) {
        uint64_t page = pages[i];
        if (page >= src->pages || page >= dst->pages) {
            copy_run_flush(&run);
            return IFC_ERR_RANGE;   /* RamStream.send checks its list first: a bug if reached */
        }
        int64_t off = (int64_t)page * IFC_RAM_PAGE;
        const uint8_t *from = src->mem + off;
        if (!extents_has_data(&s, off, IFC_RAM_PAGE) || page_is_zero(from)) {
            copy_run_flush(&run);   /* (the destination's page is read next: written first) */
            sent->zero_pages++;
            sent->bytes += IFC_RAM_PAGE_HEADER + 1;
            uint8_t *to = dst->mem + off;
            if (extents_has_data(&d, off, IFC_RAM_PAGE) && !page_is_zero(to))
                memset(to, 0, IFC_RAM_PAGE);
        } else {
            sent->normal_pages++;
            sent->bytes += IFC_RAM_PAGE_HEADER + IFC_RAM_PAGE;
            if (extents_has_data(&d, off, IFC_RAM_PAGE))
                memcpy(dst->mem + off, from, IFC_RAM_PAGE);
            else
                copy_run_add(&run, off);
        }
    }
    copy_run_flush(&run);
    if (s.error || d.error)
        return IFC_ERR_ARG;
    sent->consumed = i;
    return (int64_t)i;
}

int64_t ifc_ram_compare(const struct ifc_ram *a, const struct ifc_ram *b,
                        uint32_t *out, uint64_t max_out)
{
    if (!a || !b || !a->mem || !b->mem || (max_out && !out))
        return IFC_ERR_ARG;
    uint64_t pages = a->pages < b->pages ? a->pages : b->pages;
    int64_t end = (int64_t)pages * IFC_RAM_PAGE;
    struct extents ea, eb;
    extents_init(&ea, NULL, a->fd, a->offset);
    extents_init(&eb, NULL, b->fd, b->offset);
    int64_t found = 0;
    int64_t off = 0;
    while (off < end) {
        /* Holes on both sides are equal (zero): jump to the next data of either. */
        int64_t na = extents_next_data(&ea, off), nb = extents_next_data(&eb, off);
        int64_t next = na < nb ? na : nb;
        if (next >= end)
            break;
        off = next - next % IFC_RAM_PAGE;
        int da = extents_has_data(&ea, off, IFC_RAM_PAGE), db = extents_has_data(&eb, off, IFC_RAM_PAGE);
        int differ = da && db ? memcmp(a->mem + off, b->mem + off, IFC_RAM_PAGE) != 0
                   : da ? !page_is_zero(a->mem + off)
                   : db ? !page_is_zero(b->mem + off) : 0;
        if (differ) {
            if ((uint64_t)found < max_out)
                out[found] = (uint32_t)(off / IFC_RAM_PAGE);
            found++;
        }
        off += IFC_RAM_PAGE;
    }
    if (ea.error || eb.error)
        return IFC_ERR_ARG;
    return found;
}

void ifc_ram_fill(uint8_t *mem, uint64_t first_page, uint64_t npages, uint64_t seed)
{
    /* splitmix64 over (seed, page, word): deterministic, no zero pages in practice. */
    for (uint64_t p = first_page; p < first_page + npages; p++) {
        uint64_t *w = (uint64_t *)(void *)(mem + p * IFC_RAM_PAGE);
        uint64_t x = seed ^ (p * 0x9E3779B97F4A7C15ull);
        for (unsigned i = 0; i < IFC_RAM_PAGE / 8; i++) {
            uint64_t z = (x += 0x9E3779B97F4A7C15ull);
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            w[i] = z ^ (z >> 31);
        }
    }
}
