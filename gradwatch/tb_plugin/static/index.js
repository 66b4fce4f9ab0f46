// The "Gradient Flow" tab of gradwatch. TensorBoard loads this ES module in an iframe and calls
// render(). Plain JS, no external resources. Every name from the data goes into the DOM via
// textContent (layer names can contain markup).

const BASE = new URL(".", import.meta.url);
const SEVERITY_COLOURS = { info: "#1e88e5", warning: "#fb8c00", error: "#e53935" };
const MISSING_COLOUR = [238, 238, 238];
const NONFINITE_COLOUR = "#d500f9";
const GAP_COLOUR = "#ff1744";
const SEGMENT_COLOUR = "#2962ff";
const MAX_TABLE_ROWS = 1000;
const LABELS_ALLOWANCE = 300; // px kept for the row labels and a scroll bar when asking for columns
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
    bar.append(label, this.reload, this.status);
    this.notices = el("div", { id: "gw-notices" });
    this.message = el("div", { class: "gw-message", id: "gw-message", hidden: "" });
    this.section = el("div", { id: "gw-heatmap-section", hidden: "" });
    const plot = el("div", { class: "gw-plot" });
    this.plot = plot;
    this.labels = el("div", { class: "gw-labels", id: "gw-labels" });
    this.wrap = el("div", { class: "gw-canvas-wrap" });
    this.canvas = el("canvas", { id: "gw-heatmap", width: 10, height: 10 });
    this.wrap.append(this.canvas);
    plot.append(this.labels, this.wrap);
    this.axis = el("div", { class: "gw-axis", id: "gw-axis" });
    this.legend = el("div", { class: "gw-legend", id: "gw-legend" });
    const help = el(
      "div",
      { class: "gw-status" },
      "Rows: layers, input at the top, output at the bottom. Columns: training steps (one per window). " +
        "Colour: log10 of the layer's gradient L2 norm at the window's last step.",
    );
    this.section.append(help, plot, this.axis, this.legend);
    this.alertsTitle = el("h2", { class: "gw-h2" }, "Alerts");
    this.alertsNote = el("div", { class: "gw-status", id: "gw-alerts-note" });
    this.table = el("table", { class: "gw-alerts", id: "gw-alerts" });
    this.tooltip = el("div", { class: "gw-tooltip", id: "gw-tooltip" });
    this.root.append(
      bar, this.notices, this.message, this.section, this.alertsTitle, this.alertsNote, this.table,
      this.tooltip,
    );
    this.select.addEventListener("change", () => this.loadRun(this.select.value));
    this.reload.addEventListener("click", () => this.start(this.select.value));
    this.canvas.addEventListener("mousemove", (event) => this.hover(event));
    this.canvas.addEventListener("mouseleave", () => { this.tooltip.style.display = "none"; });
    window.addEventListener("resize", () => { if (this.flow) this.draw(); });
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
    this.select.replaceChildren();
    for (const { run } of runs) this.select.append(el("option", { value: run }, run));
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
    const run = names.includes(preferred) ? preferred : names[0];
    this.select.value = run;
    await this.loadRun(run);
  }

  maxCols() {
    // One column per canvas pixel at most; the row labels (at most 22em) take the rest.
    const width = Math.floor((this.plot.clientWidth || this.root.clientWidth || 0) - LABELS_ALLOWANCE);
    return width > 0 ? Math.max(50, Math.min(1000, width)) : 1000;
  }

  async loadRun(run) {
    this.setState("loading");
    this.root.dataset.run = run;
    this.status.textContent = `Loading ${run}…`;
    this.notices.replaceChildren();
    this.message.hidden = true;
    let flow, alerts;
    try {
      [flow, alerts] = await Promise.all([
        getJson("flow", { run, max_cols: this.maxCols() }),
        getJson("alerts", { run }),
      ]);
    } catch (error) {
      this.status.textContent = "";
      this.section.hidden = true;
      this.showMessage([`Could not load run ${run}: ${error.message}`]);
      this.setState("error");
      return;
    }
    if (this.select.value !== run) return; // a newer selection is loading
    this.flow = flow;
    this.showNotices(flow);
    this.renderAlerts(alerts);
    if (!flow.windows || !flow.layers.length) {
      this.section.hidden = true;
      this.showMessage([
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
      const node = this.notice(`Samples were dropped: ${parts.join("; ")}. ${dropped.advice}`);
      node.id = "gw-dropped";
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

    let vmin = flow.vmin ?? 0;
    let vmax = flow.vmax ?? 0;
    if (vmax - vmin < 1e-9) { vmin -= 1; vmax += 1; }
    this.vmin = vmin;
    this.vmax = vmax;
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(width, height);
    const px = image.data;
    for (let r = 0; r < rows; r++) {
      const values = flow.values[r];
      for (let c = 0; c < cols; c++) {
        const v = values[c];
        const rgb = v === null ? MISSING_COLOUR : rampColour((v - vmin) / (vmax - vmin));
        for (let y = r * rowH; y < (r + 1) * rowH - (rowH >= 12 ? 1 : 0); y++) {
          for (let x = this.edges[c]; x < this.edges[c + 1]; x++) {
            const o = (y * width + x) * 4;
            px[o] = rgb[0]; px[o + 1] = rgb[1]; px[o + 2] = rgb[2]; px[o + 3] = 255;
          }
        }
      }
    }
    ctx.putImageData(image, 0, 0);

    this.nonfiniteAt = new Set();
    ctx.fillStyle = NONFINITE_COLOUR;
    for (const [r, c] of flow.nonfinite) {
      this.nonfiniteAt.add(r * cols + c);
      ctx.fillRect(this.edges[c], r * rowH, Math.max(1, this.edges[c + 1] - this.edges[c]), rowH - 1);
    }

    ctx.fillStyle = GAP_COLOUR;
    for (const c of flow.gap_columns) ctx.fillRect(this.edges[c], 0, 1, height);
    ctx.fillStyle = SEGMENT_COLOUR; // a new segment: the optimizer restarted or the variables changed
    for (const s of flow.segments || []) ctx.fillRect(this.edges[s.column], 0, 2, height);

    this.markerAt = new Map();
    for (const marker of flow.markers) {
      const [r, c, rank, count, kinds] = marker;
      this.markerAt.set(r * cols + c, marker);
      const colour = SEVERITY_COLOURS[flow.severities[rank]] || SEVERITY_COLOURS.warning;
      const x = this.edges[c];
      const w = Math.max(3, this.edges[c + 1] - x);
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

    const first = flow.first_steps[0];
    const last = flow.steps[cols - 1];
    this.axis.replaceChildren(el("span", {}, `step ${first}`), el("span", {}, "training step →"),
      el("span", {}, `step ${last}`));
    this.drawLegend();
  }

  drawLegend() {
    this.legend.replaceChildren();
    const bar = el("canvas", { width: 220, height: 12, id: "gw-legend-bar" });
    const ctx = bar.getContext("2d");
    for (let x = 0; x < 220; x++) {
      const [r, g, b] = rampColour(x / 219);
      ctx.fillStyle = `rgb(${r},${g},${b})`;
      ctx.fillRect(x, 0, 1, 12);
    }
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
      el("span", {}, `‖g‖ ${fmtNorm(this.vmin)} (log10 ${this.vmin.toFixed(2)})`),
      bar,
      el("span", {}, `${fmtNorm(this.vmax)} (log10 ${this.vmax.toFixed(2)})`),
      item(swatch({ background: `rgb(${MISSING_COLOUR.join(",")})` }), "no data / zero"),
      item(swatch({ background: NONFINITE_COLOUR }), "NaN/Inf gradient"),
    );
    if (this.flow.gap_columns.length) {
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
    const row = Math.floor(y / this.rowH);
    let lo = 0;
    let hi = this.edges.length - 2;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.edges[mid] <= x) lo = mid; else hi = mid - 1;
    }
    return { row, col: lo };
  }

  hover(event) {
    const flow = this.flow;
    if (!flow) return;
    const { row, col } = this.cellAt(event);
    if (row < 0 || row >= flow.layers.length) {
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
      value === null ? "gradient norm: no data (absent, zero or non-finite)"
        : `gradient norm: ${fmtNorm(value)} (log10 ${value.toFixed(3)})`,
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
    const shown = rows.slice(-MAX_TABLE_ROWS);
    this.alertsNote.textContent = rows.length > shown.length
      ? `${rows.length} alerts; the latest ${shown.length} are listed.` : `${rows.length} alerts.`;
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
