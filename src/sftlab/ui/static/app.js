// sftlab ui: a single page over the /api routes of sftlab.ui.app. Plain ES module, no build step;
// charts with the vendored uPlot (static/vendor, MIT). Pages: #/runs #/data/RUN #/eval/RUN #/chat/RUN #/new

const $page = document.getElementById("page");
const METRICS = [
  { key: "loss", title: "loss (train, smoothed) · val loss (points)", val: true },
  { key: "learning_rate", title: "learning rate" },
  { key: "grad_norm", title: "grad norm", smooth: true },
  { key: "tokens_per_second", title: "tokens / s" },
];
const COLORS = ["#2f6fde", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#7f8c8d", "#d35400"];
let cleanup = [];  // closers of the current page (event streams, timers)

// -- helpers --------------------------------------------------------------------------------------

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const fmt = (x, d = 4) => (x === null || x === undefined || Number.isNaN(x) ? "–" : typeof x === "number" ? (Math.abs(x) >= 1000 ? x.toLocaleString(undefined, { maximumFractionDigits: 0 }) : Number(x.toPrecision(d)).toString()) : esc(x));
const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
const q = (params) => new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined)).toString();

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const text = await response.text();
  let body;
  try { body = JSON.parse(text); } catch { body = { error: text || response.statusText }; }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}
// every POST carries the server's CSRF token, which it embeds in this page (a page of another origin cannot read it)
const CSRF = document.querySelector('meta[name="csrf-token"]')?.content ?? "";
const JSON_HEADERS = { "Content-Type": "application/json", "X-CSRF-Token": CSRF };
const post = (path, body) => api(path, { method: "POST", headers: JSON_HEADERS, body: JSON.stringify(body ?? {}) });
const errorBox = (err) => `<div class="error" role="alert">${esc(err.message || err)}</div>`;

async function runsList() { return (await api("/api/runs")).runs; }

function runPicker(runs, current, id = "run-pick", extra = "") {
  return `<select id="${id}" ${extra}>${runs.map((r) => `<option value="${esc(r.id)}" ${r.id === current ? "selected" : ""}>${esc(r.id)} (${esc(r.state)})</option>`).join("")}</select>`;
}
const badge = (state) => `<span class="badge ${esc(state)}">${esc(state)}</span>`;

