// USE shard browser: a static page over data/index.js (samples, segments, texts, stats) and
// data/masks-NNNNN.js (COCO RLE strings, loaded per chunk with <script> tags: pages opened from disk
// may not fetch). No library: the RLE decoder follows pycocotools' rleFrString.
"use strict";

const D = window.USE_BROWSE;
const S = window.USE_SEARCH || null;
const PAGE = 24;
const PALETTE = [[255, 179, 0], [0, 200, 255], [255, 64, 129], [118, 255, 3], [170, 0, 255], [255, 109, 0],
  [0, 230, 118], [41, 121, 255], [255, 23, 68], [198, 255, 0], [213, 0, 249], [0, 229, 255]];
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

const state = {view: "stats", text: "", source: "", areaMin: 0, areaMax: 100, page: 0, ranked: null};
const masks = {};          // key -> [RLE counts string per segment]
const loading = {};        // chunk -> [callbacks]
const thumbMasks = {};     // key -> [Uint8Array tw*th per segment]

// ---- data ---------------------------------------------------------------------------------------
window.USE_BROWSE_MASKS = function (chunk, data) {
  Object.assign(masks, data);
  const cbs = loading[chunk] || [];
  loading[chunk] = "done";
  cbs.forEach((cb) => cb());
};

function withMasks(index, cb) {
  const s = D.samples[index];
  if (masks[s.k]) { cb(); return; }
  const chunk = Math.floor(index / D.chunk);
  if (loading[chunk] === "done") { cb(); return; }
  if (loading[chunk]) { loading[chunk].push(cb); return; }
  loading[chunk] = [cb];
  const tag = document.createElement("script");
  tag.src = "data/masks-" + String(chunk).padStart(5, "0") + ".js";
  document.body.appendChild(tag);
}

// COCO compressed RLE string -> run lengths (pycocotools rleFrString; arithmetic, not 32-bit shifts)
function rleCounts(s) {
  const cnts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1, c = 0;
    while (more) {
      c = s.charCodeAt(p) - 48;
      x += (c & 0x1f) * Math.pow(2, 5 * k);
      more = c & 0x20; p++; k++;
      if (!more && (c & 0x10)) x -= Math.pow(2, 5 * k);
    }
    if (cnts.length > 2) x += cnts[cnts.length - 2];
    cnts.push(x);
  }
  return cnts;
}

// the mask at thumbnail size: full-size column-major decode, then nearest sampling
function thumbMask(counts, w, h, tw, th) {
  const full = new Uint8Array(w * h);
  const runs = rleCounts(counts);
  let pos = 0;
  for (let i = 0; i < runs.length; i++) {
    if (i % 2 === 1) full.fill(1, pos, Math.min(pos + runs[i], full.length));
    pos += runs[i];
  }
  const out = new Uint8Array(tw * th);
  for (let ty = 0; ty < th; ty++) {
    const y = Math.min(h - 1, Math.floor((ty + 0.5) * h / th));
    for (let tx = 0; tx < tw; tx++) {
      const x = Math.min(w - 1, Math.floor((tx + 0.5) * w / tw));
      out[ty * tw + tx] = full[x * h + y];
    }
  }
  return out;
}

function sampleMasks(s) {
  if (!thumbMasks[s.k]) thumbMasks[s.k] = masks[s.k].map((c) => thumbMask(c, s.w, s.h, s.tw, s.th));
  return thumbMasks[s.k];
}

// ---- filters ------------------------------------------------------------------------------------
function segmentPasses(s, seg) {
  const pct = 100 * seg[1] / Math.max(1, s.w * s.h);
  if (pct < state.areaMin || pct > state.areaMax) return false;
  const q = state.text.trim().toLowerCase();
  const src = state.source === "" ? -1 : Number(state.source);
  if (!q && src < 0) return true;
  return seg[3].some((t) => (!q || t[0].toLowerCase().includes(q)) && (src < 0 || t[1] === src));
}

function filtersActive() {
  return state.text.trim() !== "" || state.source !== "" || state.areaMin > 0 || state.areaMax < 100;
}

// [{index, segs: Set of segment positions shown, score}]
function visibleItems() {
  if (state.ranked) return state.ranked;
  const out = [];
  let nSeg = 0;
  D.samples.forEach((s, index) => {
    const segs = new Set();
    s.g.forEach((seg, i) => { if (segmentPasses(s, seg)) segs.add(i); });
    nSeg += segs.size;
    if (segs.size || !filtersActive()) out.push({index, segs});
  });
  out.nSegments = nSeg;
  return out;
}

