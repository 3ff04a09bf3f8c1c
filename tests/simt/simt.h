// A small SIMT emulator: runs CUDA kernel source, unchanged, on the CPU (g++ -std=c++17 -include simt.h).
//
// Every CUDA thread of a block is a fiber (its own stack) on one OS thread; fibers switch only at
// collectives (__syncthreads, __syncwarp, shuffles, ballots), so between two collectives each
// thread runs alone, as with independent thread scheduling. Warps are groups of 32 consecutive
// linear thread ids; a shuffle writes the lane's value to a per-warp exchange slot (double
// buffered), waits at a warp barrier and reads the source lane's slot. Blocks run one after the
// other on each of a few worker threads; __shared__ becomes `static thread_local`, i.e. one copy per
// worker, which is per block since a worker runs one block at a time.
//
// Supported subset (the kernels must keep to it; anything else fails to compile or is reported):
//   __global__ __device__ __host__ __forceinline__ __noinline__ __launch_bounds__(...) __shared__
//   (static arrays), __align__, threadIdx blockIdx blockDim gridDim warpSize, int2 / make_int2,
//   __syncthreads, __syncwarp, __shfl_sync / __shfl_xor_sync / __shfl_up_sync / __shfl_down_sync
//   (types of 1..8 bytes, any width that is a power of two), __ballot_sync, __all_sync,
//   __any_sync, __popc, __popcll, __ldg.
// Checked at run time (the launch fails with a message instead of silently passing):
//   collectives need the full mask 0xffffffff on a full warp; every lane of the warp must reach the
//   same kind of collective (same operation and operand size); a barrier that can never complete
//   (a thread exited or waits elsewhere) is a deadlock.
// Not emulated: atomics, dynamic shared memory, cooperative groups, memory fences/ordering between
// blocks (blocks never run concurrently with themselves), floating-point intrinsics, textures.
//
// Scheduling can be round-robin (ascending or descending thread order) or pseudo-random at every
// collective, so a missing __syncthreads shows up as a wrong result under some order.

#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if !defined(__x86_64__) && !defined(SIMT_UCONTEXT)
#define SIMT_UCONTEXT 1
#endif
#ifdef SIMT_UCONTEXT
#include <ucontext.h>
#endif

struct alignas(8) int2 {
    int x, y;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }

