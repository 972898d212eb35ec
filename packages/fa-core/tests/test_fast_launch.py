"""CPU checks of ``fa_core.fast_launch``'s bookkeeping (the launches themselves are GPU-only: the bitwise
comparison with Triton's launch path is ``packages/fa-backward/tests/test_fast_launch_gpu.py``)."""

from __future__ import annotations

import random

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from fa_core.fast_launch import FastLaunch, _arg_class, _classes, fast_launch_enabled, set_fast_launch


def _kernel(X, Y, n, scale, SEQ_BUCKET, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    pass


def _bad_kernel(X, BLOCK: tl.constexpr, n):
    pass


class _FakeAutotuner:
    def __init__(self, fn, keys):
        self.fn, self.keys = fn, keys


def test_layout_of_runtime_and_constexpr_arguments():
    launcher = FastLaunch(_FakeAutotuner(JITFunction(_kernel), ["SEQ_BUCKET", "FLAG"]))
    assert launcher.ok
    assert launcher.runtime_names == ["X", "Y", "n", "scale", "SEQ_BUCKET"]
    assert launcher.const_names == ["BLOCK", "FLAG"]
    # a constexpr before a runtime argument: never the shortcut
    assert not FastLaunch(JITFunction(_bad_kernel)).ok


def test_plan_maps_keywords_and_autotune_key():
    launcher = FastLaunch(_FakeAutotuner(JITFunction(_kernel), ["SEQ_BUCKET", "FLAG"]))
    rt_kw, given_const, key_rt = launcher._plan(3, ("scale", "SEQ_BUCKET", "FLAG"))[:3]
    assert rt_kw == ("scale", "SEQ_BUCKET") and given_const == ("FLAG",) and key_rt == (4,)
    assert launcher._plan(3, ("scale", "FLAG")) is None  # a runtime argument missing
    # compile options are key values next to the constexprs, never kernel arguments
    rt_kw, given_const, _ = launcher._plan(3, ("scale", "SEQ_BUCKET", "FLAG", "num_warps", "num_stages"))[:3]
    assert rt_kw == ("scale", "SEQ_BUCKET") and given_const == ("FLAG", "num_warps", "num_stages")
    assert launcher._plan(3, ("scale", "SEQ_BUCKET", "FLAG", "typo")) is None  # an unknown keyword


def test_arg_class_separates_what_triton_specializes_on():
    x = torch.zeros(64)
    assert _arg_class(x) == (torch.float32, True)
    assert _arg_class(x[1:]) == (torch.float32, False)  # 4-byte offset: not 16-byte aligned
    assert _arg_class(x.half()) != _arg_class(x)
    classes = {_arg_class(v) for v in (1, 16, 17, 2**31, 2**63)}  # ==1, %16, other, 64-bit, unsigned
    assert len(classes) == 5
    assert _arg_class(-(2**31)) == _arg_class(16) and _arg_class(-(2**31) - 1) != _arg_class(16)
    assert _arg_class(32) == _arg_class(48)  # same class: same compiled kernel
    assert _arg_class(0.5) == _arg_class(2.0) and _arg_class(None) is None
    assert _arg_class(True) != _arg_class(False)
    with pytest.raises(TypeError):
        _arg_class(object())


def test_switch():
    previous = set_fast_launch(False)
    try:
        assert not fast_launch_enabled()
    finally:
        set_fast_launch(previous)
    assert fast_launch_enabled() == previous


def test_fast_classes_never_merge_what_arg_class_separates():
    """The launch key's fast form (C-level maps) must be at least as fine as the per-argument classes:
    two argument lists with one fast key have equal classes at every position."""
    rng = random.Random(0)
    base = torch.zeros(64)
    pool = [1, 0, 16, 17, 48, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**62, 2**63, True, False, 0.5, None]
    pool += [base, base[1:], base[4:], base.half(), base.double()]
    seen: dict = {}
    for _ in range(4000):
        vals = tuple(rng.choice(pool) for _ in range(rng.randint(1, 5)))
        key = _classes(vals)
        exact = tuple(map(_arg_class, vals))
        assert seen.setdefault(key, exact) == exact, vals
    # same classes and residues mod 16, same key: one cache entry serves them all
    assert _classes((base, 32, 7, 0.5)) == _classes((base[4:], 48, 23, 2.0))
    assert _classes((base, 32)) != _classes((base[1:], 32)) != _classes((base, 33))
    with pytest.raises(TypeError):
        _classes((object(),))


def test_descriptor_allocator_is_set_in_every_thread():
    """Triton keeps its scratch allocator in a ContextVar (per thread): the autograd engine runs the backward's
    tensor-descriptor kernels on its own threads, where an allocator set on the main thread is not seen (a GPU
    run failed with "no allocator was set"). ``_ensure_allocator`` installs one in whichever thread calls it."""
    import threading

    from triton.runtime._allocation import NullAllocator, _allocator

    from fa_core import forward_launch as fl

    seen = {}

    def worker():
        seen["before"] = isinstance(_allocator.get(), NullAllocator)
        fl._ensure_allocator()
        seen["after"] = _allocator.get()

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["before"], "a new thread starts without an allocator"
    assert seen["after"] is fl._torch_scratch
