// gpu_phase_router CUDA kernels (SPEC.md §2, §5, §6, §11, §13). Compiled at first use by CuPy (NVRTC);
// the exact same file is compiled by g++ against tests/simt/simt.h and executed on the CPU in the tests.
//
// CUDA subset used (everything tests/simt/simt.h emulates; keep to it):
//   qualifiers   __global__ __device__ __forceinline__ __launch_bounds__ __shared__ (static arrays only)
//                __restrict__, extern "C" kernels, templates
//   built-ins    threadIdx blockIdx blockDim gridDim (.x/.y), int2
//   intrinsics   __syncthreads() and __shfl_sync / __shfl_xor_sync with the full mask 0xffffffff,
//                reached by every lane (collectives only in warp-uniform control flow), __popcll
//   no includes, no atomics, no floating point, no dynamic shared memory, no cooperative groups.
//
// Arithmetic: keys are unsigned 64-bit with wrap-around; ring arithmetic goes through cyc_add and
// cyc_sub only (C's % and / truncate, so neither is used on possibly negative values).

typedef unsigned long long u64;
typedef long long i64;

#define GPR_FULL_MASK 0xffffffffu
#define GPR_MAX_WARPS 8          // warps per block (all rows of the block together)
#define GPR_SENT_COL 0xffffffffu  // "no candidate": sorts after every real column

// ---------------------------------------------------------------------------------------------
// SplitMix64 (SPEC §5)

__device__ __forceinline__ u64 gpr_mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// at(base, i): the i-th SplitMix64 output from state `base`.
__device__ __forceinline__ u64 gpr_at(u64 base, u64 i) {
    return gpr_mix64(base + 0x9E3779B97F4A7C15ULL * (i + 1ULL));
}

// ---------------------------------------------------------------------------------------------
// Cyclic arithmetic on [0, m): the only place where the ring wraps. Both operands in [0, m).

__device__ __forceinline__ int cyc_add(int a, int b, int m) {  // (a + b) mod m, no overflow
    return b < m - a ? a + b : b - (m - a);
}

__device__ __forceinline__ int cyc_sub(int a, int b, int m) {  // (a - b) mod m, no overflow
    return a >= b ? a - b : a + (m - b);
}

// (key, col) order of SPEC §5: key first, column breaks ties.
__device__ __forceinline__ bool gpr_less(u64 ka, unsigned ca, u64 kb, unsigned cb) {
    return ka < kb || (ka == kb && ca < cb);
}

// ---------------------------------------------------------------------------------------------
// Feistel bijection (SPEC §6), one value.

__device__ __forceinline__ i64 gpr_feistel(u64 x, u64 n, u64 key, int h, u64 mask, int inverse) {
    if (n == 1ULL) return 0;
    for (;;) {
        u64 left = x >> h;
        u64 right = x & mask;
        if (inverse) {
            for (int r = 5; r >= 0; --r) {
                u64 f = gpr_at(key, ((u64)r << 32) + left) & mask;
                u64 nl = right ^ f;
                right = left;
                left = nl;
            }
        } else {
            for (int r = 0; r < 6; ++r) {
                u64 f = gpr_at(key, ((u64)r << 32) + right) & mask;
                u64 nr = left ^ f;
                left = right;
                right = nr;
            }
        }
        x = (left << h) | right;
        if (x < n) return (i64)x;
    }
}

// out[i] = feistel(start + i, n, key) (or its inverse) for i in [0, count); grid-stride loop.
extern "C" __global__ void __launch_bounds__(256)
gpr_feistel_range(i64 start, i64 count, u64 n, u64 key, int h, u64 mask, int inverse, i64* __restrict__ out) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        out[i] = gpr_feistel((u64)(start + i), n, key, h, mask, inverse);
    }
}

// ---------------------------------------------------------------------------------------------
// Row popcounts of bit-packed words (SPEC §2): one warp per row, lanes stride over the words.
// bad[row] = 1 when a bit at a position >= nbits (the padding of the last word) is set.

