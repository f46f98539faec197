// ANSI SGR colours in log text → styled spans (the rules of services/gateway/ansi.py).
// Text always goes in through textContent: a log line can never inject markup.

// CSI sequences, OSC strings, other two-byte escapes.
const ESCAPE = /\x1b\[([0-?]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]/g;
const CONTROL = /[\x00-\x08\x0b-\x1f\x7f]/g;

export function emptyStyle() {
  return { fg: null, bg: null, b: false, d: false, i: false, u: false };
}

export function classesOf(s) {
  const names = [];
  if (s.fg !== null) names.push(`fg-${s.fg}`);
  if (s.bg !== null) names.push(`bg-${s.bg}`);
  for (const k of ["b", "d", "i", "u"]) if (s[k]) names.push(k);
  return names.join(" ");
}

export function styleFromClasses(text) {
  const s = emptyStyle();
  for (const name of (text || "").split(/\s+/)) {
    const m = /^(fg|bg)-(\d+)$/.exec(name);
    if (m) s[m[1]] = Number(m[2]);
    else if (name in s) s[name] = true;
  }
  return s;
}

function colour(params, i) {
  if (params[i + 1] === 5 && i + 2 < params.length) {
    const n = params[i + 2];
    return [n >= 0 && n < 16 ? n : null, 3];
  }
  if (params[i + 1] === 2) return [null, 5];
  return [null, 1];
}

export function applySgr(style, raw) {
  const s = { ...style };
  const params = raw ? raw.split(";").map((p) => (/^\d+$/.test(p) ? Number(p) : 0)) : [0];
  for (let i = 0; i < params.length; ) {
    const p = params[i];
    let step = 1;
    if (p === 0) Object.assign(s, emptyStyle());
    else if (p === 1) s.b = true;
    else if (p === 2) s.d = true;
    else if (p === 3) s.i = true;
    else if (p === 4) s.u = true;
    else if (p === 22) s.b = s.d = false;
    else if (p === 23) s.i = false;
    else if (p === 24) s.u = false;
    else if (p >= 30 && p <= 37) s.fg = p - 30;
    else if (p >= 90 && p <= 97) s.fg = p - 90 + 8;
    else if (p === 39) s.fg = null;
    else if (p >= 40 && p <= 47) s.bg = p - 40;
    else if (p >= 100 && p <= 107) s.bg = p - 100 + 8;
    else if (p === 49) s.bg = null;
    else if (p === 38 || p === 48) {
      const [c, used] = colour(params, i);
      if (p === 38) s.fg = c;
      else s.bg = c;
      step = used;
    }
    i += step;
  }
  return s;
}

// A streaming parser: feed() pieces of text (a sequence may be split between pieces),
// get back a DocumentFragment of spans.
export class AnsiStream {
  constructor(style = emptyStyle()) {
    this.style = style;
    this.carry = "";
  }

  feed(text) {
    const frag = document.createDocumentFragment();
    text = this.carry + text;
    this.carry = "";
    const cut = text.lastIndexOf("\x1b");
    if (cut !== -1 && cut > text.length - 64 && !/[@-~]/.test(text.slice(cut + 2)) && !text.slice(cut).includes("\n")) {
      // An escape sequence cut at the end: keep it for the next piece.
      this.carry = text.slice(cut);
      text = text.slice(0, cut);
    }
    const emit = (piece) => {
      piece = piece.replace(/\r\n/g, "\n").replace(CONTROL, "");
      if (!piece) return;
      const cls = classesOf(this.style);
      const last = frag.lastChild;
      if (last && (last.className || "") === cls) {
        last.textContent += piece;
        return;
      }
      const span = document.createElement("span");
      if (cls) span.className = cls;
      span.textContent = piece;
      frag.append(span);
    };
    let pos = 0;
    ESCAPE.lastIndex = 0;
    for (let m = ESCAPE.exec(text); m; m = ESCAPE.exec(text)) {
      emit(text.slice(pos, m.index));
      pos = ESCAPE.lastIndex;
      if (m[2] === "m") this.style = applySgr(this.style, m[1]);
    }
    emit(text.slice(pos));
    return frag;
  }
}
