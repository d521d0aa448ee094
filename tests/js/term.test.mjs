// Unit tests for the dashboard terminal emulator
// (crates/stacyvm-server/web/term.js). Run: node --test term.test.mjs

import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createRequire } from 'node:module'

const require = createRequire(import.meta.url)
const { TermModel } = require('../../crates/stacyvm-server/web/term.js')

const ESC = '\x1b'
const CSI = '\x1b['

function term(cols = 10, rows = 5, data = '', options = {}) {
  const t = new TermModel(cols, rows, options)
  t.write(data)
  return t
}

function at(t, x, y) {
  assert.deepEqual({ x: t.cursor.x, y: t.cursor.y }, { x, y })
}

function lines(t) {
  const out = []
  for (let y = 0; y < t.rows; y++) out.push(t.lineText(y))
  return out
}

test('text, and pending wrap at the last column', () => {
  const t = term(5, 3, 'abcde')
  assert.equal(t.lineText(0), 'abcde')
  at(t, 4, 0) // the cursor stays on the last column until the next character
  t.write('f')
  assert.deepEqual(lines(t), ['abcde', 'f', ''])
  at(t, 1, 1)
  // CR while the wrap is pending stays on the same line
  t.write('\r1234' + '5' + '\rX')
  assert.deepEqual(lines(t), ['abcde', 'X2345', ''])
  // without autowrap the last column is overwritten
  const u = term(5, 2, `${CSI}?7labcdefg`)
  assert.deepEqual(lines(u), ['abcdg', ''])
  at(u, 4, 0)
})

test('wrapping at the bottom scrolls the screen', () => {
  const t = term(3, 2, 'abcdefg')
  assert.deepEqual(lines(t), ['def', 'g'])
  assert.deepEqual(t.scrollbackLines(), ['abc'])
})

test('CR, LF, BS, HT', () => {
  const t = term(20, 4, 'abc\r\nxy\bz\tT')
  assert.deepEqual(lines(t), ['abc', 'xz      T', '', ''])
  at(t, 9, 1)
  t.write('\n')
  at(t, 9, 2) // LF keeps the column
  t.write('\b'.repeat(20))
  at(t, 0, 2) // BS stops at the left edge
  t.write('\t\t\t\t')
  at(t, 19, 2) // HT stops at the right edge
  // HTS / TBC
  const u = term(20, 2, `${CSI}3g\x1b[5G${ESC}H\r\tA`)
  assert.equal(u.lineText(0), '    A')
  u.write(`${CSI}4G${CSI}0g\r\tB`) // clearing a stop where there is none
  assert.equal(u.lineText(0), '    B')
  // CHT / CBT
  const v = term(40, 1, `${CSI}2IA${CSI}2ZB`)
  assert.equal(v.lineText(0), '        B       A')
})

test('CUP and relative moves are clamped', () => {
  const t = term(10, 5)
  t.write(`${CSI}3;4H`)
  at(t, 3, 2)
  t.write(`${CSI}H`)
  at(t, 0, 0)
  t.write(`${CSI}99;99H`)
  at(t, 9, 4)
  t.write(`${CSI}2A${CSI}3D`)
  at(t, 6, 2)
  t.write(`${CSI}100A${CSI}100D`)
  at(t, 0, 0)
  t.write(`${CSI}100B${CSI}100C`)
  at(t, 9, 4)
  t.write(`${CSI}2;5f`) // HVP
  at(t, 4, 1)
  t.write(`${CSI}2E`) // CNL
  at(t, 0, 3)
  t.write(`${CSI}7G${CSI}F`) // CHA, CPL
  at(t, 0, 2)
  t.write(`${CSI}5\`${CSI}4d`) // HPA, VPA
  at(t, 4, 3)
  t.write(`${CSI}2a${CSI}e`) // HPR, VPR
  at(t, 6, 4)
  t.write(`${CSI}0A`) // 0 means 1
  at(t, 6, 3)
  t.write(`${CSI};3H`) // an empty first parameter
  at(t, 2, 0)
})