extern "C" __global__ void __launch_bounds__(256)
gpr_popcount_rows(const u64* __restrict__ words, i64 rows, int nbw, u64 pad_mask, i64* __restrict__ counts,
                  int* __restrict__ bad) {
    const int lane = threadIdx.x & 31;
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;  // warp-uniform
    const u64* w = words + row * nbw;
    int total = 0;
    for (int q = lane; q < nbw; q += 32) total += __popcll(w[q]);
    for (int off = 16; off > 0; off >>= 1) total += __shfl_xor_sync(GPR_FULL_MASK, total, off);
    if (lane == 0) {
        counts[row] = total;
        bad[row] = (w[nbw - 1] & pad_mask) != 0ULL;
    }
}

// ---------------------------------------------------------------------------------------------
// Ring layout packed for the scan: (start, len) as one 8-byte load per position, column apart
// (read only for candidates). All values are < 2^31 - 2^16 (checked on the host), so int
// arithmetic on positions and phases, including q + blockDim.x below, cannot overflow.

extern "C" __global__ void __launch_bounds__(256)
gpr_pack_ring(const i64* __restrict__ ring_start, const i64* __restrict__ ring_len, const i64* __restrict__ ring_col,
              int n_tgt, int2* __restrict__ ring_sl, int* __restrict__ ring_col32) {
    const i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p < n_tgt) {
        int2 v;
        v.x = (int)ring_start[p];
        v.y = (int)ring_len[p];
        ring_sl[p] = v;
        ring_col32[p] = (int)ring_col[p];
    }
}

// ---------------------------------------------------------------------------------------------
// Phase router (SPEC §4-§5).
//
// Block = blockDim.y rows x (blockDim.x / 32) warps per row. The threads of a row scan its ring
// positions off_s .. off_s + deg - 1 (mod n_tgt), lane-strided so the ring arrays are read
// coalesced; a position is a candidate when (phase - ring_start) mod n_src < ring_len, and only
// candidates are keyed. Each thread keeps the K smallest (key, col) pairs it has seen in a sorted
// register array; the lanes of a warp merge theirs with shuffles (K rounds of a butterfly arg-min),
// the warps of a row merge through shared memory. That yields the row's K smallest pairs exactly.
// When k > K the scan is repeated, each pass admitting only pairs greater than the last one
// already output (a strictly increasing threshold), so pass p yields ranks p*K .. p*K + K - 1.
// Everything is order-independent: the result depends on the candidate set only.

template <int K>
__device__ __forceinline__ void gpr_topk_reset(u64 (&key)[K], unsigned (&col)[K]) {
#pragma unroll
    for (int j = 0; j < K; ++j) {
        key[j] = ~0ULL;
        col[j] = GPR_SENT_COL;
    }
}

// Insert (kk, cc) into the ascending list if it is among the K smallest.
template <int K>
__device__ __forceinline__ void gpr_topk_offer(u64 (&key)[K], unsigned (&col)[K], u64 kk, unsigned cc) {
    if (!gpr_less(kk, cc, key[K - 1], col[K - 1])) return;
    key[K - 1] = kk;
    col[K - 1] = cc;
#pragma unroll
    for (int j = K - 1; j > 0; --j) {
        if (gpr_less(key[j], col[j], key[j - 1], col[j - 1])) {
            u64 tk = key[j];
            key[j] = key[j - 1];
            key[j - 1] = tk;
            unsigned tc = col[j];
            col[j] = col[j - 1];
            col[j - 1] = tc;
        }
    }
}

// Drop the head of the ascending list.
template <int K>
__device__ __forceinline__ void gpr_topk_pop(u64 (&key)[K], unsigned (&col)[K]) {
#pragma unroll
    for (int j = 0; j < K - 1; ++j) {
        key[j] = key[j + 1];
        col[j] = col[j + 1];
    }
    key[K - 1] = ~0ULL;
    col[K - 1] = GPR_SENT_COL;
}

