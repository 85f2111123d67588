"""Induction and duplicate-token scores (PATTERNS.md; Olsson et al. 2022) and the induction probe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlog import capture
from attnlog.patterns import PatternContext, score
from attnlog.probes import Probe, ProbeSet, encode_probe, induction_probe
from attnlog.snapshot import ProbeAttention

T = 10  # tokens in one copy


def _word_level_tokenizer(bos: bool):
    """A tiny offline fast tokenizer, with or without a BOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<pad>": 1, "[unused0]": 2} | {f"w{i}": i + 3 for i in range(40)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", **extra)


def _repeated(tokenizer) -> ProbeAttention:
    """The induction probe, encoded, as a causal ProbeAttention with placeholder attention."""
    enc = encode_probe(induction_probe(tokenizer, T), tokenizer)
    n = len(enc)
    return ProbeAttention(
        name="induction",
        tokens=enc.tokens,
        attention=torch.eye(n)[None, None],
        special=torch.from_numpy(enc.special),
        punct=torch.from_numpy(enc.punct),
        segment=torch.from_numpy(enc.segment),
        token_ids=torch.from_numpy(enc.input_ids),
        causal=True,
    )


def _heads(n: int, offset: int, first: int) -> torch.Tensor:
    """[1, 3, n, n]: a perfect induction head, a perfect duplicate-token head, a uniform causal
    head. Rows of the second copy (i >= first + T) attend i - T + 1 (induction) or i - T
    (duplicate); other rows attend the first token."""
    i = torch.arange(n)
    second = i >= first + T
    induction = torch.zeros(n, n)
    induction[i, torch.where(second, i - T + 1, 0)] = 1.0
    duplicate = torch.zeros(n, n)
    duplicate[i, torch.where(second, i - T, 0)] = 1.0
    causal = torch.tril(torch.ones(n, n))
    return torch.stack([induction, duplicate, causal / causal.sum(-1, keepdim=True)])[None]


@pytest.mark.parametrize("bos", [True, False])
def test_perfect_induction_and_duplicate_heads(bos):
    tokenizer = _word_level_tokenizer(bos)
    p = _repeated(tokenizer)
    n, first = len(p.tokens), int(bos)
    assert n == 2 * T + first
    p.attention = _heads(n, T, first)
    t = score(p, ["induction", "duplicate_token", "identical_token"])
    ind, dup = t.scores["induction"][0], t.scores["duplicate_token"][0]
    assert ind[0] >= 0.9 and ind[0] == pytest.approx(1.0)
    assert dup[1] >= 0.9 and dup[1] == pytest.approx(1.0)
    # The other perfect head is not an induction / duplicate head: they attend one apart.
    assert ind[1] == pytest.approx(0.0) and dup[0] == pytest.approx(0.0)
    # A uniform causal head gives each key 1/(i+1): mean over the second copy, well under 0.2.
    uniform = float(np.mean([1 / (i + 1) for i in range(first + T, n)]))
    assert ind[2] <= 0.2 and ind[2] == pytest.approx(uniform)
    assert dup[2] <= 0.2 and dup[2] == pytest.approx(uniform)


def test_undefined_without_repeats_or_for_encoders():
    tokenizer = _word_level_tokenizer(bos=True)
    p = _repeated(tokenizer)
    n = len(p.tokens)
    p.attention = _heads(n, T, 1)
    first_copy = ProbeAttention(
        **{
            **p.__dict__,
            "tokens": p.tokens[: T + 1],
            "attention": p.attention[..., : T + 1, : T + 1],
        }
    )
    for name in ("special", "punct", "segment", "token_ids"):
        setattr(first_copy, name, getattr(p, name)[: T + 1])
    t = score(first_copy, ["induction", "duplicate_token"])
    assert np.isnan(t.scores["induction"]).all()  # no token occurred earlier: undefined, not 0
    assert np.isnan(t.scores["duplicate_token"]).all()
    encoder = ProbeAttention(**{**p.__dict__, "causal": False})
    t = score(encoder, ["induction", "duplicate_token"])
    assert np.isnan(t.scores["induction"]).all() and np.isnan(t.scores["duplicate_token"]).all()


def test_duplicate_token_differs_from_identical_token():
    """identical_token counts every other copy (later ones too) and skips punctuation;
    duplicate_token counts earlier copies only, punctuation included."""
    tokens = ["a", ",", "b", ",", "a"]
    attn = torch.zeros(5, 5)
    attn[0, 0] = attn[1, 0] = attn[2, 1] = attn[3, 1] = attn[4, 0] = 1.0
    ctx = PatternContext.create(5, tokens=tokens, causal=True)
    a = attn[None, None]
    from attnlog.patterns import PATTERNS

    # Rows 3 ("," -> earlier ",") and 4 ("a" -> earlier "a") both look back at their copy.
    assert float(PATTERNS["duplicate_token"](a, ctx)) == pytest.approx(1.0)
    # identical_token skips punctuation: only row 4 is eligible.
    assert float(PATTERNS["identical_token"](a, ctx)) == pytest.approx(1.0)
    bidirectional = PatternContext.create(5, tokens=tokens, causal=False)
    attn_enc = attn.clone()
    attn_enc[0] = 0
    attn_enc[0, 4] = 1.0  # the first "a" looks at the later "a"
    enc = attn_enc[None, None]
    assert float(PATTERNS["identical_token"](enc, bidirectional)) == pytest.approx(1.0)
    assert math.isnan(float(PATTERNS["duplicate_token"](enc, bidirectional)))


