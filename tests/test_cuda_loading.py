"""The CUDA backend loads lazily: the package imports and runs on the CPU without CuPy, and asking
for ``backend="cuda"`` without CuPy or without a GPU raises ValueError with the install command."""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest

import gpu_phase_router
from gpu_phase_router import backends, get_backend, route

INSTALL = "pip install 'gpu_phase_router[cuda12]'"


@pytest.fixture
def fresh_cuda(monkeypatch):
    """Forget a loaded cuda backend so the next get_backend("cuda") calls load() again."""
    monkeypatch.delitem(backends._INSTANCES, "cuda", raising=False)
    yield
    backends._INSTANCES.pop("cuda", None)


@pytest.mark.subprocess
def test_import_loads_no_gpu_stack():
    code = (
        "import sys\n"
        "import gpu_phase_router\n"
        "assert 'cupy' not in sys.modules and 'numba' not in sys.modules, sorted(sys.modules)\n"
        "import gpu_phase_router.backends.cuda\n"
        "assert 'cupy' not in sys.modules\n"
        "be = gpu_phase_router.get_backend('cpu')\n"
        "assert 'cupy' not in sys.modules\n"
        "print(gpu_phase_router.route(n=16, k=2, seed=1).shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(16, 2)"


def test_cuda_without_cupy_raises_install_hint(monkeypatch, fresh_cuda):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(ValueError, match=r"pip install 'gpu_phase_router\[cuda12\]'"):
        get_backend("cuda")
    with pytest.raises(ValueError, match=r"gpu_phase_router\[cuda12\]"):
        route(n=8, k=2, seed=1, backend="cuda")
    assert get_backend("cpu").name == "cpu"
    assert route(n=8, k=2, seed=1).shape == (8, 2)


def test_cuda_without_device_raises_install_hint(monkeypatch, fresh_cuda):
    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=no_device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(ValueError, match="no CUDA-capable device") as info:
        get_backend("cuda")
    assert INSTALL in str(info.value)
    fake.cuda.runtime.getDeviceCount = lambda: 0
    with pytest.raises(ValueError, match="no CUDA device found"):
        get_backend("cuda")


def test_cuda_backend_with_a_device_is_lazy(monkeypatch, fresh_cuda):
    """load() only checks for a device; nothing is compiled until the first kernel launch."""
    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    fake.RawModule = lambda **kw: pytest.fail("compiled at load time")
    monkeypatch.setitem(sys.modules, "cupy", fake)
    be = get_backend("cuda")
    assert be.name == "cuda" and be.xp is fake


def test_backend_protocol_surface():
    from gpu_phase_router.backends.cuda import CudaBackend

    for attr in ("popcount_rows", "feistel", "prepare_ring", "phase_rows", "systematic_rows"):
        assert callable(getattr(CudaBackend, attr))
    assert CudaBackend(np, lambda *a: None).xp is np
    assert "cuda" in gpu_phase_router.available_backends()


def fake_cuda_torch(monkeypatch, events: list) -> type:
    """Fake ``cupy`` and ``torch`` modules whose ``cupy.cuda.Device(i)`` and ``cupy.cuda.ExternalStream(p)``
    record entering and leaving in ``events``; torch's current stream on device ``i`` is ``1000 + i``.
    Returns a fake CUDA tensor type on device 1."""

    class Ctx:
        def __init__(self, name, arg):
            self.name, self.arg = name, arg

        def __enter__(self):
            events.append(("enter", self.name, self.arg))

        def __exit__(self, *exc):
            events.append(("exit", self.name))

    fake_cupy = types.ModuleType("cupy")
    fake_cupy.cuda = types.SimpleNamespace(Device=lambda i: Ctx("device", i), ExternalStream=lambda p: Ctx("stream", p))
    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = types.SimpleNamespace(
        current_stream=lambda i: types.SimpleNamespace(cuda_stream=1000 + i), current_device=lambda: 0
    )
    tensor = type("Tensor", (), {"__module__": "torch.nn", "device": types.SimpleNamespace(type="cuda", index=1)})
    fake_torch.Tensor = tensor
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    return tensor


def test_torch_cuda_inputs_run_on_torch_stream(monkeypatch):
    """With a CUDA torch tensor among the arguments, the call runs inside cupy.cuda.Device(index) and
    cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream) (fakes record the calls)."""
    from gpu_phase_router import api
    from gpu_phase_router._arrays import on_caller_stream

    events: list = []
    tensor_type = fake_cuda_torch(monkeypatch, events)

    @on_caller_stream
    def call(x, y=None):
        events.append("call")
        return 5

    assert call(tensor_type()) == 5
    assert events == [("enter", "device", 1), ("enter", "stream", 1001), "call", ("exit", "stream"), ("exit", "device")]
    events.clear()
    call(np.zeros(2), y=tensor_type())
    assert events[1] == ("enter", "stream", 1001)
    events.clear()
    call(np.zeros(2))
    assert events == ["call"]
    from gpu_phase_router import blocks

    # the front doors (route and route_counts are thin calls of the first two)
    for fn in (blocks.route_block, blocks.route_counts_block, api.route_bits, api.phase_router, api.popcount_rows):
        assert hasattr(fn, "__wrapped__"), fn.__name__


@pytest.mark.parametrize("name", ["phase_router", "phase_router_auto", "route"])
def test_compat_torch_cuda_inputs_run_on_their_device_and_stream(monkeypatch, name):
    """The crate-exact front doors taking arrays resolve their backend (and so launch every kernel)
    inside the tensors' device and torch's current stream, as the package's own front doors do:
    tensors on cuda:1 while cuda:0 is current would otherwise route on device 0."""
    from gpu_phase_router import compat

    events: list = []
    tensor_type = fake_cuda_torch(monkeypatch, events)

    class Resolved(Exception):
        pass

    def resolve(*args, **kwargs):
        events.append("resolve")
        raise Resolved

    monkeypatch.setattr(compat, "resolve", resolve)
    x = tensor_type()
    calls = {
        "phase_router": lambda: compat.phase_router(x, x, 4, 1, 2, x, x, 7),
        "phase_router_auto": lambda: compat.phase_router_auto(x, x, 4, 2, 7),
        "route": lambda: compat.route(x, x, 4, 2, 7),
    }
    with pytest.raises(Resolved):
        calls[name]()
    assert events[:3] == [("enter", "device", 1), ("enter", "stream", 1001), "resolve"]
