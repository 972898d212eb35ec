"""``flash_attn.utils.generation``: autoregressive decoding with a KV cache, flash-attn 2.8.x's API.

The model is any callable ``model(input_ids, position_ids=None, inference_params=None, num_last_tokens=0)``
returning an object with ``.logits`` ``(batch, num_last_tokens or seqlen, vocab)`` whose attention layers
(e.g. :class:`flash_attn.modules.mha.MHA` with ``layer_idx``) keep their keys / values in
``inference_params.key_value_memory_dict`` and read ``seqlen_offset`` / ``lengths_per_sample``:

* :class:`InferenceParams`: the generation state handed to every layer;
* :func:`sample` and the logits filters :func:`modify_logits_for_top_k_filtering`,
  :func:`modify_logits_for_top_p_filtering`, :func:`modify_logit_for_repetition_penalty`;
* :func:`decode`: prefill the prompt, then one token per step (greedy, top-k, top-p, temperature,
  repetition penalty, teacher forcing, EOS), optionally replaying CUDA graphs of the decoding step
  (``cg=True``: :class:`DecodingCGCache`, :func:`update_graph_cache`, :func:`capture_graph`);
* :func:`sample_speculative` / :func:`decode_speculative`: speculative decoding with a draft model;
* :class:`GenerationMixin`: ``model.generate(...)`` on top of :func:`decode`.

Decisions that differ from flash-attn 2.8.x (supersets unless noted):

* the outputs are this module's :class:`GreedySearchDecoderOnlyOutput` / :class:`SampleDecoderOnlyOutput`
  (mutable dataclasses with ``sequences`` and ``scores`` that also unpack and index like flash-attn's
  namedtuple fallback), never HF transformers' classes: importing transformers is slow and its 5.x releases
  no longer define these names;
* invalid arguments raise ``ValueError`` instead of failing an ``assert``;
* ``repetition_penalty`` (CTRL-style, :func:`modify_logit_for_repetition_penalty`) is an extra keyword of
  :func:`decode` and :func:`decode_speculative`; ``enable_timing`` also works on the CPU (wall clock);
* :func:`modify_logits_for_top_p_filtering` and :func:`sample_speculative` handle any batch layout / size
  (flash-attn's assume 2-D logits / batch size 1); :func:`decode_speculative` supports ``eos_token_id``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DecodingCGCache",
    "GenerationMixin",
    "GreedySearchDecoderOnlyOutput",
    "InferenceParams",
    "SampleDecoderOnlyOutput",
    "allocate_inference_cache",
    "capture_graph",
    "decode",
    "decode_speculative",
    "modify_logit_for_repetition_penalty",
    "modify_logits_for_top_k_filtering",
    "modify_logits_for_top_p_filtering",
    "sample",
    "sample_speculative",
    "update_graph_cache",
]


@dataclass
class InferenceParams:
    """Generation state passed to the model and on to each attention layer.

    Attributes:
        max_seqlen: capacity of the KV caches (positions); max_batch_size: their batch capacity.
        seqlen_offset: number of tokens already in the caches (0 while prefilling the prompt).
        batch_size_offset: first cache row of this batch.
        key_value_memory_dict: ``layer_idx -> cache`` (for :class:`~flash_attn.modules.mha.MHA`
            ``(max_batch_size, max_seqlen, 2, H_k, D)``), filled by the layers on the first call.
        lengths_per_sample: optional int32 ``(batch,)`` per-sequence cache lengths; when set, the attention
            reads lengths from it instead of ``seqlen_offset`` (CUDA-graph decoding sets it before each replay).
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict[Any, Any] = field(default_factory=dict)
    lengths_per_sample: Tensor | None = None

    def reset(self, max_seqlen: int, max_batch_size: int) -> None:
        """Start a new generation with the same caches: new capacities, ``seqlen_offset = 0`` and
        ``lengths_per_sample`` zeroed (the cache tensors are kept, their contents are overwritten)."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


# ------------------------------------------------------------------------------------------- sampling
def modify_logits_for_top_k_filtering(logits: Tensor, top_k: int) -> None:
    """In place: set every logit below the ``top_k``-th largest of its row to ``-inf``.

    logits: ``(..., vocab)``; ties with the ``top_k``-th value are kept. ``top_k`` is clamped to the vocab.
    """
    top_k = min(top_k, logits.shape[-1])
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    logits.masked_fill_(logits < kth_largest, float("-inf"))


def modify_logits_for_top_p_filtering(logits: Tensor, top_p: float) -> None:
    """In place: nucleus filtering, keep the smallest set of most likely tokens whose probability reaches
    ``top_p``, set the other logits to ``-inf``.

    logits: ``(..., vocab)``. A token is dropped when the total probability of the tokens at most as likely
    as it (itself included, in ascending order) is ``<= 1 - top_p``; the most likely token is always kept.
    No-op for ``top_p <= 0`` or ``top_p >= 1``.
    """
    if top_p <= 0.0 or top_p >= 1.0:
        return
    ascending, order = torch.sort(logits, dim=-1, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    logits.masked_fill_(drop, float("-inf"))


def modify_logit_for_repetition_penalty(
    logits: Tensor, prev_output_tokens: Tensor, repetition_penalty: float = 1.0
) -> Tensor:
    """In place (and returned): penalize every token that occurs in ``prev_output_tokens`` (CTRL,
    Keskar et al. 2019): its positive logit is divided by ``repetition_penalty``, a negative one multiplied.

    Arguments:
        logits: ``(batch, vocab)``.
        prev_output_tokens: int64 ``(batch, seqlen)``, the tokens so far (prompt included); a repeated token
            is penalized once.
        repetition_penalty: ``> 0``; 1.0 leaves ``logits`` unchanged, > 1 discourages repetition.
    """
    if repetition_penalty == 1.0:
        return logits
    seen = logits.gather(1, prev_output_tokens)
    penalized = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
    return logits.scatter_(1, prev_output_tokens, penalized)


def _check_top_p(top_p: float) -> None:
    if top_p > 1.0:
        raise ValueError(f"top-p should be in (0, 1], got {top_p}")


def sample(logits: Tensor, top_k: int = 1, top_p: float = 0.0, temperature: float = 1.0) -> Tensor:
    """Draw one token per row of ``logits`` ``(batch, vocab)`` -> int64 ``(batch,)``.

    ``top_k == 1``: greedy (argmax; temperature and top-p are ignored). ``top_k > 1``: sample among the
    ``top_k`` largest logits; ``top_k == 0``: among the whole vocab. The candidates' logits are divided by
    ``temperature``, then nucleus-filtered with ``top_p`` (in (0, 1]; 0 = off), then sampled from their
    softmax with ``torch.multinomial`` (reproducible under ``torch.manual_seed``). ``logits`` is not modified.
    """
    if top_k == 1:
        return logits.argmax(dim=-1)
    if top_p > 0.0:
        _check_top_p(top_p)
    if top_k > 0:
        top_logits, top_indices = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
        if temperature != 1.0:
            top_logits = top_logits / temperature
        modify_logits_for_top_p_filtering(top_logits, top_p)
        choice = torch.multinomial(torch.softmax(top_logits, dim=-1), num_samples=1)
        return top_indices.gather(-1, choice).squeeze(-1)
    scaled = logits / temperature if temperature != 1.0 else logits.clone()
    modify_logits_for_top_p_filtering(scaled, top_p)
    return torch.multinomial(torch.softmax(scaled, dim=-1), num_samples=1).squeeze(-1)


# -------------------------------------------------------------------------------------------- outputs
@dataclass
class _DecoderOnlyOutput:
    sequences: Tensor
    scores: Any = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.sequences, self.scores))

    def __getitem__(self, index: int | str) -> Any:
        if isinstance(index, str):
            return getattr(self, index)
        return (self.sequences, self.scores)[index]

    def __len__(self) -> int:
        return 2


@dataclass
class GreedySearchDecoderOnlyOutput(_DecoderOnlyOutput):
    """Result of greedy decoding (``top_k == 1``).

    Attributes:
        sequences: int64 ``(batch, seqlen)``, the prompt followed by the generated tokens.
        scores: the raw logits ``(batch, vocab)`` (``vocab_size``-truncated) that produced each generated
            token, a tuple with one entry per token (:func:`decode`; a ``(batch, n_new, vocab)`` tensor from
            :func:`decode_speculative`), or None (``generate(output_scores=False)``).
    """


@dataclass
class SampleDecoderOnlyOutput(_DecoderOnlyOutput):
    """Result of sampled decoding (``top_k != 1``); same fields as :class:`GreedySearchDecoderOnlyOutput`."""


def _output_cls(top_k: int) -> type[GreedySearchDecoderOnlyOutput] | type[SampleDecoderOnlyOutput]:
    return GreedySearchDecoderOnlyOutput if top_k == 1 else SampleDecoderOnlyOutput


# --------------------------------------------------------------------------------------------- timing
class _Timer:
    """Wall time of a generation, CUDA events on a CUDA device; barriers across tensor-parallel ranks."""

    def __init__(self, enabled: bool, device: torch.device, tensor_parallel: int) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.tensor_parallel = tensor_parallel
        self.start_s = 0.0
        self.events: tuple[Any, Any] | None = None

    def _barrier(self) -> None:
        if self.tensor_parallel > 1:
            torch.distributed.barrier()

    def start(self) -> None:
        if not self.enabled:
            return
        self._barrier()
        if self.cuda:
            self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self.events[0].record()
        else:
            self.start_s = time.perf_counter()

    def stop_ms(self) -> float:
        """Milliseconds since :meth:`start` (after synchronizing the device)."""
        if self.events is not None:
            self.events[1].record()
            self._barrier()
            torch.cuda.synchronize()
            return float(self.events[0].elapsed_time(self.events[1]))
        self._barrier()
        return (time.perf_counter() - self.start_s) * 1000.0


# --------------------------------------------------------------------------------------------- decode
def _model_device(model: Any) -> torch.device | None:
    """The device of the model's first parameter (None without parameters)."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if parameters is not None else None
    return first.device if first is not None else None