function route() {
  const [page, ...rest] = (location.hash.replace(/^#\/?/, "") || "runs").split("/");
  const [name, query] = rest.join("/").split("?");
  return { page, run: name ? decodeURIComponent(name) : null, params: new URLSearchParams(query || "") };
}
const go = (page, run, params) => { location.hash = `#/${page}${run ? "/" + encodeURIComponent(run) : ""}${params ? "?" + params : ""}`; };

async function render() {
  cleanup.forEach((close) => close()); cleanup = [];
  const { page, run, params } = route();
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  const pages = { runs: runsPage, data: dataPage, eval: evalPage, chat: chatPage, new: newPage };
  try {
    await (pages[page] || runsPage)(run, params);
  } catch (err) {
    $page.innerHTML = errorBox(err);
  }
}
window.addEventListener("hashchange", render);

// pages that need a run: the one in the address, else the newest
async function pickRun(run, page, filter = () => true) {
  const runs = await runsList();
  const usable = runs.filter(filter);
  if (!runs.length) throw new Error("no runs under this folder yet: train one (`make demo`, `sftlab train CONFIG`) or use New run");
  const chosen = run ?? [...usable].sort((a, b) => b.updated - a.updated)[0]?.id ?? runs[0].id;
  return { runs, chosen };
}

// -- Runs ---------------------------------------------------------------------------------------

function ema(values, weight) {
  if (!weight) return values;
  let last = 0, n = 0;
  return values.map((v) => { if (v === null) return null; n += 1; last = last * weight + (1 - weight) * v; return last / (1 - weight ** n); });
}

class Curves {
  constructor(element) { this.element = element; this.series = new Map(); this.plots = []; this.smoothing = 0.6; }
  add(run, records) {
    const all = this.series.get(run) || [];
    all.push(...records);
    this.series.set(run, all);
  }
  draw() {
    this.plots.forEach((p) => p.destroy()); this.plots = [];
    this.element.innerHTML = METRICS.map((m) => `<div class="chart card" data-metric="${m.key}"><h4>${esc(m.title)}</h4><div class="plot"></div></div>`).join("");
    const runs = [...this.series.keys()];
    for (const metric of METRICS) {
      const box = this.element.querySelector(`[data-metric="${metric.key}"]`);
      const steps = [...new Set(runs.flatMap((r) => this.series.get(r).map((x) => x.step)))].sort((a, b) => a - b);
      const index = new Map(steps.map((s, i) => [s, i]));
      const data = [steps], series = [{ label: "step" }];
      let points = 0;
      runs.forEach((run, i) => {
        const column = (key) => { const c = new Array(steps.length).fill(null); this.series.get(run).forEach((x) => { if (x[key] !== undefined && x[key] !== null) c[index.get(x.step)] = x[key]; }); return c; };
        const raw = column(metric.key);
        points = Math.max(points, raw.filter((v) => v !== null).length);
        const smoothed = metric.key === "loss" || metric.smooth ? ema(raw, this.smoothing) : raw;
        data.push(smoothed);
        series.push({ label: runs.length > 1 ? run : metric.key, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { show: false } });
        if (metric.val) {
          const val = column("val_loss");
          data.push(val);
          series.push({ label: `${run} val`, stroke: COLORS[i % COLORS.length], width: 0, dash: [4, 4], spanGaps: true, points: { show: true, size: 7, fill: COLORS[i % COLORS.length] } });
        }
      });
      box.dataset.points = String(points);
      box.dataset.runs = String(runs.length);
      const plotBox = box.querySelector(".plot");
      if (!steps.length) { plotBox.innerHTML = '<p class="dim">no metrics yet</p>'; continue; }
      const width = Math.max(320, box.clientWidth - 30);
      const tick = (u, splits) => splits.map((v) => (v === 0 ? "0" : Math.abs(v) < 0.01 || Math.abs(v) >= 1e5 ? v.toExponential(1) : Number(v.toPrecision(4)).toString()));
      const opts = { width, height: 220, series, scales: { x: { time: false } }, axes: [{ label: "step" }, { size: 64, values: tick }], legend: { live: false } };
      this.plots.push(new uPlot(opts, data, plotBox));
    }
  }
}

async function runsPage() {
  const { root, runs } = await api("/api/runs");
  document.getElementById("root").textContent = root;
  if (!runs.length) {
    $page.innerHTML = `<h2>Runs</h2><div class="card">No runs in <code>${esc(root)}</code> yet. Train one with <code>make demo</code> or <code>sftlab train CONFIG</code>, or start one on <a href="#/new">New run</a>.</div>`;
    return;
  }
  const saved = JSON.parse(sessionStorage.getItem("overlay") || "null");
  const shown = new Set(saved?.filter((id) => runs.some((r) => r.id === id)) ?? runs.filter((r) => r.state !== "exported").slice(0, 3).map((r) => r.id));
  $page.innerHTML = `<h2>Runs</h2>
    <div class="card"><table id="runs-table"><thead><tr><th></th><th>run</th><th>status</th><th>model</th><th>method</th><th>data</th>
      <th class="num">steps</th><th class="num">loss</th><th class="num">best val loss</th><th class="num">tok/s</th><th></th></tr></thead><tbody>
    ${runs.map((r) => `<tr data-run="${esc(r.id)}">
      <td><input type="checkbox" class="overlay" value="${esc(r.id)}" ${shown.has(r.id) ? "checked" : ""} title="show on the charts"></td>
      <td><a href="#" class="run-name" data-run="${esc(r.id)}"><b>${esc(r.id)}</b></a></td><td>${badge(r.state)}${r.detail ? `<div class="dim" style="font-size:12px">${esc(r.detail)}</div>` : ""}</td>
      <td>${esc(r.model)}</td><td>${esc(r.method)}</td><td>${esc(r.data.join(", "))}</td>
      <td class="num">${r.step}${r.total_steps ? " / " + r.total_steps : ""}</td><td class="num">${fmt(r.loss)}</td>
      <td class="num">${fmt(r.best_val_loss)}</td><td class="num">${fmt(r.tokens_per_second, 3)}</td>
      <td>${r.state === "running" ? `<button class="stop" data-run="${esc(r.id)}">Stop</button>` : ""}
          ${r.resumable && r.state !== "running" ? `<button class="resume" data-run="${esc(r.id)}">Resume</button>` : ""}
          <a href="#/data/${encodeURIComponent(r.id)}">data</a> · <a href="#/eval/${encodeURIComponent(r.id)}">eval</a> · <a href="#/chat/${encodeURIComponent(r.id)}">chat</a></td></tr>`).join("")}
    </tbody></table></div>
    <div id="run-message"></div><div id="run-detail"></div>
    <div class="toolbar"><label>smoothing <input id="smoothing" type="range" min="0" max="0.99" step="0.01" value="0.6"></label>
      <span id="smoothing-value" class="dim">0.60</span><span id="live" class="dim"></span></div>
    <div id="curves" class="charts"></div>`;
  const curves = new Curves(document.getElementById("curves"));
  const selected = () => [...document.querySelectorAll(".overlay:checked")].map((c) => c.value);
  let source = null;
  const load = async () => {
    if (source) source.close();
    const ids = selected();
    sessionStorage.setItem("overlay", JSON.stringify(ids));
    curves.series = new Map(ids.map((id) => [id, []]));
    curves.draw();
    if (!ids.length) return;
    source = new EventSource("/api/events?" + ids.map((id) => "run=" + encodeURIComponent(id)).join("&"));
    const live = document.getElementById("live");
    let pending = false;
    source.onmessage = (event) => {
      const msg = JSON.parse(event.data);
      curves.add(msg.run, msg.records);
      const row = document.querySelector(`tr[data-run="${CSS.escape(msg.run)}"] .badge`);
      if (row && row.textContent !== msg.state) { row.textContent = msg.state; row.className = `badge ${msg.state}`; }
      if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; curves.draw(); }); }
      live.textContent = msg.state === "running" ? "● live" : "";
    };
    source.addEventListener("end", () => { source.close(); live.textContent = ""; });
  };
  cleanup.push(() => source && source.close());
  document.querySelectorAll(".overlay").forEach((c) => c.addEventListener("change", load));
  const slider = document.getElementById("smoothing");
  slider.addEventListener("input", () => { curves.smoothing = Number(slider.value); document.getElementById("smoothing-value").textContent = Number(slider.value).toFixed(2); curves.draw(); });
  const act = async (what, run) => {
    const box = document.getElementById("run-message");
    try {
      const result = await post(`/api/${what}?run=${encodeURIComponent(run)}`);
      box.innerHTML = `<div class="card">${what === "stop" ? "SIGTERM sent: the run saves a checkpoint after this step and stops (resumable)" : "resumed"} (pid ${result.pid})</div>`;
      setTimeout(render, 1500);
    } catch (err) { box.innerHTML = errorBox(err); }
  };
  document.querySelectorAll("a.run-name").forEach((a) => a.addEventListener("click", async (event) => {
    event.preventDefault();
    const box = document.getElementById("run-detail");
    try {
      const d = await api(`/api/run?run=${encodeURIComponent(a.dataset.run)}`);
      const s = d.summary;
      box.innerHTML = `<div class="card run-detail"><h3 style="margin-top:0">${esc(a.dataset.run)} ${badge(d.status.state)} <span class="dim">${esc(d.row.path)}</span></h3>
        ${s ? `<p>${s.steps} steps in ${fmt(s.seconds, 3)} s · ${fmt(s.tokens_per_second, 3)} tok/s · val loss ${fmt(s.val_loss_before)} → ${fmt(s.val_loss_after)} · peak memory ${fmt(s.memory?.process_peak_mb, 4)} MB</p>` : ""}
        ${d.status.checkpoints.length ? `<p>checkpoints at steps ${d.status.checkpoints.join(", ")}</p>` : ""}
        ${d.config_path ? `<h4>${esc(d.config_path)}</h4><pre class="prompt">${esc(d.config_text)}</pre>` : ""}
        ${d.log_tail ? `<h4>train.log (the end)</h4><pre class="log">${esc(d.log_tail)}</pre>` : ""}</div>`;
    } catch (err) { box.innerHTML = errorBox(err); }
  }));
  document.querySelectorAll("button.stop").forEach((b) => b.addEventListener("click", () => act("stop", b.dataset.run)));
  document.querySelectorAll("button.resume").forEach((b) => b.addEventListener("click", () => act("resume", b.dataset.run)));
  const timer = setInterval(async () => {  // new runs and state changes of runs not on the charts
    try { const now = await runsList(); if (now.map((r) => r.id + r.state).join() !== runs.map((r) => r.id + r.state).join()) render(); } catch { /* next tick */ }
  }, 5000);
  cleanup.push(() => clearInterval(timer));
  await load();
}

