"""Pattern scores on hand-built attention with known answers (docs/patterns.md)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from attnlog import patterns
from attnlog.patterns import (
    PATTERNS,
    PatternContext,
    ScoreAccumulator,
    ScoreTable,
    label_heads,
    register_pattern,
    score,
)
from attnlog.probes import is_punctuation
from attnlog.snapshot import ProbeAttention, Snapshot

SENTENCE = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", ".", "[SEP]"]


def probe(tokens, *heads, causal=False, segment=None, word_ids=None, is_pair=False, **kw):
    """ProbeAttention with one layer whose heads are the given [n, n] matrices."""
    n = len(tokens)
    special = torch.tensor([t.startswith(("[", "<")) and len(t) > 1 for t in tokens])
    return ProbeAttention(
        name=kw.pop("name", "p"),
        tokens=list(tokens),
        attention=torch.stack(heads)[None].float(),  # [1, H, n, n]
        special=special,
        punct=torch.tensor([is_punctuation(t) for t in tokens]) & ~special,
        segment=torch.zeros(n, dtype=torch.long) if segment is None else torch.tensor(segment),
        token_ids=torch.tensor([hash(t) % 10_000 for t in tokens]),
        word_ids=None if word_ids is None else torch.tensor(word_ids),
        causal=causal,
        is_pair=is_pair,
        **kw,
    )


def to(n, targets):
    """[n, n] one-hot rows: row i attends only to targets[i]."""
    a = torch.zeros(n, n)
    a[torch.arange(n), torch.as_tensor(targets)] = 1.0
    return a


def uniform_over(mask_rows):
    """[n, n] rows uniform over the True entries of each row of `mask_rows` [n, n]."""
    m = mask_rows.float()
    return m / m.sum(-1, keepdim=True).clamp_min(1)


def one(table_or_dict, name, head=0):
    scores = table_or_dict.scores if isinstance(table_or_dict, ScoreTable) else table_or_dict
    return float(scores[name][0, head])


def test_next_token_head():
    n = len(SENTENCE)
    t = score(probe(SENTENCE, to(n, [min(i + 1, n - 1) for i in range(n)])))
    assert one(t, "next_token") == pytest.approx(1.0)
    assert one(t, "positional") == pytest.approx(1.0)
    assert one(t, "prev_token") == pytest.approx(0.0)
    assert one(t, "confidence") == pytest.approx(6 / 7)  # "." -> [SEP]: no non-special key
    assert t.labels[0, 0] == "diagonal"


def test_prev_token_head():
    n = len(SENTENCE)
    t = score(probe(SENTENCE, to(n, [max(i - 1, 0) for i in range(n)])))
    assert one(t, "prev_token") == pytest.approx(1.0)
    assert one(t, "positional") == pytest.approx(1.0)
    assert one(t, "next_token") == pytest.approx(0.0)
    assert one(t, "entropy_nats") == pytest.approx(0.0)


def test_uniform_head_is_broad():
    n = len(SENTENCE)
    t = score(probe(SENTENCE, torch.full((n, n), 1 / n)))
    assert one(t, "broad") == pytest.approx(1.0)
    assert one(t, "entropy_nats") == pytest.approx(math.log(n))
    assert one(t, "positional") == 0.0  # ties do not make a head positional
    assert one(t, "delimiter") == pytest.approx(2 / n)
    assert one(t, "sink") == pytest.approx(1 / n)
    assert t.labels[0, 0] == "broad"


def test_sep_only_head():
    n = len(SENTENCE)
    t = score(probe(SENTENCE, to(n, [n - 1] * n)))
    assert one(t, "delimiter") == pytest.approx(1.0)
    assert one(t, "sep") == pytest.approx(1.0)
    assert one(t, "cls") == pytest.approx(0.0)
    assert one(t, "sink") == pytest.approx(0.0)
    assert math.isnan(one(t, "confidence")) is False
    assert t.labels[0, 0] == "vertical"


def test_cls_and_sep_identified_from_data():
    tokens = ["[CLS]", "a", "[SEP]", "b", "[SEP]"]
    ctx = PatternContext.from_probe(
        probe(tokens, torch.eye(5), segment=[0, 0, 0, 1, 1], is_pair=True)
    )
    assert ctx.cls.tolist() == [True, False, False, False, False]
    assert ctx.sep.tolist() == [False, False, True, False, True]
    # RoBERTa: no token types; <s> is cls by position, </s></s> closes sentence A.
    roberta = ["<s>", "a", "</s>", "</s>", "b", "</s>"]
    ctx = PatternContext.from_probe(probe(roberta, torch.eye(6), is_pair=True))
    assert ctx.cls.tolist() == [True] + [False] * 5
    assert ctx.sep.tolist() == [False, False, True, True, False, True]
    assert ctx.segment.tolist() == [0, 0, 0, 0, 1, 1]
    # A causal decoder has no cls: its first special token is a BOS (a sink), not a summary.
    ctx = PatternContext.from_probe(probe(["<s>", "a", "b"], torch.eye(3), causal=True))
    assert not ctx.cls.any()


def test_first_token_sink_in_causal_decoder():
    tokens = ["The", "cat", "sat", "on", "the", "mat"]  # GPT-2: no BOS, the first token sinks
    t = score(probe(tokens, to(6, [0] * 6), causal=True))
    assert one(t, "sink") == pytest.approx(1.0)
    assert one(t, "prev_token") == pytest.approx(1 / 5)  # row 1 attends its previous token
    assert math.isnan(one(t, "next_token"))
    assert math.isnan(one(t, "same_sentence"))
    assert math.isnan(one(t, "cls"))
    assert math.isnan(one(t, "delimiter"))  # no special token anywhere
    assert t.labels[0, 0] == "vertical"


def test_decoder_without_next_token_or_same_sentence():
    tokens = ["a", "b", ".", "c", "d"]
    causal = torch.tril(torch.ones(5, 5))
    t = score(
        probe(
            tokens,
            causal / causal.sum(-1, keepdim=True),
            causal=True,
            segment=[0, 0, 0, 1, 1],
            is_pair=True,
        )
    )
    assert math.isnan(one(t, "next_token"))
    assert math.isnan(one(t, "same_sentence"))
    assert one(t, "broad") == pytest.approx(1.0)  # uniform over the visible prefix
    assert one(t, "punctuation") == pytest.approx((1 / 3 + 1 / 4 + 1 / 5) / 3)  # rows that see "."


PAIR = ["[CLS]", "the", "cat", "sat", "[SEP]", "it", "was", "happy", "[SEP]"]
PAIR_SEGMENT = [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_sentence_pair_block_and_bag_of_words():
    seg = torch.tensor(PAIR_SEGMENT)
    special = torch.tensor([t.startswith("[") for t in PAIR])
    own = (seg[:, None] == seg[None, :]) & ~special[None, :]
    other = (seg[:, None] != seg[None, :]) & ~special[None, :]
    p = probe(PAIR, uniform_over(own), uniform_over(other), segment=PAIR_SEGMENT, is_pair=True)
    t = score(p)
    assert one(t, "same_sentence", 0) == pytest.approx(1.0)
    assert one(t, "sentence_bow", 0) == pytest.approx(1.0)
    assert one(t, "same_sentence", 1) == pytest.approx(0.0)
    assert one(t, "sentence_bow", 1) == pytest.approx(0.0)
    assert t.labels[0].tolist() == ["block", "heterogeneous"]
    single = score(probe(SENTENCE, torch.eye(len(SENTENCE))))
    assert math.isnan(one(single, "same_sentence"))  # one sentence: undefined, not 1


def test_identical_token_same_and_other_sentence():
    tokens = ["[CLS]", "the", "cat", "[SEP]", "the", "dog", "[SEP]"]
    head = to(7, [0, 4, 0, 0, 1, 0, 0])  # the <-> the across the sentences
    t = score(probe(tokens, head, segment=[0, 0, 0, 0, 1, 1, 1], is_pair=True))
    assert one(t, "identical_token") == pytest.approx(1.0)
    assert one(t, "identical_token_other") == pytest.approx(1.0)
    assert math.isnan(one(t, "identical_token_same"))  # no repeated token inside a sentence


def test_identical_token_skips_chinese_stop_characters():
    tokens = ["[CLS]", "猫", "的", "猫", "的", "。", "[SEP]"]
    head = to(7, [0, 3, 4, 1, 2, 0, 0])  # 猫 <-> 猫 and 的 <-> 的
    t = score(probe(tokens, head))
    # Only the two 猫 rows are eligible: 的 is on the stop-list.
    assert one(t, "identical_token") == pytest.approx(1.0)
    head = to(7, [0, 0, 4, 0, 2, 0, 0])  # only 的 <-> 的
    assert one(score(probe(tokens, head)), "identical_token") == pytest.approx(0.0)


def test_same_word_needs_word_ids():
    tokens = ["[CLS]", "straw", "##berries", "are", "red", "[SEP]"]
    head = to(6, [0, 2, 1, 0, 0, 0])
    t = score(probe(tokens, head, word_ids=[-1, 0, 0, 1, 2, -1]))
    assert one(t, "same_word") == pytest.approx(1.0)
    assert math.isnan(one(score(probe(tokens, head)), "same_word"))


def test_punctuation_full_width_cjk():
    tokens = ["[CLS]", "我", "爱", "猫", "，", "你", "呢", "？", "「", "好", "」", "。", "[SEP]"]
    p = probe(tokens, torch.eye(13))
    assert p.punct.nonzero().flatten().tolist() == [4, 7, 8, 10, 11]
    head = uniform_over(p.punct[None, :].expand(13, 13))
    t = score(probe(tokens, head))
    assert one(t, "punctuation") == pytest.approx(1.0)
    assert one(t, "delimiter") == pytest.approx(0.0)


def _random_attention(layers, heads, n, generator):
    return torch.softmax(3 * torch.randn(layers, heads, n, n, generator=generator), -1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_via_valid_mask_matches_trimmed(side, causal):
    g = torch.Generator().manual_seed(0)
    tokens = ["[CLS]", "the", "cat", "sat", "the", "straw", "##s", ".", "[SEP]"]
    words = [-1, 0, 1, 2, 3, 4, 4, 5, -1]
    n, pad = len(tokens), 3
    padded_tokens = ["[PAD]"] * pad + tokens if side == "left" else tokens + ["[PAD]"] * pad
    valid = torch.tensor([t != "[PAD]" for t in padded_tokens])
    big = _random_attention(2, 3, n + pad, g)  # junk on padded keys and padded query rows
    q, k = torch.randn(2, 3, n + pad, 4, generator=g), torch.randn(2, 3, n + pad, 4, generator=g)
    q[..., ~valid, :] = 100.0  # padded logits would dominate max_logit if not masked
    keep = valid.nonzero().flatten()
    small = big[..., keep, :][..., keep]
    if causal:
        small = small * torch.tril(torch.ones(n, n))
    small = small / small.sum(-1, keepdim=True)

    def words_for(toks):
        it = iter(words)
        return [-1 if t == "[PAD]" else next(it) for t in toks]

    def ctx(toks, keep_mask, qq, kk):
        return PatternContext.create(
            len(toks),
            tokens=toks,
            word_ids=words_for(toks),
            valid=keep_mask,
            causal=causal,
            queries=qq,
            keys=kk,
        )

    trimmed = ctx(tokens, None, q[..., keep, :], k[..., keep, :])
    padded = ctx(padded_tokens, valid, q, k)
    assert padded.first_valid == (pad if side == "left" else 0)
    for name, fn in PATTERNS.items():
        got, want = fn(big, padded), fn(small, trimmed)
        torch.testing.assert_close(got, want, equal_nan=True, msg=name)


def test_max_logit_from_hand_queries_and_keys():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]]])  # [1, 1, 3, 2]
    k = torch.tensor([[[[3.0, 0.0], [0.0, 1.0], [0.0, 10.0]]]])
    tokens = ["a", "b", "c"]
    enc = score(probe(tokens, torch.eye(3), queries=q, keys=k, scaling=0.5))
    assert one(enc, "max_logit") == pytest.approx(10.0)  # q_1 . k_2 = 20, times 0.5
    dec = score(probe(tokens, torch.eye(3), queries=q, keys=k, scaling=0.5, causal=True))
    # Causal: query 1 no longer sees key 2; the max is q_2 . k_2 = 10, times 0.5.
    assert one(dec, "max_logit") == pytest.approx(5.0)
    default = score(probe(tokens, torch.eye(3), queries=q, keys=k))  # scaling 1/sqrt(d)
    assert one(default, "max_logit") == pytest.approx(20 / math.sqrt(2))
    assert math.isnan(one(score(probe(tokens, torch.eye(3))), "max_logit"))


@pytest.fixture
def clean_registry():
    before = dict(PATTERNS)
    yield
    PATTERNS.clear()
    PATTERNS.update(before)


def test_register_custom_pattern(clean_registry):
    def self_attention(attn, ctx):  # [L, H, n, n] -> [L, H]
        return attn.diagonal(0, -2, -1).mean(-1)

    register_pattern("self_attention", self_attention)
    t = score(probe(SENTENCE, torch.eye(len(SENTENCE))), ["self_attention", "broad"])
    assert list(t.scores) == ["self_attention", "broad"]
    assert one(t, "self_attention") == pytest.approx(1.0)
    assert t.labels is None  # the scores the labels need were not selected
    with pytest.raises(ValueError, match="already registered"):
        register_pattern("self_attention", self_attention)
    with pytest.raises(ValueError, match="built-in"):
        register_pattern("broad", self_attention)
    with pytest.warns(UserWarning, match="built-in"):
        register_pattern("broad", self_attention, overwrite=True)
    for bad in ("Self", "a-b", "", "1x", "ä"):
        with pytest.raises(ValueError, match="must match"):
            register_pattern(bad, self_attention)
    with pytest.raises(TypeError):
        register_pattern("nope", 3)


def test_custom_pattern_with_wrong_shape_is_reported(clean_registry):
    register_pattern("wrong", lambda attn, ctx: attn.mean())
    with pytest.raises(ValueError, match="'wrong' returned shape"):
        score(probe(SENTENCE, torch.eye(len(SENTENCE))), ["wrong"])


def test_unknown_pattern_names_list_the_choices():
    with pytest.raises(ValueError, match=r"unknown pattern\(s\) \['nope'\].*prev_token"):
        score(probe(SENTENCE, torch.eye(len(SENTENCE))), ["broad", "nope"])


def test_bad_shapes_raise_value_error():
    p = probe(SENTENCE, torch.eye(len(SENTENCE)))
    p.attention = p.attention[..., :-1, :]  # [1, 1, 8, 9]: not square
    with pytest.raises(ValueError, match=r"expected \[L, H, 9, 9\]"):
        score(p)
    p.attention = p.attention[..., :-1]  # 8 positions for 9 tokens
    with pytest.raises(ValueError, match="9 tokens"):
        score(p)
    with pytest.raises(ValueError, match="tokens"):
        PatternContext.create(3, tokens=["a"])


def test_inputs_unchanged_and_half_precision_upcast():
    g = torch.Generator().manual_seed(1)
    tokens = ["[CLS]", "the", "the", "cat", "[SEP]"]
    attn = _random_attention(2, 2, 5, g).half()
    q, k = torch.randn(2, 2, 5, 4, generator=g).half(), torch.randn(2, 2, 5, 4, generator=g).half()
    p = probe(tokens, *attn[0], queries=q, keys=k, word_ids=[-1, 0, 1, 2, -1])
    p.attention = attn
    before = {
        f: getattr(p, f).clone()
        for f in ("attention", "special", "punct", "segment", "queries", "keys")
    }
    t = score(p)
    for name, value in before.items():
        assert torch.equal(getattr(p, name), value), name
    assert p.attention.dtype == torch.float16
    full = score(
        ProbeAttention(
            **{**p.__dict__, "attention": attn.float(), "queries": q.float(), "keys": k.float()}
        )
    )
    for name in t.scores:
        assert t.scores[name].dtype == np.float32
        np.testing.assert_allclose(t.scores[name], full.scores[name], rtol=1e-5, equal_nan=True)


def test_scores_average_probes_ignoring_nan_and_numpy_input():
    seg = torch.tensor(PAIR_SEGMENT)
    own = uniform_over(seg[:, None] == seg[None, :])
    pair = probe(PAIR, own, name="pair", segment=PAIR_SEGMENT, is_pair=True)
    single = probe(SENTENCE, torch.eye(len(SENTENCE)), name="single")
    snap = Snapshot(step=7, probes=[pair, single])
    t = score(snap)
    assert t.step == 7 and list(t.per_probe) == ["pair", "single"]
    assert math.isnan(t.per_probe["single"]["same_sentence"][0, 0])
    assert one(t, "same_sentence") == pytest.approx(1.0)  # single's NaN ignored, not counted as 0
    both = (t.per_probe["pair"]["broad"] + t.per_probe["single"]["broad"]) / 2
    np.testing.assert_allclose(t.scores["broad"], both, rtol=1e-6)
    host = score(snap.to_host(np.float32))  # numpy arrays, as read back from the archive
    for name in t.scores:
        np.testing.assert_allclose(host.scores[name], t.scores[name], rtol=1e-5, equal_nan=True)
    js = t.to_json()
    assert js["scores"]["max_logit"] == [[None]]


def test_max_logit_combines_probes_by_max():
    q = torch.ones(1, 1, 3, 1)
    low = probe(["a", "b", "c"], torch.eye(3), queries=q, keys=q, scaling=1.0, name="low")
    high = probe(["a", "b", "c"], torch.eye(3), queries=q, keys=3 * q, scaling=1.0, name="high")
    assert one(score([low, high]), "max_logit") == pytest.approx(3.0)


def test_label_heads_thresholds():
    s = {
        "delimiter": np.array([[0.7, 0.7, 0.1, 0.1, 0.1, 0.1]]),
        "sink": np.array([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]),
        "prev_token": np.array([[0.0, 0.3, 0.3, 0.0, 0.0, 0.0]]),
        "next_token": np.array([[0.0, 0.3, np.nan, 0.0, 0.0, 0.0]]),
        "same_sentence": np.array([[0.5, 0.5, 0.5, 0.9, 0.5, 0.5]]),
        "broad": np.array([[0.5, 0.5, 0.5, 0.5, 0.95, 0.5]]),
    }
    got = label_heads(s, chance=0.5).tolist()[0]
    want = ["vertical", "vertical+diagonal", "heterogeneous", "block", "broad", "heterogeneous"]
    assert got == want
    assert label_heads(s, diagonal=0.3).tolist()[0][2] == "diagonal"  # NaN next_token counts 0


def test_patterns_are_public_names():
    expected = {
        "prev_token", "next_token", "positional", "delimiter", "cls", "sep", "sink",
        "punctuation", "broad", "confidence", "sentence_bow", "same_sentence", "identical_token",
        "identical_token_same", "identical_token_other", "same_word", "entropy_nats", "max_logit",
    }  # fmt: skip
    assert expected <= set(PATTERNS)
    for name in expected:
        assert getattr(patterns, name) is PATTERNS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings on all-NaN probes
        score(probe(["a"], torch.ones(1, 1)))


def test_nan_attention_gives_nan_positional_not_zero():
    """A broken (NaN) layer must not be logged as a confident 'not positional'."""
    n = 5
    attn = torch.full((1, 1, n, n), float("nan"))
    ctx = PatternContext.create(n, tokens=[f"t{i}" for i in range(n)])
    assert torch.isnan(PATTERNS["positional"](attn, ctx)).all()


# -- the row-wise accumulator -----------------------------------------------------------------


def _padded_rows(attentions, rows, n_max):
    """[P, H, r, N] rows `rows` (a slice) of each probe's [H, n, n] attention, zero-padded."""
    r = rows.stop - rows.start
    out = torch.zeros(len(attentions), attentions[0].shape[0], r, n_max)
    for p, a in enumerate(attentions):
        block = a[:, rows, :]
        out[p, :, : block.shape[1], : a.shape[-1]] = block
    return out


