"""The TensorBoard "Attention" tab: its JSON routes on real archives, then the tab itself in a real
`tensorboard` server and a real browser."""

from __future__ import annotations

import json
import os
import time
import urllib.parse

import numpy as np
import pytest
from browser import browser, wait_for  # noqa: F401
from servers import free_port, get_json, start_tensorboard
from test_sinks_contract import HEADS, LAYERS, PROBES, make_snapshot, make_table
from test_words import chinese, english  # noqa: F401  (module fixtures: real probes)

from attnlog.layout import plugin_dir, read_index
from attnlog.sinks.archive import ArchiveSink
from attnlog.snapshot import load

pytest.importorskip("tensorboard")
from tensorboard.plugins.base_plugin import TBContext  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from attnlog.tensorboard_plugin.plugin import AttentionPlugin  # noqa: E402

RUNS = ("a", "group/b")
STEPS = (0, 10, 20)
MARKUP = "<i>&lt;</i>"  # a token that must be drawn as text, never parsed as HTML


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    """Two runs (one nested) × three steps of real ArchiveSink output."""
    root = tmp_path_factory.mktemp("logs")
    for offset, run in enumerate(RUNS):
        sink = ArchiveSink(root / run)
        for step in STEPS:
            snapshot = make_snapshot(step + offset)
            if run == "group/b":
                cat = snapshot.probes[0]
                cat.tokens = [cat.tokens[0], MARKUP, *cat.tokens[2:]]
            sink.log_archive(snapshot, make_table(step + offset), step)
    return root


@pytest.fixture(scope="module")
def get(logdir):
    """GET one of the plugin's routes through its own WSGI app: (status, JSON body)."""
    apps = AttentionPlugin(TBContext(logdir=str(logdir))).get_plugin_apps()

    def call(route: str, **query):
        response = Client(apps[route]).get(route, query_string=query)
        text = response.get_data(as_text=True)
        assert "Traceback" not in text
        return response.status_code, json.loads(text)

    return call


def archived(logdir, run: str, step: int):
    entry = next(e for e in read_index(logdir / run) if e["step"] == step)
    return load(plugin_dir(logdir / run) / entry["file"])


def test_active_only_with_an_archive(logdir, tmp_path):
    assert AttentionPlugin(TBContext(logdir=str(logdir))).is_active()
    (tmp_path / "events_only").mkdir()
    assert not AttentionPlugin(TBContext(logdir=str(tmp_path))).is_active()
    assert not AttentionPlugin(TBContext(logdir=None)).is_active()
    # the logdir itself is a run too
    ArchiveSink(tmp_path).log_archive(make_snapshot(1), make_table(1), 1)
    plugin = AttentionPlugin(TBContext(logdir=str(tmp_path)))
    assert plugin.is_active()
    runs = Client(plugin.get_plugin_apps()["/runs"]).get("/runs").get_json()
    assert list(runs) == ["."]  # the logdir itself; a folder without an archive is no run


def test_frontend_module_is_served(logdir):
    plugin = AttentionPlugin(TBContext(logdir=str(logdir)))
    path = plugin.frontend_metadata().es_module_path
    assert plugin.frontend_metadata().tab_name == "Attention"
    response = Client(plugin.get_plugin_apps()[path]).get(path)
    assert response.status_code == 200
    assert response.mimetype == "text/javascript"
    assert "export async function render" in response.get_data(as_text=True)


def test_runs_lists_steps_probes_and_shapes(get):
    status, runs = get("/runs")
    assert status == 200
    assert list(runs) == list(RUNS)
    for steps in runs.values():
        assert [s["step"] for s in steps] == list(STEPS)
        probes = steps[0]["probes"]
        assert [p["name"] for p in probes] == list(PROBES)
        for probe, (tokens, _) in zip(probes, PROBES.values()):
            n = len(tokens)
            assert probe["shapes"] == {"attention": [LAYERS, HEADS, n, n]}
        assert steps[0]["patterns"] == sorted(make_table().scores)