// ---- drawing ------------------------------------------------------------------------------------
// masks go on a transparent canvas over the <img>: a canvas that had a file:// image drawn on it is
// "tainted" in Chromium and cannot be read back, so the image itself is never drawn on a canvas
function drawCard(card, s, shown, hover, selected) {
  const canvas = card.querySelector("canvas");
  const ctx = canvas.getContext("2d");
  if (!masks[s.k]) return;
  const ms = sampleMasks(s);
  const img = ctx.createImageData(s.tw, s.th);
  const px = img.data;
  const focus = hover >= 0 ? hover : selected;
  shown.forEach((i) => {
    const m = ms[i];
    const [r, g, b] = PALETTE[i % PALETTE.length];
    const a = Math.round(255 * (focus < 0 ? 0.45 : (i === focus ? 0.6 : 0.12)));
    for (let p = 0; p < m.length; p++) {
      if (!m[p]) continue;
      const o = 4 * p;
      px[o] = r; px[o + 1] = g; px[o + 2] = b; px[o + 3] = Math.max(px[o + 3], a);
    }
  });
  if (focus >= 0 && shown.has(focus)) {  // outline of the focused segment
    const m = ms[focus], tw = s.tw, th = s.th;
    for (let y = 0; y < th; y++) for (let x = 0; x < tw; x++) {
      const p = y * tw + x;
      if (!m[p]) continue;
      if (x === 0 || y === 0 || x === tw - 1 || y === th - 1 || !m[p - 1] || !m[p + 1] || !m[p - tw] || !m[p + tw]) {
        const o = 4 * p; px[o] = 255; px[o + 1] = 255; px[o + 2] = 255; px[o + 3] = 255;
      }
    }
  }
  ctx.putImageData(img, 0, 0);
}

function segmentAt(s, shown, x, y) {
  if (!masks[s.k]) return -1;
  const ms = sampleMasks(s);
  const p = y * s.tw + x;
  let best = -1;
  shown.forEach((i) => {  // the smallest segment under the pointer: small objects over large ones
    if (ms[i][p] && (best < 0 || s.g[i][1] < s.g[best][1])) best = i;
  });
  return best;
}

function showDetails(s, i, score) {
  const seg = s.g[i];
  const texts = seg[3].map((t) => `<li class="text">${esc(t[0])} <span class="src">${esc(D.sources[t[1]])}</span> ` +
    `<span class="sc">${t[2].toFixed(3)}</span></li>`).join("");
  $("details").innerHTML = `<h3>${esc(s.k)} : segment ${seg[0]}</h3>` +
    `<p class="muted">shard ${esc(s.sh)} · area ${seg[1]} px (${(100 * seg[1] / (s.w * s.h)).toFixed(2)}%) · mask score ${seg[2].toFixed(3)}` +
    (score !== undefined ? ` · query score <span class="sc">${score.toFixed(4)}</span>` : "") + `</p>` +
    `<h3>Texts (${seg[3].length})</h3><ul id="segment-texts">${texts}</ul>` +
    (s.cap.length ? `<h3>Captions</h3><ul>${s.cap.map((c) => `<li>${esc(c)}</li>`).join("")}</ul>` : "");
}

function makeCard(item) {
  const s = D.samples[item.index];
  const card = document.createElement("div");
  card.className = "card";
  card.dataset.key = s.k;
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.alt = s.k;
  const canvas = document.createElement("canvas");
  canvas.width = s.tw; canvas.height = s.th;
  frame.append(img, canvas);
  const label = document.createElement("div");
  label.className = "label";
  label.innerHTML = (item.score !== undefined ? `<span class="score">${item.score.toFixed(3)}</span> ` : "") +
    `${esc(s.k)} · ${item.segs.size}/${s.g.length} segments`;
  card.append(frame, label);
  let hover = -1, selected = item.focus !== undefined ? item.focus : -1;
  const redraw = () => drawCard(card, s, item.segs, hover, selected);
  const pos = (ev) => {
    const r = canvas.getBoundingClientRect();
    return [Math.min(s.tw - 1, Math.floor((ev.clientX - r.left) * s.tw / r.width)),
            Math.min(s.th - 1, Math.floor((ev.clientY - r.top) * s.th / r.height))];
  };
  canvas.addEventListener("mousemove", (ev) => {
    const i = segmentAt(s, item.segs, ...pos(ev));
    if (i !== hover) { hover = i; redraw(); }
  });
  canvas.addEventListener("mouseleave", () => { hover = -1; redraw(); });
  canvas.addEventListener("click", (ev) => {
    const i = segmentAt(s, item.segs, ...pos(ev));
    if (i >= 0) { selected = i; showDetails(s, i, item.score); redraw(); }
  });
  img.onload = () => withMasks(item.index, () => { card.dataset.ready = "1"; redraw(); });
  img.src = "images/" + s.k + ".jpg";
  return card;
}

// ---- views --------------------------------------------------------------------------------------
function renderGrid() {
  const items = visibleItems();
  const pages = Math.max(1, Math.ceil(items.length / PAGE));
  state.page = Math.min(state.page, pages - 1);
  const grid = $("grid");
  grid.innerHTML = "";
  items.slice(state.page * PAGE, (state.page + 1) * PAGE).forEach((it) => grid.appendChild(makeCard(it)));
  $("page-info").textContent = `Page ${state.page + 1} of ${pages}`;
  $("prev").disabled = state.page === 0;
  $("next").disabled = state.page >= pages - 1;
  $("match-info").textContent = state.ranked ? `${items.length} best segments for "${state.rankedText}"`
    : filtersActive() ? `${items.nSegments} segments in ${items.length} samples match` : `${items.length} samples`;
}

