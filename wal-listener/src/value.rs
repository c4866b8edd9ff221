//! Postgres text output → JSON, as Supabase Realtime puts it in `record` / `old_record`.
//!
//! The reference server casts each value back to its column type and calls `to_jsonb`
//! (protocol.md §7.6), so the rules here are `to_jsonb`'s, applied to the text form pgoutput sends:
//!
//! | base type (domains resolved)                    | JSON                                              |
//! | ----------------------------------------------- | ------------------------------------------------- |
//! | `int2` `int4` `int8` `float4` `float8` `numeric` | number with Postgres' own digits, spelled as jsonb's `numeric` does (`1e+100` → `1000…0`, `-0` → `0`); `NaN`, `Infinity`, `-Infinity` as strings |
//! | `bool`                                          | `true` / `false`                                  |
//! | `json` `jsonb`                                  | the JSON value itself, text passed through        |
//! | `date` `timestamp` `timestamptz`                | ISO 8601 with `T`; timestamptz offset as `+HH:MM` |
//! | `bytea` (top level only)                        | hex digits without `\x` (what Realtime ≥ 2.76.6 sends) |
//! | arrays                                          | nested JSON arrays; NULL elements → `null`        |
//! | `int2vector` `oidvector`                        | JSON arrays (their text has no braces)            |
//! | everything else (text, uuid, enums, `oid`, time, timetz, interval, ranges, …) | its text as a string |
//!
//! `oid` is a string: that is what `to_jsonb` returns (protocol.md's table lists it with the integers;
//! the golden test against the database decides). The golden test (`tests/tests/wal_values.rs`) checks
//! every row of this table against the test database's own `to_jsonb`.
//!
//! Values are written as JSON *text* into a caller's buffer rather than built as `serde_json::Value`:
//! `numeric` keeps every digit without turning on serde_json's workspace-wide `arbitrary_precision`
//! feature (which would change number handling for every other crate), and the gateway can write a
//! record straight into the frame it sends. [`to_raw_value`] wraps the same text as a
//! [`serde_json::value::RawValue`] for code that composes payloads with serde.
//!
//! The output assumes the session settings the listener asks for at startup: `DateStyle=ISO`,
//! `TimeZone=UTC`, `bytea_output=hex`, `IntervalStyle=postgres`, `extra_float_digits=1`.
//!
//! Not reproduced: composite (row) types, which `to_jsonb` turns into objects, arrive here as their
//! text; types with a cast to json are likewise sent as text.

use serde_json::value::RawValue;

/// How a column's text is turned into JSON. Derived from the catalog (`pg_type`) with domains resolved
/// to their base type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueKind {
    /// Integers, floats, numeric.
    Number,
    Bool,
    /// `json` and `jsonb`.
    Json,
    Date,
    Timestamp,
    TimestampTz,
    /// `bytea`: written as hex without `\x` at the top level.
    Bytea,
    /// An array whose elements are of `element` kind, separated by `delimiter` (`,` except `box`).
    Array {
        element: Box<ValueKind>,
        delimiter: u8,
    },
    /// Everything else: the text as a JSON string.
    Text,
}

impl ValueKind {
    /// The kind for a builtin scalar type OID, after domain resolution. Unknown OIDs are `Text`.
    pub fn for_scalar_oid(oid: u32) -> ValueKind {
        match oid {
            20 | 21 | 23 | 700 | 701 | 1700 => ValueKind::Number,
            16 => ValueKind::Bool,
            114 | 3802 => ValueKind::Json,
            1082 => ValueKind::Date,
            1114 => ValueKind::Timestamp,
            1184 => ValueKind::TimestampTz,
            17 => ValueKind::Bytea,
            _ => ValueKind::Text,
        }
    }
}

/// Appends the JSON for one non-NULL value in Postgres text form.
pub fn write_json(out: &mut Vec<u8>, kind: &ValueKind, text: &str) {
    match kind {
        ValueKind::Number => {
            if is_json_number(text) {
                write_number(out, text);
            } else {
                write_string(out, text);
            }
        }
        ValueKind::Bool => match text {
            "t" | "true" => out.extend_from_slice(b"true"),
            "f" | "false" => out.extend_from_slice(b"false"),
            other => write_string(out, other),
        },
        ValueKind::Json => {
            let trimmed = text.trim();
            if serde_json::from_str::<&RawValue>(trimmed).is_ok() {
                out.extend_from_slice(trimmed.as_bytes());
            } else {
                write_string(out, text);
            }
        }
        ValueKind::Date | ValueKind::Text => write_string(out, text),
        ValueKind::Timestamp => write_string(out, &xsd_datetime(text, false)),
        ValueKind::TimestampTz => write_string(out, &xsd_datetime(text, true)),
        ValueKind::Bytea => write_string(out, text.strip_prefix("\\x").unwrap_or(text)),
        ValueKind::Array { element, delimiter } => {
            let start = out.len();
            let parsed = if text.starts_with(['{', '[']) {
                write_array(out, element, *delimiter, text)
            } else {
                write_vector(out, element, text)
            };
            if parsed.is_err() {
                out.truncate(start);
                write_string(out, text);
            }
        }
    }
}

