"""One page per event: every probe and view in one offline file, drawn in headless Chromium,
safe against hostile tokens, small, and under the HTML cap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from browser import browser, console_log, neuron_dot_products, wait_for  # noqa: F401  (browser: a fixture)
from test_render_html import (  # noqa: F401  (minilm_probe: a fixture)
    XSS,
    long_probe,
    make_probe,
    minilm_probe,
    softmax_attention,
)

from attnlog.layout import page_path
from attnlog.render.event import event_views, render_views
from attnlog.render.html import _script_json
from attnlog.snapshot import Snapshot

ALL_VIEWS = ("head", "model", "neuron", "head_words", "model_words")
SCRIPTS = 4  # the data JSON, d3, bertviz's three views (one script), the page


def seq2seq():
    rng = np.random.default_rng(1)
    enc = ["\u2581Translate", "\u2581the", "\u2581cat", "</s>"]
    dec = ["<pad>", "\u2581Die", "\u2581Katze", "</s>", "\u2581!"]
    probe = make_probe(enc, qk=False, name="t5")
    probe.decoder_tokens = dec
    probe.decoder_attention = softmax_attention(rng, 2, 3, len(dec), len(dec), causal=True)
    probe.cross_attention = softmax_attention(rng, 2, 3, len(dec), len(enc))
    return probe


@pytest.fixture(scope="module")
def snapshot():
    pair = ["[CLS]", "the", "cat", XSS, "sat", "[SEP]", "it", "\u2028was", "happy", "[SEP]"]
    return Snapshot(
        step=7,
        probes=[
            make_probe(pair, segment=[0] * 6 + [1] * 4, is_pair=True, name="pair"),
            make_probe(["[CLS]", "a", "dog", "ran", "[SEP]"], name="<img src=x onerror=alert(1)>"),
            seq2seq(),
        ],
    )


def page_of(snapshot, views=ALL_VIEWS, **kw) -> str:
    files = event_views(snapshot, snapshot.step, views, **kw)
    assert list(files) == [page_path(snapshot.step)] == ["attention/step_00000007.html"]
    return files[page_path(snapshot.step)]


def show(driver, probe: int, view: str) -> dict:
    """Pick the probe and the tab as a user would; what the view drew."""
    driver.execute_script(
        "const s = document.getElementById('attnlog-probe');"
        "if (s.value !== String(arguments[0])) {"
        " s.value = String(arguments[0]); s.dispatchEvent(new Event('change')); }"
        'document.querySelector(`#attnlog-tabs [data-view="${arguments[1]}"]`).click();',
        probe,
        view,
    )
    wait_for(
        driver,
        f"return document.body.getAttribute('data-drawn') === '{probe}/{view}'"
        f" || document.getElementById('attnlog-stage').textContent.startsWith('No ');",
    )
    return wait_for(
        driver,
        "const vis = document.querySelector('#attnlog-stage #vis');"
        "const texts = vis ? Array.from(vis.querySelectorAll('svg text')).map(e => e.textContent)"
        " : [];"
        "const marks = vis ? vis.querySelectorAll('svg rect, svg path, svg line').length : 0;"
        "const stage = document.getElementById('attnlog-stage').textContent;"
        "return (vis === null || marks > 0) ? {texts, marks, stage} : null;",
    )


def assert_safe(driver, page):
    """Nothing loaded from anywhere, no element made from a token, no injected script ran."""
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.IGNORECASE)
    state = driver.execute_script(
        "return {src: performance.getEntriesByType('resource').length"
        " + document.querySelectorAll('script[src], link, iframe').length,"
        " scripts: document.scripts.length, img: document.querySelectorAll('img').length,"
        " xss: window.__xss === undefined ? null : window.__xss};"
    )
    assert state == {"src": 0, "scripts": SCRIPTS, "img": 0, "xss": None}


# ---- in the browser ------------------------------------------------------------------------


def test_every_view_of_every_probe_draws_offline(browser, tmp_path, snapshot):  # noqa: F811
    page = page_of(snapshot)
    path = tmp_path / "step.html"
    path.write_text(page, encoding="utf-8")
    browser.get(path.as_uri())
    probes = browser.execute_script(
        "return Array.from(document.querySelectorAll('#attnlog-probe option')).map(o => o.text);"
    )
    assert probes == [p.name for p in snapshot.probes]  # the hostile name is plain text
    tabs = browser.execute_script(
        "return Array.from(document.querySelectorAll('#attnlog-tabs button')).map(b => b.text"
        "Content);"
    )
    assert tabs == ["Head", "Model", "Neuron", "Head (words)", "Model (words)"]
    pair_tokens = [t.replace("\u2581", " ") for t in snapshot.probes[0].tokens]
    for index, probe in enumerate(snapshot.probes):
        for view in ALL_VIEWS:
            drawn = show(browser, index, view)
            if probe.name == "t5" and view != "head" and view != "model":
                # no query/key vectors, and no words for an encoder-decoder: said, not blank
                assert drawn["stage"].startswith(f"No {view.replace('_', ' ')} view"), view
                continue
            assert drawn["marks"] > 0, (probe.name, view)
            if view in ("head", "neuron"):
                want = [t.replace("\u2581", " ") for t in probe.tokens]
                assert set(want) <= set(drawn["texts"]), (probe.name, view)
    # back to the first probe after the others: still draws, hostile token as text
    drawn = show(browser, 0, "head")
    assert XSS in drawn["texts"] and set(pair_tokens) <= set(drawn["texts"])
    assert_safe(browser, page)
    assert [m for m in console_log(browser) if "Uncaught" in m or "Error" in m] == []


def test_model_view_draws_the_probe_chosen(browser, tmp_path, snapshot):  # noqa: F811
    path = tmp_path / "step.html"
    path.write_text(page_of(snapshot, ("model", "head")), encoding="utf-8")
    browser.get(path.as_uri())
    for index, probe in enumerate(snapshot.probes[:2]):
        show(browser, index, "model")
        browser.execute_script(
            "Array.from(document.querySelectorAll('#vis svg rect'))"
            ".find(e => e.__on && e.__on.some(o => o.type === 'click'))"
            ".dispatchEvent(new MouseEvent('click'));"
        )
        texts = wait_for(
            browser,
            "const t = Array.from(document.querySelectorAll('#vis svg text'))"
            f".map(e => e.textContent); return t.includes({_script_json(probe.tokens[2])}) && t;",
        )
        assert set(probe.tokens) <= set(texts)


def test_dropdowns_of_each_view_redraw_it(browser, tmp_path, snapshot):  # noqa: F811
    path = tmp_path / "step.html"
    path.write_text(page_of(snapshot, ("head", "neuron")), encoding="utf-8")
    browser.get(path.as_uri())
    pair = snapshot.probes[0]
    show(browser, 0, "head")
    choose(browser, "#layer", "1")
    choose(browser, "#filter", "3")  # Sentence A -> Sentence B: A on the left, B on the right
    texts = wait_for(
        browser,
        "const t = Array.from(document.querySelectorAll('#vis svg text')).map(e => e.textContent);"
        "return t.length === 10 ? t : null;",
    )
    assert texts == pair.tokens[:6] + pair.tokens[6:]
    drawn = browser.execute_script(  # the weights the lines of layer 1, A -> B, stand for
        "return Array.from(document.querySelectorAll('#vis svg line')).map(e => e.__data__);"
    )
    expected = pair.attention[1, :, :6, 6:].astype(np.float64).reshape(-1)
    assert len(drawn) == expected.size  # one line per head, query and key
    np.testing.assert_allclose(sorted(drawn), np.sort(expected), atol=0.5 / 255 + 1e-6)
    show(browser, 0, "neuron")
    choose(browser, "#layer", "1")
    choose(browser, "#att_head", "2")
    choose(browser, "#filter", "ab")
    texts = wait_for(
        browser,
        "const t = Array.from(document.querySelectorAll('#vis svg text')).map(e => e.textContent);"
        "return t.length === 26 && t;",  # captions, then A -> B twice (expanded, collapsed)
    )
    assert texts[6:] == 2 * (pair.tokens[:6] + pair.tokens[6:]) and "Softmax" in texts
    assert browser.execute_script("return window.__xss === undefined;")


def choose(driver, select: str, value: str) -> None:
    driver.execute_script(
        "const s = document.querySelector('#attnlog-stage ' + arguments[0]);"
        "s.value = arguments[1]; s.dispatchEvent(new Event('change'));",
        select,
        value,
    )


def test_page_draws_inside_a_sandboxed_iframe_like_mlflow(browser, tmp_path, snapshot):  # noqa: F811
    """MLflow's artifact viewer shows HTML as a blob URL in `<iframe sandbox="allow-scripts">`."""
    host = tmp_path / "host.html"
    host.write_text("<!doctype html><html><body></body></html>", encoding="utf-8")
    browser.get(host.as_uri())
    browser.execute_script(
        "const f = document.createElement('iframe');"
        "f.sandbox = 'allow-scripts'; f.width = 1200; f.height = 900;"
        "f.src = URL.createObjectURL(new Blob([arguments[0]], {type: 'text/html'}));"
        "document.body.appendChild(f);",
        page_of(snapshot),
    )
    browser.switch_to.frame(browser.find_element("tag name", "iframe"))
    try:
        for view in ("head", "neuron", "model"):
            assert show(browser, 0, view)["marks"] > 0, view
        assert XSS in show(browser, 0, "head")["texts"]
        assert browser.execute_script("return window.__xss === undefined;")
    finally:
        browser.switch_to.default_content()