// -- Data ---------------------------------------------------------------------------------------

function histogramHtml(title, h) {
  if (!h.counts.length) return "";
  const top = Math.max(...h.counts);
  return `<div class="card"><h4 style="margin:0 0 .4rem">${esc(title)}</h4><div class="hist">${h.counts.map((c, i) =>
    `<div style="height:${(100 * c / top).toFixed(1)}%" title="${h.edges[i]}–${h.edges[i + 1]}: ${c} rows"></div>`).join("")}</div>
    <div class="hist-axis"><span>${h.edges[0]}</span><span>tokens</span><span>${h.edges[h.edges.length - 1]}</span></div></div>`;
}

function exampleHtml(e) {
  const spans = e.tokens.map(([piece, trained]) => `<span class="${trained ? "t" : "p"}">${esc(piece)}</span>`).join("");
  return `<div class="example" data-row="${e.row}"><div class="meta">#${e.row} · ${esc(e.source)} · ${e.length} tokens, ${e.trained} trained${e.truncated ? " · truncated" : ""}${e.lost_end_token ? " · lost its end token" : ""}</div><pre class="tokens">${spans}</pre></div>`;
}

async function dataPage(run, params) {
  const { runs, chosen } = await pickRun(run, "data");
  $page.innerHTML = `<h2>Data</h2><div class="toolbar">run ${runPicker(runs, chosen)}</div><div id="data-body"><p class="dim">opening the run's token store…</p></div>`;
  document.getElementById("run-pick").addEventListener("change", (e) => go("data", e.target.value));
  const body = document.getElementById("data-body");
  let info;
  try { info = await api(`/api/data?run=${encodeURIComponent(chosen)}`); } catch (err) { body.innerHTML = errorBox(err); return; }
  const t = info.report.total;
  const reasons = Object.entries(info.dropped_reasons);
  body.innerHTML = `
    <div class="stats">
      <div class="stat"><b>${fmt(t.rows_read)}</b><span>rows read</span></div>
      <div class="stat"><b>${fmt(t.rows_kept)}</b><span>kept</span></div>
      <div class="stat"><b class="${t.rows_dropped ? "bad" : ""}">${fmt(t.rows_dropped)}</b><span>dropped</span></div>
      <div class="stat"><b>${fmt(t.rows_truncated)}</b><span>truncated (max_length ${info.max_length})</span></div>
      <div class="stat"><b>${pct(t.trained_share)}</b><span>tokens trained (${esc(info.train_on)})</span></div>
      <div class="stat"><b>${fmt(t.tokens)}</b><span>tokens · template ${esc(info.template)}</span></div>
    </div>
    <h3>Sources</h3>
    <table id="sources"><thead><tr><th>file</th><th>split</th><th>format</th><th class="num">read</th><th class="num">kept</th><th class="num">dropped</th><th>by reason</th><th class="num">truncated</th><th class="num">trained share</th><th class="num">length p50 / p99</th></tr></thead><tbody>
    ${info.report.sources.map((s) => `<tr><td>${esc(s.path)}</td><td>${esc(s.split)}</td><td>${esc(s.format)}</td><td class="num">${s.rows_read}</td><td class="num">${s.rows_kept}</td><td class="num">${s.rows_dropped}</td>
      <td>${Object.entries(s.dropped_by_reason).map(([k, v]) => `${esc(k)}: ${v}`).join(", ") || "–"}</td><td class="num">${s.rows_truncated}</td><td class="num">${pct(s.trained_share)}</td>
      <td class="num">${s.length_percentiles?.p50 ?? "–"} / ${s.length_percentiles?.p99 ?? "–"}</td></tr>`).join("")}</tbody></table>
    <h3>Lengths</h3>
    <div class="side">${histogramHtml(`train rows: tokens per row (${info.train_rows} rows)`, info.histograms.length)}${histogramHtml("train rows: trained tokens per row", info.histograms.trained)}</div>
    <h3>Examples</h3>
    <div class="toolbar">
      <select id="ex-kind"><option value="train">train examples</option><option value="val">validation examples</option>
        ${reasons.map(([r, n]) => `<option value="dropped:${esc(r)}">dropped: ${esc(r)} (${n})</option>`).join("")}</select>
      <select id="ex-source"><option value="">all sources</option>${info.sources.map((s) => `<option value="${esc(s)}">${esc(s.split("/").pop())}</option>`).join("")}</select>
      <label>length ≥ <input id="ex-min" type="number" min="0" style="width:5rem"></label>
      <label>≤ <input id="ex-max" type="number" min="0" style="width:5rem"></label>
      <label>row <input id="ex-row" type="number" min="0" style="width:5rem" value="${esc(params.get("row") ?? "")}"></label>
      <button id="ex-show">Show</button><button id="ex-prev" class="secondary">◀</button><button id="ex-next" class="secondary">▶</button>
      <span class="dim"><span class="t">trained</span> · <span class="p">masked (label -100)</span></span>
    </div>
    <div id="examples" class="card"></div>`;
  let offset = 0;
  const show = async () => {
    const box = document.getElementById("examples");
    const kind = document.getElementById("ex-kind").value;
    try {
      if (kind.startsWith("dropped:")) {
        const r = await api(`/api/dropped?` + q({ run: chosen, reason: kind.slice(8), offset, limit: 10 }));
        box.innerHTML = `<p class="dim">${r.total} rows dropped as ${esc(r.reason)}; showing ${offset + 1}–${offset + r.rows.length}</p>` +
          r.rows.map((d) => `<div class="example dropped"><div class="meta"><b>${esc(d.source)}</b> · dropped: ${esc(d.reason)}</div><pre class="tokens">${esc(d.detail)}</pre></div>`).join("");
        return;
      }
      const r = await api(`/api/examples?` + q({ run: chosen, split: kind, source: document.getElementById("ex-source").value, min_len: document.getElementById("ex-min").value,
        max_len: document.getElementById("ex-max").value, row: document.getElementById("ex-row").value, offset, limit: 5 }));
      box.innerHTML = (r.total !== null ? `<p class="dim">${r.total} matching rows; showing ${offset + 1}–${offset + r.examples.length}</p>` : "") +
        (r.examples.length ? r.examples.map(exampleHtml).join("") : '<p class="dim">no example matches these filters</p>');
    } catch (err) { box.innerHTML = errorBox(err); }
  };
  document.getElementById("ex-show").addEventListener("click", () => { offset = 0; show(); });
  document.getElementById("ex-kind").addEventListener("change", () => { offset = 0; show(); });
  document.getElementById("ex-prev").addEventListener("click", () => { offset = Math.max(0, offset - (document.getElementById("ex-kind").value.startsWith("dropped:") ? 10 : 5)); show(); });
  document.getElementById("ex-next").addEventListener("click", () => { offset += document.getElementById("ex-kind").value.startsWith("dropped:") ? 10 : 5; show(); });
  await show();
}

