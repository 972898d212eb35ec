"""``flash_attn.ops.fused_dense``: flash-attn 2.8.x's dense layers, MLP and their tensor-parallel variants, in
plain PyTorch + ``torch.distributed`` (any device, CPU included).

* :class:`FusedDenseFunc` / :func:`fused_dense_func` / :class:`FusedDense`: ``F.linear``, optionally returning
  its input too (``return_residual``) and, with a process group, all-gathering the input along dim 0 first
  (sequence parallelism); the backward reduce-scatters (``sequence_parallel``) or all-reduces the input
  gradient.
* :class:`ColumnParallelLinear`: an ``nn.Linear`` holding this rank's share of the output features (split in
  units of ``multiple_of`` with :func:`flash_attn.utils.distributed.get_dim_for_local_rank`); the input is
  all-gathered first when ``sequence_parallel``, else it is already the full input on every rank.
* :class:`RowParallelLinear`: an ``nn.Linear`` holding this rank's share of the input features (the bias only
  on the group's first rank); the partial outputs are summed by a reduce-scatter along dim 0
  (``sequence_parallel``) or an all-reduce.
* :class:`FusedMLPFunc` / :func:`fused_mlp_func` / :class:`FusedMLP`: ``fc2(activation(fc1(x)))`` with
  ``activation`` one of ``"gelu_approx"`` (tanh GeLU), ``"relu"``, ``"sqrelu"`` (squared ReLU), and
  ``checkpoint_lvl`` saying what the backward recomputes (0: nothing; 1: the activation output; 2: also the
  pre-activation, i.e. only the input and the weights are kept). ``save_pre_act=False`` means level 2.
* :class:`ParallelFusedMLP`: :class:`FusedMLP` with a :class:`ColumnParallelLinear` ``fc1`` and a
  :class:`RowParallelLinear` ``fc2``, finished by a reduce-scatter (``sequence_parallel``) or an all-reduce.

Names, signatures, defaults, parameter names (``weight`` / ``bias``, ``fc1`` / ``fc2``) and local shapes are
flash-attn's, so state dicts and call sites carry over. flash-attn runs these through its CUDA extension
``fused_dense_lib`` (cuBLASLt GEMM + bias / activation epilogues); here every product is ``F.linear`` / a
matmul and the activation an element-wise PyTorch expression (``F.gelu(approximate="tanh")`` and its ATen
backward, ``F.relu``, squared ReLU). Hence:

* ``heuristic`` (the cuBLASLt epilogue algorithm) is accepted and checked (an int in ``[-1, 4]`` or, in the
  modules, ``"auto"``) but has no effect: the computation is always flash-attn's unfused ``heuristic=-1`` one.
* flash-attn falls back to plain PyTorch without the process group for CPU tensors, fp32 tensors outside
  autocast and (MLP) some hidden sizes; here the same code runs for every device and dtype, with the process
  group and ``checkpoint_lvl`` honoured everywhere. Its 2M limit on the matrix dimensions does not apply.
* Under ``torch.autocast`` (on the input's device type) the Functions cast the input, weights and biases to the
  autocast dtype, and the backward runs under the forward's autocast state.
* The all-gather of the input overlaps the weights' dtype cast in the forward and the input-gradient GEMM in
  the backward (asynchronous collectives, as in flash-attn); the backward re-gathers the input rather than
  keeping the gathered copy.

Differences from flash-attn, all supersets or fixes:

* ``process_group=None`` in the parallel classes means one process: the full layer, no communication
  (flash-attn's ``ColumnParallelLinear`` / ``RowParallelLinear`` then split by the default group without
  communicating, ``ParallelFusedMLP`` asserts).
* With ``return_residual`` and a process group, the residual's gradient is added to this rank's input gradient
  after the reduction (flash-attn adds it before: a shape error with sequence parallelism, and ``world_size``
  copies of it with the all-reduce).
* ``fused_mlp_func`` applies squared ReLU for ``activation="sqrelu"`` on every path (flash-attn's PyTorch
  fallback applies ReLU); any ``heuristic`` in ``[-1, 4]`` is accepted with ``"sqrelu"`` (flash-attn's
  fused path asserts -1).
* A bias gradient with a frozen weight is the sum over the rows (flash-attn's extension path returns the
  un-summed output gradient).
* Invalid arguments raise ``ValueError`` where flash-attn fails an ``assert``.
"""

from __future__ import annotations

from flash_attn.ops._dense_layers import (
    ColumnParallelLinear,
    FusedDense,
    FusedDenseFunc,
    RowParallelLinear,
    fused_dense_func,
)
from flash_attn.ops._mlp_layers import FusedMLP, FusedMLPFunc, ParallelFusedMLP, fused_mlp_func

__all__ = [
    "ColumnParallelLinear",
    "FusedDense",
    "FusedDenseFunc",
    "FusedMLP",
    "FusedMLPFunc",
    "ParallelFusedMLP",
    "RowParallelLinear",
    "fused_dense_func",
    "fused_mlp_func",
]
