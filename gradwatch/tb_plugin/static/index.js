// The "Gradient Flow" tab of gradwatch. TensorBoard loads this ES module in an iframe and calls
// render(). Plain JS, no external resources. Every name from the data goes into the DOM via
// textContent (layer names can contain markup).

const BASE = new URL(".", import.meta.url);
const SEVERITY_COLOURS = { info: "#1e88e5", warning: "#fb8c00", error: "#e53935" };
const MISSING_COLOUR = [238, 238, 238];
const ZERO_COLOUR = [0, 0, 0]; // an exactly-zero gradient norm (a dead layer): black, below the ramp
const NONFINITE_COLOUR = "#d500f9";
const NONFINITE_MIN_WIDTH = 3; // px: a NaN/Inf column stays visible however many windows share a pixel
const RUNS_POLL_MS = 5000; // how often the run list is checked for new or removed runs
const TICK_MIN_GAP = 60; // px between two step labels
const GAP_LINES_MAX_SHARE = 0.25; // more columns after dropped windows than this: the banner says it, no lines
const URL_RUN_KEY = "gw_run"; // the chosen run, kept in the page's URL (#gradwatch&gw_run=...)
const GAP_COLOUR = "#ff1744";
const SEGMENT_COLOUR = "#2962ff";
const MAX_TABLE_ROWS = 1000;
const LABELS_ALLOWANCE = 300; // px kept for the row labels and a scroll bar when asking for columns
// The layer-norm chart: one categorical colour a layer (none is the NaN/Inf magenta); past these,
// hues a golden angle apart.
const LAYER_COLOURS = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f",
  "#393b79", "#e377c2", "#637939", "#843c39",
];
const LINES_HEIGHT = 260; // px of the layer-norm chart's canvas
const LINES_BAND = 14; // px of its NaN/Inf band (top), and the least of its exactly-zero band (bottom)
const ZERO_LANE = 6; // px of one layer's lane in the zero band (the band grows to at most 60 px)
const LINES_HOVER_PX = 10; // a line this close to the pointer is the one the tooltip names
// Viridis, sampled at 10 stops: dark = small gradient norm, yellow = large.
const RAMP = [
  [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37],
];

function el(tag, attrs = {}, text = undefined) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

