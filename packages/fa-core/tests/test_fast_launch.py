"""CPU checks of ``fa_core.fast_launch``'s bookkeeping (the launches themselves are GPU-only: the bitwise
comparison with Triton's launch path is ``packages/fa-backward/tests/test_fast_launch_gpu.py``)."""

from __future__ import annotations

import random

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from fa_core import fast_launch
from fa_core.fast_launch import (
    FastLaunch,
    Recording,
    Replay,
    _arg_class,
    _classes,
    empty_arg,
    fast_launch_enabled,
    record,
    set_fast_launch,
)


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


# ------------------------------------------------------------------------------------------ replay
def _recording(steps_vals, calls=None):
    """A Recording of fake direct launches: each step's ``run`` appends its arguments to ``log``."""
    log: list = []

    def run(*args):
        log.append(args)

    launcher = FastLaunch(JITFunction(_kernel))
    rec = Recording()
    for vals in steps_vals:
        rec.steps.append((launcher, run, 4, 2, 1, "fn", "meta", tuple(vals), (64, True), "cfg", 0))
    rec.calls = len(rec.steps) if calls is None else calls
    return rec, log


@pytest.fixture
def fake_device(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 7, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: False, raising=False)


def test_replay_substitutes_the_new_calls_tensors(fake_device):
    q, k, out = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    placeholder = empty_arg(q, torch.int32)
    rec, log = _recording([(q, k, 3, 0.5, placeholder), (out, q, None)])
    replay = Replay.build(rec, (q, k, out))
    assert replay is not None
    q2, k2, out2 = torch.ones(4), torch.ones(4), torch.ones(4)
    assert replay((q2, k2, out2))
    (a, b) = log
    assert a[:6] == (4, 2, 1, 7, "fn", "meta") and a[6:9] == (None, None, None)
    # tensors reach the launcher as addresses (no data_ptr call and driver pointer check per argument there)
    assert a[9:11] == (q2.data_ptr(), k2.data_ptr()) and a[11:13] == (3, 0.5)
    assert a[13] == placeholder.data_ptr() and a[14:] == (64, True)
    assert b[9:11] == (out2.data_ptr(), q2.data_ptr()) and b[11] is None
    # the recorded tensors are not kept alive by the replay; the placeholder is
    assert not any(isinstance(x, torch.Tensor) for s in replay.steps for x in s[7])
    assert replay.keep == (placeholder,)


def test_replay_refuses_what_it_cannot_replay(fake_device):
    q, k = torch.zeros(4), torch.zeros(4)
    stray = torch.zeros(4)  # made inside the launcher: no slot, no placeholder
    assert Replay.build(_recording([(q, stray)])[0], (q, k)) is None
    assert Replay.build(_recording([(q, k)])[0], (q, q)) is None  # two slots, one tensor: ambiguous
    assert Replay.build(_recording([(q, k)], calls=2)[0], (q, k)) is None  # a launch took Triton's path
    assert Replay.build(_recording([])[0], (q, k)) is None
    rec, log = _recording([(q, k)])
    replay = Replay.build(rec, (q, k))
    previous = set_fast_launch(False)
    try:
        assert not replay((q, k)) and not log  # the shortcut off: the caller takes the launch path
    finally:
        set_fast_launch(previous)


def test_record_counts_launcher_calls_on_this_thread_only():
    import threading

    launcher = FastLaunch(JITFunction(_kernel))
    seen = []
    with record() as rec:
        t = threading.Thread(target=lambda: seen.append(getattr(fast_launch._TLS, "rec", None)))
        t.start()
        t.join()
        with pytest.raises(Exception):  # a CPU tensor without the interpreter: Triton's path, which fails
            launcher((1,), torch.zeros(4), torch.zeros(4), 1, 0.5, 16, BLOCK=16, FLAG=True)
    assert seen == [None] and rec.calls == 1 and not rec.steps
    assert getattr(fast_launch._TLS, "rec", None) is None


def test_replay_refuses_none_where_a_tensor_was_recorded(fake_device):
    """A slot that held a tensor at recording time (e.g. a second cu_seqlens tensor) must hold one at replay:
    None would reach the kernel as a null pointer."""
    q, cu_k = torch.zeros(4), torch.zeros(4)
    rec, log = _recording([(q, cu_k)])
    replay = Replay.build(rec, (q, cu_k))
    assert replay.required == (0, 1)
    assert not replay((q, None)) and not log
    assert replay((torch.ones(4), torch.ones(4))) and len(log) == 1
