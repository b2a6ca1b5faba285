// mayfly console: the only script. Live countdowns and the live decision stream; every value
// from the network is put into the page as text, never as HTML.
"use strict";

function remaining(secs) {
  if (secs <= 0) return "expired";
  const h = Math.floor(secs / 3600), m = Math.floor((secs % 3600) / 60), s = secs % 60;
  const two = (n) => String(n).padStart(2, "0");
  if (h > 0) return h + "h" + two(m) + "m" + two(s) + "s";
  if (m > 0) return m + "m" + two(s) + "s";
  return s + "s";
}

function tick() {
  const now = Math.floor(Date.now() / 1000);
  for (const el of document.querySelectorAll("#grants .countdown[data-expires]")) {
    el.textContent = remaining(Number(el.dataset.expires) - now);
  }
}

function time(ms) {
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function live(status) {
  const body = document.querySelector("#live tbody");
  const source = new EventSource(status.dataset.src);
  source.onopen = () => { status.textContent = "live: waiting for decisions"; };
  source.onerror = () => { status.textContent = "disconnected, reconnecting…"; };
  source.addEventListener("decision", (ev) => {
    let d;
    try { d = JSON.parse(ev.data); } catch (_) { return; }
    const tr = document.createElement("tr");
    tr.className = (d.decision === "allow" ? "allowed" : "denied") + " new";
    for (const v of [time(d.ts_ms), d.caller, d.callee, d.decision, d.rule, d.request, d.decision_id]) {
      const td = document.createElement("td");
      td.textContent = String(v ?? "");
      tr.appendChild(td);
    }
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > 500) body.deleteRow(body.rows.length - 1);
    status.textContent = "live: " + body.rows.length + " decisions since this page opened";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.querySelector("#grants .countdown")) {
    tick();
    setInterval(tick, 1000);
  }
  const status = document.getElementById("live-status");
  if (status) live(status);
});
