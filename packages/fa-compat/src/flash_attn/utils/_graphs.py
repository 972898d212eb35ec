"""CUDA-graph decoding of :mod:`flash_attn.utils.generation` (re-exported there): the decoding step of a model
captured once per ``(batch, seqlen)`` and replayed with :class:`DecodingCGCache`, :func:`update_graph_cache`,
:func:`capture_graph`; and :func:`allocate_inference_cache`, the KV caches those graphs use."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flash_attn.utils.generation import InferenceParams

__all__ = ["DecodingCGCache", "allocate_inference_cache", "capture_graph", "update_graph_cache"]


def allocate_inference_cache(
    max_batch_size: int,
    max_seqlen: int,
    nheads: int,
    headdim: int,
    layers: int | Sequence[Any],
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float16,
) -> dict[Any, Tensor]:
    """Empty KV caches ``{layer: (max_batch_size, max_seqlen, 2, nheads, headdim)}`` for ``layers`` (a count
    -> keys ``0..layers-1``, or the keys); dtype float16 / bfloat16 / float32."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"allocate_inference_cache: dtype must be float16 / bfloat16 / float32, got {dtype}")
    keys = range(layers) if isinstance(layers, int) else layers
    shape = (max_batch_size, max_seqlen, 2, nheads, headdim)
    return {key: torch.empty(shape, device=device, dtype=dtype) for key in keys}


@dataclass
class DecodingCGCache:
    """CUDA graphs of a model's decoding step, kept on the model as ``model._decoding_cache``.

    Attributes:
        max_batch_size, max_seqlen, device, dtype: what the caches were allocated for; a request beyond them
            (or on another device / dtype) re-allocates and re-captures.
        callables: ``(batch_size, decoding_seqlen) -> run(input_ids, position_ids, seqlen) -> logits``.
        mempool: the graphs' shared memory pool. inference_params: the state the graphs were captured with
            (its caches and ``lengths_per_sample`` are the graphs' static buffers).
        run: ``run(input_ids (batch, S), position_ids (batch, S), seqlen_offset) -> logits (batch, S, vocab)``,
            dispatching on ``(batch, S)``.
    """

    max_batch_size: int = 0
    max_seqlen: int = 0
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    callables: dict[tuple[int, int], Callable[[Tensor, Tensor, int], Tensor]] = field(default_factory=dict)
    mempool: Any = None
    inference_params: InferenceParams | None = None
    run: Callable[[Tensor, Tensor, int], Tensor] | None = None


def _model_kv_caches(
    model: Any,
    batch_size: int,
    max_seqlen: int,
    dtype: torch.dtype,
    device: torch.device,
    tensor_parallel: int,
) -> dict[Any, Any]:
    """``model.allocate_inference_cache``, else caches shaped from ``model.config`` (HF-style fields)."""
    allocate = getattr(model, "allocate_inference_cache", None)
    if allocate is not None:
        try:
            return dict(allocate(batch_size, max_seqlen, dtype))
        except NotImplementedError:
            pass
    config = model.config
    headdim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return allocate_inference_cache(
        batch_size,
        max_seqlen,
        config.num_attention_heads // tensor_parallel,
        headdim,
        config.num_hidden_layers,
        device,
        dtype,
    )


