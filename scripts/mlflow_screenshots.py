"""Retake the MLflow UI screenshots of the docs (docs/img/mlflow-*.png) from real runs.

    python scripts/mlflow_screenshots.py                      # runs, then screenshots
    python scripts/mlflow_screenshots.py --stage runs         # only the runs
    python scripts/mlflow_screenshots.py --stage shots        # only the screenshots (runs reused)
    python scripts/mlflow_screenshots.py --work /tmp/shots --out docs/img

The runs, one at a time, niced, torch on one thread (OMP_NUM_THREADS, unless set), in the
scratch folder --work (default /tmp/attnlog-shots; it must not hold a store yet: the chart view
shows every run of the experiment), which is their current directory: TensorBoard and the
archives go to <work>/runs, MLflow to sqlite:///<work>/mlflow.db (artifacts under <work>/mlruns).

1. `attnlog demo`: the default demo (MiniLM, 150 steps, logged every 25, seed 0), experiment
   `attnlog-demo`. About a minute on 2 cores (the whole script: about 3 minutes).
2. `attnlog demo --steps 50 --seed 1`: the second run of browsing.md's comparisons.
3. `python examples/induction_heads.py --steps 300 --every 20 --mlflow`, experiment `induction`
   (the example turns per-head metrics on), and the same with `--steps 100`.
4. `attnlog compare runs:/<100-step run> runs:/<300-step run> --out induction_100_vs_300.html`,
   which logs the page to both induction runs.

<work>/runs.json records the run ids; a later `--stage shots` reuses them. The shots stage colours
runs 1 and 2 blue and red (the tag `mlflow.runColor`, as picking a colour in the run list does),
starts `mlflow server` on a free 127.0.0.1 port, opens its UI in headless Chromium (1400 x 900,
a fresh profile) and writes these files to --out (default: docs/img of this checkout), as
palette PNGs:

- mlflow-compare-summary.png: the experiment's chart view of runs 1 and 2, `attn.summary`;
- mlflow-compare-tags.png: the Compare page's Tags table (`attnlog.summary.*`) of runs 1 and 2;
- mlflow-compare-runs.png: the metric page of runs 1 and 2, two layer means;
- mlflow-model-metrics.png: run 1's Model metrics tab: the first probe card without the params
  (and one notch taller), the second still covered by them;
- mlflow-probe-cards.png: the card of p2_yesterday_the_doctor at the last step, params off;
- mlflow-image-preview.png: that card's image clicked open (the full 512 px image);
- mlflow-artifact-head-view.png: run 1's Artifacts tab showing the last event's page, its head
  view of p2_yesterday_the_doctor, layer 2, head 9 alone, the second "letter" hovered;
- mlflow-compare-induction-metric.png: the metric page of the two induction runs, two heads;
- mlflow-compare-page-artifact.png: the 300-step induction run's `attnlog_compare/` page.

Needs chromium and chromedriver (/usr/bin, or ATTNLOG_CHROMIUM / ATTNLOG_CHROMEDRIVER),
selenium, MLflow and the demo's MiniLM (`pip install -e '.[demo,test]'`). Nothing goes to the
network (HF_HUB_OFFLINE=1, MLflow telemetry off, Chromium's background networking off). The
numbers in the docs' text come from these runs: re-read them after retaking (the demo is seeded,
but the machine's kernels are not all deterministic).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DB = "mlflow.db"
DEMO_EXPERIMENT = "attnlog-demo"
INDUCTION_EXPERIMENT = "induction"
COMPARE_PAGE = "induction_100_vs_300.html"
WINDOW = (1400, 900)


# ---- the runs -----------------------------------------------------------------------------------


def environment(work: Path) -> dict[str, str]:
    """This checkout's attnlog, a local MLflow store, nothing sent anywhere."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / DB}",
        "MLFLOW_ENABLE_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # one core for torch: the runs share the machine (slower, but it leaves a core free)
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


def run_ids(work: Path, experiment: str) -> set[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / DB}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return set()
    return {r.info.run_id for r in client.search_runs([found.experiment_id], max_results=1000)}