test('ED and EL variants', () => {
  const fill = `${CSI}Haaaaa${CSI}2;1Hbbbbb${CSI}3;1Hccccc${CSI}2;3H`
  assert.deepEqual(lines(term(5, 3, fill + `${CSI}J`)), ['aaaaa', 'bb', ''])
  assert.deepEqual(lines(term(5, 3, fill + `${CSI}1J`)), ['', '   bb', 'ccccc'])
  assert.deepEqual(lines(term(5, 3, fill + `${CSI}2J`)), ['', '', ''])
  assert.deepEqual(lines(term(5, 3, fill + `${CSI}K`)), ['aaaaa', 'bb', 'ccccc'])
  assert.deepEqual(lines(term(5, 3, fill + `${CSI}1K`)), ['aaaaa', '   bb', 'ccccc'])
  assert.deepEqual(lines(term(5, 3, fill + `${CSI}2K`)), ['aaaaa', '', 'ccccc'])
  const t = term(5, 3, fill + `${CSI}2J`)
  at(t, 2, 1) // erasing does not move the cursor
  // ED 3 clears the scrollback only
  const u = term(5, 2, '1\n2\n3\n4')
  assert.equal(u.scrollbackLines().length, 2)
  u.write(`${CSI}3J`)
  assert.deepEqual(u.scrollbackLines(), [])
  assert.equal(u.screenText(), '  3\n   4') // LF keeps the column
})

test('erase uses the current background colour', () => {
  const t = term(4, 2, `${CSI}44m${CSI}2J`)
  assert.equal(t.cells(1)[3].bg, 4)
  assert.equal(t.cells(1)[3].ch, ' ')
})

test('ICH, DCH, ECH, IL, DL', () => {
  assert.equal(term(8, 1, `abcdef${CSI}1;3H${CSI}2@`).lineText(0), 'ab  cdef')
  assert.equal(term(6, 1, `abcdef${CSI}1;3H${CSI}2@`).lineText(0), 'ab  cd')
  assert.equal(term(8, 1, `abcdef${CSI}1;3H${CSI}2P`).lineText(0), 'abef')
  assert.equal(term(8, 1, `abcdef${CSI}1;3H${CSI}99P`).lineText(0), 'ab')
  assert.equal(term(8, 1, `abcdef${CSI}1;2H${CSI}3X`).lineText(0), 'a   ef')
  const rows = `1${CSI}2H2${CSI}3H3${CSI}4H4${CSI}2H`
  const il = term(3, 4, rows + `${CSI}L`)
  assert.deepEqual(lines(il), ['1', '', '2', '3'])
  at(il, 0, 1)
  assert.deepEqual(lines(term(3, 4, rows + `${CSI}2M`)), ['1', '4', '', ''])
  assert.deepEqual(lines(term(3, 4, rows + `${CSI}9L`)), ['1', '', '', ''])
  // insert mode (IRM)
  assert.equal(term(8, 1, `abc${CSI}1;2H${CSI}4hXY${CSI}4lZ`).lineText(0), 'aXYZc')
})

test('scroll region: LF at its bottom, RI at its top, lines outside untouched', () => {
  const setup = `${CSI}1HA${CSI}2HB${CSI}3HC${CSI}4HD${CSI}5HE${CSI}2;4r`
  const t = term(3, 5, setup)
  at(t, 0, 0) // DECSTBM homes the cursor
  t.write(`${CSI}4H\nx`)
  assert.deepEqual(lines(t), ['A', 'C', 'D', 'x', 'E'])
  assert.deepEqual(t.scrollbackLines(), []) // a partial region never feeds the scrollback
  t.write(`${CSI}2H${ESC}My`)
  assert.deepEqual(lines(t), ['A', 'y', 'C', 'D', 'E'])
  // IL/DL act inside the region only
  t.write(`${CSI}3H${CSI}M`)
  assert.deepEqual(lines(t), ['A', 'y', 'D', '', 'E'])
  t.write(`${CSI}5H${CSI}L`)
  assert.deepEqual(lines(t), ['A', 'y', 'D', '', 'E'])
  // SU / SD scroll the region
  t.write(`${CSI}S`)
  assert.deepEqual(lines(t), ['A', 'D', '', '', 'E'])
  t.write(`${CSI}2T`)
  assert.deepEqual(lines(t), ['A', '', '', 'D', 'E'])
  // outside the region LF moves down to the last line but does not scroll
  t.write(`${CSI}5H\n\nz`)
  assert.deepEqual(lines(t), ['A', '', '', 'D', 'z'])
  // origin mode: CUP is relative to the region and DSR reports it so
  const replies = []
  t.onReply = (r) => replies.push(r)
  t.write(`${CSI}?6h${CSI}1;2Hq${CSI}99;1H${CSI}6n`)
  assert.equal(t.lineText(1), ' q')
  at(t, 0, 3)
  assert.deepEqual(replies, [`${CSI}3;1R`])
})

