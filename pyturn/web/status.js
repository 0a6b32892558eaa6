// pyturn's status page: fills the page from /status.json every few seconds.
// Every value goes in through textContent, never as HTML.
"use strict";

const REFRESH_MS = 5000;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// rows: [label, value, optional class for the value]
function fillTable(id, header, rows) {
  const table = document.getElementById(id);
  table.replaceChildren();
  if (header) {
    const tr = el("tr");
    for (const name of header) tr.append(el("th", name));
    table.append(tr);
  }
  for (const row of rows) {
    const tr = el("tr");
    row.forEach((cell, i) => {
      const td = el("td", cell, typeof cell === "number" && i > 0 ? "num" : "");
      tr.append(td);
    });
    table.append(tr);
  }
}

function duration(seconds) {
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${h}h ${m}m`;
  if (h) return `${h}h ${m}m`;
  return `${m}m ${s % 60}s`;
}

function bitRate(bps) {
  const units = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s"];
  let value = bps, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit++; }
  return `${value.toFixed(value < 10 && unit ? 1 : 0)} ${units[unit]}`;
}

function sum(values) {
  return Object.values(values || {}).reduce((a, b) => a + b, 0);
}

function drawChart(rates, interval) {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const width = 800, height = 180, top = 6, bottom = 2;
  const peak = Math.max(1000, ...rates.map((r) => Math.max(r.client_to_peer_bps, r.peer_to_client_bps)));
  const span = Math.max(60, (rates.length ? rates[rates.length - 1].at - rates[0].since : 0), interval * 10);
  const end = rates.length ? rates[rates.length - 1].at : 0;
  const x = (at) => width - ((end - at) / span) * width;
  const y = (v) => top + (height - top - bottom) * (1 - v / peak);
  const axis = document.createElementNS(ns, "line");
  axis.setAttribute("class", "axis");
  axis.setAttribute("x1", "0"); axis.setAttribute("x2", String(width));
  axis.setAttribute("y1", String(y(0))); axis.setAttribute("y2", String(y(0)));
  svg.append(axis);
  for (const [key, cls] of [["client_to_peer_bps", "up"], ["peer_to_client_bps", "down"]]) {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", cls);
    // A step per sample: each rate holds over the interval it was measured on.
    const points = rates.flatMap((r) => [[x(r.since), y(r[key])], [x(r.at), y(r[key])]]);
    line.setAttribute("points", points.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" "));
    svg.append(line);
  }
  const last = rates[rates.length - 1];
  const scale = `top of the chart ${bitRate(peak)}, left edge ${Math.round(span / 60)} min ago`;
  document.getElementById("rate-now").textContent = last
    ? `now ${bitRate(last.client_to_peer_bps)} out and ${bitRate(last.peer_to_client_bps)} back; ${scale}`
    : "collecting samples…";
}

function render(s) {
  const state = document.getElementById("state");
  state.textContent = s.not_ready === null ? "serving" : `not ready: ${s.not_ready}`;
  state.className = "state " + (s.not_ready === null ? "good" : s.state === "draining" ? "warn" : "bad");
  document.body.dataset.state = s.state;
  document.getElementById("summary-line").textContent =
    `pyturn ${s.version} · up ${duration(s.uptime)} · ${s.workers.length} worker process` +
    `${s.workers.length === 1 ? "" : "es"}` + (s.store_up === false ? " · store unreachable: serving its last snapshot" : "");

  const total = sum(s.allocations);
  document.getElementById("allocations-total").textContent = String(total);
  document.body.dataset.allocations = String(total);
  fillTable("allocations", null, [
    ...Object.entries(s.allocations).map(([t, n]) => [t.toUpperCase(), n]),
    ["permissions", s.permissions],
    ["channels", s.channels],
    ["created since start", sum(s.allocations_created)],
  ]);

  const relay = s.relay;
  const relayRows = [["address", relay.external_address ? `${relay.external_address} (bound ${relay.address})` : relay.address]];
  if (relay.address6) relayRows.push(["IPv6", relay.external_address6 ? `${relay.external_address6} (bound ${relay.address6})` : relay.address6]);
  for (const extra of relay.more_addresses || []) {
    relayRows.push(["also", extra.external_address ? `${extra.external_address} (bound ${extra.address})` : extra.address]);
  }
  relayRows.push(["ports", `${relay.ports[0]}–${relay.ports[1]}`]);
  for (const [family, free] of Object.entries(s.relay_ports_available)) relayRows.push([`free ${family} ports`, free]);
  fillTable("relay", null, relayRows);

  fillTable("refusals", null, [
    ["denied peers", s.peers_denied],
    ["quota refusals", s.quota_rejections],
    ["bytes over bandwidth limits", s.bandwidth_dropped_bytes],
    ["auth failures (without first challenges)", sum(s.auth_failures) - (s.auth_failures.no_credentials || 0)],
  ]);

  fillTable("workers", ["#", "pid", "health"], s.workers.map((w) => [w.index, w.pid, w.ready ? "ready" : "starting"]));
  if (s.worker_restarts) {
    const table = document.getElementById("workers");
    const tr = el("tr");
    tr.append(el("td", "restarts"), el("td", s.worker_restarts, "num bad"));
    table.append(tr);
  }
  fillTable("listeners", ["transport", "address", "port"], s.listeners.map((l) => [l.transport.toUpperCase(), l.address, l.port]));
  fillTable("auth", ["reason", "count"], Object.entries(s.auth_failures).map(([reason, n]) => [reason.replaceAll("_", " "), n]));
  drawChart(s.rates, s.sample_interval);
}

async function refresh() {
  try {
    const answer = await fetch("/status.json", { cache: "no-store" });
    if (!answer.ok) throw new Error(`${answer.status} ${answer.statusText}`);
    render(await answer.json());
  } catch (error) {
    const state = document.getElementById("state");
    state.textContent = `unreachable: ${error.message}`;
    state.className = "state bad";
  }
  setTimeout(refresh, REFRESH_MS);
}

refresh();
