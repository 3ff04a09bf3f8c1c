"""The constants the CUDA sources share with Python come from one source: the generated prelude."""

from __future__ import annotations

import re

from gpu_phase_router import _keys
from gpu_phase_router.backends import cuda


def _prelude_values(text: str) -> dict[str, int]:
    out = {}
    for name, literal in re.findall(r"^#define (GPR_\w+) (\S+)$", text, flags=re.M):
        out[name] = int(literal.removesuffix("ULL"), 0)
    return out


def test_prelude_holds_the_python_values():
    want = {
        "GPR_GOLDEN": _keys.GOLDEN,
        "GPR_MIX_M1": _keys.MIX_M1,
        "GPR_MIX_M2": _keys.MIX_M2,
        "GPR_FEISTEL_ROUNDS": _keys.FEISTEL_ROUNDS,
        "GPR_FILL_TRIES": _keys.FILL_TRIES,
        "GPR_MAX_WARPS": cuda.MAX_WARPS_PER_CTA,
        "GPR_CRATE_ROWS": cuda.CRATE_ROWS_PER_CTA,
    }
    assert _prelude_values(cuda.kernel_prelude()) == want
    assert cuda.kernel_source().startswith(cuda.kernel_prelude())  # what CuPy's RawModule compiles


def test_kernel_files_keep_no_copy_of_a_shared_constant():
    """Each prelude macro is used by the sources and defined nowhere else, and no source spells a
    shared value out (the hex constants, or a Feistel round count as a loop bound)."""
    names = _prelude_values(cuda.kernel_prelude())
    text = "\n".join(re.sub(r"//[^\n]*", "", p.read_text()) for p in cuda.kernel_paths())
    for name, value in names.items():
        assert re.search(rf"\b{name}\b", text), f"{name} is not used by the kernel sources"
        assert not re.search(rf"#\s*define\s+{name}\b", text), f"{name} is defined again in a kernel file"
        if value >= 1 << 31:
            assert f"{value:X}" not in text.upper(), f"{name}'s value 0x{value:X} is spelled out in a kernel file"
    feistel = text[text.index("gpr_feistel(") :][:1500]
    assert not re.search(r"\bint\s+r\s*=\s*[1-9]|\br\s*<=?\s*\d", feistel), "a Feistel round loop has a literal bound"
