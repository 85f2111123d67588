"""The bertviz views open offline in a real headless Chromium, draw the tokens, stay safe and small."""

from __future__ import annotations

import re

import numpy as np
import pytest
from browser import browser, neuron_dot_products, wait_for  # noqa: F401  (session fixture; tests/ is on sys.path)

from attnlog.render.html import _script_json, head_view, model_view, neuron_view
from attnlog.snapshot import ProbeAttention

XSS = '</script><img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
SCRIPTS_PER_PAGE = 6  # params JSON, d3, jQuery, RequireJS, loader, bertviz view


def softmax_attention(rng, *shape, causal=False):
    """Random but realistic attention `[..., n, m]`: peaked softmax rows."""
    logits = rng.normal(scale=2.5, size=shape)
    if causal:
        logits = np.where(np.tril(np.ones(shape[-2:], bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float16)


def make_probe(tokens, *, layers=2, heads=3, d=8, segment=None, qk=True, seed=0, **extra):
    rng = np.random.default_rng(seed)
    n = len(tokens)
    queries = rng.normal(size=(layers, heads, n, d)).astype(np.float16) if qk else None
    keys = rng.normal(size=(layers, heads, n, d)).astype(np.float16) if qk else None
    if qk:  # attention consistent with q/k, as a real capture would give
        logits = np.einsum("lhid,lhjd->lhij", queries.astype(np.float32), keys) * d**-0.5
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        attention = (weights / weights.sum(-1, keepdims=True)).astype(np.float16)
    else:
        attention = softmax_attention(rng, layers, heads, n, n)
    return ProbeAttention(
        name=extra.pop("name", "probe"),
        tokens=list(tokens),
        attention=attention,
        special=np.array([t.startswith("[") for t in tokens]),
        punct=np.zeros(n, bool),
        segment=np.zeros(n, int) if segment is None else np.asarray(segment),
        token_ids=np.arange(n),
        queries=queries,
        keys=keys,
        scaling=d**-0.5 if qk else None,
        **extra,
    )


@pytest.fixture(scope="module")
def pair_probe():
    tokens = ["[CLS]", "the", "cat", XSS, "sat", "[SEP]", "it", "was", "happy", "[SEP]"]
    return make_probe(tokens, segment=[0] * 6 + [1] * 4, is_pair=True, name="pair")


@pytest.fixture(scope="module")
def seq2seq_probe():
    rng = np.random.default_rng(1)
    enc = ["\u2581Translate", "\u2581the", "\u2581cat", "</s>"]
    dec = ["<pad>", "\u2581Die", "\u2581Katze", "</s>", "\u2581!"]
    probe = make_probe(enc, qk=False, name="t5")
    probe.decoder_tokens = dec
    probe.decoder_attention = softmax_attention(rng, 2, 3, len(dec), len(dec), causal=True)
    probe.cross_attention = softmax_attention(rng, 2, 3, len(dec), len(enc))
    return probe


@pytest.fixture(scope="module")
def minilm_probe(minilm):
    """A probe from the real MiniLM: eager attention plus hooked query/key vectors."""
    import torch

    model, tokenizer = minilm
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on the mat."
    enc = tokenizer(text, return_tensors="pt")
    captured: dict[str, list] = {"q": [], "k": []}
    hooks = []
    for layer in model.encoder.layer:
        self_attn = layer.attention.self
        hooks.append(self_attn.query.register_forward_hook(lambda m, i, o: captured["q"].append(o)))
        hooks.append(self_attn.key.register_forward_hook(lambda m, i, o: captured["k"].append(o)))
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**enc, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
        for hook in hooks:
            hook.remove()
    heads = model.config.num_attention_heads
    n = enc["input_ids"].shape[1]

    def per_head(outputs):  # [L] x [1, n, hidden] -> [L, H, n, d]
        return torch.stack([o[0].view(n, heads, -1).transpose(0, 1) for o in outputs]).numpy()

    queries, keys = per_head(captured["q"]), per_head(captured["k"])
    attention = torch.stack(out.attentions)[:, 0].numpy()
    d = queries.shape[-1]
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    probe = ProbeAttention(
        name="minilm",
        tokens=tokens,
        attention=attention.astype(np.float16),
        special=np.array([t in ("[CLS]", "[SEP]") for t in tokens]),
        punct=np.array([t == "." for t in tokens]),
        segment=np.zeros(n, int),
        token_ids=enc["input_ids"][0].numpy(),
        queries=queries.astype(np.float16),
        keys=keys.astype(np.float16),
        scaling=d**-0.5,
    )
    # The hooked vectors really are the model's: they reproduce its attention.
    logits = np.einsum("lhid,lhjd->lhij", queries, keys) * probe.scaling
    logits += 0.0  # no padding mask for a single unpadded sentence
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(weights / weights.sum(-1, keepdims=True), attention, atol=1e-4)
    return probe, out.attentions


def open_page(driver, tmp_path, name, page):
    path = tmp_path / f"{name}.html"
    path.write_text(page, encoding="utf-8")
    driver.get(path.as_uri())
    return path


def svg_texts(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('svg text')).map(e => e.textContent);"
    )


def wait_tokens(driver, tokens):
    """Wait until every token is drawn as an SVG <text>; the texts."""
    wanted = sorted(set(tokens))
    wait_for(
        driver,
        "const have = new Set(Array.from(document.querySelectorAll('svg text'))"
        ".map(e => e.textContent));"
        f"return {_script_json(wanted)}.every(t => have.has(t));",
    )
    return svg_texts(driver)


def assert_offline_and_safe(driver, page):
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)
    assert not re.search(r"cdn\w*\.", page) and "PYTHON_PARAMS" not in page  # no CDN host
    assert page.count("id='attnlog-params'") == 1
    state = driver.execute_script(
        "return {src: document.querySelectorAll('script[src]').length,"
        " scripts: document.scripts.length, img: document.querySelectorAll('img').length,"
        " xss: window.__xss === undefined ? null : window.__xss};"
    )
    assert state == {"src": 0, "scripts": SCRIPTS_PER_PAGE, "img": 0, "xss": None}


