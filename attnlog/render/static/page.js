// attnlog event page: a probe selector and one tab per view, drawn by bertviz's own scripts.
// Each probe's tensors are decoded on first use, one head at a time, and kept. Nothing is
// loaded and nothing stored: the page also runs in MLflow's sandboxed artifact iframe.
(function () {
  "use strict";
  var ROOT = "bertviz-attnlog";
  var data = JSON.parse(document.getElementById("attnlog-data").textContent);
  var probeSelect = document.getElementById("attnlog-probe");
  var tabs = document.getElementById("attnlog-tabs");
  var notes = document.getElementById("attnlog-notes");
  var stage = document.getElementById("attnlog-stage");
  var current = {probe: 0, view: data.views[0]};

  function values(t) {
    if (t.values === null) {
      var s = atob(t.data), out = new Float32Array(s.length), i;
      if (t.dtype === "u8") {
        for (i = 0; i < s.length; i++) out[i] = s.charCodeAt(i) * t.scale;
      } else {  // i8, one scale per layer and head
        var block = t.shape[2] * t.shape[3];
        for (i = 0; i < s.length; i++) {
          var b = s.charCodeAt(i);
          out[i] = (b > 127 ? b - 256 : b) * t.scale[(i / block) | 0];
        }
      }
      t.values = out;
      t.data = null;
    }
    return t.values;
  }

  function head(heads, t, l, h, rows, cols) {
    var cached = null;
    Object.defineProperty(heads, h, {enumerable: true, get: function () {
      if (cached === null) {
        var C = t.shape[3], base = (l * t.shape[1] + h) * t.shape[2] * C, vals = values(t);
        cached = [];
        for (var r = rows[0]; r < rows[1]; r++) {
          cached.push(Array.prototype.slice.call(vals, base + r * C + cols[0], base + r * C + cols[1]));
        }
      }
      return cached;
    }});
  }

  function nested(probe, ref) {  // bertviz's [layer][head][row][col] arrays, built once per ref
    var key = JSON.stringify(ref);
    if (!probe.cache[key]) {
      var t = probe.tensors[ref.tensor], layers = [];
      for (var l = 0; l < t.shape[0]; l++) {
        var heads = [];
        for (var h = 0; h < t.shape[1]; h++) head(heads, t, l, h, ref.rows, ref.cols);
        layers.push(heads);
      }
      probe.cache[key] = layers;
    }
    return probe.cache[key];
  }

  function resolve(probe, entries) {  // a copy of the entries with tensor references decoded
    var out = Array.isArray(entries) ? [] : {};
    Object.keys(entries).forEach(function (k) {
      var e = Object.assign({}, entries[k]);
      ["attn", "queries", "keys"].forEach(function (f) { if (e[f]) e[f] = nested(probe, e[f]); });
      out[k] = e;
    });
    return out;
  }

  function range(n) { var r = []; for (var i = 0; i < n; i++) r.push(i); return r; }

  // bertviz's params, script and dropdowns for one view of one probe; null if it has none.
  function spec(probe, view) {
    var words = view.slice(-6) === "_words", kind = words ? view.slice(0, -6) : view;
    var src = words ? probe.words : probe;
    if (kind === "neuron") {
      if (!probe.neuron) return null;
      var filters = Object.keys(probe.neuron).length > 1 ? Object.keys(probe.neuron) : [];
      return {script: "neuron_view.js", layer: true, head: true, filters: filters,
        labels: {all: "All", aa: "Sentence A -> Sentence A", ab: "Sentence A -> Sentence B",
          ba: "Sentence B -> Sentence A", bb: "Sentence B -> Sentence B"},
        params: {attention: resolve(probe, probe.neuron), default_filter: "all",
          root_div_id: ROOT, bidirectional: probe.bidirectional, display_mode: "dark",
          layer: null, head: null, scaling: probe.scaling}};
    }
    if (!src) return null;
    var names = {};
    src.attention.forEach(function (e, i) { names[i] = String(e.name); });
    var s = {script: kind + "_view.js", layer: kind === "head", head: false, labels: names,
      filters: src.attention.length > 1 ? Object.keys(names) : []};
    s.params = {attention: resolve(probe, src.attention), default_filter: "0",
      root_div_id: ROOT, include_layers: src.layers};
    if (kind === "head") {
      s.params.layer = null;
      s.params.heads = null;
    } else {
      s.params.display_mode = "dark";
      s.params.include_heads = range(src.heads);
      s.params.total_heads = src.heads;
    }
    return s;
  }

  function select(id, label, values, labels) {
    var span = document.createElement("span"), caption = document.createElement("span");
    caption.className = "dropdown-label";
    caption.textContent = label + ": ";
    var sel = document.createElement("select");
    sel.id = id;
    (values || []).forEach(function (v) {
      var o = document.createElement("option");
      o.value = v;
      o.textContent = labels[v];
      sel.appendChild(o);
    });
    span.appendChild(caption);
    span.appendChild(sel);
    return span;
  }

  function draw() {
    var probe = data.probes[current.probe], view = current.view;
    notes.textContent = data.notes.concat(probe ? probe.notes : []).join(" ");
    stage.textContent = "";
    document.body.setAttribute("data-drawn", "");
    Array.prototype.forEach.call(tabs.children, function (b) {
      b.setAttribute("aria-selected", String(b.getAttribute("data-view") === view));
    });
    if (!probe) { stage.textContent = "No probe fits this page."; return; }
    var s = spec(probe, view);
    if (s === null) {
      stage.textContent = "No " + view.replace("_", " ") + " view for this probe: " +
        (probe.why_not[view] || "it was not captured.");
      return;
    }
    var root = document.createElement("div"), bar = document.createElement("span");
    root.id = ROOT;
    bar.style.userSelect = "none";
    if (s.layer) bar.appendChild(select("layer", "Layer", [], {}));
    if (s.head) bar.appendChild(select("att_head", "Head", [], {}));
    if (s.filters.length) bar.appendChild(select("filter", "Attention", s.filters, s.labels));
    var vis = document.createElement("div");
    vis.id = "vis";
    root.appendChild(bar);
    root.appendChild(vis);
    stage.appendChild(root);
    attnlogViews[s.script](function () { return s.params; });
    document.body.setAttribute("data-drawn", current.probe + "/" + view);
  }

  data.probes.forEach(function (p, i) {
    p.cache = {};
    p.tensors.forEach(function (t) { t.values = null; });
    var o = document.createElement("option");
    o.value = String(i);
    o.textContent = p.name;
    probeSelect.appendChild(o);
  });
  data.views.forEach(function (v, i) {
    var b = document.createElement("button");
    b.type = "button";
    b.setAttribute("role", "tab");
    b.setAttribute("data-view", v);
    b.textContent = data.labels[i];
    b.addEventListener("click", function () { current.view = v; draw(); });
    tabs.appendChild(b);
  });
  probeSelect.addEventListener("change", function () {
    current.probe = +probeSelect.value;
    draw();
  });
  draw();
})();
