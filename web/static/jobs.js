// The Deployment Jobs table, live: server-rendered first page + /ws updates.
// Updates are applied in place (highest `seq` per build_id wins), batched per animation
// frame so thousands of updates a minute do not freeze the page.

import { badge, el, refreshTimes, timeEl } from "./format.js";
import { LiveSocket } from "./live.js";

const table = document.getElementById("jobs");
const tbody = table.tBodies[0];
const notice = document.getElementById("notice");
const empty = document.getElementById("empty");
const filter = JSON.parse(table.dataset.filter || "{}");
const MAX_ROWS = 1000;

const jobs = new Map(); // build_id → newest job copy seen
const rows = new Map(); // build_id → <tr>
let resyncWatermark = Number(table.dataset.watermark || 0);
let pending = [];
let frame = 0;
let refreshing = null;

for (const tr of tbody.rows) {
  const id = Number(tr.dataset.buildId);
  rows.set(id, tr);
  jobs.set(id, { build_id: id, seq: Number(tr.dataset.seq) });
}

function matches(job) {
  for (const key of ["organization", "environment", "status", "action", "module_type", "module_name"]) {
    if (filter[key] && job[key] !== filter[key]) return false;
  }
  if (filter.q) {
    const needle = filter.q.toLowerCase();
    if (String(job.build_id) === needle) return true;
    const hay = ["organization", "environment", "module_type", "module_name", "action"]
      .map((k) => job[k] || "").join(" ").toLowerCase();
    return hay.includes(needle);
  }
  return true;
}

function statusCell(job) {
  const meta = el("small", { class: "meta" });
  if (job.queue_position) meta.append(el("span", { class: "queue" }, `queue position ${job.queue_position}`), " ");
  meta.append(timeEl(job.submitted_at, "rel submitted"));
  if (job.finished_at) meta.append(" · finished ", timeEl(job.finished_at));
  if (job.started_at) {
    meta.append(" · ", el("span", { class: "duration", "data-start": job.started_at, "data-end": job.finished_at || "" }));
  }
  const td = el("td", { class: "status" }, badge(job.status));
  if (job.reason) td.append(" ", el("span", { class: "reason" }, job.reason));
  td.append(meta);
  return td;
}

function renderRow(job) {
  const link = el("a", { href: `/jobs/${job.build_id}` }, job.build_id);
  const tr = el(
    "tr",
    { "data-build-id": job.build_id, "data-seq": job.seq },
    el("td", {}, link),
    el("td", {}, job.environment),
    el("td", {}, job.organization),
    el("td", {}, job.module_type),
    el("td", {}, job.module_name),
    el("td", {}, job.action),
    statusCell(job),
  );
  refreshTimes(tr);
  return tr;
}

function insertRow(tr, id) {
  // Newest first: before the first row with a smaller build ID.
  let before = null;
  for (const row of tbody.rows) {
    if (Number(row.dataset.buildId) < id) {
      before = row;
      break;
    }
  }
  tbody.insertBefore(tr, before);
}

function flash(tr) {
  tr.classList.remove("changed");
  void tr.offsetWidth; // restart the animation
  tr.classList.add("changed");
}

// Apply a job copy if it is newer than what we have; `live` highlights the change.
function apply(job, live) {
  const id = job.build_id;
  const known = jobs.get(id);
  if (known && known.seq >= job.seq) return;
  jobs.set(id, job);
  const old = rows.get(id);
  if (old) {
    // Update in place (keeps keyboard focus on the row's link): only the status changes.
    old.dataset.seq = job.seq;
    const cell = statusCell(job);
    old.cells[6].replaceWith(cell);
    refreshTimes(old);
    if (live) flash(old);
  } else if (matches(job)) {
    const tr = renderRow(job);
    insertRow(tr, id);
    rows.set(id, tr);
    if (live) flash(tr);
  }
}

function trim() {
  while (tbody.rows.length > MAX_ROWS) {
    const last = tbody.rows[tbody.rows.length - 1];
    rows.delete(Number(last.dataset.buildId));
    last.remove();
  }
  empty.hidden = tbody.rows.length > 0;
}

