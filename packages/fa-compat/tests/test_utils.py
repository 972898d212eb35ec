"""Tests for flash_attn.utils.benchmark and flash_attn.utils.generation.

The benchmark helpers run on a tiny PyTorch function and are checked for flash-attn's return structure and
for doing the work they time (the inputs' gradients after the backward helpers). Generation runs a toy
decoder (embedding + positional embedding + one causal flash ``MHA`` layer with a KV cache + LM head) and is
held against the same model's full forward: greedy decoding with the cache equals recomputing the whole
sequence each step, sampled tokens lie in the top-k / top-p sets of the returned scores, speculative
decoding reproduces greedy decoding. CUDA-graph decoding (``cg=True``) runs on a GPU only.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections import namedtuple  # noqa: E402

import pytest  # noqa: E402
from fa_compat_testutils import DEVICE, HAS_KVCACHE, HI  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.benchmark import Measurement, Timer  # noqa: E402

from flash_attn.modules.mha import MHA  # noqa: E402
from flash_attn.utils import benchmark as bm  # noqa: E402
from flash_attn.utils import generation as gen  # noqa: E402
from flash_attn.utils.generation import (  # noqa: E402
    DecodingCGCache,
    GenerationMixin,
    GreedySearchDecoderOnlyOutput,
    InferenceParams,
    SampleDecoderOnlyOutput,
)

VOCAB, EMBED, HEADS, MAX_POS = 48, 64, 4, 32
#: cached decode vs full forward (different kernels / summation order)
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[HI]
#: float32 (CPU): greedy choices must match exactly; fp16 / bf16 (GPU): up to near ties
EXACT = HI is torch.float32


# ------------------------------------------------------------------------------------------- benchmark
def _fn(x, w, *, scale=1.0):
    return (x @ w).tanh() * scale


def _expected_grad_x(x, w, grad, scale=1.0):
    x2 = x.detach().clone().requires_grad_()
    (_fn(x2, w.detach(), scale=scale) * grad).sum().backward()
    return x2.grad


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)
    return x, w


def _check_pair(pair, repeats=2):
    timer, measurement = pair
    assert isinstance(timer, Timer) and isinstance(measurement, Measurement)
    assert measurement.number_per_run == repeats and measurement.mean > 0


def test_benchmark_forward_calls_fn_with_inputs_and_kwinputs():
    calls = []

    def fn(x, *, scale):
        calls.append((x.shape, scale))
        return x * scale

    pair = bm.benchmark_forward(fn, torch.ones(3), repeats=2, verbose=False, scale=2.0)
    _check_pair(pair)
    # Timer.timeit warms up first: at least the timed calls, all with the inputs and kwinputs
    assert len(calls) >= 2 and set(calls) == {(torch.Size([3]), 2.0)}


def test_benchmark_backward_and_combined_gradients():
    x, w = _inputs()
    grad = torch.randn(4, 8)
    for helper in (bm.benchmark_backward, bm.benchmark_combined):
        x.grad = w.grad = None
        pair = helper(_fn, x, w, grad=grad, repeats=2, verbose=False, scale=0.5)
        _check_pair(pair)
        # .grad is reset before every run: one backward's worth, not the sum over the repeats
        torch.testing.assert_close(x.grad, _expected_grad_x(x, w, grad, scale=0.5))
    with pytest.raises(RuntimeError, match="Grad shape"):
        bm.benchmark_backward(_fn, x, w, grad=torch.randn(3, 8), repeats=2, verbose=False)


def test_benchmark_tuple_output_and_random_grad():
    x, w = _inputs()
    pair = bm.benchmark_backward(lambda a, b: (_fn(a, b), "aux"), x, w, repeats=2, verbose=False)
    _check_pair(pair)
    assert x.grad is not None and x.grad.shape == x.shape


def test_benchmark_fwd_bwd_and_all_structure(capsys):
    x, w = _inputs()
    both = bm.benchmark_fwd_bwd(_fn, x, w, repeats=2, desc="tiny", verbose=True)
    assert isinstance(both, tuple) and len(both) == 2
    for pair in both:
        _check_pair(pair)
    out = capsys.readouterr().out
    assert "tiny - Forward pass" in out and "tiny - Backward pass" in out
    three = bm.benchmark_all(_fn, x, w, repeats=2, verbose=False)
    assert isinstance(three, tuple) and len(three) == 3
    for pair in three:
        _check_pair(pair)


def test_benchmark_amp():
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []

    def fn(x):
        seen.append((torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)))
        return x

    bm.benchmark_forward(fn, torch.ones(2), repeats=2, verbose=False, amp=True, amp_dtype=torch.bfloat16)
    assert len(seen) >= 2 and set(seen) == {(True, torch.bfloat16)}
    seen.clear()
    bm.benchmark_forward(fn, torch.ones(2), repeats=2, verbose=False)
    assert all(not enabled for enabled, _ in seen)


def test_pytorch_profiler(tmp_path):
    x, w = _inputs()
    calls = []

    def fn(a, b):
        calls.append(1)
        return _fn(a, b)

    trace = tmp_path / "trace.json"
    assert bm.pytorch_profiler(fn, x, w, trace_filename=str(trace), backward=True, verbose=False) is None
    assert len(calls) == 1 + 30 + 1  # the output gradient's shape, the warm-up, the profiled call
    assert "traceEvents" in json.loads(trace.read_text())
    assert x.grad is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_benchmark_memory_needs_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        bm.benchmark_memory(lambda: None, verbose=False)


@pytest.mark.gpu
def test_benchmark_memory_gpu():
    def fn():
        return torch.empty(300 * 2**20, dtype=torch.uint8, device="cuda")

    mem = bm.benchmark_memory(fn, verbose=False)
    assert isinstance(mem, float) and 0.3 <= mem < 10


def test_import_utils_is_light():
    code = (
        "import sys, flash_attn; assert 'flash_attn.utils.generation' not in sys.modules; "
        "import flash_attn.utils.benchmark, flash_attn.utils.generation; "
        "assert 'torch._dynamo' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, env={**os.environ, "FA_PLUS_SILENCE_CONFLICT": "1"}
    )


# ------------------------------------------------------------------------------------ sampling helpers
def test_inference_params_fields_and_reset():
    params = InferenceParams(max_seqlen=10, max_batch_size=2)
    assert (params.seqlen_offset, params.batch_size_offset, params.key_value_memory_dict) == (0, 0, {})
    assert params.lengths_per_sample is None
    params.seqlen_offset = 7
    params.lengths_per_sample = torch.full((2,), 7, dtype=torch.int32)
    params.key_value_memory_dict[0] = cache = torch.zeros(1)
    params.reset(20, 3)
    assert (params.max_seqlen, params.max_batch_size, params.seqlen_offset) == (20, 3, 0)
    assert params.lengths_per_sample.tolist() == [0, 0]
    assert params.key_value_memory_dict[0] is cache


def test_logits_filters():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.0]])
    top_k = logits.clone()
    gen.modify_logits_for_top_k_filtering(top_k, 2)
    inf = float("-inf")
    assert top_k.tolist() == [[inf, 4.0, 3.0, inf], [inf, inf, 5.0, 5.0]]
    # probabilities of [0, 10, 9, -10]: ~[0, 0.731, 0.269, 0]; top_p = 0.5 keeps the first token only,
    # top_p = 0.9 the two likely ones
    nucleus = torch.tensor([[0.0, 10.0, 9.0, -10.0]])
    for top_p, kept in [(0.5, [1]), (0.9, [1, 2]), (1.0, [0, 1, 2, 3]), (0.0, [0, 1, 2, 3])]:
        filtered = nucleus.clone()
        gen.modify_logits_for_top_p_filtering(filtered, top_p)
        assert filtered[0].isfinite().nonzero().flatten().tolist() == kept, top_p
    penalized = gen.modify_logit_for_repetition_penalty(
        torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1, 0]]), 2.0
    )
    assert penalized.tolist() == [[1.0, -4.0, 1.0]]


def test_sample_greedy_topk_topp():
    torch.manual_seed(0)
    logits = torch.randn(64, VOCAB)
    original = logits.clone()
    assert torch.equal(gen.sample(logits), logits.argmax(-1))
    top3 = logits.topk(3, dim=-1).indices
    for kw in [dict(top_k=3), dict(top_k=3, temperature=5.0), dict(top_k=3, top_p=0.9)]:
        tokens = gen.sample(logits, **kw)
        assert tokens.shape == (64,) and tokens.dtype == torch.int64
        assert (tokens[:, None] == top3).any(-1).all(), kw
    # a vanishing nucleus keeps the most likely token only
    assert torch.equal(gen.sample(logits, top_k=0, top_p=1e-6), logits.argmax(-1))
    assert torch.equal(logits, original)  # sampling does not modify the logits
    with pytest.raises(ValueError, match="top-p"):
        gen.sample(logits, top_k=0, top_p=1.5)
    # the whole vocab is sampled from with top_k=0: more distinct tokens than top-3
    many = gen.sample(logits[:1].expand(256, -1), top_k=0, temperature=10.0)
    assert many.unique().numel() > 3


def test_sample_speculative():
    torch.manual_seed(1)
    logits = torch.randn(1, 4, VOCAB)
    greedy = logits.argmax(-1)  # (1, 4)
    # the draft proposes the target's own greedy tokens: all accepted, plus the bonus token
    tokens, n = gen.sample_speculative(logits, logits[:, :3], greedy[:, :3])
    assert n.tolist() == [4] and torch.equal(tokens, greedy)
    # the draft's second token is not the target's: one accepted, then the target's token at that position
    draft = greedy[:, :3].clone()
    draft[0, 1] = (draft[0, 1] + 1) % VOCAB
    draft_logits = logits[:, :3].clone()
    draft_logits[0, 1, draft[0, 1]] = 100.0
    tokens, n = gen.sample_speculative(logits, draft_logits, draft)
    assert n.tolist() == [2] and tokens[0, :2].tolist() == greedy[0, :2].tolist()
    with pytest.raises(ValueError, match="tokens_draft"):
        gen.sample_speculative(logits, logits[:, :2], greedy[:, :3])


# ---------------------------------------------------------------------------------------- toy decoder
CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


class ToyLM(nn.Module, GenerationMixin):
    """Embedding + learned positions + one causal flash MHA block (KV cache) + LayerNorm + LM head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.pos = nn.Embedding(MAX_POS, EMBED)
        self.mixer = MHA(EMBED, HEADS, causal=True, layer_idx=0, use_flash_attn=True)
        self.norm = nn.LayerNorm(EMBED)
        self.lm_head = nn.Linear(EMBED, VOCAB, bias=False)
        nn.init.normal_(self.lm_head.weight, std=0.5)  # well-separated logits

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return {0: self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype)}

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0):
        if position_ids is None:  # as flash-attn's GPT: 0..S-1 (decode passes positions for later steps)
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        hidden = self.embed(input_ids) + self.pos(position_ids)
        hidden = hidden + self.mixer(hidden, inference_params=inference_params)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(self.norm(hidden)))


