// C entry point of the emulator library. The generated translation unit includes simt.h, the kernel
// sources and then this file, after defining `simt_entries` (one simt::make_entry per kernel).

#pragma once

#include <cstring>

namespace simt {

struct Launch {
    const Entry* entry;
    uint3 grid, block;
    void** args;
    int schedule;
    unsigned long long seed;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::string error;
    std::atomic_flag error_lock = ATOMIC_FLAG_INIT;
};

inline void worker(Launch& L) {
    Block b;
    const int n = static_cast<int>(L.block.x * L.block.y * L.block.z);
    if (!alloc_stacks(b, n)) {
        if (!L.error_lock.test_and_set()) L.error = "cannot allocate thread stacks";
        L.failed = true;
        return;
    }
    b.grid_dim = L.grid;
    b.block_dim = L.block;
    b.schedule = L.schedule;
    b.body = L.entry->body;
    b.fn = reinterpret_cast<void*>(L.entry->fn);
    b.args = L.args;
    const unsigned long long total = 1ULL * L.grid.x * L.grid.y * L.grid.z;
    for (;;) {
        const unsigned long long i = L.next.fetch_add(1);
        if (i >= total || L.failed) break;
        b.block_idx = uint3{static_cast<unsigned>(i % L.grid.x), static_cast<unsigned>((i / L.grid.x) % L.grid.y),
                            static_cast<unsigned>(i / (1ULL * L.grid.x * L.grid.y))};
        b.rng = (L.seed ^ (i * 0x9E3779B97F4A7C15ULL)) | 1ULL;
        if (!run_block(b)) {
            if (!L.error_lock.test_and_set()) {
                L.error = std::string(L.entry->name) + " block (" + std::to_string(b.block_idx.x) + "," +
                          std::to_string(b.block_idx.y) + "," + std::to_string(b.block_idx.z) + "): " + b.error;
            }
            L.failed = true;
            break;
        }
    }
    free_stacks(b);
}

}  // namespace simt

// Launch kernel `name` on grid x block (3 values each) with cuLaunchKernel-style `args` (pointers to
// the parameter values) whose types must match `sig`. Returns 0, or 1 with a message in `err`.
extern "C" int simt_launch(const char* name, const unsigned* grid, const unsigned* block, void** args, const char* sig,
                           int schedule, unsigned long long seed, int workers, char* err, int err_len) {
    auto report = [&](const std::string& msg) {
        std::snprintf(err, static_cast<size_t>(err_len), "%s", msg.c_str());
        return 1;
    };
    const simt::Entry* entry = nullptr;
    for (const simt::Entry& e : simt_entries)
        if (std::strcmp(e.name, name) == 0) entry = &e;
    if (!entry) return report(std::string("no kernel named ") + name);
    if (entry->sig != sig) {
        return report(std::string(name) + ": argument types " + sig + " do not match the kernel's parameters " +
                      entry->sig + " (p pointer, i/I int32, l/L int64)");
    }
    const unsigned long long threads = 1ULL * block[0] * block[1] * block[2];
    if (threads < 1 || threads > 1024 || block[2] > 64) return report(std::string(name) + ": bad block shape");
    if (grid[0] < 1 || grid[1] < 1 || grid[2] < 1 || grid[1] > 65535 || grid[2] > 65535 || grid[0] > 0x7fffffffu) {
        return report(std::string(name) + ": bad grid shape");
    }
    simt::Launch L;
    L.entry = entry;
    L.grid = simt::uint3{grid[0], grid[1], grid[2]};
    L.block = simt::uint3{block[0], block[1], block[2]};
    L.args = args;
    L.schedule = schedule;
    L.seed = seed;
    const unsigned long long total = 1ULL * grid[0] * grid[1] * grid[2];
    unsigned long long nw = workers < 1 ? 1 : static_cast<unsigned long long>(workers);
    if (nw > total) nw = total;
    if (nw <= 1) {
        simt::worker(L);
    } else {
        std::vector<std::thread> pool;
        for (unsigned long long w = 0; w < nw; ++w) pool.emplace_back([&L] { simt::worker(L); });
        for (std::thread& t : pool) t.join();
    }
    if (L.failed) return report(L.error);
    return 0;
}

// Names of the kernels in this library, separated by spaces.
extern "C" const char* simt_kernels() {
    static std::string names;
    if (names.empty())
        for (const simt::Entry& e : simt_entries) names += std::string(e.name) + " ";
    return names.c_str();
}
