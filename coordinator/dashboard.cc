#include "coordinator/dashboard.h"

namespace gemma::coordinator {

const char* DashboardHtml() {
  return R"html(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gemma-cluster</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
  h1 { font-size: 18px; margin: 0 0 8px; }
  h2 { font-size: 15px; margin: 18px 0 6px; }
  .panels { display: flex; gap: 12px; flex-wrap: wrap; }
  .panel { border: 1px solid #ccc; border-radius: 6px; padding: 8px 12px; min-width: 130px; }
  .panel .v { font-size: 20px; font-weight: 600; }
  table.heat { border-collapse: collapse; }
  table.heat td { width: 7px; height: 14px; padding: 0; }
  table.heat th { font-weight: normal; padding: 0 6px 0 0; text-align: right; }
  .bar { background: #4a7fd6; height: 12px; display: inline-block; }
  #error { color: #b00; }
  td.n { text-align: right; padding: 0 8px; }
</style>
</head>
<body>
<h1>gemma-cluster</h1>
<div id="error"></div>
<div class="panels">
  <div class="panel">replicas healthy<div class="v" id="replicas-healthy">-</div></div>
  <div class="panel">running / waiting<div class="v" id="running-waiting">-</div></div>
  <div class="panel">requests finished<div class="v" id="requests-finished">-</div></div>
  <div class="panel">requests / s<div class="v" id="request-rate">-</div></div>
  <div class="panel">tokens generated / s<div class="v" id="token-rate">-</div></div>
  <div class="panel">mean TTFT<div class="v" id="ttft">-</div></div>
  <div class="panel">KV cache used (max)<div class="v" id="kv-usage">-</div></div>
  <div class="panel">routed tokens<div class="v" id="total-routed">-</div></div>
  <div class="panel">balancedness<div class="v" id="balancedness">-</div></div>
</div>
<h2>Expert load (tokens routed; each row a layer, each cell an expert, darker = busier)</h2>
<table class="heat" id="heatmap"></table>
<h2>Load per rank (tokens routed to the experts each rank holds, all layers)</h2>
<div id="ranks">no replica spreads its experts over ranks</div>
<h2>Balancedness per layer (mean / max tokens per expert; 1 is even)</h2>
<table id="layers"></table>
<h2>Overall balancedness over time</h2>
<svg id="history" width="600" height="80" style="border:1px solid #ccc"></svg>
<h2>Replicas</h2>
<table id="replicas"></table>
<script>
"use strict";
const history = [];
let previous = null;

function text(id, value) { document.getElementById(id).textContent = value; }

function metricSum(body, name) {
  let sum = 0;
  for (const line of body.split("\n")) {
    if (line.startsWith("#")) continue;
    const m = line.match(/^([^{ ]+)(\{[^}]*\})? (.+)$/);
    if (m && m[1] === name) sum += Number(m[3]);
  }
  return sum;
}

function drawHeatmap(totals) {
  const table = document.getElementById("heatmap");
  table.innerHTML = "";
  const layers = totals.numLayers || 0, experts = totals.numExperts || 0;
  const counts = (totals.counts || []).map(Number);
  const rows = document.getElementById("layers");
  rows.innerHTML = "";
  let routed = 0, sumMean = 0, sumMax = 0;
  for (let l = 0; l < layers; ++l) {
    const row = counts.slice(l * experts, (l + 1) * experts);
    const max = Math.max(0, ...row), total = row.reduce((a, b) => a + b, 0);
    routed += total;
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = l;
    tr.appendChild(th);
    row.forEach((c, e) => {
      const td = document.createElement("td");
      const level = max > 0 ? c / max : 0;
      td.style.background = `rgba(200, 40, 30, ${level.toFixed(3)})`;
      td.dataset.layer = l;
      td.dataset.expert = e;
      td.dataset.count = c;
      td.title = `layer ${l}, expert ${e}: ${c} tokens`;
      tr.appendChild(td);
    });
    table.appendChild(tr);
    const mean = total / experts;
    const balance = max > 0 ? mean / max : 1;
    sumMean += mean;
    sumMax += max;
    const lr = document.createElement("tr");
    lr.innerHTML = `<td class="n">${l}</td><td><span class="bar" style="width:${Math.round(
        300 * balance)}px"></span></td><td class="n" data-layer-balance="${l}">${
        balance.toFixed(3)}</td>`;
    rows.appendChild(lr);
  }
  text("total-routed", routed);
  const overall = sumMax > 0 ? sumMean / sumMax : 1;
  text("balancedness", layers > 0 ? overall.toFixed(3) : "-");
  return layers > 0 ? overall : null;
}

// Per replica whose experts are spread over ranks: a bar per rank and the rank balancedness
// (mean over layers of mean / max tokens per rank), each expert's tokens split over its copies
// in the replica's placement (contiguous blocks without one); the placement's epoch and slots
// and its last switch.
function drawRanks(replicas) {
  const div = document.getElementById("ranks");
  let html = "";
  for (const r of replicas || []) {
    const t = r.totals || {}, p = r.placement || {};
    const layers = t.numLayers || 0, experts = t.numExperts || 0;
    const placed = Number(p.numRanks || 0) > 1 && p.numLayers === layers &&
        p.numExperts === experts;
    const ranks = placed ? p.numRanks : Number(t.expertRanks || 0);
    if (ranks <= 1 || (!placed && experts % ranks !== 0)) continue;
    const counts = (t.counts || []).map(Number), slots = (p.slots || []).map(Number);
    const spr = placed ? p.slotsPerRank : experts / ranks;
    const tokens = new Array(ranks).fill(0);
    let balanceSum = 0;
    for (let l = 0; l < layers; ++l) {
      const row = new Array(ranks).fill(0);
      if (placed) {
        const base = l * ranks * spr, copies = new Array(experts).fill(0);
        for (let i = 0; i < ranks * spr; ++i) copies[slots[base + i]] += 1;
        for (let i = 0; i < ranks * spr; ++i) {
          const e = slots[base + i];
          row[Math.floor(i / spr)] += counts[l * experts + e] / copies[e];
        }
      } else {
        for (let e = 0; e < experts; ++e) row[Math.floor(e / spr)] += counts[l * experts + e];
      }
      row.forEach((c, k) => { tokens[k] += c; });
      const max = Math.max(...row), total = row.reduce((a, b) => a + b, 0);
      balanceSum += max > 0 ? total / ranks / max : 1;
    }
    const busiest = Math.max(1, ...tokens);
    html += `<div>replica ${r.replicaId}: rank balancedness <span data-rank-balance="${
        r.replicaId}">${(layers > 0 ? balanceSum / layers : 1).toFixed(3)}</span>`;
    if (placed) {
      html += ` &middot; placement epoch <span data-placement-epoch="${r.replicaId}">${
          Number(p.epoch || 0)}</span>, ${spr} slots per rank (${ranks * spr - experts} redundant)`;
    }
    const switches = r.switches || [];
    if (switches.length > 0) {
      const s = switches[switches.length - 1];
      const measured = Number(s.balancednessMeasured);
      html += ` &middot; last switch: epoch ${Number(s.epoch)} (${s.reason}, ${s.state}), ${
          Number(s.balancednessBefore || 0).toFixed(3)} before, ${
          Number(s.balancednessPredicted || 0).toFixed(3)} predicted, ${
          measured >= 0 ? measured.toFixed(3) + " measured" : "not measured yet"}`;
    }
    html += "</div><table>";
    tokens.forEach((c, k) => {
      html += `<tr><td class="n">rank ${k}</td><td><span class="bar" style="width:${Math.round(
          300 * c / busiest)}px"></span></td><td class="n" data-rank-tokens="${r.replicaId}/${
          k}">${Math.round(c)}</td></tr>`;
    });
    html += "</table>";
  }
  div.innerHTML = html || "no replica spreads its experts over ranks";
}

function drawHistory() {
  const svg = document.getElementById("history");
  const w = 600, h = 80;
  const points = history.map((v, i) =>
      `${(i / Math.max(1, history.length - 1)) * w},${h - v * (h - 4) - 2}`).join(" ");
  svg.innerHTML = `<polyline fill="none" stroke="#4a7fd6" stroke-width="2" points="${points}"/>`;
}

function drawReplicas(status) {
  const table = document.getElementById("replicas");
  table.innerHTML = "<tr><th>id</th><th>address</th><th>healthy</th><th>parallel</th>" +
      "<th>running</th><th>waiting</th></tr>";
  let healthy = 0, running = 0, waiting = 0, kv = 0;
  for (const r of status.replicas || []) {
    if (r.healthy) ++healthy;
    running += Number(r.running || 0);
    waiting += Number(r.waiting || 0);
    for (const p of r.kvPools || []) {
      if (p.name === "full" && Number(p.pagesTotal) > 0) {
        kv = Math.max(kv, Number(p.pagesUsed || 0) / Number(p.pagesTotal));
      }
    }
    const tr = document.createElement("tr");
    for (const v of [r.id, r.address, r.healthy ? "yes" : "no", r.parallel, r.running || 0,
                     r.waiting || 0]) {
      const td = document.createElement("td");
      td.textContent = v;
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
  text("replicas-healthy", healthy);
  text("running-waiting", `${running} / ${waiting}`);
  text("kv-usage", `${(100 * kv).toFixed(1)}%`);
}

async function refresh() {
  try {
    const [status, load, metrics] = await Promise.all([
      fetch("/api/status").then(r => r.json()),
      fetch("/api/expert-load").then(r => r.json()),
      fetch("/metrics").then(r => r.text()),
    ]);
    drawReplicas(status);
    const overall = drawHeatmap(load.totals || {});
    drawRanks(load.replicas);
    if (overall !== null) {
      history.push(overall);
      if (history.length > 300) history.shift();
      drawHistory();
    }
    const finished = metricSum(metrics, "gemma:request_success_total");
    const generated = metricSum(metrics, "gemma:generation_tokens_total");
    const ttftSum = metricSum(metrics, "gemma:time_to_first_token_seconds_sum");
    const ttftCount = metricSum(metrics, "gemma:time_to_first_token_seconds_count");
    text("requests-finished", finished);
    text("ttft", ttftCount > 0 ? `${(1000 * ttftSum / ttftCount).toFixed(1)} ms` : "-");
    const now = performance.now();
    if (previous !== null) {
      const dt = (now - previous.time) / 1000;
      text("request-rate", ((finished - previous.finished) / dt).toFixed(1));
      text("token-rate", ((generated - previous.generated) / dt).toFixed(1));
    }
    previous = {time: now, finished, generated};
    text("error", "");
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  } catch (e) {
    text("error", `cannot reach the coordinator: ${e}`);
  }
}

refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
)html";
}

}  // namespace gemma::coordinator