def test_induction_probe_is_fixed_by_tokenizer_and_seed(minilm):
    _, tokenizer = minilm
    p = induction_probe(tokenizer)
    assert p == induction_probe(tokenizer) and p.name == "induction"
    ids = np.asarray(p.ids)
    assert len(ids) == 40 and (ids[:20] == ids[20:]).all()  # MiniLM's tokenizer has no BOS
    assert len(set(ids[:20].tolist())) == 20  # drawn without replacement: one repeat per token
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert not special & set(ids.tolist())
    assert not any(t.startswith("[") and t.endswith("]") for t in tokens)  # no [unused7]
    # Pinned: the same tokens on every machine and run (numpy's PCG64 Generator, seed 0).
    assert ids[:5].tolist() == [27938, 10082, 8959, 28605, 16080]  # townspeople secretly ...
    assert induction_probe(tokenizer, seed=1).ids != p.ids
    assert len(induction_probe(tokenizer, length=5).ids) == 10
    with pytest.raises(ValueError, match="length"):
        induction_probe(tokenizer, length=1)
    with_bos = induction_probe(_word_level_tokenizer(bos=True), length=4)
    assert with_bos.ids[0] == 0 and with_bos.ids[1:5] == with_bos.ids[5:]
    assert 2 not in with_bos.ids  # "[unused0]" is skipped


def test_token_id_probe_is_fed_as_given(minilm):
    """Ids are never decoded and re-encoded (random BPE tokens would merge); no [CLS]/[SEP]."""
    _, tokenizer = minilm
    p = induction_probe(tokenizer)
    enc = ProbeSet([p]).encode(tokenizer)[0]
    assert enc.input_ids.tolist() == list(p.ids) and enc.word_ids is None and not enc.is_pair
    with pytest.raises(ValueError, match="token id 99999"):
        encode_probe(Probe(ids=[1, 99999], name="big"), tokenizer)
    with pytest.warns(UserWarning, match="truncated"):
        assert len(encode_probe(p, tokenizer, max_length=30)) == 30


def test_induction_score_through_a_causal_model(minilm):
    """The ids probe runs through a real (tiny, random) GPT-2 and is scored end to end."""
    import transformers as tf

    _, tokenizer = minilm
    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=30522, n_layer=2, n_head=4, n_embd=32, n_positions=64)
    model = tf.GPT2LMHeadModel(config).eval()
    snapshot = capture(model, tokenizer, [induction_probe(tokenizer, length=8), "The cat sat."])
    probe = snapshot.probes[0]
    assert probe.causal and probe.token_ids.tolist() == list(induction_probe(tokenizer, 8).ids)
    t = score(snapshot, ["induction", "duplicate_token"])
    ind = t.per_probe["induction"]["induction"]
    assert ind.shape == (2, 4) and np.isfinite(ind).all()
    # An untrained model is no induction model: near the uniform causal head's 1/i.
    assert ind.max() < 0.5


def _character_tokenizer(alphabet: str):
    """A real character-level fast tokenizer: one token per character, with <s>, <pad>, <unk>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(alphabet)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", unk_token="<unk>"
    )


def _tiny_decoder(vocab_size: int):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128)  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def test_a_small_vocabulary_gets_a_shorter_induction_probe():
    """18 ordinary tokens (a character-level model): the built-in probe repeats all 18, with a
    warning, instead of failing construction for a probe the user did not ask for."""
    from attnlog.capturing import Capturer

    tokenizer = _character_tokenizer("abcdefghijklmnopqr")
    model = _tiny_decoder(len(tokenizer))
    with pytest.warns(UserWarning, match="18 ordinary tokens.*repeats 18 random tokens"):
        cap = Capturer(model, tokenizer, ["abc cab"])
    probe = cap.probe_set[-1]
    assert probe.name == "induction" and len(probe.ids) == 1 + 2 * 18
    assert sorted(probe.ids[1:19]) == list(range(3, 21)) and probe.ids[1:19] == probe.ids[19:]
    snapshot, table = cap.measure(0)
    assert np.isfinite(table.per_probe["induction"]["induction"]).all()


def test_a_tiny_vocabulary_leaves_the_induction_probe_out_with_a_warning(tmp_path):
    """Three ordinary tokens are too few for a meaningful probe: the logger is built without it."""
    from attnlog import AttentionLogger

    tokenizer = _character_tokenizer("012")
    model = _tiny_decoder(len(tokenizer))
    with pytest.warns(UserWarning, match="3 ordinary tokens.*left out"):
        logger = AttentionLogger(model, tokenizer, ["0120"], sinks=[], archive=False,
                                 logdir=tmp_path, writer="thread")  # fmt: skip
    with logger:
        assert [p.name for p in logger.capturer.probe_set] == ["p0_0120"]
        assert logger.log(0)