test('SGR: attributes, 16/256/truecolour colours and reset in cells()', () => {
  const t = term(12, 1, `${CSI}1;3;4;7;31;42mA${CSI}22;23;24;27mB${CSI}2;91;103mC${CSI}0mD`
    + `${CSI}38;5;208;48;5;17mE${CSI}38;2;255;0;128;48;2;1;2;3mF${CSI}39;49mG${CSI}mH${CSI}31m${CSI}mI`)
  const c = t.cells(0)
  assert.deepEqual(c[0], { ch: 'A', fg: 1, bg: 2, bold: true, underline: true, inverse: true, italic: true, dim: false })
  assert.deepEqual(c[1], { ch: 'B', fg: 1, bg: 2, bold: false, underline: false, inverse: false, italic: false, dim: false })
  assert.deepEqual([c[2].fg, c[2].bg, c[2].dim], [9, 11, true])
  assert.deepEqual([c[3].fg, c[3].bg, c[3].dim], [null, null, false])
  assert.deepEqual([c[4].fg, c[4].bg], [208, 17])
  assert.deepEqual([c[5].fg, c[5].bg], ['#ff0080', '#010203'])
  assert.deepEqual([c[6].fg, c[6].bg], [null, null])
  assert.deepEqual([c[7].fg, c[8].fg], [null, null])
  // out-of-range and malformed values stay bounded
  const u = term(4, 1, `${CSI}38;5;999mA${CSI}38;2;999;1mB${CSI}38;2;300;300;300mC`)
  const d = u.cells(0)
  assert.equal(d[0].fg, 255)
  assert.equal(d[1].fg, 255) // the malformed 38;2 leaves the pen alone
  assert.equal(d[2].fg, '#ffffff')
})

test('alternate screen 1049 restores the normal screen and the cursor', () => {
  const t = term(10, 4, `hello\r\nworld${CSI}2;3H`)
  t.write(`${CSI}?1049h`)
  assert.equal(t.altScreen, true)
  assert.equal(t.screenText(), '')
  t.write(`${CSI}HALT${CSI}4;1Hbottom\n\n`) // scrolling the alternate screen feeds no scrollback
  assert.deepEqual(t.scrollbackLines(), [])
  t.write(`${CSI}?1049l`)
  assert.equal(t.altScreen, false)
  assert.equal(t.screenText(), 'hello\nworld')
  at(t, 2, 1)
  // a second visit starts from a clear alternate screen
  t.write(`${CSI}?1049h`)
  assert.equal(t.screenText(), '')
  t.write(`${CSI}?1049l`)
  // 47 keeps the alternate screen content between visits
  t.write(`${CSI}?47hkeep${CSI}?47l${CSI}?47h`)
  assert.equal(t.lineText(1), '  keep')
  t.write(`${CSI}?47l`)
  assert.equal(t.screenText(), 'hello\nworld')
})

test('DEC special graphics line drawing, G0 and G1', () => {
  const t = term(10, 2, `${ESC}(0qx${ESC}(Bqx`)
  assert.equal(t.lineText(0), '─│qx')
  t.write(`\r\n${ESC})0a\x0elqk\x0fa`)
  assert.equal(t.lineText(1), 'a┌─┐a')
})

test('DSR, DA replies', () => {
  const replies = []
  const t = term(10, 5)
  t.onReply = (r) => replies.push(r)
  t.write(`${CSI}3;7H${CSI}6n${CSI}5n${CSI}c${CSI}0c${CSI}>c${CSI}?6n`)
  assert.deepEqual(replies, [`${CSI}3;7R`, `${CSI}0n`, `${CSI}?1;2c`, `${CSI}?1;2c`])
})

test('modes: cursor visibility, application cursor, bracketed paste, several at once', () => {
  const t = term(10, 2, `${CSI}?25l${CSI}?1;2004h`)
  assert.equal(t.cursor.visible, false)
  assert.equal(t.appCursor, true)
  assert.equal(t.bracketedPaste, true)
  t.write(`${CSI}?1;2004;25;9999l`)
  assert.deepEqual([t.appCursor, t.bracketedPaste, t.cursor.visible], [false, false, false])
  t.write(`${CSI}?25h${ESC}=`)
  assert.equal(t.cursor.visible, true)
  assert.equal(t.appKeypad, true)
  // DECSTR resets modes and the pen but keeps the screen and cursor
  t.write(`${CSI}?1h${CSI}31mab${CSI}!p`)
  assert.equal(t.appCursor, false)
  assert.equal(t.lineText(0), 'ab')
  at(t, 2, 0)
  t.write('c')
  assert.equal(t.cells(0)[2].fg, null)
})