@torch.inference_mode()
def update_graph_cache(
    model: Any,
    cache: DecodingCGCache | None,
    batch_size: int,
    seqlen_og: int,
    max_seqlen: int,
    decoding_seqlens: Sequence[int] = (1,),
    tensor_parallel: int = 1,
    dtype: torch.dtype | None = None,
    n_warmups: int = 2,
) -> DecodingCGCache:
    """Make ``cache`` (a new one when None) hold a graph for each ``(batch_size, s)``, ``s`` in
    ``decoding_seqlens`` (tokens per decoding step).

    The KV caches (``(batch_size, max_seqlen, ...)`` per layer, of ``dtype``, default the model's parameter
    dtype) and the CUDA memory pool are re-created, and every graph dropped, when the device / dtype change or
    ``batch_size`` / ``max_seqlen`` exceed what the cache holds; otherwise only missing graphs are captured.
    Return:
        ``cache`` with ``run`` set and ``inference_params.seqlen_offset`` reset to 0.
    """
    if cache is None:
        cache = DecodingCGCache()
    param = next(iter(model.parameters()))
    device = param.device
    dtype = param.dtype if dtype is None else dtype
    if (
        (device, dtype) != (cache.device, cache.dtype)
        or batch_size > cache.max_batch_size
        or max_seqlen > cache.max_seqlen
    ):
        cache.callables = {}
        cache.mempool = None
        cache.inference_params = None
        gc.collect()
        cache.device, cache.dtype = device, dtype
        cache.max_batch_size, cache.max_seqlen = batch_size, max_seqlen
        kv_caches = _model_kv_caches(model, batch_size, max_seqlen, dtype, device, tensor_parallel)
        from flash_attn.utils.generation import InferenceParams

        cache.inference_params = InferenceParams(
            max_seqlen=max_seqlen,
            max_batch_size=batch_size,
            seqlen_offset=seqlen_og,
            key_value_memory_dict=kv_caches,
            lengths_per_sample=torch.full((batch_size,), seqlen_og, dtype=torch.int32, device=device),
        )
        cache.mempool = torch.cuda.graphs.graph_pool_handle()
    inference_params = cache.inference_params
    assert inference_params is not None
    for decoding_seqlen in decoding_seqlens:
        if (batch_size, decoding_seqlen) not in cache.callables:
            cache.callables[batch_size, decoding_seqlen] = capture_graph(
                model,
                inference_params,
                batch_size,
                max_seqlen,
                decoding_seqlen=decoding_seqlen,
                mempool=cache.mempool,
                n_warmups=n_warmups,
            )
    callables = cache.callables

    def dispatch(input_ids: Tensor, position_ids: Tensor, seqlen: int) -> Tensor:
        return callables[input_ids.shape[0], input_ids.shape[1]](input_ids, position_ids, seqlen)

    cache.run = dispatch
    inference_params.seqlen_offset = 0
    return cache


def capture_graph(
    model: Any,
    inference_params: InferenceParams,
    batch_size: int,
    max_seqlen: int,
    decoding_seqlen: int = 1,
    mempool: Any = None,
    n_warmups: int = 2,
) -> Callable[[Tensor, Tensor, int], Tensor]:
    """Capture one decoding step of ``decoding_seqlen`` tokens for ``batch_size`` sequences in a CUDA graph.

    The step is traced as a decoding step (``seqlen_offset = max_seqlen - decoding_seqlen`` during the
    capture, restored afterwards) after ``n_warmups`` eager calls on a side stream; the token ids, the
    position ids and ``inference_params.lengths_per_sample`` are its static inputs.
    Return:
        ``run(input_ids, position_ids, seqlen)``: copies ``input_ids`` / ``position_ids`` ``(batch_size,
        decoding_seqlen)`` into the static inputs, sets ``lengths_per_sample`` to ``seqlen`` (the tokens
        already cached), replays, and returns a copy of the logits ``(batch_size, decoding_seqlen, vocab)``.
    """
    if inference_params.lengths_per_sample is None:
        raise ValueError("capture_graph needs inference_params.lengths_per_sample (an int32 device tensor)")
    lengths = inference_params.lengths_per_sample
    device = next(iter(model.parameters())).device
    static_ids = torch.zeros(batch_size, decoding_seqlen, dtype=torch.long, device=device)
    static_positions = torch.zeros(batch_size, decoding_seqlen, dtype=torch.long, device=device)
    saved_offset = inference_params.seqlen_offset
    inference_params.seqlen_offset = max_seqlen - decoding_seqlen
    lengths[:] = inference_params.seqlen_offset

    def step() -> Tensor:
        return model(
            static_ids,
            position_ids=static_positions,
            inference_params=inference_params,
            num_last_tokens=decoding_seqlen,
        ).logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(n_warmups):
            step()
        side.synchronize()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=mempool):
        static_logits = step()
    inference_params.seqlen_offset = saved_offset

    def run(input_ids: Tensor, position_ids: Tensor, seqlen: int) -> Tensor:
        lengths[:] = seqlen
        static_ids.copy_(input_ids)
        static_positions.copy_(position_ids)
        graph.replay()
        return static_logits.clone()

    return run
