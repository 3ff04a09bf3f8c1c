// Probe kernels for the (key, column) order of SPEC §5 in phase_router.cu's device code
// (tests/test_tie_order.py). Compiled after phase_router.cu, so they call its templates directly.

#define GPR_PROBE_K 4

// One thread offers the n pairs (keys[i], cols[i]) to gpr_topk_offer and writes its ascending list.
extern "C" __global__ void probe_topk(const u64* keys, const unsigned* cols, int n, u64* out_keys, unsigned* out_cols) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    u64 key[GPR_PROBE_K];
    unsigned col[GPR_PROBE_K];
    gpr_topk_reset<GPR_PROBE_K>(key, col);
    for (int i = 0; i < n; ++i) gpr_topk_offer<GPR_PROBE_K>(key, col, keys[i], cols[i]);
    for (int j = 0; j < GPR_PROBE_K; ++j) {
        out_keys[j] = key[j];
        out_cols[j] = col[j];
    }
}

// One warp: lane l offers pairs l * per_lane .. l * per_lane + per_lane - 1 to its own list, then
// gpr_warp_merge; lane m < K writes the warp's m-th smallest pair.
extern "C" __global__ void probe_warp_merge(const u64* keys, const unsigned* cols, int per_lane, u64* out_keys,
                                            unsigned* out_cols) {
    const int lane = threadIdx.x & 31;
    u64 key[GPR_PROBE_K];
    unsigned col[GPR_PROBE_K];
    gpr_topk_reset<GPR_PROBE_K>(key, col);
    for (int i = 0; i < per_lane; ++i) gpr_topk_offer<GPR_PROBE_K>(key, col, keys[lane * per_lane + i],
                                                                    cols[lane * per_lane + i]);
    u64 rk;
    unsigned rc;
    gpr_warp_merge<GPR_PROBE_K>(key, col, lane, rk, rc);
    if (lane < GPR_PROBE_K) {
        out_keys[lane] = rk;
        out_cols[lane] = rc;
    }
}
