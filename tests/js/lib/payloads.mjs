// Payloads that exercise JSON and UTF-8 handling end to end (no lone surrogates: they are not UTF-8).

export const UNICODE_PAYLOAD = {
  text: 'héllo wörld — ñ ç ß ø å',
  cjk: '你好，世界 こんにちは 안녕하세요',
  rtl: 'مرحبا بالعالم שלום',
  emoji: '🚀🔥👩🏽‍💻🏳️‍🌈 family: 👨‍👩‍👧‍👦',
  astral: '𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈',
  combining: 'é (e + U+0301), Å (A + U+030A)',
  escapes: 'quote " backslash \\ slash / newline \n tab \t cr \r nul \u0000 bell \u0007',
  unicodeEscapes: '\u2028\u2029\ufeff\uffff',
  html: '<script>alert("x")</script>&amp;',
  'key with spaces & ünïcödé 🔑': 'value',
  '': 'empty key',
  numbers: [0, -1, 1.5, -0.25, 1e21, 2 ** 53 - 1, -(2 ** 53 - 1), 123456789.123],
  booleans: [true, false],
  nothing: null,
  empty: { obj: {}, arr: [], str: '' },
  nested: { a: { b: { c: { d: { e: { f: { g: { h: { i: { j: ['deep', { k: 'é' }] } } } } } } } } } },
  mixed: [1, 'two', { three: [3, { four: 4 }] }, [[[]]], null, false],
}
