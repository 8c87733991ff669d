// The service's pages: the submit form posts to the JSON API; the job page refreshes itself
// from it. Served as a file because the pages' CSP allows scripts from this origin only.
"use strict";

function $(id) { return document.getElementById(id); }

async function apiError(response) {
  try {
    const body = await response.json();
    return { message: body.error || response.statusText, field: body.field || null };
  } catch (e) {
    return { message: `${response.status} ${response.statusText}`, field: null };
  }
}

function showError(el, err) {
  el.textContent = err.field ? `${err.message} (field: ${err.field})` : err.message;
  el.hidden = false;
}

// -- submit page --------------------------------------------------------------------------

function numberOrNull(id) {
  const el = $(id);
  if (!el || el.value.trim() === "") return null;
  const n = Number(el.value);
  return Number.isFinite(n) ? n : el.value;
}

function collectSpec() {
  const spec = {};
  const model = $("model").value.trim();
  if (model) spec.model = model;
  const data = $("data").value;
  if (data !== "upload") spec.data = data;
  const budgets = $("budgets").value.split(",").map((s) => s.trim()).filter((s) => s);
  if (budgets.length) spec.budgets = budgets;
  spec.objectives = $("objectives").value.split(",");
  for (const key of ["trials", "time_limit", "finetune_steps"]) {
    const value = numberOrNull(key);
    if (value !== null) spec[key] = value;
  }
  spec.target = $("target").value;
  return spec;
}

function collectFiles() {
  const files = {};
  const pick = (id, field) => {
    const el = $(id);
    if (el && el.files && el.files.length) files[field] = el.files[0];
  };
  pick("weights", "weights");
  pick("model_file", "model_file");
  if ($("data").value === "upload") pick("data_file", "data");
  return files;
}

async function submitJob(event) {
  event.preventDefault();
  const errorEl = $("submit-error");
  errorEl.hidden = true;
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  const spec = collectSpec();
  const files = collectFiles();
  if ($("data").value === "upload" && !files.data) {
    showError(errorEl, { message: "choose a data file to upload, or pick digits or a " +
      "registered dataset", field: "data" });
    return;
  }
  let init;
  if (Object.keys(files).length) {
    const form = new FormData();
    form.append("spec", JSON.stringify(spec));
    for (const [field, file] of Object.entries(files)) form.append(field, file);
    init = { method: "POST", body: form };
  } else {
    init = { method: "POST", headers: { "Content-Type": "application/json" },
             body: JSON.stringify(spec) };
  }
  $("submit-button").disabled = true;
  try {
    const response = await fetch("/api/v1/jobs", { ...init, credentials: "same-origin" });
    if (response.status === 201) {
      const body = await response.json();
      window.location.assign(`/jobs/${body.job.id}`);
      return;
    }
    const err = await apiError(response);
    showError(errorEl, err);
    const input = err.field && $(err.field === "data" && $("data").value === "upload"
      ? "data_file" : err.field);
    if (input) input.classList.add("invalid");
  } catch (e) {
    showError(errorEl, { message: `the server did not answer (${e.message})`, field: null });
  } finally {
    $("submit-button").disabled = false;
  }
}

function initSubmit() {
  $("submit-form").addEventListener("submit", submitJob);
  $("data").addEventListener("change", () => {
    $("data-upload-row").hidden = $("data").value !== "upload";
  });
}

// -- job page -----------------------------------------------------------------------------

function fmt(value, digits) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

function fmtSize(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  let value = Number(bytes);
  for (const unit of ["B", "kB", "MB"]) {
    if (value < 1000) return unit === "B" ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
    value /= 1000;
  }
  return `${value.toFixed(1)} GB`;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

function renderFront(jobId, front) {
  const body = $("front-body");
  body.replaceChildren();
  for (const t of front) {
    const tr = document.createElement("tr");
    tr.dataset.number = t.number;
    cell(tr, t.baseline ? `${t.number} (${t.baseline})` : String(t.number));
    cell(tr, fmt(t.accuracy, 4));
    cell(tr, fmtSize(t.size_bytes));
    cell(tr, fmt(t.latency_ms, 3));
    cell(tr, t.plan_summary || "");
    const files = cell(tr, "");
    for (const name of t.artifacts || []) {
      const a = document.createElement("a");
      a.href = `/api/v1/jobs/${jobId}/artifacts/${t.number}/${name}`;
      a.textContent = name;
      files.append(a, " ");
    }
    body.appendChild(tr);
  }
  $("front-empty").hidden = front.length > 0;
}

function renderJob(job) {
  const state = $("job-state");
  state.textContent = job.state;
  state.className = `state state-${job.state}`;
  const p = job.progress;
  $("job-progress").textContent =
    `${p.trials_done}${p.trials_target ? " / " + p.trials_target : ""} trials, ` +
    `${p.seconds_used} s${p.time_limit_s ? " of " + p.time_limit_s + " s" : ""}`;
  $("job-error").textContent = job.error || "";
  $("cancel-button").hidden = job.terminal;
  const ex = job.export;
  $("export-state").textContent = `export: ${ex.state}${ex.reason ? " (" + ex.reason + ")" : ""}`;
  $("export-link").hidden = ex.state !== "done";
  renderFront(job.id, job.front || []);
}

async function refreshJob(jobId) {
  try {
    const response = await fetch(`/api/v1/jobs/${jobId}`, { credentials: "same-origin" });
    if (response.ok) {
      const body = await response.json();
      renderJob(body.job);
      if (body.job.terminal && body.job.export.state !== "running") return;
    }
  } catch (e) { /* the server restarting: try again */ }
  setTimeout(() => refreshJob(jobId), 2000);
}

async function post(url, payload) {
  const errorEl = $("action-error");
  errorEl.hidden = true;
  const response = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
  });
  if (!response.ok) showError(errorEl, await apiError(response));
  return response.ok;
}

function initJob() {
  const jobId = $("job-root").dataset.job;
  $("cancel-button").addEventListener("click", async () => {
    if (await post(`/api/v1/jobs/${jobId}/cancel`, {})) refreshJob(jobId);
  });
  $("export-button").addEventListener("click", async () => {
    if (await post(`/api/v1/jobs/${jobId}/export`, { best: true })) refreshJob(jobId);
  });
  setTimeout(() => refreshJob(jobId), 2000);
}

const page = document.body.dataset.page;
if (page === "new") initSubmit();
if (page === "job") initJob();