@pytest.mark.parametrize("chunk", [7, 1, 100])
def test_accumulator_in_row_chunks_matches_whole_probes(chunk):
    """Feeding rows in chunks (as the streaming capture does) gives the full computation."""
    g = torch.Generator().manual_seed(3)
    layers, heads = 2, 3
    specs = [  # tokens, causal, segment, word ids
        (SENTENCE, False, None, [-1, 0, 1, 2, 3, 4, 5, 6, -1]),
        (PAIR, False, PAIR_SEGMENT, None),
        (["<s>", "a", "b", "c", "a", "b", "c", ".", "a"], True, None, None),
        (["x", "y", "x"], True, None, None),
    ]
    probes = []
    for i, (tokens, causal, segment, words) in enumerate(specs):
        n = len(tokens)
        p = probe(
            tokens,
            *torch.softmax(3 * torch.randn(heads, n, n, generator=g), -1),
            causal=causal,
            segment=segment,
            is_pair=segment is not None,
            word_ids=words,
            name=f"p{i}",
            queries=torch.randn(1, heads, n, 4, generator=g),
            keys=torch.randn(1, heads, n, 4, generator=g),
            scaling=0.5,
        )
        p.attention = torch.softmax(3 * torch.randn(layers, heads, n, n, generator=g), -1)
        p.queries = torch.randn(layers, heads, n, 4, generator=g)
        p.keys = torch.randn(layers, heads, n, 4, generator=g)
        probes.append(p)
    want = score(probes)
    contexts = [PatternContext.from_probe(p) for p in probes]
    acc = ScoreAccumulator(contexts, None, layers, heads, "cpu", names=[p.name for p in probes])
    n_max = max(len(p.tokens) for p in probes)
    for layer in range(layers):
        attn = [p.attention[layer] for p in probes]
        logits = [0.5 * p.queries[layer] @ p.keys[layer].transpose(-1, -2) for p in probes]
        for start in range(0, n_max, chunk):
            rows = slice(start, min(start + chunk, n_max))
            acc.add(
                layer,
                _padded_rows(attn, rows, n_max),
                row_start=start,
                logits=_padded_rows(logits, rows, n_max),
            )
    got = acc.table(step=3)
    assert got.step == 3 and list(got.per_probe) == ["p0", "p1", "p2", "p3"]
    assert set(got.scores) == set(PATTERNS)
    for name in want.scores:
        np.testing.assert_allclose(got.scores[name], want.scores[name], atol=1e-5, equal_nan=True)
        for p in want.per_probe:
            np.testing.assert_allclose(
                got.per_probe[p][name], want.per_probe[p][name], atol=1e-5, equal_nan=True
            )
    assert np.isfinite(got.scores["max_logit"]).all()
    assert np.isfinite(got.per_probe["p2"]["induction"]).all()  # the causal repeat defines it
    assert (got.labels == want.labels).all()


