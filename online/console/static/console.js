// Live charts: polls /api/stats (cumulative counters) and plots rates between samples.
"use strict";
const POLL_MS = 2000, KEEP = 90;
const series = { rate: [], latency: [], lag: [] };
let last = null;

function draw(id, values, unit) {
  const c = document.getElementById(id), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(1e-9, ...values);
  g.strokeStyle = "#2563eb"; g.lineWidth = 2; g.beginPath();
  values.forEach((v, i) => {
    const x = (i / (KEEP - 1)) * c.width, y = c.height - 4 - (v / max) * (c.height - 20);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#444"; g.fillText(`max ${max.toFixed(3)} ${unit}`, 4, 12);
  const now = values.length ? values[values.length - 1] : 0;
  document.getElementById(id + "-now").textContent = now.toFixed(3);
}

async function poll() {
  try {
    const s = await (await fetch("/api/stats", { cache: "no-store" })).json();
    if (last) {
      const dt = Math.max(1e-3, s.ts - last.ts), n = s.latency_count - last.latency_count;
      series.rate.push((s.requests - last.requests) / dt);
      series.latency.push(n > 0 ? (1000 * (s.latency_sum - last.latency_sum)) / n : 0);
      series.lag.push(s.ingest_lag_s);
      for (const k in series) if (series[k].length > KEEP) series[k].shift();
      draw("rate", series.rate, "req/s");
      draw("latency", series.latency, "ms");
      draw("lag", series.lag, "s");
      document.getElementById("live").dataset.samples = String(series.rate.length);
    }
    last = s;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}
poll();