def test_scores_match_the_archive_with_null_for_nan(logdir, get):
    status, body = get("/scores", run="group/b", step="10")
    assert status == 200 and body["step"] == 10
    _, scores = archived(logdir, "group/b", 10)
    assert set(body["scores"]) == set(scores)
    for name, matrix in scores.items():
        served = np.array(body["scores"][name], dtype=np.float64)  # None -> nan
        np.testing.assert_array_equal(served, matrix.astype(np.float64))
    assert body["scores"]["cross_sentence"][-1] == [None] * HEADS


def test_attention_is_one_head_rounded(logdir, get):
    status, body = get("/attention", run="a", step="20", probe="pair", layer="1", head="2")
    assert status == 200
    snapshot, _ = archived(logdir, "a", 20)
    probe = snapshot.probes[1]
    assert body["tokens"] == body["query_tokens"] == probe.tokens
    expected = np.round(probe.attention[1, 2].astype(np.float64), 4)
    np.testing.assert_array_equal(np.array(body["matrix"]), expected)
    assert all(len(str(v).split(".")[-1]) <= 4 for row in body["matrix"] for v in row)


def test_trend_equals_the_archived_scores(logdir, get):
    status, body = get("/trend", run="a", pattern="sep", layer="0", head="1")
    assert status == 200 and body["steps"] == list(STEPS)
    expected = [float(archived(logdir, "a", s)[1]["sep"][0, 1]) for s in STEPS]
    assert body["values"] == expected
    _, nan_trend = get("/trend", run="a", pattern="cross_sentence", layer=str(LAYERS - 1), head="0")
    assert nan_trend["values"] == [None, None, None]


@pytest.mark.parametrize(
    ("route", "query", "code", "message"),
    [
        ("/scores", {"step": "0"}, 400, "missing query parameter 'run'"),
        ("/scores", {"run": "a", "step": "x"}, 400, "step must be a non-negative integer"),
        ("/scores", {"run": "a", "step": "-1"}, 400, "non-negative"),
        ("/scores", {"run": "../a", "step": "0"}, 400, "run name"),
        ("/scores", {"run": "group/../../etc", "step": "0"}, 400, "run name"),
        ("/scores", {"run": "/etc", "step": "0"}, 400, "run name"),
        ("/scores", {"run": "nope", "step": "0"}, 404, "no attnlog archive for run 'nope'"),
        ("/scores", {"run": "group", "step": "0"}, 404, "no attnlog archive"),
        ("/scores", {"run": "a", "step": "5"}, 404, "step 5 was not logged"),
        ("/attention", {"run": "a", "step": "0", "layer": "0", "head": "0"}, 400, "'probe'"),
        ("/attention", {"run": "a", "step": "0", "probe": "dog", "layer": "0", "head": "0"},
         404, "no probe 'dog'"),
        ("/attention", {"run": "a", "step": "0", "probe": "cat", "layer": "9", "head": "0"},
         400, "layer 9 is out of range"),
        ("/attention", {"run": "a", "step": "0", "probe": "cat", "layer": "0", "head": "0",
                        "view": "cross_attention"}, 404, "no cross_attention"),
        ("/attention", {"run": "a", "step": "0", "probe": "cat", "layer": "0", "head": "0",
                        "view": "bogus"}, 400, "view must be one of"),
        ("/attention", {"run": "a", "step": "0", "probe": "cat", "layer": "0", "head": "0",
                        "words": "yes"}, 400, "words must be 0 or 1"),
        ("/attention", {"run": "a", "step": "0", "probe": "cat", "layer": "0", "head": "0",
                        "words": "1", "view": "cross_attention"}, 400, "self-attention only"),
        ("/trend", {"run": "a", "pattern": "sep", "layer": "0"}, 400, "'head'"),
        ("/trend", {"run": "a", "pattern": "nope", "layer": "0", "head": "0"}, 404, "'nope'"),
    ],
)  # fmt: skip
def test_bad_requests_get_a_clear_error(get, route, query, code, message):
    status, body = get(route, **query)
    assert status == code
    assert message in body["error"]