async function getJson(path, params = {}) {
  const url = new URL(path, BASE);
  for (const [key, value] of Object.entries(params)) url.searchParams.set(key, String(value));
  const response = await fetch(url);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function rampColour(t) {
  const x = Math.min(1, Math.max(0, t)) * (RAMP.length - 1);
  const i = Math.min(RAMP.length - 2, Math.floor(x));
  const f = x - i;
  return RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
}

// -- colour scale: fixed, shared by every run, in decades of the gradient norm --------------------------

function scaleColour(log10, scale) {
  return rampColour((log10 - scale.min) / (scale.max - scale.min));
}

function decadeTicks(scale) {
  const ticks = [];
  for (let d = Math.ceil(scale.min); d <= Math.floor(scale.max); d++) ticks.push(d);
  return ticks;
}

function layerColour(i) {
  if (i < LAYER_COLOURS.length) return LAYER_COLOURS[i];
  const hue = Math.round((i * 137.508) % 360);
  return `hsl(${hue}, 70%, ${i % 2 ? 35 : 50}%)`;
}

function decadeSpan(values) {
  // [lo, hi]: whole decades around every finite log10 norm shown, at least one decade apart
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of values) {
    for (const v of row) {
      if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
  }
  if (lo === Infinity) return [-1, 0];
  lo = Math.floor(lo);
  hi = Math.max(Math.ceil(hi), lo + 1);
  return [lo, hi];
}

function fmtDecade(d) {
  return d === 0 ? "1" : d === 1 ? "10" : `1e${d}`;
}

// -- axes: step ticks at round numbers ----------------------------------------------------------------

function niceStep(span, target) {
  const raw = Math.max(1, span / Math.max(1, target));
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (m * power >= raw) return m * power;
  return 10 * power;
}

function stepTicks(first, last, target) {
  const every = niceStep(last - first, target);
  const ticks = [];
  for (let t = Math.ceil(first / every) * every; t <= last; t += every) ticks.push(t);
  return ticks;
}

// -- the chosen run, kept in the URL of the TensorBoard page (or of this frame) ------------------------

function urlWindow() {
  try {
    return window.parent && window.parent.location.href ? window.parent : window;
  } catch (error) {
    return window; // another origin: keep it in this frame's URL
  }
}

function runFromUrl() {
  const hash = urlWindow().location.hash.replace(/^#/, "");
  for (const part of hash.split("&")) {
    const [key, value] = part.split("=");
    if (key === URL_RUN_KEY && value !== undefined) return decodeURIComponent(value);
  }
  return "";
}

function runToUrl(run) {
  const target = urlWindow();
  const parts = target.location.hash.replace(/^#/, "").split("&")
    .filter((part) => part && !part.startsWith(`${URL_RUN_KEY}=`));
  if (!parts.length) parts.push("gradwatch");
  parts.push(`${URL_RUN_KEY}=${encodeURIComponent(run)}`);
  const url = new URL(target.location.href);
  url.hash = parts.join("&");
  target.history.replaceState(target.history.state, "", url.href);
}

function fmtNorm(log10) {
  return Math.pow(10, log10).toExponential(2);
}

function fmtNumber(value) {
  if (value === null || value === undefined) return "";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value) && Math.abs(value) < 1e6) return String(value);
  const size = Math.abs(value);
  return size !== 0 && (size < 1e-3 || size >= 1e4) ? value.toExponential(2) : value.toPrecision(3);
}

class GradientFlowTab {
  constructor(root) {
    this.root = root;
    this.flow = null;
    this.edges = [];
    this.markerAt = new Map();
    this.nonfiniteAt = new Set();
    this.build();
  }

  build() {
    const bar = el("div", { class: "gw-bar" });
    bar.append(el("h1", {}, "Gradient Flow"));
    const label = el("label", { for: "gw-run" }, "Run ");
    this.select = el("select", { id: "gw-run" });
    label.append(this.select);
    this.reload = el("button", { id: "gw-reload", type: "button" }, "Reload");
    this.status = el("span", { class: "gw-status", id: "gw-status" });
    bar.append(label, this.reload, this.buildZoom(), this.status);
    this.notices = el("div", { id: "gw-notices" });
    this.message = el("div", { class: "gw-message", id: "gw-message", hidden: "" });
    this.section = el("div", { id: "gw-heatmap-section", hidden: "" });
    const plot = el("div", { class: "gw-plot" });
    this.plot = plot;
    this.labels = el("div", { class: "gw-labels", id: "gw-labels" });
    this.wrap = el("div", { class: "gw-canvas-wrap" });
    this.canvas = el("canvas", { id: "gw-heatmap", width: 10, height: 10 });
    this.selection = el("div", { class: "gw-selection", id: "gw-selection", hidden: "" });
    this.axis = el("div", { class: "gw-axis", id: "gw-axis" });
    this.wrap.append(this.canvas, this.selection, this.axis);
    plot.append(this.labels, this.wrap);
    this.legend = el("div", { class: "gw-legend", id: "gw-legend" });
    const help = el(
      "div",
      { class: "gw-status" },
      "Rows: layers, input at the top, output at the bottom. Columns: training steps (one per window). " +
        "Colour: the layer's gradient L2 norm at the window's last step, on one fixed scale for every run. " +
        "Drag across the map to zoom into those steps.",
    );
    this.section.append(help, plot, this.legend, this.buildLines());
    this.alertsTitle = el("h2", { class: "gw-h2" }, "Alerts");
    this.alertsNote = el("div", { class: "gw-status", id: "gw-alerts-note" });
    this.table = el("table", { class: "gw-alerts", id: "gw-alerts" });
    this.tooltip = el("div", { class: "gw-tooltip", id: "gw-tooltip" });
    this.root.append(
      bar, this.notices, this.message, this.section, this.alertsTitle, this.alertsNote, this.table,
      this.tooltip,
    );
    this.select.addEventListener("change", () => this.chooseRun(this.select.value));
    this.reload.addEventListener("click", () => this.start(this.select.value));
    this.canvas.addEventListener("mousemove", (event) => this.hover(event));
    this.canvas.addEventListener("mouseleave", () => this.hideTooltip());
    this.canvas.addEventListener("mousedown", (event) => this.dragStart(event));
    window.addEventListener("mousemove", (event) => this.dragMove(event));
    window.addEventListener("mouseup", (event) => this.dragEnd(event));
    window.addEventListener("resize", () => { if (this.flow) this.draw(); });
  }

  buildLines() {
    // The "Layer norms" chart: one line a layer on a log10 axis, columns aligned with the heatmap's.
    const box = el("div", { id: "gw-lines-section" });
    const help = el(
      "div",
      { class: "gw-status" },
      "One line per layer (its colour in the legend, layers in model order): the gradient L2 norm per " +
        "column of the map above, on a log axis in decades. Exactly-zero norms are bars in the layer's colour " +
        "in the bottom band (a lane a layer), NaN/Inf gradients magenta bars in the top band.",
    );
    const plot = el("div", { class: "gw-plot gw-lines-plot" });
    this.linesPlot = plot;
    this.yAxis = el("div", { class: "gw-yaxis", id: "gw-lines-yaxis" });
    const wrap = el("div", { class: "gw-canvas-wrap" });
    this.linesCanvas = el("canvas", { id: "gw-lines", width: 10, height: LINES_HEIGHT });
    this.linesAxis = el("div", { class: "gw-axis", id: "gw-lines-axis" });
    wrap.append(this.linesCanvas, this.linesAxis);
    plot.append(this.yAxis, wrap);
    this.linesLegend = el("div", { class: "gw-legend", id: "gw-lines-legend" });
    box.append(el("h2", { class: "gw-h2" }, "Layer norms"), help, plot, this.linesLegend);
    this.linesCanvas.addEventListener("mousemove", (event) => this.hoverLines(event));
    this.linesCanvas.addEventListener("mouseleave", () => this.hideTooltip());
    return box;
  }

  // -- zoom into a step range ---------------------------------------------------------------------------

  buildZoom() {
    const box = el("span", { class: "gw-zoom", id: "gw-zoom" });
    this.zoomStart = el("input", { id: "gw-zoom-start", type: "number", min: 0, placeholder: "first" });
    this.zoomEnd = el("input", { id: "gw-zoom-end", type: "number", min: 0, placeholder: "last" });
    this.zoomApply = el("button", { id: "gw-zoom-apply", type: "button" }, "Zoom");
    this.zoomReset = el("button", { id: "gw-zoom-reset", type: "button", disabled: "" }, "All steps");
    box.append(el("span", {}, "Steps "), this.zoomStart, el("span", {}, "–"), this.zoomEnd,
      this.zoomApply, this.zoomReset);
    this.zoomApply.addEventListener("click", () => this.setZoom(this.zoomStart.value, this.zoomEnd.value));
    this.zoomReset.addEventListener("click", () => this.setZoom("", ""));
    for (const input of [this.zoomStart, this.zoomEnd]) {
      input.addEventListener("keydown", (event) => {
        if (event.key === "Enter") this.setZoom(this.zoomStart.value, this.zoomEnd.value);
      });
    }
    return box;
  }

  setZoom(start, end) {
    const toStep = (v) => (v === "" || v === null || v === undefined ? null : Math.round(Number(v)));
    let [a, b] = [toStep(start), toStep(end)];
    if (a !== null && b !== null && a > b) [a, b] = [b, a];
    this.zoom = a === null && b === null ? null : { start: a, end: b };
    return this.loadRun(this.select.value);
  }

  showZoom(flow) {
    const zoom = flow.zoom;
    this.zoomStart.value = zoom && zoom.start !== null ? String(zoom.start) : "";
    this.zoomEnd.value = zoom && zoom.end !== null ? String(zoom.end) : "";
    if (flow.range) {
      this.zoomStart.placeholder = String(flow.range.first);
      this.zoomEnd.placeholder = String(flow.range.last);
    }
    this.zoomReset.disabled = !zoom;
  }

  dragStart(event) {
    if (!this.flow || event.button !== 0) return;
    this.drag = { from: this.cellAt(event).col, x0: event.clientX, moved: false };
    event.preventDefault();
  }

  dragMove(event) {
    if (!this.drag) return;
    const rect = this.canvas.getBoundingClientRect();
    const x1 = Math.min(Math.max(event.clientX, rect.left), rect.right);
    const left = Math.min(this.drag.x0, x1) - rect.left;
    this.drag.moved = Math.abs(x1 - this.drag.x0) > 3;
    Object.assign(this.selection.style, { left: `${left}px`, width: `${Math.abs(x1 - this.drag.x0)}px`,
      height: `${rect.height}px` });
    this.selection.hidden = !this.drag.moved;
  }

  dragEnd(event) {
    const drag = this.drag;
    this.drag = null;
    this.selection.hidden = true;
    if (!drag || !drag.moved || !this.flow) return;
    const to = this.cellAt(event).col;
    const [a, b] = [Math.min(drag.from, to), Math.max(drag.from, to)];
    this.setZoom(this.flow.first_steps[a], this.flow.steps[b]);
  }

  setState(state) {
    this.root.dataset.state = state;
  }

  showMessage(parts) {
    this.message.replaceChildren();
    for (const part of parts) {
      this.message.append(typeof part === "string" ? document.createTextNode(part) : part);
    }
    this.message.hidden = false;
  }

  notice(text, info = false) {
    const node = el("div", { class: info ? "gw-notice gw-info" : "gw-notice" }, text);
    this.notices.append(node);
    return node;
  }

  // -- the run list: TensorBoard's runs, refreshed while the tab is open --------------------------------

  async start(preferred = "") {
    this.setState("loading");
    this.status.textContent = "Loading runs…";
    let runs;
    try {
      runs = (await getJson("runs")).runs;
    } catch (error) {
      this.status.textContent = "";
      this.showMessage([`Could not list the gradwatch runs: ${error.message}`]);
      this.setState("error");
      return;
    }
    this.fillRuns(runs);
    this.pollRuns();
    if (!runs.length) {
      this.status.textContent = "";
      this.section.hidden = true;
      this.showMessage([
        "No run in this log directory has gradwatch data. Train with ",
        el("code", {}, "gw.GradientMonitor(log_dir=...)"),
        " (or ",
        el("code", {}, "gw.Watch"),
        ") and point TensorBoard's ",
        el("code", {}, "--logdir"),
        " at that directory or one of its parents.",
      ]);
      this.setState("empty");
      return;
    }
    const names = runs.map((r) => r.run);
    const wanted = preferred || runFromUrl();
    const run = names.includes(wanted) ? wanted : names[0];
    this.select.value = run;
    await this.loadRun(run);
  }

  fillRuns(runs) {
    this.lastSteps = new Map(runs.map((r) => [r.run, r.last_step]));
    const current = this.select.value;
    this.select.replaceChildren();
    for (const { run } of runs) this.select.append(el("option", { value: run }, run));
    if (runs.some((r) => r.run === current)) this.select.value = current;
    this.root.dataset.runs = String(runs.length);
  }

  pollRuns() {
    if (this.poller) return;
    this.poller = setInterval(() => this.refreshRuns(), RUNS_POLL_MS);
  }

  async refreshRuns() {
    if (this.root.dataset.state === "loading") return;
    let runs;
    try {
      runs = (await getJson("runs")).runs;
    } catch (error) {
      return; // TensorBoard is reloading or gone: try again at the next tick
    }
    const before = this.lastSteps || new Map();
    const current = this.select.value;
    const same = runs.length === before.size && runs.every((r) => before.has(r.run));
    const grown = runs.some((r) => r.run === current && r.last_step !== before.get(r.run));
    if (same && !grown) return;
    if (!before.size || !runs.some((r) => r.run === current)) {
      await this.start(); // the first run appeared, or the one shown was removed
      return;
    }
    this.fillRuns(runs);
    if (grown) await this.loadRun(current, true);
  }

  chooseRun(run) {
    this.zoom = null;
    return this.loadRun(run);
  }

  maxCols() {
    // One column per canvas pixel at most; the row labels (at most 22em) take the rest.
    const width = Math.floor((this.plot.clientWidth || this.root.clientWidth || 0) - LABELS_ALLOWANCE);
    return width > 0 ? Math.max(50, Math.min(1000, width)) : 1000;
  }

  async loadRun(run, keepPointer = false) {
    // keepPointer: the same run grew; the tooltip comes back on the redrawn map
    const pointer = keepPointer ? this.pointer : null;
    this.setState("loading");
    this.root.dataset.run = run;
    this.hideTooltip();
    this.pointer = pointer;
    try {
      runToUrl(run);
    } catch (error) {
      // a URL that cannot be rewritten (a sandboxed frame) only loses the bookmark
    }
    this.status.textContent = `Loading ${run}…`;
    let flow, alerts;
    const params = { run, max_cols: this.maxCols() };
    if (this.zoom && this.zoom.start !== null) params.start = this.zoom.start;
    if (this.zoom && this.zoom.end !== null) params.end = this.zoom.end;
    try {
      [flow, alerts] = await Promise.all([getJson("flow", params), getJson("alerts", { run })]);
    } catch (error) {
      this.notices.replaceChildren();
      this.status.textContent = "";
      this.section.hidden = true;
      this.showMessage([`Could not load run ${run}: ${error.message}`]);
      this.setState("error");
      return;
    }
    if (this.select.value !== run) return; // a newer selection is loading
    this.notices.replaceChildren();
    this.message.hidden = true;
    this.flow = flow;
    this.showZoom(flow);
    this.showNotices(flow);
    this.renderAlerts(alerts);
    if (!flow.windows || !flow.layers.length) {
      this.section.hidden = true;
      this.showMessage(flow.zoom ? [`Run ${run} has no window in steps ${flow.zoom.start ?? "…"}–` +
        `${flow.zoom.end ?? "…"}; press "All steps".`] : [
        `Run ${run} has no gradwatch windows yet. `,
        "gradwatch writes one every log_every steps; press Reload once training has run that long.",
      ]);
      this.status.textContent = "";
      this.setState("ready");
      return;
    }
    this.section.hidden = false;
    this.draw();
    const shown = flow.downsampled ? `, ${flow.steps.length} columns` : "";
    this.status.textContent =
      `${flow.layers.length} layers × ${flow.windows} windows${shown}, ${flow.alerts} alerts`;
    this.setState("ready");
    if (this.pointer) this.hover(this.pointer);
  }

  showNotices(flow) {
    if (flow.divergence) {
      const d = flow.divergence;
      const node = this.notice(
        `Diverged at step ${d.step}, never recovered: every step from ${d.step} to the last ` +
          `(${d.last_step}) had NaN/Inf gradients.`,
      );
      node.id = "gw-diverged";
      node.classList.add("gw-diverged");
    }
    const dropped = flow.dropped;
    if (dropped.gaps > 0 || dropped.leading_missing_steps > 0) {
      const parts = [];
      if (dropped.gaps > 0) {
        parts.push(`${dropped.gaps} gap(s) between windows (${dropped.missing_steps} steps missing)`);
      }
      const lead = dropped.leading_missing_steps;
      if (lead > 0) parts.push(lead === 1 ? "step 1 is not in the data" : `steps 1–${lead} are not in the data`);
      const node = el("div", { class: "gw-notice gw-dropped", id: "gw-dropped", role: "alert" });
      const whole = flow.alerts_source !== "windows";
      node.append(
        el("div", { class: "gw-dropped-head" },
          `TensorBoard kept only ${dropped.kept_windows} of about ${dropped.expected_windows} windows ` +
            "of this run: the map shows a sample."),
        el("div", {}, `Samples were dropped: ${parts.join("; ")}. ` + (whole
          ? `The alerts below are all of them (read from ${flow.alerts_source}).`
          : "Alerts in the dropped windows are missing too.")),
        el("div", {}, dropped.advice),
      );
      this.notices.prepend(node);
    }
    if (dropped.corrupt > 0) {
      this.notice(`${dropped.corrupt} window summaries could not be read and were skipped.`);
    }
    if (flow.downsampled) {
      const d = flow.downsampled;
      this.notice(
        `${d.windows} windows shown in ${d.columns} columns: each column shows the largest norm of ` +
          `about ${d.per_column.toFixed(1)} windows; alerts stay on their column.`,
        true,
      );
    }
  }

  draw() {
    const flow = this.flow;
    const rows = flow.layers.length;
    const cols = flow.steps.length;
    const rowH = rows <= 30 ? 20 : rows <= 80 ? 14 : 12;
    this.labels.replaceChildren();
    flow.layers.forEach((name, i) => {
      const label = el("div", { class: "gw-row-label", "data-row": i }, name);
      label.style.height = `${rowH}px`;
      label.style.lineHeight = `${rowH}px`;
      label.title = name;
      this.labels.append(label);
    });
    const avail = Math.floor(this.plot.clientWidth - this.labels.offsetWidth - 20);
    const width = Math.max(cols, avail > 0 ? avail : 1000);
    const height = rows * rowH;
    const canvas = this.canvas;
    canvas.width = width;
    canvas.height = height;
    canvas.style.width = `${width}px`;
    canvas.style.height = `${height}px`;
    this.rowH = rowH;
    this.edges = Array.from({ length: cols + 1 }, (_, c) => Math.floor((c * width) / cols));
    canvas.dataset.rows = String(rows);
    canvas.dataset.cols = String(cols);
    canvas.dataset.rowHeight = String(rowH);
    canvas.dataset.colEdges = this.edges.join(",");

    this.scale = flow.scale || { min: -8, max: 4 };
    const zeros = new Set(flow.zeros.map(([r, c]) => r * cols + c));
    this.zeroAt = zeros;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(width, height);
    const px = image.data;
    for (let r = 0; r < rows; r++) {
      const values = flow.values[r];
      for (let c = 0; c < cols; c++) {
        const v = values[c];
        const rgb = v !== null ? scaleColour(v, this.scale) : zeros.has(r * cols + c) ? ZERO_COLOUR : MISSING_COLOUR;
        for (let y = r * rowH; y < (r + 1) * rowH - (rowH >= 12 ? 1 : 0); y++) {
          for (let x = this.edges[c]; x < this.edges[c + 1]; x++) {
            const o = (y * width + x) * 4;
            px[o] = rgb[0]; px[o + 1] = rgb[1]; px[o + 2] = rgb[2]; px[o + 3] = 255;
          }
        }
      }
    }
    ctx.putImageData(image, 0, 0);

    ctx.fillStyle = GAP_COLOUR;
    this.gapLines = flow.gap_columns.length <= GAP_LINES_MAX_SHARE * cols;
    if (this.gapLines) for (const c of flow.gap_columns) ctx.fillRect(this.edges[c], 0, 1, height);
    ctx.fillStyle = SEGMENT_COLOUR; // a new segment: the optimizer restarted or the variables changed
    for (const s of flow.segments || []) ctx.fillRect(this.edges[s.column], 0, 2, height);

    this.markerAt = new Map();
    for (const marker of flow.markers) {
      const [r, c, rank, count, kinds] = marker;
      this.markerAt.set(r * cols + c, marker);
      const colour = SEVERITY_COLOURS[flow.severities[rank]] || SEVERITY_COLOURS.warning;
      const [x, w] = this.cellSpan(c, NONFINITE_MIN_WIDTH + 4);
      ctx.strokeStyle = colour;
      ctx.lineWidth = 2;
      if (r < 0) {
        ctx.setLineDash([4, 3]);
        ctx.strokeRect(x + 1, 1, w - 2, height - 2);
        ctx.setLineDash([]);
      } else {
        ctx.strokeRect(x + 1, r * rowH + 1, w - 2, rowH - 2);
      }
    }
    canvas.dataset.markers = String(flow.markers.length);

    // NaN/Inf cells last, at least NONFINITE_MIN_WIDTH px wide: above the outline of their alert
    this.nonfiniteAt = new Set();
    ctx.fillStyle = NONFINITE_COLOUR;
    for (const [r, c] of flow.nonfinite) {
      this.nonfiniteAt.add(r * cols + c);
      const [x, w] = this.cellSpan(c, NONFINITE_MIN_WIDTH);
      ctx.fillRect(x, r * rowH + 2, w, rowH - 4);
    }

    this.drawAxis(this.axis, width);
    this.drawLegend();
    this.drawLines(width);
    if (this.pointer && this.root.dataset.state === "ready") this.hover(this.pointer); // a resize
  }

  cellSpan(c, minWidth) {
    // [x, width] of column c, widened about its centre to at least minWidth px (inside the canvas)
    const x0 = this.edges[c];
    const w0 = this.edges[c + 1] - x0;
    if (w0 >= minWidth) return [x0, w0];
    const x = Math.max(0, Math.min(this.canvas.width - minWidth, Math.round(x0 + w0 / 2 - minWidth / 2)));
    return [x, minWidth];
  }

  drawAxis(axis, width) {
    // Tick marks at round step numbers, placed on the column that holds the step.
    const flow = this.flow;
    const cols = flow.steps.length;
    axis.replaceChildren();
    axis.style.width = `${width}px`;
    const first = flow.first_steps[0];
    const last = flow.steps[cols - 1];
    const ticks = stepTicks(first, last, Math.max(2, Math.floor(width / 90)));
    const xOf = (step) => {
      let lo = 0;
      let hi = cols - 1;
      while (lo < hi) { // the first column whose last step is >= step
        const mid = (lo + hi) >> 1;
        if (flow.steps[mid] >= step) hi = mid; else lo = mid + 1;
      }
      const span = Math.max(1, flow.steps[lo] - flow.first_steps[lo] + 1);
      const within = Math.min(1, Math.max(0, (step - flow.first_steps[lo] + 0.5) / span));
      return this.edges[lo] + within * (this.edges[lo + 1] - this.edges[lo]);
    };
    const shown = [];
    let lastX = -Infinity;
    for (const step of ticks) {
      const x = xOf(step);
      if (x - lastX < TICK_MIN_GAP) continue; // steps TensorBoard dropped put ticks on one column
      lastX = x;
      shown.push(step);
      const tick = el("span", { class: "gw-tick", "data-step": step }, step.toLocaleString("en-US"));
      tick.style.left = `${x}px`;
      axis.append(tick);
    }
    axis.append(el("span", { class: "gw-axis-title" }, "training step →"));
    axis.dataset.ticks = shown.join(",");
  }

  // -- the layer-norm chart ------------------------------------------------------------------------------

  linesY(v) {
    // canvas y of a log10 norm: the decades between the NaN/Inf band and the zero band
    const [lo, hi] = this.linesSpan;
    const top = LINES_BAND + 6;
    const bottom = LINES_HEIGHT - this.zeroBand - 12;
    return bottom - ((v - lo) / (hi - lo)) * (bottom - top);
  }

  colX(c) {
    return (this.edges[c] + this.edges[c + 1]) / 2;
  }

  drawLines(width) {
    const flow = this.flow;
    const canvas = this.linesCanvas;
    canvas.width = width;
    canvas.style.width = `${width}px`;
    canvas.style.height = `${LINES_HEIGHT}px`;
    this.yAxis.style.width = `${this.labels.offsetWidth}px`;
    this.linesSpan = decadeSpan(flow.values);
    this.lineColours = flow.layers.map((_, i) => layerColour(i));
    // each layer with an exactly-zero norm gets its own lane in the bottom band, in model order
    this.zeroLanes = [...new Set(flow.zeros.map(([r]) => r))].sort((a, b) => a - b);
    this.zeroBand = Math.min(60, Math.max(LINES_BAND, this.zeroLanes.length * ZERO_LANE));
    canvas.dataset.zeroBand = String(this.zeroBand);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, LINES_HEIGHT);
    this.drawDecades(ctx, width);
    let drawn = 0;
    flow.values.forEach((row, r) => { if (this.drawLine(ctx, row, this.lineColours[r])) drawn += 1; });
    this.drawLineBands(ctx);
    canvas.dataset.lines = String(drawn);
    canvas.dataset.colours = JSON.stringify(this.lineColours);
    this.drawAxis(this.linesAxis, width);
    this.drawLinesLegend();
  }

  drawDecades(ctx, width) {
    // a grid line and a label at every decade; labels thinned when the decades are close
    const [lo, hi] = this.linesSpan;
    const every = Math.max(1, Math.ceil((hi - lo) / 10));
    this.yAxis.replaceChildren();
    const labelled = [];
    ctx.lineWidth = 1;
    for (let d = lo; d <= hi; d++) {
      const y = Math.round(this.linesY(d)) + 0.5;
      ctx.strokeStyle = (d - lo) % every === 0 ? "#e0e0e0" : "#f3f3f3";
      ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(width, y); ctx.stroke();
      if ((d - lo) % every !== 0) continue;
      labelled.push(d);
      const label = el("span", { class: "gw-ytick", "data-decade": d }, fmtDecade(d));
      label.style.top = `${y}px`;
      this.yAxis.append(label);
    }
    const band = (text, y) => {
      const label = el("span", { class: "gw-ytick gw-yband" }, text);
      label.style.top = `${y}px`;
      this.yAxis.append(label);
    };
    band("NaN/Inf", LINES_BAND / 2);
    band("= 0", LINES_HEIGHT - this.zeroBand / 2);
    ctx.fillStyle = "#fafafa";
    ctx.fillRect(0, 0, width, LINES_BAND);
    ctx.fillRect(0, LINES_HEIGHT - this.zeroBand, width, this.zeroBand);
    this.linesCanvas.dataset.yTicks = labelled.join(",");
  }

  drawLine(ctx, row, colour) {
    // one layer's line; it breaks where a column has no finite norm; a lone point is a dot
    ctx.strokeStyle = colour;
    ctx.fillStyle = colour;
    ctx.lineWidth = 2;
    ctx.lineJoin = "round";
    let any = false;
    ctx.beginPath();
    for (let c = 0; c < row.length; c++) {
      const v = row[c];
      if (v === null) continue;
      any = true;
      const [x, y] = [this.colX(c), this.linesY(v)];
      const prevGone = c === 0 || row[c - 1] === null;
      if (prevGone) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      if (prevGone && (c === row.length - 1 || row[c + 1] === null)) ctx.fillRect(x - 2, y - 2, 4, 4);
    }
    ctx.stroke();
    return any;
  }

  drawLineBands(ctx) {
    // exactly-zero norms: a bar in the layer's colour in its lane of the bottom band; NaN/Inf: magenta
    // at the top
    const flow = this.flow;
    const lane = this.zeroBand / Math.max(1, this.zeroLanes.length);
    for (const [r, c] of flow.zeros) {
      const w = Math.max(NONFINITE_MIN_WIDTH, this.edges[c + 1] - this.edges[c] - 1);
      const y = LINES_HEIGHT - this.zeroBand + this.zeroLanes.indexOf(r) * lane;
      ctx.fillStyle = this.lineColours[r];
      ctx.fillRect(Math.round(this.colX(c) - w / 2), Math.round(y + 1), w, Math.max(1, Math.round(lane) - 2));
    }
    ctx.fillStyle = NONFINITE_COLOUR;
    for (const [, c] of flow.nonfinite) {
      const w = Math.max(NONFINITE_MIN_WIDTH, this.edges[c + 1] - this.edges[c]);
      ctx.fillRect(Math.round(this.colX(c) - w / 2), 1, w, LINES_BAND - 2);
    }
  }

  drawLinesLegend() {
    const flow = this.flow;
    this.linesLegend.replaceChildren();
    flow.layers.forEach((name, i) => {
      const span = el("span", { class: "gw-line-key", "data-layer": i });
      const swatch = el("span", { class: "gw-swatch gw-line-swatch" });
      swatch.style.background = this.lineColours[i];
      span.append(swatch, document.createTextNode(name));
      this.linesLegend.append(span);
    });
    const zero = el("span", {}, "bars in the bottom band (a lane a layer): exactly 0");
    const nonfinite = el("span");
    const swatch = el("span", { class: "gw-swatch" });
    swatch.style.background = NONFINITE_COLOUR;
    nonfinite.append(swatch, document.createTextNode("NaN/Inf gradient"));
    this.linesLegend.append(zero, nonfinite);
  }

  hoverLines(event) {
    // the layer whose line (or band mark) is nearest the pointer in the pointer's column
    const flow = this.flow;
    if (!flow || this.root.dataset.state === "loading") return;
    const rect = this.linesCanvas.getBoundingClientRect();
    const col = this.colAtX(((event.clientX - rect.left) * this.linesCanvas.width) / rect.width);
    this.pointer = null; // a redraw brings back the heatmap's tooltip only
    const y = ((event.clientY - rect.top) * LINES_HEIGHT) / rect.height;
    const first = flow.first_steps[col];
    const last = flow.steps[col];
    const where = first === last ? `step: ${last}` : `steps: ${first}–${last}`;
    let lines = [];
    if (y < LINES_BAND + 3) {
      const names = flow.nonfinite.filter(([, c]) => c === col).map(([r]) => flow.layers[r]);
      if (names.length) lines = [`NaN/Inf gradient: ${names.join(", ")}`, where];
    } else if (y > LINES_HEIGHT - this.zeroBand) {
      const lane = this.zeroBand / Math.max(1, this.zeroLanes.length);
      const r = this.zeroLanes[Math.floor((y - (LINES_HEIGHT - this.zeroBand)) / lane)];
      if (flow.zeros.some(([zr, c]) => zr === r && c === col)) {
        lines = [`layer: ${flow.layers[r]}`, where, "gradient norm: exactly 0 (no gradient reaches this layer)"];
      }
    } else {
      let best = null;
      flow.values.forEach((row, r) => {
        const v = row[col];
        const dist = v === null ? Infinity : Math.abs(this.linesY(v) - y);
        if (dist <= LINES_HOVER_PX && (!best || dist < best.dist)) best = { r, v, dist };
      });
      if (best) {
        lines = [`layer: ${flow.layers[best.r]}`, where,
          `gradient norm: ${fmtNorm(best.v)} (log10 ${best.v.toFixed(3)})`];
      }
    }
    if (!lines.length) {
      this.tooltip.style.display = "none";
      return;
    }
    this.tooltip.textContent = lines.join("\n");
    this.tooltip.dataset.run = flow.run;
    this.tooltip.style.display = "block";
    this.tooltip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 320)}px`;
    this.tooltip.style.top = `${event.clientY + 14}px`;
  }

  drawLegend() {
    // The fixed colour scale with a label at every decade, then the colours that are not norms.
    this.legend.replaceChildren();
    const scale = this.scale;
    const W = 360;
    const box = el("span", { class: "gw-scale", id: "gw-scale" });
    const bar = el("canvas", { width: W, height: 12, id: "gw-legend-bar" });
    const ctx = bar.getContext("2d");
    for (let x = 0; x < W; x++) {
      const [r, g, b] = rampColour(x / (W - 1));
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x, 0, 1, 12);
    }
    const labels = el("span", { class: "gw-scale-labels" });
    labels.style.width = `${W}px`;
    for (const d of decadeTicks(scale)) {
      const label = el("span", { class: "gw-scale-tick" },
        d === scale.min ? `≤${fmtDecade(d)}` : d === scale.max ? `≥${fmtDecade(d)}` : fmtDecade(d));
      label.style.left = `${((d - scale.min) / (scale.max - scale.min)) * (W - 1)}px`;
      labels.append(label);
    }
    box.append(bar, labels);
    const swatch = (style, cls = "gw-swatch") => {
      const node = el("span", { class: cls });
      Object.assign(node.style, style);
      return node;
    };
    const item = (node, text) => {
      const span = el("span");
      span.append(node, document.createTextNode(text));
      return span;
    };
    this.legend.append(
      el("span", {}, "gradient norm ‖g‖"),
      box,
      item(swatch({ background: `rgb(${ZERO_COLOUR.join(",")})` }), "exactly 0 (dead)"),
      item(swatch({ background: `rgb(${MISSING_COLOUR.join(",")})`, border: "1px solid #bdbdbd" }), "no data"),
      item(swatch({ background: NONFINITE_COLOUR }), "NaN/Inf gradient"),
    );
    if (this.flow.gap_columns.length && this.gapLines) {
      this.legend.append(item(swatch({ background: GAP_COLOUR, width: "2px" }), "windows dropped before"));
    }
    if ((this.flow.segments || []).length) {
      this.legend.append(item(swatch({ background: SEGMENT_COLOUR, width: "2px" }), "new segment (fit restarted)"));
    }
    for (const severity of this.flow.severities) {
      const outline = swatch({ borderColor: SEVERITY_COLOURS[severity] }, "gw-swatch gw-outline");
      this.legend.append(item(outline, `${severity} alert`));
    }
  }

  cellAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) * this.canvas.width) / rect.width;
    const y = ((event.clientY - rect.top) * this.canvas.height) / rect.height;
    return { row: Math.floor(y / this.rowH), col: this.colAtX(x) };
  }

  colAtX(x) {
    // the column under canvas x (the heatmap and the layer-norm chart share the column edges)
    let lo = 0;
    let hi = this.edges.length - 2;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.edges[mid] <= x) lo = mid; else hi = mid - 1;
    }
    return lo;
  }

  hideTooltip() {
    this.pointer = null;
    this.tooltip.style.display = "none";
  }

  hover(event) {
    // Always from the run drawn now: after a run change the tooltip is rebuilt from this.flow.
    const flow = this.flow;
    if (!flow || this.root.dataset.state === "loading") return;
    this.pointer = { clientX: event.clientX, clientY: event.clientY };
    const { row, col } = this.cellAt(event);
    if (row < 0 || row >= flow.layers.length || col < 0 || col >= flow.steps.length) {
      this.tooltip.style.display = "none";
      return;
    }
    const cols = flow.steps.length;
    const first = flow.first_steps[col];
    const last = flow.steps[col];
    const value = flow.values[row][col];
    const lines = [
      `layer: ${flow.layers[row]}`,
      first === last ? `step: ${last}` : `steps: ${first}–${last}`,
      value !== null ? `gradient norm: ${fmtNorm(value)} (log10 ${value.toFixed(3)})`
        : this.zeroAt.has(row * cols + col) ? "gradient norm: exactly 0 (no gradient reaches this layer)"
          : "gradient norm: no data (absent or non-finite)",
    ];
    if (this.nonfiniteAt.has(row * cols + col)) lines.push("non-finite (NaN/Inf) gradient entries");
    if (flow.gap_columns.includes(col)) lines.push("windows were dropped just before this column");
    for (const s of (flow.segments || []).filter((s) => s.column === col)) {
      lines.push(`segment ${s.segment} begins at step ${s.first_step} (${String(s.reason).replace(/_/g, " ")})`);
    }
    for (const marker of [this.markerAt.get(row * cols + col), this.markerAt.get(-cols + col)]) {
      if (marker) {
        const scope = marker[0] < 0 ? " (whole model)" : "";
        lines.push(`alert${scope}: ${marker[4].join(", ")} ×${marker[3]} [${flow.severities[marker[2]]}]`);
      }
    }
    this.tooltip.textContent = lines.join("\n");
    this.tooltip.dataset.run = flow.run;
    this.tooltip.style.display = "block";
    this.tooltip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 320)}px`;
    this.tooltip.style.top = `${event.clientY + 14}px`;
  }

  renderAlerts(alerts) {
    this.table.replaceChildren();
    const rows = alerts.rows;
    if (!rows.length) {
      this.alertsNote.textContent = "No alerts in this run.";
      return;
    }
    const shown = rows.slice(0, MAX_TABLE_ROWS); // in step order: the first problem first
    this.alertsNote.textContent = rows.length > shown.length
      ? `${rows.length} alerts; the first ${shown.length} are listed.` : `${rows.length} alerts.`;
    const columns = ["step", "layer", "variable", "kind", "severity", "value", "threshold", "message", "hint"];
    const index = Object.fromEntries(alerts.columns.map((c, i) => [c, i]));
    const head = el("tr");
    for (const c of columns) head.append(el("th", {}, c));
    const thead = el("thead");
    thead.append(head);
    const tbody = el("tbody");
    for (const row of shown) {
      const tr = el("tr", { class: "gw-alert-row" });
      for (const c of columns) {
        const value = row[index[c]];
        const numeric = c === "step" || c === "value" || c === "threshold";
        const td = el("td", numeric ? { class: "gw-num" } : {}, fmtNumber(value));
        if (c === "severity") td.className = `gw-sev-${value}`;
        td.dataset.col = c;
        tr.append(td);
      }
      tbody.append(tr);
    }
    this.table.append(thead, tbody);
  }
}

export async function render() {
  const style = el("link", { rel: "stylesheet", href: new URL("static/style.css", BASE).href });
  document.head.append(style);
  const root = el("div", { class: "gw-root", id: "gw-root" });
  document.body.append(root);
  const tab = new GradientFlowTab(root);
  await tab.start();
}