def test_neuron_view_shows_the_model_dot_products(browser, tmp_path, minilm_probe):  # noqa: F811
    """Quantised query/key vectors still give q . k * scaling to about 2 % of the largest."""
    probe, _ = minilm_probe
    path = tmp_path / "minilm.html"
    path.write_text(page_of(Snapshot(step=7, probes=[probe]), ("neuron",)), encoding="utf-8")
    browser.get(path.as_uri())
    show(browser, 0, "neuron")
    values = neuron_dot_products(browser)
    q = probe.queries[0, 0, 1].astype(np.float32)
    expected = probe.keys[0, 0].astype(np.float32) @ q * probe.scaling
    np.testing.assert_allclose(values, expected, atol=0.02 * np.abs(expected).max())


def test_capped_page_still_draws_pooled_probe(browser, tmp_path, caplog):  # noqa: F811
    probe = long_probe(512, 12, 12, name="long512")  # ~38 MB of weights even at a byte each
    snapshot = Snapshot(step=7, probes=[make_probe(["a", "b", "c"], name="short"), probe])
    with caplog.at_level("WARNING"):
        page = page_of(snapshot, ("head", "model", "neuron"))
    assert len(page.encode()) <= 10 * 2**20
    warnings = [r.getMessage() for r in caplog.records if "ATTNLOG_MAX_HTML_MB" in r.getMessage()]
    assert len(warnings) == 1 and "'long512' (512 positions) is pooled" in warnings[0]
    path = tmp_path / "capped.html"
    path.write_text(page, encoding="utf-8")
    browser.get(path.as_uri())
    drawn = show(browser, 1, "head")
    assert "w0\u2026" in drawn["texts"][0] and "\u2026w511" in drawn["texts"][-1]
    note = browser.execute_script("return document.getElementById('attnlog-notes').textContent;")
    assert "long512: pooled into" in note and "10 MiB cap" in note
    assert show(browser, 0, "neuron")["marks"] > 0  # the short probe keeps its neuron view


