"""Every attention backend equals the plain-torch reference on random inputs."""
import pytest
import torch

from tinyengine.attention import PAD_QUERY_POS, attention, attention_probs, causal_attention, reference_attention, slot_mask


def random_case(B=2, Hq=6, Hkv=2, T=5, S=37, D=16, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    # Slots hold a shuffled set of positions with holes (-1), per row and kv head, as after evictions.
    kv_pos = torch.stack([torch.stack([torch.randperm(S, generator=g) for _ in range(Hkv)]) for _ in range(B)])
    kv_pos = kv_pos.masked_fill(torch.rand(B, Hkv, S, generator=g) < 0.2, -1)
    kv_pos[..., 0] = 0  # every query sees at least one slot
    q_pos = torch.randint(S // 2, S, (B, T), generator=g)
    kv_bias = torch.randn(B, Hkv, S, generator=g) if bias else None
    return q, k, v, q_pos, kv_pos, kv_bias


def loop_attention(q, k, v, q_pos, kv_pos, kv_bias=None):
    """The definition, one (row, head, query) at a time."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            for t in range(T):
                ok = (kv_pos[b, h // G] >= 0) & (kv_pos[b, h // G] <= q_pos[b, t])
                s = k[b, h // G] @ q[b, h, t] / D**0.5
                if kv_bias is not None:
                    s = s + kv_bias[b, h // G]
                p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=0)
                out[b, h, t] = p @ v[b, h // G]
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 5])
def test_reference_equals_definition(T, bias):
    case = random_case(T=T, bias=bias)
    out, probs = reference_attention(*case)
    torch.testing.assert_close(out, loop_attention(*case), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    allowed = slot_mask(case[3], case[4])  # [B, Hkv, T, S]
    G = case[0].shape[1] // case[1].shape[1]
    assert (probs[~allowed.repeat_interleave(G, dim=1)] == 0).all()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_shared_slots_read_once_equal_the_reference(T, bias):
    """reference_attention's `shared` (the leading slots every row holds alike, read from row 0
    for all rows' queries at once) gives the same output and probabilities."""
    q, k, v, q_pos, kv_pos, kv_bias = random_case(B=3, T=T, bias=bias)
    shared = 11
    k[:, :, :shared], v[:, :, :shared] = k[:1, :, :shared], v[:1, :, :shared]
    kv_pos[:, :, :shared] = torch.arange(shared)  # a prompt every query sees
    if bias:
        kv_bias[:, :, :shared] = kv_bias[:1, :, :shared]
    want_out, want_probs = reference_attention(q, k, v, q_pos, kv_pos, kv_bias)
    k[1:, :, :shared] = v[1:, :, :shared] = float("nan")  # only row 0's copy may be read
    out, probs = reference_attention(q, k, v, q_pos, kv_pos, kv_bias, shared=shared)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs, want_probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["evicted", "prompt"])
@pytest.mark.parametrize("block_bytes", [1, 4 * 2 * 6 * 37 * 3, 2**24])  # one query, 3 queries, all at once
def test_attention_probs_in_query_blocks_equal_the_reference(monkeypatch, block_bytes, layout):
    """evicted: shuffled slots with holes; prompt: a first prefill chunk, slots in position order
    and right padding, where each block of queries stops at its causal frontier."""
    import tinyengine.attention as attention_module

    query_block = attention_module.query_block
    monkeypatch.setattr(attention_module, "query_block", lambda rows, elems: query_block(rows, elems, block_bytes))
    q, k, v, q_pos, kv_pos, _ = random_case(T=7)
    if layout == "prompt":
        kv_pos = torch.arange(37).expand(2, 2, -1).clone()
        kv_pos[1, :, 30:] = -1  # the second row's prompt is shorter
        q_pos = torch.tensor([[3, 9, 15, 21, 27, 33, 36], [2, 8, 14, 20, 26, 29, PAD_QUERY_POS]])
    assert attention_module.query_block(2 * 6, 37) == max(1, block_bytes // (4 * 2 * 6 * 37))
    want = reference_attention(q, k, v, q_pos, kv_pos)[1]
    torch.testing.assert_close(attention_probs(q, k, q_pos, kv_pos), want, atol=1e-6, rtol=1e-6)
    weight = (torch.arange(7) % 3 != 0).float().expand(2, -1)  # queries 0, 3 and 6 dropped
    want = want * weight[:, None, :, None]
    torch.testing.assert_close(attention_probs(q, k, q_pos, kv_pos, weight), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(attention_probs(q, k, q_pos, kv_pos, weight, summed=True), want.sum(2, keepdim=True),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [dict(T=1, S=37), dict(T=9, S=130), dict(Hq=4, Hkv=4, T=3, S=64)])
def test_backend_equals_reference(backend, bias, shape):
    case = random_case(bias=bias, **shape)
    expected = reference_attention(*case)[0]
    torch.testing.assert_close(attention(*case, backend=backend), expected, atol=2e-5, rtol=2e-5)


def test_causal_prefill_equals_sdpa_is_causal():
    B, H, T, D = 1, 4, 20, 8
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    pos = torch.arange(T)[None]
    ours = attention(q, k, v, pos, pos[:, None].expand(B, H, T), backend="flex")
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=2e-5)


def test_causal_fast_path_equals_the_slot_rule_for_real_queries():
    """The engine's first prefill chunk (tinyengine/engine.py) uses SDPA's causal kernel: with right
    padding and GQA it equals the slot rule on every real query."""
    B, Hq, Hkv, T, D = 3, 6, 2, 11, 8
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    lengths = torch.tensor([11, 7, 1])
    idx = torch.arange(T).expand(B, -1)
    real = idx < lengths[:, None]
    q_pos, kv_pos = torch.where(real, idx, PAD_QUERY_POS), torch.where(real, idx, -1)[:, None].expand(-1, Hkv, -1)
    expected = reference_attention(q, k, v, q_pos, kv_pos)[0]
    got = causal_attention(q, k, v)
    mask = real[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[1, :, 8], expected[1, :, 8])  # padded queries differ, and are never used


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(*random_case(), backend="magic")