test('save and restore the cursor (ESC 7/8, CSI s/u) with its pen', () => {
  const t = term(10, 3, `${CSI}2;3H${CSI}32m${ESC}7${CSI}H${CSI}0mX${ESC}8Y`)
  assert.deepEqual(lines(t), ['X', '  Y', ''])
  assert.equal(t.cells(1)[2].fg, 2)
  t.write(`${CSI}3;5H${CSI}s${CSI}H${CSI}uZ`)
  assert.equal(t.lineText(2), '    Z')
})

test('REP repeats the last character', () => {
  assert.equal(term(10, 1, `-${CSI}4b`).lineText(0), '-----')
  // a huge count is clamped to one screenful
  const t = term(3, 2, `x${CSI}99999b`)
  assert.deepEqual(lines(t), ['xxx', 'x'])
  assert.deepEqual(t.scrollbackLines(), ['xxx'])
})

test('ESC c resets; ESC D, E, M; ESC # 8 fills with E', () => {
  const t = term(4, 3, `${CSI}31mab${CSI}?25l${ESC}c`)
  assert.equal(t.screenText(), '')
  assert.equal(t.cursor.visible, true)
  at(t, 0, 0)
  t.write(`a${ESC}Db${ESC}Ec${ESC}M${ESC}Md`)
  assert.deepEqual(lines(t), ['ad', ' b', 'c'])
  t.write(`${ESC}#8`)
  assert.deepEqual(lines(t), ['EEEE', 'EEEE', 'EEEE'])
  at(t, 0, 0)
})

test('OSC title with BEL or ST; other OSC and DCS/APC swallowed', () => {
  const t = term(20, 2)
  t.write(`${ESC}]0;first\x07a`)
  assert.equal(t.title, 'first')
  t.write(`${ESC}]2;sec\x01ond${ESC}\\b`)
  assert.equal(t.title, 'second')
  t.write(`${ESC}]8;;http://x/${ESC}\\c${ESC}]52;c;Zm9v\x07d`)
  t.write(`${ESC}Pq#0;2;0;0;0${ESC}\\e${ESC}_apc\x07still${ESC}\\f${ESC}^pm${ESC}\\g${ESC}Xsos${ESC}\\h`)
  assert.equal(t.lineText(0), 'abcdefgh')
  assert.equal(t.title, 'second')
  t.write(`${ESC}]2;cut\x18i`) // CAN aborts the string
  assert.equal(t.title, 'second')
  assert.equal(t.lineText(0), 'abcdefghi')
})

test('unknown sequences are ignored safely', () => {
  const t = term(20, 2, `a${CSI}>4;1mb${CSI} qc${CSI}?1000;1006hd${CSI}=5ue${CSI}1$pf${ESC}%Gg${ESC}(Kh${CSI}1;2;3xi`)
  assert.equal(t.lineText(0), 'abcdefghi')
  at(t, 9, 0)
  // controls inside a CSI are executed; ESC inside a CSI starts over
  const u = term(20, 2, `ab${CSI}1\b\bDX${CSI}2${CSI}CY`)
  assert.equal(u.lineText(0), 'XbY')
})

const SESSION = [
  `${ESC}P1$r0m${ESC}\\user@box:~$ ls --color\r\n`,
  `${CSI}0m${CSI}01;34mdir${CSI}0m  file.txt  ${CSI}01;32mrun.sh${CSI}0m\r\n`,
  `${ESC}]0;user@box: ~\x07user@box:~$ echo 日本語 é😀\r\n日本語 é😀\r\n`,
  `${CSI}?1049h${CSI}1;24r${CSI}H${CSI}2J${CSI}7m top ${CSI}27m${CSI}3;5H${ESC}(0lqqk${ESC}(B`,
  `${CSI}5;5H${CSI}38;2;10;20;30mtruecolour${CSI}m${CSI}2;1H${CSI}2L${CSI}1P${CSI}K`,
  `${CSI}?1049l${CSI}?2004hprompt$ \b\b${CSI}K$ ${CSI}6n`,
].join('')

function snapshot(t) {
  const cells = []
  for (let y = 0; y < t.rows; y++) cells.push(t.cells(y))
  return { text: t.screenText(), cursor: t.cursor, cells, title: t.title, back: t.scrollbackLines(), alt: t.altScreen }
}

