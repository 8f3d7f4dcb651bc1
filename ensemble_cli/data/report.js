// Draws the run report from the JSON in #run-data: no library and no network, so the file opens anywhere.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("run-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = { size: "#1f77b4", up: "#2ca02c", waiting: "#ff7f0e", running: "#9467bd" };
  const LABELS = { size: "requested size", up: "nodes up", waiting: "jobs waiting", running: "jobs running" };
  const RESULT_COLORS = {
    succeeded: "#4c9be8", failed: "#d62728", lost: "#ff9f1c", cancelled: "#999999", unfinished: "#c9c9c9",
  };
  const ACTION_COLORS = { scale: "#000000", submit: "#17becf", terminate: "#d62728", complete: "#2ca02c" };
  const tip = document.getElementById("tip");

  function el(tag, parent, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (attrs) for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }
  function sv(tag, parent, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    parent.appendChild(node);
    return node;
  }
  function showTip(event, lines) {
    tip.textContent = "";
    for (const line of lines) el("div", tip, line);
    tip.style.display = "block";
    const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    const y = Math.min(event.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }
  function hideTip() { tip.style.display = "none"; }
  function seconds(s) {
    if (s === null || s === undefined) return "-";
    if (Math.abs(s) < 120) return s.toFixed(1) + " s";
    if (Math.abs(s) < 7200) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  }
  function ticks(max, count, integer) {
    const raw = max / count;
    const power = Math.pow(10, Math.floor(Math.log10(raw || 1)));
    let step = [1, 2, 5, 10].map(f => f * power).find(s => s >= raw) || power * 10;
    if (integer) step = Math.max(1, Math.ceil(step));
    const out = [];
    for (let v = 0; out.length < 100; v += step) {
      out.push(Math.round(v * 1e6) / 1e6);
      if (v >= max - 1e-9) break;
    }
    return out;
  }
  function maxOf(arrays) {
    let m = 0;
    for (const a of arrays) for (const v of a || []) if (v !== null && v > m) m = v;
    return m;
  }

  // the common time axis of every chart
  let tmax = 1;
  for (const m of D.members) {
    tmax = Math.max(tmax, maxOf([m.series.t, m.jobs.e, m.jobs.s, m.recorded ? m.recorded.t : []]));
    for (const d of m.decisions) tmax = Math.max(tmax, d[0]);
  }

  function legend(parent, recorded, decisions) {
    const box = el("div", parent, null, { class: "legend" });
    for (const key of ["size", "up", "waiting", "running"]) {
      const item = el("span", box);
      el("i", item, null, { style: "border-color:" + COLORS[key] });
      item.appendChild(document.createTextNode(LABELS[key] + (key === "size" || key === "up" ? " (nodes, left)" : " (jobs, right)")));
    }
    if (recorded) {
      const item = el("span", box);
      el("i", item, null, { class: "dash", style: "border-color:#555" });
      item.appendChild(document.createTextNode("recorded run (dashed, same colours)"));
    }
    if (decisions) {
      const item = el("span", box);
      item.appendChild(document.createTextNode("▲▼● decision (hover for its reason; grey: not applied)"));
    }
  }

  function stepPath(ts, vs, x, y) {
    if (!ts.length || !vs.length) return "";
    let d = "M" + x(ts[0]).toFixed(1) + "," + y(vs[0]).toFixed(1);
    for (let i = 1; i < ts.length; i++) d += "H" + x(ts[i]).toFixed(1) + "V" + y(vs[i]).toFixed(1);
    return d;
  }

  function timeline(parent, m) {
    const W = 960, H = 280, L = 52, R = 52, T = 12, B = 40;
    const rec = m.recorded;
    const decided = m.decisions.filter(d => d[2] !== null).map(d => d[2]);
    const nodesMax = Math.max(1, maxOf([m.series.size, m.series.up, rec ? rec.size : [], rec ? rec.up : [], decided]));
    const jobsMax = Math.max(1, maxOf([m.series.waiting, m.series.running, rec ? rec.waiting : [], rec ? rec.running : []]));
    const nodeTicks = ticks(nodesMax, 5, true), jobTicks = ticks(jobsMax, 5, true);
    const nTop = nodeTicks[nodeTicks.length - 1] || 1, jTop = jobTicks[jobTicks.length - 1] || 1;
    const x = t => L + (t / tmax) * (W - L - R);
    const yN = v => T + (1 - v / nTop) * (H - T - B);
    const yJ = v => T + (1 - v / jTop) * (H - T - B);
    const svg = sv("svg", parent, { class: "timeline", viewBox: "0 0 " + W + " " + H, "data-member": m.index });
    for (const v of nodeTicks) {
      sv("line", svg, { class: "grid", x1: L, x2: W - R, y1: yN(v), y2: yN(v) });
      sv("text", svg, { x: L - 6, y: yN(v) + 4, "text-anchor": "end" }).textContent = v;
    }
    for (const v of jobTicks) sv("text", svg, { x: W - R + 6, y: yJ(v) + 4 }).textContent = v;
    for (const t of ticks(tmax, 8, false).filter(t => t <= tmax)) {
      sv("line", svg, { class: "axis", x1: x(t), x2: x(t), y1: H - B, y2: H - B + 4 });
      sv("text", svg, { x: x(t), y: H - B + 16, "text-anchor": "middle" }).textContent = t;
    }
    sv("line", svg, { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B });
    sv("text", svg, { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }).textContent = "seconds since the run started";
    sv("text", svg, { x: 14, y: (T + H - B) / 2, transform: "rotate(-90 14 " + (T + H - B) / 2 + ")", "text-anchor": "middle" }).textContent = "nodes";
    sv("text", svg, { x: W - 12, y: (T + H - B) / 2, transform: "rotate(90 " + (W - 12) + " " + (T + H - B) / 2 + ")", "text-anchor": "middle" }).textContent = "jobs";
    const draw = (s, dashed) => {
      for (const key of ["size", "up", "waiting", "running"]) {
        const y = key === "size" || key === "up" ? yN : yJ;
        const d = stepPath(s.t, s[key], x, y);
        if (!d) continue;
        sv("path", svg, {
          class: "series " + key + (dashed ? " recorded" : ""), d: d, fill: "none", stroke: COLORS[key],
          "stroke-width": dashed ? 1.4 : 1.8, "stroke-dasharray": dashed ? "6 3" : "none", opacity: dashed ? 0.7 : 1,
        });
      }
    };
    if (rec) draw(rec, true);
    draw(m.series, false);
    let lastSize = m.series.size.length ? m.series.size[0] : 0;
    m.decisions.forEach((d, i) => {
      const [t, action, size, reason, outcome] = d;
      const cx = x(t), cy = size !== null ? yN(size) : T + 5;
      let shape;
      const color = ACTION_COLORS[action] || "#8c564b";
      if (action === "scale") {
        const up = size >= lastSize;
        lastSize = size;
        const pts = up ? [[cx, cy - 6], [cx - 5, cy + 4], [cx + 5, cy + 4]] : [[cx, cy + 6], [cx - 5, cy - 4], [cx + 5, cy - 4]];
        shape = sv("polygon", svg, { class: "decision", points: pts.map(p => p.join(",")).join(" "), fill: "#fff" });
      } else {
        shape = sv("circle", svg, { class: "decision", cx: cx, cy: cy, r: 4, fill: color });
      }
      shape.setAttribute("data-index", i);
      if (outcome.startsWith("not applied")) shape.classList.add("not-applied");
      const lines = [
        "member " + m.index + " at " + seconds(t) + ": " + action + (size !== null ? " to " + size : ""),
        reason || "(no reason given)",
        outcome,
      ];
      shape.addEventListener("mouseenter", e => showTip(e, lines));
      shape.addEventListener("mousemove", e => showTip(e, lines));
      shape.addEventListener("mouseleave", hideTip);
    });
  }

  function gantt(parent, m) {
    const J = m.jobs, n = J.n.length;
    const started = [];
    for (let k = 0; k < n; k++) if (J.s[k] !== null) started.push(k);
    if (!started.length) {
      el("p", parent, n ? "no attempt of this member started" : "no job attempts in this source", { class: "note" });
      return;
    }
    started.sort((a, b) => J.s[a] - J.s[b]);
    const widths = Array.from(new Set(started.map(k => J.n[k]))).sort((a, b) => b - a);
    const lanes = new Map(widths.map(w => [w, []]));   // per width: lane -> end time
    const members = new Map(widths.map(w => [w, []])); // per width: lane -> attempts in start order
    const lane = new Int32Array(n);
    for (const k of started) {
      const ends = lanes.get(J.n[k]);
      let l = ends.findIndex(end => end <= J.s[k]);
      if (l < 0) { l = ends.length; ends.push(0); members.get(J.n[k]).push([]); }
      ends[l] = J.e[k] === null ? tmax : J.e[k];
      lane[k] = l;
      members.get(J.n[k])[l].push(k);
    }
    const total = widths.reduce((sum, w) => sum + lanes.get(w).length * w, 0);
    const unit = Math.max(0.4, Math.min(8, 420 / total));
    const W = 960, L = 70, R = 52, T = 6, B = 34, GAP = 6;
    const bands = [];
    let y = T;
    for (const w of widths) {
      const h = lanes.get(w).length * w * unit;
      bands.push({ w: w, y: y, h: h });
      y += h + GAP;
    }
    const H = Math.ceil(y + B);
    const canvas = el("canvas", parent, null, { class: "gantt", "data-member": m.index, "data-attempts": started.length });
    const ratio = window.devicePixelRatio || 1;
    canvas.width = W * ratio; canvas.height = H * ratio;
    canvas.style.aspectRatio = W + " / " + H;
    const g = canvas.getContext("2d");
    g.scale(ratio, ratio);
    g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
    const x = t => L + (t / tmax) * (W - L - R);
    g.font = "11px system-ui, sans-serif";
    for (const band of bands) {
      g.fillStyle = "#f4f4f4"; g.fillRect(L, band.y, W - L - R, band.h);
      g.fillStyle = "#444"; g.textAlign = "right"; g.textBaseline = "middle";
      g.fillText(band.w + (band.w === 1 ? " node" : " nodes"), L - 6, band.y + band.h / 2);
      const laneH = band.w * unit;
      for (const k of members.get(band.w).flat()) {
        const x0 = x(J.s[k]), x1 = x(J.e[k] === null ? tmax : J.e[k]);
        g.fillStyle = RESULT_COLORS[D.results[J.r[k]]] || "#666";
        g.fillRect(x0, band.y + lane[k] * laneH, Math.max(1, x1 - x0), Math.max(0.4, laneH - (laneH > 3 ? 1 : 0)));
      }
    }
    g.strokeStyle = "#999"; g.fillStyle = "#444"; g.textAlign = "center"; g.textBaseline = "alphabetic";
    g.beginPath(); g.moveTo(L, H - B); g.lineTo(W - R, H - B); g.stroke();
    for (const t of ticks(tmax, 8, false).filter(t => t <= tmax)) g.fillText(String(t), x(t), H - B + 14);
    g.fillText("seconds since the run started", (L + W - R) / 2, H - 6);
    canvas.addEventListener("mousemove", e => {
      const box = canvas.getBoundingClientRect();
      const px = (e.clientX - box.left) * (W / box.width), py = (e.clientY - box.top) * (H / box.height);
      const band = bands.find(b => py >= b.y && py < b.y + b.h);
      if (!band) return hideTip();
      const list = members.get(band.w)[Math.floor((py - band.y) / (band.w * unit))] || [];
      const t = ((px - L) / (W - L - R)) * tmax;
      const k = list.find(k => J.s[k] <= t && (J.e[k] === null ? tmax : J.e[k]) >= t);
      if (k === undefined) return hideTip();
      showTip(e, [
        J.groups[J.g[k]] + "[" + J.i[k] + "] attempt " + J.a[k] + ": " + D.results[J.r[k]],
        J.n[k] + (J.n[k] === 1 ? " node" : " nodes") + ", submitted " + seconds(J.q[k]) + ", ran " + seconds(J.s[k]) +
          " → " + (J.e[k] === null ? "(not ended)" : seconds(J.e[k])),
      ]);
    });
    canvas.addEventListener("mouseleave", hideTip);
  }

  function table(parent, rows, header) {
    const t = el("table", parent);
    if (header) {
      const tr = el("tr", t);
      for (const h of header) el("th", tr, h);
    }
    for (const row of rows) {
      const tr = el("tr", t);
      for (const v of row) el("td", tr, v === null || v === undefined ? "-" : v, typeof v === "number" ? { class: "num" } : null);
    }
    return t;
  }

  const main = document.getElementById("report");
  el("h1", main, D.title);
  el("p", main, D.source, { class: "source" });
  for (const note of D.notes) el("p", main, note, { class: "note" });

  el("h2", main, "Summary");
  const figures = el("div", main, null, { id: "figures", class: "figures" });
  for (const [k, v] of D.figures) {
    const card = el("div", figures, null, { class: "figure" });
    el("span", card, k.replace(/_/g, " "), { class: "k" });
    el("span", card, v, { class: "v" });
  }
  if (D.member_figures.length) {
    const keys = Object.keys(D.member_figures[0]);
    const wide = el("div", main, null, { class: "wide" });
    table(wide, D.member_figures.map(r => keys.map(k => r[k])), keys).id = "member-figures";
  }
  el("h2", main, "Algorithm");
  table(main, D.members.map(m => [m.index, m.algorithm || "unknown",
    Object.keys(m.options).length ? Object.entries(m.options).map(([k, v]) => k + "=" + v).join(", ") : "(defaults)"]),
    ["member", "algorithm", "options"]).id = "algorithms";

  el("h2", main, "Over time");
  if (D.recorded_from) el("p", main, D.recorded_from, { class: "note" });
  for (const m of D.members) {
    el("h3", main, "member " + m.index + (m.algorithm ? " — " + m.algorithm : ""));
    legend(main, !!m.recorded, m.decisions.length > 0);
    timeline(main, m);
  }

  el("h2", main, "Job attempts by node count");
  const key = el("div", main, null, { class: "legend" });
  for (const name of D.results) {
    const item = el("span", key);
    el("i", item, null, { class: "box", style: "background:" + RESULT_COLORS[name] });
    item.appendChild(document.createTextNode(name));
  }
  for (const m of D.members) {
    el("h3", main, "member " + m.index + ": " + m.jobs.n.length + " attempts");
    gantt(main, m);
  }

  el("h2", main, "Attempts that did not succeed");
  const failures = el("div", main, null, { id: "failures" });
  const attempts = D.members.reduce((sum, m) => sum + m.jobs.n.length, 0);
  if (!D.failures.length) el("p", failures, attempts ? "none" : "not known: this source holds no job attempts");
  for (const f of D.failures) {
    const box = el("details", failures);
    const code = f.exit_code === null ? "" : " (exit " + f.exit_code + ")";
    el("summary", box, "member " + f.member + " " + f.group + "[" + f.index + "] attempt " + f.attempt + ": " + f.result +
      code + (f.reason ? ": " + f.reason : ""));
    el("pre", box, f.tail || "(no output)");
  }
  if (D.failures_total > D.failures.length) {
    el("p", failures, "and " + (D.failures_total - D.failures.length) + " more (see jobs.csv)", { class: "note" });
  }
  document.body.setAttribute("data-drawn", "true");
})();