def new_run(work: Path, experiment: str, argv: list[str], env: dict[str, str]) -> str:
    """Run `argv` in `work` (niced) and return the id of the one MLflow run it added."""
    before = run_ids(work, experiment)
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, cwd=work, env=env, check=True, preexec_fn=lambda: os.nice(10))
    added = run_ids(work, experiment) - before
    if len(added) != 1:
        raise RuntimeError(f"{argv}: expected one new run in {experiment}, found {len(added)}")
    return added.pop()


def make_runs(work: Path) -> dict[str, str]:
    """The runs of the module docstring; returns their ids by role."""
    if (work / DB).exists():
        raise SystemExit(f"{work / DB} exists: remove {work}, or take the shots with --stage shots")
    work.mkdir(parents=True, exist_ok=True)
    env = environment(work)
    # `attnlog ...` as this checkout's CLI (the `attnlog` on PATH may be another install's)
    attnlog = [sys.executable, "-c", "import sys; from attnlog.cli import main; sys.exit(main())"]
    example = [sys.executable, str(ROOT / "examples" / "induction_heads.py"), "--mlflow"]
    ids = {
        "demo": new_run(work, DEMO_EXPERIMENT, [*attnlog, "demo"], env),
        "demo_seed1": new_run(
            work, DEMO_EXPERIMENT, [*attnlog, "demo", "--steps", "50", "--seed", "1"], env
        ),
    }
    env_induction = {**env, "MLFLOW_EXPERIMENT_NAME": INDUCTION_EXPERIMENT}
    for steps in (300, 100):
        argv = [*example, "--steps", str(steps), "--every", "20"]
        argv += ["--logdir", f"runs/induction_{steps}"]
        ids[f"induction_{steps}"] = new_run(work, INDUCTION_EXPERIMENT, argv, env_induction)
    compare = [*attnlog, "compare", f"runs:/{ids['induction_100']}"]
    compare += [f"runs:/{ids['induction_300']}", "--out", COMPARE_PAGE]
    print("+", " ".join(compare), flush=True)
    subprocess.run(compare, cwd=work, env=env, check=True)
    (work / "runs.json").write_text(json.dumps(ids, indent=2) + "\n")
    return ids


# ---- the server ---------------------------------------------------------------------------------