_MODELS: dict = {}


def _model(seed: int = 0) -> ToyLM:
    if seed not in _MODELS:
        _MODELS[seed] = ToyLM(seed).to(device=DEVICE, dtype=HI).eval()
    return _MODELS[seed]


def _prompt(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g).to(DEVICE)


def _full_logits(model, sequences):
    with torch.no_grad():
        return model(sequences).logits.float()


def _greedy_by_recompute(model, prompt, max_length):
    """Greedy decoding without a cache: the full forward of the whole sequence at every step."""
    seq = prompt
    while seq.shape[1] < max_length:
        next_token = _full_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_token], dim=1)
    return seq


def _assert_greedy_equal(model, got, expected, seqlen_og):
    """Equal tokens; a difference is tolerated only at a near tie of the reference logits (low precision on
    GPU), after which the sequences are not compared further."""
    for t in range(seqlen_og, expected.shape[1]):
        if torch.equal(got[:, t], expected[:, t]):
            continue
        ref = _full_logits(model, expected[:, :t])[:, -1]
        gap = ref.gather(1, expected[:, t : t + 1]) - ref.gather(1, got[:, t : t + 1])
        assert not EXACT and gap.max().item() < 5 * TOL, f"step {t}: {got[:, t]} != {expected[:, t]}"
        return