def test_broken_archive_is_a_404_without_traceback(tmp_path):
    ArchiveSink(tmp_path / "r").log_archive(make_snapshot(0), make_table(0), 0)
    (plugin_dir(tmp_path / "r") / "step_00000000.npz").write_bytes(b"not a zip")
    apps = AttentionPlugin(TBContext(logdir=str(tmp_path))).get_plugin_apps()
    response = Client(apps["/scores"]).get("/scores", query_string={"run": "r", "step": "0"})
    assert response.status_code == 404
    assert "missing or damaged" in response.get_json()["error"]
    assert "Traceback" not in response.get_data(as_text=True)
    assert Client(apps["/runs"]).get("/runs").get_json() == {"r": []}  # skipped, not fatal


def test_encoder_decoder_views(tmp_path):
    snapshot = make_snapshot(0)
    probe = snapshot.probes[0]
    n, m = len(probe.tokens), 3
    probe.decoder_tokens = ["<s>", "le", "chat"]
    probe.decoder_attention = np.full((LAYERS, HEADS, m, m), 1 / m, np.float32)
    probe.cross_attention = np.full((LAYERS, HEADS, m, n), 1 / n, np.float32)
    ArchiveSink(tmp_path).log_archive(snapshot, make_table(0), 0)
    apps = AttentionPlugin(TBContext(logdir=str(tmp_path))).get_plugin_apps()
    shapes = Client(apps["/runs"]).get("/runs").get_json()["."][0]["probes"][0]["shapes"]
    assert shapes["cross_attention"] == [LAYERS, HEADS, m, n]
    assert shapes["decoder_attention"] == [LAYERS, HEADS, m, m]
    query = {
        "run": ".",
        "step": 0,
        "probe": "cat",
        "view": "cross_attention",
        "layer": 1,
        "head": 0,
    }
    body = Client(apps["/attention"]).get("/attention", query_string=query).get_json()
    assert body["query_tokens"] == ["<s>", "le", "chat"] and body["tokens"] == probe.tokens
    assert np.array(body["matrix"]).shape == (m, n)


def test_a_pooled_probe_is_served_by_token_block(tmp_path):
    snapshot = make_snapshot(0)
    probe = snapshot.probes[0]  # 6 tokens pooled into 2 blocks of 3
    probe.spans = np.array([[0, 3], [3, 6]])
    probe.labels = ["[CLS] the cat", "sat . [SEP]"]
    probe.attention = np.full((LAYERS, HEADS, 2, 2), 0.5, np.float32)
    ArchiveSink(tmp_path).log_archive(snapshot, make_table(0), 0)
    apps = AttentionPlugin(TBContext(logdir=str(tmp_path))).get_plugin_apps()
    (listed, _) = Client(apps["/runs"]).get("/runs").get_json()["."][0]["probes"]
    assert listed == {"name": "cat", "pooled": True, "shapes": {"attention": [LAYERS, HEADS, 2, 2]}}
    query = {"run": ".", "step": 0, "probe": "cat", "layer": 0, "head": 0}
    body = Client(apps["/attention"]).get("/attention", query_string=query).get_json()
    assert body["pooled"] and body["tokens"] == body["query_tokens"] == probe.labels
    assert body["matrix"] == [[0.5, 0.5], [0.5, 0.5]]
    words = Client(apps["/attention"]).get("/attention", query_string={**query, "words": 1})
    assert words.status_code == 404 and "no word view" in words.get_json()["error"]


def test_a_rewritten_step_is_not_served_from_the_cache(tmp_path):
    apps = AttentionPlugin(TBContext(logdir=str(tmp_path))).get_plugin_apps()
    query = {"run": ".", "step": 0}
    path = plugin_dir(tmp_path) / "step_00000000.npz"
    for version in (0, 1):  # a resumed run logs step 0 again
        ArchiveSink(tmp_path).log_archive(make_snapshot(version), make_table(version), 0)
        os.utime(path, ns=(version * 10**9, version * 10**9))  # mtimes differ even on coarse clocks
        body = Client(apps["/scores"]).get("/scores", query_string=query).get_json()
        assert body["scores"]["cls"] == make_table(version).scores["cls"].tolist()