namespace simt {

struct uint3 {
    unsigned x, y, z;
};
using dim3 = uint3;

enum class State : unsigned char { Runnable, WaitWarp, WaitBlock, Done };

enum Op : unsigned { OpIdx = 1, OpXor, OpUp, OpDown, OpBallot, OpSyncwarp };

struct Fiber {
#ifdef SIMT_UCONTEXT
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
    char* stack = nullptr;
    uint3 tid{0, 0, 0};
    int warp = 0, lane = 0;
    State state = State::Runnable;
    unsigned seq = 0;  // collectives this thread has reached in the current block
};

struct Warp {
    int size = 0, arrived = 0;
    unsigned long long val[2][32];
    unsigned tag[2][32];
};

struct Block;
using Body = void (*)(void* fn, void** args);

struct Block {
    uint3 grid_dim{1, 1, 1}, block_dim{1, 1, 1}, block_idx{0, 0, 0};
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int block_arrived = 0;
    int current = -1;
    int done = 0;
    int schedule = 0;  // 0 ascending, 1 descending, 2 pseudo-random
    unsigned long long rng = 0;
    Body body = nullptr;
    void* fn = nullptr;
    void** args = nullptr;
    bool failed = false;
    std::string error;
#ifdef SIMT_UCONTEXT
    ucontext_t sched;
#else
    void* sched_sp = nullptr;
#endif
    char* stack_mem = nullptr;
    size_t stack_bytes = 0, stack_total = 0;
};

inline thread_local Block* tls_block = nullptr;

constexpr size_t kStack = 128 * 1024;  // per thread, plus one guard page below

#ifndef SIMT_UCONTEXT
extern "C" void simt_switch_ctx(void** save_sp, void* new_sp);
asm(R"(
.text
.globl simt_switch_ctx
.hidden simt_switch_ctx
.type simt_switch_ctx,@function
simt_switch_ctx:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size simt_switch_ctx, .-simt_switch_ctx
)");
#endif

[[noreturn]] inline void fiber_main();

inline void switch_fibers(Block& b, int from, int to) {  // -1 = the scheduler
    b.current = to;
#ifdef SIMT_UCONTEXT
    ucontext_t* save = from < 0 ? &b.sched : &b.fibers[from].uc;
    ucontext_t* next = to < 0 ? &b.sched : &b.fibers[to].uc;
    swapcontext(save, next);
#else
    void** save = from < 0 ? &b.sched_sp : &b.fibers[from].sp;
    void* next = to < 0 ? b.sched_sp : b.fibers[to].sp;
    simt_switch_ctx(save, next);
#endif
}

inline unsigned long long next_random(Block& b) {  // xorshift64*
    b.rng ^= b.rng >> 12;
    b.rng ^= b.rng << 25;
    b.rng ^= b.rng >> 27;
    return b.rng * 0x2545F4914F6CDD1DULL;
}

// Abort the block: record the message and return to the scheduler for good.
[[noreturn]] inline void fail(Block& b, const std::string& msg) {
    if (!b.failed) {
        b.failed = true;
        b.error = msg;
    }
    switch_fibers(b, b.current, -1);
    std::abort();  // never resumed
}

// Run another runnable thread (or the scheduler when all are done). The caller is not runnable.
inline void yield_next(Block& b) {
    const int n = static_cast<int>(b.fibers.size());
    const int cur = b.current;
    int start = cur;
    if (b.schedule == 2) start = static_cast<int>(next_random(b) % static_cast<unsigned long long>(n));
    for (int i = 1; i <= n; ++i) {
        int j = b.schedule == 1 ? ((start - i) % n + n) % n : (start + i) % n;
        if (b.fibers[j].state == State::Runnable) {
            if (j != cur) switch_fibers(b, cur, j);
            return;
        }
    }
    if (b.done == n) {
        switch_fibers(b, cur, -1);
        std::abort();  // a finished thread is never resumed
    }
    fail(b, "deadlock: threads wait at a barrier that can never complete (a thread of the warp/block exited "
            "or waits at a different barrier)");
}

inline void maybe_shuffle_order(Block& b) {  // random schedule: let someone else go first
    if (b.schedule == 2 && (next_random(b) & 1)) yield_next(b);
}

inline void warp_barrier(Block& b) {
    Fiber& f = b.fibers[b.current];
    Warp& w = b.warps[f.warp];
    if (++w.arrived == w.size) {
        w.arrived = 0;
        const int base = f.warp * 32;
        for (int l = 0; l < w.size; ++l)
            if (b.fibers[base + l].state == State::WaitWarp) b.fibers[base + l].state = State::Runnable;
        maybe_shuffle_order(b);
        return;
    }
    f.state = State::WaitWarp;
    yield_next(b);
}

inline void block_barrier(Block& b) {
    Fiber& f = b.fibers[b.current];
    if (++b.block_arrived == static_cast<int>(b.fibers.size())) {
        b.block_arrived = 0;
        for (Fiber& g : b.fibers)
            if (g.state == State::WaitBlock) g.state = State::Runnable;
        maybe_shuffle_order(b);
        return;
    }
    f.state = State::WaitBlock;
    yield_next(b);
}

inline void check_mask(Block& b, unsigned mask, const char* what) {
    Fiber& f = b.fibers[b.current];
    if (mask != 0xffffffffu) fail(b, std::string(what) + ": only the full mask 0xffffffff is emulated");
    if (b.warps[f.warp].size != 32) fail(b, std::string(what) + ": collectives need a full warp of 32 threads");
}

// Publish `bits` under `tag`, wait for the whole warp, check that every lane reached the same kind of
// collective. Returns the exchange row (valid until the next-but-one collective).
inline unsigned long long* exchange(Block& b, unsigned long long bits, unsigned tag, const char* what) {
    const int me = b.current;
    Fiber& f = b.fibers[me];
    Warp& w = b.warps[f.warp];
    const int buf = static_cast<int>(f.seq++ & 1u);
    w.val[buf][f.lane] = bits;
    w.tag[buf][f.lane] = tag;
    warp_barrier(b);
    for (int l = 0; l < 32; ++l) {
        if (w.tag[buf][l] != tag) {
            fail(b, std::string(what) + ": lanes of warp " + std::to_string(f.warp) +
                        " reached different collectives (divergent control flow)");
        }
    }
    return w.val[buf];
}

template <class T>
inline T shuffle(unsigned mask, T var, unsigned op, int arg, int width, const char* what) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle operands are 1..8 bytes");
    Block& b = *tls_block;
    check_mask(b, mask, what);
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail(b, std::string(what) + ": bad width");
    unsigned long long bits = 0;
    std::memcpy(&bits, &var, sizeof(T));
    const int lane = b.fibers[b.current].lane;
    unsigned long long* row = exchange(b, bits, op * 16u + static_cast<unsigned>(sizeof(T)), what);
    const int seg = lane & ~(width - 1), li = lane & (width - 1);
    int src = lane;
    switch (op) {
        case OpIdx: src = seg + (arg & (width - 1)); break;
        case OpXor: src = ((li ^ arg) < width) ? seg + (li ^ arg) : lane; break;
        case OpUp: src = (li - arg >= 0) ? lane - arg : lane; break;
        case OpDown: src = (li + arg < width) ? lane + arg : lane; break;
        default: break;
    }
    T out;
    std::memcpy(&out, &row[src], sizeof(T));
    return out;
}

