// Crate-exact mode (SPEC.md §14): the crate phase_router_rs's per-row ChaCha8 reservoir, bit for bit.
// Compiled with phase_router.cu into one module (CuPy/NVRTC); run on the CPU by tests/simt in the tests.
// Same CUDA subset as phase_router.cu: no includes, no atomics, no floating point, full-mask collectives
// reached by every lane of the warp.
//
// One warp per row j. The row's ring positions are tested 32 at a time (one per lane) and the
// candidates found with a ballot, so they are visited in ring order with a running count:
//   * while count < k, candidates fill slots count, count + 1, ... (in parallel);
//   * after that, candidate number `count` takes the first accepted draw of
//     gen_range(0..=count) from the row's ChaCha8 stream (key = PCG32 expansion of seed + j): one
//     next_u64 per try, accepted when the low half of v * (count + 1) is <= the zone
//     ((count + 1) << leading_zeros(count + 1)) - 1, the draw being the high half; a draw < k replaces
//     that slot.
// Keystream: counter-based, so the 32 lanes compute 32 consecutive ChaCha8 blocks at once (256 draws)
// into shared memory. The accept/reject chain is sequential (a rejection shifts every later draw to
// the next candidate); it is walked up to 32 draws per round by speculation and repair: lane l
// holds draw d + l and tests it under each hypothesis "j of the draws before me were rejected"
// (candidate count + l - j), j = 0..GPR_CRATE_SPEC, one ballot per hypothesis. Following the
// hypotheses from lane 0 (the first rejection under hypothesis j moves the later lanes to j + 1)
// commits every draw up to the (GPR_CRATE_SPEC + 1)-th rejection: about (GPR_CRATE_SPEC + 1) /
// P(reject) draws per round (P(reject) is at most 1/2, about 0.3 on average), instead of one.

typedef unsigned long long u64;
typedef long long i64;

#ifndef GPR_FULL_MASK
#define GPR_FULL_MASK 0xffffffffu
#endif
// GPR_CRATE_ROWS, rows (warps) per block (blockDim = (32, GPR_CRATE_ROWS)), comes from the prelude.
#define GPR_CRATE_SPEC 3  // rejections speculated per round (hypotheses 0..GPR_CRATE_SPEC)

__device__ __forceinline__ unsigned gpr_rotl32(unsigned x, int r) { return (x << r) | (x >> (32 - r)); }

#define GPR_QR(a, b, c, d)                 \
    a += b; d = gpr_rotl32(d ^ a, 16);     \
    c += d; b = gpr_rotl32(b ^ c, 12);     \
    a += b; d = gpr_rotl32(d ^ a, 8);      \
    c += d; b = gpr_rotl32(b ^ c, 7);

// ChaCha8 block `ctr` (stream 0) for key `k`: its 16 output words into ks[w * 32 + lane].
__device__ __forceinline__ void gpr_chacha8_block(const unsigned* k, u64 ctr, unsigned* ks, int lane) {
    const unsigned s0 = 0x61707865u, s1 = 0x3320646eu, s2 = 0x79622d32u, s3 = 0x6b206574u;
    const unsigned s12 = (unsigned)ctr, s13 = (unsigned)(ctr >> 32);
    unsigned x0 = s0, x1 = s1, x2 = s2, x3 = s3, x4 = k[0], x5 = k[1], x6 = k[2], x7 = k[3];
    unsigned x8 = k[4], x9 = k[5], x10 = k[6], x11 = k[7], x12 = s12, x13 = s13, x14 = 0u, x15 = 0u;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        GPR_QR(x0, x4, x8, x12)
        GPR_QR(x1, x5, x9, x13)
        GPR_QR(x2, x6, x10, x14)
        GPR_QR(x3, x7, x11, x15)
        GPR_QR(x0, x5, x10, x15)
        GPR_QR(x1, x6, x11, x12)
        GPR_QR(x2, x7, x8, x13)
        GPR_QR(x3, x4, x9, x14)
    }
    ks[0 * 32 + lane] = x0 + s0;
    ks[1 * 32 + lane] = x1 + s1;
    ks[2 * 32 + lane] = x2 + s2;
    ks[3 * 32 + lane] = x3 + s3;
    ks[4 * 32 + lane] = x4 + k[0];
    ks[5 * 32 + lane] = x5 + k[1];
    ks[6 * 32 + lane] = x6 + k[2];
    ks[7 * 32 + lane] = x7 + k[3];
    ks[8 * 32 + lane] = x8 + k[4];
    ks[9 * 32 + lane] = x9 + k[5];
    ks[10 * 32 + lane] = x10 + k[6];
    ks[11 * 32 + lane] = x11 + k[7];
    ks[12 * 32 + lane] = x12 + s12;
    ks[13 * 32 + lane] = x13 + s13;
    ks[14 * 32 + lane] = x14;
    ks[15 * 32 + lane] = x15;
}