def select_filter(driver, label):
    driver.execute_script(
        "const s = document.querySelector('#filter');"
        "s.value = Array.from(s.options).find(o => o.text === arguments[0]).value;"
        "s.dispatchEvent(new Event('change'));",
        label,
    )


# ---- in the browser ------------------------------------------------------------------------


def test_head_view_pair_draws_tokens_and_escapes(browser, tmp_path, pair_probe):  # noqa: F811
    page = head_view(pair_probe)
    open_page(browser, tmp_path, "head", page)
    texts = wait_tokens(browser, pair_probe.tokens)
    assert XSS in texts  # the hostile token is plain text
    assert_offline_and_safe(browser, page)
    options = browser.execute_script(
        "return Array.from(document.querySelectorAll('#filter option')).map(o => o.text);"
    )
    assert options[0] == "All" and "Sentence A -> Sentence B" in options and len(options) == 5
    # Sentence A -> B: A tokens on the left, B tokens on the right (bertviz's sentence_b_start).
    select_filter(browser, "Sentence A -> Sentence B")
    texts = wait_for(
        browser,
        "const t = Array.from(document.querySelectorAll('svg text')).map(e => e.textContent);"
        "return t.length === 10 ? t : null;",
    )
    assert texts == pair_probe.tokens[:6] + pair_probe.tokens[6:]
    assert browser.execute_script("return window.__xss === undefined;")


def test_head_view_decodes_weights(browser, tmp_path, pair_probe):  # noqa: F811
    open_page(browser, tmp_path, "head_weights", head_view(pair_probe))
    wait_tokens(browser, pair_probe.tokens)
    decoded = browser.execute_script(
        "const p = attnlogParams(); return [p.attention[0].attn[1][2], p.attention[3].attn[0][1]];"
    )
    np.testing.assert_allclose(decoded[0], pair_probe.attention[1, 2].astype(float), atol=1e-3)
    a_to_b = pair_probe.attention[0, 1, :6, 6:].astype(float)
    np.testing.assert_allclose(decoded[1], a_to_b, atol=1e-3)


def test_model_view_draws_tokens_on_click(browser, tmp_path, pair_probe):  # noqa: F811
    page = model_view(pair_probe)
    open_page(browser, tmp_path, "model", page)
    count = wait_for(
        browser,
        "const r = Array.from(document.querySelectorAll('svg rect'))"
        ".filter(e => e.__on && e.__on.some(o => o.type === 'click'));"
        "return r.length;",
    )
    assert count == 2 * 3  # one thumbnail per layer x head
    browser.execute_script(
        "Array.from(document.querySelectorAll('svg rect'))"
        ".find(e => e.__on && e.__on.some(o => o.type === 'click'))"
        ".dispatchEvent(new MouseEvent('click'));"
    )
    texts = wait_tokens(browser, pair_probe.tokens)
    assert XSS in texts
    assert_offline_and_safe(browser, page)


def test_neuron_view_shows_model_dot_products(browser, tmp_path, minilm_probe):  # noqa: F811
    probe, _ = minilm_probe
    page = neuron_view(probe)
    open_page(browser, tmp_path, "neuron", page)
    wait_tokens(browser, [t for t in probe.tokens])
    assert_offline_and_safe(browser, page)
    # Hover query 1 in the expanded view: bertviz's JS computes q . k from the embedded vectors.
    values = neuron_dot_products(browser)
    q = probe.queries[0, 0, 1].astype(np.float32)
    expected = probe.keys[0, 0].astype(np.float32) @ q * probe.scaling
    np.testing.assert_allclose(values, expected, rtol=1e-3, atol=1e-3)