class Server:
    """`mlflow server` over the runs' store on a free 127.0.0.1 port, in its own process group."""

    def __init__(self, work: Path) -> None:
        from servers import free_port  # tests/servers.py

        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        exe = shutil.which("mlflow")
        cmd = [exe] if exe else [sys.executable, "-m", "mlflow"]
        cmd += ["server", "--backend-store-uri", f"sqlite:///{self.work / DB}"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = environment(self.work)
        log = open(self.work / "server.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            cmd, cwd=self.work, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        # Generous: importing mlflow and creating its app takes 10-40 s on a busy 2-core machine.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        tail = (self.work / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"mlflow server did not answer on {self.url}:\n{tail}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


# ---- the browser --------------------------------------------------------------------------------

# What MLflow 3.17's UI keeps in localStorage: open experiments in the model-training view, and
# do not open the MLflow Assistant panel or the "Detect Issues" tip over the page.
UI_STATE = {
    "mlflow.workflowType_v1": '"machine_learning"',
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.detectIssues.guidanceShown_v1": "true",
}
RUN_COLORS = {"demo": "#2272b4", "demo_seed1": "#c83243"}  # blue, red: the run list's colour dots
SECTION = "[data-testid=experiment-view-compare-runs-section-header]"
CARD_MENU = "[data-testid=experiment-view-compare-runs-card-menu]"
RESIZE = "[data-testid=draggable-card-resize-handle]"


def until(what: str, check, timeout: float = 60.0):
    """Poll `check()` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - the page is still rendering: stale or missing nodes
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.25)


class UI:
    """The MLflow UI in headless Chromium, with the few gestures the screenshots need."""

    def __init__(self, base: str, work: Path, out: Path) -> None:
        from browser import start_browser  # tests/browser.py: the flags the tests use

        self.base = base
        self.work = work
        self.out = out
        self.profile = tempfile.mkdtemp(prefix="attnlog-shots-chromium-")
        self.driver = start_browser(self.profile)
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False},
        )
        # a page of the server's that runs no UI code: nothing overwrites what is set here
        self.driver.get(f"{base}/health")
        self.js(
            "for (const [k, v] of Object.entries(arguments[0])) localStorage.setItem(k, v);",
            UI_STATE,
        )

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def open(self, route: str, ready: str, timeout: float = 90.0) -> None:
        """Go to `#<route>` and wait until the JS expression `ready` is truthy."""
        self.driver.get(f"{self.base}/#{route}")
        self.wait(ready, timeout)

    def wait(self, ready: str, timeout: float = 60.0):
        return until(ready, lambda: self.js(f"return {ready};"), timeout)

    def text(self, xpath_text: str, tag: str = "*"):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(
            By.XPATH, f'//{tag}[normalize-space(text())="{xpath_text}"]'
        )

    def close_assistant(self) -> None:
        """The MLflow Assistant panel can open on its own; close it if it is there."""
        self.js(
            "const title = Array.from(document.querySelectorAll('span, div, h1, h2, h3, h4'))"
            ".find(e => e.childElementCount === 0 && e.textContent.trim() === 'MLflow Assistant');"
            "let box = title;"
            "while (box && !box.querySelector('button[aria-label=Close]')) box = box.parentElement;"
            "if (box) box.querySelector('button[aria-label=Close]').click();"
        )

    def settle(self, seconds: float = 1.5) -> None:
        """Let transitions (plotly's, the cards') finish after the content is there."""
        time.sleep(seconds)

    def shot(self, name: str) -> Path:
        """The viewport as a palette PNG in --out; refuses MLflow's error pages."""
        from PIL import Image

        self.js("if (document.activeElement) document.activeElement.blur();")  # no focus ring
        body = self.js("return document.body.innerText;")
        for bad in ("Error while loading", "Something went wrong", "Page not found"):
            if bad in body:
                raise RuntimeError(f"{name}: the page says {bad!r}")
        raw = self.driver.get_screenshot_as_png()
        image = Image.open(io.BytesIO(raw)).convert("RGB")
        if image.size != WINDOW:
            raise RuntimeError(f"{name}: screenshot is {image.size}, expected {WINDOW}")
        palette = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=0)
        path = self.out / name
        palette.save(path, optimize=True)
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)", flush=True)
        return path

    # -- the chart grid of the experiment and run pages ----------------------------------------

    def scroll_section(self, prefix: str) -> None:
        """Scroll the chart section whose title starts with `prefix` to the top."""
        self.js(
            "const h = Array.from(document.querySelectorAll(arguments[0]))"
            ".find(h => h.innerText.startsWith(arguments[1]));"
            "h.scrollIntoView({block: 'start', inline: 'nearest'});",
            SECTION,
            prefix,
        )
        self.settle(1.0)

    def collapse_sections(self, prefix: str) -> None:
        self.js(
            "for (const h of document.querySelectorAll(arguments[0])) {"
            " const b = h.closest('[aria-expanded]');"
            " if (h.innerText.startsWith(arguments[1]) && b.getAttribute('aria-expanded') === 'true')"
            "  b.click(); }",
            SECTION,
            prefix,
        )

    def card(self, title: str):
        """The chart card titled `title` (rendered only near the viewport: scroll first)."""
        from selenium.webdriver.common.by import By

        def find():
            for element in self.driver.find_elements(By.CSS_SELECTOR, ".react-resizable"):
                if element.text.split("\n")[0].strip() == title:
                    return element
            return None

        return until(f"card {title}", find)

    def hide_params(self, title: str) -> None:
        """The card's ⋮ → Configure → Run details → Show run parameters off → Save changes."""
        from selenium.webdriver.common.by import By

        self.card(title).find_element(By.CSS_SELECTOR, CARD_MENU).click()
        until(
            "Configure",
            lambda: [
                i for i in self.driver.find_elements(By.CSS_SELECTOR, "[role=menuitem]")
                if i.text == "Configure"
            ][0],
        ).click()  # fmt: skip
        dialog = until(
            "the dialog", lambda: self.driver.find_element(By.CSS_SELECTOR, "[role=dialog]")
        )
        switch = dialog.find_element(By.CSS_SELECTOR, "[role=switch]")
        if switch.get_attribute("aria-checked") == "true":
            switch.click()
        save = [
            b for b in dialog.find_elements(By.CSS_SELECTOR, "button") if b.text == "Save changes"
        ]
        save[0].click()
        until(
            "the dialog to close",
            lambda: not self.driver.find_elements(By.CSS_SELECTOR, "[role=dialog]"),
        )
        self.settle(0.5)

    def taller(self, title: str, pixels: int = 100) -> None:
        """Drag the card's corner down (the grid snaps it to its next height)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        handle = self.card(title).find_element(By.CSS_SELECTOR, RESIZE)
        chain = ActionChains(self.driver).click_and_hold(handle)
        chain.move_by_offset(0, pixels // 2).move_by_offset(0, pixels - pixels // 2)
        chain.release().perform()
        self.settle(0.5)

    def set_step(self, title: str, step: int) -> None:
        """Type the step into the box next to the card's slider (it applies on leaving the box)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        def moved():
            card = self.card(title)
            if card.find_element(By.CSS_SELECTOR, "[role=slider]").get_attribute(
                "aria-valuenow"
            ) == str(step):
                return True
            box = card.find_element(By.CSS_SELECTOR, "input[type=number]")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(step), Keys.TAB)
            return False

        until(f"step {step} on {title}", moved)

    def card_image(self, title: str, step: int | None = None):
        """The card's image once loaded (and showing `step`, if given)."""
        from selenium.webdriver.common.by import By

        def loaded():
            image = self.card(title).find_element(By.TAG_NAME, "img")
            src = image.get_attribute("src") or ""
            done = self.js("return arguments[0].complete && arguments[0].naturalWidth > 0;", image)
            return image if done and (step is None or f"step%2B{step}%2B" in src) else None

        return until(f"the image of {title}", loaded)