// Arg-min of (hk, hc) over the warp (butterfly); every lane gets the minimum. Columns of real
// entries are distinct, so the minimum names one lane.
__device__ __forceinline__ void gpr_warp_min(u64& hk, unsigned& hc) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        u64 ok = __shfl_xor_sync(GPR_FULL_MASK, hk, off);
        unsigned oc = __shfl_xor_sync(GPR_FULL_MASK, hc, off);
        if (gpr_less(ok, oc, hk, hc)) {
            hk = ok;
            hc = oc;
        }
    }
}

// Merge the 32 lanes' ascending lists: lane m (m < K) receives the warp's m-th smallest pair.
// Warp-uniform; consumes the lists.
template <int K>
__device__ __forceinline__ void gpr_warp_merge(u64 (&key)[K], unsigned (&col)[K], int lane, u64& rk, unsigned& rc) {
    rk = ~0ULL;
    rc = GPR_SENT_COL;
    for (int m = 0; m < K; ++m) {
        u64 hk = key[0];
        unsigned hc = col[0];
        gpr_warp_min(hk, hc);
        if (hc == GPR_SENT_COL) break;  // every list is empty (uniform: all lanes hold the minimum)
        if (lane == m) {
            rk = hk;
            rc = hc;
        }
        if (key[0] == hk && col[0] == hc) gpr_topk_pop<K>(key, col);
    }
}

// Banded emission (SPEC §13): the pass's K ranked columns (lane m of warp 0 holds rank pass*K + m)
// are mapped through col_map and lane 0 appends each target not yet in the row, in rank order, up to
// k_out. Lane 0 reads back only what it wrote itself. Warp-uniform (every lane takes part in the
// shuffles); returns the new count of listed targets (meaningful in lane 0).
template <int K>
__device__ __forceinline__ int gpr_emit_distinct(unsigned rc, int lane, int pass, int k, int k_out, int listed,
                                                 const int* __restrict__ col_map, int* __restrict__ orow) {
    const int e = rc == GPR_SENT_COL ? -1 : col_map[rc];
#pragma unroll
    for (int m = 0; m < K; ++m) {
        const int em = __shfl_sync(GPR_FULL_MASK, e, m);
        if (lane == 0 && em >= 0 && pass * K + m < k && listed < k_out) {
            bool seen = false;
            for (int q = 0; q < listed; ++q) seen = seen || orow[q] == em;
            if (!seen) orow[listed++] = em;
        }
    }
    return listed;
}

// Fill completion of a short banded row (SPEC §13), one thread: capacity-weighted draws
// col_map[key(j, V + r) mod V] for r < GPR_FILL_TRIES, then every target of positive capacity in
// ascending order, cyclically from the band of the first draw, each appended when not yet listed
// (bands are contiguous and ascending, so the next band starts where col_map first exceeds e).
#define GPR_FILL_TRIES 16

__device__ __forceinline__ bool gpr_listed(const int* __restrict__ orow, int listed, int e) {
    bool seen = false;
    for (int q = 0; q < listed; ++q) seen = seen || orow[q] == e;
    return seen;
}

__device__ int gpr_complete_row(int* __restrict__ orow, int listed, int k_out, u64 row_base,
                                const int* __restrict__ col_map, int n_cols) {
    const u64 nc = (u64)n_cols;
    for (int r = 0; r < GPR_FILL_TRIES && listed < k_out; ++r) {
        const int e = col_map[gpr_at(row_base, nc + (u64)r) % nc];
        if (!gpr_listed(orow, listed, e)) orow[listed++] = e;
    }
    const int first = col_map[gpr_at(row_base, nc) % nc];
    int e = first;
    for (int step = 0; step < n_cols && listed < k_out; ++step) {  // at most one step per band
        if (!gpr_listed(orow, listed, e)) orow[listed++] = e;
        int lo = 0, hi = n_cols;  // first column of the next band: the first v with col_map[v] > e
        while (lo < hi) {
            const int mid = lo + ((hi - lo) >> 1);
            if (col_map[mid] <= e) lo = mid + 1;
            else hi = mid;
        }
        e = col_map[lo < n_cols ? lo : 0];
        if (e == first) break;
    }
    return listed;
}