inline unsigned ballot(unsigned mask, int pred, const char* what) {
    Block& b = *tls_block;
    check_mask(b, mask, what);
    unsigned long long* row = exchange(b, pred ? 1ULL : 0ULL, OpBallot * 16u, what);
    unsigned out = 0;
    for (int l = 0; l < 32; ++l) out |= static_cast<unsigned>(row[l] & 1ULL) << l;
    return out;
}

[[noreturn]] inline void fiber_main() {
    Block& b = *tls_block;
    b.body(b.fn, b.args);
    b.fibers[b.current].state = State::Done;
    ++b.done;
    yield_next(b);
    std::abort();
}

#ifndef SIMT_UCONTEXT
inline void* init_stack(char* base, size_t size) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~static_cast<uintptr_t>(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                   // fake return address of fiber_main (alignment)
    *--sp = reinterpret_cast<void*>(&fiber_main);      // where simt_switch_ctx's `ret` goes
    for (int i = 0; i < 6; ++i) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
    return sp;
}
#endif

// Allocate guarded stacks for `n` threads (reused across the blocks a worker runs).
inline bool alloc_stacks(Block& b, int n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    b.stack_bytes = kStack + page;
    b.stack_total = b.stack_bytes * static_cast<size_t>(n);
    void* mem = mmap(nullptr, b.stack_total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
    if (mem == MAP_FAILED) return false;
    b.stack_mem = static_cast<char*>(mem);
    for (int i = 0; i < n; ++i) mprotect(b.stack_mem + b.stack_bytes * static_cast<size_t>(i), page, PROT_NONE);
    b.fibers.assign(static_cast<size_t>(n), Fiber{});
    for (int i = 0; i < n; ++i) b.fibers[static_cast<size_t>(i)].stack = b.stack_mem + b.stack_bytes * i + page;
    return true;
}

inline void free_stacks(Block& b) {
    if (b.stack_mem) munmap(b.stack_mem, b.stack_total);
    b.stack_mem = nullptr;
}

// Run one block to completion (or failure). Returns false on failure (message in b.error).
inline bool run_block(Block& b) {
    const int n = static_cast<int>(b.fibers.size());
    const uint3 bd = b.block_dim;
    for (int i = 0; i < n; ++i) {
        Fiber& f = b.fibers[static_cast<size_t>(i)];
        f.tid = uint3{static_cast<unsigned>(i) % bd.x, (static_cast<unsigned>(i) / bd.x) % bd.y,
                      static_cast<unsigned>(i) / (bd.x * bd.y)};
        f.warp = i / 32;
        f.lane = i % 32;
        f.state = State::Runnable;
        f.seq = 0;
#ifdef SIMT_UCONTEXT
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = f.stack;
        f.uc.uc_stack.ss_size = kStack;
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, reinterpret_cast<void (*)()>(&fiber_main), 0);
#else
        f.sp = init_stack(f.stack, kStack);
#endif
    }
    b.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
    for (int w = 0; w < static_cast<int>(b.warps.size()); ++w) {
        b.warps[static_cast<size_t>(w)].size = n - 32 * w < 32 ? n - 32 * w : 32;
    }
    b.block_arrived = 0;
    b.done = 0;
    tls_block = &b;
    int first = 0;
    if (b.schedule == 1) first = n - 1;
    if (b.schedule == 2) first = static_cast<int>(next_random(b) % static_cast<unsigned long long>(n));
    switch_fibers(b, -1, first);
    tls_block = nullptr;
    return !b.failed;
}