// -- Eval ---------------------------------------------------------------------------------------

function change(before, after, lowerIsBetter) {
  if (before === null || before === undefined || after === null || after === undefined) return "";
  const better = lowerIsBetter ? after < before : after > before;
  return `<span class="${after === before ? "" : better ? "good" : "bad"}">${after > before ? "▲" : after < before ? "▼" : "="}</span>`;
}

function evalHtml(name, r) {
  const h = r.heldout, f = r.forgetting, i = r.instruction_following;
  const stats = [];
  if (h) stats.push(`<div class="stat" data-stat="heldout"><b>${fmt(h.base?.loss)} → ${fmt(h.tuned.loss)} ${change(h.base?.loss, h.tuned.loss, true)}</b><span>held-out response loss (base → tuned, ${h.rows} rows)</span></div>`);
  if (i) stats.push(`<div class="stat" data-stat="if"><b>${pct(i.base?.prompt_strict)} → ${pct(i.tuned.prompt_strict)} ${change(i.base?.prompt_strict, i.tuned.prompt_strict, false)}</b><span>instruction following, prompt-level strict (${i.prompts} prompts)</span></div>`,
    `<div class="stat"><b>${pct(i.base?.instruction_strict)} → ${pct(i.tuned.instruction_strict)} ${change(i.base?.instruction_strict, i.tuned.instruction_strict, false)}</b><span>instruction-level strict</span></div>`);
  const t = r.tool_calls;
  if (t) stats.push(`<div class="stat" data-stat="tool-calls"><b>${pct(t.base?.tool_call_accuracy)} → ${pct(t.tuned.tool_call_accuracy)} ${change(t.base?.tool_call_accuracy, t.tuned.tool_call_accuracy, false)}</b><span>tool-call accuracy: right function and arguments (${t.tuned.rows} held-out rows)</span></div>`,
    `<div class="stat"><b>${pct(t.base?.function_accuracy)} → ${pct(t.tuned.function_accuracy)}</b><span>right function (${t.tuned.call_rows} rows that call)</span></div>`);
  if (f) stats.push(`<div class="stat" data-stat="forgetting"><b class="${f.flagged ? "bad" : "good"}">${f.relative_change >= 0 ? "+" : ""}${(100 * f.relative_change).toFixed(1)}%</b><span>general-text perplexity change (${f.flagged ? "over" : "within"} the ${(100 * f.threshold).toFixed(0)}% forgetting threshold)</span></div>`);
  const types = i ? Object.keys({ ...(i.base?.per_instruction || {}), ...i.tuned.per_instruction }).sort() : [];
  return `<div class="card eval-report" data-run="${esc(name)}"><h3 style="margin-top:0">${esc(name)} <span class="dim">· ${esc(r.tuned?.method)} · base ${esc(r.base?.name)} · ${esc(r.created)}</span></h3>
    <div class="stats">${stats.join("")}</div>
    ${types.length ? `<h3>Instruction following by type</h3><table class="if-table"><thead><tr><th>instruction</th><th class="num">n</th><th class="num">base strict</th><th class="num">tuned strict</th></tr></thead><tbody>
      ${types.map((t) => { const b = i.base?.per_instruction?.[t], u = i.tuned.per_instruction[t]; return `<tr><td>${esc(t)}</td><td class="num">${(u || b).count}</td><td class="num">${pct(b?.strict)}</td><td class="num">${pct(u?.strict)} ${change(b?.strict, u?.strict, false)}</td></tr>`; }).join("")}</tbody></table>` : ""}
    ${r.side_by_side?.length ? `<h3>Base vs tuned answers</h3><table class="cols2"><thead><tr><th>instruction</th><th>base</th><th>tuned</th></tr></thead><tbody>
      ${r.side_by_side.map((s) => `<tr><td>${esc(s.instruction)}${s.input ? `<div class="dim">${esc(s.input)}</div>` : ""}${s.reference ? `<div class="dim">reference: ${esc(s.reference)}</div>` : ""}</td><td>${esc(s.base)}</td><td>${esc(s.tuned)}</td></tr>`).join("")}</tbody></table>` : ""}
  </div>`;
}

