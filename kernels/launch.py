"""A cheaper launch for small, frequent kernels (decode).

``kernel[grid](...)`` in Triton rebuilds a specialization key from every argument on each call:
about 80 us of host time for our ~35-argument decode kernel on an H200 host, more than a whole
SDPA decode call. Decoding calls the same kernel with the same specialization over and over, so
this keeps the compiled kernel under a key at least as fine as Triton's own specialization (per
int: == 1, divisible by 16, fits in 32 bits; per tensor: dtype and 16-byte alignment) and calls
its launcher directly. The first call of each key, a launch hook, or any launcher API mismatch
goes through Triton's normal path, so the fast path can only be skipped, never be wrong.
"""
from __future__ import annotations

import torch


def _spec(arg):
    kind = type(arg)
    if kind is int:  # the common case first: strides, sizes, offsets
        return 1 if arg == 1 else ((2 if arg % 16 == 0 else 3) + (0 if -(2**31) <= arg < 2**31 else 4))
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if kind is bool:
        return ("b", arg)
    if isinstance(arg, int):
        return ("i", arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31)
    if isinstance(arg, float):
        return "f"
    return (kind, arg)  # constexpr values: the value itself is part of the key


def current_raw_stream(device_index: int) -> int:
    """The current CUDA stream handle: the private accessor Triton's own launcher uses (about
    a microsecond), else the public one (several)."""
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is not None:
        return get(device_index)
    return torch.cuda.current_stream(device_index).cuda_stream


class CachedLauncher:
    def __init__(self, jit_fn):
        self.fn = jit_fn
        self.cache: dict = {}
        self.enabled = True

    def __call__(self, grid: tuple, args: tuple, constexprs: dict, num_warps: int, num_stages: int):
        """Launch ``fn[grid](*args, **constexprs)``; ``constexprs`` must list the kernel's
        constexpr parameters in their declared order (they follow ``args`` in the signature)."""
        if not self.enabled or _hooks_set():
            self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        device = args[0].device.index
        key = (device, num_warps, num_stages, tuple(constexprs.values()), tuple(map(_spec, args)))
        kernel = self.cache.get(key)
        if kernel is None:
            self.cache[key] = self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        grid = tuple(grid) + (1,) * (3 - len(grid))
        stream = current_raw_stream(device)
        try:
            kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None,
                       None, None, *args, *constexprs.values())
        except (TypeError, AttributeError):  # a Triton whose launcher takes other arguments
            self.enabled = False
            self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def _hook_active(hook) -> bool:
    # Triton >= 3.4 keeps a HookChain that is always there and empty unless a profiler adds to it
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


_RUNTIME_KNOBS = None


def _hooks_set() -> bool:
    global _RUNTIME_KNOBS
    try:
        if _RUNTIME_KNOBS is None:
            from triton import knobs

            _RUNTIME_KNOBS = knobs.runtime
        return _hook_active(_RUNTIME_KNOBS.launch_enter_hook) or _hook_active(_RUNTIME_KNOBS.launch_exit_hook)
    except (ImportError, AttributeError):
        return True
