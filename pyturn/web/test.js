// pyturn's browser test page: candidates through this server, then a round trip over
// a data channel between two peer connections that may only use the relay.
// Every value goes in through textContent, never as HTML.
"use strict";

const GATHER_TIMEOUT_MS = 10000;
const CONNECT_TIMEOUT_MS = 20000;
const PINGS = 5;

const state = { ice: null, results: [], done: false };
window.pyturnTest = state;

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(tableId, cells) {
  const tr = el("tr");
  for (const cell of cells) tr.append(el("td", cell));
  document.getElementById(tableId).append(tr);
  return tr;
}

function hostFor(listener) {
  const wildcard = listener.address === "0.0.0.0" || listener.address === "::";
  if (wildcard) return location.hostname;
  return listener.address.includes(":") ? `[${listener.address}]` : listener.address;
}

function serverUrl(listener) {
  const scheme = listener.transport === "tls" ? "turns" : "turn";
  const transport = listener.transport === "udp" ? "udp" : "tcp";
  return `${scheme}:${hostFor(listener)}:${listener.port}?transport=${transport}`;
}

function credentials() {
  if (state.ice.mode === "rest") {
    return { username: state.ice.username, credential: state.ice.credential };
  }
  return {
    username: document.getElementById("username").value,
    credential: document.getElementById("password").value,
  };
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function relayConfig(url) {
  return { iceServers: [{ urls: [url], ...credentials() }], iceTransportPolicy: "relay" };
}

// Gather with one peer connection and show every candidate and candidate error.
async function gather(url, started) {
  const pc = new RTCPeerConnection(relayConfig(url));
  const found = [];
  const errors = [];
  pc.onicecandidate = (event) => {
    const c = event.candidate;
    if (!c || !c.candidate) return;
    found.push(c);
    const related = c.relatedAddress ? `${c.relatedAddress}:${c.relatedPort}` : "";
    row("candidates", [
      ((performance.now() - started) / 1000).toFixed(3), url, c.type, c.foundation,
      c.protocol, c.address, c.port, c.priority, related,
    ]);
  };
  pc.onicecandidateerror = (event) => {
    errors.push(`${event.errorCode} ${event.errorText}`);
    row("candidates", [
      ((performance.now() - started) / 1000).toFixed(3), url, "error", "", "", "", "",
      event.errorCode, event.errorText,
    ]);
  };
  const complete = new Promise((resolve) => {
    pc.onicegatheringstatechange = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
  });
  pc.createDataChannel("gather");
  await pc.setLocalDescription(await pc.createOffer());
  try {
    await withTimeout(complete, GATHER_TIMEOUT_MS, "gathering");
  } finally {
    pc.close();
  }
  return { relays: found.filter((c) => c.type === "relay"), errors };
}

// Two relay-only peer connections, candidates passed by hand, then timed pings.
async function roundTrip(url) {
  const a = new RTCPeerConnection(relayConfig(url));
  const b = new RTCPeerConnection(relayConfig(url));
  try {
    a.onicecandidate = (e) => { if (e.candidate) b.addIceCandidate(e.candidate).catch(() => {}); };
    b.onicecandidate = (e) => { if (e.candidate) a.addIceCandidate(e.candidate).catch(() => {}); };
    b.ondatachannel = (e) => { e.channel.onmessage = (m) => e.channel.send(m.data); };
    const channel = a.createDataChannel("rtt", { ordered: true });
    const open = new Promise((resolve) => { channel.onopen = resolve; });
    await a.setLocalDescription(await a.createOffer());
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await a.setRemoteDescription(b.localDescription);
    await withTimeout(open, CONNECT_TIMEOUT_MS, "connecting through the relay");
    const times = [];
    for (let i = 0; i < PINGS; i++) {
      const sent = performance.now();
      const echoed = new Promise((resolve) => { channel.onmessage = resolve; });
      channel.send(`ping ${i}`);
      await withTimeout(echoed, CONNECT_TIMEOUT_MS, "echo");
      times.push(performance.now() - sent);
    }
    times.sort((x, y) => x - y);
    return times[Math.floor(times.length / 2)];
  } finally {
    a.close();
    b.close();
  }
}

async function testOne(listener) {
  const url = serverUrl(listener);
  const tr = row("results", [listener.transport.toUpperCase(), url, "…", "…", "running"]);
  const cells = tr.children;
  const result = { transport: listener.transport, url, relays: [], rttMs: null, error: null };
  try {
    const gathered = await gather(url, performance.now());
    result.relays = gathered.relays.map((c) => `${c.address}:${c.port}`);
    cells[2].textContent = result.relays.join(", ") || "none";
    if (!gathered.relays.length) {
      throw new Error(gathered.errors.join("; ") || "no relay candidate");
    }
    result.rttMs = await roundTrip(url);
    cells[3].textContent = `${result.rttMs.toFixed(1)} ms`;
    cells[4].textContent = "ok";
    cells[4].className = "good";
  } catch (error) {
    result.error = error.message;
    cells[4].textContent = error.message;
    cells[4].className = "bad";
  }
  state.results.push(result);
}

async function runAll() {
  const button = document.getElementById("run");
  button.disabled = true;
  state.done = false;
  state.results = [];
  delete document.body.dataset.done;
  for (const listener of state.ice.listeners) {
    await testOne(listener);
  }
  state.done = true;
  document.body.dataset.done = "yes";
  button.disabled = false;
}

async function load() {
  const line = document.getElementById("credential-line");
  const status = document.getElementById("state");
  try {
    const answer = await fetch("/test/ice.json", { cache: "no-store" });
    if (!answer.ok) throw new Error(`${answer.status} ${answer.statusText}`);
    state.ice = await answer.json();
  } catch (error) {
    status.textContent = `unreachable: ${error.message}`;
    status.className = "state bad";
    return;
  }
  const ice = state.ice;
  if (ice.mode === "rest") {
    const until = new Date((Number(ice.username.split(/\D/)[0]) || 0) * 1000);
    line.textContent = `A credential was minted for this test from the server's REST secret: ${ice.username}, valid until ${until.toLocaleTimeString()}.`;
  } else {
    line.textContent = ice.why || "This server has no REST secret: enter a username and password it knows.";
    document.getElementById("login").hidden = false;
  }
  status.textContent = `${ice.listeners.length} listener${ice.listeners.length === 1 ? "" : "s"}`;
  const button = document.getElementById("run");
  button.disabled = false;
  button.addEventListener("click", runAll);
  document.body.dataset.loaded = "yes";
}

load();