# ---- the tab in a real TensorBoard and a real browser ----------------------------------------


@pytest.mark.slow
def test_tab_in_real_tensorboard_and_browser(logdir, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    port = free_port()
    server = start_tensorboard(logdir, port)
    base = f"http://127.0.0.1:{port}"
    try:
        listing = get_json(f"{base}/data/plugins_listing", time.monotonic() + 60)
        assert listing["attnlog"]["enabled"] is True
        assert listing["attnlog"]["tab_name"] == "Attention"
        assert listing["attnlog"]["loading_mechanism"]["type"] == "IFRAME"

        browser.get(f"{base}/#attnlog")
        frame = wait_for(browser, "return document.querySelector('iframe[src*=plugin_entry]');", 30)
        browser.switch_to.frame(frame)

        def until(expression: str) -> None:
            wait_for(browser, f"return {expression};")

        def js(expression: str):
            return browser.execute_script(f"return {expression};")

        def texts(selector: str) -> list[str]:
            found = browser.find_elements(By.CSS_SELECTOR, selector)
            return [node.get_attribute("textContent") for node in found]

        tokens = PROBES["cat"][0]  # first run, first probe, latest step
        until(f"document.querySelectorAll('#heatmap text.col-token').length == {len(tokens)}")
        assert texts("#heatmap text.row-token") == texts("#heatmap text.col-token") == tokens
        assert js("document.getElementById('heatmap').dataset.step") == "20"
        until(f"document.querySelectorAll('#scores rect.score-cell').length == {LAYERS * HEADS}")
        # the colour bar: white (0) to the darkest cell's value, labelled
        bar_max = float(js("document.querySelector('#heatmap g.colorbar').dataset.max"))
        cells = "[...document.querySelectorAll('#heatmap rect.cell')].map(r => +r.dataset.value)"
        assert bar_max == pytest.approx(max(js(cells)))
        assert f"{bar_max:.3f}" in texts("#heatmap text.colorbar-label")
        assert len(browser.find_elements(By.CSS_SELECTOR, "#heatmap rect.colorbar-step")) > 10

        fills = (
            "[...document.querySelectorAll('#heatmap rect.cell')].map(r => r.getAttribute('fill'))"
        )
        before = js(fills)
        js("(s => { s.value = '0'; s.dispatchEvent(new Event('input')); })(step)")
        until("document.getElementById('heatmap').dataset.step === '0'")
        assert js(fills) != before
        assert browser.find_element(By.ID, "step-label").text == "0"

        # clicking a score cell selects that head; the trend shows one point per logged step
        browser.find_element(By.CSS_SELECTOR, "[data-layer='1'][data-head='2']").click()
        until("document.getElementById('heatmap').dataset.key.endsWith('|1|2')")
        assert browser.find_element(By.ID, "head").get_attribute("value") == "2"
        until(f"document.getElementById('trend').dataset.points === '{len(STEPS)}'")

        # another run; its token with markup is shown as literal text
        js("(r => { r.value = 'group/b'; r.dispatchEvent(new Event('change')); })(run)")
        until("document.getElementById('heatmap').dataset.key.startsWith('group/b|')")
        assert texts("#heatmap text.row-token")[1] == MARKUP
        assert js("document.querySelector('#heatmap i')") is None
    finally:
        browser.switch_to.default_content()
        server.terminate()
        server.wait(timeout=20)


# ---- the word view, on real probes, in a real TensorBoard --------------------------------------

ZH_NAME = "中文"  # a CJK probe name: readable in the run's files and the tab's probe list


@pytest.fixture(scope="module")
def word_logdir(tmp_path_factory, english, chinese):  # noqa: F811
    """Run "en": MiniLM's word pieces; run "zh": the Chinese example's characters (with its
    added special token), its probe named in Chinese."""
    from dataclasses import replace

    from attnlog.snapshot import Snapshot

    root = tmp_path_factory.mktemp("word_logs")
    for run, probe in (("en", english), ("zh", replace(chinese, name=ZH_NAME))):
        snapshot = Snapshot(step=0, probes=[probe], model_type="bert")
        ArchiveSink(root / run).log_archive(snapshot, make_table(0), 0)
    return root


def expected_words(logdir, run: str, layer: int, head: int):
    from attnlog.words import word_probe

    words = word_probe(archived(logdir, run, 0)[0].probes[0])
    return words.tokens, np.round(words.attention[layer, head].astype(np.float64), 4)


@pytest.mark.slow
def test_word_view_in_real_tensorboard_and_browser(word_logdir, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    pytest.importorskip("jieba", reason="pip install 'attnlog[zh]'")
    port = free_port()
    server = start_tensorboard(word_logdir, port)
    base = f"http://127.0.0.1:{port}"
    route = f"{base}/data/plugin/attnlog/attention?step=0&layer=1&head=1"
    try:
        deadline = time.monotonic() + 60
        # English: word pieces become words (Clark et al.: keys summed, queries averaged)
        en = get_json(f"{route}&run=en&probe=en&words=1", deadline)
        tokens, matrix = expected_words(word_logdir, "en", 1, 1)
        assert en["words"] and en["tokens"] == en["query_tokens"] == tokens
        assert tokens == ["[CLS]", "tokenization", "is", "unbelievably", "hard", ".", "[SEP]"]
        np.testing.assert_array_equal(np.array(en["matrix"]), matrix)
        np.testing.assert_allclose(np.array(en["matrix"]).sum(-1), 1.0, atol=1e-3)
        pieces = get_json(f"{route}&run=en&probe=en", deadline)
        assert not pieces["words"] and "##ization" in pieces["tokens"]

        # Chinese: characters joined into jieba's words; the added special token stays alone
        zh = get_json(f"{route}&run=zh&probe={urllib.parse.quote(ZH_NAME)}&words=1", deadline)
        tokens, matrix = expected_words(word_logdir, "zh", 1, 1)
        assert zh["probe"] == ZH_NAME and zh["tokens"] == tokens
        assert tokens[:3] == ["[CLS]", "华为", "发布"] and "[unused1]" in tokens
        np.testing.assert_array_equal(np.array(zh["matrix"]), matrix)

        # the tab's "Words" toggle redraws the heatmap by word
        browser.get(f"{base}/#attnlog")
        frame = wait_for(browser, "return document.querySelector('iframe[src*=plugin_entry]');", 30)
        browser.switch_to.frame(frame)

        def until(expression: str) -> None:
            wait_for(browser, f"return {expression};")

        def labels() -> list[str]:  # the heatmap's row and column labels, untruncated
            found = browser.find_elements(By.CSS_SELECTOR, "#heatmap g > title")
            return [node.get_attribute("textContent") for node in found]

        browser.execute_script(
            "(r => { r.value = 'zh'; r.dispatchEvent(new Event('change')); })(run)"
        )
        until(f"document.getElementById('heatmap').dataset.key.startsWith('zh|0|{ZH_NAME}|')")
        until("document.getElementById('heatmap').dataset.words === '0'")
        assert browser.find_element(By.ID, "probe").get_attribute("value") == ZH_NAME
        assert "华" in labels() and "华为" not in labels()
        browser.find_element(By.ID, "words").click()
        until("document.getElementById('heatmap').dataset.words === '1'")
        n = len(zh["tokens"])
        until(f"document.querySelectorAll('#heatmap text.col-token').length == {n}")
        assert "华为" in labels() and "发布" in labels()
        assert "by word" in browser.find_element(By.CSS_SELECTOR, ".caption").text
        browser.find_element(By.ID, "words").click()  # back to characters
        until("document.getElementById('heatmap').dataset.words === '0'")
    finally:
        browser.switch_to.default_content()
        server.terminate()
        server.wait(timeout=20)