/// The JSON for one non-NULL value as a [`RawValue`].
pub fn to_raw_value(kind: &ValueKind, text: &str) -> Box<RawValue> {
    let mut out = Vec::with_capacity(text.len() + 2);
    write_json(&mut out, kind, text);
    // write_json only emits valid UTF-8 JSON; the `null` fallback keeps this function total.
    String::from_utf8(out)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok())
        .unwrap_or_default()
}

/// Appends `s` as a JSON string (same escapes as Postgres' `escape_json`).
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0C => b"\\f",
            0..=0x1F => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xF)]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Writes a valid JSON number the way jsonb stores it: as `numeric`. Postgres' float output may use an
/// exponent (`1e+100`) or negative zero; `numeric` has neither, so `to_jsonb` spells such numbers out
/// in plain decimal with the scale `numeric_in` gives them (`5e-3` → `0.005`, `-0` → `0`).
fn write_number(out: &mut Vec<u8>, text: &str) {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let all_zero = body
        .bytes()
        .take_while(|b| !matches!(b, b'e' | b'E'))
        .all(|b| b == b'0' || b == b'.');
    let Some(e) = body.find(['e', 'E']) else {
        if negative && all_zero {
            out.extend_from_slice(body.as_bytes());
        } else {
            out.extend_from_slice(text.as_bytes());
        }
        return;
    };
    let (mantissa, exp) = (&body[..e], &body[e + 1..]);
    let Ok(exp) = exp.parse::<i64>() else {
        out.extend_from_slice(text.as_bytes());
        return;
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int}{frac}");
    let point = int.len() as i64 + exp;
    let scale = (frac.len() as i64 - exp).max(0);
    // Absurd exponents cannot come from float output; keep the text rather than allocate wildly.
    if point.abs() > 4096 || scale > 4096 {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    let mut int_part = String::new();
    let mut frac_part = String::new();
    if point <= 0 {
        int_part.push('0');
        frac_part.extend(std::iter::repeat_n('0', (-point) as usize));
        frac_part.push_str(&digits);
    } else if point as usize >= digits.len() {
        int_part.push_str(&digits);
        int_part.extend(std::iter::repeat_n('0', point as usize - digits.len()));
    } else {
        int_part.push_str(&digits[..point as usize]);
        frac_part.push_str(&digits[point as usize..]);
    }
    frac_part.truncate(scale as usize);
    while frac_part.len() < scale as usize {
        frac_part.push('0');
    }
    let int_part = int_part.trim_start_matches('0');
    if negative && !all_zero {
        out.push(b'-');
    }
    out.extend_from_slice(if int_part.is_empty() {
        b"0"
    } else {
        int_part.as_bytes()
    });
    if !frac_part.is_empty() {
        out.push(b'.');
        out.extend_from_slice(frac_part.as_bytes());
    }
}

/// `int2vector` / `oidvector`: array types whose text is space-separated without braces.
fn write_vector(out: &mut Vec<u8>, element: &ValueKind, text: &str) -> Result<(), ArraySyntax> {
    out.push(b'[');
    for (i, item) in text.split_ascii_whitespace().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json(out, element_kind(element), item);
    }
    out.push(b']');
    Ok(())
}

/// JSON number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'-') {
        i += 1;
    }
    let digits = |i: &mut usize| {
        let s = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - s
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(c) if c.is_ascii_digit() => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// ISO text (`2025-01-01 12:00:00.5+00`) to the XSD form `to_jsonb` uses
/// (`2025-01-01T12:00:00.5+00:00`). `infinity` and `-infinity` pass through; a ` BC` suffix stays.
fn xsd_datetime(text: &str, with_tz: bool) -> String {
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, " BC"),
        None => (text, ""),
    };
    let Some(space) = body.find(' ') else {
        return text.to_owned();
    };
    let mut s = String::with_capacity(text.len() + 3);
    s.push_str(&body[..space]);
    s.push('T');
    let time = &body[space + 1..];
    s.push_str(time);
    if with_tz
        && let Some(sign) = time.rfind(['+', '-'])
        && !time[sign..].contains(':')
    {
        s.push_str(":00");
    }
    s.push_str(bc);
    s
}

