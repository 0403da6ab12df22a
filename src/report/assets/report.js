// Draws a gradflow report from the JSON in <script id="gradflow-data">: heatmaps on canvases (hover shows the
// cell), line charts with uPlot (hover shows every series), a layer selector shared by the per-layer charts,
// sortable tables and heatmap tables coloured from their cells' values. No network: everything is inline.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("gradflow-data").textContent);
  const CMAPS = {  // nine evenly spaced stops of matplotlib's colour maps, interpolated linearly
    viridis: ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"],
    magma: ["#000004", "#1d1147", "#51127c", "#832681", "#b73779", "#e75263", "#fc8961", "#fec488", "#fcfdbf"],
  };
  const ZERO = [59, 139, 217], MISSING = [200, 200, 200];  // exact zeros (log scale), NaN/Inf or not recorded

  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : String(+v.toPrecision(3));
  }
  function decade(v) {  // a log axis labels its powers of ten only
    const l = Math.log10(v), r = Math.round(l);
    return Math.abs(l - r) < 1e-9 ? (r >= -2 && r <= 3 ? String(Math.pow(10, r)) : "1e" + r) : "";
  }
  function rgb(hex) { return [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16)); }
  function colour(name, t) {
    const stops = CMAPS[name || "viridis"], x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x)), f = x - i, a = rgb(stops[i]), b = rgb(stops[i + 1]);
    return a.map((c, k) => Math.round(c + f * (b[k] - c)));
  }
  function scale(values, log) {  // [lo, hi, to01] over the finite (and, on a log scale, positive) values
    let lo = Infinity, hi = -Infinity;
    for (const v of values) if (v !== null && (!log || v > 0)) { if (v < lo) lo = v; if (v > hi) hi = v; }
    if (log) { lo = Math.log10(lo); hi = Math.log10(hi); }
    const span = hi > lo ? hi - lo : 1;
    return [lo, hi, v => ((log ? Math.log10(v) : v) - lo) / span];
  }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children) e.append(c);
    return e;
  }
  const tip = el("div", {class: "tip"});
  document.body.append(tip);
  function showTip(ev, text) {
    tip.textContent = text; tip.style.display = "block";
    tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 10) + "px";
  }

  // A rows x columns heatmap: rows[0] at the bottom (the input side), one canvas pixel per cell.
  function heatmap(h) {
    const nr = h.rows.length, nc = h.x.length, flat = h.values.flat();
    const [lo, hi, to01] = scale(flat, h.log);
    const canvas = el("canvas", {width: nc, height: nr, class: "heat"});
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(nc, nr);
    for (let r = 0; r < nr; r++) for (let c = 0; c < nc; c++) {
      const v = h.values[r][c], p = ((nr - 1 - r) * nc + c) * 4;
      const px = v === null ? MISSING : (h.log && v <= 0) ? ZERO : colour(h.cmap, to01(v));
      img.data.set([...px, 255], p);
    }
    ctx.putImageData(img, 0, 0);
    canvas.addEventListener("mousemove", ev => {
      const b = canvas.getBoundingClientRect();
      const c = Math.min(nc - 1, Math.floor((ev.clientX - b.left) / b.width * nc));
      const r = nr - 1 - Math.min(nr - 1, Math.floor((ev.clientY - b.top) / b.height * nr));
      const v = h.values[r][c];
      showTip(ev, `${h.rows[r]} · ${h.xlabel} ${h.x[c]} · ${h.label} ${v === null ? "NaN/Inf or not recorded" : fmt(v)}`);
    });
    canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    const height = (h.height || Math.min(480, Math.max(140, 16 * nr))) + "px", every = Math.ceil(nr / 24);
    canvas.style.height = height;
    const labels = el("div", {class: "rows", style: `height:${height}`},  // at most 24 labels, the ends kept
      ...h.rows.map((n, i) => el("span", {}, i % every === 0 || i === nr - 1 ? n : "")).reverse());
    const lim = v => fmt(h.log ? Math.pow(10, v) : v);
    const legend = colourBar(h.cmap, lim(lo), lim(hi), el("span", {}, " " + h.label),
      h.log ? el("span", {class: "zero"}, "■ exactly 0") : "");
    const ticks = el("div", {class: "xticks"}, el("span", {}, `${h.xlabel} ${h.x[0]}`), el("span", {}, `${h.x[nc - 1]}`));
    return el("figure", {class: "heatmap", "data-id": h.id}, el("figcaption", {}, h.title),
      el("div", {class: "grid"}, labels, el("div", {class: "plot"}, canvas, ticks)), legend);
  }

  function colourBar(cmap, lo, hi, ...more) {  // the colour map from lo to hi, labelled at its ends
    const bar = el("div", {class: "bar", style: `background:linear-gradient(to right,${CMAPS[cmap || "viridis"].join(",")})`});
    return el("div", {class: "legend"}, el("span", {}, lo), bar, el("span", {}, hi), ...more);
  }

  // A line chart: series share one x axis; a log chart draws values <= 0 as gaps.
  const charts = [];
  function lineChart(c, width) {
    const n = c.series.length;
    const data = [c.x, ...c.series.map(s => c.log ? s.y.map(v => (v !== null && v > 0 ? v : null)) : s.y)];
    const series = [{label: c.xlabel, value: (u, v) => v}, ...c.series.map((s, i) => ({
      label: s.label, width: 1.25, points: {show: s.points || c.x.length < 30}, spanGaps: !!c.span,
      stroke: n > 2 ? `rgb(${colour("viridis", 0.95 * i / Math.max(1, n - 1)).join(",")})` : ["#1f77b4", "#ff7f0e"][i],
      value: (u, v) => fmt(v),
    }))];
    const box = el("figure", {class: "chart"}, el("figcaption", {}, c.title));
    const u = new uPlot({
      width: width, height: 240, series: series, legend: {live: true},
      scales: {x: {time: false}, y: c.log ? {distr: 3} : {}},
      axes: [{label: c.xlabel}, {size: 60, values: (u, vals) => vals.map(c.log ? decade : fmt)}],
    }, data, box);
    u.group = c.group;
    charts.push(u);
    return box;
  }

  function layerSelector(names) {
    const boxes = names.map((n, i) => {
      const b = el("input", {type: "checkbox", checked: "", "data-i": i + 1});
      b.addEventListener("change", () => charts.filter(u => u.group === "layers")
        .forEach(u => u.setSeries(i + 1, {show: b.checked})));
      return el("label", {}, b, " " + n);
    });
    const all = show => () => boxes.forEach(l => { const b = l.firstChild; if (b.checked !== show) b.click(); });
    const on = el("button", {type: "button"}, "all"), off = el("button", {type: "button"}, "none");
    on.addEventListener("click", all(true)); off.addEventListener("click", all(false));
    return el("div", {class: "selector"}, el("b", {}, "modules: "), on, off, ...boxes);
  }

  function sortable(table) {
    table.querySelectorAll("th").forEach((th, j) => th.addEventListener("click", () => {
      const body = table.tBodies[0], rows = Array.from(body.rows), dir = th.dataset.dir === "asc" ? -1 : 1;
      const key = r => { const c = r.cells[j], v = c.dataset.v ?? c.textContent; const x = parseFloat(v);
        return Number.isNaN(x) ? v : x; };
      rows.sort((a, b) => { const x = key(a), y = key(b);
        return (typeof x === typeof y ? (x < y ? -1 : x > y ? 1 : 0) : typeof x === "number" ? -1 : 1) * dir; });
      table.querySelectorAll("th").forEach(h => delete h.dataset.dir);
      th.dataset.dir = dir === 1 ? "asc" : "desc";
      body.append(...rows);
    }));
  }

  function colourCells(table) {  // a heatmap table: <td data-v> coloured on the table's own scale
    const cells = Array.from(table.querySelectorAll("td[data-v]")), log = table.dataset.log === "true";
    const values = cells.map(c => c.dataset.v === "" ? null : +c.dataset.v);
    const [lo, hi, to01] = scale(values.concat(table.dataset.lo ? [+table.dataset.lo, +table.dataset.hi] : []), log);
    cells.forEach((c, i) => {
      if (values[i] === null || (log && values[i] <= 0)) return;
      const t = to01(values[i]), [r, g, b] = colour(table.dataset.cmap, t);
      c.style.background = `rgb(${r},${g},${b})`; c.style.color = t > 0.6 ? "#000" : "#fff";
    });
  }

  function main() {
    const width = Math.max(320, Math.min(560, (document.body.clientWidth - 48) / 2));
    for (const h of D.heatmaps || []) document.getElementById(h.into).append(heatmap(h));
    for (const c of D.charts || []) document.getElementById(c.into).append(lineChart(c, width));
    if (D.layers && D.layers.length > 1) document.getElementById("selector").append(layerSelector(D.layers));
    document.querySelectorAll("table.sortable").forEach(sortable);
    document.querySelectorAll("table.heat").forEach(colourCells);
    document.querySelectorAll("div.scalebar").forEach(d => d.append(colourBar(d.dataset.cmap, fmt(+d.dataset.lo),
      fmt(+d.dataset.hi))));  // the shared scale of heat tables (their data-cmap, data-lo, data-hi)
    if (location.protocol === "blob:") {  // inside MLflow's artifact viewer: links go to the server that shows it
      const origin = new URL(location.href.slice(5)).origin;
      document.querySelectorAll("a[data-route]").forEach(a => { a.href = origin + a.dataset.route; });
    }
    document.body.dataset.drawn = "true";  // a headless browser waits for this
  }
  main();
})();