# ---- the screenshots ----------------------------------------------------------------------------


def q(value) -> str:
    """A JSON value for the UI's query strings."""
    from urllib.parse import quote

    return quote(json.dumps(value, separators=(",", ":")))


def metric_route(runs: list[str], experiment: str, keys: list[str], smoothing: int) -> str:
    """The metric page (what a metric name on the Compare page links to), `keys` on the Y axis."""
    return (
        f"/metric?runs={q(runs)}&metric={q(keys[0])}&experiments={q([experiment])}"
        f"&plot_metric_keys={q(keys)}&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear"
        f"&line_smoothness={smoothing}&show_point=true&deselected_curves=%5B%5D"
        "&last_linear_y_axis_range=%5B%5D"
    )


# plotly has drawn at least {n} traces (a run's line and its points are one trace each)
PLOTTED = "document.querySelectorAll('.js-plotly-plot .scatterlayer .trace').length >= {n}"


def metric_shot(
    ui: UI, runs: list[str], experiment: str, keys: list[str], smoothing: int, name: str
) -> None:
    """The metric page of two runs and two keys (8 traces), once its table is there."""
    ui.open(metric_route(runs, experiment, keys, smoothing), PLOTTED.format(n=8))
    ui.close_assistant()
    ui.wait("document.body.innerText.includes('Latest')")
    ui.settle()
    ui.shot(name)


