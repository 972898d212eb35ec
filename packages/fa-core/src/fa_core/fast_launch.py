"""Direct launches of already-compiled Triton kernels, skipping Triton's per-call Python.

Why: on the GPU machine's host, Triton's launch path (autotuner lookup, argument binding and specialization,
cache key, launch metadata) cost ~230 us per forward launch and ~770 us per forward+backward step (4 launches),
measured with ``bench/host_overhead.py`` on an H200 host; a whole fwd+bwd step at seqlen 512 runs ~0.75-0.95 ms
of GPU work, so short sequences were launch-bound. This module calls the compiled kernel's launcher directly
once a call with the same specialization has gone through Triton's normal path.

Correctness rests on the cache key being a superset of what Triton specializes on: every constexpr value, the
autotune key's values, and per runtime argument its specialization class (tensor: dtype and 16-byte alignment;
int: equal to 1, divisible by 16, 32/64-bit range; float, bool, None). A miss takes Triton's path (compiling and
autotuning as usual) and records the compiled kernel, the autotuner's chosen config and the constexpr values.
Anything unusual (CPU / interpreter, launch hooks set, a kernel whose constexprs do not all follow its runtime
arguments, a Triton without the expected attributes) simply takes Triton's path. ``FA_PLUS_FAST_LAUNCH=0``
(``fa_core.settings.get().fast_launch``) turns the shortcut off (the GPU tests compare both paths bit for bit).

A caller whose launches follow from a signature of its own (shapes, strides, dtypes, scalars) can go one step
further: :func:`record` captures the direct launches of one call, and :meth:`Replay.build` turns them into a
:class:`Replay` that re-issues them with the next call's tensors substituted (its Python and the launchers'
keys skipped). The caller keys the replay on everything its launches derive from; tensors of the recorded
launches that are neither one of the caller's named ``slots`` nor a cached placeholder (:func:`empty_arg`)
make the call not replayable.

The compiled kernel's ``run(gridX, gridY, gridZ, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *args)`` is a private Triton interface: the shortcut is taken only on the Triton
versions it was written and tested for (:data:`TESTED_TRITON`); any other version launches through Triton's
own path (:func:`launcher_supported`).
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Sequence
from itertools import repeat
from operator import and_, eq, itemgetter
from typing import Any

import torch

__all__ = [
    "FastLaunch",
    "Recording",
    "Replay",
    "empty_arg",
    "fast_launch_enabled",
    "record",
    "set_fast_launch",
]

_I32_MIN, _I32_MAX, _U64_FROM = -(2**31), 2**31 - 1, 2**63
#: keyword arguments of a launch that are compile options, not kernel parameters (part of the cache key)
LAUNCH_OPTIONS = frozenset(
    {
        "num_warps",
        "num_stages",
        "num_ctas",
        "maxnreg",
        "enable_fp_fusion",
        "launch_cooperative_grid",
        "launch_pdl",
    }
)
#: ``(major, minor)`` Triton versions whose compiled-kernel launcher signature the shortcut was written and
#: tested against (3.6: the GPU machine). On others (e.g. 3.9, where the CPU tests run the interpreter anyway)
#: every launch takes Triton's own path.
TESTED_TRITON: frozenset[tuple[int, int]] = frozenset({(3, 6)})
#: None: follow ``fa_core.settings.get().fast_launch``; a bool: :func:`set_fast_launch`'s choice
_STATE: dict[str, bool | None] = {"enabled": None}


def launcher_supported(version: str) -> bool:
    """Whether the shortcut may call the compiled launcher of Triton ``version`` (``"3.6.0"``, ``"3.6.0+git..."``)
    directly: only the ``major.minor`` releases of :data:`TESTED_TRITON`."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m.group(1)), int(m.group(2))) in TESTED_TRITON


def _triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # no Triton: nothing to launch
        return "0.0"


#: whether this process's Triton has the launcher signature the shortcut calls (decided once at import)
LAUNCHER_SUPPORTED = launcher_supported(_triton_version())


def fast_launch_enabled() -> bool:
    """The shortcut is on (``set_fast_launch`` if called, else the ``fast_launch`` setting)."""
    enabled = _STATE["enabled"]
    if enabled is None:
        from fa_core import settings

        return settings.get().fast_launch
    return enabled


def set_fast_launch(enabled: bool | None) -> bool:
    """Turn the shortcut on or off (tests compare both paths; None: back to the setting); returns the previous
    effective value."""
    previous = fast_launch_enabled()
    _STATE["enabled"] = None if enabled is None else bool(enabled)
    return previous