async function evalPage(run, params) {
  const { runs, chosen } = await pickRun(run, "eval", (r) => r.has_eval);
  const other = params.get("compare") || "";
  $page.innerHTML = `<h2>Eval</h2><div class="toolbar">run ${runPicker(runs, chosen)} compare with
    <select id="compare-pick"><option value="">(none)</option>${runs.filter((r) => r.id !== chosen).map((r) => `<option value="${esc(r.id)}" ${r.id === other ? "selected" : ""}>${esc(r.id)}</option>`).join("")}</select></div><div id="eval-body"></div>`;
  document.getElementById("run-pick").addEventListener("change", (e) => go("eval", e.target.value));
  document.getElementById("compare-pick").addEventListener("change", (e) => go("eval", chosen, e.target.value ? q({ compare: e.target.value }) : ""));
  const names = other ? [chosen, other] : [chosen];
  const reports = await Promise.all(names.map((n) => api(`/api/eval?run=${encodeURIComponent(n)}`).then((r) => evalHtml(n, r), (err) => errorBox(err))));
  document.getElementById("eval-body").innerHTML = other ? `<div class="side">${reports.join("")}</div>` : reports[0];
}

// -- Chat ---------------------------------------------------------------------------------------

async function* sse(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function chatPage(run) {
  const { runs, chosen } = await pickRun(run, "chat", (r) => r.has_final);
  const model = chosen.split("/").pop();
  $page.innerHTML = `<h2>Chat</h2><div class="toolbar">run ${runPicker(runs, chosen)}
      <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0" style="width:4.5rem"></label>
      <label>max tokens <input id="max-tokens" type="number" min="1" value="128" style="width:5rem"></label>
      <label>seed <input id="seed" type="number" placeholder="random" style="width:5.5rem"></label>
      <label><input id="show-prompt" type="checkbox"> show the rendered prompt</label>
      <button id="reset" class="secondary">New conversation</button></div>
    <div id="chat-error"></div><div id="chatlog" class="chatlog"></div><pre id="prompt" class="prompt" hidden></pre>
    <div class="toolbar" style="margin-top:.6rem"><textarea id="message" rows="3" style="flex:1" placeholder="Ask the tuned model… (Enter sends, Shift+Enter for a new line)"></textarea><button id="send">Send</button></div>
    <p class="dim">The run's own template and sftlab serve's engine (the same as <code>sftlab chat ${esc(runs.find((r) => r.id === chosen)?.path ?? chosen)}</code>); the first message loads the model.</p>`;
  document.getElementById("run-pick").addEventListener("change", (e) => go("chat", e.target.value));
  const messages = [];
  const log = document.getElementById("chatlog"), input = document.getElementById("message"), errors = document.getElementById("chat-error");
  const bubble = (role, text) => { const div = document.createElement("div"); div.className = `msg ${role}`; div.innerHTML = `<span class="who">${role}</span><span class="text"></span>`; div.querySelector(".text").textContent = text; log.appendChild(div); log.scrollTop = log.scrollHeight; return div.querySelector(".text"); };
  const showPrompt = async () => {
    const box = document.getElementById("prompt");
    box.hidden = !document.getElementById("show-prompt").checked;
    if (box.hidden) return;
    const draft = input.value.trim();
    const turns = draft ? [...messages, { role: "user", content: draft }] : messages;
    if (!turns.length) { box.textContent = "(type a message to see its prompt)"; return; }
    try { const r = await post(`/api/serve/sftlab/render?run=${encodeURIComponent(chosen)}`, { messages: turns }); box.textContent = `${r.prompt}\n\n— ${r.prompt_tokens} tokens, template ${r.template}`; } catch (err) { box.textContent = err.message; }
  };
  document.getElementById("show-prompt").addEventListener("change", showPrompt);
  document.getElementById("reset").addEventListener("click", () => { messages.length = 0; log.innerHTML = ""; showPrompt(); });
  const send = async () => {
    const text = input.value.trim();
    if (!text) return;
    errors.innerHTML = ""; input.value = "";
    messages.push({ role: "user", content: text }); bubble("user", text);
    await showPrompt();
    const out = bubble("assistant", ""); out.parentElement.classList.add("streaming");
    const button = document.getElementById("send"); button.disabled = true;
    let reply = "";
    try {
      const response = await fetch(`/api/serve/v1/chat/completions?run=${encodeURIComponent(chosen)}`, { method: "POST", headers: JSON_HEADERS,
        body: JSON.stringify({ model, messages, stream: true, temperature: Number(document.getElementById("temperature").value), max_tokens: Number(document.getElementById("max-tokens").value),
          ...(document.getElementById("seed").value !== "" ? { seed: Number(document.getElementById("seed").value) } : {}) }) });
      if (!response.ok) { const body = await response.json().catch(() => ({})); throw new Error(body.error?.message || body.error || response.statusText); }
      for await (const chunk of sse(response)) {
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) { reply += delta; out.textContent = reply; log.scrollTop = log.scrollHeight; }
      }
      messages.push({ role: "assistant", content: reply.trim() });
    } catch (err) {
      messages.pop(); out.parentElement.remove(); errors.innerHTML = errorBox(err);
    } finally { button.disabled = false; out.parentElement?.classList.remove("streaming"); out.parentElement?.classList.add("done"); }
  };
  document.getElementById("send").addEventListener("click", send);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); } });
}