def _assert_scores_match_full(model, out, seqlen_og):
    """Each score is the full forward's logits at the position before the token it produced."""
    full = _full_logits(model, out.sequences)
    assert len(out.scores) == out.sequences.shape[1] - seqlen_og
    for i, score in enumerate(out.scores):
        assert score.shape == (out.sequences.shape[0], full.shape[-1])
        torch.testing.assert_close(score.float(), full[:, seqlen_og - 1 + i], atol=TOL, rtol=TOL)


# ----------------------------------------------------------------------------------------- generation
def test_greedy_with_cache_equals_recompute():
    model, prompt, max_length = _model(), _prompt(2, 5), 11
    out = model.generate(prompt, max_length, return_dict_in_generate=True, output_scores=True)
    assert type(out) is GreedySearchDecoderOnlyOutput
    assert out.sequences.shape == (2, max_length) and out.sequences.dtype == torch.int64
    assert torch.equal(out.sequences[:, :5], prompt)
    _assert_greedy_equal(model, out.sequences, _greedy_by_recompute(model, prompt, max_length), 5)
    _assert_scores_match_full(model, out, 5)
    sequences, scores = out  # unpacks like flash-attn's namedtuple fallback
    assert sequences is out.sequences and out[1] is scores and out["scores"] is scores
    # generate's defaults: the sequences tensor only; scores dropped without output_scores
    assert torch.equal(model.generate(prompt, 6), out.sequences[:, :6])
    assert model.generate(prompt, 6, return_dict_in_generate=True).scores is None


