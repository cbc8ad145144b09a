// vitlens_patch causal-tracing explorer: the front end. It only draws.
//
// Every number comes from the kernel (the widget's `view` trait, computed by the library's
// trace_layers / trace_grid / caap) or, in the static export, from the same views precomputed
// into the page. plotly.js comes from the plotly Python package, never from a CDN: the widget asks
// the kernel for it once per page (a custom message answered with the file as a binary buffer);
// the static export inlines it before this script (see widgets/assets.py).

let Plotly = null;

async function evaluatePlotly(buffer) {
  const source = new TextDecoder().decode(buffer);
  // a CommonJS-style wrapper: plotly.js assigns module.exports whatever module loaders the page has
  const wrapped = "const module = { exports: {} };\n(function (module, exports, define) {\n" + source +
    "\n}).call(globalThis, module, module.exports, undefined);\nexport default module.exports;\n";
  const previous = globalThis.Plotly;
  const url = URL.createObjectURL(new Blob([wrapped], { type: "text/javascript" }));
  try {
    return (await import(url)).default;
  } finally {
    URL.revokeObjectURL(url);
    if (previous === undefined) delete globalThis.Plotly; else globalThis.Plotly = previous;
  }
}

function ensurePlotly(model) {
  if (Plotly) return Promise.resolve(Plotly);
  if (globalThis.__vitlensPlotly) return Promise.resolve((Plotly = globalThis.__vitlensPlotly));
  if (!globalThis.__vitlensPlotlyLoading) {
    globalThis.__vitlensPlotlyLoading = new Promise((resolve, reject) => {
      const onMessage = (message, buffers) => {
        if (!message || message.type !== "plotly.js") return;
        model.off("msg:custom", onMessage);
        evaluatePlotly(buffers[0]).then(resolve, reject);
      };
      model.on("msg:custom", onMessage);
      model.send({ type: "plotly.js" });
    }).then((plotly) => {
      globalThis.__vitlensPlotly = plotly;
      return plotly;
    }, (error) => {
      globalThis.__vitlensPlotlyLoading = null;
      throw error;
    });
  }
  return globalThis.__vitlensPlotlyLoading.then((plotly) => (Plotly = plotly));
}

const COLORSCALE = [
  [0, "#2166ac"], [0.25, "#67a9cf"], [0.5, "#f7f7f7"], [0.75, "#ef8a62"], [1, "#b2182b"],
];
const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

function element(tag, attributes = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value) {
  return value === null || value === undefined ? "n/a" : Number(value).toPrecision(4);
}

function reshape(flat, rows, columns) {
  const grid = [];
  for (let r = 0; r < rows; r++) grid.push(flat.slice(r * columns, (r + 1) * columns));
  return grid;
}

function absMax(rows) {
  let max = 0;
  for (const row of rows) for (const value of row) if (value !== null && Math.abs(value) > max) max = Math.abs(value);
  return max || 1;
}

// The selected patch's per-layer effects and CAAP value: the kernel's exact single-patch trace when
// it has one, else read from the grid and the CAAP map (the same numbers, drawn before the kernel answers).
function patchInfo(view, patch) {
  if (!view || patch < 0) return null;
  if (view.patch && view.patch.index === patch && view.patch.effects) return view.patch;
  if (!view.grid) return null;
  const caap = view.caap ? view.caap.map.flat()[patch] : null;
  return {
    index: patch,
    effects: view.grid.effects.map((row) => row[patch]),
    exact: view.grid.exact,
    caap,
    caap_exact: view.caap ? view.caap.exact : false,
  };
}

function exactness(exact) {
  return exact ? "exact" : "estimate (attribution patching), exact values pending";
}

function imageTrace(source, pixelSize, gridSize) {
  const [gridH, gridW] = gridSize;
  const [height, width] = pixelSize;
  const dx = gridW / width;
  const dy = gridH / height;
  return {
    type: "image", source, x0: -0.5 + dx / 2, dx, y0: -0.5 + dy / 2, dy, hoverinfo: "skip", name: "image",
  };
}