def demo_shots(ui: UI, ids: dict[str, str], experiment: str) -> None:
    """browsing.md's screenshots, from the two demo runs."""
    demo, other = ids["demo"], ids["demo_seed1"]
    names = ui_names(ui, [demo, other])

    # The experiment's chart view, searched for attn.summary, the image sections collapsed.
    ui.open(
        f"/experiments/{experiment}/runs?compareRunsMode=CHART",
        "document.querySelector('input[placeholder=\"Search metric charts\"]')",
    )
    ui.close_assistant()
    search = ui.driver.find_element("css selector", 'input[placeholder="Search metric charts"]')
    search.send_keys("attn.summary")
    ui.wait("document.querySelectorAll('" + SECTION + "').length >= 2")
    ui.collapse_sections("attention/")
    ui.scroll_section("Model metrics")
    ui.wait(PLOTTED.format(n=12))  # the three charts in view, two runs each
    ui.wait(f"document.body.innerText.includes('{names[demo]}')")
    ui.settle()
    ui.shot("mlflow-compare-summary.png")

    # The Compare page: its Tags table at the bottom.
    ui.open(
        f"/compare-runs?runs={q([demo, other])}&experiments={q([experiment])}",
        "document.body.innerText.includes('attnlog.summary.top_heads')",
    )
    ui.close_assistant()
    row = ui.text("attnlog.summary.top_heads")
    ui.js("arguments[0].scrollIntoView({block: 'end', inline: 'nearest'});", row)
    # scrollIntoView also scrolls the wide tables sideways: back to their first column
    ui.js("for (const e of document.querySelectorAll('*')) if (e.scrollLeft > 0) e.scrollLeft = 0;")
    ui.settle()
    ui.shot("mlflow-compare-tags.png")

    # The metric page: two layer means of both runs (the default metrics).
    keys = ["attn.identical_token_other.L3", "attn.identical_token_other.L2"]
    metric_shot(ui, [demo, other], experiment, keys, 1, "mlflow-compare-runs.png")

    # The run's Model metrics tab: the first card without the params, the second as it comes.
    p0, p1 = "attention/p0_the_old_cat/model", "attention/p1_a_teacher_and/model"
    p2, p3 = "attention/p2_yesterday_the_doctor/model", "attention/p3_my_dog_likes/model"
    ui.open(
        f"/experiments/{experiment}/runs/{demo}/model-metrics",
        "document.querySelectorAll('" + SECTION + "').length >= 4",
    )
    ui.close_assistant()
    ui.hide_params(p0)
    ui.taller(p0)
    ui.card_image(p0)
    ui.scroll_section("attention/p0")
    ui.wait("document.body.innerText.includes('transformers_version=')")  # p1's params
    ui.settle()
    ui.shot("mlflow-model-metrics.png")

    # The same tab: p2's card at the last step, params off; then its image clicked open.
    for title, section in ((p1, "attention/p1"), (p2, "attention/p2"), (p3, "attention/p3")):
        ui.scroll_section(section)
        ui.hide_params(title)
    ui.scroll_section("attention/p2")
    ui.taller(p2)
    ui.set_step(p2, 150)
    ui.scroll_section("attention/p2")
    ui.card_image(p2, step=150)
    ui.card_image(p3)
    ui.settle()
    ui.shot("mlflow-probe-cards.png")

    ui.card_image(p2, step=150).click()
    ui.wait(
        "Array.from(document.images).some(i => i.naturalWidth === 512 && i.complete"
        " && i.getBoundingClientRect().width >= 500)"
    )
    ui.settle()
    ui.shot("mlflow-image-preview.png")

    # The Artifacts tab: the last event's page, its head view of p2, layer 2, head 9 alone.
    page = "attention/step_00000150.html"
    ui.open(
        f"/experiments/{experiment}/runs/{demo}/artifacts/{page}",
        "document.querySelector('iframe')",
    )
    ui.close_assistant()
    ui.text("step_00000150").click()  # open the folder: it holds scores.json
    until("scores.json", lambda: ui.text("scores.json"))
    ui.text("step_00000150.html").click()
    head_view(ui, probe=2, layer=2, head=9, hover=14)  # hover the second "letter"
    ui.settle()
    ui.shot("mlflow-artifact-head-view.png")