def _step_logits(
    model: Any,
    input_ids: Tensor,
    inference_params: InferenceParams,
    num_last_tokens: int,
    cg: bool,
    vocab_size: int | None,
) -> Tensor:
    """Run the model on ``input_ids`` ``(batch, S)`` continuing the cache -> logits
    ``(batch, num_last_tokens, vocab)`` of the last tokens (``vocab_size``-truncated).

    The prompt (``seqlen_offset == 0``) goes without ``position_ids`` (the model's own 0..S-1); decoding
    steps get ``position_ids = seqlen_offset + arange(S)`` and, with ``cg``, replay the captured graph.
    """
    offset = inference_params.seqlen_offset
    if offset > 0:
        batch, seqlen = input_ids.shape
        position_ids = offset + torch.arange(seqlen, dtype=torch.long, device=input_ids.device)
        position_ids = position_ids.expand(batch, seqlen)
        if cg:
            logits = model._decoding_cache.run(input_ids, position_ids, offset)[:, -num_last_tokens:]
        else:
            logits = model(
                input_ids,
                position_ids=position_ids,
                inference_params=inference_params,
                num_last_tokens=num_last_tokens,
            ).logits
    else:
        logits = model(input_ids, inference_params=inference_params, num_last_tokens=num_last_tokens).logits
    return logits[..., :vocab_size] if vocab_size is not None else logits


