/* tiersim report plots: a small dependency-free SVG line chart with drag-to-zoom (x) and double-click
   reset. Reads the JSON in <script id="tiersim-plots">, draws into <div data-plot="ID">, and reports
   what it drew in document.body.dataset.plotsRendered / plotsFailed (the browser test reads them). */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"];
  var uid = 0;
  function el(tag, attrs, parent) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function ticks(lo, hi, log, n) {
    var t = [], v;
    if (log) {
      var a = Math.floor(Math.log10(lo)), b = Math.ceil(Math.log10(hi));
      for (var i = a; i <= b; i++) { v = Math.pow(10, i); if (v >= lo * 0.999 && v <= hi * 1.001) t.push(v); }
      if (t.length >= 2) return t;
      t = [];
      log = false;
    }
    var span = hi - lo || Math.abs(hi) || 1;
    var step = Math.pow(10, Math.floor(Math.log10(span / n)));
    var err = n / span * step;
    step *= err <= 0.15 ? 10 : err <= 0.35 ? 5 : err <= 0.75 ? 2 : 1;
    for (v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) t.push(+v.toPrecision(12));
    return t;
  }
  function fmt(v) {
    var a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e6 || a < 1e-3) return v.toExponential(0).replace("e+", "e");
    if (a >= 100) return v.toFixed(0);
    return String(+v.toPrecision(3));
  }
  function extent(spec, dom) {
    var x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity, n = 0;
    spec.series.forEach(function (s) {
      for (var i = 0; i < s.x.length; i++) {
        var x = s.x[i], y = s.y[i];
        if (x === null || y === null || !isFinite(x) || !isFinite(y)) continue;
        if ((spec.xlog && x <= 0) || (spec.ylog && y <= 0)) continue;
        if (dom && (x < dom[0] || x > dom[1])) continue;
        x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y); n++;
      }
    });
    return { x0: x0, x1: x1, y0: y0, y1: y1, n: n };
  }
  function draw(div, spec, dom) {
    div.innerHTML = "";
    var W = 640, H = 320, m = { l: 64, r: 14, t: 28, b: 46 };
    var svg = el("svg", { viewBox: "0 0 " + W + " " + H, width: "100%", "class": "chart",
                          "font-family": "sans-serif", "font-size": "11" }, div);
    el("text", { x: m.l, y: 16, "font-size": "13", "font-weight": "bold" }, svg).textContent = spec.title || "";
    var e = extent(spec, dom);
    if (!e.n) {
      el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent = "no data";
      div.dataset.rendered = "0";
      return 0;
    }
    var x0 = dom ? dom[0] : e.x0, x1 = dom ? dom[1] : e.x1;
    if (spec.xcats && !dom) { x0 = -0.5; x1 = spec.xcats.length - 0.5; }
    var y0 = spec.ymin !== undefined ? spec.ymin : (spec.ylog ? e.y0 : Math.min(0, e.y0));
    var y1 = spec.ymax !== undefined ? spec.ymax : e.y1;
    if (x1 === x0) { x0 -= 0.5; x1 += 0.5; }
    if (y1 === y0) { y1 = y0 + (Math.abs(y0) || 1); }
    if (!spec.ylog && spec.ymax === undefined) y1 += (y1 - y0) * 0.05;
    var tx = spec.xlog ? Math.log10 : function (v) { return v; };
    var ty = spec.ylog ? Math.log10 : function (v) { return v; };
    var pw = W - m.l - m.r, ph = H - m.t - m.b;
    function sx(v) { return m.l + (tx(v) - tx(x0)) / (tx(x1) - tx(x0)) * pw; }
    function sy(v) { return m.t + ph - (ty(v) - ty(y0)) / (ty(y1) - ty(y0)) * ph; }
    var clip = "tsclip" + (++uid);
    el("rect", { x: m.l, y: m.t, width: pw, height: ph }, el("clipPath", { id: clip }, el("defs", {}, svg)));
    var axes = el("g", { stroke: "#999", "stroke-width": "0.5" }, svg);
    var xt = spec.xcats ? spec.xcats.map(function (_, i) { return i; }).filter(function (i) { return i >= x0 && i <= x1; })
                        : ticks(x0, x1, spec.xlog, 6);
    xt.forEach(function (v) {
      var X = sx(v);
      el("line", { x1: X, x2: X, y1: m.t, y2: m.t + ph, stroke: "#eee" }, axes);
      el("text", { x: X, y: m.t + ph + 14, "text-anchor": "middle", stroke: "none", fill: "#333" }, svg)
        .textContent = spec.xcats ? spec.xcats[v] : fmt(v);
    });
    ticks(y0, y1, spec.ylog, 5).forEach(function (v) {
      var Y = sy(v);
      el("line", { x1: m.l, x2: m.l + pw, y1: Y, y2: Y, stroke: "#eee" }, axes);
      el("text", { x: m.l - 5, y: Y + 4, "text-anchor": "end", fill: "#333" }, svg).textContent = fmt(v);
    });
    el("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "none", stroke: "#888" }, svg);
    el("text", { x: m.l + pw / 2, y: H - 8, "text-anchor": "middle", fill: "#333" }, svg).textContent = spec.xlabel || "";
    el("text", { x: 12, y: m.t + ph / 2, "text-anchor": "middle", fill: "#333",
                 transform: "rotate(-90 12 " + (m.t + ph / 2) + ")" }, svg).textContent = spec.ylabel || "";
    var plot = el("g", { "clip-path": "url(#" + clip + ")" }, svg), drawn = 0;
    spec.series.forEach(function (s, k) {
      var color = s.color || COLORS[k % COLORS.length], d = "", prev = null;
      for (var i = 0; i < s.x.length; i++) {
        var x = s.x[i], y = s.y[i];
        if (x === null || y === null || !isFinite(x) || !isFinite(y) || (spec.xlog && x <= 0) || (spec.ylog && y <= 0)) {
          prev = null; continue;
        }
        var X = sx(x).toFixed(1), Y = sy(y).toFixed(1);
        if (prev === null) d += "M" + X + "," + Y;
        else d += (s.step ? "H" + X + "V" + Y : "L" + X + "," + Y);
        prev = Y; drawn++;
        if (s.markers) el("circle", { cx: X, cy: Y, r: 3, fill: color }, plot);
      }
      el("path", { d: d, fill: "none", stroke: color, "stroke-width": s.width || 1.4,
                   "stroke-dasharray": s.dash ? "5,3" : "none" }, plot);
    });
    var names = spec.series.filter(function (s) { return s.name; });
    names.slice(0, 12).forEach(function (s, k) {
      var color = s.color || COLORS[spec.series.indexOf(s) % COLORS.length];
      var Y = m.t + 10 + 13 * k, X = spec.legendLeft ? m.l + 8 : m.l + pw - 190;
      el("rect", { x: X, y: Y - 7, width: 12, height: 3, fill: color }, svg);
      el("text", { x: X + 16, y: Y - 2, fill: "#222" }, svg).textContent = s.name.length > 34 ? s.name.slice(0, 33) + "…" : s.name;
    });
    // drag to zoom along x; double-click to reset
    var sel = el("rect", { x: 0, y: m.t, width: 0, height: ph, fill: "#1f77b4", opacity: "0.15" }, svg);
    var hit = el("rect", { x: m.l, y: m.t, width: pw, height: ph, fill: "transparent", cursor: "crosshair" }, svg);
    var start = null;
    function vx(ev) { var p = svg.createSVGPoint(); p.x = ev.clientX; p.y = ev.clientY; return p.matrixTransform(svg.getScreenCTM().inverse()).x; }
    function inv(X) { var f = (X - m.l) / pw, a = tx(x0), b = tx(x1), v = a + f * (b - a); return spec.xlog ? Math.pow(10, v) : v; }
    hit.addEventListener("mousedown", function (ev) { start = vx(ev); ev.preventDefault(); });
    hit.addEventListener("mousemove", function (ev) {
      if (start === null) return;
      var X = vx(ev); sel.setAttribute("x", Math.min(start, X)); sel.setAttribute("width", Math.abs(X - start));
    });
    hit.addEventListener("mouseup", function (ev) {
      if (start === null) return;
      var X = vx(ev), a = Math.min(start, X), b = Math.max(start, X); start = null;
      if (b - a > 4) draw(div, spec, [inv(a), inv(b)]); else sel.setAttribute("width", 0);
    });
    hit.addEventListener("dblclick", function () { draw(div, spec, null); });
    if (spec.zoom !== false) {
      el("text", { x: W - m.r, y: 16, "text-anchor": "end", fill: "#999", "font-size": "10" }, svg)
        .textContent = dom ? "zoomed: double-click to reset" : "drag to zoom";
    }
    div.dataset.rendered = String(drawn);
    return drawn;
  }
  function downloadSvg(div, name) {
    var svg = div.querySelector("svg");
    if (!svg) return;
    var blob = new Blob(['<?xml version="1.0"?>\n' + new XMLSerializer().serializeToString(svg)], { type: "image/svg+xml" });
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name + ".svg"; a.click();
  }
  function main() {
    var specs = JSON.parse(document.getElementById("tiersim-plots").textContent);
    var ok = 0, failed = 0, points = 0;
    specs.forEach(function (spec) {
      var div = document.querySelector('[data-plot="' + spec.id + '"]');
      if (!div) { failed++; return; }
      try {
        var n = draw(div, spec, null);
        if (n > 0) { ok++; points += n; } else failed++;
        var link = document.createElement("a");
        link.href = "#"; link.className = "svg-link"; link.textContent = "SVG";
        link.addEventListener("click", function (ev) { ev.preventDefault(); downloadSvg(div, spec.id); });
        div.parentNode.insertBefore(link, div.nextSibling);
      } catch (err) {
        failed++;
        div.textContent = "plot failed: " + err;
      }
    });
    document.body.dataset.plotsRendered = String(ok);
    document.body.dataset.plotsFailed = String(failed);
    document.body.dataset.pointsDrawn = String(points);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main); else main();
})();
