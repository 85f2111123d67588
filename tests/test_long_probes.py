"""Long probes: statistics from q/k in chunks of query rows equal the whole computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from attnlog.capturing import Capturer
from attnlog.probes import Probe


def _decoder(positions: int, heads: int = 4, kv_heads: int = 2, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=8 * heads, intermediate_size=32,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, max_position_embeddings=positions)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)  # fmt: skip
    return BertModel(config).eval()


def _ids_probe(n: int, seed: int, name: str) -> Probe:
    ids = np.random.default_rng(seed).integers(1000, 29000, size=n).tolist()
    return Probe(ids=ids, name=name)


def _long_tokenizer(tokenizer, n: int):
    tok = copy.deepcopy(tokenizer)
    tok.model_max_length = n
    return tok


def _assert_same(table, reference, atol):
    for name, expected in reference.scores.items():
        np.testing.assert_allclose(table.scores[name], expected, atol=atol, rtol=0, err_msg=name)


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_chunked_rows_give_what_eager_gives_in_a_padded_batch(minilm, family):
    """Above `chunked_above` the output comes from sdpa and the statistics from q/k row chunks:
    scores, whole attention and q/k equal the eager path's, padding and masks included."""
    _, tokenizer = minilm
    model = _decoder(512) if family == "decoder" else _encoder()
    probes = [
        Probe("The cat sat on the mat.", "The cat was very happy.", name="pair"),
        Probe("Short one.", name="short"),
        Probe("A somewhat longer probe, with punctuation; and more words than the others.",
              name="longer"),
    ]  # fmt: skip
    options = dict(induction_probe=False)
    eager, eager_table = Capturer(model, tokenizer, probes, **options).measure(1)
    chunked_cap = Capturer(model, tokenizer, probes, chunked_above=8, **options)
    chunked, table = chunked_cap.measure(1)
    assert model.config._attn_implementation == "sdpa"
    _assert_same(table, eager_table, atol=1e-5)
    for got, want in zip(chunked.probes, eager.probes):
        assert not got.pooled
        np.testing.assert_allclose(got.attention, want.attention, atol=1e-3)  # float16 host copies
        np.testing.assert_allclose(got.queries, want.queries, atol=1e-3)


def test_4k_token_probe_chunked_matches_the_full_computation(minilm):
    _, tokenizer = minilm
    n = 4096
    model = _decoder(n, heads=2, kv_heads=1, layers=1)
    tok = _long_tokenizer(tokenizer, n)
    probes = [_ids_probe(n, 0, "long")]
    full, full_table = Capturer(model, tok, probes, chunked_above=n, induction_probe=False).measure(
        0
    )
    chunked, table = Capturer(model, tok, probes, induction_probe=False).measure(0)
    _assert_same(table, full_table, atol=1e-4)
    assert np.isfinite(table.scores["max_logit"]).all()
    assert chunked.probes[0].pooled and chunked.probes[0].attention.shape == (1, 2, 256, 256)
    np.testing.assert_allclose(
        chunked.probes[0].attention.astype("float32"),
        full.probes[0].attention.astype("float32"),
        atol=1e-3,
    )


def test_eager_attention_in_row_chunks_equals_the_whole_layer(minilm, monkeypatch):
    """A layer bigger than CHUNK_BYTES runs the model's eager attention on chunks of query
    rows: the output, the attention and the scores are those of one whole eager call."""
    import attnlog.capturing.stream as capture_module

    model, tokenizer = minilm
    probes = [Probe("The cat sat on the mat.", "The cat was very happy.", name="pair"),
              Probe("Short one.", name="short")]  # fmt: skip
    whole, whole_table = Capturer(model, tokenizer, probes).measure(0)
    monkeypatch.setitem(capture_module.CHUNK_BYTES, "cpu", 4 * 2 * 12 * 20 * 3)  # 3 rows a chunk
    rows, table = Capturer(model, tokenizer, probes).measure(0)
    _assert_same(table, whole_table, atol=1e-5)
    for got, want in zip(rows.probes, whole.probes):
        # float16 copies: two float32 values 1e-7 apart can round one float16 step apart
        np.testing.assert_allclose(got.attention, want.attention, rtol=1e-3, atol=2e-4)
