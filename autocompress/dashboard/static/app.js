/* autocompress dashboard: renders the JSON the server computes (rows, fronts, hypervolume and
 * every comparison with fp32 come from autocompress.results); polls it every 2 s.
 * No external resources: Plotly comes from /vendor/plotly.min.js served by the app. */
"use strict";

(function () {
  const POLL_MS = 2000;
  const GREY = "#b8bec8";
  const PLOT_CONFIG = { displaylogo: false, responsive: true,
    modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };
  const FONT = { family: "-apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif",
    size: 12, color: "#1d2430" };

  // ---------------------------------------------------------------- formatting
  const isNum = (v) => typeof v === "number" && isFinite(v);
  const pct = (v, d = 2) => (isNum(v) ? (v * 100).toFixed(d) + " %" : "—");
  function bytes(v) {
    if (!isNum(v)) return "—";
    const units = [["GB", 1e9], ["MB", 1e6], ["kB", 1e3]];
    for (const [u, s] of units) if (Math.abs(v) >= s) return (v / s).toFixed(v / s >= 100 ? 0 : v / s >= 10 ? 1 : 2) + " " + u;
    return v.toFixed(0) + " B";
  }
  const ms = (v) => (isNum(v) ? (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(3)) + " ms" : "—");
  const times = (v) => (isNum(v) ? v.toFixed(2) + "×" : "—");
  const rate = (v) => (isNum(v) ? (v * 100).toFixed(1) + " %" : "—");
  const points = (v) => (isNum(v) ? (v >= 0 ? "+" : "−") + Math.abs(v).toFixed(2) + " pt" : "—");
  const count = (v) => (isNum(v) ? (v >= 1e9 ? (v / 1e9).toFixed(2) + " G" : v >= 1e6 ? (v / 1e6).toFixed(2) + " M" : v >= 1e3 ? (v / 1e3).toFixed(1) + " k" : String(v)) : "—");
  const secs = (v) => (isNum(v) ? (v >= 60 ? (v / 60).toFixed(1) + " min" : v.toFixed(1) + " s") : "—");
  function when(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleString();
  }
  function esc(s) {
    return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }
  const studyUrl = (name) => "/study/" + encodeURIComponent(name);
  const trialUrl = (name, n) => studyUrl(name) + "/trial/" + n;
  const el = (id) => document.getElementById(id);

  function stateBadge(t) {
    const s = t.state;
    if (t.rejected) return '<span class="badge warn">rejected at pre-check</span>';
    if (s === "COMPLETE") return t.feasible ? '<span class="badge ok">feasible</span>' : '<span class="badge warn">over budget</span>';
    if (s === "FAIL") return '<span class="badge bad">failed</span>';
    if (s === "RUNNING") return '<span class="badge run">running</span>';
    if (s === "PRUNED") return '<span class="badge">stopped early</span>';
    return '<span class="badge">' + esc(s.toLowerCase()) + "</span>";
  }
  function budgetText(b) {
    if (b == null) return "";
    if (typeof b === "string") return b;
    return b.text || (b.kind === "latency" ? b.value + " ms" : bytes(b.value));
  }

  // ---------------------------------------------------------------- live polling
  function initialData() {
    const node = el("initial-data");
    return node ? JSON.parse(node.textContent) : null;
  }
  function setLive(ok, text) {
    const live = el("live");
    if (!live) return;
    live.classList.toggle("stale", !ok);
    el("live-text").textContent = text;
  }
  function poll(url, render, first) {
    // The server answers {unchanged: true} when the signature (trial numbers, states,
    // feasibility) still matches, so an idle page costs a few bytes every 2 s.
    let last = first.signature;
    async function tick() {
      try {
        const r = await fetch(url + "?since=" + encodeURIComponent(last), { headers: { Accept: "application/json" }, cache: "no-store" });
        if (!r.ok) throw new Error("HTTP " + r.status);
        const data = await r.json();
        if (!data.unchanged && data.signature !== last) { last = data.signature; render(data); }
        setLive(true, "live · " + new Date().toLocaleTimeString());
      } catch (e) {
        setLive(false, "reconnecting…");
      }
      window.setTimeout(tick, POLL_MS);
    }
    window.setTimeout(tick, POLL_MS);
  }

  // ---------------------------------------------------------------- studies page
  function renderStudies(data) {
    const rows = data.studies.map((s) => {
      const c = s.counts;
      const best = s.best_accuracy
        ? `${pct(s.best_accuracy.value)} <a class="muted" href="${trialUrl(s.name, s.best_accuracy.number)}">#${s.best_accuracy.number}${s.best_accuracy.baseline ? " " + esc(s.best_accuracy.baseline) : ""}</a>`
        : '<span class="muted">none yet</span>';
      const small = s.smallest_size
        ? `${bytes(s.smallest_size.value)} <a class="muted" href="${trialUrl(s.name, s.smallest_size.number)}">#${s.smallest_size.number}</a>`
        : '<span class="muted">none yet</span>';
      const budgets = (s.budgets || []).map((b) => `<span class="chip budget">${esc(budgetText(b))}</span>`).join(" ") || '<span class="muted">none</span>';
      return `<tr class="clickable" data-href="${studyUrl(s.name)}">
        <td><a href="${studyUrl(s.name)}"><strong>${esc(s.name)}</strong></a></td>
        <td>${esc(s.model_spec || "—")}</td><td>${esc(s.data_spec || "—")}</td><td>${budgets}</td>
        <td class="num counts-cell"><strong>${c.complete}</strong> complete<br><span class="${c.infeasible ? "warn-text" : "muted"}">${c.infeasible} over budget</span> · <span class="${c.failed ? "down" : "muted"}">${c.failed} failed</span> · <span class="${c.running ? "run-text" : "muted"}">${c.running} running</span></td>
        <td class="num">${best}</td><td class="num">${small}</td><td>${when(s.last_activity)}</td></tr>`;
    });
    el("studies-body").innerHTML = rows.join("");
    el("studies-empty").hidden = data.studies.length > 0;
    bindRowLinks(el("studies-body"));
  }
  function bindRowLinks(tbody) {
    tbody.querySelectorAll("tr[data-href]").forEach((tr) => {
      tr.addEventListener("click", (ev) => {
        if (ev.target.closest("a")) return;
        window.location.href = tr.dataset.href;
      });
    });
  }

  // ---------------------------------------------------------------- study page
  const tableState = { key: "number", dir: 1 };
  const COLUMNS = [
    { key: "number", label: "#", num: true, fmt: (t, s) => `<a href="${trialUrl(s.name, t.number)}">${t.number}</a>` },
    { key: "state", label: "Status", fmt: (t) => stateBadge(t) + (t.on_front ? ' <span class="badge front">front</span>' : "") + (t.baseline ? ` <span class="badge base">${esc(t.baseline)}</span>` : "") + (t.warm_start ? ` <span class="badge base">${esc(t.warm_start)}</span>` : "") + (t.guided ? ` <span class="badge base">${esc(t.guided)}</span>` : "") + (t.parent_trial != null ? ` <span class="badge base">retrain of #${t.parent_trial}</span>` : "") + (t.superseded ? ' <span class="badge base">retrained later</span>' : "") },
    { key: "accuracy", label: "Accuracy (val)", num: true, fmt: (t) => pct(t.accuracy) },
    { key: "test_accuracy", label: "Accuracy (test)", num: true, fmt: (t) => pct(t.test_accuracy) },
    { key: "size_bytes", label: "Size", num: true, fmt: (t) => bytes(t.size_bytes) },
    { key: "latency_ms", label: "Latency (median)", num: true, fmt: (t) => ms(t.latency_ms) + (isNum(t.latency_spread_ms) ? ` <span class="muted">± ${ms(t.latency_spread_ms)}</span>` : "") },
    { key: "times_faster", label: "Speed vs fp32", num: true, fmt: (t) => times(t.times_faster) },
    { key: "accuracy_drop_rate", label: "Acc. drop rate", num: true, fmt: (t) => rate(t.accuracy_drop_rate) },
    { key: "flop_reduction_rate", label: "FLOPs −", num: true, fmt: (t) => rate(t.flop_reduction_rate) },
    { key: "bops_reduction_rate", label: "BOPs −", num: true, fmt: (t) => rate(t.bops_reduction_rate) },
    { key: "duration_s", label: "Took", num: true, fmt: (t) => secs(t.duration_s) },
    { key: "plan_summary", label: "Plan", cls: "plan", fmt: (t) => esc(t.plan_summary || "—") },
    { key: "reason", label: "Note", cls: "reason", fmt: (t) => `<span title="${esc(t.reason || "")}">${esc(t.reason || "")}</span>` },
  ];

  function sortValue(t, key) {
    const v = t[key];
    if (key === "state") return (t.state === "COMPLETE" ? (t.feasible ? 0 : 1) : t.state === "RUNNING" ? 2 : 3);
    return v;
  }
  function renderTable(study) {
    const head = el("trials-head");
    head.innerHTML = COLUMNS.map((c) => `<th data-key="${c.key}" class="${c.num ? "num" : ""}">${esc(c.label)}${tableState.key === c.key ? `<span class="arrow">${tableState.dir > 0 ? "▲" : "▼"}</span>` : ""}</th>`).join("");
    head.querySelectorAll("th").forEach((th) => th.addEventListener("click", () => {
      const key = th.dataset.key;
      tableState.dir = tableState.key === key ? -tableState.dir : 1;
      tableState.key = key;
      renderTable(study);
    }));
    const rows = study.trials.slice();  // the server sends every figure, speed included
    rows.sort((a, b) => {
      const x = sortValue(a, tableState.key), y = sortValue(b, tableState.key);
      if (x == null && y == null) return a.number - b.number;
      if (x == null) return 1;  // missing values last in either direction
      if (y == null) return -1;
      if (x < y) return -tableState.dir;
      if (x > y) return tableState.dir;
      return a.number - b.number;
    });
    el("trials-body").innerHTML = rows.map((t) => `<tr class="clickable" data-number="${t.number}" data-href="${trialUrl(study.name, t.number)}">` +
      COLUMNS.map((c) => `<td class="${c.num ? "num" : ""} ${c.cls || ""}">${c.fmt(t, study)}</td>`).join("") + "</tr>").join("");
    bindRowLinks(el("trials-body"));
  }

  function renderStudyHead(study) {
    const chips = [];
    if (study.model_spec) chips.push(`<span class="chip"><b>model</b> ${esc(study.model_spec)}</span>`);
    if (study.data_spec) chips.push(`<span class="chip"><b>data</b> ${esc(study.data_spec)}</span>`);
    for (const b of study.budgets || []) chips.push(`<span class="chip budget"><b>budget</b> ${esc(budgetText(b))}</span>`);
    chips.push(`<span class="chip"><b>objectives</b> ${esc((study.objectives || []).join(", "))}</span>`);
    const probe = study.learning_rate_probe;
    if (probe && isNum(probe.chosen)) {
      const tried = Object.entries(probe.scores || {}).map(([lr, acc]) => `${lr}: ${isNum(acc) ? acc.toFixed(3) : "?"}`).join(", ");
      chips.push(`<span class="chip" title="${esc(`accuracy after ${probe.steps} steps at each rate: ${tried}`)}"><b>learning rate</b> ${esc(String(probe.chosen))} (probed)</span>`);
    }
    el("study-chips").innerHTML = chips.join("");
    const c = study.counts;
    el("study-counts").innerHTML = [
      ["trials", c.total], ["complete", c.complete], ["feasible", c.feasible], ["over budget", c.infeasible],
      ["failed", c.failed], ["stopped early", c.pruned], ["running", c.running],
    ].map(([k, v]) => `<span><strong>${v}</strong> ${k}</span>`).join("");
  }

  function groups(study) {
    const front = new Set(study.front_2d);
    const out = { feasible: [], infeasible: [], rejected: [], baseline: [] };
    for (const t of study.trials) {
      if (t.rejected) { out.rejected.push(t); continue; }  // PRUNED at the pre-check
      if (t.state !== "COMPLETE") continue;
      if (t.baseline) out.baseline.push(t);
      else if (t.accuracy == null) out.rejected.push(t);
      else if (t.feasible) out.feasible.push(t);
      else out.infeasible.push(t);
    }
    return { ...out, front };
  }

  function hover(t) {
    const lines = [`<b>trial ${t.number}</b>${t.baseline ? " (" + esc(t.baseline) + ")" : ""}`,
      `accuracy ${pct(t.accuracy)}`, `size ${bytes(t.size_bytes)}`, `latency ${ms(t.latency_ms)}`];
    if (t.plan_summary) lines.push(esc(t.plan_summary));
    if (!t.feasible) lines.push("<i>over budget</i>");
    if (t.reason) lines.push(esc(String(t.reason).slice(0, 90)));
    return lines.join("<br>");
  }

  function floorY(trials) {
    // Rejected trials have no measured accuracy: draw them on a strip below the data.
    const acc = trials.filter((t) => t.state === "COMPLETE" && isNum(t.accuracy)).map((t) => t.accuracy);
    if (!acc.length) return 0;
    const lo = Math.min(...acc), hi = Math.max(...acc);
    return lo - Math.max((hi - lo) * 0.12, 0.01);
  }

  function markerTraces(study, xKey, colorByLatency) {
    const g = groups(study);
    const y0 = floorY(study.trials);
    const lat = study.trials.filter((t) => isNum(t.latency_ms)).map((t) => t.latency_ms);
    const coloraxis = colorByLatency && lat.length ? "coloraxis" : undefined;
    const base = (ts) => ({ x: ts.map((t) => t[xKey]), customdata: ts.map((t) => t.number), text: ts.map(hover), hovertemplate: "%{text}<extra></extra>", type: "scatter", mode: "markers" });
    const feasibleColor = (ts) => (coloraxis ? ts.map((t) => t.latency_ms) : "#2f6fde");
    return [
      { ...base(g.infeasible), y: g.infeasible.map((t) => t.accuracy), name: "over budget", marker: { color: GREY, size: 8, opacity: 0.75, line: { width: 0 } } },
      { ...base(g.rejected), y: g.rejected.map(() => y0), name: "rejected (accuracy not measured)", legendrank: 2000, marker: { color: GREY, size: 9, symbol: "x-thin-open", line: { width: 2, color: "#98a1ae" } } },
      { ...base(g.feasible), y: g.feasible.map((t) => t.accuracy), name: "feasible", marker: { color: feasibleColor(g.feasible), coloraxis, size: g.feasible.map((t) => (g.front.has(t.number) ? 12 : 8)), line: { width: g.feasible.map((t) => (g.front.has(t.number) ? 2 : 1)), color: g.feasible.map((t) => (g.front.has(t.number) ? "#1d2430" : "#ffffff")) } } },
      { ...base(g.baseline), y: g.baseline.map((t) => (isNum(t.accuracy) ? t.accuracy : y0)), name: "baselines", mode: "markers+text", text: g.baseline.map((t) => t.baseline), hovertext: g.baseline.map(hover), hovertemplate: "%{hovertext}<extra></extra>", textposition: "top center", textfont: { size: 11, color: "#6d28d9" }, marker: { color: g.baseline.map((t) => (t.feasible ? "#7c3aed" : GREY)), size: 13, symbol: "diamond", line: { width: 1.5, color: "#fff" } } },
    ];
  }

  function byteTicks(values) {
    // 1-2-5 ticks across the data, labelled in kB/MB (Plotly's log ticks mix "k" and "kB").
    const v = values.filter((x) => isNum(x) && x > 0);
    if (!v.length) return {};
    const lo = Math.min(...v) / 1.3, hi = Math.max(...v) * 1.3;
    const vals = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      for (const m of [1, 2, 5]) { const t = m * 10 ** e; if (t >= lo && t <= hi) vals.push(t); }
    }
    return { tickvals: vals, ticktext: vals.map(bytes), range: [Math.log10(lo), Math.log10(hi)] };
  }

  function budgetShapes(study, kind, axis) {
    const shapes = [], notes = [];
    for (const b of study.budgets || []) {
      if (!b || b.kind !== kind || !isNum(b.value)) continue;
      shapes.push({ type: "line", xref: axis, yref: "paper", x0: b.value, x1: b.value, y0: 0, y1: 1, line: { color: "#d92d20", width: 1.5, dash: "dash" } });
      notes.push({ x: b.value, xref: axis, y: 1, yref: "paper", yanchor: "bottom", text: `${kind} budget ${esc(budgetText(b))}`, showarrow: false, font: { size: 11, color: "#d92d20" } });
    }
    return { shapes, notes };
  }

  function layoutBase(extra) {
    return { font: FONT, margin: { l: 64, r: 20, t: 28, b: 40 }, hovermode: "closest", plot_bgcolor: "#fff", paper_bgcolor: "#fff",
      legend: { orientation: "h", x: 0, y: -0.22, yanchor: "top", font: { size: 11 } }, uirevision: "keep", ...extra };
  }

  function renderPareto(study) {
    const front = study.front_2d.map((n) => study.trials.find((t) => t.number === n)).filter(Boolean);
    const line = { x: front.map((t) => t.size_bytes), y: front.map((t) => t.accuracy), type: "scatter", mode: "lines", name: "feasible front", line: { color: "#1d2430", width: 1.5, shape: "hv" }, hoverinfo: "skip" };
    const lat = study.trials.filter((t) => t.state === "COMPLETE" && t.feasible && !t.baseline && isNum(t.latency_ms)).map((t) => t.latency_ms);
    const sizes = study.trials.filter((t) => t.state === "COMPLETE").map((t) => t.size_bytes);
    for (const b of study.budgets || []) if (b && b.kind === "size") sizes.push(b.value);
    const { shapes, notes } = budgetShapes(study, "size", "x");
    const layout = layoutBase({
      xaxis: { title: { text: "size of the ONNX file (log scale)" }, type: "log", ...byteTicks(sizes), gridcolor: "#eef0f3", zeroline: false },
      yaxis: { title: { text: "validation accuracy" }, tickformat: ".1%", gridcolor: "#eef0f3", zeroline: false },
      coloraxis: { colorscale: [[0, "#0f9d58"], [0.5, "#e0a100"], [1, "#d93025"]], cmin: lat.length ? Math.min(...lat) : 0, cmax: lat.length ? Math.max(...lat) : 1, colorbar: { title: { text: "latency<br>(ms)", side: "top" }, thickness: 12, len: 0.8 } },
      shapes, annotations: notes,
    });
    Plotly.react("pareto", [line, ...markerTraces(study, "size_bytes", true)], layout, PLOT_CONFIG);
  }

  function renderLatency(study) {
    const { shapes, notes } = budgetShapes(study, "latency", "x");
    const layout = layoutBase({
      xaxis: { title: { text: "latency, ONNX Runtime median (ms)" }, gridcolor: "#eef0f3", zeroline: false, rangemode: "tozero" },
      yaxis: { title: { text: "validation accuracy" }, tickformat: ".1%", gridcolor: "#eef0f3", zeroline: false },
      shapes, annotations: notes,
    });
    Plotly.react("latency", markerTraces(study, "latency_ms", false), layout, PLOT_CONFIG);
  }

  function renderProgress(study) {
    const p = study.progress;
    const ref = p.reference.size_bytes;
    const hv = p.hypervolume_share;  // computed by the server (autocompress.results)
    const traces = [
      { x: p.trial_numbers, y: p.best_feasible_accuracy, name: "best feasible accuracy", type: "scatter", mode: "lines+markers", line: { shape: "hv", color: "#2f6fde" }, marker: { size: 4 }, hovertemplate: "after trial %{x}: %{y:.2%}<extra></extra>" },
      ...fp32Line(study, p.trial_numbers),
      { x: p.trial_numbers, y: hv, name: "hypervolume (share of reference box)", type: "scatter", mode: "lines", yaxis: "y2", line: { shape: "hv", color: "#12805c", dash: "dot" }, hovertemplate: "after trial %{x}: %{y:.4f}<extra></extra>" },
    ];
    const acc = p.best_feasible_accuracy.filter(isNum);
    const fpTrial = study.trials.find((x) => x.number === (study.baselines || {}).fp32);
    if (fpTrial && isNum(fpTrial.accuracy)) acc.push(fpTrial.accuracy);
    const lo = acc.length ? Math.min(...acc) : 0, hi = acc.length ? Math.max(...acc) : 1;
    const pad = Math.max((hi - lo) * 0.1, 0.005);
    const hvMax = Math.max(0, ...hv.filter(isNum));
    const layout = layoutBase({
      margin: { l: 64, r: 64, t: 16, b: 44 },
      xaxis: { title: { text: "trial number" }, gridcolor: "#eef0f3", zeroline: false, dtick: p.trial_numbers.length <= 20 ? 1 : undefined },
      yaxis: { title: { text: "best feasible accuracy" }, tickformat: ".1%", gridcolor: "#eef0f3", zeroline: false, range: [lo - pad, hi + pad] },
      yaxis2: { title: { text: "hypervolume" }, overlaying: "y", side: "right", range: [0, hvMax * 1.08 || 1], tickformat: ".2f", showgrid: false, zeroline: false },
      legend: { orientation: "h", y: 1.12, font: { size: 11 } },
    });
    if (ref) el("hv-note").textContent = `search trials and compressed baselines (the fp32 reference is left out; dashed line) · best feasible accuracy and 2-D hypervolume by trial number · reference point: accuracy 0, size ${bytes(ref)} (1.1 × largest size seen); hypervolume shown as a share of that box`;
    Plotly.react("progress", traces, layout, PLOT_CONFIG);
  }

  function fp32Line(study, xs) {
    const n = study.baselines && study.baselines.fp32;
    const t = study.trials.find((x) => x.number === n);
    if (!t || !isNum(t.accuracy) || !xs.length) return [];
    return [{ x: [xs[0], xs[xs.length - 1]], y: [t.accuracy, t.accuracy], name: `fp32 accuracy (trial ${n})`, type: "scatter", mode: "lines", line: { color: "#7c3aed", dash: "dash", width: 1 }, hovertemplate: "fp32: %{y:.2%}<extra></extra>" }];
  }

  function bindClicks(id, study) {
    const gd = el(id);
    if (gd.dataset.bound) return;
    gd.dataset.bound = "1";
    gd.on("plotly_click", (ev) => {
      const p = ev.points && ev.points[0];
      if (p && p.customdata != null) window.location.href = trialUrl(study.name, p.customdata);
    });
  }

  function heatmap(id, rows, columns, cell, title) {
    // rows: [name, entry]; cell(entry, column) -> {kl, accuracy} or undefined
    const z = rows.map(([, e]) => columns.map((c) => { const v = cell(e, c); return v ? Math.log10(Math.max(v.kl, 1e-6)) : null; }));
    const text = rows.map(([, e]) => columns.map((c) => { const v = cell(e, c); return v ? `KL ${v.kl.toPrecision(3)} · acc ${(100 * v.accuracy).toFixed(1)}%` : "not scored"; }));
    const trace = { type: "heatmap", z, x: columns.map((c) => c.label), y: rows.map(([n]) => n), text, hoverinfo: "x+y+text",
      colorscale: [[0, "#0f9d58"], [0.5, "#e0a100"], [1, "#d93025"]], colorbar: { title: { text: "log10 KL", side: "top" }, thickness: 12 } };
    const layout = layoutBase({ title: { text: title, font: { size: 13 } }, margin: { l: 140, r: 20, t: 40, b: 40 },
      yaxis: { autorange: "reversed", automargin: true }, xaxis: { side: "bottom" } });
    Plotly.react(id, [trace], layout, PLOT_CONFIG);
  }

  function renderSensitivity(study) {
    const s = study.sensitivity;
    const card = document.getElementById("sensitivity-card");
    if (!card || !s || !s.layers) return;
    card.hidden = false;
    const widths = [...new Set(Object.values(s.layers).flatMap((e) => Object.keys(e.bits)))].sort((a, b) => b - a);
    heatmap("sensitivity-layers", Object.entries(s.layers), widths.map((w) => ({ key: w, label: `int${w}` })),
      (e, c) => e.bits[c.key], `layers at each width (${s.images} validation images)`);
    const ratios = [...new Set(Object.values(s.groups || {}).flatMap((g) => Object.keys(g.ratios)))].sort((a, b) => a - b);
    heatmap("sensitivity-groups", Object.entries(s.groups || {}), ratios.map((r) => ({ key: r, label: `${Math.round(100 * r)}% pruned` })),
      (e, c) => e.ratios[c.key], "prunable groups at each ratio");
  }

  function renderStudy(study) {
    renderStudyHead(study);
    renderPareto(study);
    renderLatency(study);
    renderProgress(study);
    renderTable(study);
    bindClicks("pareto", study);
    bindClicks("latency", study);
    try {
      renderSensitivity(study);  // last: an old or odd table must not cost the rest of the page
    } catch (err) {
      console.warn("sensitivity heat map not drawn:", err);
    }
  }

  // ---------------------------------------------------------------- trial page
  function renderTrial(d) {
    const t = d.trial;
    const badges = [stateBadge(t)];
    if (t.on_front) badges.push('<span class="badge front">on the Pareto front</span>');
    if (t.baseline) badges.push(`<span class="badge base">baseline ${esc(t.baseline)}</span>`);
    el("trial-badges").innerHTML = badges.join("");
    const prev = d.previous != null ? `<a href="${trialUrl(d.study, d.previous)}">← trial ${d.previous}</a>` : "<span>← previous</span>";
    const next = d.next != null ? `<a href="${trialUrl(d.study, d.next)}">trial ${d.next} →</a>` : "<span>next →</span>";
    el("trial-pager").innerHTML = prev + next;
    el("trial-summary").innerHTML = `${esc(d.plan_summary || (d.plan ? "per-layer plan below" : "no plan recorded"))} · started ${when(t.datetime_start)}${t.duration_s != null ? " · took " + secs(t.duration_s) : ""}`;

    el("reason").innerHTML = d.reason
      ? `<div class="callout ${esc(d.reason.kind)}" id="reason-box"><strong>${d.reason.kind === "rejected" ? "Rejected before fine-tuning" : d.reason.kind === "failed" ? "Trial failed" : "Stopped early"}</strong><pre>${esc(d.reason.text)}</pre></div>`
      : "";

    const c = d.comparison;
    const fp = d.fp32;
    el("kpis").innerHTML = [
      ["Accuracy (val)", pct(t.accuracy), c.accuracy_change_points != null ? `${points(c.accuracy_change_points)} vs fp32` : !isNum(t.accuracy) ? (t.rejected ? "not measured: rejected before fine-tuning" : "not measured") : "no fp32 baseline"],
      ["Size", bytes(t.size_bytes), c.times_smaller != null ? `${times(c.times_smaller)} smaller than fp32` : ""],
      ["Latency", ms(t.latency_ms), c.times_faster != null ? `${times(c.times_faster)} ${c.times_faster >= 1 ? "faster" : "(slower)"} than fp32` : ""],
      ["Test accuracy", pct(t.test_accuracy), "reported, not used for selection"],
    ].map(([l, v, dtl]) => `<div class="kpi"><div class="label">${l}</div><div class="value">${v}</div><div class="detail">${esc(dtl)}</div></div>`).join("");

    el("measured-title").textContent = t.rejected ? "Pre-check figures (no fine-tune was spent)" : "Measured on the exported file";
    el("fp32-note").textContent = fp ? `fp32 baseline = trial ${fp.number}` + (c.latency_basis ? ` · speed: ${c.latency_basis}` : "") : "no fp32 baseline trial in this study";
    const m = d.metrics;
    const rows = [
      ["Accuracy (validation)", pct(m.accuracy), fp ? pct(fp.accuracy) : "—", points(c.accuracy_change_points)],
      ["Accuracy (test)", pct(m.test_accuracy), fp ? pct(fp.test_accuracy) : "—", points(c.test_accuracy_change_points)],
      ["Size (file)", bytes(m.size_bytes), fp ? bytes(fp.size_bytes) : "—", c.times_smaller != null ? times(c.times_smaller) + " smaller" : "—"],
      ["Size (zipped)", bytes(m.zip_size_bytes), fp ? bytes(fp.zip_size_bytes) : "—", c.zip_times_smaller != null ? times(c.zip_times_smaller) + " smaller" : "—"],
      ["Latency (median ± IQR)", ms(m.latency_ms) + (isNum(m.latency_spread_ms) ? " ± " + ms(m.latency_spread_ms) : ""), isNum(m.fp32_latency_ms) ? ms(m.fp32_latency_ms) : fp ? ms(fp.latency_ms) : "—", c.times_faster != null ? times(c.times_faster) + " faster" : "—"],
      ["Accuracy-drop rate", rate(c.accuracy_drop_rate), "0", "(fp32 − trial) / fp32"],
      ["FLOPs", count(m.flops), fp ? count(fp.flops) : "—", isNum(c.flop_reduction_rate) ? rate(c.flop_reduction_rate) + " fewer (FLOP-reduction rate)" : "—"],
      ["Bit-operations (MACs × bits × bits)", count(m.bops), fp ? count(fp.bops) : "—", isNum(c.bops_reduction_rate) ? rate(c.bops_reduction_rate) + " fewer" : "—"],
      ["Parameters", count(m.params), fp ? count(fp.params) : "—", c.params_times_fewer != null ? times(c.params_times_fewer) + " fewer" : "—"],
    ];
    el("metrics-table").innerHTML = "<thead><tr><th>Metric</th><th class='num'>This trial</th><th class='num'>fp32 baseline</th><th class='num'>Change</th></tr></thead><tbody>" +
      rows.map((r) => `<tr><td>${r[0]}</td><td class="num">${r[1]}</td><td class="num">${r[2]}</td><td class="num">${r[3]}</td></tr>`).join("") + "</tbody>";

    const dl = [];
    if (d.artifact) {
      dl.push(`<a class="button" id="download-artifact" href="${d.artifact.url}" download="${esc(d.artifact.filename)}">⬇ Download artifact</a>`);
      dl.push(`<div class="meta">${esc(d.artifact.filename)}${d.artifact.sha256 ? " · sha256 " + esc(d.artifact.sha256) : ""}</div>`);
    } else {
      dl.push('<div class="muted">No artifact recorded for this trial (rejected, failed or still running).</div>');
    }
    dl.push(`<a class="button secondary" id="download-report" href="${d.report_url}" download>⬇ Download report (JSON)</a>`);
    el("downloads").innerHTML = dl.join("");

    renderTiming(d);
    renderPlan(d);
    renderKnobs(d);
    renderConstraints(d);
  }

  function renderTiming(d) {
    if (!d.timing.length) { el("timing").innerHTML = '<p class="muted">No timing recorded.</p>'; return; }
    const total = d.timing.reduce((a, r) => a + r.seconds, 0);
    const palette = ["#2f6fde", "#7c3aed", "#12805c", "#d97706", "#0891b2", "#be185d"];
    const traces = d.timing.map((r, i) => ({ type: "bar", orientation: "h", y: ["phases"], x: [r.seconds], name: r.phase, marker: { color: palette[i % palette.length] }, hovertemplate: `${esc(r.phase)}: %{x:.2f} s<extra></extra>` }));
    const layout = layoutBase({ barmode: "stack", margin: { l: 10, r: 10, t: 24, b: 36 }, xaxis: { title: { text: `seconds (total ${secs(total)})` }, gridcolor: "#eef0f3" }, yaxis: { visible: false }, legend: { orientation: "h", traceorder: "normal", x: 0, y: 1.25, font: { size: 11 } } });
    Plotly.react("timing", traces, layout, { ...PLOT_CONFIG, displayModeBar: false });
  }

  function renderPlan(d) {
    if (!d.layers.length) { el("plan").innerHTML = '<p class="muted">No per-layer plan recorded for this trial.</p>'; el("plan").style.height = "auto"; return; }
    const names = d.layers.map((l) => l.name);
    const bitColor = { 32: "#98a1ae", 16: "#60a5fa", 8: "#2f6fde", 4: "#7c3aed" };
    const hoverOf = (l) => `<b>${esc(l.name)}</b> ${esc(l.type)}<br>${l.bits} bit weights · prune ${(l.prune * 100).toFixed(0)}%` +
      (l.group ? `<br>group ${esc(l.group)}` : "") + (l.excluded_reason ? `<br><i>${esc(l.excluded_reason)}</i>` : "");
    const traces = [
      { type: "bar", x: names, y: d.layers.map((l) => l.bits), name: "weight bits", marker: { color: d.layers.map((l) => bitColor[l.bits] || "#98a1ae") }, text: d.layers.map((l) => String(l.bits)), textposition: "outside", cliponaxis: false, hovertext: d.layers.map(hoverOf), hovertemplate: "%{hovertext}<extra></extra>", xaxis: "x", yaxis: "y" },
      { type: "bar", x: names, y: d.layers.map((l) => l.prune), name: "structured prune ratio", marker: { color: "#d97706" }, hovertext: d.layers.map(hoverOf), hovertemplate: "%{hovertext}<extra></extra>", xaxis: "x", yaxis: "y2" },
    ];
    if (d.layers.some((l) => l.sparsity > 0)) {
      traces.push({ type: "bar", x: names, y: d.layers.map((l) => l.sparsity), name: "unstructured sparsity", marker: { color: "#0891b2" }, hovertemplate: "%{x}: %{y:.0%} sparse<extra></extra>", xaxis: "x", yaxis: "y2" });
    }
    const layout = layoutBase({
      grid: { rows: 2, columns: 1, roworder: "top to bottom" },
      margin: { l: 64, r: 20, t: 16, b: 40 },
      xaxis: { type: "category", tickangle: -40, automargin: true, categoryorder: "array", categoryarray: names },
      yaxis: { title: { text: "weight bits" }, domain: [0.56, 1], type: "log", tickvals: [4, 8, 16, 32], range: [Math.log10(2.5), Math.log10(45)], gridcolor: "#eef0f3" },
      yaxis2: { title: { text: "prune ratio" }, domain: [0, 0.44], range: [0, 1], tickformat: ".0%", gridcolor: "#eef0f3", anchor: "x" },
      legend: { orientation: "h", y: 1.1, font: { size: 11 } },
      bargap: 0.25,
    });
    layout.xaxis.anchor = "y2";
    Plotly.react("plan", traces, layout, PLOT_CONFIG);
  }

  function kvRows(pairs) {
    return pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => `<tr><td>${esc(k)}</td><td>${typeof v === "object" ? `<code>${esc(JSON.stringify(v))}</code>` : esc(v)}</td></tr>`).join("");
  }
  function renderKnobs(d) {
    const p = d.plan || {};
    el("plan-knobs").innerHTML = "<thead><tr><th colspan='2'>Fine-tune and distillation</th></tr></thead><tbody>" + (kvRows([
      ["activation bits", p.activation_bits], ["KD temperature", p.kd_temperature], ["KD weight (alpha)", p.kd_alpha],
      ["fine-tune steps", p.finetune_steps], ["learning rate", p.learning_rate],
      ["feature pairs", p.feature_pairs && p.feature_pairs.length ? p.feature_pairs.map((x) => x.join("→")).join(", ") : null],
      ["feature weight", p.feature_weight || null],
      ["realised by", p.realisation === "ptq" ? `post-training quantization (${p.calibration} calibration), no fine-tune` : p.realisation ? "QAT + distillation" : null],
      ["global sparsity", p.global_sparsity ? `${(100 * p.global_sparsity).toFixed(0)} % of all weights (L1, kept through the fine-tune)` : null],
    ]) || "<tr><td colspan='2' class='muted'>no plan</td></tr>") + "</tbody>";
    const r = d.runtime || {};
    el("runtime-table").innerHTML = "<thead><tr><th colspan='2'>Runtime the latency was measured with</th></tr></thead><tbody>" + (kvRows(
      Object.entries(r).map(([k, v]) => [k.replace(/_/g, " "), v])) || "<tr><td colspan='2' class='muted'>not recorded</td></tr>") + "</tbody>";
  }
  function renderConstraints(d) {
    const cons = d.constraints || {};
    const keys = Object.keys(cons);
    el("constraints-card").hidden = !keys.length;
    el("constraints-table").innerHTML = "<thead><tr><th>Budget</th><th class='num'>Constraint value</th><th>Met</th></tr></thead><tbody>" +
      keys.map((k) => `<tr><td>${esc(k)}</td><td class="num">${isNum(cons[k]) ? cons[k].toPrecision(4) : esc(cons[k])}</td><td>${cons[k] <= 0 ? '<span class="badge ok">yes</span>' : '<span class="badge bad">no</span>'}</td></tr>`).join("") + "</tbody>";
  }

  // ---------------------------------------------------------------- boot
  function boot() {
    const page = document.body.dataset.page;
    const data = initialData();
    if (!data) return;
    if (page === "studies") {
      renderStudies(data);
      poll("/api/studies", renderStudies, data);
    } else if (page === "study") {
      renderStudy(data);
      poll("/api/study/" + encodeURIComponent(data.name), renderStudy, data);
    } else if (page === "trial") {
      renderTrial(data);
      poll(`/api/trial/${encodeURIComponent(data.study)}/${data.number}`, renderTrial, data);
    }
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
  else boot();
})();