function patchRectangle(patch, gridW) {
  if (patch < 0) return [];
  const row = Math.floor(patch / gridW);
  const column = patch % gridW;
  return [{
    type: "rect", xref: "x", yref: "y", x0: column - 0.5, x1: column + 0.5, y0: row - 0.5, y1: row + 0.5,
    line: { color: "#111", width: 3 },
  }];
}

function mapLayout(title, gridSize) {
  const [gridH, gridW] = gridSize;
  return {
    title: { text: title, font: { size: 13 } },
    margin: { l: 30, r: 10, t: 48, b: 30 },
    height: 360,
    xaxis: { range: [-0.5, gridW - 0.5], showgrid: false, zeroline: false, constrain: "domain", dtick: 1 },
    yaxis: {
      range: [gridH - 0.5, -0.5], showgrid: false, zeroline: false, scaleanchor: "x", constrain: "domain", dtick: 1,
    },
    uirevision: "map",
  };
}

function lineLayout(title, xTitle, yTitle, layer, nLayers) {
  return {
    title: { text: title, font: { size: 13 } },
    margin: { l: 56, r: 10, t: 48, b: 44 },
    height: 300,
    xaxis: { title: { text: xTitle }, dtick: 1, range: [-0.5, nLayers - 0.5] },
    yaxis: { title: { text: yTitle }, zeroline: true },
    shapes: [{
      type: "line", xref: "x", yref: "paper", x0: layer, x1: layer, y0: 0, y1: 1, line: { color: "#999", dash: "dot" },
    }],
    showlegend: false,
  };
}

function select(name, choices, label) {
  const node = element("select", { "data-control": name });
  for (const [value, text] of choices) node.append(element("option", { value: String(value), text }));
  return element("label", { className: "vitlens-control" }, [element("span", { text: label }), node]);
}

function numberInput(name, label, min, max) {
  const node = element("input", { type: "number", "data-control": name, min: String(min), max: String(max), step: "1" });
  return element("label", { className: "vitlens-control" }, [element("span", { text: label }), node]);
}

function buildUi(el, model) {
  const options = model.get("options");
  const nLayers = options.n_layers;
  const root = element("div", { className: "vitlens-explorer" });
  const status = element("span", { className: "vitlens-status", "data-role": "status" });
  const spinner = element("span", { className: "vitlens-spinner", "data-role": "busy" });
  const header = element("div", { className: "vitlens-header" }, [
    element("strong", { text: "Causal-tracing explorer" }), spinner, status,
  ]);
  const error = element("div", { className: "vitlens-error", "data-role": "error", role: "alert" });
  const strip = element("div", { className: "vitlens-strip", "data-role": "strip" });
  const classes = [["-1", "predicted class"], ...options.class_names.map((name, i) => [String(i), `${i}: ${name}`])];
  const controls = element("div", { className: "vitlens-controls" }, [
    select("corruption", options.corruptions, "corruption"),
    select("kind", options.kinds.map((k) => [k, k]), "restore"),
    numberInput("window", "window", 1, nLayers),
    select("score", options.scores.map((s) => [s, s]), "score"),
    select("target", classes, "target"),
  ]);
  const settingsText = element("div", { className: "vitlens-settings", "data-role": "settings" });
  const panel = (name) => element("div", { className: "vitlens-plot", "data-view": name });
  const curve = panel("curve");
  const grid = panel("grid");
  const patch = panel("patch");
  const caap = panel("caap");
  const slider = element("input", {
    type: "range", min: "0", max: String(nLayers - 1), step: "1", "data-control": "layer",
  });
  const sliderLabel = element("span", { className: "vitlens-slider-label" });
  const caapRange = element("div", { className: "vitlens-controls" }, [
    numberInput("caap_start", "CAAP blocks from", 0, nLayers - 1),
    numberInput("caap_stop", "to (exclusive)", 1, nLayers),
  ]);
  const cells = element("div", { className: "vitlens-views" }, [
    element("div", { className: "vitlens-cell" }, [curve]),
    element("div", { className: "vitlens-cell" }, [
      grid, element("label", { className: "vitlens-slider" }, [element("span", { text: "layer" }), slider, sliderLabel]),
    ]),
    element("div", { className: "vitlens-cell", "data-role": "patch-cell" }, [patch]),
    element("div", { className: "vitlens-cell" }, [caap, caapRange]),
  ]);
  root.append(header, error, strip, controls, settingsText, cells);
  el.append(root);
  return { root, status, spinner, error, strip, controls, settingsText, curve, grid, patch, caap, slider, sliderLabel, caapRange };
}

