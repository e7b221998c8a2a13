// krypton_db viewer: plain JavaScript, no build step. Routes (location.hash):
//   #/                      browse the catalog (runs, models, images, datasets)
//   #/run/ID                a run: image + heat map overlay, colour bar, live occlusion, EXPLAIN ANALYZE
//   #/explain[?image=ID]    run an explanation with progress; opens the run when it lands
//   #/live/MODEL/IMAGE      live occlusion only (no heat map)
// Every request that fails shows the server's message in the #error banner (or next to the
// field it concerns); nothing here interprets the catalog beyond what the server sends.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const main = () => $("#main");
let catalog = null;          // /api/catalog
let liveSocket = null;       // the open live-occlusion WebSocket, if any
window.kryptonLive = { latencies: [], last: null };  // read by the browser tests

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function showError(msg) {
  const e = $("#error");
  if (!msg) { e.hidden = true; e.textContent = ""; return; }
  e.textContent = msg; e.hidden = false;
}
async function api(path, opts = {}) {
  let r;
  try { r = await fetch(path, opts); } catch (err) { throw new Error(`the viewer's server did not answer (${err.message})`); }
  const type = r.headers.get("content-type") || "";
  const body = type.includes("json") ? await r.json() : null;
  if (!r.ok) throw new Error(body && body.error ? body.error : `HTTP ${r.status}`);
  return body;
}
function fmt(v, d = 4) { return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(d); }
function pair(p) { return Array.isArray(p) ? (p[0] === p[1] ? `${p[0]}` : `${p[0]}×${p[1]}`) : String(p); }

// ---- colour map: the same 5-anchor ramp as krypton_db.heatmap.colormap ----------------------
const ANCHORS = [[0.19, 0.07, 0.23], [0.16, 0.47, 0.93], [0.16, 0.85, 0.55], [0.98, 0.73, 0.18], [0.60, 0.02, 0.01]];
function colormap(v) {
  v = Math.min(Math.max(v, 0), 1) * (ANCHORS.length - 1);
  const i = Math.min(Math.floor(v), ANCHORS.length - 2), f = v - i;
  return ANCHORS[i].map((a, k) => Math.round((a * (1 - f) + ANCHORS[i + 1][k] * f) * 255));
}