def _graph_inference_params(
    model: Any,
    batch_size: int,
    seqlen_og: int,
    max_length: int,
    decoding_seqlens: Iterable[int],
    tensor_parallel: int,
) -> InferenceParams:
    """Capture (or reuse) ``model._decoding_cache`` and return its state, reset for a new generation."""
    device = _model_device(model)
    if device is None or device.type != "cuda":
        raise ValueError("cg=True (CUDA-graph decoding) needs the model on a CUDA device")
    model._decoding_cache = update_graph_cache(
        model,
        getattr(model, "_decoding_cache", None),
        batch_size,
        seqlen_og,
        max_length,
        decoding_seqlens=tuple(decoding_seqlens),
        tensor_parallel=tensor_parallel,
    )
    inference_params = model._decoding_cache.inference_params
    assert inference_params is not None
    inference_params.reset(max_length, batch_size)
    return inference_params


@torch.inference_mode()
def decode(
    input_ids: Tensor,
    model: Any,
    max_length: int,
    top_k: int = 1,
    top_p: float = 0.0,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    teacher_outputs: Tensor | None = None,
    vocab_size: int | None = None,
    tensor_parallel: int = 1,
    cg: bool = False,
    enable_timing: bool = False,
    repetition_penalty: float = 1.0,
) -> GreedySearchDecoderOnlyOutput | SampleDecoderOnlyOutput:
    """Generate up to ``max_length`` tokens in total: prefill the prompt, then decode one token per step.

    Every sequence of the batch has the prompt's length; runs under ``torch.inference_mode()``.

    Arguments:
        input_ids: int64 ``(batch, seqlen_og)``, the prompt.
        model: see the module docstring (called with ``num_last_tokens=1``).
        max_length: total length of the returned sequences (prompt included); the KV cache holds
            ``max_length`` positions. With ``seqlen_og >= max_length`` one token is still generated.
        top_k, top_p, temperature: sampling, see :func:`sample` (``top_k=1``: greedy; ``top_k=0``: no top-k
            limit; top-k is applied before top-p).
        eos_token_id: stop after the step in which every sequence produced this token (sequences that
            produced it earlier go on).
        teacher_outputs: int64 ``(batch, L)``: the token at position ``p < L`` is taken from it instead of
            being sampled (the scores are still the model's); sampling resumes past ``L``.
        vocab_size: keep only the first ``vocab_size`` logits (drop the padding of a padded vocab).
        tensor_parallel: number of ranks; > 1 adds ``torch.distributed`` barriers around the timing.
        cg: replay a CUDA graph of the decoding step, captured once per (batch size, max_length) and kept in
            ``model._decoding_cache`` (:func:`update_graph_cache`). Needs a CUDA model whose attention reads
            the cache lengths from ``inference_params.lengths_per_sample`` on device (e.g. ``MHA`` with
            ``use_flash_attn=True`` and fa-kvcache installed) and allocates its caches with
            ``model.allocate_inference_cache`` (or exposes ``model.config``).
        enable_timing: print the prompt processing + decoding time.
        repetition_penalty: applied to the logits before sampling with every token so far
            (:func:`modify_logit_for_repetition_penalty`); 1.0 = off. ``scores`` stay unpenalized.
    Return:
        :class:`GreedySearchDecoderOnlyOutput` (``top_k == 1``) or :class:`SampleDecoderOnlyOutput` with
        ``sequences`` int64 ``(batch, seqlen)``, ``seqlen <= max(max_length, seqlen_og + 1)``, and ``scores``
        a tuple of ``seqlen - seqlen_og`` logits ``(batch, vocab)``.
    """
    batch_size, seqlen_og = input_ids.shape
    teacher_len = teacher_outputs.shape[1] if teacher_outputs is not None else 0
    if cg:
        inference_params = _graph_inference_params(
            model, batch_size, seqlen_og, max_length, (1,), tensor_parallel
        )
    else:
        inference_params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)

    timer = _Timer(enable_timing, input_ids.device, tensor_parallel)
    timer.start()
    scores: list[Tensor] = []
    sequences = [input_ids]
    history = input_ids
    while True:
        logits = _step_logits(model, sequences[-1], inference_params, 1, cg, vocab_size)[:, -1]
        scores.append(logits)
        inference_params.seqlen_offset += sequences[-1].shape[1]
        position = inference_params.seqlen_offset
        if teacher_outputs is not None and position < teacher_len:
            token = teacher_outputs[:, position]
        else:
            if repetition_penalty != 1.0:
                logits = modify_logit_for_repetition_penalty(logits.clone(), history, repetition_penalty)
            token = sample(logits, top_k=top_k, top_p=top_p, temperature=temperature)
        sequences.append(token.unsqueeze(1))
        if repetition_penalty != 1.0:
            history = torch.cat([history, sequences[-1]], dim=1)
        if eos_token_id is not None and bool((token == eos_token_id).all()):
            break
        if position >= max_length - 1:
            break
    if enable_timing:
        print(f"Prompt processing + decoding time: {timer.stop_ms():.0f}ms")
    return _output_cls(top_k)(sequences=torch.cat(sequences, dim=1), scores=tuple(scores))