test('a stream written whole or one character (or UTF-16 unit) per write gives the same screen', () => {
  const whole = term(30, 4, SESSION)
  const byUnit = term(30, 4)
  for (let i = 0; i < SESSION.length; i++) byUnit.write(SESSION[i])
  const byChar = term(30, 4)
  for (const ch of SESSION) byChar.write(ch)
  assert.deepEqual(snapshot(byUnit), snapshot(whole))
  assert.deepEqual(snapshot(byChar), snapshot(whole))
  assert.equal(whole.title, 'user@box: ~')
  assert.ok(whole.screenText().includes('日本語 é😀'))
  assert.ok(whole.scrollbackLines().length > 0)
})

test('wide characters take two cells; combining marks join the previous cell', () => {
  const t = term(6, 3, '日a本')
  const c = t.cells(0)
  assert.deepEqual(c.slice(0, 5).map((x) => x.ch), ['日', '', 'a', '本', ''])
  at(t, 5, 0)
  // a wide character that does not fit at the last column wraps whole
  t.write('b😀')
  assert.deepEqual(lines(t), ['日a本b', '😀', ''])
  assert.deepEqual(t.cells(1).slice(0, 2).map((x) => x.ch), ['😀', ''])
  // overwriting half of a wide character blanks the other half
  t.write(`${CSI}1;2Hx${CSI}1;4Hy`)
  assert.equal(t.lineText(0), ' xay b')
  // combining marks, including after a wide character
  t.write(`${CSI}3He\u0301${CSI}3;4H語\u0300`)
  assert.deepEqual(t.cells(2).slice(0, 5).map((x) => x.ch), ['e\u0301', ' ', ' ', '語\u0300', ''])
  // a surrogate pair split across writes
  const u = term(4, 1)
  u.write('\ud83d')
  u.write('\ude00!')
  assert.equal(u.lineText(0), '😀!')
  // a lone surrogate becomes U+FFFD
  assert.equal(term(4, 1, '\udc00x').lineText(0), '\ufffdx')
  // DCH through the middle of a wide character
  assert.equal(term(6, 1, `a日b${CSI}1;3H${CSI}P`).lineText(0), 'a b')
})

test('hostile input: huge params, 100k params, long OSC', () => {
  const t = term(10, 5)
  t.write(`${CSI}99999999999A${CSI}99999999999B${CSI}99999999999C`)
  at(t, 9, 4)
  t.write(`${CSI}99999999999;99999999999H${CSI}99999999999L${CSI}99999999999@${CSI}99999999999S`)
  at(t, 0, 4) // IL homes the column
  t.write(`${CSI}${'1;'.repeat(100000)}31mA`)
  assert.equal(t.cells(4)[0].ch, 'A')
  assert.equal(t.cells(4)[0].bold, true)
  assert.equal(t.params.length <= 32, true)
  // an unterminated 1 MB OSC, then ST: the title is capped, later text appears
  const u = term(20, 2)
  u.write(`${ESC}]0;`)
  const chunk = 'x'.repeat(1 << 16)
  for (let i = 0; i < 16; i++) u.write(chunk)
  u.write(`${ESC}\\after`)
  assert.equal(u.lineText(0), 'after')
  assert.ok(u.title.length <= 4096 && u.title.startsWith('xxx'))
  assert.ok(u.oscBuf.length <= 4096)
  // a 1 MB DCS is swallowed too
  const v = term(20, 2, `${ESC}P${'y'.repeat(1 << 20)}${ESC}\\ok`)
  assert.equal(v.lineText(0), 'ok')
  // the title is stripped of control characters
  assert.equal(term(5, 1, `${ESC}]2;a\x7fb\u009bc\x07`).title, 'abc')
})

function prng(seed) {
  let s = seed >>> 0
  return () => {
    s = (s + 0x6d2b79f5) >>> 0
    let r = Math.imul(s ^ (s >>> 15), 1 | s)
    r = (r + Math.imul(r ^ (r >>> 7), 61 | r)) ^ r
    return ((r ^ (r >>> 14)) >>> 0) / 4294967296
  }
}

const FUZZ_ATOMS = [
  ESC, CSI, `${ESC}]`, `${ESC}P`, `${ESC}\\`, '\x07', '\x18', '\r', '\n', '\b', '\t', '\x0e', '\x0f', ';', ':', '?', '>', '!', ' ',
  '$', '0', '1', '5', '9', '99999999', '1049', '25', '2004', '38;5;', '48;2;', 'A', 'B', 'H', 'J', 'K', 'L', 'M', 'P', '@',
  'X', 'S', 'T', 'b', 'c', 'h', 'l', 'm', 'n', 'r', 's', 'u', 'g', '(', ')', '#', '8', '7', 'D', 'E', '=', 'q', 'x',
  '日', '😀', '\ud83d', '\ude00', '\u0301', 'é', 'hello ', '\x7f', '\u009b',
]