// rand_core's seed_from_u64: PCG32 steps expand the u64 seed into the 8 key words.
__device__ __forceinline__ void gpr_pcg32_key(u64 state, unsigned* k) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        state = state * 6364136223846793005ULL + 11634580027462260723ULL;
        const unsigned xs = (unsigned)(((state >> 18) ^ state) >> 27);
        const unsigned rot = (unsigned)(state >> 59);
        k[i] = (xs >> rot) | (xs << ((32u - rot) & 31u));
    }
}

// High 64 bits of the 128-bit product a * b (portable: the emulator runs the same code).
__device__ __forceinline__ u64 gpr_mulhi64(u64 a, u64 b) {
    const u64 a0 = a & 0xffffffffULL, a1 = a >> 32, b0 = b & 0xffffffffULL, b1 = b >> 32;
    const u64 t = a1 * b0 + ((a0 * b0) >> 32);
    const u64 w1 = (t & 0xffffffffULL) + a0 * b1;
    return a1 * b1 + (t >> 32) + (w1 >> 32);
}

// leading_zeros(x) for x >= 1.
__device__ __forceinline__ int gpr_clz64(u64 x) {
    x |= x >> 1;
    x |= x >> 2;
    x |= x >> 4;
    x |= x >> 8;
    x |= x >> 16;
    x |= x >> 32;
    return 64 - __popcll(x);
}

// Index of the lowest set bit of a non-zero mask.
__device__ __forceinline__ int gpr_low_bit(unsigned m) { return __popc((m & (0u - m)) - 1u); }

// Index of the (i+1)-th lowest set bit of m (i < popc(m)).
__device__ __forceinline__ int gpr_nth_bit(unsigned m, int i) {
    for (int q = 0; q < i; ++q) m &= m - 1u;
    return gpr_low_bit(m);
}