# -------------------------------------------------------------------------------- speculative decoding
def _filtered_probs(logits: Tensor, top_k: int, top_p: float, temperature: float) -> Tensor:
    """Softmax of ``logits / temperature`` after top-k then top-p filtering (a new tensor)."""
    logits = logits / temperature if temperature != 1.0 else logits.clone()
    if top_k > 0:
        modify_logits_for_top_k_filtering(logits, top_k)
    modify_logits_for_top_p_filtering(logits, top_p)
    return torch.softmax(logits, dim=-1)


def sample_speculative(
    logits: Tensor,
    logits_draft: Tensor,
    tokens_draft: Tensor,
    top_k: int = 1,
    top_p: float = 0.0,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Speculative sampling (Leviathan et al. 2023, algorithm 1): accept a prefix of the draft tokens and
    sample one more token, so that the result is distributed as sampling from ``logits`` alone.

    Draft token ``i`` is accepted with probability ``min(1, p_i / q_i)`` (``p``: the target's filtered
    probabilities, ``q``: the draft's, both after temperature / top-k / top-p); at the first rejection a token
    is drawn from ``max(p - q, 0)``; when all are accepted, a bonus token from the target's last position.

    Arguments:
        logits: ``(batch, n + 1, vocab)``, the target model's logits after the prefix and each draft token.
        logits_draft: ``(batch, n, vocab)``, the draft model's logits that produced ``tokens_draft``.
        tokens_draft: int32 / int64 ``(batch, n)``.
    Return:
        ``tokens`` ``(batch, n + 1)`` (the accepted draft tokens, then the new token, then the remaining
        rejected draft tokens) and ``num_generated_tokens`` int64 ``(batch,)`` in ``[1, n + 1]``: the valid
        prefix length of each row of ``tokens``.
    """
    batch, n_plus_1, vocab = logits.shape
    n = n_plus_1 - 1
    if logits_draft.shape != (batch, n, vocab) or tokens_draft.shape != (batch, n):
        raise ValueError(
            f"sample_speculative: logits {tuple(logits.shape)} need logits_draft (batch, n, vocab) and "
            f"tokens_draft (batch, n), got {tuple(logits_draft.shape)} and {tuple(tokens_draft.shape)}"
        )
    if tokens_draft.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sample_speculative: tokens_draft must be int32 / int64, got {tokens_draft.dtype}")
    if top_p > 0.0:
        _check_top_p(top_p)
    probs = _filtered_probs(logits, top_k, top_p, temperature)
    probs_draft = _filtered_probs(logits_draft, top_k, top_p, temperature)
    index = tokens_draft.long().unsqueeze(-1)
    p_token = probs[:, :-1].gather(-1, index).squeeze(-1)
    q_token = probs_draft.gather(-1, index).squeeze(-1)
    accepted = torch.rand(batch, n, device=probs.device) * q_token <= p_token
    first_rejected = torch.where(accepted.all(dim=-1), n, accepted.int().argmin(dim=-1))
    # the residual distributions at each draft position, then the target's own last position
    resample_probs = torch.cat([(probs[:, :-1] - probs_draft).clamp(min=0.0), probs[:, -1:]], dim=1)
    rows = torch.arange(batch, device=probs.device)
    new_token = torch.multinomial(resample_probs[rows, first_rejected], num_samples=1).squeeze(-1)
    tokens = F.pad(tokens_draft.long(), (0, 1))
    tokens[rows, first_rejected] = new_token
    return tokens, first_rejected + 1


@torch.inference_mode()
def decode_speculative(
    input_ids: Tensor,
    model: Any,
    model_draft: Any,
    max_length: int,
    speculative_lookahead: int = 3,
    top_k: int = 1,
    top_p: float = 0.0,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    vocab_size: int | None = None,
    tensor_parallel: int = 1,
    cg: bool = False,
    enable_timing: bool = False,
    debug: bool = False,
    repetition_penalty: float = 1.0,
) -> GreedySearchDecoderOnlyOutput | SampleDecoderOnlyOutput:
    """Speculative decoding of one sequence: ``model_draft`` proposes up to ``speculative_lookahead`` tokens,
    ``model`` scores them in one call and :func:`sample_speculative` keeps a prefix plus one token.

    The result follows the same distribution as :func:`decode` with ``model`` (the same tokens for greedy,
    ``top_k=1``). Both models keep KV caches; rejected positions are rolled back by lowering
    ``seqlen_offset`` (the next writes overwrite them).

    Arguments:
        input_ids: int64 ``(1, seqlen_og)`` (batch size 1 only).
        model, model_draft: see the module docstring; ``model`` is called with up to
            ``speculative_lookahead + 1`` new tokens and ``num_last_tokens`` as many.
        max_length, top_k, top_p, temperature, vocab_size, tensor_parallel, enable_timing: as :func:`decode`
            (``enable_timing`` also prints the number of target calls and the acceptance rate).
        eos_token_id: generation stops at the first accepted EOS (the tokens after it are dropped).
        cg: CUDA graphs for both models' decoding steps (1 or 2 new tokens for the draft, 1 to
            ``speculative_lookahead + 1`` for the target).
        debug: after each round, print the largest difference between the cached logits and a full forward.
        repetition_penalty: must be 1.0 (the acceptance test needs the unmodified distributions).
    Return:
        As :func:`decode`, but ``scores`` is one tensor ``(1, n_new, vocab)`` of the target's logits.
    """
    batch_size, seqlen_og = input_ids.shape
    if batch_size != 1:
        raise ValueError("decode_speculative supports batch size 1 only")
    if repetition_penalty != 1.0:
        raise ValueError("decode_speculative does not support repetition_penalty")
    if speculative_lookahead < 1:
        raise ValueError("speculative_lookahead must be >= 1")
    if cg:
        params = _graph_inference_params(
            model, 1, seqlen_og, max_length, range(1, speculative_lookahead + 2), tensor_parallel
        )
        params_draft = _graph_inference_params(model_draft, 1, seqlen_og, max_length, (1, 2), tensor_parallel)
    else:
        params = InferenceParams(max_seqlen=max_length, max_batch_size=1)
        params_draft = InferenceParams(max_seqlen=max_length, max_batch_size=1)
    sampling: dict[str, Any] = dict(top_k=top_k, top_p=top_p, temperature=temperature)

    def logits_of(m: Any, p: InferenceParams, ids: Tensor, num_last: int) -> Tensor:
        """Feed ``ids`` after the cached prefix; the logits of the last ``num_last`` tokens."""
        out = _step_logits(m, ids, p, num_last, cg, vocab_size)
        p.seqlen_offset += ids.shape[1]
        return out

    timer = _Timer(enable_timing, input_ids.device, tensor_parallel)
    timer.start()
    sequence = input_ids
    scores: list[Tensor] = []
    main_calls = drafted = accepted = 0
    while sequence.shape[1] < max(max_length, seqlen_og + 1):
        n_draft = min(speculative_lookahead, max_length - sequence.shape[1] - 1)
        pending = sequence[:, params.seqlen_offset :]
        if n_draft <= 0:  # room for one token only: the target alone
            logits = logits_of(model, params, pending, 1)
            main_calls += 1
            new_tokens, new_scores = sample(logits[:, -1], **sampling).unsqueeze(1), logits
        else:
            draft_tokens, draft_logits = [], []
            draft_input = sequence[:, params_draft.seqlen_offset :]
            for _ in range(n_draft):
                step = logits_of(model_draft, params_draft, draft_input, 1)[:, -1]
                draft_input = sample(step, **sampling).unsqueeze(1)
                draft_tokens.append(draft_input)
                draft_logits.append(step)
            tokens_draft = torch.cat(draft_tokens, dim=1)
            logits = logits_of(model, params, torch.cat([pending, tokens_draft], dim=1), n_draft + 1)
            main_calls += 1
            drafted += n_draft
            tokens, num_generated = sample_speculative(
                logits, torch.stack(draft_logits, dim=1), tokens_draft, **sampling
            )
            n_new = int(num_generated[0])
            accepted += n_new - 1
            new_tokens, new_scores = tokens[:, :n_new], logits[:, :n_new]
        if eos_token_id is not None:
            hits = (new_tokens[0] == eos_token_id).nonzero()
            if hits.numel() > 0:
                keep = int(hits[0, 0]) + 1
                new_tokens, new_scores = new_tokens[:, :keep], new_scores[:, :keep]
        sequence = torch.cat([sequence, new_tokens], dim=1)
        scores.append(new_scores)
        # the caches stay valid up to the last accepted draft token (the final token is not yet fed)
        params.seqlen_offset = min(params.seqlen_offset, sequence.shape[1] - 1)
        params_draft.seqlen_offset = min(params_draft.seqlen_offset, sequence.shape[1] - 1)
        if debug:
            reference = model(sequence[:, :-1]).logits[:, -new_scores.shape[1] :]
            if vocab_size is not None:
                reference = reference[..., :vocab_size]
            print(f"max |cached - full| logits: {(new_scores - reference).abs().max().item():.3g}")
        if eos_token_id is not None and bool((new_tokens == eos_token_id).any()):
            break
    if enable_timing:
        print(f"Prompt processing + decoding time: {timer.stop_ms():.0f}ms")
        print(f"Number of calls to main model: {main_calls}")
        if drafted:
            print(f"Acceptance rate: {accepted / drafted * 100:.2f}%")
    return _output_cls(top_k)(sequences=sequence, scores=torch.cat(scores, dim=1))


# ----------------------------------------------------------------------------------------------- mixin
class GenerationMixin:
    """``generate`` for a model class: mix in and implement :meth:`allocate_inference_cache`."""

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> dict[Any, Any]:
        """The KV caches ``{layer_idx: cache}`` for ``batch_size`` sequences of up to ``max_seqlen`` tokens
        (used by CUDA-graph decoding). To be implemented by the model."""
        raise NotImplementedError

    def generate(
        self,
        input_ids: Tensor,
        max_length: int,
        top_k: int = 1,
        top_p: float = 0.0,
        temperature: float = 1.0,
        return_dict_in_generate: bool = False,
        output_scores: bool = False,
        **kwargs: Any,
    ) -> Tensor | GreedySearchDecoderOnlyOutput | SampleDecoderOnlyOutput:
        """:func:`decode` with this model (``kwargs``: its other arguments).

        Return:
            the sequences ``(batch, seqlen)``, or with ``return_dict_in_generate`` the output object, whose
            ``scores`` are None unless ``output_scores``.
        """
        output = decode(
            input_ids, self, max_length, top_k=top_k, top_p=top_p, temperature=temperature, **kwargs
        )
        if not output_scores:
            output.scores = None
        return output if return_dict_in_generate else output.sequences


# the CUDA-graph half lives in its own module (it imports InferenceParams from this one lazily)
from flash_attn.utils._graphs import (  # noqa: E402
    DecodingCGCache,
    allocate_inference_cache,
    capture_graph,
    update_graph_cache,
)
