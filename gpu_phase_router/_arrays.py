"""Array-library interop: NumPy, CuPy and torch in, the same library and device out.

Libraries are recognised by the module of the array's type (as ``array-api-compat`` does),
so nothing here imports CuPy or torch unless the caller already passed one of their arrays.
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import numpy as np

NUMPY, CUPY, TORCH = "numpy", "cupy", "torch"
F = TypeVar("F", bound=Callable[..., Any])

Array: TypeAlias = Any
"""A NumPy ndarray, CuPy ndarray or torch Tensor (duck-typed: recognised by :func:`library_of`)."""


def library_of(x: Any) -> str | None:
    """Return ``"numpy"``, ``"cupy"``, ``"torch"`` for arrays of those libraries, else ``None``."""
    if isinstance(x, np.ndarray):
        return NUMPY
    root = type(x).__module__.split(".", 1)[0]
    if root == CUPY and "cupy" in sys.modules:
        return CUPY
    if root == TORCH and "torch" in sys.modules and isinstance(x, sys.modules["torch"].Tensor):
        return TORCH  # (torch.Size and the pairs topk returns are tuples: sequences, as NumPy reads them)
    return None


def is_device_array(x: Any) -> bool:
    """True for a CuPy array or a CUDA torch tensor."""
    lib = library_of(x)
    return lib == CUPY or (lib == TORCH and x.device.type == "cuda")


def device_id(x: Any, name: str) -> tuple[str, int]:
    """``("cpu", -1)`` for host data, ``("cuda", ordinal)`` for device data; ``TypeError`` naming
    ``name`` for a torch tensor on any other device."""
    lib = library_of(x)
    if lib == CUPY:
        return ("cuda", int(x.device.id))
    if lib == TORCH and x.device.type == "cuda":
        return ("cuda", int(x.device.index or 0))
    if lib == TORCH and x.device.type != "cpu":
        raise TypeError(f"{name} is a torch tensor on device {x.device}; use a CPU or CUDA tensor (e.g. {name}.cpu())")
    return ("cpu", -1)


@dataclass(frozen=True)
class Namespace:
    """Where the caller's data lives: its array library and device (see :func:`array_namespace`)."""

    library: str  # "numpy" (also for Python sequences), "cupy" or "torch"
    device: tuple[str, int]  # ("cpu", -1) or ("cuda", ordinal)

    @property
    def on_device(self) -> bool:
        """True for CuPy arrays and CUDA torch tensors."""
        return self.device[0] == "cuda"

    @property
    def xp(self) -> Any:
        """The module that computes on this data without a transfer: CuPy on a GPU, NumPy otherwise."""
        if self.on_device:
            import cupy

            return cupy
        return np

    def asarray(self, x: Any) -> Array:
        """``x`` as an array of :attr:`xp` (no copy where the data already lives there)."""
        return to_backend_array(x, self.xp)

    def wrap(self, out: Array) -> Array:
        """A result of NumPy/CuPy returned in this library and on this device."""
        return from_backend_array(out, self.library, self.device)


HOST = Namespace(NUMPY, ("cpu", -1))


def array_namespace(*arrays: Any, **named: Any) -> Namespace:
    """The one array library and device of all given arrays (``None`` values are skipped).

    The single place where data decides where the work runs (with :func:`gpu_phase_router.
    backends.resolve`). Python sequences count as NumPy; CuPy and torch are recognised through
    the type's module without importing them. Host NumPy data joins any one other library (a
    small capacity vector beside CUDA tensors is moved to their device, the result is a tensor);
    two different non-NumPy libraries or devices raise ``TypeError`` naming the arguments, since
    a silent transfer between them would hide a copy the caller did not ask for. Positional
    arrays are named ``arg0``, ``arg1``, ... in messages.
    """
    items = [(f"arg{i}", x) for i, x in enumerate(arrays)] + list(named.items())
    seen: dict[tuple[str, tuple[str, int]], str] = {}
    for name, x in items:
        if x is None:
            continue
        check_plain_input(name, x)
        lib = library_of(x) or NUMPY
        dev = device_id(x, name) if lib != NUMPY else ("cpu", -1)
        seen.setdefault((lib, dev), name)
    # Host NumPy data (and Python sequences) joins any one other library: it is converted there.
    if len(seen) > 1:
        seen.pop((NUMPY, ("cpu", -1)), None)
    if not seen:
        return HOST
    if len(seen) > 1:
        desc = ", ".join(
            f"{name}: {lib} on {dev[0]}{'' if dev[1] < 0 else ':' + str(dev[1])}" for (lib, dev), name in seen.items()
        )
        raise TypeError(
            f"all array arguments must come from one array library on one device (NumPy arrays and Python "
            f"sequences join any one of them); got {desc}. Move them to one place first (e.g. cupy.asarray(x) "
            "or tensor.to(device))."
        )
    ((lib, dev),) = seen
    return Namespace(lib, dev)


