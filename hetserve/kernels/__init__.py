"""Fused GPU kernels (Triton) with torch fallbacks.

Every public kernel function takes ``impl``: ``"auto"`` runs Triton on CUDA tensors and the torch fallback
elsewhere; ``"triton"`` forces the Triton kernel, which on CPU tensors runs under Triton's interpreter (that is
how CI checks the kernels without a GPU); ``"torch"`` forces the fallback.

Triton picks interpreter or compiler when a function is decorated, so each kernel here is kept undecorated and
wrapped twice on demand (:class:`DualKernel`): compiled for CUDA tensors, interpreted for CPU tensors. Kernels
must therefore be self-contained (no calls to other ``@triton.jit`` helpers).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, Literal

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime import driver as _driver

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU installs without triton use the torch fallbacks
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _driver = None
    HAS_TRITON = False
try:  # launch hooks (a profiler's); Triton before 3.4 has no knobs: launches then take the ordinary path
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - torch >= 2.11 ships Triton 3.5+
    _knobs = None

Impl = Literal["auto", "triton", "torch"]


def use_triton(x: torch.Tensor, impl: Impl) -> bool:
    """Whether a kernel call on ``x`` runs the Triton kernel."""
    if impl == "torch":
        return False
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' requested but triton is not installed")
        return True
    return HAS_TRITON and x.is_cuda


class _InterpretedLanguage:
    """``triton.language`` as an interpreted kernel must see it: library helpers that are ``@jit`` functions
    (``tl.sum``, ``tl.max``, ``tl.cdiv``, ...) were compiled-mode objects when triton was imported without
    ``TRITON_INTERPRET=1``; they are handed out re-wrapped for the interpreter."""

    def __init__(self, real: types.ModuleType) -> None:
        self._real = real
        self._wrapped: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        from triton.runtime.jit import JITFunction

        if isinstance(value, JITFunction):
            found = self._wrapped.get(name)
            if found is None:
                from triton.runtime.interpreter import InterpretedFunction

                found = self._wrapped[name] = InterpretedFunction(value.fn)
            return found
        return value


_interpreter_patched = False


def _patch_interpreter() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with ``int(array)``, which NumPy >= 2.4 refuses
    for the 1-element arrays the interpreter makes of scalars (loop bounds computed from loaded values)."""
    global _interpreter_patched
    if _interpreter_patched:
        return
    import numpy as np
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    _interpreter_patched = True


def _language_objects() -> tuple[Any, ...]:
    """What Triton's interpreter patches when it runs a kernel: the language modules and tensor classes."""
    core = tl.core
    return tuple(o for o in (tl, core, tl.tensor, tl.math, getattr(core, "tensor_descriptor_base", None))
                 if o is not None)