// col_map / k_out: k_out == 0 writes the k ranked columns as they are (col_map unused); k_out > 0
// maps them to targets and keeps each row's first k_out distinct ones (SPEC §13), row stride k_out.
template <int K>
__device__ __forceinline__ void gpr_phase_rows(const i64* __restrict__ phase, const i64* __restrict__ off_s,
                                               const i64* __restrict__ deg, const int2* __restrict__ ring_sl,
                                               const int* __restrict__ ring_col, int rows, int n_tgt, int n_src,
                                               int k, i64 row0, u64 select_key, const int* __restrict__ col_map,
                                               int k_out, int* __restrict__ out) {
    __shared__ u64 s_key[GPR_MAX_WARPS][K];
    __shared__ unsigned s_col[GPR_MAX_WARPS][K];
    __shared__ u64 s_tk[GPR_MAX_WARPS];
    __shared__ unsigned s_tc[GPR_MAX_WARPS];

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;       // warp within the row
    const int n_warps = blockDim.x >> 5;     // warps per row: 1, 2, 4 or 8
    const int first = threadIdx.y * n_warps;  // this row's first warp slot in the block
    const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
    const bool active = row < rows;  // inactive rows still reach every __syncthreads

    int x = 0, lo = 0, d = 0;
    u64 row_base = 0;
    if (active) {
        x = (int)phase[row];
        lo = (int)off_s[row];
        d = (int)deg[row];
        row_base = gpr_at(select_key, (u64)(row0 + row));
    }
    bool done = !active || d == 0;
    bool has_thr = false;  // pass 0 admits everything
    int listed = 0;        // banded: targets listed so far in this row (lane 0 of warp 0)
    u64 tk = 0;
    unsigned tc = 0;
    const int n_pass = (k + K - 1) / K;

    for (int pass = 0; pass < n_pass; ++pass) {
        u64 rk = ~0ULL;
        unsigned rc = GPR_SENT_COL;
        if (!done) {  // uniform over the row
            u64 key[K];
            unsigned col[K];
            gpr_topk_reset<K>(key, col);
            for (int q = threadIdx.x; q < d; q += blockDim.x) {
                const int p = cyc_add(lo, q, n_tgt);
                const int2 sl = ring_sl[p];
                if (cyc_sub(x, sl.x, n_src) < sl.y) {
                    const unsigned c = (unsigned)ring_col[p];
                    const u64 kk = gpr_at(row_base, (u64)c);
                    if (!has_thr || gpr_less(tk, tc, kk, c)) gpr_topk_offer<K>(key, col, kk, c);
                }
            }
            gpr_warp_merge<K>(key, col, lane, rk, rc);
        }
        if (n_warps > 1) {  // uniform over the block
            if (lane < K) {
                s_key[first + warp][lane] = rk;
                s_col[first + warp][lane] = rc;
            }
            __syncthreads();
            if (warp == 0 && !done) {
                // Lane w < n_warps walks warp w's ascending list; K rounds of arg-min.
                int idx = 0;
                rk = ~0ULL;
                rc = GPR_SENT_COL;
                for (int m = 0; m < K; ++m) {
                    u64 hk = ~0ULL;
                    unsigned hc = GPR_SENT_COL;
                    if (lane < n_warps && idx < K) {
                        hk = s_key[first + lane][idx];
                        hc = s_col[first + lane][idx];
                    }
                    const u64 mk = hk;
                    const unsigned mc = hc;
                    gpr_warp_min(hk, hc);
                    if (hc == GPR_SENT_COL) break;
                    if (lane == m) {
                        rk = hk;
                        rc = hc;
                    }
                    if (mk == hk && mc == hc) ++idx;
                }
            }
            if (warp == 0 && lane == K - 1) {
                s_tk[threadIdx.y] = rk;
                s_tc[threadIdx.y] = rc;
            }
            __syncthreads();
            if (!done) {
                tk = s_tk[threadIdx.y];
                tc = s_tc[threadIdx.y];
            }
        } else if (!done) {  // uniform over the warp
            tk = __shfl_sync(GPR_FULL_MASK, rk, K - 1);
            tc = __shfl_sync(GPR_FULL_MASK, rc, K - 1);
        }
        if (k_out > 0) {  // uniform over the kernel
            if (warp == 0 && active) listed = gpr_emit_distinct<K>(rc, lane, pass, k, k_out, listed, col_map,
                                                                   out + row * k_out);
        } else if (warp == 0 && active && lane < K) {
            const int pos = pass * K + lane;
            if (pos < k) out[row * k + pos] = rc == GPR_SENT_COL ? -1 : (int)rc;
        }
        // The K-th pair of this pass is the threshold of the next; none means the row is exhausted.
        if (!done) {
            if (tc == GPR_SENT_COL) done = true;
            has_thr = true;
        }
    }
    if (k_out > 0 && warp == 0 && active && lane == 0) {
        int* orow = out + row * k_out;
        if (d > 0 && listed < k_out) listed = gpr_complete_row(orow, listed, k_out, row_base, col_map, n_tgt);
        for (int q = listed; q < k_out; ++q) orow[q] = -1;
    }
}