def test_add_layers_feeds_several_layers_at_once():
    g = torch.Generator().manual_seed(4)
    probes = [probe(SENTENCE, torch.eye(9), name="a"), probe(PAIR, torch.eye(9), name="b")]
    probes[1].tokens = PAIR[:7]
    for name in ("special", "punct", "segment", "token_ids"):
        setattr(probes[1], name, getattr(probes[1], name)[:7])
    for p in probes:
        n = len(p.tokens)
        p.attention = torch.softmax(3 * torch.randn(3, 2, n, n, generator=g), -1)
    want = score(probes)
    acc = ScoreAccumulator([PatternContext.from_probe(p) for p in probes], None, 3, 2, "cpu")
    block = torch.zeros(2, 3, 2, 9, 9)
    block[0] = probes[0].attention
    block[1, :, :, :7, :7] = probes[1].attention
    acc.add_layers(0, block[:, :2, :, :4], row_start=0)  # layers 0-1, rows 0-3
    acc.add_layers(0, block[:, :2, :, 4:], row_start=4)
    acc.add_full(2, block[:, 2])
    got = acc.results()
    assert got.shape == (2, len(PATTERNS), 3, 2)
    table = acc.table(0)
    for name in want.scores:
        np.testing.assert_allclose(table.scores[name], want.scores[name], atol=1e-5, equal_nan=True)