class _LeavesLanguageAsFound:
    """An interpreted kernel whose launches leave ``triton.language`` as they found it. Triton 3.6's interpreter
    patches the language for a device-function call (``tl.sum``, ``tl.max``, ...) and never restores it, after
    which every kernel compiled in the same process fails ("'ir.value' object has no attribute 'dtype'"): a
    GPU test run after a CPU one, or a process that interprets and compiles."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self._fn[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            saved = [(o, dict(vars(o))) for o in _language_objects()]
            try:
                return launch(*args, **kwargs)
            finally:
                for obj, before in saved:
                    now = vars(obj)
                    for name in [n for n in now if n not in before]:
                        delattr(obj, name)
                    for name, value in before.items():
                        if now.get(name, value) is not value:
                            setattr(obj, name, value)

        return run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


# False: DualKernel.launch always takes Triton's ordinary launch path (a benchmark flips it to compare)
DIRECT_LAUNCH = True


def launch_hooked() -> bool:
    """Whether a Triton launch hook is installed (a profiler's, say): then launches go through Triton's ordinary
    path, which calls it. Triton 3.6 keeps an empty hook chain there (never None), older ones None; a Triton
    without ``knobs`` (before 3.4) always takes the ordinary path."""
    if _knobs is None:
        return True
    for hook in (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


def _spec_key(a: Any) -> Any:
    """What Triton may specialise a kernel argument on, and a little more (a finer key is only a cache miss):
    a tensor's dtype and 16-byte alignment; an int's == 0, == 1, multiple of 16 and 32-bit range; a bool's
    value; a float's kind; anything else by value."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if isinstance(a, bool):
        return a
    if isinstance(a, int):
        return (a == 0, a == 1, a % 16 == 0, -(1 << 31) <= a < (1 << 31))
    if isinstance(a, float):
        return float
    return a


def direct_entry(jit: Any, compiled: Any, num_args: int, kwargs: dict[str, Any]) -> tuple[Any, ...] | None:
    """What calling ``compiled`` directly needs: ``(launcher, function, packed metadata, the keyword values of
    the parameters after the ``num_args`` positional ones, in parameter order)``; None where it cannot be called
    directly (the interpreter returns no compiled kernel; a parameter the call left to its default)."""
    names = getattr(jit, "arg_names", None)
    if compiled is None or names is None or not hasattr(compiled, "packed_metadata"):
        return None
    if any(n not in kwargs for n in names[num_args:]):
        return None
    return (compiled.run, compiled.function, compiled.packed_metadata, [kwargs[n] for n in names[num_args:]])


class DualKernel:
    """A Triton kernel body, compiled (``triton.jit``) for CUDA tensors, interpreted for CPU tensors.

    :meth:`launch` is ``kernel.on(device)[grid](*args, **kwargs)`` with a cheaper path on CUDA: Triton's
    ordinary launch binds and specialises every argument in Python (30-60 us a launch on an H100 host, most of
    an eager step's launch time); once a call with the same specialisation compiled, later ones call that
    compiled kernel's launcher directly."""

    def __init__(self, fn: Callable[..., Any], **jit_options: Any) -> None:
        self.fn = fn
        self.jit_options = jit_options
        self._compiled: Any = None
        self._interpreted: Any = None
        # (device index, argument keys, keywords) -> (launcher, function, packed metadata, keyword tail)
        self._direct: dict[Any, tuple[Any, ...] | None] = {}
        self.direct_launches = 0
        functools.update_wrapper(self, fn)

    def launch(self, device: torch.device, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
        if device.type != "cuda" or not DIRECT_LAUNCH or launch_hooked():
            self.on(device)[grid](*args, **kwargs)
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, tuple(map(_spec_key, args)), tuple(sorted(kwargs.items())))
        entry = self._direct.get(key)
        if entry is None:
            jit = self.on(device)
            compiled = jit[grid](*args, **kwargs)
            if key not in self._direct:
                self._direct[key] = direct_entry(jit, compiled, len(args), kwargs)
            return
        launcher, function, packed, tail = entry
        g = tuple(grid) + (1,) * (3 - len(grid))
        self.direct_launches += 1
        launcher(g[0], g[1], g[2], _driver.active.get_current_stream(index), function, packed, None, None, None,
                 *args, *tail)


    def on(self, device: torch.device) -> Any:
        if device.type == "cpu":
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                _patch_interpreter()
                # a copy of the function whose globals see the interpreter-safe language module; the real module
                # stays visible under another name because the interpreter patches it in place
                fn = self.fn
                scope = dict(fn.__globals__)
                scope["tl"] = _InterpretedLanguage(tl)
                scope["_triton_language_module"] = tl
                copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
                copy.__annotations__ = dict(fn.__annotations__)
                copy.__module__ = fn.__module__
                copy.__qualname__ = fn.__qualname__
                self._interpreted = _LeavesLanguageAsFound(InterpretedFunction(copy))
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn, **self.jit_options)
        return self._compiled


def dual_kernel(
    fn: Callable[..., Any], *, do_not_specialize: tuple[str, ...] = (),
    do_not_specialize_on_alignment: tuple[str, ...] = (),
) -> DualKernel:
    """Wrap a kernel body. Arguments whose values change from step to step (batch sizes, row strides of
    per-step tables, pointers into per-step metadata packs) should not be specialised on: every new
    divisibility or alignment class would otherwise compile the kernel again in the middle of serving."""
    return DualKernel(fn, do_not_specialize=list(do_not_specialize),
                      do_not_specialize_on_alignment=list(do_not_specialize_on_alignment))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def num_sms(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def device_num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal 8 elsewhere (the interpreter runs programs one by
    one, so CPU runs want few of them)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return num_sms(index)


__all__ = ["HAS_TRITON", "DualKernel", "Impl", "device_num_sms", "dual_kernel", "next_power_of_2", "tl", "triton",
           "use_triton"]