test('fuzz: thousands of random writes never throw and keep the cursor in bounds', () => {
  const rand = prng(20240601)
  const pick = (n) => Math.floor(rand() * n)
  for (let round = 0; round < 20; round++) {
    const t = term(1 + pick(40), 1 + pick(12), '', { scrollback: 50 })
    t.onReply = () => {}
    for (let i = 0; i < 300; i++) {
      let s = ''
      const n = 1 + pick(12)
      for (let j = 0; j < n; j++) s += FUZZ_ATOMS[pick(FUZZ_ATOMS.length)]
      t.write(s)
      if (rand() < 0.01) t.resize(1 + pick(40), 1 + pick(12))
      const { x, y } = t.cursor
      assert.ok(x >= 0 && x < t.cols && y >= 0 && y < t.rows, `cursor ${x},${y} in ${t.cols}x${t.rows}`)
      assert.ok(t.top >= 0 && t.top < t.bottom + 1 && t.bottom < t.rows)
    }
    for (let y = 0; y < t.rows; y++) assert.equal(t.cells(y).length, t.cols)
    assert.ok(t.scrollbackLines().length <= 50)
    assert.equal(typeof t.screenText(), 'string')
  }
})

test('resize smaller and larger keeps content and the cursor in bounds', () => {
  const t = term(10, 5, 'l1\r\nl2\r\nl3\r\nl4\r\nlong line' + `${CSI}2;3r${CSI}5;10H`)
  assert.deepEqual(lines(t), ['l1', 'l2', 'l3', 'l4', 'long line'])
  t.resize(4, 3)
  // rows leave from the top (into the scrollback) to keep the cursor line
  assert.deepEqual(lines(t), ['l3', 'l4', 'long'])
  assert.deepEqual(t.scrollbackLines(), ['l1', 'l2'])
  at(t, 3, 2)
  assert.deepEqual([t.top, t.bottom], [0, 2]) // the region resets
  t.resize(8, 5)
  assert.deepEqual(lines(t), ['l3', 'l4', 'long', '', ''])
  at(t, 3, 2)
  t.write('\r\nnew')
  assert.equal(t.lineText(3), 'new')
  // rows below the cursor go first
  const u = term(5, 4, 'top')
  u.resize(5, 2)
  assert.deepEqual(lines(u), ['top', ''])
  assert.deepEqual(u.scrollbackLines(), [])
  // clamped sizes, and junk ignored
  u.resize(0, 9999)
  assert.deepEqual([u.cols, u.rows], [1, 200])
  u.resize(99999, 0)
  assert.deepEqual([u.cols, u.rows], [500, 1])
  u.resize(NaN, 'x')
  assert.deepEqual([u.cols, u.rows], [500, 1])
  // a wide character cut by the new width disappears whole
  const v = term(4, 1, 'ab日')
  v.resize(3, 1)
  assert.equal(v.lineText(0), 'ab')
  // resizing in the alternate screen keeps the saved normal screen
  const w = term(6, 3, `one\r\ntwo${CSI}?1049hALT`)
  w.resize(6, 2)
  w.write(`${CSI}?1049l`)
  assert.equal(w.altScreen, false)
  assert.ok(w.cursor.y < 2)
  assert.ok(w.screenText().includes('two'))
})

test('scrollback is bounded and only fed by the full normal screen', () => {
  const t = term(8, 3, '', { scrollback: 5 })
  for (let i = 0; i < 100; i++) t.write(`line ${i}\r\n`)
  assert.deepEqual(t.scrollbackLines(), ['line 93', 'line 94', 'line 95', 'line 96', 'line 97'])
  assert.deepEqual(lines(t), ['line 98', 'line 99', ''])
  assert.equal(t.scrollbackPushed, 98)
  assert.deepEqual(term(8, 2, 'a\r\nb\r\nc', { scrollback: 0 }).scrollbackLines(), [])
  // DL at the top line does not feed the scrollback
  assert.deepEqual(term(8, 2, `a${CSI}H${CSI}M`).scrollbackLines(), [])
})