# ---- without a browser ---------------------------------------------------------------------


def test_scripts_and_attention_are_written_once(snapshot):
    page = page_of(snapshot, ("head", "model", "neuron"))
    assert page.count("5.16.0 (attnlog subset)") == 1  # d3
    assert page.count("function attnlogJQuery") == 1 and page.count("function initialize") == 3
    pair = page.split('"name":"pair"')[1]
    attention = re.search(r'"dtype":"u8","scale":[0-9.e-]+,"data":"([A-Za-z0-9+/=]{60})', pair)
    assert page.count(attention.group(1)) == 1  # head, model and neuron views share it


def test_hostile_tokens_and_names_cannot_end_the_data_script(snapshot):
    page = page_of(snapshot)
    data = page.split("id='attnlog-data'>")[1].split("</script>")[0]
    assert not set("<>&\u2028\u2029") & set(data)
    assert page.count("</script>") == SCRIPTS and "<img" not in page


def test_the_page_is_ascii_and_keeps_cjk_and_pooled_labels():
    """One non-ASCII character (a pooled label's ellipsis, a CJK token) made Python hold the
    whole page, 10 MB at 8 probes of 128 tokens, at 2 or 4 bytes a character, twice over while
    it was written. The page is ASCII; the JSON escapes still read back as the tokens."""
    tokens = ["[CLS]", "\u732b", "\u5750\u2026\u4e86", "\U0001f431", "[SEP]"]
    shot = Snapshot(step=7, probes=[make_probe(tokens, name="\u4e2d\u6587")])
    page = page_of(shot)
    assert page.isascii()
    data = json.loads(page.split("id='attnlog-data'>")[1].split("</script>")[0])
    [probe] = data["probes"]
    assert probe["name"] == "\u4e2d\u6587"
    assert set(tokens) <= set(_strings(probe))


def _strings(value) -> set[str]:
    if isinstance(value, str):
        return {value}
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return set().union(*(_strings(v) for v in items)) if items else set()


def test_page_is_a_fraction_of_the_per_probe_pages(minilm):
    """Default views of a MiniLM probe set: one page, at most a third of the per-probe pages."""
    from attnlog import capture

    model, tokenizer = minilm
    snapshot = capture(model, tokenizer, None).to_host()
    page = page_of(Snapshot(step=7, probes=snapshot.probes), ("head", "model", "neuron"))
    per_probe = render_views(snapshot)
    assert len(per_probe) == 3 * len(snapshot.probes)
    assert len(page.encode()) <= sum(len(p.encode()) for p in per_probe.values()) / 3