def test_top_k_1_is_greedy_and_prompt_edge_cases():
    model, prompt = _model(), _prompt(1, 4)
    greedy = gen.decode(prompt, model, 8)
    topk1 = gen.decode(prompt, model, 8, top_k=1, top_p=0.5, temperature=3.0)
    assert type(topk1) is GreedySearchDecoderOnlyOutput and torch.equal(topk1.sequences, greedy.sequences)
    # a prompt as long as max_length still gets one new token
    one = gen.decode(prompt, model, 4)
    assert one.sequences.shape == (1, 5) and torch.equal(one.sequences, greedy.sequences[:, :5])
    assert len(one.scores) == 1


def test_teacher_forcing():
    model, prompt = _model(), _prompt(2, 3)
    teacher = torch.cat([prompt, _prompt(2, 5, seed=7)], dim=1)  # (2, 8)
    out = gen.decode(prompt, model, 8, teacher_outputs=teacher)
    assert torch.equal(out.sequences, teacher)
    _assert_scores_match_full(model, out, 3)
    # a shorter teacher: its tokens first, then greedy from there
    short = gen.decode(prompt, model, 8, teacher_outputs=teacher[:, :5])
    assert torch.equal(short.sequences[:, :5], teacher[:, :5])
    _assert_greedy_equal(model, short.sequences, _greedy_by_recompute(model, teacher[:, :5], 8), 5)