test('a full-screen program: alt screen, region, line-drawing box, moves, leave', () => {
  const t = term(12, 6, 'shell$ ls\r\nfile\r\nshell$ ')
  const normal = t.screenText()
  const saved = t.cursor
  const draw = [
    `${CSI}?1049h${CSI}?25l${CSI}H${CSI}2J`,
    `${CSI}7m title      ${CSI}m`, // row 1: an inverse status line
    `${CSI}2;5r`, // scroll region: rows 2..5
    `${ESC}(0`,
    `${CSI}2;1Hlqqqqk`, `${CSI}3;1Hx${CSI}3;6Hx`, `${CSI}4;1Hmqqqqj`,
    `${ESC}(B`,
    `${CSI}3;2Hhi`,
    `${CSI}6;1Hstatus`, // row 6: outside the region
    `${CSI}5;1H\n`, // LF at the region bottom scrolls rows 2..5 only
  ].join('')
  t.write(draw)
  assert.equal(t.altScreen, true)
  assert.equal(t.cursor.visible, false)
  assert.deepEqual(lines(t), [' title', '│hi  │', '└────┘', '', '', 'status'])
  assert.equal(t.cells(0)[1].inverse, true)
  at(t, 0, 4)
  // RI at the region top scrolls back down
  t.write(`${CSI}2H${ESC}M${ESC}(0lqqqqk${ESC}(B`)
  assert.deepEqual(lines(t), [' title', '┌────┐', '│hi  │', '└────┘', '', 'status'])
  t.write(`${CSI}r${CSI}?25h${CSI}?1049l`)
  assert.equal(t.altScreen, false)
  assert.equal(t.screenText(), normal)
  assert.deepEqual(t.cursor, saved)
  t.write('pwd')
  assert.equal(t.lineText(2), 'shell$ pwd')
})

test('version and dirty rows let a renderer redraw only what changed', () => {
  const t = term(5, 4)
  t.takeDirty()
  const v = t.version
  t.write(`${CSI}3Hx`)
  assert.ok(t.version > v)
  assert.deepEqual(t.takeDirty(), [2])
  assert.deepEqual(t.takeDirty(), [])
  t.write(`${CSI}2;3r${CSI}3H\n`)
  assert.deepEqual(t.takeDirty(), [1, 2])
  t.write(`${CSI}?1049h`)
  assert.deepEqual(t.takeDirty(), [0, 1, 2, 3])
  let changes = 0
  t.onChange = () => changes++
  t.write('a')
  t.resize(6, 4)
  assert.equal(changes, 2)
})

// A minimal DOM, enough for TermView (createElement, textContent, classes, events).
class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase()
    this.children = []
    this.parent = null
    this.className = ''
    this.style = {}
    this.attributes = {}
    this.listeners = {}
    this.text = ''
    this.hidden = false
    this.scrollTop = 0
    this.clientWidth = 0
    this.clientHeight = 0
    this.classList = { add: (c) => { this.className = `${this.className} ${c}`.trim() } }
  }
  get textContent() { return this.text + this.children.map((c) => c.textContent).join('') }
  set textContent(v) { this.children.forEach((c) => { c.parent = null }); this.children = []; this.text = String(v) }
  get firstChild() { return this.children[0] ?? null }
  get childElementCount() { return this.children.length }
  get scrollHeight() { return 1000 }
  appendChild(c) { c.parent = this; this.children.push(c); return c }
  append(...cs) { cs.forEach((c) => this.appendChild(c)) }
  remove() { if (this.parent) this.parent.children.splice(this.parent.children.indexOf(this), 1); this.parent = null }
  setAttribute(k, v) { this.attributes[k] = String(v) }
  addEventListener(type, fn) { (this.listeners[type] ??= []).push(fn) }
  removeEventListener(type, fn) { this.listeners[type] = (this.listeners[type] ?? []).filter((f) => f !== fn) }
  dispatch(type, event) { (this.listeners[type] ?? []).forEach((fn) => fn(event)) }
  getBoundingClientRect() { return { width: 80, height: 16 } } // 8 x 16 px cells for the "MMMMMMMMMM" probe
  focus() {}
}

function withFakeDom(fn) {
  const saved = { document: globalThis.document, raf: globalThis.requestAnimationFrame, gcs: globalThis.getComputedStyle }
  const frames = []
  globalThis.document = { createElement: (tag) => new FakeElement(tag) }
  globalThis.requestAnimationFrame = (f) => frames.push(f)
  globalThis.cancelAnimationFrame = () => {}
  globalThis.getComputedStyle = () => ({ paddingLeft: '4px', paddingRight: '4px', paddingTop: '0', paddingBottom: '0' })
  const flush = () => { while (frames.length) frames.shift()() }
  try {
    fn(flush)
  } finally {
    globalThis.document = saved.document
    globalThis.requestAnimationFrame = saved.raf
    globalThis.getComputedStyle = saved.gcs
    delete globalThis.cancelAnimationFrame
  }
}

