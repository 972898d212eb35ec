"""``flash_attn.utils.benchmark``: time, profile and measure the memory of an arbitrary function.

The timing helpers wrap ``fn(*inputs, **kwinputs)`` in a :class:`torch.utils.benchmark.Timer` (which
synchronizes CUDA around each measurement and runs with ``torch.get_num_threads()`` threads) and return the
timer and its :class:`~torch.utils.benchmark.Measurement` of ``repeats`` runs:

* :func:`benchmark_forward`: ``fn`` itself;
* :func:`benchmark_backward`: ``y.backward(grad)`` of one forward output ``y`` (the graph is kept, so every
  run back-propagates the same graph);
* :func:`benchmark_combined`: forward + backward in each run;
* :func:`benchmark_fwd_bwd` / :func:`benchmark_all`: the first two / all three, as a tuple.

``fn`` may return a tensor or a tuple whose first element is the tensor to differentiate. ``amp=True`` runs
the forward under ``torch.autocast`` with ``amp_dtype`` (on CUDA when a CUDA device is present, else on the
CPU). The backward helpers reset ``.grad`` of the tensor inputs before each run so that gradient accumulation
is not timed. :func:`pytorch_profiler` prints / exports a ``torch.profiler`` trace of one call after 30
warm-up calls; :func:`benchmark_memory` returns the peak CUDA memory of one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.benchmark import Measurement, Timer

__all__ = [
    "benchmark_all",
    "benchmark_backward",
    "benchmark_combined",
    "benchmark_forward",
    "benchmark_fwd_bwd",
    "benchmark_memory",
    "pytorch_profiler",
]


@contextmanager
def _amp(enabled: bool, dtype: torch.dtype) -> Iterator[None]:
    """``torch.autocast`` with ``dtype`` when ``enabled``, on CUDA if available, else on the CPU."""
    if not enabled:
        yield
        return
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def _main_output(y: Any) -> Tensor:
    """The tensor to differentiate: ``y``, or ``y[0]`` when ``fn`` returns a tuple."""
    return y[0] if isinstance(y, tuple) else y


def _reset_grads(inputs: tuple[Any, ...]) -> None:
    """Set ``.grad = None`` on the tensor inputs (no accumulation in the timed backward)."""
    for x in inputs:
        if isinstance(x, Tensor):
            x.grad = None


def _output_and_grad(
    fn: Callable[..., Any],
    inputs: tuple[Any, ...],
    kwinputs: dict[str, Any],
    grad: Tensor | None,
    amp: bool,
    amp_dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """One forward ``y`` and the output gradient: ``grad`` (same shape as ``y``) or ``randn_like(y)``."""
    with _amp(amp, amp_dtype):
        y = _main_output(fn(*inputs, **kwinputs))
    if grad is None:
        grad = torch.randn_like(y)
    elif grad.shape != y.shape:
        raise RuntimeError("Grad shape does not match output shape")
    return y, grad


def _timeit(stmt: str, env: dict[str, Any], repeats: int, verbose: bool) -> tuple[Timer, Measurement]:
    timer = Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
    measurement = timer.timeit(repeats)
    if verbose:
        print(measurement)
    return timer, measurement


def benchmark_forward(
    fn: Callable[..., Any],
    *inputs: Any,
    repeats: int = 10,
    desc: str = "",
    verbose: bool = True,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    **kwinputs: Any,
) -> tuple[Timer, Measurement]:
    """Time ``fn(*inputs, **kwinputs)`` (the forward pass) over ``repeats`` runs.

    Return:
        ``(timer, measurement)``: the :class:`torch.utils.benchmark.Timer` and its ``timeit(repeats)``
        result (``measurement.mean`` is the time of one call in seconds).
    """
    if verbose:
        print(desc, "- Forward pass")

    def forward(*args: Any, **kwargs: Any) -> None:
        with _amp(amp, amp_dtype):
            fn(*args, **kwargs)

    env = {"forward": forward, "inputs": inputs, "kwinputs": kwinputs}
    return _timeit("forward(*inputs, **kwinputs)", env, repeats, verbose)


def benchmark_backward(
    fn: Callable[..., Any],
    *inputs: Any,
    grad: Tensor | None = None,
    repeats: int = 10,
    desc: str = "",
    verbose: bool = True,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    **kwinputs: Any,
) -> tuple[Timer, Measurement]:
    """Time the backward pass of ``fn``: one forward, then ``y.backward(grad, retain_graph=True)`` per run.

    Arguments:
        grad: the output gradient, of ``y``'s shape (``RuntimeError`` otherwise); default ``randn_like(y)``.
    Return:
        ``(timer, measurement)`` as :func:`benchmark_forward`.
    """
    if verbose:
        print(desc, "- Backward pass")
    y, grad = _output_and_grad(fn, inputs, kwinputs, grad, amp, amp_dtype)

    def backward(*args: Any, y: Tensor, grad: Tensor) -> None:
        _reset_grads(args)
        y.backward(grad, retain_graph=True)

    env = {"backward": backward, "inputs": inputs, "y": y, "grad": grad}
    return _timeit("backward(*inputs, y=y, grad=grad)", env, repeats, verbose)


def benchmark_combined(
    fn: Callable[..., Any],
    *inputs: Any,
    grad: Tensor | None = None,
    repeats: int = 10,
    desc: str = "",
    verbose: bool = True,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    **kwinputs: Any,
) -> tuple[Timer, Measurement]:
    """Time forward + backward of ``fn`` in each run (``grad`` as :func:`benchmark_backward`).

    Return:
        ``(timer, measurement)`` as :func:`benchmark_forward`.
    """
    if verbose:
        print(desc, "- Forward + Backward pass")
    _, grad = _output_and_grad(fn, inputs, kwinputs, grad, amp, amp_dtype)

    def forward_backward(grad: Tensor, *args: Any, **kwargs: Any) -> None:
        _reset_grads(args)
        with _amp(amp, amp_dtype):
            y = _main_output(fn(*args, **kwargs))
        y.backward(grad, retain_graph=True)

    env = {"forward_backward": forward_backward, "inputs": inputs, "grad": grad, "kwinputs": kwinputs}
    return _timeit("forward_backward(grad, *inputs, **kwinputs)", env, repeats, verbose)


def benchmark_fwd_bwd(
    fn: Callable[..., Any],
    *inputs: Any,
    grad: Tensor | None = None,
    repeats: int = 10,
    desc: str = "",
    verbose: bool = True,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    **kwinputs: Any,
) -> tuple[tuple[Timer, Measurement], tuple[Timer, Measurement]]:
    """:func:`benchmark_forward` and :func:`benchmark_backward` of ``fn``.

    Return:
        ``((timer, measurement) forward, (timer, measurement) backward)``.
    """
    common: dict[str, Any] = dict(repeats=repeats, desc=desc, verbose=verbose, amp=amp, amp_dtype=amp_dtype)
    return (
        benchmark_forward(fn, *inputs, **common, **kwinputs),
        benchmark_backward(fn, *inputs, grad=grad, **common, **kwinputs),
    )


def benchmark_all(
    fn: Callable[..., Any],
    *inputs: Any,
    grad: Tensor | None = None,
    repeats: int = 10,
    desc: str = "",
    verbose: bool = True,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    **kwinputs: Any,
) -> tuple[tuple[Timer, Measurement], tuple[Timer, Measurement], tuple[Timer, Measurement]]:
    """:func:`benchmark_forward`, :func:`benchmark_backward` and :func:`benchmark_combined` of ``fn``.

    Return:
        ``(forward, backward, combined)``, each ``(timer, measurement)``.
    """
    common: dict[str, Any] = dict(repeats=repeats, desc=desc, verbose=verbose, amp=amp, amp_dtype=amp_dtype)
    return (
        benchmark_forward(fn, *inputs, **common, **kwinputs),
        benchmark_backward(fn, *inputs, grad=grad, **common, **kwinputs),
        benchmark_combined(fn, *inputs, grad=grad, **common, **kwinputs),
    )


def pytorch_profiler(
    fn: Callable[..., Any],
    *inputs: Any,
    trace_filename: str | None = None,
    backward: bool = False,
    amp: bool = False,
    amp_dtype: torch.dtype = torch.float16,
    cpu: bool = False,
    verbose: bool = True,
    **kwinputs: Any,
) -> None:
    """Profile one call of ``fn`` (and its backward with ``backward=True``) after 30 warm-up calls.

    Records CUDA activity when a CUDA device is present, CPU activity with ``cpu=True`` (or when there is
    no CUDA device), with shapes and stacks. ``verbose`` prints the 50 top rows of the key averages;
    ``trace_filename`` exports a Chrome trace there. The backward uses ``randn_like`` of the output.
    """
    g: Tensor | None = None
    if backward:
        with _amp(amp, amp_dtype):
            g = torch.randn_like(_main_output(fn(*inputs, **kwinputs)))

    def step() -> None:
        if backward:
            _reset_grads(inputs)
        with _amp(amp, amp_dtype):
            out = _main_output(fn(*inputs, **kwinputs))
        if g is not None:  # outside autocast, like a training step
            out.backward(g, retain_graph=True)

    for _ in range(30):
        step()
    activities = []
    if cpu or not torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CPU)
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        step()
    if verbose:
        print(prof.key_averages().table(row_limit=50))
    if trace_filename is not None:
        prof.export_chrome_trace(trace_filename)


def benchmark_memory(
    fn: Callable[..., Any], *inputs: Any, desc: str = "", verbose: bool = True, **kwinputs: Any
) -> float:
    """Peak CUDA memory allocated during one call of ``fn(*inputs, **kwinputs)``.

    Return:
        ``torch.cuda.max_memory_allocated() / (2**20 * 1000)`` after resetting the peak statistics (flash-attn's
        "GB": MiB / 1000), including what was already allocated before the call. Needs a CUDA device.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("benchmark_memory measures CUDA memory and needs a CUDA device")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    fn(*inputs, **kwinputs)
    torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() / ((2**20) * 1000)
    if verbose:
        print(f"{desc} max memory: {mem}GB")
    torch.cuda.empty_cache()
    return mem
