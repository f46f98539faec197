// Shared display helpers: relative times (exact time in `title`), durations, status badges.
// Everything user-supplied goes in through textContent, never innerHTML.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else node.setAttribute(key, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === "") continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function relative(iso, now = Date.now()) {
  const then = Date.parse(iso);
  if (Number.isNaN(then)) return String(iso);
  const s = Math.round((now - then) / 1000);
  const ago = s >= 0;
  const a = Math.abs(s);
  let text;
  if (a < 5) return "just now";
  if (a < 60) text = `${a} s`;
  else if (a < 3600) text = `${Math.floor(a / 60)} min`;
  else if (a < 86400) text = `${Math.floor(a / 3600)} h`;
  else text = `${Math.floor(a / 86400)} d`;
  return ago ? `${text} ago` : `in ${text}`;
}

export function duration(startIso, endIso, now = Date.now()) {
  if (!startIso) return "";
  const start = Date.parse(startIso);
  const end = endIso ? Date.parse(endIso) : now;
  if (Number.isNaN(start) || Number.isNaN(end)) return "";
  let s = Math.max(0, Math.round((end - start) / 1000));
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  if (h) return `${h} h ${m} min`;
  if (m) return `${m} min ${s} s`;
  return `${s} s`;
}

export function timeEl(iso, cls = "rel") {
  if (!iso) return null;
  const t = el("time", { class: cls, datetime: iso, title: iso }, relative(iso));
  return t;
}

export function badge(status) {
  return el("span", { class: `badge st-${String(status).toLowerCase()}` }, status);
}

// Refresh every relative time and running duration under `root`.
export function refreshTimes(root = document) {
  const now = Date.now();
  for (const t of root.querySelectorAll("time.rel")) {
    t.textContent = relative(t.getAttribute("datetime"), now);
    t.title = t.getAttribute("datetime");
  }
  for (const d of root.querySelectorAll(".duration")) {
    const text = duration(d.dataset.start, d.dataset.end, now);
    if (!text) d.textContent = "—";
    else if (!d.closest(".meta")) d.textContent = text;
    else d.textContent = d.dataset.end ? `took ${text}` : `running ${text}`;
  }
}
