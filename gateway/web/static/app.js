// The status page: renders /api/events (server-sent events, one "status" document each) into
// the page. Plain DOM with textContent only: no framework, no markup built from data.
"use strict";

const STATUS_WORDS = {
  available: "available", preparing: "car plugged in", charging: "charging",
  suspended_ev: "paused by the car", suspended_evse: "paused by the charger",
  finishing: "finishing", reserved: "reserved", unavailable: "unavailable",
  faulted: "faulted", unknown: "unknown",
};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function kw(powerW) {
  return powerW === null || powerW === undefined ? "–" : (powerW / 1000).toFixed(2) + " kW";
}
function kwh(energyWh) {
  return energyWh === null || energyWh === undefined ? "–" : (energyWh / 1000).toFixed(3) + " kWh";
}
function money(cost) {
  return cost ? cost.incl_vat + " " + cost.currency : "–";
}
function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  return new Date(iso).toLocaleString();
}
function localTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function pair(dl, term, ...value) {
  dl.append(el("dt", null, term), el("dd", null, ...value));
}

function chargerCard(c) {
  const state = c.online ? c.status : "offline";
  const card = el("article", {
    class: "card", "data-charger": c.id, "data-state": state, "aria-labelledby": "ch-" + c.id,
  });
  card.append(el("h3", { id: "ch-" + c.id }, c.id,
    el("span", { class: "status" }, c.online ? (STATUS_WORDS[c.status] || c.status) : "offline")));
  card.append(el("p", { class: "power", "aria-label": "power" }, kw(c.power_w)));
  const dl = el("dl");
  const lim = c.limit || {};
  const amps = lim.current_a === null || lim.current_a === undefined ? "not set" :
    (lim.current_a === 0 ? "0 A (paused)" : lim.current_a + " A");
  pair(dl, "Limit", amps, el("br"), el("span", { class: "why" }, lim.detail || ""));
  const s = c.session;
  if (s) {
    pair(dl, "User", s.user || "unidentified");
    pair(dl, "Energy", kwh(s.energy_wh));
    pair(dl, "Cost so far", money(s.cost));
    pair(dl, "Since", localTime(s.started_at));
  } else {
    pair(dl, "Session", "none");
  }
  pair(dl, "Last seen", el("span", { "data-ago": c.last_seen || "" }, ago(c.last_seen)));
  if (c.error) pair(dl, "Error", el("span", { class: "bad" }, c.error));
  pair(dl, "Model", c.driver);
  card.append(dl);
  return card;
}

function renderSessions(rows) {
  const body = document.querySelector("#sessions tbody");
  body.replaceChildren();
  if (!rows.length) {
    body.append(el("tr", null, el("td", { colspan: 6, class: "muted" }, "none yet")));
    return;
  }
  for (const r of rows) {
    body.append(el("tr", { "data-session": r.session_id },
      el("td", null, localTime(r.ended_at)), el("td", null, r.charger_id),
      el("td", null, r.user || "–"), el("td", { class: "num" }, kwh(r.energy_wh)),
      el("td", { class: "num" }, money(r.cost)), el("td", null, r.synced ? "yes" : "not yet")));
  }
}

function renderSystem(doc) {
  const dl = document.getElementById("system");
  dl.replaceChildren();
  const up = doc.uplink;
  if (!up.configured) {
    pair(dl, "Uplink", "none configured (buffering only)");
  } else {
    pair(dl, "Uplink", el("span", { class: up.connected ? "good" : "bad" },
      up.connected ? "connected" : "disconnected"), " to " + up.broker);
    pair(dl, "Last broker ack",
      up.last_puback_age_s === null ? "none yet" : up.last_puback_age_s + " s ago");
  }
  const buf = doc.buffer;
  const waiting = Object.entries(buf.backlog).map(([k, v]) => k + " " + v).join(", ") || "empty";
  pair(dl, "Waiting to send", waiting);
  pair(dl, "Buffer", (buf.size_bytes / 1048576).toFixed(1) + " MB of " + buf.max_size_mb + " MB");
  if (buf.readings_blocked) pair(dl, "Disk", el("span", { class: "bad" }, "full: readings dropped"));
}

function renderMeters(meters) {
  const body = document.querySelector("#meters tbody");
  body.replaceChildren();
  for (const m of meters) {
    body.append(el("tr", { "data-meter": m.id }, el("td", null, m.id),
      el("td", null, m.online ? "online" : el("span", { class: "bad" }, m.error || "offline")),
      el("td", { class: "num" }, kw(m.power_w)), el("td", { class: "num" }, kwh(m.energy_wh)),
      el("td", null, el("span", { "data-ago": m.last_seen || "" }, ago(m.last_seen)))));
  }
}

function renderSite(site) {
  document.getElementById("site-name").textContent = site.name || site.id;
  document.title = (site.name || site.id) + " – charging site status";
  document.getElementById("site-id").textContent = "site " + site.id;
  const g = site.grid;
  let text = "";
  if (g) {
    text = "· grid limit " + g.limit_a + " A per phase (" + g.limit_source;
    if (g.limit_reason) text += ": " + g.limit_reason;
    if (g.limit_expires_at) text += ", until " + new Date(g.limit_expires_at).toLocaleTimeString();
    text += ")";
    if (g.grid_a) text += " · drawing " + g.grid_a.map((a) => a.toFixed(1)).join(" / ") + " A";
    if (g.mode === "failsafe") text += " · grid meter silent: failsafe";
    if (g.over_limit) text += " · OVER LIMIT";
  }
  document.getElementById("grid").textContent = text;
  const nav = document.getElementById("links");
  nav.replaceChildren();
  for (const [name, href] of Object.entries(site.links || {})) nav.append(el("a", { href }, name), " ");
  nav.append(el("a", { href: "/api/status" }, "JSON"), " ", el("a", { href: "/metrics" }, "metrics"));
}

function render(doc) {
  renderSite(doc.site);
  const box = document.getElementById("chargers");
  box.replaceChildren(...doc.chargers.map(chargerCard));
  if (!doc.chargers.length) box.append(el("p", { class: "muted" }, "no chargers configured"));
  renderSessions(doc.recent_sessions);
  renderSystem(doc);
  renderMeters(doc.meters);
  const updated = document.getElementById("updated");
  updated.dateTime = doc.generated_at;
  updated.textContent = localTime(doc.generated_at);
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/api/events");
  source.addEventListener("status", (event) => {
    render(JSON.parse(event.data));
    conn.textContent = "live";
    conn.className = "conn live";
  });
  source.onerror = () => {
    conn.textContent = "connection lost: retrying";
    conn.className = "conn lost";
  };
}

// "Last seen" ages tick without a server round trip.
setInterval(() => {
  for (const node of document.querySelectorAll("[data-ago]")) {
    node.textContent = ago(node.getAttribute("data-ago"));
  }
}, 1000);

document.addEventListener("DOMContentLoaded", connect);
