"""An interpreted (CPU) Triton kernel must leave ``triton.language`` as it found it: Triton 3.6's interpreter
patches the language for device-function calls (``tl.sum``) and never restores it, after which every kernel
compiled in the same process fails. Found when the GPU tests ran after CPU ones in one pytest process."""

from __future__ import annotations

import types

import pytest
import torch

from hetserve.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")


def _snapshot() -> dict[int, tuple[object, dict[str, object]]]:
    import triton.language as tl

    objs = (tl, tl.core, tl.tensor, tl.math, getattr(tl.core, "tensor_descriptor_base", None))
    return {id(o): (o, dict(vars(o))) for o in objs if o is not None}


def test_interpreted_kernels_leave_the_language_unpatched() -> None:
    from hetserve.kernels.activation import silu_and_mul
    from hetserve.kernels.norm import rms_norm

    x, w = torch.randn(4, 64), torch.ones(64)
    rms_norm(x, w, 1e-6, impl="triton")  # warm: lazy submodule imports happen once
    before = _snapshot()
    out = rms_norm(x, w, 1e-6, impl="triton")  # uses tl.sum: a device-function call in the interpreter
    silu_and_mul(torch.randn(4, 128), impl="triton")
    torch.testing.assert_close(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    after = _snapshot()
    changed = [
        f"{getattr(obj, '__name__', obj)}.{name}"
        for key, (obj, d) in before.items()
        for name in set(d) | set(after[key][1])
        if d.get(name) is not after[key][1].get(name) and not isinstance(after[key][1].get(name), types.ModuleType)
    ]
    assert not changed, f"the interpreter left these patched: {changed[:8]}"
