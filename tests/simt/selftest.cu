// Kernels that exercise the SIMT emulator itself (tests/test_simt_emulator.py): shuffle and ballot
// semantics, per-block shared memory, barriers, and the misuse the emulator must report.

typedef unsigned long long u64;

// out[tid * 12 + j]: shuffles of the value 100 * tid + 7 for widths 32, 16, 8 (idx, xor, up, down each).
extern "C" __global__ void st_shuffles(int src, int lane_mask, unsigned delta, int* out) {
    const int tid = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = 100 * tid + 7;
    int* o = out + tid * 12;
    const int widths[3] = {32, 16, 8};
    for (int w = 0; w < 3; ++w) {
        o[4 * w + 0] = __shfl_sync(0xffffffffu, v, src, widths[w]);
        o[4 * w + 1] = __shfl_xor_sync(0xffffffffu, v, lane_mask, widths[w]);
        o[4 * w + 2] = __shfl_up_sync(0xffffffffu, v, delta, widths[w]);
        o[4 * w + 3] = __shfl_down_sync(0xffffffffu, v, delta, widths[w]);
    }
}

// 64-bit shuffles keep all bits.
extern "C" __global__ void st_shuffle64(const u64* in, u64* out) {
    const int tid = blockIdx.x * blockDim.x + threadIdx.x;
    out[tid] = __shfl_xor_sync(0xffffffffu, in[tid], 1);
}

// out[warp] = ballot of pred; out2[tid] = all/any.
extern "C" __global__ void st_ballot(const int* pred, unsigned* out, int* all_any) {
    const int tid = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned b = __ballot_sync(0xffffffffu, pred[tid]);
    const int a = __all_sync(0xffffffffu, pred[tid]);
    const int y = __any_sync(0xffffffffu, pred[tid]);
    if ((threadIdx.x & 31) == 0) out[tid / 32] = b;
    all_any[tid] = 2 * a + y;
    __syncwarp();
}

// Shared-memory tree sum per block (blockDim.x <= 256, a power of two); out[block] = sum.
extern "C" __global__ void st_block_sum(const int* in, int* out) {
    __shared__ int s[256];
    const int t = threadIdx.x;
    s[t] = in[blockIdx.x * blockDim.x + t];
    __syncthreads();
    for (int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (t < h) s[t] += s[t + h];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// Thread 0 publishes a value that every thread reads; `sync` selects __syncthreads (correct)
// or only __syncwarp (a race: other warps may read before thread 0 wrote).
extern "C" __global__ void st_publish(int sync, int* out) {
    __shared__ int s_val;
    if (threadIdx.x == 0) s_val = 1000 + blockIdx.x;
    if (sync) __syncthreads();
    else __syncwarp();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s_val;
    if (sync) __syncthreads();
    else __syncwarp();
    if (threadIdx.x == 0) s_val = -1;  // the next block must not see a valid value early either
}

extern "C" __global__ void st_divergent(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_sync(0xffffffffu, v, 0);
    else v = (int)__ballot_sync(0xffffffffu, 1);
    out[threadIdx.x] = v;
}

extern "C" __global__ void st_deadlock(int* out) {
    if (threadIdx.x == 0) return;
    __syncthreads();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void st_partial_mask(int* out) {
    out[threadIdx.x] = __shfl_sync(0x0000ffffu, (int)threadIdx.x, 0);
}

extern "C" __global__ void st_dims(int* out) {
    const int t = ((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * (blockDim.x * blockDim.y * blockDim.z) +
                  (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    out[4 * t + 0] = threadIdx.x + 10 * threadIdx.y + 100 * threadIdx.z;
    out[4 * t + 1] = blockIdx.x + 10 * blockIdx.y + 100 * blockIdx.z;
    out[4 * t + 2] = blockDim.x + 10 * blockDim.y + 100 * blockDim.z;
    out[4 * t + 3] = gridDim.x + 10 * gridDim.y + 100 * gridDim.z + 1000 * warpSize;
}

extern "C" __global__ void st_popc(const u64* in, int* out) {
    const int t = threadIdx.x;
    out[2 * t] = __popcll(in[t]);
    out[2 * t + 1] = __popc((unsigned)in[t]);
}