def test_neuron_view_pair(browser, tmp_path, pair_probe):  # noqa: F811
    page = neuron_view(pair_probe)
    open_page(browser, tmp_path, "neuron_pair", page)
    texts = wait_tokens(browser, pair_probe.tokens)
    assert XSS in texts
    assert_offline_and_safe(browser, page)
    keys = browser.execute_script(
        "return Array.from(document.querySelectorAll('#filter option')).map(o => o.value);"
    )
    assert keys == ["all", "aa", "ab", "ba", "bb"]


def test_encoder_decoder_views(browser, tmp_path, seq2seq_probe):  # noqa: F811
    page = head_view(seq2seq_probe)
    open_page(browser, tmp_path, "seq2seq", page)
    pretty = [t.replace("\u2581", " ") for t in seq2seq_probe.tokens]
    wait_tokens(browser, pretty)
    options = browser.execute_script(
        "return Array.from(document.querySelectorAll('#filter option')).map(o => o.text);"
    )
    assert options == ["Encoder", "Decoder", "Cross"]
    select_filter(browser, "Cross")
    dec = [t.replace("\u2581", " ") for t in seq2seq_probe.decoder_tokens]
    texts = wait_tokens(browser, dec + pretty)
    assert texts == dec + pretty  # decoder queries on the left, encoder keys on the right
    assert_offline_and_safe(browser, page)

    page = model_view(seq2seq_probe)
    open_page(browser, tmp_path, "seq2seq_model", page)
    wait_for(browser, "return document.querySelectorAll('svg rect').length > 0;")
    assert_offline_and_safe(browser, page)
    assert neuron_view(seq2seq_probe) is None  # no queries/keys captured


def test_minilm_head_view_in_browser(browser, tmp_path, minilm_probe):  # noqa: F811
    probe, _ = minilm_probe
    page = head_view(probe)
    open_page(browser, tmp_path, "minilm_head", page)
    wait_tokens(browser, probe.tokens)
    assert_offline_and_safe(browser, page)


# ---- without a browser ---------------------------------------------------------------------


def test_pages_are_compact_compared_with_bertviz(minilm_probe):
    """A 6 x 12 x 19-token probe: at most a quarter of bertviz's bytes, libraries included.

    (The inlined libraries are ~125 kB whatever the probe, so tiny probes do not reach 0.25.)
    """
    bertviz = pytest.importorskip("bertviz")
    probe, attentions = minilm_probe
    theirs = bertviz.head_view(attentions, probe.tokens, html_action="return").data
    ours = head_view(probe)
    assert len(ours.encode()) <= 0.25 * len(theirs.encode())
    theirs = bertviz.model_view(attentions, probe.tokens, html_action="return").data
    assert len(model_view(probe).encode()) <= 0.25 * len(theirs.encode())


def test_full_document_and_data_once(pair_probe):
    page = head_view(pair_probe)
    assert page.startswith("<!doctype html>") and "<meta charset='utf-8'>" in page
    assert "require.config" not in page  # bertviz's CDN paths are gone
    payload = re.search(r"\"data\":\"([A-Za-z0-9+/=]{40})", page).group(1)
    assert page.count(payload) == 1  # templated in exactly once


def test_script_json_escapes_breakouts():
    text = _script_json({"t": "</script><!-- & \u2028\u2029 >"})
    assert not set("<>&\u2028\u2029") & set(text)
    assert '"\\u003c/script\\u003e' in text


def test_bad_input_raises_clear_errors(pair_probe):
    probe = make_probe(["a", "b", "c"])
    probe.tokens = ["a", "b"]
    with pytest.raises(ValueError, match="3 positions but tokens has 2"):
        head_view(probe)
    probe = make_probe(["a", "b", "c"])
    probe.queries = probe.queries[:, :, :2]
    with pytest.raises(ValueError, match="queries has shape"):
        neuron_view(probe)
    with pytest.raises(ValueError, match="layers"):
        model_view(pair_probe, layers=[5])
    with pytest.raises(ValueError, match="display_mode"):
        model_view(pair_probe, display_mode="blue")
    assert neuron_view(make_probe(["a", "b"], qk=False)) is None


def test_neuron_view_refuses_huge_inputs_before_encoding():
    probe = make_probe(["a", "b"])
    shape = (48, 64, 2048, 128)  # broadcast views: no memory is used
    probe.tokens = ["t"] * 2048
    probe.attention = np.broadcast_to(np.float16(0), shape[:3] + (2048,))
    probe.queries = probe.keys = np.broadcast_to(np.float16(0), shape)
    probe.segment = np.zeros(2048, int)
    with pytest.raises(ValueError, match="pass layers"):
        neuron_view(probe)


