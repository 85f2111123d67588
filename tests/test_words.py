"""Word-level attention (Clark et al.): aggregation, word boundaries in English and Chinese,
the word views in the browser."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from browser import browser, wait_for  # noqa: F401  (session fixture)

from attnlog.capturing import capture
from attnlog.probes import Probe
from attnlog.render.event import probe_images, probe_views
from attnlog.words import aggregate, pool_probe, word_probe, word_units

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_aggregate_sums_keys_and_averages_queries():
    attn = np.array(
        [
            [0.1, 0.2, 0.3, 0.4],
            [0.4, 0.3, 0.2, 0.1],
            [0.25, 0.25, 0.25, 0.25],
            [0.0, 0.5, 0.5, 0.0],
        ],
        np.float32,
    )[None, None]  # [1, 1, 4, 4]
    units = [0, 1, 1, 2]  # the middle two positions are one word
    words = aggregate(attn, units)[0, 0]
    want = np.array(
        [
            [0.1, 0.5, 0.4],
            [(0.4 + 0.25) / 2, (0.5 + 0.5) / 2, (0.1 + 0.25) / 2],
            [0.0, 1.0, 0.0],
        ]
    )
    np.testing.assert_allclose(words, want, atol=1e-6)
    np.testing.assert_allclose(words.sum(-1), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="consecutive"):
        aggregate(attn, [0, 1, 0, 2])


@pytest.fixture(scope="module")
def english(minilm):
    model, tokenizer = minilm
    probes = [Probe("Tokenization is unbelievably hard.", name="en")]
    return capture(model, tokenizer, probes).to_host().probes[0]


def test_english_words_from_word_ids(english):
    assert "##ization" in english.tokens
    words = word_probe(english)
    assert words.tokens == ["[CLS]", "tokenization", "is", "unbelievably", "hard", ".", "[SEP]"]
    units, _ = word_units(english)
    attn = np.asarray(english.attention, np.float32)
    piece = [i for i, u in enumerate(units) if u == 3]  # un ##bel ##ie ##va ##bly
    assert len(piece) == 5
    # As keys: the word gets the sum of its pieces; as queries: the mean of their rows.
    np.testing.assert_allclose(words.attention[:, :, 0, 3], attn[:, :, 0, piece].sum(-1), atol=1e-5)
    np.testing.assert_allclose(
        words.attention[:, :, 3, 0], attn[:, :, piece, 0].mean(-1), atol=1e-5
    )
    assert words.special.tolist() == [True] + [False] * 5 + [True]


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    """The Chinese example's character tokenizer with its added special tokens, a tiny BERT."""
    import torch
    from transformers import BertConfig, BertModel

    sys.path.insert(0, str(EXAMPLES))
    try:
        import chinese_bert
    finally:
        sys.path.remove(str(EXAMPLES))
    tokenizer = chinese_bert.build_tokenizer(tmp_path_factory.mktemp("zh_vocab"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    model = BertModel(config).eval()
    probes = [Probe("华为发布新款折叠屏手机[unused1]手机", name="zh")]
    return capture(model, tokenizer, probes).to_host().probes[0]


def test_chinese_characters_stay_units_without_a_segmenter(chinese):
    assert chinese.tokens[:3] == ["[CLS]", "华", "为"] and "[unused1]" in chinese.tokens
    words = word_probe(chinese, segmenter=None)
    assert words.tokens == chinese.tokens  # one word id per character (BERT's Chinese split)


def test_chinese_words_with_jieba(chinese):
    pytest.importorskip("jieba", reason="pip install 'attnlog[zh]'")
    words = word_probe(chinese, segmenter="jieba")
    assert words.tokens[:3] == ["[CLS]", "华为", "发布"]
    assert "[unused1]" in words.tokens  # the added special token stays its own unit
    assert words.tokens[-2:] == ["手机", "[SEP]"]
    assert word_probe(chinese).tokens == words.tokens  # "auto" picks jieba when installed
    np.testing.assert_allclose(np.asarray(words.attention).sum(-1), 1.0, atol=1e-3)


def test_custom_segmenter_and_bad_name(chinese):
    halves = word_probe(chinese, segmenter=lambda text: [text[:2], text[2:]])
    assert halves.tokens[1] == "华为"
    with pytest.raises(ValueError, match="jieba"):
        word_probe(chinese, segmenter="thulac")


def test_word_images_are_tagged_apart(english):
    images = probe_images(english, 3, layers=False, words=True)
    assert set(images) == {"attention/en/model", "attention/en_words/model"}
    assert images["attention/en_words/model"].shape != images["attention/en/model"].shape


def test_pool_probe_keeps_every_token(english):
    pooled = pool_probe(english, 4)
    assert len(pooled.tokens) == 4 and pooled.tokens[0].startswith("[CLS]")
    assert pooled.tokens[-1].endswith("[SEP]")
    np.testing.assert_allclose(np.asarray(pooled.attention).sum(-1), 1.0, atol=1e-3)


def test_word_head_view_draws_words(browser, tmp_path, english, chinese):  # noqa: F811
    pytest.importorskip("jieba", reason="pip install 'attnlog[zh]'")
    for probe, word in ((english, "unbelievably"), (chinese, "发布")):
        files = probe_views(probe, 0, ("head_words",))
        (path,) = files
        assert path.endswith(f"/{probe.name}/head_words_view.html")
        page = tmp_path / f"{probe.name}.html"
        page.write_text(files[path], encoding="utf-8")
        browser.get(page.as_uri())
        texts = wait_for(
            browser,
            "const t = Array.from(document.querySelectorAll('svg text')).map(e => e.textContent);"
            "return t.length ? t : null;",
        )
        assert word in texts


def test_logger_writes_word_views(minilm, tmp_path):
    from attnlog import AttentionLogger

    model, tokenizer = minilm
    probes = [Probe("Tokenization is unbelievably hard.", name="en")]
    with AttentionLogger(
        model, tokenizer, probes, sinks=["tensorboard"], logdir=tmp_path, views=("head_words",)
    ) as log:
        log.log(0)
    (page,) = (tmp_path / "plugins/attnlog/html").rglob("*.html")
    assert page.name == "step_00000000.html" and page.parent.name == "attention"  # one page
    assert "unbelievably" in page.read_text(encoding="utf-8")
    # A word view also logs the word-level heatmap next to the token one.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "attention/en/model" in tags and "attention/en_words/model" in tags