// -- New run ------------------------------------------------------------------------------------

async function newPage() {
  const fields = [
    ["name", "run name (folder under the runs folder)", "text", "my-run"],
    ["model", "model (registry name, HF folder or run)", "text", "smollm2-135m-instruct"],
    ["data", "training data file (.json/.jsonl/.csv/.parquet)", "text", "examples/data/alpaca_demo.json"],
    ["eval_data", "held-out data file (optional)", "text", "examples/data/alpaca_demo_eval.json"],
    ["template", "template", ["alpaca", "chatml", "tokenizer"], "alpaca"],
    ["method", "method", ["full", "lora"], "full"],
    ["learning_rate", "learning rate", "number", "2e-5"],
    ["num_epochs", "epochs", "number", "1"],
    ["max_steps", "max steps (optional; overrides epochs)", "number", ""],
    ["batch_size", "batch size", "number", "8"],
    ["max_length", "max length (tokens)", "number", "256"],
    ["save_steps", "checkpoint every N steps (0 = only when stopped)", "number", "0"],
  ];
  $page.innerHTML = `<h2>New run</h2><div class="card"><div class="form">${fields.map(([key, label, type, value]) => `<label>${esc(label)}${Array.isArray(type)
      ? `<select name="${key}">${type.map((o) => `<option ${o === value ? "selected" : ""}>${o}</option>`).join("")}</select>`
      : `<input name="${key}" type="${type === "number" ? "text" : type}" value="${esc(value)}">`}</label>`).join("")}</div>
    <div class="toolbar" style="margin-top:.8rem"><button id="draft">Write the YAML</button></div></div>
    <div id="new-error"></div>
    <div class="card"><h3 style="margin-top:0">Config <span id="yaml-path" class="dim"></span></h3><p class="dim">The YAML is the source of truth: edit it freely; it is saved beside the run and training reads it (<code>sftlab config</code> lists every key).</p>
    <textarea id="yaml" class="yaml" spellcheck="false"></textarea>
    <div class="toolbar"><button id="check" class="secondary">Check</button><button id="start">Start training</button><span id="check-result" class="dim"></span></div></div>`;
  const form = () => Object.fromEntries([...document.querySelectorAll(".form [name]")].map((el) => [el.name, el.value.trim()]).map(([k, v]) => [k, v !== "" && !Number.isNaN(Number(v)) && !["name", "model", "data", "eval_data"].includes(k) ? Number(v) : v]));
  const errors = document.getElementById("new-error");
  document.getElementById("draft").addEventListener("click", async () => {
    errors.innerHTML = "";
    try { const r = await post("/api/config/draft", form()); document.getElementById("yaml").value = r.yaml; document.getElementById("yaml-path").textContent = "→ " + r.path; } catch (err) { errors.innerHTML = errorBox(err); }
  });
  document.getElementById("check").addEventListener("click", async () => {
    errors.innerHTML = ""; document.getElementById("check-result").textContent = "";
    try { const r = await post("/api/config/check", { yaml: document.getElementById("yaml").value, name: form().name + ".yaml" }); document.getElementById("check-result").textContent = `valid: ${r.method} fine-tune of ${r.model} into ${r.output_dir}`; } catch (err) { errors.innerHTML = errorBox(err); }
  });
  document.getElementById("start").addEventListener("click", async () => {
    errors.innerHTML = "";
    try { await post("/api/train", { name: form().name, yaml: document.getElementById("yaml").value }); sessionStorage.setItem("overlay", JSON.stringify([form().name])); go("runs"); } catch (err) { errors.innerHTML = errorBox(err); }
  });
}

render();
