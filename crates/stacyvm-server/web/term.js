// StacyVM dashboard terminal: a small VT100/xterm-compatible emulator.
// No framework, no dependencies, no build step: the file is embedded in the
// server binary and loaded with a classic <script>. Everything a sandbox
// prints is hostile, so it reaches the page only through textContent and
// class names, never as HTML, and the parser is bounded in time and memory.
//
// TermModel (pure, no DOM) parses the output stream into a screen of cells.
// TermView (DOM) draws a model into a container and turns keys into input.
//
// Supported: C0 controls (BS HT LF VT FF CR SO SI; BEL ignored), ESC 7 8 D E
// M c H = > and ESC # 8, G0/G1 designation of ASCII and DEC special graphics,
// CSI cursor moves (CUU CUD CUF CUB CNL CPL CHA HPA HPR VPA VPR CUP HVP CHT
// CBT), ED 0-3, EL 0-2, ICH DCH ECH IL DL SU SD REP, DECSTBM, TBC, SGR (bold,
// dim, italic, underline, inverse, 16/256/truecolour), CSI s/u, DSR 5/6, DA,
// SM/RM 4 (insert), DECSET/DECRST 1 6 7 25 47 1047 1048 1049 2004, DECSTR,
// OSC 0/2 (title), wide characters and combining marks, scrollback.
// Not supported (parsed and ignored): mouse reporting, left/right margins,
// blink and hidden text, colon sub-parameters (treated as ';'), G2/G3,
// national charsets, double-width lines, other OSC/DCS strings, reflow of
// wrapped lines on resize, IME composition.
//
// CSS for the dashboard (app.css):
//
// .term { background: #111; color: #ddd; font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
//         font-size: 13px; line-height: 1.2; overflow: auto; position: relative; padding: 4px; outline: none; }
// .term:focus-visible { box-shadow: 0 0 0 3px #9bb6f5; }
// .term-row { white-space: pre; height: 1.2em; }
// .term-measure { position: absolute; top: 0; left: 0; visibility: hidden; white-space: pre; }
// .term-bold { font-weight: bold; }
// .term-italic { font-style: italic; }
// .term-underline { text-decoration: underline; }
// .term-dim { opacity: .6; }
// .term-fg-rev { color: #111; }
// .term-bg-rev { background: #ddd; }
// .term-cursor { outline: 1px solid #ddd; }
// .term-fg-0 { color: #000000; }  .term-bg-0 { background: #000000; }
// .term-fg-1 { color: #cd3131; }  .term-bg-1 { background: #cd3131; }
// .term-fg-2 { color: #0dbc79; }  .term-bg-2 { background: #0dbc79; }
// .term-fg-3 { color: #e5e510; }  .term-bg-3 { background: #e5e510; }
// .term-fg-4 { color: #2472c8; }  .term-bg-4 { background: #2472c8; }
// .term-fg-5 { color: #bc3fbc; }  .term-bg-5 { background: #bc3fbc; }
// .term-fg-6 { color: #11a8cd; }  .term-bg-6 { background: #11a8cd; }
// .term-fg-7 { color: #e5e5e5; }  .term-bg-7 { background: #e5e5e5; }
// .term-fg-8 { color: #666666; }  .term-bg-8 { background: #666666; }
// .term-fg-9 { color: #f14c4c; }  .term-bg-9 { background: #f14c4c; }
// .term-fg-10 { color: #23d18b; } .term-bg-10 { background: #23d18b; }
// .term-fg-11 { color: #f5f543; } .term-bg-11 { background: #f5f543; }
// .term-fg-12 { color: #3b8eea; } .term-bg-12 { background: #3b8eea; }
// .term-fg-13 { color: #d670d6; } .term-bg-13 { background: #d670d6; }
// .term-fg-14 { color: #29b8db; } .term-bg-14 { background: #29b8db; }
// .term-fg-15 { color: #ffffff; } .term-bg-15 { background: #ffffff; }
//
// The cursor is drawn by swapping the cell's colours (an inverted block);
// .term-fg-rev / .term-bg-rev are the default colours swapped.

