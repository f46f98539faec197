// One job, live: status and event timeline from `jobs` frames, the log from `follow_logs`
// (from the offset the server already rendered), rendered in animation-frame pieces so a
// 50 MB log does not freeze the page; follows the end unless the user scrolled up.

import { AnsiStream, styleFromClasses } from "./ansi.js";
import { badge, el, refreshTimes, timeEl } from "./format.js";
import { LiveSocket } from "./live.js";

const root = document.getElementById("job");
let job = JSON.parse(root.dataset.job);
const buildId = job.build_id;
const logEl = document.getElementById("log");
const logState = document.getElementById("log-state");
const events = document.getElementById("events");
const encoder = new TextEncoder();
const PIECE = 64 * 1024; // characters rendered per animation frame

let offset = Number(root.dataset.logOffset || 0); // bytes of log received so far
let complete = root.dataset.logComplete === "true";
let since = Number(root.dataset.watermark || 0);
const ansi = new AnsiStream(styleFromClasses(root.dataset.logStyle));
let backlog = [];
let rendering = 0;

function atBottom() {
  return logEl.scrollTop + logEl.clientHeight >= logEl.scrollHeight - 8;
}

function renderPiece() {
  rendering = 0;
  const follow = atBottom();
  let budget = PIECE;
  const frag = document.createDocumentFragment();
  while (backlog.length && budget > 0) {
    let text = backlog[0];
    if (text.length > budget) {
      backlog[0] = text.slice(budget);
      text = text.slice(0, budget);
    } else {
      backlog.shift();
    }
    budget -= text.length;
    frag.append(ansi.feed(text));
  }
  logEl.append(frag);
  if (follow) logEl.scrollTop = logEl.scrollHeight;
  if (backlog.length) rendering = requestAnimationFrame(renderPiece);
  else if (complete) logState.textContent = `log complete — ${job.status}`;
}

function addLog(msg) {
  // Frames start where the last ended; trim anything already shown (after a reconnect).
  let data = msg.data;
  if (msg.offset < offset) {
    const bytes = encoder.encode(data);
    const skip = offset - msg.offset;
    if (skip >= bytes.length) return;
    data = new TextDecoder().decode(bytes.slice(skip));
  }
  offset = Math.max(offset, msg.offset) + encoder.encode(data).length;
  backlog.push(data);
  if (!rendering) rendering = requestAnimationFrame(renderPiece);
}

function setField(name, value, isTime = false) {
  const dd = root.querySelector(`[data-field="${name}"]`);
  if (!dd) return;
  dd.replaceChildren(isTime && value ? timeEl(value) : value === null || value === undefined || value === "" ? "—" : String(value));
}

function applyJob(update) {
  if (update.build_id !== buildId || update.seq <= job.seq) return;
  job = { ...job, ...update };
  document.getElementById("status").replaceChildren(badge(job.status));
  for (const name of ["status", "reason", "exit_code", "runner_id", "queue_position"]) setField(name, job[name]);
  for (const name of ["started_at", "finished_at"]) setField(name, job[name], true);
  const duration = root.querySelector('[data-field="duration"] .duration');
  if (duration) {
    duration.dataset.start = job.started_at || "";
    duration.dataset.end = job.finished_at || "";
  }
  if (!events.querySelector(`tr[data-seq="${update.seq}"]`)) {
    events.append(
      el("tr", { "data-seq": update.seq },
        el("td", {}, update.seq),
        el("td", {}, timeEl(update.updated_at)),
        el("td", {}, badge(update.status)),
        el("td", {}, update.reason || ""),
        el("td", {}, update.runner_id || "")),
    );
  }
  if (job.status === "SUCCESS" || job.status === "FAILURE") {
    document.getElementById("cancel")?.remove();
  }
  refreshTimes(root);
}

const live = new LiveSocket({
  onOpen() {
    // A narrow filter; the page keeps only this job's updates.
    live.send({ type: "filter", organization: job.organization, environment: job.environment, q: String(buildId), since });
    if (!complete) live.send({ type: "follow_logs", build_id: buildId, offset });
  },
  onMessage(msg) {
    if (msg.type === "jobs") {
      for (const item of msg.items) {
        since = Math.max(since, item.stream_seq);
        applyJob(item);
      }
    } else if (msg.type === "log" && msg.build_id === buildId) {
      addLog(msg);
    } else if (msg.type === "log_end" && msg.build_id === buildId) {
      complete = true;
      if (msg.status && job.status !== msg.status) applyJob({ ...job, status: msg.status, seq: job.seq });
      logState.textContent = backlog.length ? "loading log…" : `log complete — ${msg.status}`;
      if (!backlog.length && !rendering) renderPiece();
    } else if (msg.type === "resync") {
      live.send({ type: "filter", organization: job.organization, environment: job.environment, q: String(buildId), since });
    }
  },
});

const cancel = document.getElementById("cancel");
cancel?.addEventListener("click", async () => {
  if (!window.confirm(`Cancel job ${buildId}?`)) return;
  const result = document.getElementById("cancel-result");
  cancel.disabled = true;
  try {
    // The page's CSRF token (a <meta> of base.html): the session cookie alone does not
    // authorise a state-changing request.
    const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
    const res = await fetch(`/api/jobs/${buildId}/cancel`, {
      method: "POST",
      headers: { Accept: "application/json", "X-CSRF-Token": csrf },
    });
    if (res.ok) {
      result.textContent = "cancel requested";
    } else {
      const body = await res.json().catch(() => ({}));
      result.textContent = body?.error?.message || `cancel failed (HTTP ${res.status})`;
      cancel.disabled = false;
    }
  } catch (err) {
    result.textContent = `cancel failed (${err.message})`;
    cancel.disabled = false;
  }
});

if (!complete) logState.textContent = "following…";
logEl.scrollTop = logEl.scrollHeight;
refreshTimes(root);
setInterval(() => refreshTimes(root), 5000);