function key(k, mods = {}) {
  let prevented = false
  return { key: k, ctrlKey: false, altKey: false, shiftKey: false, metaKey: false, ...mods, preventDefault: () => { prevented = true }, get prevented() { return prevented } }
}

test('TermView renders rows as attribute runs, the cursor, scrollback, and sends input', () => {
  const { TermView } = require('../../crates/stacyvm-server/web/term.js')
  withFakeDom((flush) => {
    const container = new FakeElement('pre')
    container.textContent = 'old content'
    const model = new TermModel(8, 2, { scrollback: 10 })
    const sent = []
    const resizes = []
    const view = new TermView(container, model, { onData: (d) => sent.push(d), onResize: (s) => resizes.push(s) })
    assert.equal(container.className, 'term')
    assert.equal(container.tabIndex, 0)
    model.write(`${CSI}1;31mab${CSI}0m${CSI}38;5;200mc${CSI}m<b>&`)
    flush()
    const [back, screen] = container.children
    const row0 = screen.children[0]
    assert.equal(row0.textContent, 'abc<b>& ') // text, never markup
    assert.deepEqual(row0.children.map((s) => s.className), ['term-fg-1 term-bold', '', '', 'term-fg-rev term-bg-rev term-cursor'])
    assert.equal(row0.children[1].style.color, '#ff00d7')
    assert.equal(row0.children[3].textContent, ' ') // the cursor cell
    assert.equal(screen.children[1].textContent, '        ')
    // scrollback rows appear above the screen, and hide in the alternate screen
    model.write('\r\n1\r\n2\r\n3')
    flush()
    assert.deepEqual(back.children.map((r) => r.textContent.trimEnd()), ['abc<b>&', '1'])
    model.write(`${CSI}?1049h`)
    flush()
    assert.equal(back.hidden, true)
    model.write(`${CSI}?1049l`)
    // keys
    const cases = [
      [key('a'), 'a'], [key('Enter'), '\r'], [key('Backspace'), '\x7f'], [key('Tab', { shiftKey: true }), '\x1b[Z'],
      [key('ArrowUp'), '\x1b[A'], [key('c', { ctrlKey: true }), '\x03'], [key(' ', { ctrlKey: true }), '\x00'],
      [key(']', { ctrlKey: true }), '\x1d'], [key('x', { altKey: true }), '\x1bx'], [key('F1'), '\x1bOP'],
      [key('F12'), '\x1b[24~'], [key('PageDown'), '\x1b[6~'], [key('Delete'), '\x1b[3~'],
      [key('ArrowLeft', { ctrlKey: true }), '\x1b[1;5D'],
    ]
    for (const [event, want] of cases) {
      sent.length = 0
      container.dispatch('keydown', event)
      assert.deepEqual(sent, [want], `key ${JSON.stringify(event.key)}`)
      assert.equal(event.prevented, true)
    }
    model.write(`${CSI}?1h`)
    sent.length = 0
    container.dispatch('keydown', key('ArrowUp'))
    container.dispatch('keydown', key('v', { metaKey: true }))
    container.dispatch('keydown', key('Shift', { shiftKey: true }))
    assert.deepEqual(sent, ['\x1bOA'])
    // paste, bracketed, with ESC removed
    model.write(`${CSI}?2004h`)
    sent.length = 0
    const paste = { clipboardData: { getData: () => 'ls\x1b[201~\nrm' }, preventDefault() {} }
    container.dispatch('paste', paste)
    assert.deepEqual(sent, ['\x1b[200~ls[201~\rrm\x1b[201~'])
    // DSR replies go to onData
    sent.length = 0
    model.write(`${CSI}6n`)
    assert.deepEqual(sent, [`${CSI}2;2R`])
    // fit: (8 + 80 - 8) / 8 = 10 columns, 48 / 16 = 3 rows
    container.clientWidth = 88
    container.clientHeight = 48
    assert.deepEqual(view.fit(), { cols: 10, rows: 3 })
    assert.deepEqual(resizes, [{ cols: 10, rows: 3 }])
    assert.deepEqual(view.fit(), { cols: 10, rows: 3 })
    assert.equal(resizes.length, 1)
    flush()
    assert.equal(screen.children.length, 3)
    // dispose detaches listeners and the model
    view.dispose()
    sent.length = 0
    container.dispatch('keydown', key('a'))
    model.write(`${CSI}5n`)
    assert.deepEqual(sent, [])
  })
})
