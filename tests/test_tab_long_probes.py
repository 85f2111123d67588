"""A long probe in the Attention tab, in a real `tensorboard` and headless Chromium: 2048 tokens
pooled to 256 blocks get thinned, non-overlapping axis labels (full text on hover), and a colour
scale control that shows the structure of attention near 1/n."""

from __future__ import annotations

import time

import numpy as np
import pytest
from browser import browser, wait_for  # noqa: F401
from servers import free_port, get_json, start_tensorboard
from test_sinks_contract import make_table

from attnlog.sinks.archive import ArchiveSink
from attnlog.snapshot import ProbeAttention

pytest.importorskip("tensorboard")

BLOCKS, BLOCK = 256, 8  # 2048 tokens pooled to 256 blocks of 8


def long_probe() -> ProbeAttention:
    """Causal attention near 1/n with structure: a sink at block 0 and a local band."""
    n = BLOCKS * BLOCK
    tokens = [f"w{i}" for i in range(n)]
    rng = np.random.default_rng(0)
    weights = rng.uniform(0.8, 1.2, size=(2, 2, BLOCKS, BLOCKS))
    rows, cols = np.indices((BLOCKS, BLOCKS))
    weights *= np.where(abs(rows - cols) <= 2, 4.0, 1.0)  # the local band
    weights[..., 0] = 0.0
    weights = np.where(cols <= rows, weights, 0.0)
    weights = 0.5 * weights / np.maximum(weights.sum(-1, keepdims=True), 1e-9)
    weights[..., 0] += 0.5  # the sink: half of every row
    weights[..., 0, 0] = 1.0
    return ProbeAttention(
        name="long",
        tokens=tokens,
        attention=weights.astype(np.float32),
        special=np.zeros(n, bool),
        punct=np.zeros(n, bool),
        segment=np.zeros(n, np.int64),
        token_ids=np.arange(n),
        causal=True,
        spans=np.array([[i * BLOCK, (i + 1) * BLOCK] for i in range(BLOCKS)]),
        labels=[" ".join(tokens[i * BLOCK : (i + 1) * BLOCK]) for i in range(BLOCKS)],
    )


@pytest.fixture(scope="module")
def long_logdir(tmp_path_factory):
    from attnlog.snapshot import Snapshot

    root = tmp_path_factory.mktemp("long_logs")
    snapshot = Snapshot(step=0, probes=[long_probe()], model_type="llama")
    ArchiveSink(root / "long").log_archive(snapshot, make_table(0, layers=2, heads=2), 0)
    return root


# the share of the cells with attention (> 0) that are drawn almost white
FAINT = """const cells = [...document.querySelectorAll('#heatmap rect.cell')]
  .filter(r => +r.dataset.value > 0);
return cells.filter(r => +r.getAttribute('fill').match(/\\d+/)[0] > 240).length / cells.length;"""


def labels_of(browser, axis: str) -> tuple[int, list[str]]:  # noqa: F811
    """(labels drawn on an axis, the full texts in their hover titles)."""
    drawn = browser.execute_script(
        f"return document.querySelectorAll('#heatmap text.{axis}-token').length;"
    )
    titles = browser.execute_script(
        f"return [...document.querySelectorAll('#heatmap g:has(> text.{axis}-token) > title')]"
        ".map(t => t.textContent);"
    )
    return drawn, titles


def choose_scale(browser, value: str) -> list[str]:  # noqa: F811
    """Pick a colour scale as a user does; the colour bar's labels once redrawn."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element(By.ID, "scale")).select_by_value(value)
    wait_for(browser, f"return document.getElementById('heatmap').dataset.scale === '{value}';")
    return browser.execute_script(
        "return [...document.querySelectorAll('#heatmap text.colorbar-label')]"
        ".map(t => t.textContent);"
    )


@pytest.mark.slow
def test_a_long_probe_is_readable_in_the_tab(long_logdir, browser):  # noqa: F811
    port = free_port()
    server = start_tensorboard(long_logdir, port)
    try:
        get_json(f"http://127.0.0.1:{port}/data/plugins_listing", time.monotonic() + 60)
        browser.get(f"http://127.0.0.1:{port}/#attnlog")
        frame = wait_for(browser, "return document.querySelector('iframe[src*=plugin_entry]');", 30)
        browser.switch_to.frame(frame)
        cells = f"document.querySelectorAll('#heatmap rect.cell').length == {BLOCKS**2}"
        wait_for(browser, f"return {cells};", 60)

        # labels: every k-th block, none overlapping, each with its full text on hover
        every = int(
            browser.execute_script("return document.getElementById('heatmap').dataset.labelEvery;")
        )
        assert 1 < every <= 4
        for axis in ("row", "col"):
            assert labels_of(browser, axis) == (-(-BLOCKS // every), long_probe().labels[::every])
        boxes = browser.execute_script(
            "return [...document.querySelectorAll('#heatmap text.row-token')]"
            ".map(t => { const b = t.getBBox(); return [b.y, b.height]; });"
        )
        assert all(y2 >= y1 + h1 - 0.5 for (y1, h1), (y2, _) in zip(boxes, boxes[1:]))

        # linear: almost white, and the caption says what to try; log: the structure shows
        assert browser.execute_script(FAINT) > 0.9
        caption = browser.execute_script("return document.querySelector('.caption').textContent;")
        assert "log or per-row colour scale" in caption
        bar = choose_scale(browser, "log")
        assert browser.execute_script(FAINT) < 0.2
        assert bar[0] == "1.000" and bar[-1].startswith("≤ ")
        assert "row max" in choose_scale(browser, "row")
        choose_scale(browser, "linear")
    finally:
        browser.switch_to.default_content()
        server.terminate()
        server.wait(timeout=20)