def head_view(ui: UI, probe: int, layer: int, head: int, hover: int) -> None:
    """In the artifact's iframe: pick the probe, the head view, the layer, one head, a token."""
    from selenium.webdriver.common.by import By

    frame = until("the artifact's iframe", lambda: ui.driver.find_element(By.TAG_NAME, "iframe"))
    ui.driver.switch_to.frame(frame)
    try:
        ui.wait("document.getElementById('attnlog-probe')")
        ui.js(
            "const s = document.getElementById('attnlog-probe');"
            "s.value = String(arguments[0]); s.dispatchEvent(new Event('change'));"
            "document.querySelector('#attnlog-tabs [data-view=\"head\"]').click();",
            probe,
        )
        ui.wait(f"document.body.getAttribute('data-drawn') === '{probe}/head'")
        ui.js(
            "const s = document.querySelector('#attnlog-stage #layer');"
            "s.value = String(arguments[0]); s.dispatchEvent(new Event('change'));",
            layer,
        )
        heads = (
            "Array.from(document.querySelectorAll('#vis svg rect'))"
            ".filter(e => e.__on && e.__on.some(o => o.type === 'dblclick'))"
        )
        tokens = (
            "Array.from(document.querySelectorAll('#vis svg g'))"
            ".filter(e => e.__on && e.__on.some(o => o.type === 'mouseover'))"
        )
        ui.wait(f"{heads}.length > {head} && {tokens}.length > {hover}")
        ui.js(f"{heads}[{head}].dispatchEvent(new MouseEvent('dblclick'));")
        ui.js(f"{tokens}[{hover}].dispatchEvent(new MouseEvent('mouseover'));")
        ui.wait("document.querySelectorAll(\"#vis line[visibility='visible']\").length > 0")
    finally:
        ui.driver.switch_to.default_content()


def induction_shots(ui: UI, ids: dict[str, str], experiment: str) -> None:
    """features.md's screenshots, from the two induction runs."""
    short, long = ids["induction_100"], ids["induction_300"]
    # the experiment first, so that the sidebar names it
    ui.open(f"/experiments/{experiment}/runs", "document.querySelector('[row-id]')")
    keys = ["attn.induction.L1H2", "attn.prev_token.L0H0"]
    metric_shot(ui, [short, long], experiment, keys, 0, "mlflow-compare-induction-metric.png")

    ui.open(
        f"/experiments/{experiment}/runs/{long}/artifacts/attnlog_compare/{COMPARE_PAGE}",
        "document.querySelector('iframe')",
    )
    ui.close_assistant()
    frame = ui.driver.find_element("tag name", "iframe")
    ui.driver.switch_to.frame(frame)
    try:
        ui.wait("document.body && document.body.innerText.includes('Score matrices')")
    finally:
        ui.driver.switch_to.default_content()
    ui.settle()
    ui.shot("mlflow-compare-page-artifact.png")


def ui_names(ui: UI, run_ids: list[str]) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{ui.work / DB}")
    return {r: client.get_run(r).info.run_name for r in run_ids}


def take_shots(work: Path, out: Path) -> None:
    """Serve the runs of runs.json and write the screenshots to `out`."""
    from mlflow import MlflowClient

    ids = json.loads((work / "runs.json").read_text())
    client = MlflowClient(f"sqlite:///{work / DB}")
    demo_experiment = client.get_run(ids["demo"]).info.experiment_id
    induction_experiment = client.get_run(ids["induction_300"]).info.experiment_id
    for role, colour in RUN_COLORS.items():  # what picking a colour in the run list does
        client.set_tag(ids[role], "mlflow.runColor", colour)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))  # browser.py and servers.py: the tests' helpers
    with Server(work) as server:
        ui = UI(server.url, work, out)
        try:
            demo_shots(ui, ids, demo_experiment)
            induction_shots(ui, ids, induction_experiment)
        except Exception:
            ui.driver.save_screenshot(str(work / "failed.png"))
            print(f"the page when it failed: {work / 'failed.png'}", file=sys.stderr)
            raise
        finally:
            ui.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/attnlog-shots"))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--stage", choices=["all", "runs", "shots"], default="all")
    args = parser.parse_args()
    work = args.work.resolve()
    if args.stage in ("all", "runs"):
        make_runs(work)
    if args.stage in ("all", "shots"):
        take_shots(work, args.out.resolve())


if __name__ == "__main__":
    main()