def test_eos_stops():
    model, seqlen_og = _model(), 4
    pair = torch.cat([_prompt(1, 4), _prompt(1, 4, seed=11)])
    greedy = gen.decode(pair, model, 10).sequences  # the rows decode independently
    eos = int(greedy[0, seqlen_og + 2])
    stop = seqlen_og + greedy[0, seqlen_og:].tolist().index(eos)  # the first time eos is produced
    out = gen.decode(pair[:1], model, 10, eos_token_id=eos)
    assert torch.equal(out.sequences, greedy[:1, : stop + 1])
    assert len(out.scores) == stop + 1 - seqlen_og
    # batch: stops only once every sequence produced eos in the same step
    batched = gen.decode(pair, model, 10, eos_token_id=eos).sequences
    ends = greedy[:, seqlen_og:].tolist()
    both = [i for i in range(10 - seqlen_og) if ends[0][i] == eos and ends[1][i] == eos]
    assert torch.equal(batched, greedy[:, : seqlen_og + both[0] + 1] if both else greedy)


def test_sampling_reproducible_and_respects_top_k_top_p():
    model, prompt = _model(), _prompt(2, 4)
    kw = dict(top_k=5, temperature=1.5, return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(123)
    first = model.generate(prompt, 8, **kw)
    torch.manual_seed(123)
    second = model.generate(prompt, 8, **kw)
    assert type(first) is SampleDecoderOnlyOutput
    assert torch.equal(first.sequences, second.sequences)
    for i, score in enumerate(first.scores):
        top5 = score.topk(5, dim=-1).indices
        assert (first.sequences[:, 4 + i, None] == top5).any(-1).all(), i
    # pure top-p: every sampled token's logit survives the nucleus filter of its scores
    torch.manual_seed(5)
    nucleus = model.generate(prompt, 8, top_k=0, top_p=0.5, return_dict_in_generate=True, output_scores=True)
    for i, score in enumerate(nucleus.scores):
        kept = score.float().clone()
        gen.modify_logits_for_top_p_filtering(kept, 0.5)
        assert kept.gather(1, nucleus.sequences[:, 4 + i, None]).isfinite().all(), i


def test_vocab_size_and_repetition_penalty():
    model, prompt = _model(), _prompt(2, 4)
    out = gen.decode(prompt, model, 9, vocab_size=VOCAB - 16)
    assert all(s.shape == (2, VOCAB - 16) for s in out.scores)
    assert (out.sequences[:, 4:] < VOCAB - 16).all()
    penalty = 4.0
    rep = gen.decode(prompt, model, 9, repetition_penalty=penalty)
    for i, score in enumerate(rep.scores):  # scores stay raw; the token is the argmax of the penalized ones
        history = rep.sequences[:, : 4 + i]
        penalized = gen.modify_logit_for_repetition_penalty(score.float().clone(), history, penalty)
        torch.testing.assert_close(
            penalized.gather(1, rep.sequences[:, 4 + i, None]).squeeze(1), penalized.max(-1).values
        )


@pytest.mark.parametrize("draft_seed", [0, 1], ids=["same_draft", "other_draft"])
def test_decode_speculative_greedy_equals_decode(draft_seed, capsys):
    model, draft, prompt = _model(), _model(draft_seed), _prompt(1, 4)
    max_length = 12 if draft_seed == 0 else 9
    expected = gen.decode(prompt, model, max_length)
    out = gen.decode_speculative(
        prompt, model, draft, max_length, speculative_lookahead=3, enable_timing=True
    )
    assert type(out) is GreedySearchDecoderOnlyOutput
    _assert_greedy_equal(model, out.sequences, expected.sequences, 4)
    assert out.scores.shape == (1, max_length - 4, VOCAB)
    full = _full_logits(model, out.sequences)[:, 3:-1]
    torch.testing.assert_close(out.scores.float(), full, atol=TOL, rtol=TOL)
    printed = capsys.readouterr().out
    calls = int(printed.split("Number of calls to main model: ")[1].split()[0])
    assert "Acceptance rate: " in printed
    if draft_seed == 0 and EXACT:  # a perfect draft: each round accepts 3 tokens and adds one
        assert calls == 2 and "100.00%" in printed
    with pytest.raises(ValueError, match="batch size 1"):
        gen.decode_speculative(_prompt(2, 4), model, draft, 8)


def test_decode_speculative_sampling_top_k():
    model, draft, prompt = _model(), _model(1), _prompt(1, 4)
    torch.manual_seed(3)
    first = gen.decode_speculative(prompt, model, draft, 9, speculative_lookahead=2, top_k=4)
    torch.manual_seed(3)
    second = gen.decode_speculative(prompt, model, draft, 9, speculative_lookahead=2, top_k=4)
    assert type(first) is SampleDecoderOnlyOutput and torch.equal(first.sequences, second.sequences)
    assert first.sequences.shape == (1, 9)
    top4 = first.scores[0].topk(4, dim=-1).indices  # (5, 4)
    assert (first.sequences[0, 4:, None] == top4).any(-1).all()


def test_allocate_inference_cache_and_cg_errors():
    caches = gen.allocate_inference_cache(2, 16, 4, 8, 3, "cpu", torch.float32)
    assert sorted(caches) == [0, 1, 2] and caches[1].shape == (2, 16, 2, 4, 8)
    assert sorted(gen.allocate_inference_cache(1, 4, 2, 8, ["a", "b"], "cpu")) == ["a", "b"]
    with pytest.raises(ValueError, match="dtype"):
        gen.allocate_inference_cache(1, 4, 2, 8, 1, "cpu", torch.int8)
    with pytest.raises(NotImplementedError):
        GenerationMixin().allocate_inference_cache(1, 4)
    cache = DecodingCGCache()
    assert (cache.max_batch_size, cache.max_seqlen, cache.callables, cache.run) == (0, 0, {}, None)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="CUDA"):
            gen.decode(_prompt(1, 3), _model(), 6, cg=True)