struct Entry {
    const char* name;
    std::string sig;  // one code per parameter: p pointer, i/I int32, l/L int64, b/B 8-bit, h/H 16-bit
    void (*fn)();
    Body body;
};

template <class T>
constexpr char type_code() {
    if constexpr (std::is_pointer<T>::value) return 'p';
    else if constexpr (std::is_integral<T>::value) {
        constexpr bool s = std::is_signed<T>::value;
        if constexpr (sizeof(T) == 1) return s ? 'b' : 'B';
        else if constexpr (sizeof(T) == 2) return s ? 'h' : 'H';
        else if constexpr (sizeof(T) == 4) return s ? 'i' : 'I';
        else return s ? 'l' : 'L';
    } else {
        static_assert(sizeof(T) == 0, "unsupported kernel parameter type");
        return '?';
    }
}

template <class... A, size_t... I>
inline void call_kernel(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

template <class... A>
inline void body_of(void* fn, void** args) {
    call_kernel(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
}

template <class... A>
inline Entry make_entry(const char* name, void (*f)(A...)) {
    return Entry{name, std::string{type_code<A>()...}, reinterpret_cast<void (*)()>(f), &body_of<A...>};
}

}  // namespace simt

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define __align__(n) alignas(n)

#define threadIdx (::simt::tls_block->fibers[static_cast<size_t>(::simt::tls_block->current)].tid)
#define blockIdx (::simt::tls_block->block_idx)
#define blockDim (::simt::tls_block->block_dim)
#define gridDim (::simt::tls_block->grid_dim)
#define warpSize 32

inline void __syncthreads() { ::simt::block_barrier(*::simt::tls_block); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::simt::Block& b = *::simt::tls_block;
    ::simt::check_mask(b, mask, "__syncwarp");
    ::simt::exchange(b, 0, ::simt::OpSyncwarp * 16u, "__syncwarp");
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int src, int width = 32) {
    return ::simt::shuffle(mask, var, ::simt::OpIdx, src, width, "__shfl_sync");
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
    return ::simt::shuffle(mask, var, ::simt::OpXor, lane_mask, width, "__shfl_xor_sync");
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::simt::shuffle(mask, var, ::simt::OpUp, static_cast<int>(delta), width, "__shfl_up_sync");
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    return ::simt::shuffle(mask, var, ::simt::OpDown, static_cast<int>(delta), width, "__shfl_down_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::simt::ballot(mask, pred, "__ballot_sync"); }
inline int __all_sync(unsigned mask, int pred) { return ::simt::ballot(mask, pred, "__all_sync") == 0xffffffffu; }
inline int __any_sync(unsigned mask, int pred) { return ::simt::ballot(mask, pred, "__any_sync") != 0u; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
template <class T>
inline T __ldg(const T* p) { return *p; }
