// The "Attention" tab. TensorBoard imports this module into the plugin's iframe and calls
// render(). Plain DOM + SVG, no libraries, nothing from the network but this plugin's routes.
// Data text (tokens, names, errors) always goes in through textContent, never innerHTML.

const SVG = "http://www.w3.org/2000/svg";
const state = { runs: {}, patterns: {}, runsJson: "", trend: null, heatmap: null };
const seq = { heatmap: 0, scores: 0, trend: 0 }; // drop answers that arrive after a newer request
let ui = null;

async function api(route, params) {
  const url = new URL(route, import.meta.url); // sibling routes of /data/plugin/attnlog/index.js
  url.search = new URLSearchParams(params).toString();
  const response = await fetch(url);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${route}: HTTP ${response.status}`);
  return body;
}

function html(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function svg(tag, attrs = {}, parent = null, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}

function tooltip(node, text) {
  svg("title", {}, node, text);
}

// White -> dark blue; null (undefined score) -> grey.
function color(t) {
  if (t === null || !Number.isFinite(t)) return "#d9d9d9";
  t = Math.min(1, Math.max(0, t));
  const mix = (a, b) => Math.round(a + (b - a) * t);
  return `rgb(${mix(255, 8)},${mix(255, 48)},${mix(255, 107)})`;
}

function fmt(v) {
  return v === null ? "n/a" : v.toFixed(3);
}

function short(token) {
  return token.length > 12 ? token.slice(0, 11) + "…" : token;
}

function setOptions(select, values, labels = values) {
  const keep = select.value;
  select.replaceChildren(...values.map((v, i) => html("option", { value: v }, null, labels[i])));
  if (values.map(String).includes(keep)) select.value = keep;
}

function status(message) {
  ui.status.textContent = message || "";
}

// ---- selection ---------------------------------------------------------------------------

function steps() {
  return state.runs[ui.run.value] || [];
}

function current() {
  return steps()[Number(ui.step.value)] || null;
}

function currentProbe() {
  const entry = current();
  return (entry && entry.probes.find((p) => p.name === ui.probe.value)) || null;
}

function probeShapes() {
  const probe = currentProbe();
  return probe ? probe.shapes : {}; // view -> [layers, heads, rows, cols]
}

// Words: attention between words (sum over a word's pieces as keys, mean as queries), computed
// by the plugin from the archive. Only for self-attention of probes stored token by token.
function wordsOn() {
  return ui.words.checked && !ui.words.disabled;
}

function selection() {
  const entry = current();
  return {
    run: ui.run.value,
    step: entry ? entry.step : null,
    probe: ui.probe.value,
    view: ui.view.value || "attention",
    words: wordsOn(),
    pattern: ui.pattern.value,
    layer: Number(ui.layer.value),
    head: Number(ui.head.value),
  };
}

async function loadRuns() {
  let runs;
  try {
    runs = await api("runs", {});
  } catch (err) {
    status(err.message);
    return;
  }
  const json = JSON.stringify(runs);
  if (json === state.runsJson) return; // nothing new was logged
  state.runsJson = json;
  // /runs gives each layout (patterns, probes and their shapes) in full at its first step only
  state.runs = {};
  state.patterns = {};
  for (const [name, list] of Object.entries(runs)) {
    const layouts = {};
    state.runs[name] = list.map((entry) => {
      if (entry.probes) layouts[entry.layout] = entry;
      const { patterns, probes } = layouts[entry.layout];
      return { step: entry.step, patterns, probes };
    });
    state.patterns[name] = [...new Set(Object.values(layouts).flatMap((l) => l.patterns))].sort();
  }
  const names = Object.keys(runs);
  setOptions(ui.run, names);
  if (!names.length) {
    status("No attnlog archive under the logdir yet.");
    return;
  }
  status("");
  onRun();
}

function onRun() {
  const list = steps();
  const atEnd = Number(ui.step.value) === Number(ui.step.max);
  ui.step.max = String(Math.max(0, list.length - 1));
  if (atEnd && !ui.step.dataset.touched) ui.step.value = ui.step.max; // follow training
  setOptions(ui.pattern, state.patterns[ui.run.value] || []);
  state.trend = null;
  onStep();
}

function onStep() {
  const entry = current();
  ui.stepLabel.textContent = entry ? `${entry.step}` : "–";
  if (!entry) return;
  setOptions(
    ui.probe,
    entry.probes.map((p) => p.name),
  );
  onProbe();
  drawScores();
}

function onProbe() {
  setOptions(ui.view, Object.keys(probeShapes())); // encoder-decoders add decoder/cross views
  onView();
}

function onView() {
  const probe = currentProbe();
  ui.words.disabled = ui.view.value !== "attention" || !probe || probe.pooled;
  const shape = probeShapes()[ui.view.value];
  if (!shape) return;
  const range = (n) => [...Array(n).keys()];
  setOptions(ui.layer, range(shape[0]));
  setOptions(ui.head, range(shape[1]));
  onHead();
}

function onHead() {
  drawHeatmap();
  markSelectedScore();
  drawTrend();
}

// ---- heatmap -----------------------------------------------------------------------------

async function drawHeatmap() {
  const sel = selection();
  if (sel.step === null || !sel.probe) return;
  const token = ++seq.heatmap;
  let data;
  try {
    data = await api("attention", {
      run: sel.run, step: sel.step, probe: sel.probe, view: sel.view, layer: sel.layer,
      head: sel.head, words: sel.words ? 1 : 0,
    });
  } catch (err) {
    status(err.message);
    return;
  }
  if (token !== seq.heatmap) return;
  status("");
  state.heatmap = data;
  paintHeatmap();
}

// Draws the last fetched head again with the chosen colour scale (no new request).
function paintHeatmap() {
  const data = state.heatmap;
  if (!data) return;
  const rows = data.query_tokens;
  const cols = data.tokens;
  const n = Math.max(rows.length, cols.length);
  const cell = Math.max(4, Math.min(28, Math.floor(560 / n)));
  const margin = 90;
  const root = ui.heatmap;
  root.replaceChildren();
  root.setAttribute("width", margin + cols.length * cell + 16 + BAR.width + 60);
  root.setAttribute("height", margin + rows.length * cell + 10);
  root.dataset.step = String(data.step);
  root.dataset.key = `${data.run}|${data.step}|${data.probe}|${data.view}|${data.layer}|${data.head}`;
  root.dataset.words = data.words ? "1" : "0";
  const scale = colorScale(data.matrix, ui.scale.value);
  root.dataset.scale = scale.kind;
  const grid = svg("g", { transform: `translate(${margin},${margin})` }, root);
  data.matrix.forEach((row, i) => {
    row.forEach((v, j) => {
      const rect = svg("rect", {
        class: "cell", x: j * cell, y: i * cell, width: cell, height: cell,
        fill: color(v === null ? null : scale.t(v, i)),
      }, grid);
      rect.dataset.value = v === null ? "" : String(v);
      tooltip(rect, `${rows[i]} → ${cols[j]}: ${fmt(v)}`);
    });
  });
  drawLabels(root, rows, cols, margin, cell);
  colorBar(root, margin + cols.length * cell + 16, margin, Math.max(rows.length * cell, 80), scale);
  ui.heatmapCaption.textContent =
    `step ${data.step} · ${data.probe} · ${data.view.replace("_", " ")}${data.words ? " by word" : ""} · ` +
    `layer ${data.layer} head ${data.head} · ${scale.caption} (rows: queries, columns: keys)` +
    (scale.faint ? " · most cells are near 0 here: the log or per-row colour scale shows more" : "");
}

// Token labels along both axes. When cells are too small for one label each (a long probe
// pooled to hundreds of blocks), only every k-th label is drawn, spaced so that none overlap;
// every label, drawn or not, is in the tooltip of its cells, and a drawn one shows its full
// text on hover.
const LABEL = { font: 9, room: 13 }; // font size of thinned labels, and the room each needs (px)

function drawLabels(root, rows, cols, margin, cell) {
  const every = cell >= 9 ? 1 : Math.ceil(LABEL.room / cell);
  const font = every > 1 ? LABEL.font : Math.min(12, Math.max(7, cell - 2));
  root.dataset.labelEvery = String(every);
  rows.forEach((t, i) => {
    if (i % every) return;
    const g = svg("g", {}, root); // the <title> sits beside the <text>, not inside it
    tooltip(g, t);
    svg("text", {
      class: "token row-token", x: margin - 4, y: margin + i * cell + cell / 2,
      "text-anchor": "end", "dominant-baseline": "middle", "font-size": font,
    }, g, short(t));
  });
  cols.forEach((t, j) => {
    if (j % every) return;
    const x = margin + j * cell + cell / 2;
    const g = svg("g", {}, root);
    tooltip(g, t);
    svg("text", {
      class: "token col-token", transform: `translate(${x},${margin - 4}) rotate(-60)`,
      "dominant-baseline": "middle", "font-size": font,
    }, g, short(t));
  });
}

// Colour scales. Attention over n keys is near 1/n almost everywhere, so against the darkest
// cell (often a sink at 0.5 to 1) a long probe is almost white: "log" spans from a quarter of
// the 1st percentile of the positive values (so that the floor near 1/n is a light tint; at
// least max / 10^4) to the max, "row" scales each query row to its own darkest key. `t(v, row)` gives 0 (white) .. 1 (darkest).
const SCALES = { linear: "linear", log: "log", row: "per row" };

function colorScale(matrix, kind) {
  const values = matrix.flat().filter((v) => v !== null);
  const max = values.reduce((m, v) => (v > m ? v : m), 1e-9);
  if (kind === "log") {
    const positive = values.filter((v) => v > 0).sort((a, b) => a - b);
    const low = positive[Math.floor(positive.length / 100)] || max; // 1st percentile
    const lo = Math.min(max / 10, Math.max(max / 1e4, low / 4));
    const span = Math.log(max / lo);
    return { kind, max, lo, caption: `log scale from ${tick(lo)} to ${tick(max)}`,
             t: (v) => (v <= lo ? 0 : Math.log(v / lo) / span) };
  }
  if (kind === "row") {
    const rowMax = matrix.map((r) => r.reduce((m, v) => (v !== null && v > m ? v : m), 1e-9));
    return { kind, max, caption: "each row from 0 to its own darkest key", t: (v, i) => v / rowMax[i] };
  }
  // Spread thin over many keys (a long probe), not a sparse head: suggest another scale.
  const sorted = [...values].sort((a, b) => a - b);
  const p90 = sorted[Math.floor(sorted.length * 0.9)] || 0;
  const faint = matrix.length >= 64 && p90 > 0 && p90 < max / 10;
  return { kind: "linear", max, faint, caption: `darkest = ${max.toFixed(3)}`, t: (v) => v / max };
}

function tick(v) {
  return v >= 0.01 ? v.toFixed(3) : v.toExponential(1);
}

// The colour bar beside the heatmap: white at the bottom to the scale's darkest at the top.
const BAR = { width: 12, steps: 24 };

function colorBar(root, x, y, height, scale) {
  const g = svg("g", { class: "colorbar", transform: `translate(${x},${y})` }, root);
  g.dataset.max = String(scale.max);
  const h = height / BAR.steps;
  for (let i = 0; i < BAR.steps; i++) {
    const t = 1 - (i + 0.5) / BAR.steps;
    svg("rect", { class: "colorbar-step", x: 0, y: i * h, width: BAR.width, height: h + 0.5,
                  fill: color(t) }, g);
  }
  svg("rect", { class: "colorbar-frame", x: 0, y: 0, width: BAR.width, height }, g);
  const label = (v, yy, baseline) => svg("text", {
    class: "axis colorbar-label", x: BAR.width + 4, y: yy, "dominant-baseline": baseline,
  }, g, v);
  if (scale.kind === "log") {
    label(tick(scale.max), 0, "hanging");
    label(tick(Math.sqrt(scale.max * scale.lo)), height / 2, "middle");
    label(`≤ ${tick(scale.lo)}`, height, "auto");
  } else if (scale.kind === "row") {
    label("row max", 0, "hanging");
    label("½", height / 2, "middle");
    label("0", height, "auto");
  } else {
    label(scale.max.toFixed(3), 0, "hanging");
    label((scale.max / 2).toFixed(3), height / 2, "middle");
    label("0", height, "auto");
  }
}

// ---- score grid --------------------------------------------------------------------------

async function drawScores() {
  const sel = selection();
  if (sel.step === null) return;
  const token = ++seq.scores;
  let data;
  try {
    data = await api("scores", { run: sel.run, step: sel.step });
  } catch (err) {
    status(err.message);
    return;
  }
  if (token !== seq.scores) return;
  const root = ui.scores;
  root.replaceChildren();
  const matrix = data.scores[ui.pattern.value];
  root.dataset.step = String(data.step);
  if (!matrix) return;
  const cell = 30;
  const margin = 30;
  const values = matrix.flat().filter((v) => v !== null);
  const lo = Math.min(0, ...values);
  const hi = Math.max(1, ...values);
  root.setAttribute("width", margin + matrix[0].length * cell + 4);
  root.setAttribute("height", margin + matrix.length * cell + 4);
  matrix.forEach((row, layer) => {
    svg("text", { class: "axis", x: margin - 4, y: margin + layer * cell + cell / 2,
      "text-anchor": "end", "dominant-baseline": "middle" }, root, `L${layer}`);
    row.forEach((v, head) => {
      const g = svg("g", { class: "score-cell-group" }, root);
      const rect = svg("rect", {
        class: "score-cell", x: margin + head * cell, y: margin + layer * cell,
        width: cell - 1, height: cell - 1, fill: color(v === null ? null : (v - lo) / (hi - lo)),
      }, g);
      rect.dataset.layer = String(layer);
      rect.dataset.head = String(head);
      tooltip(rect, `${ui.pattern.value} · layer ${layer} head ${head}: ${fmt(v)}`);
      const dark = v !== null && (v - lo) / (hi - lo) > 0.55;
      svg("text", {
        class: "score-text" + (dark ? " dark" : ""), x: margin + head * cell + cell / 2,
        y: margin + layer * cell + cell / 2, "text-anchor": "middle",
        "dominant-baseline": "middle",
      }, g, v === null ? "" : v.toFixed(2).replace(/^0/, ""));
      g.addEventListener("click", () => selectHead(layer, head));
    });
  });
  matrix[0].forEach((_, head) => {
    svg("text", { class: "axis", x: margin + head * cell + cell / 2, y: margin - 8,
      "text-anchor": "middle" }, root, `H${head}`);
  });
  markSelectedScore();
}

function markSelectedScore() {
  for (const rect of ui.scores.querySelectorAll("rect.score-cell")) {
    const on = rect.dataset.layer === ui.layer.value && rect.dataset.head === ui.head.value;
    rect.classList.toggle("selected", on);
  }
}

function selectHead(layer, head) {
  ui.layer.value = String(layer);
  ui.head.value = String(head);
  onHead();
}

// ---- trend -------------------------------------------------------------------------------

async function drawTrend() {
  const sel = selection();
  if (!sel.pattern || !sel.run) return;
  const key = `${sel.run}|${sel.pattern}|${sel.layer}|${sel.head}`;
  if (!state.trend || state.trend.key !== key) {
    const token = ++seq.trend;
    let data;
    try {
      data = await api("trend", { run: sel.run, pattern: sel.pattern, layer: sel.layer,
        head: sel.head });
    } catch (err) {
      status(err.message);
      return;
    }
    if (token !== seq.trend) return;
    state.trend = { key, data };
  }
  plotTrend(state.trend.data, sel.step);
}

const TREND_DOTS = 400; // more steps than this: a line without dots

function plotTrend(data, step) {
  const root = ui.trend;
  root.replaceChildren();
  const width = 420;
  const height = 170;
  const pad = { left: 44, right: 12, top: 12, bottom: 28 };
  root.setAttribute("width", width);
  root.setAttribute("height", height);
  root.dataset.points = String(data.values.filter((v) => v !== null).length);
  const values = data.values.filter((v) => v !== null);
  if (!data.steps.length) return;
  const x0 = data.steps[0];
  const x1 = Math.max(x0 + 1, data.steps[data.steps.length - 1]);
  const lo = Math.min(0, ...values);
  const hi = Math.max(1, ...values);
  const x = (s) => pad.left + ((s - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - ((v - lo) / (hi - lo)) * (height - pad.top - pad.bottom);
  svg("line", { class: "axis-line", x1: pad.left, x2: pad.left, y1: pad.top,
    y2: height - pad.bottom }, root);
  svg("line", { class: "axis-line", x1: pad.left, x2: width - pad.right,
    y1: height - pad.bottom, y2: height - pad.bottom }, root);
  svg("text", { class: "axis", x: pad.left - 4, y: y(hi), "text-anchor": "end",
    "dominant-baseline": "middle" }, root, hi.toFixed(2));
  svg("text", { class: "axis", x: pad.left - 4, y: y(lo), "text-anchor": "end",
    "dominant-baseline": "middle" }, root, lo.toFixed(2));
  svg("text", { class: "axis", x: x(x0), y: height - 8, "text-anchor": "start" }, root, `${x0}`);
  svg("text", { class: "axis", x: x(x1), y: height - 8, "text-anchor": "end" }, root,
    `${data.steps[data.steps.length - 1]}`);
  if (step !== null) {
    svg("line", { class: "current-step", x1: x(step), x2: x(step), y1: pad.top,
      y2: height - pad.bottom }, root);
  }
  let d = "";
  let pen = "M";
  data.steps.forEach((s, i) => {
    const v = data.values[i];
    if (v === null) {
      pen = "M"; // a gap where the pattern was not scored
      return;
    }
    d += `${pen}${x(s).toFixed(1)},${y(v).toFixed(1)} `;
    pen = "L";
  });
  svg("path", { class: "trend-line", d }, root);
  if (data.steps.length <= TREND_DOTS) {
    data.steps.forEach((s, i) => {
      const v = data.values[i];
      if (v === null) return;
      const dot = svg("circle", { class: "trend-point", cx: x(s), cy: y(v), r: 3 }, root);
      tooltip(dot, `step ${s}: ${fmt(v)}`);
      dot.addEventListener("click", () => goToStep(s));
    });
  } else {
    // A long run: one dot per step would be thousands of nodes. Clicking the plot goes to
    // the nearest logged step instead.
    const area = svg("rect", { class: "trend-area", x: pad.left, y: pad.top,
      width: width - pad.left - pad.right, height: height - pad.top - pad.bottom }, root);
    tooltip(area, "click to go to the nearest logged step");
    area.addEventListener("click", (event) => {
      const box = area.getBoundingClientRect();
      const s = x0 + ((event.clientX - box.left) / box.width) * (x1 - x0);
      goToStep(nearest(data.steps, s));
    });
  }
  ui.trendCaption.textContent =
    `${data.pattern} · layer ${data.layer} head ${data.head} over ${data.steps.length} steps`;
}

function nearest(sorted, value) {
  let lo = 0;
  let hi = sorted.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (sorted[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo > 0 && value - sorted[lo - 1] < sorted[lo] - value ? sorted[lo - 1] : sorted[lo];
}

function goToStep(s) {
  const index = steps().findIndex((e) => e.step === s);
  if (index >= 0) {
    ui.step.value = String(index);
    ui.step.dataset.touched = "1";
    onStep();
  }
}

// ---- page --------------------------------------------------------------------------------

function layout() {
  const body = document.body;
  html("link", { rel: "stylesheet", href: new URL("style.css", import.meta.url).href },
    document.head);
  const bar = html("div", { id: "controls" }, body);
  const field = (label, node) => {
    const wrap = html("label", {}, bar, label + " ");
    wrap.appendChild(node);
    return node;
  };
  const ui = {};
  ui.run = field("Run", html("select", { id: "run" }));
  ui.step = field("Step", html("input", { id: "step", type: "range", min: 0, max: 0, value: 0 }));
  ui.stepLabel = html("span", { id: "step-label" }, bar, "–");
  ui.probe = field("Probe", html("select", { id: "probe" }));
  ui.view = field("View", html("select", { id: "view" }));
  ui.layer = field("Layer", html("select", { id: "layer" }));
  ui.head = field("Head", html("select", { id: "head" }));
  ui.words = field("Words", html("input", { id: "words", type: "checkbox",
    title: "attention between words instead of tokens" }));
  ui.scale = field("Colour", html("select", { id: "scale",
    title: "log or per row: structure near 1/n shows on long probes" }));
  setOptions(ui.scale, Object.keys(SCALES), Object.values(SCALES));
  ui.pattern = field("Pattern", html("select", { id: "pattern" }));
  ui.status = html("div", { id: "status", role: "status" }, body);
  const main = html("div", { id: "main" }, body);
  const left = html("section", {}, main);
  html("h3", {}, left, "Attention of the selected head");
  ui.heatmapCaption = html("div", { class: "caption" }, left);
  ui.heatmap = svg("svg", { id: "heatmap" }, left);
  const right = html("section", {}, main);
  html("h3", {}, right, "Pattern scores at this step (click a head)");
  ui.scores = svg("svg", { id: "scores" }, right);
  html("h3", {}, right, "Selected head's score over steps");
  ui.trendCaption = html("div", { class: "caption" }, right);
  ui.trend = svg("svg", { id: "trend" }, right);
  return ui;
}

export async function render() {
  ui = layout();
  ui.run.addEventListener("change", () => {
    delete ui.step.dataset.touched;
    onRun();
  });
  ui.step.addEventListener("input", () => {
    ui.step.dataset.touched = "1";
    onStep();
  });
  ui.probe.addEventListener("change", onProbe);
  ui.view.addEventListener("change", onView);
  ui.layer.addEventListener("change", onHead);
  ui.head.addEventListener("change", onHead);
  ui.words.addEventListener("change", drawHeatmap);
  ui.scale.addEventListener("change", paintHeatmap);
  ui.pattern.addEventListener("change", () => {
    drawScores();
    drawTrend();
  });
  await loadRuns();
  setInterval(loadRuns, 30000); // new steps appear while the model trains
}
