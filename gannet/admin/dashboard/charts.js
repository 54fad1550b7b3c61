// Gannet dashboard charts: small line charts drawn as SVG, no library (so the
// dashboard works offline and ships as three files). One function: lineChart.
"use strict";

(function () {
  const NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  // A round upper bound and step for the y axis: 0, 5, 10, 20, 50, 100 ...
  function niceScale(max) {
    if (max <= 0) return { top: 4, step: 1 };
    const rough = max / 4;
    const mag = Math.pow(10, Math.floor(Math.log10(rough)));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= rough) || 10 * mag;
    const stepInt = Math.max(1, Math.round(step));
    return { top: Math.ceil(max / stepInt) * stepInt, step: stepInt };
  }

  function hhmm(date) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  }

  // svg: an <svg> element; points: [{at: Date, values: {key: number|null}}];
  // series: [{key, cls, area}]; onHover(index|null) is told which point is under the pointer.
  function lineChart(svg, points, series, onHover) {
    const width = Math.max(280, svg.clientWidth || svg.parentNode.clientWidth || 600);
    const height = Math.max(160, svg.clientHeight || 220);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.replaceChildren();
    const pad = { left: 44, right: 12, top: 10, bottom: 24 };
    const w = width - pad.left - pad.right;
    const h = height - pad.top - pad.bottom;
    let max = 0;
    for (const p of points) for (const s of series) max = Math.max(max, p.values[s.key] || 0);
    const { top, step } = niceScale(max);
    const n = points.length;
    const x = (i) => pad.left + (n <= 1 ? w : (i * w) / (n - 1));
    const y = (v) => pad.top + h - (v / top) * h;

    const grid = el("g", { class: "grid" }, svg);
    const axis = el("g", { class: "axis" }, svg);
    for (let v = 0; v <= top; v += step) {
      el("line", { x1: pad.left, x2: pad.left + w, y1: y(v), y2: y(v) }, grid);
      const label = el("text", { x: pad.left - 8, y: y(v) + 4, "text-anchor": "end" }, axis);
      label.textContent = v >= 10000 ? `${Math.round(v / 1000)}k` : String(v);
    }
    const every = Math.max(1, Math.round(n / 6));
    for (let i = n - 1; i >= 0; i -= every) {
      const label = el("text", { x: x(i), y: height - 6, "text-anchor": i === n - 1 ? "end" : "middle" }, axis);
      label.textContent = hhmm(points[i].at);
    }
    for (const s of series) {
      const coords = [];
      points.forEach((p, i) => {
        const v = p.values[s.key];
        if (v !== null && v !== undefined) coords.push([x(i), y(v)]);
      });
      if (!coords.length) continue;
      const d = coords.map(([cx, cy], i) => `${i ? "L" : "M"}${cx.toFixed(1)},${cy.toFixed(1)}`).join("");
      if (s.area) {
        const base = y(0).toFixed(1);
        el("path", { d: `${d}L${coords[coords.length - 1][0].toFixed(1)},${base}L${coords[0][0].toFixed(1)},${base}Z`,
          class: `area ${s.cls}` }, svg);
      }
      el("path", { d, class: `line ${s.cls}`, "data-series": s.key }, svg);
      const [lx, ly] = coords[coords.length - 1];
      el("circle", { cx: lx, cy: ly, r: 3.5, class: `dot ${s.cls}` }, svg);
    }
    const cursor = el("line", { class: "cursor", y1: pad.top, y2: pad.top + h, x1: -10, x2: -10 }, svg);
    svg.onmousemove = (event) => {
      const box = svg.getBoundingClientRect();
      const px = ((event.clientX - box.left) / box.width) * width;
      const i = Math.min(n - 1, Math.max(0, Math.round(((px - pad.left) / w) * (n - 1))));
      cursor.setAttribute("x1", x(i));
      cursor.setAttribute("x2", x(i));
      if (onHover) onHover(i);
    };
    svg.onmouseleave = () => {
      cursor.setAttribute("x1", -10);
      cursor.setAttribute("x2", -10);
      if (onHover) onHover(null);
    };
  }

  window.GannetCharts = { lineChart };
})();