#define GPR_PHASE_KERNEL(K)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, 2) gpr_phase_rows_k##K(                                      \
        const i64* __restrict__ phase, const i64* __restrict__ off_s, const i64* __restrict__ deg,                \
        const int2* __restrict__ ring_sl, const int* __restrict__ ring_col, int rows, int n_tgt, int n_src, int k, \
        i64 row0, u64 select_key, const int* __restrict__ col_map, int k_out, int* __restrict__ out) {             \
        gpr_phase_rows<K>(phase, off_s, deg, ring_sl, ring_col, rows, n_tgt, n_src, k, row0, select_key, col_map, \
                          k_out, out);                                                                            \
    }

GPR_PHASE_KERNEL(1)
GPR_PHASE_KERNEL(2)
GPR_PHASE_KERNEL(4)
GPR_PHASE_KERNEL(8)
GPR_PHASE_KERNEL(16)

// ---------------------------------------------------------------------------------------------
// Systematic router (SPEC §11): one thread per row. Slot targets are non-decreasing in slot
// order, so "already listed" means "equal to the last one listed".

extern "C" __global__ void __launch_bounds__(256)
gpr_systematic_rows(const i64* __restrict__ phase, const u64* __restrict__ cum, i64 rows, int n_tgt, i64 n_src, int k,
                    u64 phi, int* __restrict__ out) {
    const i64 row = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    const u64 big_u = cum[n_tgt];
    const u64 m = (u64)n_src * (u64)k;
    const u64 p = (u64)phase[row];
    int* o = out + row * k;
    int listed = 0;
    int last = -1;
    for (int s = 0; s < k; ++s) {
        const u64 x = (((u64)s * (u64)n_src + p) * big_u + phi) / m;
        // searchsorted(cum, x, side="right") - 1: the last t with cum[t] <= x (cum[0] = 0 <= x).
        int lo = 0, hi = n_tgt + 1;  // invariant: cum[lo] <= x, and cum[hi] > x or hi == n_tgt + 1
        while (hi - lo > 1) {
            const int mid = lo + ((hi - lo) >> 1);
            if (cum[mid] <= x) lo = mid;
            else hi = mid;
        }
        if (lo != last) {
            o[listed++] = lo;
            last = lo;
        }
    }
    for (int q = listed; q < k; ++q) o[q] = -1;
}