def check_plain_input(name: str, x: Any) -> None:
    """Reject what NumPy would silently misread: masked entries and ragged nested sequences.

    A NumPy masked array with masked entries raises ``ValueError`` naming ``name`` (converting it
    would drop the mask and route the masked entries as if unmasked; fill it first, e.g.
    ``x.filled(0)`` for "never routes / never receives"). One with nothing masked is plain data.
    A ragged nested list or tuple raises ``ValueError`` naming ``name``.
    """
    if isinstance(x, np.ma.MaskedArray):
        if np.ma.is_masked(x):
            raise ValueError(
                f"{name} is a masked array with {int(np.ma.count_masked(x))} masked entries; the mask "
                f"would be ignored, so fill them first (e.g. {name}.filled(0): a zero weight never "
                "routes, a zero capacity never receives)"
            )
        return
    if library_of(x) == TORCH and str(x.layout) != "torch.strided":
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {x.layout} (use .to_dense())")
    if isinstance(x, (list, tuple)):
        try:
            np.shape(x)
        except ValueError:
            raise ValueError(
                f"{name} must be an array or a rectangular (non-ragged) sequence of numbers; got a "
                "nested sequence whose rows differ in length"
            ) from None


def _torch_host_dtype(t: Any) -> Any:
    """``t`` itself, or ``t`` in float64 on its own device when NumPy / CuPy cannot hold its dtype
    (bfloat16 and other reduced floats; converting them to float64 is exact); a view with a lazy
    negation or conjugation is materialised first (NumPy and DLPack cannot read those bits)."""
    import torch

    t = t.resolve_conj().resolve_neg()  # views with a lazy negation (e.g. conj().imag) as plain data
    if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
        return t.to(torch.float64)
    return t


def to_numpy(x: Any) -> np.ndarray:
    """Host NumPy view (or copy, for device data) of an array or sequence.

    torch tensors of a dtype NumPy lacks (bfloat16, ...) are converted to float64 first, on their
    device."""
    lib = library_of(x)
    if lib == CUPY:
        return x.get()
    if lib == TORCH:
        t = _torch_host_dtype(x.detach())
        return t.cpu().numpy() if t.device.type != "cpu" else t.numpy()
    if isinstance(x, np.ma.MaskedArray) and not np.ma.is_masked(x):
        return np.asarray(x.data)
    return np.asarray(x)


def to_backend_array(x: Any, xp: Any) -> Array:
    """``x`` as an array of the backend's module ``xp`` (NumPy or CuPy), without copying when
    the data already lives where the backend computes (torch shares memory through DLPack)."""
    if x is None:
        return None
    lib = library_of(x)
    if xp is np:
        return to_numpy(x)
    # CuPy backend
    if lib == CUPY:
        return x
    if lib == TORCH and x.device.type == "cuda":
        return xp.from_dlpack(_torch_host_dtype(x.detach()))  # bfloat16 -> float64 on the device
    return xp.asarray(to_numpy(x))


def from_backend_array(out: Array, lib: str, dev: tuple[str, int]) -> Array:
    """Return the backend's result ``out`` in the caller's library ``lib`` and device ``dev``."""
    out_is_numpy = isinstance(out, np.ndarray)
    if lib == NUMPY:
        return out if out_is_numpy else out.get()
    if lib == CUPY:
        if out_is_numpy:
            import cupy

            with cupy.cuda.Device(dev[1]):
                return cupy.asarray(out)
        return out
    import torch

    if dev[0] == "cpu":
        return torch.from_numpy(out if out_is_numpy else out.get())
    if out_is_numpy:
        return torch.from_numpy(out).to(f"cuda:{dev[1]}")
    return torch.from_dlpack(out)


def on_caller_stream(fn: F) -> F:
    """Run ``fn`` on torch's current CUDA stream and device when an argument is a CUDA tensor.

    CuPy launches on its own current stream; entering ``cupy.cuda.ExternalStream`` on torch's
    stream orders our kernels after the caller's pending torch work and before whatever the caller
    queues next, without a synchronisation. Other inputs (and a missing CuPy) run ``fn`` unchanged.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensor = next(
            (x for x in itertools.chain(args, kwargs.values()) if library_of(x) == TORCH and x.device.type == "cuda"),
            None,
        )
        if tensor is None:
            return fn(*args, **kwargs)
        try:
            import cupy
        except Exception:  # no CuPy: the cuda backend reports it, the cpu backend does not need it
            return fn(*args, **kwargs)
        import torch

        index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
        with cupy.cuda.Device(index), cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