# ---------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_KVCACHE, reason="fa-kvcache not installed (FA_COMPAT_SUBSET)")
def test_cuda_graph_decode_equals_eager():
    model = ToyLM(0).to(device="cuda", dtype=HI).eval()
    for batch, max_length in [(2, 12), (2, 10), (1, 12), (3, 14)]:  # reuse, smaller batch, re-allocation
        prompt = _prompt(batch, 4)
        eager = gen.decode(prompt, model, max_length)
        graphed = gen.decode(prompt, model, max_length, cg=True)
        assert graphed.sequences.shape == eager.sequences.shape, (batch, max_length)
        _assert_greedy_equal(model, graphed.sequences, eager.sequences, 4)
        _assert_scores_match_full(model, graphed, 4)
        cache = model._decoding_cache
        assert isinstance(cache, DecodingCGCache) and (batch, 1) in cache.callables
    assert (cache.max_batch_size, cache.max_seqlen) == (3, 14)
    torch.manual_seed(0)
    sampled = gen.decode(_prompt(3, 4), model, 14, top_k=5, cg=True)
    torch.manual_seed(0)
    assert torch.equal(sampled.sequences, gen.decode(_prompt(3, 4), model, 14, top_k=5, cg=True).sequences)
    for i, score in enumerate(sampled.scores):
        assert (sampled.sequences[:, 4 + i, None] == score.topk(5, dim=-1).indices).any(-1).all(), i


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_KVCACHE, reason="fa-kvcache not installed (FA_COMPAT_SUBSET)")
def test_cuda_graph_decode_speculative():
    model = ToyLM(0).to(device="cuda", dtype=HI).eval()
    draft = ToyLM(1).to(device="cuda", dtype=HI).eval()
    prompt = _prompt(1, 4)
    expected = gen.decode(prompt, model, 14).sequences
    out = gen.decode_speculative(prompt, model, draft, 14, speculative_lookahead=3, cg=True)
    _assert_greedy_equal(model, out.sequences, expected, 4)
    assert set(model._decoding_cache.callables) == {(1, 1), (1, 2), (1, 3), (1, 4)}
    assert set(draft._decoding_cache.callables) == {(1, 1), (1, 2)}
