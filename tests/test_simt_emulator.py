"""Self-tests of the CPU SIMT emulator (tests/simt): the CUDA semantics the kernels rely on, and the
misuse it must report instead of passing silently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from simt import build
from simt.emulated_backend import EmulatedLauncher, EmulatorError

SELFTEST = Path(__file__).resolve().parent / "simt" / "selftest.cu"
SCHEDULES = [(0, 0), (1, 0), (2, 1), (2, 2)]


@pytest.fixture(scope="module", params=["default", "ucontext"])
def lib(request):
    """The emulator with its default context switch (hand-written on x86-64) and with the portable
    ucontext fallback used on other architectures."""
    try:
        return build.load([SELFTEST], extra_flags=("-DSIMT_UCONTEXT",) if request.param == "ucontext" else ())
    except build.CompilerMissing as exc:
        pytest.skip(str(exc))


def launcher(lib, schedule=0, seed=0):
    return EmulatedLauncher(schedule=schedule, seed=seed, lib=lib)


def cuda_shuffle_model(values, op, arg, width):
    """CUDA semantics of __shfl*_sync on one full warp (per the CUDA programming guide)."""
    out = []
    for lane in range(32):
        seg, li = lane & ~(width - 1), lane & (width - 1)
        if op == "idx":
            src = seg + (arg % width)
        elif op == "xor":
            src = seg + (li ^ arg) if (li ^ arg) < width else lane
        elif op == "up":
            src = lane - arg if li - arg >= 0 else lane
        else:
            src = lane + arg if li + arg < width else lane
        out.append(values[src])
    return out


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
@pytest.mark.parametrize("src,lane_mask,delta", [(0, 1, 1), (5, 16, 3), (31, 7, 8), (40, 3, 0), (17, 31, 31)])
def test_shuffles_match_cuda_semantics(lib, schedule, seed, src, lane_mask, delta):
    warps = 3
    out = np.full(32 * warps * 12, -1, dtype=np.int32)
    launcher(lib, schedule, seed)(
        "st_shuffles", (1, 1, 1), (32 * warps, 1, 1), (np.int32(src), np.int32(lane_mask), np.uint32(delta), out)
    )
    out = out.reshape(warps, 32, 3, 4)
    for w in range(warps):
        vals = [100 * (32 * w + lane) + 7 for lane in range(32)]
        for wi, width in enumerate((32, 16, 8)):
            for oi, (op, arg) in enumerate((("idx", src), ("xor", lane_mask), ("up", delta), ("down", delta))):
                if op == "xor" and arg >= width:
                    continue  # outside the segment: CUDA leaves this case to the hardware
                assert out[w, :, wi, oi].tolist() == cuda_shuffle_model(vals, op, arg, width), (op, width)


def test_shuffle_64bit(lib):
    x = np.array([(0xDEADBEEF12345678 * (i + 1)) & ((1 << 64) - 1) for i in range(64)], dtype=np.uint64)
    out = np.zeros(64, dtype=np.uint64)
    launcher(lib)("st_shuffle64", (2, 1, 1), (32, 1, 1), (x, out))
    assert np.array_equal(out, x.reshape(-1, 2)[:, ::-1].reshape(-1))


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_ballot_all_any(lib, schedule, seed):
    rng = np.random.default_rng(3)
    pred = (rng.random(128) < 0.5).astype(np.int32)
    pred[32:64] = 1
    pred[64:96] = 0
    out = np.zeros(4, dtype=np.uint32)
    all_any = np.zeros(128, dtype=np.int32)
    launcher(lib, schedule, seed)("st_ballot", (2, 1, 1), (64, 1, 1), (pred, out, all_any))
    for w in range(4):
        p = pred[32 * w : 32 * w + 32]
        assert int(out[w]) == sum(int(b) << i for i, b in enumerate(p))
        assert (all_any[32 * w : 32 * w + 32] == 2 * int(p.all()) + int(p.any())).all()


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
@pytest.mark.parametrize("threads", [32, 64, 256])
def test_shared_memory_is_per_block(lib, schedule, seed, threads):
    blocks = 9
    x = np.arange(blocks * threads, dtype=np.int32) % 97
    out = np.zeros(blocks, dtype=np.int32)
    launcher(lib, schedule, seed)("st_block_sum", (blocks, 1, 1), (threads, 1, 1), (x, out))
    assert np.array_equal(out, x.reshape(blocks, threads).sum(axis=1))


@pytest.mark.parametrize("schedule,seed", SCHEDULES)
def test_syncthreads_publishes(lib, schedule, seed):
    out = np.zeros(4 * 128, dtype=np.int32)
    launcher(lib, schedule, seed)("st_publish", (4, 1, 1), (128, 1, 1), (np.int32(1), out))
    assert np.array_equal(out, np.repeat(1000 + np.arange(4), 128))


def test_missing_syncthreads_is_caught_by_some_schedule(lib):
    """Without __syncthreads, other warps read shared memory before thread 0 wrote it under a
    descending or random schedule: the emulator exposes the race as a wrong result."""
    expected = np.repeat(1000 + np.arange(4), 128)
    results = []
    for schedule, seed in SCHEDULES:
        out = np.zeros(4 * 128, dtype=np.int32)
        launcher(lib, schedule, seed)("st_publish", (4, 1, 1), (128, 1, 1), (np.int32(0), out))
        results.append(np.array_equal(out, expected))
    assert not all(results)


def test_divergent_collectives_are_reported(lib):
    with pytest.raises(EmulatorError, match="different collectives"):
        launcher(lib)("st_divergent", (1, 1, 1), (32, 1, 1), (np.zeros(32, dtype=np.int32),))


def test_deadlock_is_reported(lib):
    with pytest.raises(EmulatorError, match="deadlock"):
        launcher(lib)("st_deadlock", (1, 1, 1), (64, 1, 1), (np.zeros(64, dtype=np.int32),))


def test_partial_mask_is_reported(lib):
    with pytest.raises(EmulatorError, match="full mask"):
        launcher(lib)("st_partial_mask", (1, 1, 1), (32, 1, 1), (np.zeros(32, dtype=np.int32),))


def test_partial_warp_collective_is_reported(lib):
    with pytest.raises(EmulatorError, match="full warp"):
        launcher(lib)(
            "st_shuffle64", (1, 1, 1), (20, 1, 1), (np.zeros(20, dtype=np.uint64), np.zeros(20, dtype=np.uint64))
        )


def test_argument_types_are_checked(lib):
    out = np.zeros(32, dtype=np.int32)
    with pytest.raises(EmulatorError, match="do not match"):
        launcher(lib)("st_publish", (1, 1, 1), (32, 1, 1), (np.int64(1), out))
    with pytest.raises(EmulatorError, match="exact type"):
        launcher(lib)("st_publish", (1, 1, 1), (32, 1, 1), (1, out))
    with pytest.raises(EmulatorError, match="no kernel"):
        launcher(lib)("st_nope", (1, 1, 1), (32, 1, 1), (out,))


def test_dims(lib):
    grid, block = (3, 2, 2), (8, 2, 2)
    n = 12 * 32
    out = np.zeros(4 * n, dtype=np.int32)
    launcher(lib)("st_dims", grid, block, (out,))
    out = out.reshape(n, 4)
    t = 0
    for bz in range(2):
        for by in range(2):
            for bx in range(3):
                for tz in range(2):
                    for ty in range(2):
                        for tx in range(8):
                            assert out[t].tolist() == [
                                tx + 10 * ty + 100 * tz,
                                bx + 10 * by + 100 * bz,
                                8 + 20 + 200,
                                3 + 20 + 200 + 32000,
                            ]
                            t += 1


def test_popc(lib):
    x = np.array([0, 1, (1 << 64) - 1, 0x8000000000000001, 0xF0F0F0F0_0000FFFF] + [3] * 27, dtype=np.uint64)
    out = np.zeros(64, dtype=np.int32)
    launcher(lib)("st_popc", (1, 1, 1), (32, 1, 1), (x, out))
    assert out[0::2].tolist() == [bin(int(v)).count("1") for v in x]
    assert out[1::2].tolist() == [bin(int(v) & 0xFFFFFFFF).count("1") for v in x]