// ---- router ----------------------------------------------------------------------------------
async function route() {
  closeLive();
  showError(null);
  const h = location.hash || "#/";
  try {
    catalog = await api("/api/catalog");
    $("#catalog-path").textContent = catalog.path + (catalog.read_only ? " (read-only)" : "");
    let m;
    if ((m = h.match(/^#\/run\/(\d+)/))) return await showRun(+m[1]);
    if ((m = h.match(/^#\/live\/(\d+)\/(\d+)/))) return await showLive(+m[1], +m[2]);
    if (h.startsWith("#/explain")) return showExplain(new URLSearchParams(h.split("?")[1] || ""));
    return showBrowse();
  } catch (err) {
    main().innerHTML = "";
    showError(err.message);
  }
}
window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);

// ---- browse ----------------------------------------------------------------------------------
function showBrowse() {
  const c = catalog;
  const runs = c.runs.map(r => `<tr class="clickable run-row" id="run-${r.id}" data-href="#/run/${r.id}">
      <td>${r.id}</td><td>${esc(r.model)} v${r.model_version}</td><td>${esc(r.image)} v${r.image_version}</td>
      <td>${esc(r.mode)}${r.settings.drilldown ? " + drill-down" : ""}</td><td>${pair(r.settings.patch)}</td><td>${pair(r.settings.stride)}</td>
      <td>${esc(r.label ?? "(predicted)")}</td><td>${r.heatmap_h}×${r.heatmap_w}</td>
      <td>${fmt(r.timings.total_s, 2)} s</td><td>${esc(r.created_at)}</td></tr>`).join("");
  const models = c.models.map(m => `<tr><td>${m.id}</td><td>${esc(m.name)}</td><td>v${m.version}</td>
      <td>${m.input_shape.join("×")}</td><td>${m.num_classes}</td><td>${(m.macs / 1e9).toFixed(2)}</td><td class="muted">${esc(m.source)}</td></tr>`).join("");
  const firstModel = c.models.length ? c.models[c.models.length - 1].id : null;
  const images = c.images.map(i => `<tr><td>${i.id}</td><td><img class="thumb" loading="lazy" src="/api/images/${i.id}/thumb.png" alt=""></td>
      <td>${esc(i.name)}</td><td>v${i.version}</td><td>${i.width}×${i.height}×${i.channels}</td><td>${esc(i.dtype)}</td>
      <td><a href="#/explain?image=${i.id}">explain</a>${firstModel ? ` · <a href="#/live/${firstModel}/${i.id}">live</a>` : ""}</td></tr>`).join("");
  const datasets = (c.datasets || []).map(d => `<tr><td>${d.id}</td><td>${esc(d.model)} v${d.model_version}</td>
      <td>${esc(d.location)}</td><td>${d.images_done}</td><td>${d.images_failed}</td><td>${esc(d.registered_at)}</td></tr>`).join("");
  main().innerHTML = `
    <h2>Runs <span class="muted">(${c.runs.length})</span></h2>
    ${c.runs.length ? `<table id="runs"><tr><th>run</th><th>model</th><th>image</th><th>mode</th><th>patch</th><th>stride</th><th>target</th><th>map</th><th>time</th><th>created</th></tr>${runs}</table>`
                    : `<p class="muted" id="runs-empty">No runs yet. <a href="#/explain">Explain an image</a>.</p>`}
    <h2>Models</h2>
    ${c.models.length ? `<table id="models"><tr><th>id</th><th>name</th><th>version</th><th>input</th><th>classes</th><th>GMACs</th><th>source</th></tr>${models}</table>` : `<p class="muted">No models registered (CREATE MODEL in krypton sql, or record a run from Python).</p>`}
    <h2>Images</h2>
    ${c.images.length ? `<table id="images"><tr><th>id</th><th></th><th>name</th><th>version</th><th>size</th><th>samples</th><th></th></tr>${images}</table>` : `<p class="muted">No images yet.</p>`}
    ${datasets ? `<h2>Datasets</h2><table id="datasets"><tr><th>id</th><th>model</th><th>location</th><th>done</th><th>failed</th><th>registered</th></tr>${datasets}</table>` : ""}`;
  for (const tr of main().querySelectorAll("tr[data-href]")) tr.addEventListener("click", () => { location.hash = tr.dataset.href; });
}

// ---- the image stage: base image, heat map overlay, cursor layer -----------------------------
function makeStage(modelId, imageId, input) {
  const node = $("#stage-template").content.firstElementChild.cloneNode(true);
  const [h, w] = input;
  const scale = Math.max(1, Math.min(4, Math.floor(480 / Math.max(h, w))));
  const img = $("img.base", node), heat = $("canvas.heat", node), cur = $("canvas.cursor", node);
  img.src = `/api/models/${modelId}/images/${imageId}/input.png`;
  img.width = w * scale; img.height = h * scale;
  for (const c of [heat, cur]) { c.width = w * scale; c.height = h * scale; }
  return { node, img, heat, cursor: cur, scale, h, w };
}

function meanCoverage(grid, patch, h, w) {
  // per pixel: mean probability over the patches covering it (NaN where none does)
  const acc = new Float64Array(h * w), cnt = new Uint16Array(h * w);
  const [ph, pw] = patch;
  grid.ys.forEach((y, i) => grid.xs.forEach((x, j) => {
    const v = grid.values[i][j];
    if (v === null) return;
    for (let yy = y; yy < Math.min(y + ph, h); yy++)
      for (let xx = x; xx < Math.min(x + pw, w); xx++) { acc[yy * w + xx] += v; cnt[yy * w + xx] += 1; }
  }));
  for (let k = 0; k < acc.length; k++) acc[k] = cnt[k] ? acc[k] / cnt[k] : NaN;
  return acc;
}

function paintHeat(stage, box, grid, patch, base, opacity) {
  const { heat, scale, h, w } = stage;
  const mean = meanCoverage(grid, patch, h, w);
  let lo = Infinity, hi = -Infinity;
  for (const v of mean) if (!Number.isNaN(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const small = document.createElement("canvas"); small.width = w; small.height = h;
  const ctx = small.getContext("2d"), data = ctx.createImageData(w, h);
  for (let k = 0; k < mean.length; k++) {
    if (Number.isNaN(mean[k])) continue;
    const imp = hi > lo ? (hi - mean[k]) / (hi - lo) : 0;  // low probability = large drop = hot
    const [r, g, b] = colormap(imp);
    data.data.set([r, g, b, Math.round(255 * opacity)], 4 * k);
  }
  ctx.putImageData(data, 0, 0);
  const hc = heat.getContext("2d");
  hc.imageSmoothingEnabled = false;
  hc.clearRect(0, 0, heat.width, heat.height);
  hc.drawImage(small, 0, 0, w * scale, h * scale);
  heat.dataset.painted = "1";
  // colour bar: top = largest drop; labels in drop units when the base probability is known
  const cb = $("canvas.colorbar", box), cc = cb.getContext("2d");
  for (let y = 0; y < cb.height; y++) { const [r, g, b] = colormap(1 - y / (cb.height - 1)); cc.fillStyle = `rgb(${r},${g},${b})`; cc.fillRect(0, y, cb.width, 1); }
  const lab = v => base === null ? `p ${fmt(v, 3)}` : `drop ${fmt(base - v, 3)}`;
  $(".cb-hi", box).textContent = lab(lo); $(".cb-mid", box).textContent = lab((lo + hi) / 2); $(".cb-lo", box).textContent = lab(hi);
}

// ---- a run --------------------------------------------------------------------------------------
async function showRun(id) {
  const run = await api(`/api/runs/${id}`);
  const model = catalog.models.find(m => m.id === run.model_id);
  const hw = model.input_shape.slice(1);  // (C, H, W) as the catalog stores it
  const s = run.settings, t = run.timings;
  main().innerHTML = `
    <h2 id="run-title">Run ${run.id}: ${esc(run.model)} v${run.model_version} on ${esc(run.image)} v${run.image_version}</h2>
    <div class="row">
      <div id="stage-box"></div>
      <div class="panel">
        <dl class="kv">
          <dt>target</dt><dd id="run-label">${esc(run.label ?? "…")}</dd>
          <dt>probability</dt><dd id="run-base">…</dd>
          <dt>patch / stride</dt><dd>${pair(s.patch)} / ${pair(s.stride)}</dd>
          <dt>mode</dt><dd id="run-mode">${esc(run.mode)}${s.tau !== undefined ? ` (tau ${s.tau})` : ""}${s.drilldown ? ` + drill-down ${drillText(s.drilldown)}` : ""}${s.precision ? `, precision ${esc(s.precision)}` : ""}</dd>
          <dt>colour</dt><dd>${esc(JSON.stringify(s.color))}</dd>
          <dt>region</dt><dd>${s.region ? esc(s.region.join(", ")) : "whole image"}</dd>
          <dt>heat map</dt><dd>${run.heatmap_h}×${run.heatmap_w} positions</dd>
          <dt>time</dt><dd id="run-time">${fmt(t.total_s, 3)} s (run ${fmt(t.run_s, 3)} s, JIT ${fmt(t.jit_s, 3)} s, batch ${t.batch_size})</dd>
          <dt>created</dt><dd>${esc(run.created_at)}</dd>
        </dl>
        ${run.all_classes ? `<label>show class <select id="class-select"><option value="">target</option>${run.labels.map((l, k) => `<option value="${k}">${k}: ${esc(l)}</option>`).join("")}</select></label>` : ""}
        <label>overlay opacity <input id="opacity" type="range" min="0" max="1" step="0.05" value="0.55"></label>
        <p class="muted">its values in SQL: <code>SELECT * FROM heatmaps WHERE run_id = ${run.id}</code></p>
      </div>
      <div class="panel" id="live-panel"></div>
    </div>
    <h2>EXPLAIN ANALYZE</h2>
    <p><button id="analyze-btn">Run EXPLAIN ANALYZE of this query</button> <span class="muted">(measured now, on this machine; recorded nowhere)</span></p>
    <pre id="explain-analyze" hidden></pre>`;
  const stage = makeStage(run.model_id, run.image_id, hw);
  $("#stage-box").append(stage.node);
  let grid = run.grid, base = null;
  const draw = () => paintHeat(stage, stage.node, grid, s.patch, base, +$("#opacity").value);
  await new Promise(res => { if (stage.img.complete) res(); else { stage.img.onload = res; stage.img.onerror = res; } });
  draw();
  $("#opacity").addEventListener("input", draw);
  if ($("#class-select")) $("#class-select").addEventListener("change", async e => {
    try { grid = e.target.value === "" ? run.grid : await api(`/api/runs/${id}/classes/${e.target.value}`); draw(); }
    catch (err) { showError(err.message); }
  });
  api(`/api/base?model_id=${run.model_id}&image_id=${run.image_id}&target=${run.target_class ?? ""}`).then(b => {
    if (!$("#run-base")) return;
    base = b.base_prob;
    $("#run-label").textContent = `${b.label} (class ${b.target})`;
    $("#run-base").textContent = `${fmt(b.base_prob, 4)} unoccluded`;
    draw();
  }).catch(err => { if ($("#run-base")) $("#run-base").textContent = `unavailable: ${err.message}`; });
  $("#analyze-btn").addEventListener("click", async () => {
    const pre = $("#explain-analyze"); pre.hidden = false; pre.textContent = "running EXPLAIN ANALYZE…";
    try {
      const r = await api(`/api/runs/${id}/explain-analyze`);
      pre.textContent = r.query + "\n\n" + r.rows.map(([k, v]) => `-- ${k}\n${v}`).join("\n\n");
    } catch (err) { pre.textContent = err.message; }
  });
  startLive(stage, $("#live-panel"), { model_id: run.model_id, image_id: run.image_id, patch: s.patch, color: s.color, target: run.target_class ?? null, precision: s.precision || "fast" },
            { stride: s.stride, mode: run.mode, tau: s.tau, drilldown: s.drilldown, precision: s.precision });
}

// ---- live occlusion: the patch follows the cursor ------------------------------------------------
function closeLive() { if (liveSocket) { liveSocket.onclose = null; liveSocket.close(); liveSocket = null; } }

function startLive(stage, panel, start, region) {
  panel.innerHTML = `
    <label><input type="checkbox" id="live-on" checked> live occlusion (patch ${pair(start.patch)} follows the cursor)</label>
    <div class="big" id="live-prob" data-prob="">–</div>
    <div class="muted" id="live-where">move over the image</div>
    <div class="muted" id="live-status">connecting…</div>
    <ol class="top" id="live-top"></ol>
    <div class="muted">click: pin a position · drag: region query at a finer stride</div>
    <ul class="pins" id="pins"></ul>
    <div id="region-job"></div>`;
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/live`);
  liveSocket = ws;
  const sent = new Map();
  let seq = 0, lastShown = -1, ready = false, lastPos = null, hover = null, drag = null;
  const pins = [];
  const ctx = stage.cursor.getContext("2d");
  const [ph, pw] = start.patch, sc = stage.scale;
  const toInput = ev => {
    const r = stage.cursor.getBoundingClientRect();
    return [(ev.clientY - r.top) / sc, (ev.clientX - r.left) / sc];
  };
  const clampTL = (cy, cx) => [Math.min(Math.max(Math.round(cy - ph / 2), 0), stage.h - ph), Math.min(Math.max(Math.round(cx - pw / 2), 0), stage.w - pw)];
  const redraw = () => {
    ctx.clearRect(0, 0, stage.cursor.width, stage.cursor.height);
    ctx.lineWidth = 2;
    for (const p of pins) { ctx.strokeStyle = "#ffffff"; ctx.strokeRect(p.x * sc, p.y * sc, pw * sc, ph * sc); }
    if (hover) { ctx.fillStyle = "rgba(0,0,0,0.55)"; ctx.fillRect(hover[1] * sc, hover[0] * sc, pw * sc, ph * sc); ctx.strokeStyle = "#ffd400"; ctx.strokeRect(hover[1] * sc, hover[0] * sc, pw * sc, ph * sc); }
    if (drag && drag.moved) { ctx.strokeStyle = "#00e0ff"; ctx.setLineDash([6, 4]); const [y0, x0, y1, x1] = dragBox(); ctx.strokeRect(x0 * sc, y0 * sc, (x1 - x0) * sc, (y1 - y0) * sc); ctx.setLineDash([]); }
  };
  const dragBox = () => {
    const y0 = Math.floor(Math.max(0, Math.min(drag.y0, drag.y1))), y1 = Math.ceil(Math.min(stage.h, Math.max(drag.y0, drag.y1)));
    const x0 = Math.floor(Math.max(0, Math.min(drag.x0, drag.x1))), x1 = Math.ceil(Math.min(stage.w, Math.max(drag.x0, drag.x1)));
    return [y0, x0, y1, x1];
  };
  const probe = (y, x) => {
    if (!ready || !$("#live-on").checked) return;
    if (lastPos && lastPos[0] === y && lastPos[1] === x) return;
    lastPos = [y, x]; seq += 1; sent.set(seq, performance.now());
    ws.send(JSON.stringify({ type: "probe", y, x, seq }));
  };
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", ...start }));
  ws.onclose = () => { if ($("#live-status")) $("#live-status").textContent = "live occlusion disconnected (reload the page)"; };
  ws.onmessage = ev => {
    const m = JSON.parse(ev.data);
    const status = $("#live-status");
    if (!status) return;
    if (m.type === "ready") { ready = true; status.textContent = "ready"; return; }
    if (m.type === "error") { status.textContent = m.error; status.classList.add("field-error"); return; }
    if (m.type === "busy") {  // ask again shortly unless the cursor moved on meanwhile
      status.textContent = m.message; lastPos = null;
      const asked = m.seq;
      setTimeout(() => { if (seq === asked && !lastPos) probe(m.y, m.x); }, 250);
      return;
    }
    if (m.type !== "probe" || m.seq < lastShown) return;  // an older answer after a newer one
    lastShown = m.seq;
    const ms = performance.now() - (sent.get(m.seq) ?? performance.now());
    for (const k of sent.keys()) if (k <= m.seq) sent.delete(k);
    window.kryptonLive.latencies.push(ms);
    window.kryptonLive.last = m;
    const pin = pins.find(p => p.pending && p.y === m.y && p.x === m.x);
    if (pin) { pin.pending = false; pin.prob = m.prob; renderPins(); }
    const el = $("#live-prob");
    el.textContent = `p(${m.label}) = ${m.prob.toFixed(6)}`;
    el.dataset.prob = String(m.prob); el.dataset.y = m.y; el.dataset.x = m.x; el.dataset.seq = m.seq;
    $("#live-where").textContent = `patch at y=${m.y}, x=${m.x} · unoccluded ${m.base_prob.toFixed(4)} · drop ${(m.base_prob - m.prob).toFixed(4)}`;
    status.classList.remove("field-error");
    status.textContent = `${ms.toFixed(1)} ms in the browser (server ${m.server_ms.toFixed(1)} ms, views ${m.views})`;
    $("#live-top").innerHTML = m.top.map(c => `<li>${esc(c.label)}: ${c.prob.toFixed(4)}</li>`).join("");
  };
  const renderPins = () => {
    $("#pins").innerHTML = pins.map(p => `<li>y=${p.y}, x=${p.x}: ${p.pending ? "…" : p.prob.toFixed(6)}</li>`).join("");
  };
  const c = stage.cursor;
  c.addEventListener("mousemove", ev => {
    const [cy, cx] = toInput(ev);
    if (drag) { drag.y1 = cy; drag.x1 = cx; drag.moved = drag.moved || Math.hypot(cy - drag.y0, cx - drag.x0) > 3; }
    hover = clampTL(cy, cx); redraw(); if (!drag || !drag.moved) probe(hover[0], hover[1]);
  });
  c.addEventListener("mouseleave", () => { hover = null; drag = null; redraw(); });
  c.addEventListener("mousedown", ev => { const [cy, cx] = toInput(ev); drag = { y0: cy, x0: cx, y1: cy, x1: cx, moved: false }; });
  c.addEventListener("mouseup", ev => {
    const d = drag; drag = null;
    if (d && d.moved) { drag = d; const box = dragBox(); drag = null; redraw(); regionQuery(box); return; }
    const [cy, cx] = toInput(ev); const [y, x] = clampTL(cy, cx);
    pins.push({ y, x, pending: true, prob: null }); renderPins(); lastPos = null; probe(y, x); redraw();
  });

  async function regionQuery([y0, x0, y1, x1]) {
    if (!region) return;
    const box = $("#region-job");
    const stride = [Math.max(1, Math.floor(region.stride[0] / 2)), Math.max(1, Math.floor(region.stride[1] / 2))];
    // the region holds patch top-left corners; the drag box is where the patch may go
    const r = [y0, x0, Math.min(stage.h - ph + 1, Math.max(y1 - ph + 1, y0 + 1)), Math.min(stage.w - pw + 1, Math.max(x1 - pw + 1, x0 + 1))];
    const form = { patch: start.patch, stride, color: start.color, target: start.target, region: r,
                   mode: region.drilldown ? "drilldown" : region.mode, precision: region.precision || "fast" };
    if (region.mode === "approximate" && region.tau !== undefined) form.tau = region.tau;
    if (region.drilldown) form.drilldown = drillSpec(region.drilldown);
    box.innerHTML = `<p>region (${r.join(", ")}) at stride ${pair(stride)}</p>`;
    await runJob({ model_id: start.model_id, image_id: start.image_id, ...form }, box);
  }
}

// a run's drill-down settings as an explanation request sends them: 'refine' takes no r,
// 'drop' (the default rule) is left out
function drillSpec(d) {
  const out = { speedup: d.speedup };
  if (d.select !== "refine") out.r = d.r;
  if (d.select && d.select !== "drop") out.select = d.select;
  return out;
}

function drillText(d) {
  if (d.select === "refine") return `refine, ${d.speedup}x`;
  return `r ${d.r}, ${d.speedup}x${d.select === "uncertainty" ? ", uncertainty" : ""}`;
}

async function showLive(modelId, imageId) {
  const model = catalog.models.find(m => m.id === modelId), image = catalog.images.find(i => i.id === imageId);
  if (!model || !image) throw new Error(`no model ${modelId} or image ${imageId} in the catalog`);
  const hw = model.input_shape.slice(1);
  main().innerHTML = `<h2>Live occlusion: ${esc(model.name)} v${model.version} on ${esc(image.name)} v${image.version}</h2>
    <label>patch <input id="live-patch" type="number" min="1" value="16"></label>
    <div class="row"><div id="stage-box"></div><div class="panel" id="live-panel"></div></div>`;
  const stage = makeStage(modelId, imageId, hw);
  $(".colorbar-box", stage.node).hidden = true;
  $("#stage-box").append(stage.node);
  const go = () => { closeLive(); const p = +$("#live-patch").value; startLive(stage, $("#live-panel"), { model_id: modelId, image_id: imageId, patch: [p, p], color: 0.0, target: null }, null); };
  $("#live-patch").addEventListener("change", go);
  go();
}

// ---- explain: form, progress, then the run --------------------------------------------------------
function showExplain(params) {
  const c = catalog;
  const imageSel = params.get("image");
  const opt = (v, t, sel) => `<option value="${v}"${sel ? " selected" : ""}>${esc(t)}</option>`;
  main().innerHTML = `
    <h2>Explain an image</h2>
    ${c.read_only ? `<p class="field-error">This viewer opened the catalog read-only: explanations and uploads are off.</p>` : ""}
    <form id="explain-form" class="panel">
      <label>model <select id="f-model">${c.models.map(m => opt(m.id, `${m.name} v${m.version} (${m.input_shape.join("×")}, ${m.num_classes} classes)`, false)).join("")}</select></label>
      <label>image <select id="f-image">${c.images.map(i => opt(i.id, `${i.name} v${i.version} (${i.width}×${i.height})`, String(i.id) === imageSel)).join("")}</select>
        or upload <input type="file" id="f-upload"></label>
      <div id="upload-error" class="field-error" role="alert"></div>
      <label>patch <input id="f-patch" type="number" min="1" value="16"></label>
      <label>stride <input id="f-stride" type="number" min="1" value="8"></label>
      <label>colour (0–1, or r,g,b) <input id="f-color" type="text" value="0"></label>
      <label>target <select id="f-target"><option value="">predicted class</option></select></label>
      <label>mode <select id="f-mode">${opt("exact", "exact (IVM)", true)}${opt("approximate", "approximate (projective-field threshold tau)")}${opt("drilldown", "adaptive drill-down")}</select></label>
      <label>tau (approximate; empty: the tuned tau) <input id="f-tau" type="text" value=""></label>
      <label>drill-down r / speedup <input id="f-r" type="text" value="0.25" size="4"> <input id="f-speedup" type="text" value="3" size="4"></label>
      <label>drill-down rule <select id="f-select">${opt("drop", "two stages, stage 2 at the largest estimated drop", true)}${opt("uncertainty", "two stages, stage 2 where the estimate is least certain")}${opt("refine", "adaptive refinement (no r)")}</select></label>
      <label>region y0, x0, y1, x1 (empty: whole image) <input id="f-region" type="text" value=""></label>
      <label>precision <select id="f-precision">${opt("fast", "fast (Winograd convolutions)", true)}${opt("exact", "exact (direct convolutions, closer to ONNX Runtime)")}</select></label>
      <button type="submit" id="f-run"${c.read_only ? " disabled" : ""}>Explain</button>
    </form>
    <div id="job"></div>`;
  const loadLabels = async () => {
    const mid = $("#f-model").value;
    if (!mid) return;
    try {
      const { labels } = await api(`/api/models/${mid}/labels`);
      $("#f-target").innerHTML = `<option value="">predicted class</option>` + labels.map((l, k) => `<option value="${k}">${k}: ${esc(l)}</option>`).join("");
    } catch (err) { showError(err.message); }
  };
  $("#f-model").addEventListener("change", loadLabels);
  loadLabels();
  $("#f-upload").addEventListener("change", async ev => {
    const f = ev.target.files[0];
    $("#upload-error").textContent = "";
    if (!f) return;
    try {
      const img = await api(`/api/uploads?name=${encodeURIComponent(f.name)}`, { method: "POST", headers: { "x-krypton": "1" }, body: f });
      const sel = $("#f-image");
      if (![...sel.options].some(o => o.value === String(img.id))) sel.insertAdjacentHTML("beforeend", opt(img.id, `${img.name} v${img.version} (${img.width}×${img.height})`, false));
      sel.value = String(img.id);
      $("#upload-error").textContent = "";
    } catch (err) { $("#upload-error").textContent = `upload refused: ${err.message}`; }
  });
  $("#explain-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const num = s => (s.trim() === "" ? null : Number(s));
    const list = s => (s.trim() === "" ? null : s.split(",").map(v => Number(v.trim())));
    const color = list($("#f-color").value);
    const mode = $("#f-mode").value;
    const body = { model_id: +$("#f-model").value, image_id: +$("#f-image").value,
                   patch: num($("#f-patch").value), stride: num($("#f-stride").value),
                   color: color && color.length === 1 ? color[0] : color,
                   target: $("#f-target").value === "" ? null : +$("#f-target").value,
                   region: list($("#f-region").value), mode, precision: $("#f-precision").value };
    if (mode === "approximate" && $("#f-tau").value.trim() !== "") body.tau = num($("#f-tau").value);
    if (mode === "drilldown") body.drilldown = drillSpec({ r: num($("#f-r").value), speedup: num($("#f-speedup").value), select: $("#f-select").value });
    await runJob(body, $("#job"));
  });
}

async function runJob(body, box) {
  showError(null);
  let job;
  try { job = await api("/api/explain", { method: "POST", headers: { "content-type": "application/json", "x-krypton": "1" }, body: JSON.stringify(body) }); }
  catch (err) { showError(err.message); box.innerHTML = ""; return; }
  box.innerHTML = `<div class="progress" id="progress"><div></div></div><div id="progress-text" class="muted"></div>`;
  const bar = $("#progress > div", box), text = $("#progress-text", box);
  for (;;) {
    const total = job.total || job.positions;
    bar.style.width = `${total ? (100 * job.done / total).toFixed(1) : 0}%`;
    text.textContent = `${job.state}: ${job.done} of ${total} positions · ${job.elapsed_s.toFixed(1)} s elapsed · ETA ${job.eta_s == null ? "–" : job.eta_s.toFixed(1) + " s"} (cost model: ${job.estimate_s == null ? "–" : job.estimate_s.toFixed(1)} s)`;
    if (job.state === "done") { location.hash = `#/run/${job.run_id}`; return; }
    if (job.state === "failed") { showError(job.error); return; }
    await new Promise(r => setTimeout(r, 250));
    try { job = await api(`/api/jobs/${job.id}`); } catch (err) { showError(err.message); return; }
  }
}
