// The console's few lines of script: live regions over Server-Sent Events, the device chart
// (uPlot), Swagger UI, and a readable message when an htmx button's request fails.
"use strict";

// A live region either is replaced by each event, or (data-mode="prepend", the live tail)
// gets each event's row on top, keeping at most data-keep rows.
document.querySelectorAll("[data-live]").forEach((el) => {
  const source = new EventSource(el.dataset.live);
  const counter = el.dataset.count && document.getElementById(el.dataset.count);
  source.addEventListener(el.dataset.event, (e) => {
    if (el.dataset.mode === "prepend") {
      el.insertAdjacentHTML("afterbegin", e.data);
      const keep = Number(el.dataset.keep || 200);
      while (el.children.length > keep) el.lastElementChild.remove();
    } else {
      el.innerHTML = e.data;
    }
    el.dataset.updates = String(Number(el.dataset.updates || 0) + 1);
    if (counter) counter.textContent = el.dataset.updates;
  });
});

document.body.addEventListener("htmx:responseError", (e) => {
  let msg = e.detail.xhr.statusText;
  try { msg = JSON.parse(e.detail.xhr.responseText).error || msg; } catch (_) { /* not JSON */ }
  const target = e.detail.target;
  const text = e.detail.xhr.status + ": " +
    msg.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  // A whole row gets one cell across it; a cell gets a line.
  if (target && target.tagName === "TR") target.innerHTML = '<td colspan="8" class="error">' + text + "</td>";
  else if (target) target.innerHTML = '<small class="error">' + text + "</small>";
});

const chart = document.getElementById("chart");
if (chart && window.uPlot) {
  const form = document.getElementById("chart-controls");
  const status = document.getElementById("chart-status");
  let plot = null;
  const draw = async () => {
    const params = new URLSearchParams(new FormData(form));
    const r = await fetch(chart.dataset.series + "?" + params, { headers: { Accept: "application/json" } });
    const d = await r.json();
    if (!r.ok) { status.textContent = d.error || r.statusText; return; }
    // Anomalies are drawn as points on the bucket that holds them.
    const marks = d.times.map(() => null);
    let shown = 0;
    for (const a of d.anomalies) {
      let i = d.times.findIndex((t) => t > a.time) - 1;
      if (i < 0) i = d.times.length - 1;
      if (i >= 0) { marks[i] = a.value; shown++; }
    }
    status.textContent = d.times.length + " bucket(s) of " + d.bucket_seconds + " s, " + shown +
      " anomaly marker(s)";
    chart.dataset.points = String(d.times.length);
    chart.dataset.anomalies = String(shown);
    const opts = {
      width: Math.max(chart.clientWidth, 320), height: 320,
      // One bucket alone would stretch the time axis over years: show a bucket either side.
      scales: { x: { time: true, range: (u, min, max) => min === max
        ? [min - d.bucket_seconds, max + d.bucket_seconds] : [min, max] } },
      series: [{}, { label: d.key + " (" + d.agg + ")", stroke: "#1e6fd9", width: 1.5 },
        { label: "anomaly", stroke: "#d93a1e", width: 0, points: { show: true, size: 9, fill: "#d93a1e" } }],
      axes: [{}, {}],
    };
    if (plot) plot.destroy();
    plot = new uPlot(opts, [d.times, d.values, marks], chart);
  };
  form.addEventListener("change", draw);
  draw();
}

// Swagger UI over one document at a time, chosen in the select (the bundle alone, without the
// standalone preset's top bar, shows only a single `url`).
const swagger = document.getElementById("swagger-ui");
const docSelect = document.getElementById("doc-select");
if (swagger && docSelect && window.SwaggerUIBundle) {
  const show = () => window.SwaggerUIBundle({
    url: "/console/docs/" + encodeURIComponent(docSelect.value), dom_id: "#swagger-ui", deepLinking: false,
  });
  docSelect.addEventListener("change", show);
  show();
}
