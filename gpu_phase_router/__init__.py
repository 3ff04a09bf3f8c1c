"""gpu_phase_router: deterministic capacity-proportional routing on the GPU (CuPy) and CPU (Numba).

``import gpu_phase_router`` imports neither CuPy, torch nor Numba; backends load on first use.
See SPEC.md for the exact definition every backend follows bit for bit.
"""

from .api import (
    auto_permutation,
    hash_route,
    left_aligned_bits,
    pack_bits,
    phase_router,
    phase_router_auto,
    popcount_rows,
    route,
    route_bits,
    route_counts,
)
from .backends import available_backends, cuda_available, get_backend, register_backend
from .blocks import route_block, route_counts_block
from .capacity import (
    compute_loads,
    enforce_capacity,
    extreme_hetero_capacities,
    load_stats,
    make_hard_caps,
    mild_hetero_capacities,
    strong_hetero_capacities,
    survival_rate,
    uniform_capacities,
)
from .methods import available_methods, register_method, route_uniform

__version__ = "0.1.0"

__all__ = [
    "auto_permutation",
    "available_backends",
    "available_methods",
    "compute_loads",
    "cuda_available",
    "enforce_capacity",
    "extreme_hetero_capacities",
    "get_backend",
    "hash_route",
    "left_aligned_bits",
    "load_stats",
    "make_hard_caps",
    "mild_hetero_capacities",
    "pack_bits",
    "phase_router",
    "phase_router_auto",
    "popcount_rows",
    "register_backend",
    "register_method",
    "route",
    "route_bits",
    "route_block",
    "route_counts",
    "route_uniform",
    "strong_hetero_capacities",
    "survival_rate",
    "uniform_capacities",
    "route_counts_block",
]
