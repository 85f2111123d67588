"""Capture: exact eager attention from the real MiniLM and from tiny configs of every family."""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import pytest
import torch

from attnlog import capture
from attnlog.capturing import AttentionUnavailableError, Capturer, unwrap_model
from attnlog.probes import Probe

PAIR = ("The cat sat on the mat.", "The cat was very happy.")


def _eager_reference(model, tokenizer, *texts):
    """Attention [L, H, n, n] from a plain eager forward pass of one unpadded probe."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        enc = tokenizer(*texts, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return torch.stack([a[0] for a in out.attentions]), enc


LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat " * 2


# Similar lengths keep the padded batch per layer; one long probe among short ones keeps each
# probe's own attention (padding would more than double the memory): both give the same arrays.
@pytest.mark.parametrize(
    "probes",
    [[PAIR, "I like strawberries, but not raspberries!", "Short."], [LONG, "Short.", "Hi."]],
    ids=["padded-batch", "per-probe"],
)
def test_minilm_matches_plain_eager_forward(minilm, probes):
    model, tokenizer = minilm
    snapshot = capture(model, tokenizer, probes, step=7)
    assert snapshot.step == 7 and snapshot.model_type == "bert"
    assert [len(p) for p in snapshot.probes] != [len(snapshot.probes[0])] * 3  # padding was used
    texts = [p if isinstance(p, tuple) else (p,) for p in probes]
    for probe, text in zip(snapshot.probes, texts):
        reference, enc = _eager_reference(model, tokenizer, *text)
        assert probe.tokens == tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
        assert probe.attention.shape == (6, 12, len(probe), len(probe))
        torch.testing.assert_close(probe.attention, reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            probe.attention.sum(-1), torch.ones(6, 12, len(probe)), atol=1e-5, rtol=0
        )
        logits = probe.queries @ probe.keys.transpose(-1, -2) * probe.scaling
        torch.testing.assert_close(logits.softmax(-1), probe.attention, atol=1e-5, rtol=0)
        host = snapshot.to_host(np.float32).probes[texts.index(text)]
        np.testing.assert_array_equal(host.attention, probe.attention.numpy())
        np.testing.assert_array_equal(host.special, probe.special.numpy())


def test_the_documented_one_shot_snippet_runs(minilm):
    """`from attnlog import capture, score` as the quickstart shows it: capture, then score."""
    from attnlog import capture, score

    model, tokenizer = minilm
    snap = capture(model, tokenizer, ["The cat sat."])
    table = score(snap)
    assert [p.tokens for p in snap.probes] == [["[CLS]", "the", "cat", "sat", ".", "[SEP]"]]
    assert table.scores["cls"].shape == (6, 12) and np.isfinite(table.scores["cls"]).all()


def test_capture_options_are_checked_in_one_place_naming_the_fix(minilm):
    from attnlog.capturing import CaptureOptions

    model, tokenizer = minilm
    with pytest.raises(TypeError, match="unknown option 'batch_sise'; did you mean 'batch_size'"):
        capture(model, tokenizer, ["fine"], batch_sise=2)
    with pytest.raises(ValueError, match="on_long must be 'truncate' or 'error'"):
        CaptureOptions(on_long="drop")
    with pytest.raises(TypeError, match="record_qk must be True or False"):
        Capturer(model, tokenizer, ["fine"], record_qk="no")
    with pytest.raises(TypeError, match="archive_mb must be a number of MiB"):
        CaptureOptions(archive_mb=float("nan"))
    options = CaptureOptions(batch_size=1, record_qk=False)
    snapshot = Capturer(model, tokenizer, ["The cat sat.", "Hi."], options)(0)
    assert snapshot.probes[0].queries is None and len(snapshot.probes) == 2


def test_queries_and_keys_give_the_attention_logits(minilm):
    model, tokenizer = minilm
    probe = capture(model, tokenizer, [PAIR]).probes[0]
    assert (
        probe.queries.shape == (6, 12, len(probe), 32) and probe.keys.shape == probe.queries.shape
    )
    logits = probe.queries @ probe.keys.transpose(-1, -2) * probe.scaling
    torch.testing.assert_close(logits.softmax(-1), probe.attention, atol=1e-5, rtol=0)


def test_masks_segments_and_words(minilm):
    model, tokenizer = minilm
    probe = capture(model, tokenizer, [Probe(*PAIR, name="pair")]).probes[0]
    tokens = probe.tokens
    assert probe.name == "pair" and probe.is_pair and not probe.causal
    assert [tokens[i] for i in probe.special.nonzero().flatten()] == ["[CLS]", "[SEP]", "[SEP]"]
    assert [tokens[i] for i in probe.punct.nonzero().flatten()] == [".", "."]
    first_sep = tokens.index("[SEP]")
    assert probe.segment[: first_sep + 1].eq(0).all() and probe.segment[first_sep + 1 :].eq(1).all()
    words = probe.word_ids.tolist()
    assert words[0] == -1 and len(set(words[1:first_sep])) == first_sep - 1
    assert set(words[1:first_sep]).isdisjoint(words[first_sep + 1 : -1])  # B's words renumbered


def test_training_state_is_restored(minilm):
    model, tokenizer = minilm
    model.train()
    model.encoder.layer[0].eval()  # a user's frozen sub-module stays as it was
    before = torch.get_rng_state()
    try:
        capture(model, tokenizer, ["Hello world."])
        assert model.training and not model.encoder.layer[0].training
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(torch.get_rng_state(), before)
    finally:
        model.eval()


def test_concurrent_probe_passes_leave_the_model_as_it_was(minilm):
    """Threads calling the capturer at once: each pass runs alone and restores everything."""
    model, tokenizer = minilm
    cap = Capturer(model, tokenizer, [PAIR, "Short."])
    reference = cap(0)
    model.train()
    model.encoder.layer[0].eval()
    start = threading.Barrier(4)
    results, errors = [], []

    def run():
        try:
            start.wait()
            for _ in range(3):
                results.append(cap(0))
        except Exception as ex:  # a failure in a thread must fail the test
            errors.append(ex)

    threads = [threading.Thread(target=run) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors and len(results) == 12
        assert model.training and not model.encoder.layer[0].training
        assert all(m.training for m in model.encoder.layer[1:].modules())
        assert model.config._attn_implementation == "sdpa"
        for snapshot in results:
            for probe, ref in zip(snapshot.probes, reference.probes):
                assert probe.queries is not None and probe.keys is not None
                torch.testing.assert_close(probe.queries, ref.queries, atol=1e-6, rtol=0)
                torch.testing.assert_close(probe.attention, ref.attention, atol=1e-6, rtol=0)
    finally:
        model.eval()


def test_attention_function_is_registered_through_the_public_api(minilm):
    """`AttentionInterface.register` is public and only updates a mapping: calling it at every
    capture is harmless, and the name is then a valid attention implementation."""
    from transformers import AttentionInterface

    model, tokenizer = minilm
    capture(model, tokenizer, ["Hello world."])
    capture(model, tokenizer, ["Hello world."])
    assert "attnlog_eager" in AttentionInterface()
    assert model.config._attn_implementation == "sdpa"


def test_unwraps_compile_and_dataparallel(minilm):
    model, tokenizer = minilm
    wrapped = torch.nn.DataParallel(model)
    assert unwrap_model(wrapped) is model
    compiled = torch.compile(model)  # only unwrapped, never run compiled here
    assert unwrap_model(compiled) is model


def test_peft_lora_model_is_captured_with_its_adapters(minilm):
    peft = pytest.importorskip("peft")
    model, tokenizer = minilm
    lora = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False),
    )
    plain = capture(model, tokenizer, ["Adapters change attention."]).probes[0].attention
    adapted = capture(lora, tokenizer, ["Adapters change attention."]).probes[0].attention
    assert adapted.shape == plain.shape and not torch.allclose(adapted, plain)


# ---- bad input ---------------------------------------------------------------------------


def test_empty_inputs_fail_fast(minilm):
    model, tokenizer = minilm
    with pytest.raises(ValueError, match="empty"):
        Capturer(model, tokenizer, [])
    with pytest.raises(ValueError, match="empty"):
        Capturer(model, tokenizer, ["fine", "   "])
    with pytest.raises(ValueError, match="tokenizer"):
        Capturer(model, None, ["fine"])


def test_over_long_probe_truncates_with_warning_or_errors(minilm):
    model, tokenizer = minilm
    long_text = "word " * 600
    with pytest.warns(UserWarning, match="truncated"):
        cap = Capturer(model, tokenizer, [long_text])
    assert len(cap.encoded[0]) == 512
    with pytest.raises(ValueError, match="on_long='truncate'"):
        Capturer(model, tokenizer, [long_text], on_long="error")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snap = Capturer(model, tokenizer, [long_text], max_length=40)(0)
    assert snap.probes[0].tokens[-1] == "[SEP]" and len(snap.probes[0]) == 40


@pytest.mark.parametrize(
    "option", ["max_length", "batch_size", "full_attention_limit", "pooled_size", "chunked_above"]
)
def test_sizes_below_one_fail_at_construction(minilm, option):
    model, tokenizer = minilm
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"{option} must be at least 1"):
            Capturer(model, tokenizer, ["fine"], **{option: bad})
    with pytest.raises(TypeError, match=f"{option} must be a whole number"):
        Capturer(model, tokenizer, ["fine"], **{option: 2.5})
    with pytest.raises(ValueError, match="archive_mb must be more than 0"):
        Capturer(model, tokenizer, ["fine"], archive_mb=0)


def test_pooled_maps_shrink_to_fit_the_archive_budget(minilm):
    _, tokenizer = minilm
    probes = [_ids_probe(120, seed, f"long{seed}") for seed in range(2)]
    options = dict(induction_probe=False, full_attention_limit=100)
    # 2 layers x 4 heads x 2 long probes, float16: m = sqrt(budget / 32 bytes)
    cap = Capturer(_tiny("llama"), tokenizer, probes, archive_mb=32 * 40**2 / 2**20, **options)
    assert cap.pooled_size == 40
    snapshot = cap(0)
    assert all(p.attention.shape == (2, 4, 40, 40) for p in snapshot.probes)
    assert Capturer(_tiny("llama"), tokenizer, probes, **options).pooled_size == 256


def test_vocabulary_mismatch_names_the_fix(minilm):
    model, tokenizer = minilm
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(["brandnewtoken"])
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        Capturer(model, tok, ["a brandnewtoken here"])


def test_non_hf_model_is_rejected(minilm):
    _, tokenizer = minilm
    with pytest.raises(TypeError, match="Hugging Face"):
        Capturer(torch.nn.Linear(2, 2), tokenizer, ["x"])


# ---- every family from a tiny random config -----------------------------------------------


def _tiny(family: str):
    import transformers as tf

    common = dict(vocab_size=30522, num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                  intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    configs = {
        "bert": (tf.BertConfig, tf.BertModel, common),
        "roberta": (tf.RobertaConfig, tf.RobertaForSequenceClassification, {**common, "pad_token_id": 0}),
        "xlm-roberta": (tf.XLMRobertaConfig, tf.XLMRobertaModel, {**common, "pad_token_id": 0}),
        "electra": (tf.ElectraConfig, tf.ElectraModel, {**common, "embedding_size": 32}),
        "albert": (tf.AlbertConfig, tf.AlbertModel, {**common, "embedding_size": 16}),
        "distilbert": (tf.DistilBertConfig, tf.DistilBertModel,
                       dict(vocab_size=30522, n_layers=2, n_heads=4, dim=32, hidden_dim=64)),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
                 dict(vocab_size=30522, n_layer=2, n_head=4, n_embd=32, n_positions=128)),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {**common, "num_key_value_heads": 2}),
        "bart": (tf.BartConfig, tf.BartForConditionalGeneration,
                 dict(vocab_size=30522, d_model=32, encoder_layers=2, decoder_layers=2,
                      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, max_position_embeddings=128)),
        "t5": (tf.T5Config, tf.T5ForConditionalGeneration,
               dict(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    decoder_start_token_id=0)),
    }  # fmt: skip
    config_cls, model_cls, kwargs = configs[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kwargs)).eval()
    return model


@pytest.mark.parametrize(
    "family", ["bert", "roberta", "xlm-roberta", "electra", "albert", "distilbert", "gpt2", "llama"]
)
def test_every_family_returns_normalised_attention(family, minilm):
    _, tokenizer = minilm
    model = _tiny(family)
    snapshot = capture(model, tokenizer, [PAIR, "A shorter probe."])
    causal = family in ("gpt2", "llama")
    for probe in snapshot.probes:
        n = len(probe)
        assert probe.attention.shape == (2, 4, n, n) and probe.causal == causal
        torch.testing.assert_close(probe.attention.sum(-1), torch.ones(2, 4, n), atol=1e-5, rtol=0)
        if causal:
            assert probe.attention.triu(1).abs().max() == 0
        assert probe.queries is not None and probe.queries.shape[:3] == (2, 4, n)
        logits = probe.queries @ probe.keys.transpose(-1, -2) * probe.scaling
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        if family != "albert":  # same-weight layers still give per-layer q/k
            torch.testing.assert_close(logits.softmax(-1), probe.attention, atol=1e-4, rtol=0)
    # the padded batch gives what an unpadded pass gives
    alone = capture(model, tokenizer, ["A shorter probe."]).probes[0].attention
    torch.testing.assert_close(snapshot.probes[1].attention, alone, atol=1e-5, rtol=0)


def test_grouped_query_keys_are_expanded_per_head(minilm):
    _, tokenizer = minilm
    model = _tiny("llama")
    assert model.config.num_key_value_heads == 2
    probe = capture(model, tokenizer, ["Rotary keys."]).probes[0]
    assert probe.keys.shape == probe.queries.shape
    assert torch.equal(probe.keys[:, 0], probe.keys[:, 1])  # heads 0 and 1 share a key head


def test_tokenizer_without_pad_token(minilm):
    _, tokenizer = minilm
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    assert tok.pad_token_id is None
    snapshot = capture(_tiny("gpt2"), tok, ["One probe here.", "And another, longer probe here."])
    assert [p.tokens for p in snapshot.probes] == [
        tok.convert_ids_to_tokens(tok(t)["input_ids"])
        for t in ("One probe here.", "And another, longer probe here.")
    ]


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_encoder_decoder_gives_encoder_decoder_and_cross_attention(family, minilm):
    _, tokenizer = minilm
    probe = capture(_tiny(family), tokenizer, [PAIR]).probes[0]
    n, m = len(probe), len(probe.decoder_tokens)
    assert probe.attention.shape == (2, 4, n, n) and not probe.causal
    assert probe.decoder_attention.shape == (2, 4, m, m)
    assert probe.cross_attention.shape == (2, 4, m, n)
    assert probe.decoder_attention.triu(1).abs().max() == 0
    for a in (probe.attention, probe.decoder_attention, probe.cross_attention):
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5, rtol=0)
    assert probe.queries is not None and probe.queries.shape[2] == n


def test_model_without_attention_weights_is_reported(minilm):
    _, tokenizer = minilm
    model = _tiny("bert")

    class NoWeights(torch.nn.Module):  # a real module whose forward drops attentions
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            out = self.inner(**kwargs)
            out.attentions = None
            return out

    with pytest.raises(AttentionUnavailableError, match="output_attentions"):
        Capturer(NoWeights(model), tokenizer, ["x"]).check()


# ---- streaming: scores and stored attention reduced layer by layer ------------------------


def _assert_same_scores(table, reference, atol=1e-5):
    assert table.scores.keys() == reference.scores.keys()
    for name, expected in reference.scores.items():
        np.testing.assert_allclose(table.scores[name], expected, atol=atol, rtol=0, err_msg=name)
    assert table.per_probe.keys() == reference.per_probe.keys()
    if reference.labels is not None:
        assert (table.labels == reference.labels).all()


@pytest.mark.parametrize("family", ["minilm", "llama"])
@pytest.mark.parametrize("batch_size", [None, 1])
def test_scores_of_the_streamed_pass_equal_scores_of_the_whole_attention(
    minilm, family, batch_size
):
    from attnlog.patterns import score

    model, tokenizer = minilm
    model = model if family == "minilm" else _tiny("llama")
    probes = [Probe(*PAIR, name="pair"), Probe("I like strawberries, not raspberries!", name="b")]
    cap = Capturer(model, tokenizer, probes, batch_size=batch_size, induction_probe=False)
    snapshot, table = cap.measure(3)
    reference = score(capture(model, tokenizer, probes), step=3)
    assert table.step == 3 and not any(p.pooled for p in snapshot.probes)
    _assert_same_scores(table, reference)
    assert np.isfinite(table.scores["max_logit"]).all()  # logits reached the accumulator


def _ids_probe(n: int, seed: int = 0, name: str = "long") -> Probe:
    rng = np.random.default_rng(seed)
    return Probe(ids=rng.integers(1000, 29000, size=n).tolist(), name=name)


def test_probe_over_the_full_attention_limit_is_stored_pooled(minilm):
    from attnlog.capturing import pool_attention

    _, tokenizer = minilm
    model = _tiny("llama")
    probes = [_ids_probe(120), Probe("A short probe.", name="short")]
    options = dict(induction_probe=False, full_attention_limit=100, pooled_size=32)
    snapshot, table = Capturer(model, tokenizer, probes, **options).measure(0)
    whole_cap = Capturer(model, tokenizer, probes, induction_probe=False)
    whole, whole_table = whole_cap.measure(0)
    long, short = snapshot.probes
    assert long.pooled and not short.pooled and len(long.tokens) == 120
    assert long.attention.shape == (2, 4, 32, 32) and long.queries is None
    spans = long.spans
    assert spans.shape == (32, 2) and spans[0, 0] == 0 and spans[-1, 1] == 120
    assert (spans[1:, 0] == spans[:-1, 1]).all() and (spans[:, 1] > spans[:, 0]).all()
    assert len(long.labels) == 32 and long.labels[0].startswith(long.tokens[0])
    np.testing.assert_allclose(long.attention.astype("float32").sum(-1), 1, atol=2e-3)
    expected, expected_spans = pool_attention(
        torch.from_numpy(whole.probes[0].attention).float(), 32
    )
    np.testing.assert_allclose(long.attention, expected.numpy(), atol=2e-3)  # float16 on the host
    assert (spans == expected_spans.numpy()).all()
    assert short.queries is not None and short.attention.shape[-1] == len(short)
    _assert_same_scores(table, whole_table)


def test_pooled_snapshot_round_trips_and_version_1_archives_still_load(minilm, tmp_path):
    import json

    from attnlog import load
    from attnlog.snapshot import FORMAT_VERSION

    _, tokenizer = minilm
    cap = Capturer(
        _tiny("llama"), tokenizer, [_ids_probe(60)], induction_probe=False, full_attention_limit=50
    )
    snapshot, _ = cap.measure(4)
    loaded = load(snapshot.save(tmp_path / "step.npz"))
    probe = loaded.probes[0]
    assert FORMAT_VERSION >= 2 and probe.pooled and probe.labels == snapshot.probes[0].labels
    assert (probe.spans == snapshot.probes[0].spans).all() and len(probe.tokens) == 60
    # a version-1 archive (written before pooling existed): no spans, no labels
    n = 3
    meta = {"format": "attnlog.snapshot", "version": 1, "step": 2, "model_type": "bert",
            "meta": {}, "probes": [{"name": "p", "tokens": ["a", "b", "c"], "decoder_tokens": None,
                                    "causal": False, "is_pair": False, "scaling": None}]}  # fmt: skip
    arrays = {
        "p0/attention": np.full((1, 1, n, n), 1 / n, dtype=np.float16),
        "p0/special": np.zeros(n, bool),
        "p0/punct": np.zeros(n, bool),
        "p0/segment": np.zeros(n, np.int64),
        "p0/token_ids": np.arange(n),
        "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    }
    np.savez_compressed(tmp_path / "v1.npz", **arrays)
    old = load(tmp_path / "v1.npz")
    assert old.step == 2 and not old.probes[0].pooled and old.probes[0].labels is None


def test_causal_models_get_the_induction_probe_unless_opted_out(minilm):
    from attnlog.probes import induction_probe

    model, tokenizer = minilm
    llama = _tiny("llama")
    expected = induction_probe(tokenizer)
    cap = Capturer(llama, tokenizer, ["The cat sat."])
    assert [p.name for p in cap.probe_set] == [cap.probe_set[0].name, expected.name]
    assert list(cap.encoded[-1].input_ids) == list(expected.ids)
    snapshot, table = cap.measure(0)
    assert np.isfinite(table.per_probe[expected.name]["induction"]).all()
    assert len(Capturer(llama, tokenizer, ["The cat sat."], induction_probe=False).encoded) == 1
    assert len(Capturer(model, tokenizer, ["The cat sat."]).encoded) == 1  # not causal


def test_the_streamed_pass_never_asks_for_every_layers_attention(minilm):
    """output_attentions would keep all layers' [H, n, n] until the forward ends."""
    model, tokenizer = minilm
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True
    )
    try:
        snapshot, table = Capturer(model, tokenizer, [PAIR]).measure(0, scores=False)
    finally:
        handle.remove()
    assert seen and not any(k.get("output_attentions") for k in seen)
    assert table is None and snapshot.probes[0].attention.dtype == np.float32  # writer scores it


def test_packed_host_copies_equal_each_array_copied_alone():
    """On a GPU, to_host brings the small arrays over in one packed copy (one wait for the
    device, not one per array): the arrays must come back as each alone would."""
    from attnlog.snapshot import _host_copies

    base = torch.randn(6, 3, 12, 10, 10)
    tensors = [
        base[:, 1, :, :7, :7],  # a probe's view of a padded batch: not contiguous
        torch.randn(6, 12, 7, 32, dtype=torch.bfloat16),
        torch.arange(5.0, dtype=torch.float64),
        torch.randn(2, 3, 4).transpose(0, 2),
    ]
    for got, tensor in zip(_host_copies(tensors), tensors):
        assert got.dtype == np.float32 and got.shape == tuple(tensor.shape)
        np.testing.assert_array_equal(got, tensor.float().numpy())