(function () {
"use strict";

const MAX_COLS = 500;
const MAX_ROWS = 200;
const MAX_PARAMS = 32;
const MAX_PARAM_VALUE = 99999;
const MAX_OSC = 4096;
const MAX_SCROLLBACK = 100000;
const MAX_CELL_TEXT = 16; // UTF-16 units in one cell, base plus combining marks

// Parser states.
const GROUND = 0;
const ESCAPE = 1;
const ESCAPE_INTER = 2;
const CSI_PARAM = 3;
const OSC_STRING = 4;
const IGNORE_STRING = 5; // DCS, SOS, PM, APC: swallowed until ST

// DEC special graphics for 0x5f..0x7e (ESC ( 0).
const DEC_GRAPHICS = Array.from(" ◆▒␉␌␍␊°±␤␋┘┐┌└┼⎺⎻─⎼⎽├┤┴┬│≤≥π≠£·");

// Sorted [lo, hi] code point ranges. Zero-width is checked before wide.
const ZERO_WIDTH = [
  0x0300, 0x036f, 0x0483, 0x0489, 0x0591, 0x05bd, 0x0610, 0x061a, 0x064b, 0x065f,
  0x1ab0, 0x1aff, 0x1dc0, 0x1dff, 0x200b, 0x200f, 0x20d0, 0x20ff, 0x302a, 0x302f,
  0x3099, 0x309a, 0xfe00, 0xfe0f, 0xfe20, 0xfe2f, 0x1f3fb, 0x1f3ff, 0xe0020, 0xe007f,
  0xe0100, 0xe01ef,
];
const WIDE = [
  0x1100, 0x115f, 0x231a, 0x231b, 0x2329, 0x232a, 0x23e9, 0x23ec, 0x23f0, 0x23f3,
  0x25fd, 0x25fe, 0x2614, 0x2615, 0x2648, 0x2653, 0x26a1, 0x26a1, 0x26aa, 0x26ab,
  0x26bd, 0x26be, 0x26c4, 0x26c5, 0x26d4, 0x26d4, 0x26ea, 0x26ea, 0x26f2, 0x26f5,
  0x26fa, 0x26fd, 0x2705, 0x2705, 0x270a, 0x270b, 0x2728, 0x2728, 0x274c, 0x274c,
  0x2753, 0x2757, 0x2795, 0x2797, 0x27b0, 0x27b0, 0x27bf, 0x27bf, 0x2b1b, 0x2b1c,
  0x2b50, 0x2b50, 0x2b55, 0x2b55, 0x2e80, 0x303e, 0x3041, 0x33ff, 0x3400, 0x4dbf,
  0x4e00, 0x9fff, 0xa000, 0xa4cf, 0xa960, 0xa97f, 0xac00, 0xd7a3, 0xf900, 0xfaff,
  0xfe10, 0xfe19, 0xfe30, 0xfe6f, 0xff00, 0xff60, 0xffe0, 0xffe6, 0x1b000, 0x1b2ff,
  0x1f004, 0x1f004, 0x1f0cf, 0x1f0cf, 0x1f18e, 0x1f18e, 0x1f191, 0x1f19a, 0x1f200, 0x1f251,
  0x1f300, 0x1f64f, 0x1f680, 0x1f6ff, 0x1f7e0, 0x1f7eb, 0x1f90c, 0x1f9ff, 0x1fa70, 0x1faff,
  0x20000, 0x3fffd,
];

function inRanges(ranges, cp) {
  let lo = 0;
  let hi = ranges.length / 2 - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (cp < ranges[2 * mid]) hi = mid - 1;
    else if (cp > ranges[2 * mid + 1]) lo = mid + 1;
    else return true;
  }
  return false;
}

// Cells a code point takes: 0 (combining), 1 or 2 (East Asian wide, emoji).
function charWidth(cp) {
  if (cp < 0x300) return 1;
  if (inRanges(ZERO_WIDTH, cp)) return 0;
  return inRanges(WIDE, cp) ? 2 : 1;
}

function clampInt(value, lo, hi, fallback) {
  const n = Math.floor(Number(value));
  if (!Number.isFinite(n)) return fallback;
  return Math.min(hi, Math.max(lo, n));
}

function makeAttr(fields) {
  return Object.freeze(Object.assign({
    fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false,
  }, fields));
}

const DEFAULT_ATTR = makeAttr({});

// One screen line. chars[i] is the text of cell i, or null for the right
// half of a wide character; attrs[i] is a frozen attribute object shared
// between cells, so "same attributes" is a reference comparison.
class Row {
  constructor(cols, attr) {
    this.chars = new Array(cols).fill(" ");
    this.attrs = new Array(cols).fill(attr);
    this.dirty = true;
  }

  text() {
    return this.chars.join("").replace(/ +$/, "");
  }

  fill(from, to, attr) {
    for (let i = from; i < to; i++) {
      this.chars[i] = " ";
      this.attrs[i] = attr;
    }
    this.fixWide();
  }

  // Shift cells right from x by n, blanking the gap; cells pushed off the end are lost.
  insert(x, n, attr) {
    const cols = this.chars.length;
    n = Math.min(n, cols - x);
    for (let i = cols - 1; i >= x + n; i--) {
      this.chars[i] = this.chars[i - n];
      this.attrs[i] = this.attrs[i - n];
    }
    this.fill(x, x + n, attr);
  }

  // Delete n cells at x, shifting the rest left and blanking the end.
  remove(x, n, attr) {
    const cols = this.chars.length;
    n = Math.min(n, cols - x);
    for (let i = x; i < cols - n; i++) {
      this.chars[i] = this.chars[i + n];
      this.attrs[i] = this.attrs[i + n];
    }
    this.fill(cols - n, cols, attr);
  }

  resize(cols, attr) {
    const old = this.chars.length;
    this.chars.length = cols;
    this.attrs.length = cols;
    if (cols > old) this.fill(old, cols, attr);
    else this.fixWide();
  }

  // Blank half-overwritten wide characters so every wide lead is followed
  // by exactly one null and every null follows a wide lead.
  fixWide() {
    const c = this.chars;
    for (let i = 0; i < c.length; i++) {
      if (c[i] === null) {
        if (i === 0 || c[i - 1] === null || charWidth(c[i - 1].codePointAt(0)) !== 2) c[i] = " ";
      } else if ((i + 1 === c.length || c[i + 1] !== null) && c[i].codePointAt(0) >= 0x1100
          && charWidth(c[i].codePointAt(0)) === 2) {
        c[i] = " ";
      }
    }
    this.dirty = true;
  }
}

function makeBuffer(cols, rows) {
  const lines = [];
  for (let y = 0; y < rows; y++) lines.push(new Row(cols, DEFAULT_ATTR));
  return { lines, saved: null };
}

function sanitizeTitle(s) {
  return s
    .replace(/[\u0000-\u001f\u007f-\u009f]/g, "")
    .replace(/[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/g, "");
}

class TermModel {
  constructor(cols = 80, rows = 24, options = {}) {
    this.cols = clampInt(cols, 1, MAX_COLS, 80);
    this.rows = clampInt(rows, 1, MAX_ROWS, 24);
    this.scrollbackLimit = clampInt((options || {}).scrollback ?? 1000, 0, MAX_SCROLLBACK, 1000);
    this.scrollback = [];
    this.scrollbackPushed = 0; // lines ever added, so a renderer can append only new ones
    this.scrollbackEpoch = 0; // bumped when the scrollback is cleared
    this.title = "";
    this.version = 0;
    this.onReply = null; // (string) => void: answers to DSR/DA, to be sent to the program
    this.onChange = null; // () => void: after each write or resize
    this.fullReset();
  }

  // ---- public read API ----

  get altScreen() {
    return this.buf === this.alt;
  }

  get cursor() {
    return { x: this.x, y: this.y, visible: this.cursorVisible };
  }

  lineText(y) {
    const row = this.buf.lines[y];
    return row ? row.text() : "";
  }

  screenText() {
    const lines = this.buf.lines.map((row) => row.text());
    while (lines.length && lines[lines.length - 1] === "") lines.pop();
    return lines.join("\n");
  }

  cells(y) {
    const row = this.buf.lines[y];
    if (!row) return [];
    return row.chars.map((ch, i) => {
      const a = row.attrs[i];
      return {
        ch: ch === null ? "" : ch, fg: a.fg, bg: a.bg, bold: a.bold, underline: a.underline,
        inverse: a.inverse, italic: a.italic, dim: a.dim,
      };
    });
  }

  scrollbackLines() {
    return this.scrollback.map((row) => row.text());
  }

  // Renderer access: the Row at visible line y / scrollback line i ({chars, attrs}, read-only).
  rowAt(y) {
    return this.buf.lines[y];
  }

  scrollbackRow(i) {
    return this.scrollback[i];
  }

  // Visible rows changed since the last call; clears their dirty flags.
  takeDirty() {
    const out = [];
    this.buf.lines.forEach((row, y) => {
      if (row.dirty) {
        row.dirty = false;
        out.push(y);
      }
    });
    return out;
  }

  // ---- input ----

  write(data) {
    let s = typeof data === "string" ? data : String(data ?? "");
    if (this.pendingHigh) {
      s = this.pendingHigh + s;
      this.pendingHigh = "";
    }
    const n = s.length;
    for (let i = 0; i < n; i++) {
      let c = s.charCodeAt(i);
      if (c >= 0xd800 && c <= 0xdfff) {
        const d = i + 1 < n ? s.charCodeAt(i + 1) : -1;
        if (c <= 0xdbff && d === -1) {
          this.pendingHigh = s[i]; // the low half comes with the next write
          break;
        }
        if (c <= 0xdbff && d >= 0xdc00 && d <= 0xdfff) {
          c = 0x10000 + ((c - 0xd800) << 10) + (d - 0xdc00);
          i++;
        } else {
          c = 0xfffd;
        }
      }
      this.consume(c);
    }
    if (n) this.changed();
  }

  resize(cols, rows) {
    cols = clampInt(cols, 1, MAX_COLS, this.cols);
    rows = clampInt(rows, 1, MAX_ROWS, this.rows);
    if (cols === this.cols && rows === this.rows) return;
    for (const buf of [this.normal, this.alt]) {
      const active = buf === this.buf;
      const anchor = active ? this.y : (buf.saved ? buf.saved.y : 0);
      const shift = this.resizeBuffer(buf, cols, rows, anchor);
      if (active) this.y -= shift;
      if (buf.saved) {
        buf.saved.x = Math.min(buf.saved.x, cols - 1);
        buf.saved.y = Math.min(Math.max(0, buf.saved.y - shift), rows - 1);
      }
    }
    this.resizeTabs(cols);
    this.cols = cols;
    this.rows = rows;
    this.top = 0;
    this.bottom = rows - 1;
    this.x = Math.min(this.x, cols - 1);
    this.y = Math.min(Math.max(this.y, 0), rows - 1);
    this.pendingWrap = false;
    this.markAllDirty();
    this.changed();
  }

  // Rows beyond the new height go from below the anchor (cursor) first,
  // then from the top (into the scrollback for the normal screen).
  resizeBuffer(buf, cols, rows, anchor) {
    const lines = buf.lines;
    for (const row of lines) row.resize(cols, DEFAULT_ATTR);
    let shift = 0;
    while (lines.length > rows) {
      if (lines.length - 1 > anchor) {
        lines.pop();
      } else {
        const gone = lines.shift();
        shift++;
        if (buf === this.normal) this.pushScrollback(gone);
      }
    }
    while (lines.length < rows) lines.push(new Row(cols, DEFAULT_ATTR));
    return shift;
  }

  changed() {
    this.version++;
    if (typeof this.onChange === "function") this.onChange();
  }

  reply(s) {
    if (typeof this.onReply === "function") this.onReply(s);
  }

  // ---- parser ----

  consume(c) {
    switch (this.state) {
      case GROUND: return this.ground(c);
      case ESCAPE: return this.escape(c);
      case ESCAPE_INTER: return this.escapeInter(c);
      case CSI_PARAM: return this.csi(c);
      case OSC_STRING: return this.osc(c);
      default: return this.ignoreString(c);
    }
  }

  ground(c) {
    if (c < 0x20) this.control(c);
    else if (c >= 0x7f && c < 0xa0) return; // DEL and C1: nothing to print
    else this.print(c);
  }

  // C0 controls, also executed in the middle of escape sequences.
  control(c) {
    switch (c) {
      case 0x08: this.pendingWrap = false; this.x = Math.max(0, this.x - 1); break;
      case 0x09: this.tabForward(1); break;
      case 0x0a: case 0x0b: case 0x0c: this.index(); break;
      case 0x0d: this.pendingWrap = false; this.x = 0; break;
      case 0x0e: this.gl = 1; break;
      case 0x0f: this.gl = 0; break;
      case 0x18: case 0x1a: this.state = GROUND; break;
      case 0x1b: this.state = ESCAPE; break;
      default: break; // BEL, NUL and the rest are ignored
    }
  }

  escape(c) {
    if (c < 0x20) return this.control(c);
    if (c <= 0x2f) {
      this.inter = String.fromCharCode(c);
      this.state = ESCAPE_INTER;
      return;
    }
    this.state = GROUND;
    switch (c < 0x80 ? String.fromCharCode(c) : "") {
      case "[": this.startCsi(); break;
      case "]": this.state = OSC_STRING; this.oscBuf = ""; this.strEsc = false; break;
      case "P": case "X": case "^": case "_": this.state = IGNORE_STRING; this.strEsc = false; break;
      case "7": this.saveCursor(); break;
      case "8": this.restoreCursor(); break;
      case "D": this.index(); break;
      case "E": this.x = 0; this.index(); break;
      case "M": this.reverseIndex(); break;
      case "c": this.fullReset(); break;
      case "H": this.tabs[this.x] = 1; break;
      case "=": this.appKeypad = true; break;
      case ">": this.appKeypad = false; break;
      default: break;
    }
  }

  escapeInter(c) {
    if (c < 0x20) return this.control(c);
    if (c <= 0x2f) return; // further intermediates: ignored
    this.state = GROUND;
    const final = c < 0x80 ? String.fromCharCode(c) : "";
    if (this.inter === "(") this.g0 = final === "0" ? "0" : "B";
    else if (this.inter === ")") this.g1 = final === "0" ? "0" : "B";
    else if (this.inter === "#" && final === "8") this.alignmentTest();
  }

  startCsi() {
    this.state = CSI_PARAM;
    this.params = [];
    this.cur = -1; // -1: parameter not given
    this.prefix = "";
    this.inter = "";
    this.invalid = false;
  }

  csi(c) {
    if (c >= 0x30 && c <= 0x39) {
      if (this.inter) this.invalid = true;
      this.cur = Math.min(MAX_PARAM_VALUE, Math.max(this.cur, 0) * 10 + (c - 0x30));
    } else if (c === 0x3b || c === 0x3a) {
      if (this.inter) this.invalid = true;
      this.pushParam();
    } else if (c >= 0x3c && c <= 0x3f) {
      if (this.params.length || this.cur >= 0 || this.prefix || this.inter) this.invalid = true;
      else this.prefix = String.fromCharCode(c);
    } else if (c >= 0x20 && c <= 0x2f) {
      if (this.inter.length >= 2) this.invalid = true;
      else this.inter += String.fromCharCode(c);
    } else if (c >= 0x40 && c <= 0x7e) {
      if (this.cur >= 0 || this.params.length) this.pushParam();
      this.state = GROUND;
      if (!this.invalid) this.dispatchCsi(String.fromCharCode(c));
    } else if (c < 0x20) {
      this.control(c);
    } else if (c !== 0x7f) {
      this.invalid = true;
    }
  }

  pushParam() {
    if (this.params.length < MAX_PARAMS) this.params.push(this.cur);
    this.cur = -1;
  }

  // Parameter i, or def when it is missing or 0.
  arg(i, def) {
    const v = this.params[i];
    return v === undefined || v < 1 ? def : v;
  }

  osc(c) {
    if (this.strEsc) {
      this.strEsc = false;
      if (c === 0x5c) {
        this.state = GROUND;
        this.dispatchOsc();
      } else {
        this.state = ESCAPE;
        this.escape(c);
      }
    } else if (c === 0x07) {
      this.state = GROUND;
      this.dispatchOsc();
    } else if (c === 0x1b) {
      this.strEsc = true;
    } else if (c === 0x18 || c === 0x1a) {
      this.state = GROUND;
    } else if (c >= 0x20 && this.oscBuf.length < MAX_OSC - 1) {
      this.oscBuf += String.fromCodePoint(c);
    }
  }

  dispatchOsc() {
    const s = this.oscBuf;
    this.oscBuf = "";
    const semi = s.indexOf(";");
    const code = semi < 0 ? s : s.slice(0, semi);
    if (semi >= 0 && (code === "0" || code === "2")) this.title = sanitizeTitle(s.slice(semi + 1));
  }

  ignoreString(c) {
    if (this.strEsc) {
      this.strEsc = false;
      if (c === 0x5c) {
        this.state = GROUND;
      } else {
        this.state = ESCAPE;
        this.escape(c);
      }
    } else if (c === 0x1b) {
      this.strEsc = true;
    } else if (c === 0x18 || c === 0x1a) {
      this.state = GROUND;
    }
  }

  // ---- printing ----

  print(cp) {
    const charset = this.gl ? this.g1 : this.g0;
    if (charset === "0" && cp >= 0x5f && cp <= 0x7e) return this.putChar(DEC_GRAPHICS[cp - 0x5f], 1);
    const width = charWidth(cp);
    const ch = String.fromCodePoint(cp);
    if (width === 0) this.combine(ch);
    else if (width === 2 && this.cols < 2) this.putChar("\ufffd", 1);
    else this.putChar(ch, width);
  }

  putChar(ch, width) {
    if (this.pendingWrap) this.wrap();
    if (width === 2 && this.x === this.cols - 1) {
      if (this.autowrap) this.wrap();
      else this.x = this.cols - 2;
    }
    const row = this.buf.lines[this.y];
    const x = this.x;
    if (this.insertMode) row.insert(x, width, this.blank());
    if (x > 0 && row.chars[x] === null) row.chars[x - 1] = " "; // overwriting the right half of a wide char
    if (x + width < this.cols && row.chars[x + width] === null) row.chars[x + width] = " ";
    row.chars[x] = ch;
    row.attrs[x] = this.pen;
    if (width === 2) {
      row.chars[x + 1] = null;
      row.attrs[x + 1] = this.pen;
    }
    row.dirty = true;
    this.lastChar = ch;
    this.lastWidth = width;
    if (x + width >= this.cols) {
      this.x = this.cols - 1;
      this.pendingWrap = this.autowrap;
    } else {
      this.x = x + width;
    }
  }

  wrap() {
    this.x = 0;
    this.index();
  }

  // A combining mark joins the cell before the cursor.
  combine(mark) {
    let x = this.pendingWrap ? this.x : this.x - 1;
    const row = this.buf.lines[this.y];
    if (x > 0 && row.chars[x] === null) x--;
    if (x < 0 || row.chars[x] === null || row.chars[x].length + mark.length > MAX_CELL_TEXT) return;
    row.chars[x] += mark;
    row.dirty = true;
  }

  repeat(n) {
    if (this.lastChar === null) return;
    const count = Math.min(n, this.cols * this.rows);
    for (let i = 0; i < count; i++) this.putChar(this.lastChar, this.lastWidth);
  }

  // ---- cursor movement ----

  // Absolute move; row is relative to the scroll region in origin mode.
  moveTo(col, row) {
    const top = this.originMode ? this.top : 0;
    const bottom = this.originMode ? this.bottom : this.rows - 1;
    this.x = Math.min(Math.max(col, 0), this.cols - 1);
    this.y = Math.min(Math.max(top + row, top), bottom);
    this.pendingWrap = false;
  }

  moveX(n) {
    this.x = Math.min(Math.max(this.x + n, 0), this.cols - 1);
    this.pendingWrap = false;
  }

  // Vertical moves stop at the scroll margins when starting inside them.
  moveY(n) {
    const top = this.y >= this.top ? this.top : 0;
    const bottom = this.y <= this.bottom ? this.bottom : this.rows - 1;
    this.y = Math.min(Math.max(this.y + n, top), bottom);
    this.pendingWrap = false;
  }

  index() {
    this.pendingWrap = false;
    if (this.y === this.bottom) this.scrollUp(1, this.top, this.bottom, true);
    else if (this.y < this.rows - 1) this.y++;
  }

  reverseIndex() {
    this.pendingWrap = false;
    if (this.y === this.top) this.scrollDown(1, this.top, this.bottom);
    else if (this.y > 0) this.y--;
  }

  tabForward(n) {
    this.pendingWrap = false;
    for (let i = 0; i < n && this.x < this.cols - 1; i++) {
      do this.x++; while (this.x < this.cols - 1 && !this.tabs[this.x]);
    }
  }

  tabBackward(n) {
    this.pendingWrap = false;
    for (let i = 0; i < n && this.x > 0; i++) {
      do this.x--; while (this.x > 0 && !this.tabs[this.x]);
    }
  }

  resizeTabs(cols) {
    const tabs = new Uint8Array(cols);
    for (let i = 8; i < cols; i += 8) tabs[i] = 1;
    if (this.tabs) tabs.set(this.tabs.subarray(0, Math.min(cols, this.cols)));
    this.tabs = tabs;
  }

  // ---- scrolling and erasing ----

  // Scroll lines top..bottom up by n; with toScrollback, lines leaving the
  // top of the full normal screen are kept in the scrollback.
  scrollUp(n, top, bottom, toScrollback) {
    n = Math.min(n, bottom - top + 1);
    const lines = this.buf.lines;
    const removed = lines.splice(top, n);
    lines.splice(bottom - n + 1, 0, ...this.blankRows(n));
    const keep = toScrollback && top === 0 && bottom === this.rows - 1 && !this.altScreen;
    if (keep) removed.forEach((row) => this.pushScrollback(row));
    this.markDirty(top, bottom);
  }

  scrollDown(n, top, bottom) {
    n = Math.min(n, bottom - top + 1);
    const lines = this.buf.lines;
    lines.splice(bottom - n + 1, n);
    lines.splice(top, 0, ...this.blankRows(n));
    this.markDirty(top, bottom);
  }

  blankRows(n) {
    const rows = [];
    for (let i = 0; i < n; i++) rows.push(new Row(this.cols, this.blank()));
    return rows;
  }

  pushScrollback(row) {
    if (this.scrollbackLimit === 0) return;
    this.scrollback.push(row);
    this.scrollbackPushed++;
    while (this.scrollback.length > this.scrollbackLimit) this.scrollback.shift();
  }

  clearScrollback() {
    this.scrollback = [];
    this.scrollbackEpoch++;
  }

  markDirty(top, bottom) {
    for (let y = top; y <= bottom; y++) this.buf.lines[y].dirty = true;
  }

  markAllDirty() {
    this.markDirty(0, this.rows - 1);
  }

  // Erased cells keep the current background colour, like xterm.
  blank() {
    const bg = this.pen.bg;
    if (bg === null) return DEFAULT_ATTR;
    if (this.blankAttr.bg !== bg) this.blankAttr = makeAttr({ bg });
    return this.blankAttr;
  }

  eraseDisplay(mode) {
    const lines = this.buf.lines;
    const b = this.blank();
    if (mode === 0) {
      lines[this.y].fill(this.x, this.cols, b);
      for (let y = this.y + 1; y < this.rows; y++) lines[y].fill(0, this.cols, b);
    } else if (mode === 1) {
      for (let y = 0; y < this.y; y++) lines[y].fill(0, this.cols, b);
      lines[this.y].fill(0, this.x + 1, b);
    } else if (mode === 2) {
      for (const row of lines) row.fill(0, this.cols, b);
    } else if (mode === 3) {
      this.clearScrollback();
    }
  }

  eraseLine(mode) {
    const row = this.buf.lines[this.y];
    if (mode === 0) row.fill(this.x, this.cols, this.blank());
    else if (mode === 1) row.fill(0, this.x + 1, this.blank());
    else if (mode === 2) row.fill(0, this.cols, this.blank());
  }

  insertLines(n) {
    if (this.y < this.top || this.y > this.bottom) return;
    this.scrollDown(n, this.y, this.bottom);
    this.x = 0;
    this.pendingWrap = false;
  }

  deleteLines(n) {
    if (this.y < this.top || this.y > this.bottom) return;
    this.scrollUp(n, this.y, this.bottom, false);
    this.x = 0;
    this.pendingWrap = false;
  }

  setRegion(top, bottom) {
    bottom = Math.min(bottom, this.rows);
    if (top >= bottom) return;
    this.top = top - 1;
    this.bottom = bottom - 1;
    this.moveTo(0, 0);
  }

  alignmentTest() {
    for (const row of this.buf.lines) {
      row.chars.fill("E");
      row.attrs.fill(DEFAULT_ATTR);
      row.dirty = true;
    }
    this.top = 0;
    this.bottom = this.rows - 1;
    this.moveTo(0, 0);
  }

  // ---- CSI dispatch ----

  dispatchCsi(final) {
    if (this.prefix === "?") {
      if (!this.inter && (final === "h" || final === "l")) {
        for (const p of this.params) this.setPrivateMode(p, final === "h");
      }
      return;
    }
    if (this.prefix) return;
    if (this.inter === "!" && final === "p") return this.softReset();
    if (this.inter) return;
    const n = this.arg(0, 1);
    switch (final) {
      case "A": this.moveY(-n); break;
      case "B": case "e": this.moveY(n); break;
      case "C": case "a": this.moveX(n); break;
      case "D": this.moveX(-n); break;
      case "E": this.moveY(n); this.x = 0; break;
      case "F": this.moveY(-n); this.x = 0; break;
      case "G": case "`": this.moveX(n - 1 - this.x); break;
      case "H": case "f": this.moveTo(this.arg(1, 1) - 1, n - 1); break;
      case "d": this.moveTo(this.x, n - 1); break;
      case "I": this.tabForward(n); break;
      case "Z": this.tabBackward(n); break;
      case "J": this.eraseDisplay(this.arg(0, 0)); break;
      case "K": this.eraseLine(this.arg(0, 0)); break;
      case "@": this.buf.lines[this.y].insert(this.x, n, this.blank()); this.pendingWrap = false; break;
      case "P": this.buf.lines[this.y].remove(this.x, n, this.blank()); this.pendingWrap = false; break;
      case "X": this.buf.lines[this.y].fill(this.x, Math.min(this.cols, this.x + n), this.blank()); break;
      case "L": this.insertLines(n); break;
      case "M": this.deleteLines(n); break;
      case "S": this.scrollUp(n, this.top, this.bottom, true); break;
      case "T": if (this.params.length <= 1) this.scrollDown(n, this.top, this.bottom); break;
      case "b": this.repeat(n); break;
      case "g": this.clearTabs(this.arg(0, 0)); break;
      case "m": this.sgr(); break;
      case "r": this.setRegion(n, this.arg(1, this.rows)); break;
      case "s": this.saveCursor(); break;
      case "u": this.restoreCursor(); break;
      case "h": case "l": if (this.params.includes(4)) this.insertMode = final === "h"; break;
      case "n": this.deviceStatus(this.arg(0, 0)); break;
      case "c": if (this.arg(0, 0) === 0) this.reply("\x1b[?1;2c"); break;
      default: break;
    }
  }

  deviceStatus(code) {
    if (code === 5) {
      this.reply("\x1b[0n");
    } else if (code === 6) {
      const row = this.y + 1 - (this.originMode ? this.top : 0);
      this.reply(`\x1b[${row};${this.x + 1}R`);
    }
  }

  clearTabs(mode) {
    if (mode === 0) this.tabs[this.x] = 0;
    else if (mode === 3) this.tabs.fill(0);
  }

  setPrivateMode(mode, on) {
    switch (mode) {
      case 1: this.appCursor = on; break;
      case 6: this.originMode = on; this.moveTo(0, 0); break;
      case 7: this.autowrap = on; if (!on) this.pendingWrap = false; break;
      case 25: this.cursorVisible = on; break;
      case 47: case 1047: case 1049: this.setAltScreen(on, mode); break;
      case 1048: if (on) this.saveCursor(); else this.restoreCursor(); break;
      case 2004: this.bracketedPaste = on; break;
      default: break;
    }
  }

  // ---- SGR ----

  sgr() {
    const p = this.params.length ? this.params.map((v) => Math.max(v, 0)) : [0];
    const a = Object.assign({}, this.pen);
    for (let i = 0; i < p.length; i++) {
      const v = p[i];
      if (v === 0) Object.assign(a, DEFAULT_ATTR);
      else if (v === 1) a.bold = true;
      else if (v === 2) a.dim = true;
      else if (v === 3) a.italic = true;
      else if (v === 4) a.underline = true;
      else if (v === 7) a.inverse = true;
      else if (v === 22) a.bold = a.dim = false;
      else if (v === 23) a.italic = false;
      else if (v === 24) a.underline = false;
      else if (v === 27) a.inverse = false;
      else if (v >= 30 && v <= 37) a.fg = v - 30;
      else if (v === 39) a.fg = null;
      else if (v >= 40 && v <= 47) a.bg = v - 40;
      else if (v === 49) a.bg = null;
      else if (v >= 90 && v <= 97) a.fg = v - 90 + 8;
      else if (v >= 100 && v <= 107) a.bg = v - 100 + 8;
      else if (v === 38 || v === 48) {
        const color = extendedColor(p, i + 1);
        if (!color) break; // malformed: the rest of the sequence is unreliable
        if (v === 38) a.fg = color.value;
        else a.bg = color.value;
        i += color.used;
      }
      // 5/25 (blink) and anything else: accepted, not rendered
    }
    this.pen = makeAttr(a);
  }

  // ---- cursor save/restore, screens, resets ----

  saveCursor() {
    this.buf.saved = {
      x: this.x, y: this.y, pen: this.pen, originMode: this.originMode,
      pendingWrap: this.pendingWrap, g0: this.g0, g1: this.g1, gl: this.gl,
    };
  }

  restoreCursor() {
    const s = this.buf.saved || {
      x: 0, y: 0, pen: DEFAULT_ATTR, originMode: false, pendingWrap: false, g0: "B", g1: "B", gl: 0,
    };
    this.x = Math.min(s.x, this.cols - 1);
    this.y = Math.min(s.y, this.rows - 1);
    this.pen = s.pen;
    this.originMode = s.originMode;
    this.pendingWrap = s.pendingWrap && this.autowrap;
    this.g0 = s.g0;
    this.g1 = s.g1;
    this.gl = s.gl;
  }

  // 47: switch only; 1047: the alternate screen starts cleared; 1049: also
  // save the cursor before entering and restore it after leaving.
  setAltScreen(on, mode) {
    if (on === this.altScreen) return;
    if (on) {
      if (mode === 1049) this.saveCursor();
      if (mode !== 47) this.alt = makeBuffer(this.cols, this.rows);
      this.buf = this.alt;
    } else {
      this.buf = this.normal;
      if (mode === 1049) this.restoreCursor();
    }
    this.pendingWrap = false;
    this.markAllDirty();
  }

  // DECSTR: modes and pen back to defaults; screen and cursor position kept.
  softReset() {
    this.cursorVisible = true;
    this.insertMode = false;
    this.originMode = false;
    this.autowrap = true;
    this.appCursor = false;
    this.appKeypad = false;
    this.top = 0;
    this.bottom = this.rows - 1;
    this.pen = DEFAULT_ATTR;
    this.blankAttr = DEFAULT_ATTR;
    this.g0 = "B";
    this.g1 = "B";
    this.gl = 0;
    this.pendingWrap = false;
    this.normal.saved = null;
    this.alt.saved = null;
  }

  // RIS (ESC c), also the initial state. The scrollback and title survive.
  fullReset() {
    this.normal = makeBuffer(this.cols, this.rows);
    this.alt = makeBuffer(this.cols, this.rows);
    this.buf = this.normal;
    this.softReset();
    this.x = 0;
    this.y = 0;
    this.bracketedPaste = false;
    this.tabs = null;
    this.resizeTabs(this.cols);
    this.lastChar = null;
    this.lastWidth = 1;
    this.state = GROUND;
    this.params = [];
    this.cur = -1;
    this.prefix = "";
    this.inter = "";
    this.invalid = false;
    this.oscBuf = "";
    this.strEsc = false;
    this.pendingHigh = "";
  }
}

// 38/48 colour arguments starting at p[i]: "5;n" or "2;r;g;b".
// Returns {value, used} or null when malformed.
function extendedColor(p, i) {
  if (p[i] === 5 && i + 1 < p.length) return { value: Math.min(p[i + 1], 255), used: 2 };
  if (p[i] === 2 && i + 3 < p.length) {
    const hex = p.slice(i + 1, i + 4).map((v) => Math.min(v, 255).toString(16).padStart(2, "0")).join("");
    return { value: "#" + hex, used: 4 };
  }
  return null;
}

// ---- view helpers (DOM only inside functions) ----

// xterm's 256-colour palette above the 16 themed colours.
function paletteHex(n) {
  let r, g, b;
  if (n >= 232) {
    r = g = b = 8 + 10 * (n - 232);
  } else {
    const level = (v) => (v === 0 ? 0 : 55 + 40 * v);
    const i = n - 16;
    r = level(Math.floor(i / 36));
    g = level(Math.floor(i / 6) % 6);
    b = level(i % 6);
  }
  return "#" + [r, g, b].map((v) => v.toString(16).padStart(2, "0")).join("");
}

function applyColor(span, classes, kind, color, swapped) {
  if (color === null) {
    if (swapped) classes.push(`term-${kind}-rev`);
    return;
  }
  if (typeof color === "number" && color < 16) {
    classes.push(`term-${kind}-${color}`);
    return;
  }
  const css = typeof color === "number" ? paletteHex(color) : color;
  if (kind === "fg") span.style.color = css;
  else span.style.backgroundColor = css;
}

function makeSpan(text, attr, isCursor) {
  const span = document.createElement("span");
  span.textContent = text;
  const inverse = attr.inverse !== isCursor;
  const classes = [];
  applyColor(span, classes, "fg", inverse ? attr.bg : attr.fg, inverse);
  applyColor(span, classes, "bg", inverse ? attr.fg : attr.bg, inverse);
  if (attr.bold) classes.push("term-bold");
  if (attr.dim) classes.push("term-dim");
  if (attr.italic) classes.push("term-italic");
  if (attr.underline) classes.push("term-underline");
  if (isCursor) classes.push("term-cursor");
  if (classes.length) span.className = classes.join(" ");
  return span;
}

// Rebuild one row element as runs of cells with the same attributes; the
// cursor cell (cursorX, -1 for none) is a run of its own.
function renderRow(rowEl, row, cursorX) {
  const { chars, attrs } = row;
  if (cursorX > 0 && chars[cursorX] === null) cursorX--;
  rowEl.textContent = "";
  let start = 0;
  while (start < chars.length) {
    let end = start + 1;
    let text = chars[start] ?? "";
    const isCursor = start === cursorX;
    if (isCursor) {
      if (chars[end] === null) end++;
    } else {
      while (end < chars.length && end !== cursorX && attrs[end] === attrs[start]) text += chars[end++] ?? "";
    }
    rowEl.appendChild(makeSpan(text, attrs[start], isCursor));
    start = end;
  }
}

function makeDiv(className) {
  const div = document.createElement("div");
  div.className = className;
  return div;
}

const CURSOR_KEYS = new Map([["ArrowUp", "A"], ["ArrowDown", "B"], ["ArrowRight", "C"], ["ArrowLeft", "D"],
  ["Home", "H"], ["End", "F"]]);
const SS3_KEYS = new Map([["F1", "P"], ["F2", "Q"], ["F3", "R"], ["F4", "S"]]);
const TILDE_KEYS = new Map([["Insert", 2], ["Delete", 3], ["PageUp", 5], ["PageDown", 6], ["F5", 15],
  ["F6", 17], ["F7", 18], ["F8", 19], ["F9", 20], ["F10", 21], ["F11", 23], ["F12", 24]]);
const CTRL_SYMBOLS = new Map([["[", "\x1b"], ["\\", "\x1c"], ["]", "\x1d"], ["^", "\x1e"], ["6", "\x1e"],
  ["_", "\x1f"], ["-", "\x1f"], ["/", "\x1f"], [" ", "\x00"], ["@", "\x00"], ["2", "\x00"], ["?", "\x7f"]]);

function ctrlCode(key) {
  const lower = key.toLowerCase();
  if (lower.length === 1 && lower >= "a" && lower <= "z") return String.fromCharCode(lower.charCodeAt(0) - 96);
  return CTRL_SYMBOLS.has(key) ? CTRL_SYMBOLS.get(key) : null;
}

// The bytes a keydown sends to the program, or null to leave the key to the browser.
function keyToData(e, appCursor) {
  if (e.metaKey || e.isComposing) return null;
  const key = e.key;
  const mod = 1 + (e.shiftKey ? 1 : 0) + (e.altKey ? 2 : 0) + (e.ctrlKey ? 4 : 0);
  if (CURSOR_KEYS.has(key)) {
    const c = CURSOR_KEYS.get(key);
    if (mod > 1) return `\x1b[1;${mod}${c}`;
    return (appCursor ? "\x1bO" : "\x1b[") + c;
  }
  if (SS3_KEYS.has(key)) return mod > 1 ? `\x1b[1;${mod}${SS3_KEYS.get(key)}` : "\x1bO" + SS3_KEYS.get(key);
  if (TILDE_KEYS.has(key)) return mod > 1 ? `\x1b[${TILDE_KEYS.get(key)};${mod}~` : `\x1b[${TILDE_KEYS.get(key)}~`;
  const alt = e.altKey ? "\x1b" : "";
  switch (key) {
    case "Enter": return alt + "\r";
    case "Backspace": return alt + (e.ctrlKey ? "\x08" : "\x7f");
    case "Tab": return e.shiftKey ? "\x1b[Z" : "\t";
    case "Escape": return "\x1b";
    default: break;
  }
  if (Array.from(key).length !== 1) return null; // Shift, Dead, Unidentified, ...
  if (e.getModifierState && e.getModifierState("AltGraph")) return key;
  if (e.ctrlKey) {
    if (e.shiftKey && /^[a-z]$/i.test(key)) return null; // Ctrl-Shift-C/V: the browser's copy and paste
    const code = ctrlCode(key);
    return code === null ? null : alt + code;
  }
  return alt + key;
}

function requestFrame(fn) {
  if (typeof requestAnimationFrame === "function") return { raf: requestAnimationFrame(fn) };
  return { timer: setTimeout(fn, 16) };
}

function cancelFrame(handle) {
  if (handle.raf !== undefined) cancelAnimationFrame(handle.raf);
  else clearTimeout(handle.timer);
}

class TermView {
  constructor(container, model, options = {}) {
    this.container = container;
    this.model = model;
    this.onData = options.onData || (() => {});
    this.onResize = options.onResize || null;
    this.frame = null;
    this.fullRedraw = true;
    this.cursorY = -1;
    this.cursorX = -1;
    this.scrollbackEpoch = -1;
    this.scrollbackPushed = 0;
    this.rowEls = [];
    this.build();
    this.handlers = {
      keydown: (e) => this.handleKey(e),
      paste: (e) => this.handlePaste(e),
    };
    for (const [type, fn] of Object.entries(this.handlers)) container.addEventListener(type, fn);
    model.onChange = () => this.schedule();
    model.onReply = (data) => this.onData(data);
    this.schedule();
  }

  build() {
    const c = this.container;
    c.textContent = "";
    c.classList.add("term");
    c.tabIndex = 0;
    this.scrollbackEl = makeDiv("term-scrollback");
    this.screenEl = makeDiv("term-screen");
    this.measureEl = makeDiv("term-measure");
    this.measureEl.textContent = "MMMMMMMMMM";
    this.measureEl.setAttribute("aria-hidden", "true");
    c.append(this.scrollbackEl, this.screenEl, this.measureEl);
  }

  focus() {
    this.container.focus();
  }

  schedule() {
    if (this.frame !== null) return;
    this.frame = requestFrame(() => {
      this.frame = null;
      this.render();
    });
  }

  render() {
    const m = this.model;
    this.syncRows();
    this.renderScrollback();
    const dirty = new Set(m.takeDirty());
    if (this.fullRedraw) this.rowEls.forEach((_, y) => dirty.add(y));
    this.fullRedraw = false;
    const cur = m.cursor;
    const cursorY = cur.visible ? cur.y : -1;
    if (cursorY !== this.cursorY || cur.x !== this.cursorX) {
      dirty.add(this.cursorY);
      dirty.add(cursorY);
    }
    this.cursorY = cursorY;
    this.cursorX = cur.x;
    for (const y of dirty) {
      if (y >= 0 && y < this.rowEls.length) renderRow(this.rowEls[y], m.rowAt(y), y === cursorY ? cur.x : -1);
    }
    this.container.scrollTop = this.container.scrollHeight;
  }

  syncRows() {
    while (this.rowEls.length < this.model.rows) {
      const row = makeDiv("term-row");
      this.screenEl.appendChild(row);
      this.rowEls.push(row);
      this.fullRedraw = true;
    }
    while (this.rowEls.length > this.model.rows) this.rowEls.pop().remove();
  }

  // Append the lines scrolled off since the last frame; drop the oldest.
  renderScrollback() {
    const m = this.model;
    const el = this.scrollbackEl;
    el.hidden = m.altScreen;
    const count = m.scrollback.length;
    let fresh = m.scrollbackPushed - this.scrollbackPushed;
    if (m.scrollbackEpoch !== this.scrollbackEpoch || fresh > count) {
      el.textContent = "";
      fresh = count;
      this.scrollbackEpoch = m.scrollbackEpoch;
    }
    for (let i = count - fresh; i < count; i++) {
      const row = makeDiv("term-row");
      renderRow(row, m.scrollbackRow(i), -1);
      el.appendChild(row);
    }
    while (el.childElementCount > count) el.firstChild.remove();
    this.scrollbackPushed = m.scrollbackPushed;
  }

  handleKey(e) {
    const data = keyToData(e, this.model.appCursor);
    if (data === null) return;
    e.preventDefault();
    this.onData(data);
    this.container.scrollTop = this.container.scrollHeight;
  }

  // Pasted text: ESC (and 8-bit CSI) removed so it cannot end a bracketed
  // paste or inject sequences; newlines sent as CR like the Enter key.
  handlePaste(e) {
    e.preventDefault();
    const text = e.clipboardData ? e.clipboardData.getData("text/plain") : "";
    if (!text) return;
    const clean = text.replace(/[\x1b\x9b]/g, "").replace(/\r?\n/g, "\r");
    this.onData(this.model.bracketedPaste ? "\x1b[200~" + clean + "\x1b[201~" : clean);
  }

  // Size the model to the container: cell size from the hidden measuring
  // element, space from the container's content box.
  fit() {
    const m = this.model;
    const box = this.measureEl.getBoundingClientRect();
    const cellW = box.width / 10;
    const cellH = box.height;
    if (!(cellW > 0 && cellH > 0)) return { cols: m.cols, rows: m.rows };
    const c = this.container;
    const style = getComputedStyle(c);
    const px = (v) => parseFloat(v) || 0;
    const width = c.clientWidth - px(style.paddingLeft) - px(style.paddingRight);
    const height = c.clientHeight - px(style.paddingTop) - px(style.paddingBottom);
    const cols = clampInt(width / cellW, 1, MAX_COLS, m.cols);
    const rows = clampInt(height / cellH, 1, MAX_ROWS, m.rows);
    if (cols !== m.cols || rows !== m.rows) {
      m.resize(cols, rows);
      if (this.onResize) this.onResize({ cols: m.cols, rows: m.rows });
    }
    return { cols: m.cols, rows: m.rows };
  }

  dispose() {
    for (const [type, fn] of Object.entries(this.handlers)) this.container.removeEventListener(type, fn);
    if (this.frame !== null) cancelFrame(this.frame);
    this.frame = null;
    this.model.onChange = null;
    this.model.onReply = null;
  }
}

if (typeof module !== "undefined") module.exports = { TermModel, TermView };
if (typeof window !== "undefined") window.StacyTerm = { TermModel, TermView };
})();