#[derive(Debug)]
struct ArraySyntax;

fn write_array(
    out: &mut Vec<u8>,
    element: &ValueKind,
    delimiter: u8,
    text: &str,
) -> Result<(), ArraySyntax> {
    let mut s = text;
    // `[0:1]={1,2}`: explicit bounds, which to_jsonb ignores.
    if s.starts_with('[') {
        let eq = s.find('=').ok_or(ArraySyntax)?;
        s = &s[eq + 1..];
    }
    let b = s.as_bytes();
    let mut pos = 0;
    skip_ws(b, &mut pos);
    write_level(out, element, delimiter, s, &mut pos)?;
    skip_ws(b, &mut pos);
    if pos != b.len() {
        return Err(ArraySyntax);
    }
    Ok(())
}

fn skip_ws(b: &[u8], pos: &mut usize) {
    while *pos < b.len() && b[*pos].is_ascii_whitespace() {
        *pos += 1;
    }
}

/// Element kinds inside arrays: bytea elements keep `\x` like `to_jsonb` does.
fn element_kind(kind: &ValueKind) -> &ValueKind {
    match kind {
        ValueKind::Bytea => &ValueKind::Text,
        k => k,
    }
}

fn write_level(
    out: &mut Vec<u8>,
    element: &ValueKind,
    delim: u8,
    s: &str,
    pos: &mut usize,
) -> Result<(), ArraySyntax> {
    let b = s.as_bytes();
    if b.get(*pos) != Some(&b'{') {
        return Err(ArraySyntax);
    }
    *pos += 1;
    out.push(b'[');
    skip_ws(b, pos);
    if b.get(*pos) == Some(&b'}') {
        *pos += 1;
        out.push(b']');
        return Ok(());
    }
    let mut first = true;
    loop {
        if !first {
            out.push(b',');
        }
        first = false;
        skip_ws(b, pos);
        match b.get(*pos) {
            Some(b'{') => write_level(out, element, delim, s, pos)?,
            Some(b'"') => {
                *pos += 1;
                let mut value = String::new();
                let mut seg = *pos;
                loop {
                    match b.get(*pos) {
                        None => return Err(ArraySyntax),
                        Some(b'"') => {
                            value.push_str(&s[seg..*pos]);
                            *pos += 1;
                            break;
                        }
                        Some(b'\\') => {
                            value.push_str(&s[seg..*pos]);
                            *pos += 1;
                            // The escaped character may be multi-byte: take one char.
                            let c = s
                                .get(*pos..)
                                .and_then(|r| r.chars().next())
                                .ok_or(ArraySyntax)?;
                            value.push(c);
                            *pos += c.len_utf8();
                            seg = *pos;
                        }
                        Some(_) => *pos += 1,
                    }
                }
                write_json(out, element_kind(element), &value);
            }
            Some(_) => {
                let start = *pos;
                let mut has_escape = false;
                while let Some(&c) = b.get(*pos) {
                    if c == delim || c == b'}' {
                        break;
                    }
                    if c == b'\\' {
                        has_escape = true;
                        *pos += 1;
                    }
                    *pos += 1;
                }
                let raw = s.get(start..*pos).ok_or(ArraySyntax)?.trim();
                if raw.is_empty() {
                    return Err(ArraySyntax);
                }
                if raw.eq_ignore_ascii_case("NULL") {
                    out.extend_from_slice(b"null");
                } else if has_escape {
                    let mut v = String::with_capacity(raw.len());
                    let mut chars = raw.chars();
                    while let Some(c) = chars.next() {
                        if c == '\\' {
                            v.extend(chars.next());
                        } else {
                            v.push(c);
                        }
                    }
                    write_json(out, element_kind(element), &v);
                } else {
                    write_json(out, element_kind(element), raw);
                }
            }
            None => return Err(ArraySyntax),
        }
        skip_ws(b, pos);
        match b.get(*pos) {
            Some(&c) if c == delim => *pos += 1,
            Some(b'}') => {
                *pos += 1;
                out.push(b']');
                return Ok(());
            }
            _ => return Err(ArraySyntax),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(kind: &ValueKind, text: &str) -> String {
        let mut out = Vec::new();
        write_json(&mut out, kind, text);
        String::from_utf8(out).unwrap()
    }

    fn arr(element: ValueKind) -> ValueKind {
        ValueKind::Array {
            element: Box::new(element),
            delimiter: b',',
        }
    }

    #[test]
    fn scalars() {
        assert_eq!(json(&ValueKind::Number, "12.3400"), "12.3400");
        assert_eq!(json(&ValueKind::Number, "NaN"), "\"NaN\"");
        assert_eq!(json(&ValueKind::Number, "-Infinity"), "\"-Infinity\"");
        assert_eq!(json(&ValueKind::Number, "1e+3"), "1000");
        assert_eq!(json(&ValueKind::Number, "-1.5e-3"), "-0.0015");
        assert_eq!(
            json(&ValueKind::Number, "3.4028235e+38"),
            "340282350000000000000000000000000000000"
        );
        assert_eq!(json(&ValueKind::Number, "-0"), "0");
        assert_eq!(json(&ValueKind::Number, "-0.00"), "0.00");
        assert_eq!(json(&ValueKind::Number, "0e-2"), "0.00");
        assert_eq!(json(&arr(ValueKind::Number), "1 2"), "[1,2]");
        assert_eq!(json(&ValueKind::Bool, "t"), "true");
        assert_eq!(
            json(&ValueKind::Text, "a\"b\\c\n\u{1}"),
            r#""a\"b\\c\n\u0001""#
        );
        assert_eq!(
            json(&ValueKind::Json, r#"{"a": [1, 2.50]}"#),
            r#"{"a": [1, 2.50]}"#
        );
        assert_eq!(json(&ValueKind::Bytea, "\\x0102ff"), "\"0102ff\"");
        assert_eq!(
            json(&ValueKind::Timestamp, "2025-01-01 12:00:00.123456"),
            "\"2025-01-01T12:00:00.123456\""
        );
        assert_eq!(
            json(&ValueKind::TimestampTz, "2025-01-01 12:00:00+00"),
            "\"2025-01-01T12:00:00+00:00\""
        );
        assert_eq!(
            json(&ValueKind::TimestampTz, "2025-01-01 12:00:00-03:30"),
            "\"2025-01-01T12:00:00-03:30\""
        );
        assert_eq!(json(&ValueKind::Timestamp, "infinity"), "\"infinity\"");
    }

    #[test]
    fn arrays() {
        assert_eq!(json(&arr(ValueKind::Number), "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(
            json(&arr(ValueKind::Number), "{{1,2},{3,4}}"),
            "[[1,2],[3,4]]"
        );
        assert_eq!(json(&arr(ValueKind::Number), "[0:1]={1,2}"), "[1,2]");
        assert_eq!(json(&arr(ValueKind::Text), "{}"), "[]");
        assert_eq!(
            json(&arr(ValueKind::Text), r#"{"a b","x\"y","NULL",null,"{}"}"#),
            r#"["a b","x\"y","NULL",null,"{}"]"#
        );
        assert_eq!(
            json(&arr(ValueKind::Json), r#"{"{\"a\": 1}",2}"#),
            r#"[{"a": 1},2]"#
        );
        let boxes = ValueKind::Array {
            element: Box::new(ValueKind::Text),
            delimiter: b';',
        };
        assert_eq!(
            json(&boxes, "{(1,1),(0,0);(2,2),(1,1)}"),
            r#"["(1,1),(0,0)","(2,2),(1,1)"]"#
        );
        // Malformed input falls back to the text.
        assert_eq!(json(&arr(ValueKind::Number), "{1,2"), "\"{1,2\"");
        assert_eq!(json(&arr(ValueKind::Number), "{\"1"), "\"{\\\"1\"");
    }

    #[test]
    fn any_text_gives_valid_json() {
        // Deterministic xorshift over characters that matter to the parsers.
        let alphabet: Vec<char> = "{}[]=,;\"\\ NULnul0123456789.-+eEx:T \u{1}é日"
            .chars()
            .collect();
        let kinds = [
            ValueKind::Number,
            ValueKind::Bool,
            ValueKind::Json,
            ValueKind::Timestamp,
            ValueKind::TimestampTz,
            ValueKind::Bytea,
            ValueKind::Text,
            arr(ValueKind::Number),
            arr(ValueKind::Json),
            arr(arr(ValueKind::Text)),
        ];
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        for i in 0..20_000usize {
            let len = i % 24;
            let text: String = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    alphabet[(state % alphabet.len() as u64) as usize]
                })
                .collect();
            let kind = &kinds[i % kinds.len()];
            let out = json(kind, &text);
            assert!(
                serde_json::from_str::<serde_json::Value>(&out).is_ok(),
                "{kind:?} {text:?} -> {out}"
            );
        }
    }

    #[test]
    fn raw_value() {
        assert_eq!(to_raw_value(&ValueKind::Number, "1.50").get(), "1.50");
    }
}