function setAndSave(model, name, value) {
  model.set(name, value);
  model.save_changes();
}

function bindControls(ui, model) {
  for (const node of ui.root.querySelectorAll("[data-control]")) {
    const name = node.getAttribute("data-control");
    const numeric = node.type === "number" || node.type === "range" || name === "target";
    const eventName = node.type === "range" ? "input" : "change";
    node.addEventListener(eventName, () => {
      const value = numeric ? parseInt(node.value, 10) : node.value;
      if (numeric && Number.isNaN(value)) return;
      setAndSave(model, name, value);
    });
  }
}

function drawStrip(ui, model) {
  const thumbnails = model.get("thumbnails") || [];
  const current = model.get("image");
  const available = model.get("available_images");
  ui.strip.replaceChildren();
  thumbnails.forEach((thumb, index) => {
    const wrong = thumb.true !== null && thumb.true !== thumb.pred;
    const caption = thumb.true === null ? `pred ${thumb.pred}` : `${thumb.true} \u2192 ${thumb.pred}`;
    const button = element("button", {
      className: "vitlens-thumb" + (index === current ? " selected" : "") + (wrong ? " wrong" : ""),
      title: `image ${index}: true ${thumb.true ?? "unknown"}, predicted ${thumb.pred}`,
      "data-image": String(index),
    }, [element("img", { src: thumb.src, alt: `image ${index}` }), element("span", { text: caption })]);
    if (available && !available.includes(index)) button.disabled = true;
    button.addEventListener("click", () => setAndSave(model, "image", index));
    ui.strip.append(button);
  });
}

function drawControls(ui, model) {
  for (const node of ui.root.querySelectorAll("[data-control]")) {
    const name = node.getAttribute("data-control");
    const value = String(model.get(name));
    if (node.value !== value) node.value = value;
    if (model.get("static") && name !== "layer") node.disabled = true;
  }
  ui.sliderLabel.textContent = String(model.get("layer"));
}

function drawStatus(ui, model, view) {
  const busy = model.get("busy");
  ui.spinner.style.visibility = busy ? "visible" : "hidden";
  ui.root.setAttribute("data-busy", busy ? "true" : "false");
  const pending = (view && view.pending) || [];
  if (model.get("static")) ui.status.textContent = "static export: every layer and patch precomputed (exact)";
  else if (busy && pending.length) ui.status.textContent = `computing: ${[...new Set(pending)].join(", ")}`;
  else ui.status.textContent = "ready";
  const error = model.get("error");
  ui.error.textContent = error || "";
  ui.error.style.display = error ? "block" : "none";
  ui.root.setAttribute("data-error", error ? "true" : "false");
}

function drawSettings(ui, view) {
  if (!view || !view.settings) { ui.settingsText.textContent = ""; return; }
  const s = view.settings;
  const layers = view.layers;
  const scores = layers ? ` \u2014 clean ${s.score} ${fmt(layers.clean_score)}, corrupted ${fmt(layers.corrupted_score)}` : "";
  ui.settingsText.textContent =
    `image ${s.image}, target "${view.target_name}", corruption ${s.corruption}, restore ${s.kind} over ${s.window} layer(s)${scores}`;
}

