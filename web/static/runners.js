// Runners by architecture, refreshed by polling GET /api/runners every 2 s.

import { el, refreshTimes, timeEl } from "./format.js";

const root = document.getElementById("runners");

function runnerRow(r) {
  const labels = el("td");
  for (const [k, v] of Object.entries(r.labels || {}).sort()) labels.append(el("code", {}, `${k}=${v}`), " ");
  const name = el("td", {}, r.runner_id);
  if (r.hostname) name.append(el("br"), el("small", {}, r.hostname));
  return el("tr", { "data-runner-id": r.runner_id },
    name,
    el("td", {}, el("span", { class: `badge rs-${r.state}` }, r.state)),
    el("td", {}, (r.kinds || []).join(", ")),
    labels,
    el("td", {}, r.current_build_id ? el("a", { href: `/jobs/${r.current_build_id}` }, r.current_build_id) : "—"),
    el("td", {}, timeEl(r.last_seen)));
}

function render(items) {
  const groups = new Map();
  for (const r of items) {
    const arch = r.arch || "unknown";
    if (!groups.has(arch)) groups.set(arch, []);
    groups.get(arch).push(r);
  }
  const sections = [...groups.keys()].sort().map((arch) => {
    const found = groups.get(arch).sort((a, b) => String(a.runner_id).localeCompare(String(b.runner_id)));
    const head = el("tr", {}, ...["Runner", "State", "Kinds", "Labels", "Current job", "Last heartbeat"].map((h) => el("th", { scope: "col" }, h)));
    const table = el("table", { class: "runners" }, el("thead", {}, head), el("tbody", {}, ...found.map(runnerRow)));
    return el("section", { class: "arch", "aria-labelledby": `arch-${arch}` },
      el("h2", { id: `arch-${arch}` }, arch, " ", el("small", {}, `(${found.length})`)),
      el("div", { class: "table-wrap" }, table));
  });
  if (!sections.length) sections.push(el("p", { class: "empty" }, "No runners registered."));
  root.replaceChildren(...sections);
  refreshTimes(root);
}

const conn = document.getElementById("conn");

function setConn(state) {
  if (!conn) return;
  conn.className = `conn conn-${state}`;
  conn.textContent = state;
}

async function poll() {
  try {
    const res = await fetch("/api/runners", { headers: { Accept: "application/json" } });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    render((await res.json()).items);
    setConn("live");
  } catch {
    setConn("reconnecting"); // try again at the next tick
  }
}

refreshTimes(root);
poll();
setInterval(poll, 2000);