// Row j = row0 + (blockIdx.x * blockDim.y + threadIdx.y) of the crate's phase_router, into out[row * k ..].
// phase[i] = col_perm_t[j], off_s[i] its start on the target ring, deg[i] = ones_s[j] (may exceed n:
// the ring is then walked more than once, as the crate does); ring_sl[p] = (off_t, ones_t) of the
// column ring_col[p] = inv_perm_s[p] at ring position p.
extern "C" __global__ void __launch_bounds__(32 * GPR_CRATE_ROWS)
gpr_crate_rows(const i64* __restrict__ phase, const i64* __restrict__ off_s, const i64* __restrict__ deg,
              const int2* __restrict__ ring_sl, const int* __restrict__ ring_col, int rows, int n, int k, i64 row0,
              u64 seed, int* __restrict__ out) {
    __shared__ unsigned gpr_crate_ks[GPR_CRATE_ROWS][16 * 32];  // 32 keystream blocks, word-major
    const int lane = threadIdx.x;
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;  // warp-uniform
    unsigned* ks = gpr_crate_ks[threadIdx.y];
    int* orow = out + (i64)row * k;
    for (int q = lane; q < k; q += 32) orow[q] = -1;
    __syncwarp();  // these stores before the fill's: a slot is cleared and filled by different lanes

    unsigned key[8];
    gpr_pcg32_key(seed + (u64)(row0 + row), key);
    u64 next_block = 0;  // next keystream block to generate
    int d = 0, nd = 0;   // next draw in ks, draws held in ks (8 per block)

    const int x = (int)phase[row];
    int p = (int)off_s[row];
    i64 left = deg[row];
    i64 count = 0;
    while (left > 0) {  // warp-uniform
        const int m = left < 32 ? (int)left : 32;
        const int pp = (int)(((i64)p + lane) % n);
        bool cand = false;
        int col = -1;
        if (lane < m) {
            const int2 sl = ring_sl[pp];
            int diff = x - sl.x;
            if (diff < 0) diff += n;
            cand = diff < sl.y;
            if (cand) col = ring_col[pp];
        }
        unsigned mask = __ballot_sync(GPR_FULL_MASK, cand);
        left -= m;
        p = (int)(((i64)p + m) % n);

        if (count < k && mask) {  // fill: the next candidates take the free slots in order
            const int free_slots = (i64)(k - count) < 32 ? (int)(k - count) : 32;
            const int rank = __popc(mask & ((1u << lane) - 1u));
            if (cand && rank < free_slots) orow[count + rank] = col;
            const int taken = __popc(mask) < free_slots ? __popc(mask) : free_slots;
            for (int q = 0; q < taken; ++q) mask &= mask - 1u;
            count += taken;
            __syncwarp();  // the fill's stores before lane 0's replacements below
        }
        while (mask) {  // reservoir: one accepted draw per remaining candidate, in ring order
            if (d == nd) {  // all lanes have read ks: refill it with the next 32 blocks
                __syncwarp();
                gpr_chacha8_block(key, next_block + (u64)lane, ks, lane);
                next_block += 32;
                d = 0;
                nd = 256;
                __syncwarp();
            }
            const int left_c = __popc(mask);
            int w = nd - d;  // lanes holding a draw this round
            if (w > left_c + GPR_CRATE_SPEC) w = left_c + GPR_CRATE_SPEC;
            if (w > 32) w = 32;
            u64 v = 0;
            if (lane < w) {
                const int dd = d + lane;
                const int b = dd >> 3, wd = (dd & 7) << 1;
                v = (u64)ks[wd * 32 + b] | ((u64)ks[(wd + 1) * 32 + b] << 32);
            }
            // Hypothesis j: j draws before this lane were rejected, so the lane's draw belongs to
            // candidate lane - j. rej[j] = lanes whose draw is rejected under hypothesis j.
            unsigned rej[GPR_CRATE_SPEC + 1];
#pragma unroll
            for (int j = 0; j <= GPR_CRATE_SPEC; ++j) {
                bool reject = false;
                if (lane < w && lane >= j && lane - j < left_c) {
                    const u64 range = (u64)count + 1ULL + (u64)(lane - j);
                    reject = v * range > (range << gpr_clz64(range)) - 1ULL;
                }
                rej[j] = __ballot_sync(GPR_FULL_MASK, reject);
            }
            // Resolve (warp-uniform): follow the hypotheses from lane 0; the first rejection under
            // hypothesis j moves the lanes after it to hypothesis j + 1.
            int fpos[GPR_CRATE_SPEC + 1];
#pragma unroll
            for (int j = 0; j <= GPR_CRATE_SPEC; ++j) fpos[j] = 32;
            int end = 0, pos = 0, nrej = 0;
#pragma unroll
            for (int j = 0; j <= GPR_CRATE_SPEC; ++j) {
                if (j == nrej) {  // still resolving
                    const int lim = w < left_c + j ? w : left_c + j;  // lanes that can hold a candidate
                    const unsigned below = lim >= 32 ? 0xffffffffu : ((1u << lim) - 1u);
                    const unsigned from = pos >= 32 ? 0u : ~((1u << pos) - 1u);
                    const unsigned bits = rej[j] & below & from;
                    if (bits == 0u) {
                        end = lim;  // lanes pos .. lim-1 accepted under hypothesis j
                    } else {
                        fpos[j] = gpr_low_bit(bits);
                        pos = fpos[j] + 1;
                        end = pos;
                        ++nrej;
                    }
                }
            }
            // Per lane: its hypothesis (rejections before it), whether its draw was accepted, its value.
            int jl = 0;
            bool rejected = false;
#pragma unroll
            for (int j = 0; j <= GPR_CRATE_SPEC; ++j) {
                jl += fpos[j] < lane ? 1 : 0;
                rejected = rejected || fpos[j] == lane;
            }
            const bool accepted = lane < end && !rejected;
            const int rel = lane - jl;  // candidate index among the remaining ones
            u64 r = 0;
            if (accepted) r = gpr_mulhi64(v, (u64)count + 1ULL + (u64)rel);
            unsigned hits = __ballot_sync(GPR_FULL_MASK, accepted && r < (u64)k);
            while (hits) {  // rare once count >> k; in candidate order so a later one overwrites
                const int h = gpr_low_bit(hits);
                hits &= hits - 1u;
                const u64 rh = __shfl_sync(GPR_FULL_MASK, r, h);
                const int relh = __shfl_sync(GPR_FULL_MASK, rel, h);
                const int ch = __shfl_sync(GPR_FULL_MASK, col, gpr_nth_bit(mask, relh));
                if (lane == 0) orow[rh] = ch;
            }
            const int taken = end - nrej;  // accepted draws = candidates done
            for (int q = 0; q < taken; ++q) mask &= mask - 1u;
            count += taken;
            d += end;
        }
    }
}