function drawCurve(ui, model, view) {
  const options = model.get("options");
  const nLayers = options.n_layers;
  const layer = model.get("layer");
  const s = view.settings;
  const layout = lineLayout(
    `Layer curve: restoring ${s.kind} (window ${s.window}) at every token`, "centre layer",
    `effect on ${s.score}(${view.target_name})`, layer, nLayers,
  );
  const data = view.layers ? [{
    x: [...Array(nLayers).keys()], y: view.layers.effects, mode: "lines+markers", name: "effect",
    hovertemplate: "centre layer %{x}<br>effect %{y:.4g}<extra></extra>",
  }] : [];
  if (!view.layers) layout.annotations = [{ text: "computing\u2026", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
  Plotly.react(ui.curve, data, layout, PLOT_CONFIG);
}

function drawMap(node, model, view, z, title, hoverLabel, zmax) {
  const options = model.get("options");
  const gridSize = options.grid_size;
  const [gridH, gridW] = gridSize;
  const patch = model.get("selected_patch");
  const layout = mapLayout(title, gridSize);
  layout.shapes = patchRectangle(patch, gridW);
  const data = [imageTrace(view.clean_pixels, view.pixel_size, gridSize)];
  if (z) {
    const ids = reshape([...Array(gridH * gridW).keys()], gridH, gridW);
    data.push({
      type: "heatmap", z: reshape(z, gridH, gridW), customdata: ids, opacity: 0.62, colorscale: COLORSCALE,
      zmin: -zmax, zmax, zmid: 0, xgap: 0.5, ygap: 0.5, colorbar: { thickness: 12, len: 0.85 },
      hovertemplate: `patch %{customdata} (row %{y}, column %{x})<br>${hoverLabel} %{z:.4g}<extra></extra>`,
    });
  } else {
    layout.annotations = [{ text: "computing\u2026", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
  }
  Plotly.react(node, data, layout, PLOT_CONFIG);
}

function drawGrid(ui, model, view) {
  const layer = model.get("layer");
  const grid = view.grid;
  const z = grid ? grid.effects[layer] : null;
  const cls = grid && grid.prefix[layer] ? ` \u2014 class token ${fmt(grid.prefix[layer][0])}` : "";
  const title = grid
    ? `Patch grid at layer ${layer}: restoring ${view.settings.kind} at one token${cls}<br><sub>${exactness(grid.exact)}</sub>`
    : `Patch grid at layer ${layer}`;
  drawMap(ui.grid, model, view, z, title, "effect", grid ? absMax(grid.effects) : 1);
  ui.grid.setAttribute("data-layer", String(layer));
}

function drawPatch(ui, model, view) {
  const options = model.get("options");
  const nLayers = options.n_layers;
  const gridW = options.grid_size[1];
  const patch = model.get("selected_patch");
  const info = patchInfo(view, patch);
  const layer = model.get("layer");
  let title = "Selected patch: click a patch in the grid or the CAAP map";
  const data = [];
  if (info) {
    const row = Math.floor(patch / gridW);
    const column = patch % gridW;
    title = `Patch ${patch} (row ${row}, column ${column}): effect per layer<br><sub>${exactness(info.exact)}</sub>`;
    data.push({
      x: [...Array(nLayers).keys()], y: info.effects, mode: "lines+markers", name: `patch ${patch}`,
      line: { color: "#b2182b" },
      hovertemplate: `patch ${patch}, layer %{x}<br>effect %{y:.4g}<extra></extra>`,
    });
  }
  const layout = lineLayout(title, "centre layer", `effect on ${view.settings.score}(${view.target_name})`, layer, nLayers);
  Plotly.react(ui.patch, data, layout, PLOT_CONFIG);
  ui.patch.setAttribute("data-patch", info ? String(info.index) : "");
  ui.patch.setAttribute("data-exact", info && info.exact ? "true" : "false");
}

function drawCaap(ui, model, view) {
  const caap = view.caap;
  const patch = model.get("selected_patch");
  const info = patchInfo(view, patch);
  const [start, stop] = view.settings.caap_layers;
  let title = `CAAP map, blocks ${start}\u2013${stop - 1}, ${view.settings.score} of "${view.target_name}"`;
  if (info && info.caap !== null && info.caap !== undefined) title += `: patch ${patch} = ${fmt(info.caap)}`;
  if (caap) title += `<br><sub>${exactness(caap.exact)}</sub>`;
  drawMap(ui.caap, model, view, caap ? caap.map.flat() : null, title, "CAAP", caap ? absMax(caap.map) : 1);
  ui.caap.setAttribute("data-caap", info && info.caap !== null && info.caap !== undefined ? String(info.caap) : "");
}

function bindPlots(ui, model) {
  const gridW = model.get("options").grid_size[1];
  const pick = (event) => {
    const point = event.points && event.points.find((p) => p.data.type === "heatmap");
    if (!point) return;
    setAndSave(model, "selected_patch", point.y * gridW + point.x);
  };
  ui.grid.on("plotly_click", pick);
  ui.caap.on("plotly_click", pick);
  const pickLayer = (event) => {
    const point = event.points && event.points[0];
    if (point) setAndSave(model, "layer", point.x);
  };
  ui.curve.on("plotly_click", pickLayer);
  ui.patch.on("plotly_click", pickLayer);
}

function drawAll(ui, model) {
  const view = model.get("view");
  drawStrip(ui, model);
  drawControls(ui, model);
  drawStatus(ui, model, view);
  drawSettings(ui, view);
  if (!view || !view.settings) return;
  drawViews(ui, model, view);
  ui.root.setAttribute("data-request", String(model.get("request")));
}

// The four plots of a computed view: layer curve, patch grid, patch curve, CAAP map.
function drawViews(ui, model, view) {
  drawCurve(ui, model, view);
  drawGrid(ui, model, view);
  drawPatch(ui, model, view);
  drawCaap(ui, model, view);
}

async function render({ model, el }) {
  const loading = element("div", { className: "vitlens-loading", text: "Loading the explorer (plotly.js)\u2026" });
  el.append(loading);
  await ensurePlotly(model);
  loading.remove();
  const ui = buildUi(el, model);
  bindControls(ui, model);
  for (const node of [ui.curve, ui.grid, ui.patch, ui.caap]) Plotly.newPlot(node, [], { height: 300 }, PLOT_CONFIG);
  drawAll(ui, model);
  bindPlots(ui, model);
  const views = () => {
    const view = model.get("view");
    drawControls(ui, model);
    if (view && view.settings) drawViews(ui, model, view);
  };
  const handlers = {
    "change:view": () => drawAll(ui, model),
    "change:layer": views,
    "change:selected_patch": views,
    "change:busy": () => drawStatus(ui, model, model.get("view")),
    "change:error": () => { drawStatus(ui, model, model.get("view")); drawControls(ui, model); },
    "change:thumbnails": () => drawStrip(ui, model),
    "change:image": () => drawStrip(ui, model),
  };
  for (const [name, handler] of Object.entries(handlers)) model.on(name, handler);
  return () => {
    for (const [name, handler] of Object.entries(handlers)) model.off(name, handler);
    for (const node of [ui.curve, ui.grid, ui.patch, ui.caap]) Plotly.purge(node);
  };
}

// The static export: the same views over precomputed data, with a stand-in for the widget model.
function staticModel(data) {
  const state = { ...data.state, options: data.options, thumbnails: data.thumbnails, busy: false, error: "", static: true };
  state.available_images = Object.keys(data.views).map(Number);
  const listeners = {};
  let changed = [];
  return {
    get(name) { return name === "view" ? data.views[String(state.image)] : state[name]; },
    set(name, value) { state[name] = value; changed.push(name); },
    save_changes() {
      const names = changed;
      changed = [];
      for (const name of names) {
        for (const handler of listeners[`change:${name}`] || []) handler();
        if (name === "image") for (const handler of listeners["change:view"] || []) handler();
      }
    },
    on(name, handler) { (listeners[name] = listeners[name] || []).push(handler); },
    off(name, handler) { listeners[name] = (listeners[name] || []).filter((h) => h !== handler); },
  };
}

function renderStatic(el, data) {
  Plotly = window.Plotly;
  const model = staticModel(data);
  render({ model, el });
  return model;
}

if (typeof window !== "undefined") window.vitlensExplorer = { render, renderStatic };

export default { render };