function flush() {
  frame = 0;
  const batch = pending;
  pending = [];
  for (const item of batch) {
    if (item.stream_seq <= resyncWatermark) continue;
    apply(item, true);
  }
  trim();
}

function queue(items) {
  for (const item of items) pending.push(item);
  if (!frame) frame = requestAnimationFrame(flush);
}

function query(extra = {}) {
  const params = new URLSearchParams({ ...filter, ...extra });
  return params.toString();
}

// REFRESH: snapshot over HTTP, then `filter` with since = its watermark.
async function refresh() {
  if (refreshing) return refreshing;
  const button = document.getElementById("refresh");
  button.disabled = true;
  notice.textContent = "refreshing…";
  refreshing = (async () => {
    try {
      const res = await fetch(`/api/jobs?${query({ limit: 50 })}`, { headers: { Accept: "application/json" } });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const snap = await res.json();
      resyncWatermark = snap.watermark;
      pending = pending.filter((i) => i.stream_seq > resyncWatermark);
      const keep = new Set(snap.items.map((j) => j.build_id));
      for (const [id, tr] of rows) {
        if (!keep.has(id)) {
          tr.remove();
          rows.delete(id);
        }
      }
      // The newest copy wins: pushed updates we already have may be newer than the snapshot.
      for (const job of snap.items.slice().reverse()) {
        const known = jobs.get(job.build_id);
        const newest = known && known.organization && known.seq > job.seq ? known : job;
        jobs.delete(job.build_id);
        const old = rows.get(job.build_id);
        if (old) {
          old.remove();
          rows.delete(job.build_id);
        }
        apply(newest, false);
      }
      setOlder(snap.next);
      trim();
      live.send({ type: "filter", ...filter, since: snap.watermark });
      notice.textContent = "";
    } catch (err) {
      notice.textContent = `refresh failed (${err.message}); retrying`;
      setTimeout(() => {
        refreshing = null;
        refresh();
      }, 2000);
    } finally {
      button.disabled = false;
      refreshing = null;
    }
  })();
  return refreshing;
}

function setOlder(next) {
  let link = document.getElementById("older");
  if (!next) {
    if (link) link.parentElement.remove();
    return;
  }
  if (!link) {
    link = el("a", { id: "older", href: "#" }, "Load older");
    link.addEventListener("click", loadOlder);
    table.closest(".table-wrap").after(el("p", { class: "more" }, link));
  }
  link.dataset.before = next;
  link.href = `?${query({ before: next })}`;
}

async function loadOlder(event) {
  event.preventDefault();
  const link = event.currentTarget;
  const res = await fetch(`/api/jobs?${query({ limit: 50, before: link.dataset.before })}`);
  if (!res.ok) {
    notice.textContent = `loading older jobs failed (HTTP ${res.status})`;
    return;
  }
  const page = await res.json();
  const frag = document.createDocumentFragment();
  for (const job of page.items) {
    const known = jobs.get(job.build_id);
    if (rows.has(job.build_id) || (known && known.seq > job.seq)) continue;
    jobs.set(job.build_id, job);
    const tr = renderRow(job);
    rows.set(job.build_id, tr);
    frag.append(tr);
  }
  tbody.append(frag);
  empty.hidden = tbody.rows.length > 0;
  setOlder(page.next);
}

const live = new LiveSocket({
  onOpen(again) {
    if (again) refresh();
    else live.send({ type: "filter", ...filter, since: resyncWatermark });
  },
  onMessage(msg) {
    if (msg.type === "jobs") queue(msg.items);
    else if (msg.type === "resync") refresh();
    else if (msg.type === "gap") notice.textContent = "some history is no longer retained; showing what is";
    else if (msg.type === "error") notice.textContent = msg.message;
  },
});

document.getElementById("refresh").addEventListener("click", () => refresh());
document.getElementById("older")?.addEventListener("click", loadOlder);
refreshTimes();
setInterval(() => refreshTimes(tbody), 10000);