def test_layer_subset(pair_probe):
    full, one = head_view(pair_probe), head_view(pair_probe, layers=[1])
    assert len(one) < len(full)
    assert '"include_layers":[1]' in one


# ---- size guard --------------------------------------------------------------------------


def long_probe(n, layers, heads, qk=False, name="long"):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(layers, heads, n, 16)).astype(np.float16) if qk else None
    return ProbeAttention(
        name=name,
        tokens=[f"w{i}" for i in range(n)],
        attention=softmax_attention(rng, layers, heads, n, n),
        special=np.zeros(n, bool),
        punct=np.zeros(n, bool),
        segment=np.zeros(n, int),
        token_ids=np.arange(n),
        queries=q,
        keys=q,
    )


def test_512_token_probe_views_stay_under_the_cap_and_draw(browser, tmp_path, caplog):  # noqa: F811
    from attnlog.render.event import MAX_HTML_BYTES, probe_views

    probe = long_probe(512, 12, 12, name="long512")  # uncapped: ~100 MB per view
    with caplog.at_level("WARNING"):
        files = probe_views(probe, 7, ("head", "model", "neuron"))
        probe_views(probe, 8, ("head",))
    assert sorted(p.rsplit("/", 1)[1] for p in files) == ["head_view.html", "model_view.html"]
    sizes = [len(page.encode()) for page in files.values()]
    assert max(sizes) <= MAX_HTML_BYTES
    warnings = [r.getMessage() for r in caplog.records if "ATTNLOG_MAX_HTML_MB" in r.getMessage()]
    assert len(warnings) == 1 and "512 positions" in warnings[0]  # once, naming the fix
    head = next(page for path, page in files.items() if path.endswith("head_view.html"))
    labels = wait_tokens_in(browser, tmp_path, head)
    assert labels[0] == "w0\u2026w3" and labels[-1] == "w508\u2026w511"  # pooled, every token


def wait_tokens_in(driver, tmp_path, page):
    open_page(driver, tmp_path, "capped", page)
    return wait_for(
        driver,
        "const t = Array.from(document.querySelectorAll('svg text')).map(e => e.textContent);"
        "return t.length > 0 ? t.slice(0, t.length / 2) : null;",  # left column: the queries
        timeout=60,
    )


def test_cap_is_configurable(monkeypatch):
    from attnlog.render.event import probe_views

    probe = long_probe(400, 2, 2, qk=True)  # ~1.2 MB of weights per view
    small = probe_views(probe, 0, ("head", "neuron"), max_bytes=600_000)
    assert list(small) == ["attention/step_00000000/long/head_view.html"]
    assert len(small[next(iter(small))].encode()) <= 600_000
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", "0.5")
    assert probe_views(probe, 0, ("head",)).keys() == small.keys()
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", "20")
    full = probe_views(probe, 0, ("head", "neuron"))
    assert len(full) == 2 and "w399" in full["attention/step_00000000/long/head_view.html"]
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", "lots")
    with pytest.raises(ValueError, match="ATTNLOG_MAX_HTML_MB"):
        probe_views(probe, 0, ("head",))


def test_probe_pooled_at_capture_renders_with_its_span_labels(minilm, monkeypatch):
    """A probe over the capture's full-attention limit arrives pooled (`spans`, `labels`):
    heatmaps and views show its blocks, labelled as the capture labelled them."""
    from attnlog.capturing import capture
    from attnlog.render.event import MAX_HTML_BYTES, probe_images, probe_views

    model, tokenizer = minilm
    text = " ".join(f"word{i % 50}" for i in range(150))  # ~300 word pieces
    probe = capture(model, tokenizer, [text]).to_host().probes[0]
    assert probe.spans is not None and len(probe.labels) == probe.attention.shape[-1]
    monkeypatch.setenv("ATTNLOG_MAX_HTML_MB", "50")
    files = probe_views(probe, 0, ("head", "neuron"))
    (path,) = files  # no neuron view: pooled attention has no per-token query/key vectors
    assert path.endswith("head_view.html") and _script_json(probe.labels[1])[1:-1] in files[path]
    monkeypatch.delenv("ATTNLOG_MAX_HTML_MB")
    capped = probe_views(probe, 0, ("head",))[path]  # 6 x 12 heads x 256 blocks: over 10 MiB
    assert len(capped.encode()) <= MAX_HTML_BYTES
    images = probe_images(probe, 0, layers=False)
    assert images[f"attention/{probe.name}/model"].ndim == 3
