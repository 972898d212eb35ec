"""PagedKVCache: property tests (hypothesis state machine against a per-sequence list model) and an
end-to-end decode loop through flash_attn_with_kvcache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, precondition, rule

from fa_core.reference import attention_ref
from fa_kvcache import CacheFullError, PagedKVCache, flash_attn_with_kvcache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_BLOCKS, PAGE = 12, 4


class CacheMachine(RuleBasedStateMachine):
    """Each token is a distinct number t (k = t, v = -t in every channel): contents are checkable."""

    seqs = Bundle("seqs")

    def __init__(self) -> None:
        super().__init__()
        self.cache = PagedKVCache(NUM_BLOCKS, PAGE, 1, 2, dtype=torch.float32, device=DEVICE)
        self.model: dict[int, list[float]] = {}
        self.next_id = 0
        self.next_token = 1.0

    def _tokens(self, n: int) -> list[float]:
        toks = [self.next_token + i for i in range(n)]
        self.next_token += n
        return toks

    @rule(target=seqs)
    def add(self):
        sid = self.next_id
        self.next_id += 1
        self.cache.add_sequence(sid)
        self.model[sid] = []
        return sid

    @rule(sid=seqs, n=st.integers(0, 7))
    def append(self, sid, n):
        if sid not in self.model:
            return
        toks = self._tokens(n)
        k = torch.tensor(toks).reshape(n, 1, 1).expand(n, 1, 2)
        free_before = self.cache.num_free_blocks
        snapshot = {s: self.cache.blocks_of(s) for s in self.model}
        try:
            start = self.cache.append(sid, k, -k)
        except CacheFullError:
            # all-or-nothing: nothing changed
            assert self.cache.num_free_blocks == free_before
            assert {s: self.cache.blocks_of(s) for s in self.model} == snapshot
            return
        assert start == len(self.model[sid])
        self.model[sid].extend(toks)

    @rule(sid=seqs, n=st.integers(1, 5))
    def prepare_then_write(self, sid, n):
        """The serving path: prepare_append gives (block_table, cache_seqlens); write where they say."""
        if sid not in self.model:
            return
        try:
            bt, lens = self.cache.prepare_append([sid], n)
        except CacheFullError:
            return
        assert int(lens[0]) == len(self.model[sid])
        toks = self._tokens(n)
        bt = bt[0].long().cpu()
        for i, t in enumerate(toks):
            pos = int(lens[0]) + i
            self.cache.k_cache[bt[pos // PAGE], pos % PAGE] = t
            self.cache.v_cache[bt[pos // PAGE], pos % PAGE] = -t
        self.model[sid].extend(toks)

    @rule(target=seqs, src=seqs)
    def fork(self, src):
        if src not in self.model:
            return self.add()
        sid = self.next_id
        self.next_id += 1
        self.cache.fork(src, sid)
        self.model[sid] = list(self.model[src])
        return sid

    @rule(sid=consumes(seqs))
    def free(self, sid):
        if sid not in self.model:
            return
        self.cache.free_sequence(sid)
        del self.model[sid]

    @precondition(lambda self: len(self.model) >= 2)
    @rule(data=st.data())
    def batch_prepare(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, max_size=3, unique=True))
        try:
            bt, lens = self.cache.prepare_append(ids, 1)
        except CacheFullError:
            return
        for row, sid in enumerate(ids):
            t = self._tokens(1)[0]
            pos = int(lens[row])
            blk = int(bt[row, pos // PAGE])
            self.cache.k_cache[blk, pos % PAGE] = t
            self.cache.v_cache[blk, pos % PAGE] = -t
            self.model[sid].append(t)

    @invariant()
    def bookkeeping(self):
        self.cache.check_invariants()
        assert sorted(self.cache.sequences) == sorted(self.model)

    @invariant()
    def contents(self):
        for sid, toks in self.model.items():
            assert self.cache.seq_len(sid) == len(toks)
            k, v = self.cache.gather(sid)
            expect = torch.tensor(toks, dtype=torch.float32)
            assert torch.equal(k[:, 0, 0].cpu(), expect) and torch.equal(k[:, 0, 1].cpu(), expect)
            assert torch.equal(v[:, 0, 0].cpu(), -expect)


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_cow_copies_shared_partial_block():
    c = PagedKVCache(4, 4, 1, 1, dtype=torch.float32, device=DEVICE)
    c.add_sequence("a")
    c.append("a", torch.arange(1.0, 7.0).reshape(6, 1, 1), torch.zeros(6, 1, 1))
    c.fork("a", "b")
    assert c.blocks_of("a") == c.blocks_of("b") and c.refcount(c.blocks_of("a")[1]) == 2
    c.append("b", torch.full((1, 1, 1), 9.0), torch.zeros(1, 1, 1))
    # the full first block stays shared, the partial last one was copied for b
    assert c.blocks_of("a")[0] == c.blocks_of("b")[0] and c.blocks_of("a")[1] != c.blocks_of("b")[1]
    assert c.gather("a")[0].flatten().tolist() == [1, 2, 3, 4, 5, 6]
    assert c.gather("b")[0].flatten().tolist() == [1, 2, 3, 4, 5, 6, 9]
    c.check_invariants()


def test_out_of_blocks_error_is_clear():
    c = PagedKVCache(2, 4, 1, 1, dtype=torch.float32, device=DEVICE)
    c.add_sequence(0)
    with pytest.raises(CacheFullError, match="out of KV-cache blocks"):
        c.prepare_append([0], 9)
    assert c.seq_len(0) == 0 and c.num_free_blocks == 2
    c2 = PagedKVCache(8, 4, 1, 1, dtype=torch.float32, device=DEVICE, max_blocks_per_seq=2)
    c2.add_sequence(0)
    with pytest.raises(CacheFullError, match="max_blocks_per_seq"):
        c2.prepare_append([0], 9)
    with pytest.raises(KeyError, match="unknown sequence"):
        c2.prepare_append([1], 1)
    with pytest.raises(ValueError, match="already exists"):
        c2.add_sequence(0)


def test_decode_loop_with_fork_through_kernel():
    """Prompt, fork, then decode steps appended by flash_attn_with_kvcache itself (paged, GQA, causal)."""
    torch.manual_seed(0)
    nheads, nheads_k, d, page = 4, 2, 16, 16
    c = PagedKVCache(16, page, nheads_k, d, dtype=torch.float32, device=DEVICE, max_blocks_per_seq=4)
    c.add_sequence("a")
    c.append("a", torch.randn(21, nheads_k, d), torch.randn(21, nheads_k, d))
    c.fork("a", "b")
    c.add_sequence("c")
    ids = ["a", "b", "c"]
    for _ in range(2):
        q = torch.randn(3, 1, nheads, d, device=DEVICE)
        k_new = torch.randn(3, 1, nheads_k, d, device=DEVICE)
        v_new = torch.randn(3, 1, nheads_k, d, device=DEVICE)
        bt, lens = c.prepare_append(ids, 1)
        assert bt.shape == (3, 4)
        out = flash_attn_with_kvcache(
            q,
            c.k_cache,
            c.v_cache,
            k_new,
            v_new,
            cache_seqlens=lens,
            block_table=bt,
            causal=True,
            num_splits=2,
        )
        c.check_invariants()
        for i, sid in enumerate(ids):
            k_all, v_all = c.gather(sid)
            assert torch.equal(k_all[-1], k_new[i, 0]) and torch.equal(v_all[-1], v_new[i, 0])
            ref, _ = attention_ref(q[i : i + 1], k_all[None], v_all[None], causal=True)
            torch.testing.assert_close(out[i : i + 1], ref, atol=1e-5, rtol=1e-5)
    # a and b diverged after the shared prompt
    ka, kb = c.gather("a")[0], c.gather("b")[0]
    assert torch.equal(ka[:21], kb[:21]) and not torch.equal(ka[21:], kb[21:])