def test_over_the_cap_the_neuron_vectors_go_first(caplog):
    probe = long_probe(300, 2, 2, qk=True)  # attention ~0.5 MB, q/k ~0.1 MB at a byte each
    snapshot = Snapshot(step=7, probes=[probe])
    full = page_of(snapshot, ("head", "neuron"), max_bytes=20 * 2**20)
    assert '"neuron":{' in full
    cap = len(full.encode()) - 30_000
    with caplog.at_level("WARNING"):
        page = page_of(snapshot, ("head", "neuron"), max_bytes=cap)
    assert len(page.encode()) <= cap
    assert '"neuron":null' in page and "w299" in page  # not pooled: every token still there
    assert "query/key vectors were left out to keep this page under" in page
    smaller = page_of(snapshot, ("head", "neuron"), max_bytes=300_000)
    assert len(smaller.encode()) <= 300_000 and "pooled into" in smaller


def test_probes_that_cannot_fit_are_left_out_with_a_note():
    probes = [seq2seq(), make_probe(["a", "b"], name="tiny")]
    snapshot = Snapshot(step=7, probes=probes)
    full = len(page_of(snapshot, ("head",)).encode())
    page = page_of(snapshot, ("head",), max_bytes=full - 200)  # an encoder-decoder cannot pool
    assert "Left out to stay under the" in page and '"name":"t5"' not in page
    assert '"name":"tiny"' in page


def test_a_long_encoder_decoder_probe_is_left_out_before_encoding(caplog):
    rng = np.random.default_rng(4)
    long = make_probe([f"e{i}" for i in range(200)], qk=False, name="t5long")
    long.decoder_tokens = [f"d{i}" for i in range(200)]
    long.decoder_attention = softmax_attention(rng, 2, 3, 200, 200, causal=True)
    long.cross_attention = softmax_attention(rng, 2, 3, 200, 200)
    snapshot = Snapshot(step=7, probes=[long, make_probe(["a", "b"], name="tiny")])
    with caplog.at_level("WARNING"):
        page = page_of(snapshot, ("head", "model"), max_bytes=400_000)  # t5long: ~960 kB
    assert len(page.encode()) <= 400_000 and '"name":"t5long"' not in page
    assert "cap: t5long." in page and '"name":"tiny"' in page
    assert any("'t5long' (200 positions) is left out" in r.getMessage() for r in caplog.records)
    assert event_views(snapshot, 7, ("head",), max_bytes=50_000) == {}  # not even the scripts


def test_per_probe_pages_stay_an_option(snapshot):
    files = event_views(snapshot, 7, ("head", "model", "per_probe"))
    assert files.keys() == render_views(snapshot, ("head", "model")).keys()
    assert "attention/step_00000007/pair/head_view.html" in files
    assert event_views(snapshot, 7, ()) == {}
    with pytest.raises(ValueError, match="unknown views"):
        event_views(snapshot, 7, ("heads",))


def test_folder_sink_writes_the_page_as_views_html(tmp_path, snapshot):
    from attnlog.sinks.folder import FolderSink

    files = event_views(snapshot, 7, ("head",))
    FolderSink(tmp_path / "a").log_html(files, 7)
    FolderSink(tmp_path / "b", by_step=True).log_html(files, 7)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["views.html"]
    assert (tmp_path / "b/step_00000007/views.html").read_text(encoding="utf-8") == files[
        "attention/step_00000007.html"
    ]


def test_an_event_with_the_defaults_writes_one_page_and_its_mlflow_copy(minilm, tmp_path):
    """TensorBoard + MLflow (sqlite) + the archive, default probes and views: two HTML files
    per event, the page in the logdir and the same page as the step's one MLflow artifact."""
    from mlflow import MlflowClient

    from attnlog import AttentionLogger
    from attnlog.layout import html_dir

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("exp", artifact_location=str(tmp_path / "art"))
    model, tokenizer = minilm
    logdir = tmp_path / "run"
    with AttentionLogger(
        model,
        tokenizer,
        sinks=["tensorboard", "mlflow"],
        sink_options={"mlflow": {"tracking_uri": uri, "experiment_name": "exp"}},
        logdir=logdir,
        writer="thread",
        strict=True,
    ) as logger:
        logger.log(0)
        logger.log(10)
    pages = sorted(p.relative_to(html_dir(logdir)).as_posix() for p in logdir.rglob("*.html"))
    assert pages == [page_path(0), page_path(10)]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    files, folders = [], [None]
    while folders:
        for info in client.list_artifacts(run.info.run_id, folders.pop()):
            (folders.append(info.path) if info.is_dir else files.append(info.path))
    assert sorted(f for f in files if f.endswith(".html")) == pages
    for path in pages:
        page = (html_dir(logdir) / path).read_text(encoding="utf-8")
        copy = client.download_artifacts(run.info.run_id, path, str(tmp_path / "down"))
        assert Path(copy).read_text(encoding="utf-8") == page
        assert page.count('"name":') >= 8 and '"neuron":{' in page  # every default probe