def _arg_class(a: Any) -> Any:
    """What Triton's specialization can see of one runtime argument (a superset of it)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, not (a.data_ptr() & 15))
    t = type(a)
    if t is int:
        return (a == 1, not (a & 15), 0 if _I32_MIN <= a <= _I32_MAX else (1 if a < _U64_FROM else 2))
    if t is float:
        return float
    if t is bool:
        return (bool, a)
    if a is None:
        return None
    raise TypeError  # unknown kind: the caller takes Triton's path


def _getter(indices: tuple) -> Any:
    """``f(seq) -> tuple`` of the items at ``indices`` (``operator.itemgetter`` returns a bare item for one)."""
    if not indices:
        return lambda seq: ()
    if len(indices) == 1:
        i = indices[0]
        return lambda seq: (seq[i],)
    return itemgetter(*indices)


_TYPE_PLANS: dict[tuple, tuple] = {}


def _type_plan(types: tuple) -> tuple:
    """Where the tensors and the ints (bools included) of an argument list with these types sit."""
    tensors, ints = [], []
    for i, t in enumerate(types):
        if issubclass(t, torch.Tensor):
            tensors.append(i)
        elif issubclass(t, int):
            ints.append(i)
        elif t is not float and t is not type(None):
            raise TypeError(t)  # unknown kind: the caller takes Triton's path
    return _getter(tuple(tensors)), _getter(tuple(ints))


def _classes(vals: tuple) -> tuple:
    """A hashable key equal for two argument lists only if :func:`_arg_class` is equal at every position
    (the cache key's part that Triton specializes on), at ~1/3 of its cost: a Python call per argument costs
    ~0.5 us, and a launch has ~60 arguments. Per position: its type; for a tensor dtype and 16-byte
    alignment; for an int (bools included) ``== 1``, ``% 16 == 0`` and the 32/64-bit range, through C-level
    ``map``s."""
    types = tuple(map(type, vals))
    plan = _TYPE_PLANS.get(types)
    if plan is None:
        plan = _TYPE_PLANS[types] = _type_plan(types)
    tensors, ints = plan[0](vals), plan[1](vals)
    tkey = tuple([(t.dtype, not (t.data_ptr() & 15)) for t in tensors])
    if not ints:
        return types, tkey
    lo, hi = min(ints), max(ints)
    if lo < _I32_MIN or hi >= _U64_FROM:
        return ("exact", tuple(map(_arg_class, vals)))  # rare: the exact classes
    wide = tuple(map(_I32_MAX.__lt__, ints)) if hi > _I32_MAX else None
    return (
        types,
        tkey,
        tuple(map(and_, ints, repeat(15))),  # finer than "% 16 == 0" (bounded: 16 residues), and cheaper
        tuple(map(eq, ints, repeat(1))),
        wide,
    )


_EMPTY: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def empty_arg(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A zero-size tensor on ``like``'s device: the placeholder for an absent optional pointer argument (its
    kernel branch is compiled out). Cached per (device, dtype): an allocation costs microseconds per launch."""
    key = (like.device, dtype)
    t = _EMPTY.get(key)
    if t is None:
        t = _EMPTY[key] = torch.empty(0, dtype=dtype, device=like.device)
    return t


def _runtime_knobs() -> Any:
    try:
        from triton import knobs

        return knobs.runtime
    except Exception:  # a Triton without knobs: no shortcut
        return None


_RUNTIME = _runtime_knobs()


def _hooks_active() -> bool:
    """Launch hooks (profilers such as proton) need Triton's path and its launch metadata on every call.
    Triton <= 3.6 keeps ``None`` when unset; later versions an empty ``HookChain``."""
    for hook in (_RUNTIME.launch_enter_hook, _RUNTIME.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class FastLaunch:
    """Launch ``kernel`` (a ``@triton.jit`` function, optionally under ``@triton.autotune``) with
    ``launcher(grid, *args, **kwargs)``, same arguments as ``kernel[grid](*args, **kwargs)``.

    ``grid`` is a tuple or a callable of the meta-parameters (constexprs, including the autotuned ones). The
    first argument is a tensor: its device is where the kernel runs (the current device is switched to it for
    the launch when they differ, as flash-attn's CUDA guard does)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        jit = kernel
        while not hasattr(jit, "params") and getattr(jit, "fn", None) is not None:
            jit = jit.fn  # under @triton.autotune / @triton.heuristics
        self.jit = jit
        params = list(getattr(jit, "params", None) or [])
        flags = [bool(getattr(p, "is_constexpr", False)) for p in params]
        n_rt = flags.index(True) if True in flags else len(flags)
        self.names: list[str] = [p.name for p in params]
        self.runtime_names = self.names[:n_rt]
        self.const_names = self.names[n_rt:]
        # the shortcut needs the runtime arguments first, then constexprs only (as Triton passes them all)
        self.ok = bool(params) and all(flags[n_rt:]) and _RUNTIME is not None
        self.tune_keys: list[str] = list(getattr(kernel, "keys", None) or [])
        self._cache: dict[tuple, tuple] = {}
        #: the autotuner's config of the last launch through this launcher (benchmarks record it)
        self.last_config: Any = None
        self._layout: dict[tuple, tuple | None] = {}  # (n positional, kwargs names) -> lookup plan

    # ------------------------------------------------------------------------------------------ plan
    def _plan(self, n_pos: int, kw_names: tuple[str, ...]) -> tuple | None:
        """Which kwargs are runtime values (in signature order) and which are caller constexprs; where the
        autotune key's runtime values sit. None: this calling convention cannot take the shortcut."""
        rt_kw = self.runtime_names[n_pos:]
        kwset = set(kw_names)
        if not set(rt_kw) <= kwset:
            return None
        # caller constexprs and compile options (num_warps, ...): both are key values, not runtime arguments
        given_const = tuple(n for n in self.const_names if n in kwset) + tuple(
            n for n in kw_names if n in LAUNCH_OPTIONS
        )
        if len(rt_kw) + len(given_const) != len(kw_names):
            return None  # an unknown keyword: Triton's path raises the proper error
        rt_index = {n: i for i, n in enumerate(self.runtime_names)}
        key_rt = tuple(rt_index[k] for k in self.tune_keys if k in rt_index)
        return tuple(rt_kw), given_const, key_rt, _getter(tuple(rt_kw)), _getter(given_const), _getter(key_rt)

    # ------------------------------------------------------------------------------------------ launch
    def __call__(self, grid: Any, *args: Any, **kwargs: Any) -> None:
        first = args[0]
        rec: Recording | None = getattr(_TLS, "rec", None)
        if rec is not None:
            rec.calls += 1  # replayable only if every call records a direct launch
        if not first.is_cuda:  # the CPU interpreter
            self.kernel[grid](*args, **kwargs)
            return
        device = first.get_device()
        if device != torch._C._cuda_getDevice():  # torch.cuda.current_device() without its init check
            # Triton launches on the current device: guard it to the inputs' one, as flash-attn's CUDAGuard does
            with torch.cuda.device(device):
                self._launch(grid, device, args, kwargs)
            return
        self._launch(grid, device, args, kwargs, rec)

    def _launch(
        self, grid: Any, device: int, args: tuple, kwargs: dict, rec: Recording | None = None
    ) -> None:
        if not (self.ok and LAUNCHER_SUPPORTED and fast_launch_enabled()):
            self.kernel[grid](*args, **kwargs)
            return
        layout_key = (len(args), tuple(kwargs))
        if layout_key not in self._layout:
            self._layout[layout_key] = self._plan(len(args), layout_key[1])
        plan = self._layout[layout_key]
        if plan is None:
            self.kernel[grid](*args, **kwargs)
            return
        get_rt, get_const, get_key = plan[3:]
        vals = args + get_rt(kwargs)
        try:
            classes = _classes(vals)
        except TypeError:
            self.kernel[grid](*args, **kwargs)
            return
        key = (device, layout_key, classes, get_const(kwargs), get_key(vals))
        entry = self._cache.get(key)
        if entry is None or _hooks_active():
            self._slow(key, grid, args, kwargs)
            return
        run, function, packed, tail, meta, self.last_config = entry
        if callable(grid):
            try:
                g = grid(meta)
            except KeyError:  # a grid that reads runtime arguments: Triton's path gives it all of them
                self.kernel[grid](*args, **kwargs)
                return
        else:
            g = grid
        stream = torch._C._cuda_getCurrentRawStream(device)
        g0, g1, g2 = g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1
        run(g0, g1, g2, stream, function, packed, None, None, None, *vals, *tail)
        if rec is not None:
            rec.steps.append((self, run, g0, g1, g2, function, packed, vals, tail, self.last_config, device))

    def _slow(self, key: tuple, grid: Any, args: tuple, kwargs: dict) -> None:
        compiled = self.kernel[grid](*args, **kwargs)
        self.last_config = getattr(self.kernel, "best_config", None) if self.tune_keys else None
        if _hooks_active():
            return
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")):
            return
        config = self.last_config
        full = {**kwargs, **(config.kwargs if config is not None else {})}
        try:
            tail = tuple(full[n] for n in self.const_names)
        except KeyError:
            return  # a constexpr left to its default: not worth special-casing
        # constexprs only: the grid callable reads the meta-parameters; no caller tensors kept alive
        meta = dict(zip(self.const_names, tail))
        self._cache[key] = (compiled.run, compiled.function, compiled.packed_metadata, tail, meta, config)

    def clear(self) -> None:
        self._cache.clear()


# ------------------------------------------------------------------------------------------ replay
_TLS = threading.local()


class Recording:
    """The direct launches made inside :func:`record` on this thread: ``steps`` (one per direct launch) and
    ``calls`` (launcher calls; more than steps when one took Triton's own path, which cannot be replayed)."""

    __slots__ = ("calls", "steps")

    def __init__(self) -> None:
        self.steps: list[tuple] = []
        self.calls = 0


@contextlib.contextmanager
def record() -> Iterator[Recording]:
    """Capture the launches of the :class:`FastLaunch` calls made inside the block (this thread only).

    The block must do nothing else a replay would have to repeat: a tensor made inside it and passed to a
    launch makes the recording unreplayable (it is no slot), but an in-place torch op on a slot tensor would
    be silently left out of the replay."""
    rec = Recording()
    previous = getattr(_TLS, "rec", None)
    _TLS.rec = rec
    try:
        yield rec
    finally:
        _TLS.rec = previous


class Replay:
    """Recorded direct launches, re-issued with new tensors: ``replay(slots)`` launches every recorded step with
    the tensors of ``slots`` (same order as given to :meth:`build`) in place of the recorded ones.

    The caller guarantees that the new call has the recorded call's signature: same shapes, strides, dtypes,
    16-byte alignment, device and scalar options (everything the launches' arguments and the launcher's cache
    key were derived from). ``replay`` returns False, launching nothing, where the launch path must be taken
    instead (the shortcut switched off, launch hooks set, another current device, None in a slot that held a
    tensor). Each launch goes through the compiled kernel's launcher as a direct launch does: its global scratch,
    if any, comes from Triton's allocator (stream-ordered, and in the graph's pool under capture).

    Tensors reach the launcher as their addresses (ints): for a tensor object the launcher calls ``data_ptr``
    and then asks the driver to validate the pointer (``cuPointerGetAttribute``), once per pointer argument of
    every launch, which a replayed signature (device tensors of the recorded call's device) does not need."""

    __slots__ = ("device", "keep", "required", "steps")

    def __init__(
        self, steps: list[tuple], device: int, required: tuple[int, ...] = (), keep: tuple = ()
    ) -> None:
        self.steps = steps
        self.device = device
        #: the slots that held a tensor the recorded launches took
        self.required = required
        #: the placeholder tensors whose addresses the steps hold (kept alive with them)
        self.keep = keep

    @classmethod
    def build(cls, rec: Recording, slots: Sequence[torch.Tensor | None]) -> Replay | None:
        """A replay of ``rec`` where each tensor argument is one of ``slots`` (by identity) or a cached
        placeholder; None when the recording is incomplete or empty, when two slots are one tensor (which
        slot a recorded argument stands for would be ambiguous), or when a launch took another tensor."""
        if rec.calls != len(rec.steps) or not rec.steps:
            return None
        index: dict[int, int] = {}
        for slot, t in enumerate(slots):
            if t is None:
                continue
            if id(t) in index:
                return None
            index[id(t)] = slot
        placeholders = {id(t) for t in _EMPTY.values()}
        devices = {step[-1] for step in rec.steps}
        if len(devices) != 1:
            return None
        steps = []
        keep = []
        for launcher, run, g0, g1, g2, function, packed, vals, tail, config, _ in rec.steps:
            template = list(vals)
            subs = []
            for i, x in enumerate(vals):
                if isinstance(x, torch.Tensor):
                    j = index.get(id(x))
                    if j is not None:
                        subs.append((i, j))
                        template[i] = None  # no recorded tensor kept alive
                    elif id(x) in placeholders:
                        template[i] = x.data_ptr()
                        keep.append(x)
                    else:
                        return None
            steps.append((launcher, run, g0, g1, g2, function, packed, template, tuple(subs), tail, config))
        required = tuple(sorted({j for step in steps for _, j in step[8]}))
        return cls(steps, devices.pop(), required, tuple(keep))

    def __call__(self, slots: Sequence[torch.Tensor | None]) -> bool:
        if not fast_launch_enabled() or _hooks_active():
            return False
        for j in self.required:
            if slots[j] is None:  # a slot recorded with a tensor: the launches would get a null pointer
                return False
        device = self.device
        if torch._C._cuda_getDevice() != device:
            return False
        stream = torch._C._cuda_getCurrentRawStream(device)
        for launcher, run, g0, g1, g2, function, packed, template, subs, tail, config in self.steps:
            vals = template.copy()
            for i, j in subs:
                vals[i] = slots[j].data_ptr()  # a required slot: checked above to hold a tensor
            run(g0, g1, g2, stream, function, packed, None, None, None, *vals, *tail)
            launcher.last_config = config
        return True