def test_merge_tables_equals_one_table_over_all_probes():
    seg = torch.tensor(PAIR_SEGMENT)
    pair = probe(
        PAIR,
        uniform_over(seg[:, None] == seg[None, :]),
        name="pair",
        segment=PAIR_SEGMENT,
        is_pair=True,
    )
    single = probe(SENTENCE, torch.eye(len(SENTENCE)), name="single")
    whole = score([pair, single])
    merged = patterns.merge_tables(
        [score(pair), score(single)], 5, [PatternContext.from_probe(p) for p in (pair, single)]
    )
    assert merged.step == 5 and list(merged.per_probe) == ["pair", "single"]
    for name in whole.scores:
        np.testing.assert_allclose(merged.scores[name], whole.scores[name], equal_nan=True)
    assert (merged.labels == whole.labels).all()


def test_accumulator_without_logits_and_with_wide_padding():
    """No logits: max_logit undefined. Keys padded past the longest probe are ignored."""
    n = len(SENTENCE)
    head = to(n, [max(i - 1, 0) for i in range(n)])
    ctx = PatternContext.from_probe(probe(SENTENCE, head))
    acc = ScoreAccumulator([ctx], ["prev_token", "max_logit"], 1, 1, "cpu")
    wide = torch.nn.functional.pad(head, (0, 5), value=0.7)[None, None]  # junk on 5 more keys
    acc.add_full(0, torch.nn.functional.pad(wide, (0, 0, 0, 5), value=0.7))
    t = acc.table(step=0)
    assert one(t, "prev_token") == pytest.approx(1.0)
    assert math.isnan(one(t, "max_logit"))
    with pytest.raises(ValueError, match="1 probes, 1 heads and at least 9 keys"):
        acc.add(0, torch.zeros(1, 2, n, n))
    with pytest.raises(ValueError, match="layer 1"):
        acc.add(1, torch.zeros(1, 1, n, n))


def test_registered_pattern_needs_whole_layers(clean_registry):
    register_pattern("self_attention", lambda attn, ctx: attn.diagonal(0, -2, -1).mean(-1))
    n = len(SENTENCE)
    ctx = PatternContext.from_probe(probe(SENTENCE, torch.eye(n)))
    whole = ScoreAccumulator([ctx], ["self_attention", "broad"], 1, 1, "cpu")
    whole.add_full(0, torch.eye(n)[None, None])
    assert one(whole.table(0), "self_attention") == pytest.approx(1.0)
    chunked = ScoreAccumulator([ctx], ["self_attention", "broad"], 1, 1, "cpu")
    chunked.add(0, torch.eye(n)[None, None, :4], row_start=0)
    chunked.add(0, torch.eye(n)[None, None, 4:], row_start=4)
    with pytest.warns(UserWarning, match="whole-layer attention"):
        t = chunked.table(0)
    assert math.isnan(one(t, "self_attention"))
    assert one(t, "broad") == pytest.approx(0.0)