function histogram(name, h) {
  const top = Math.max(1, ...h.counts);
  const rows = h.labels.map((l, i) => `<div class="row"><span class="lab" title="${esc(l)}">${esc(l)}</span>` +
    `<span class="bar" style="width:${(220 * h.counts[i] / top).toFixed(1)}px"></span><span>${h.counts[i]}</span></div>`).join("");
  return `<div class="hist"><h3>${esc(name)}</h3>${rows}</div>`;
}

function renderStats() {
  const st = D.stats;
  const rows = [["shards", st.shards], ["images", st.images], ["segments", st.segments], ["texts", st.texts],
    ["failures", st.failures], ["samples in this site", st.shown], ["shard bytes", st.bytes]];
  $("view-stats").innerHTML = `<h2>Shard set</h2><table id="stats-table">` +
    rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join("") + `</table>` +
    `<div class="stats-grid">${Object.entries(D.histograms).map(([k, h]) => histogram(k, h)).join("")}</div>`;
}

function renderFailures() {
  const f = D.failures;
  $("view-failures").innerHTML = `<h2>Failures (${f.length})</h2>` + (f.length ? `<table id="failures-table">` +
    `<tr><th>key</th><th>stage</th><th>reason</th></tr>` +
    f.map((r) => `<tr><td>${esc(r.key)}</td><td>${esc(r.stage)}</td><td>${esc(r.error)}</td></tr>`).join("") +
    `</table>` : `<p class="muted">No failures recorded.</p>`);
}

function show(view) {
  state.view = view;
  for (const v of ["stats", "grid", "failures"]) {
    $("view-" + v).hidden = v !== view;
    $("tab-" + v).classList.toggle("active", v === view);
  }
  if (view === "grid") renderGrid();
}

// ---- semantic query over an exported index (python -m evaluation query INDEX --html SITE) -------
function halfs(b64) {
  const bin = atob(b64), u16 = new Uint16Array(bin.length / 2);
  for (let i = 0; i < u16.length; i++) u16[i] = bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8);
  const out = new Float32Array(u16.length);
  for (let i = 0; i < u16.length; i++) {
    const h = u16[i], e = (h >> 10) & 31, m = h & 1023, sign = h & 32768 ? -1 : 1;
    out[i] = sign * (e === 0 ? m * Math.pow(2, -24) : e === 31 ? (m ? NaN : Infinity) : (1 + m / 1024) * Math.pow(2, e - 15));
  }
  return out;
}

function setupQuery() {
  if (!S) return;
  $("query-box").hidden = false;
  const vec = halfs(S.vectors), tvec = halfs(S.text_vectors), dim = S.dim;
  const where = {};
  D.samples.forEach((s, index) => s.g.forEach((seg, i) => { where[s.k + ":" + seg[0]] = [index, i]; }));
  $("query-texts").innerHTML = S.texts.slice(0, 2000).map((t) => `<option value="${esc(t)}">`).join("");
  $("query").addEventListener("change", () => {
    const text = $("query").value.trim();
    let t = S.texts.indexOf(text);
    if (t < 0) t = S.texts.findIndex((x) => x.toLowerCase().includes(text.toLowerCase()));
    if (!text || t < 0) { state.ranked = null; $("match-info").textContent = text ? `"${text}" is not in the exported vocabulary` : ""; renderGrid(); return; }
    const q = tvec.subarray(t * dim, (t + 1) * dim);
    const scored = S.segments.map((name, r) => {
      let dot = 0;
      for (let j = 0; j < dim; j++) dot += q[j] * vec[r * dim + j];
      return [dot, name];
    }).filter((x) => where[x[1]]).sort((a, b) => b[0] - a[0]).slice(0, 4 * PAGE);
    state.ranked = scored.map(([score, name]) => ({index: where[name][0], segs: new Set([where[name][1]]), score, focus: where[name][1]}));
    state.rankedText = S.texts[t];
    state.page = 0;
    show("grid");
  });
  $("query-clear").addEventListener("click", () => { $("query").value = ""; state.ranked = null; renderGrid(); });
}

// ---- wiring -------------------------------------------------------------------------------------
function init() {
  $("title").textContent = D.title;
  $("failure-count").textContent = `(${D.failures.length})`;
  D.sources.forEach((src, i) => {
    const o = document.createElement("option");
    o.value = String(i); o.textContent = src;
    $("source").appendChild(o);
  });
  document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));
  const refilter = () => {
    state.text = $("search").value;
    state.source = $("source").value;
    state.areaMin = Number($("area-min").value) || 0;
    state.areaMax = $("area-max").value === "" ? 100 : Number($("area-max").value);
    state.page = 0;
    state.ranked = null;
    show("grid");
  };
  for (const id of ["search", "area-min", "area-max"]) $(id).addEventListener("input", refilter);
  $("source").addEventListener("change", refilter);
  $("prev").addEventListener("click", () => { state.page--; renderGrid(); });
  $("next").addEventListener("click", () => { state.page++; renderGrid(); });
  renderStats();
  renderFailures();
  setupQuery();
  show("stats");
}

init();
