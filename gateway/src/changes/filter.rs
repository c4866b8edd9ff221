//! Postgres Changes filters: the syntax of protocol.md §7.2, compiled against a column's type and
//! evaluated in process on the values the WAL carries (Postgres' text output).
//!
//! Syntax: `column=op.value`, several joined by top-level commas meaning AND; `not.` before the
//! operator negates; a value may be double-quoted PostgREST style (backslash escapes); `in` takes
//! `(a,b,c)` (array-literal elements, at most 100). Operators: eq neq lt lte gt gte in like ilike
//! match imatch is isdistinct.
//!
//! Semantics follow Postgres for the column's type, with these documented choices:
//! - text is compared byte-wise (the `C` collation); `bpchar` ignores trailing spaces; `citext`
//!   compares lower-cased;
//! - numeric compares exactly (decimal digits, no float rounding); float `NaN` equals `NaN` and
//!   sorts above every other value, as in Postgres;
//! - timestamps, dates and times compare as instants; a `timestamptz` filter value without an
//!   offset is read as UTC (the reference server's session time zone);
//! - enums compare by their declared order;
//! - `match`/`imatch` use Rust's `regex` syntax, which covers the common POSIX ARE patterns but
//!   not back-references or lookaround; such a pattern is refused when subscribing;
//! - json/jsonb compare as JSON values for eq/neq, other operators compare their text.
//!
//! A NULL column makes every operator false except `is` and `isdistinct` (also under `not.`, as
//! SQL's `NOT NULL` is not true). A filter column absent from the change does not match.

use std::cmp::Ordering;
use std::sync::Arc;

const MAX_IN_VALUES: usize = 100;

/// A filter operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
    In,
    Like,
    Ilike,
    Match,
    Imatch,
    Is,
    IsDistinct,
}

impl Op {
    fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            "like" => Op::Like,
            "ilike" => Op::Ilike,
            "match" => Op::Match,
            "imatch" => Op::Imatch,
            "is" => Op::Is,
            "isdistinct" => Op::IsDistinct,
            _ => return None,
        })
    }
}

/// One parsed condition, not yet typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawCondition {
    pub(crate) column: String,
    pub(crate) op: Op,
    pub(crate) negate: bool,
    pub(crate) value: String,
}

/// Parses a filter string. Empty or blank means no condition.
/// Why a filter (or one of its values) was refused; the text goes to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct FilterError(String);

/// Parses a filter string into its conditions.
pub(crate) fn parse(filter: &str) -> Result<Vec<RawCondition>, FilterError> {
    parse_text(filter).map_err(FilterError)
}

fn parse_text(filter: &str) -> Result<Vec<RawCondition>, String> {
    if filter.trim().is_empty() {
        return Ok(Vec::new());
    }
    split_top_level(filter)?
        .into_iter()
        .map(parse_condition)
        .collect()
}

fn split_top_level(filter: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in filter.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                parts.push(&filter[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&filter[start..]);
    if parts.iter().any(|p| p.trim().is_empty()) {
        return Err(format!("empty condition in {filter:?}"));
    }
    Ok(parts)
}

fn parse_condition(segment: &str) -> Result<RawCondition, String> {
    let segment = segment.trim();
    let (column, rest) = segment
        .split_once('=')
        .ok_or_else(|| format!("{segment:?} is not column=op.value"))?;
    let column = column.trim();
    if column.is_empty() {
        return Err(format!("{segment:?} has no column"));
    }
    let (negate, rest) = match rest.strip_prefix("not.") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let (op_name, value) = rest
        .split_once('.')
        .ok_or_else(|| format!("{segment:?} is not column=op.value"))?;
    let op = Op::parse(op_name).ok_or_else(|| format!("unknown operator {op_name:?}"))?;
    let value = if op == Op::In {
        let inner = value
            .strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .ok_or_else(|| format!("`in` needs a parenthesised list in {segment:?}"))?;
        inner.to_owned()
    } else {
        unquote(value)
    };
    Ok(RawCondition {
        column: column.to_owned(),
        op,
        negate,
        value,
    })
}

/// Removes PostgREST-style double quotes (with backslash escapes) around a value.
fn unquote(value: &str) -> String {
    match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => unescape(inner),
        None => value.to_owned(),
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Splits the inside of `in.(…)` as Postgres' array parser would: commas separate, double quotes
/// protect, an unquoted `NULL` is SQL NULL (`None`).
fn split_in_list(inner: &str) -> Vec<Option<String>> {
    let mut out = Vec::new();
    if inner.trim().is_empty() {
        return out;
    }
    let mut current = String::new();
    let (mut quoted, mut was_quoted, mut chars) = (false, false, inner.chars());
    let finish = |current: &mut String, was_quoted: &mut bool, out: &mut Vec<Option<String>>| {
        let text = if *was_quoted {
            current.clone()
        } else {
            current.trim().to_owned()
        };
        out.push((*was_quoted || !text.eq_ignore_ascii_case("null")).then_some(text));
        current.clear();
        *was_quoted = false;
    };
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    current.push(n);
                }
            }
            '"' => {
                if !quoted && !was_quoted && current.trim().is_empty() {
                    current.clear();
                }
                quoted = !quoted;
                was_quoted = true;
            }
            ',' if !quoted => finish(&mut current, &mut was_quoted, &mut out),
            c if was_quoted && !quoted && c.is_whitespace() => {}
            _ => current.push(c),
        }
    }
    finish(&mut current, &mut was_quoted, &mut out);
    out
}

/// How values of a column compare.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Kind {
    Int,
    Float,
    Numeric,
    Bool,
    Text,
    Bpchar,
    CiText,
    Uuid,
    Timestamp,
    TimestampTz,
    Date,
    Time,
    TimeTz,
    Json,
    /// Labels in declared order.
    Enum(Arc<[String]>),
    /// Anything else: compared by its text output.
    Other,
}

impl Kind {
    /// The kind of a type by its name (`pg_type.typname` of the column or, for domains, of the
    /// base type); enums are built by the caller with their labels.
    pub(crate) fn from_type_name(name: &str) -> Kind {
        match name {
            "int2" | "int4" | "int8" | "oid" | "xid" | "cid" => Kind::Int,
            "float4" | "float8" => Kind::Float,
            "numeric" => Kind::Numeric,
            "bool" => Kind::Bool,
            "text" | "varchar" | "name" | "char" => Kind::Text,
            "bpchar" => Kind::Bpchar,
            "citext" => Kind::CiText,
            "uuid" => Kind::Uuid,
            "timestamp" => Kind::Timestamp,
            "timestamptz" => Kind::TimestampTz,
            "date" => Kind::Date,
            "time" => Kind::Time,
            "timetz" => Kind::TimeTz,
            "json" | "jsonb" => Kind::Json,
            _ => Kind::Other,
        }
    }

    fn is_textual(&self) -> bool {
        matches!(
            self,
            Kind::Text | Kind::Bpchar | Kind::CiText | Kind::Other | Kind::Enum(_)
        )
    }
}

/// A typed value.
#[derive(Clone, Debug)]
enum Scalar {
    Int(i128),
    Float(f64),
    Numeric(Decimal),
    Bool(bool),
    Text(String),
    Uuid(u128),
    /// Microseconds (timestamps since the epoch, times since midnight), or days for dates.
    Instant(i128),
    Json(serde_json::Value),
    Enum(usize),
}

/// A condition compiled for one column type.
#[derive(Clone, Debug)]
pub(crate) struct Condition {
    pub(crate) column: String,
    negate: bool,
    test: Test,
    kind: Kind,
}

#[derive(Clone, Debug)]
enum Test {
    Compare(Op, Scalar),
    In(Vec<Scalar>),
    Like(Vec<LikeToken>, bool),
    Regex(regex::Regex),
    IsNull,
    IsBool(bool),
    IsDistinct(Scalar),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum LikeToken {
    Any,
    One,
    Char(char),
}

impl Condition {
    /// Types a parsed condition for a column of `kind`; errors read like the reference's
    /// subscription-check errors.
    pub(crate) fn compile(raw: &RawCondition, kind: Kind) -> Result<Condition, FilterError> {
        Condition::compile_text(raw, kind).map_err(FilterError)
    }

    fn compile_text(raw: &RawCondition, kind: Kind) -> Result<Condition, String> {
        let cast = |v: &str| {
            parse_scalar(&kind, v)
                .ok_or_else(|| format!("invalid input value {v:?} for column {:?}", raw.column))
        };
        let test = match raw.op {
            Op::Eq | Op::Neq | Op::Lt | Op::Lte | Op::Gt | Op::Gte => {
                Test::Compare(raw.op, cast(&raw.value)?)
            }
            Op::In => {
                let values = split_in_list(&raw.value);
                if values.len() > MAX_IN_VALUES {
                    return Err(format!(
                        "too many values for `in` filter on {:?}: {} (at most {MAX_IN_VALUES})",
                        raw.column,
                        values.len()
                    ));
                }
                // NULL elements never match (`= any` gives NULL for them).
                Test::In(
                    values
                        .iter()
                        .flatten()
                        .map(|v| cast(v))
                        .collect::<Result<_, _>>()?,
                )
            }
            Op::Like | Op::Ilike => {
                if !kind.is_textual() {
                    return Err(format!(
                        "operator like/ilike needs a text column, not {:?}",
                        raw.column
                    ));
                }
                let insensitive = raw.op == Op::Ilike;
                let pattern = if insensitive {
                    raw.value.to_lowercase()
                } else {
                    raw.value.clone()
                };
                Test::Like(like_tokens(&pattern), insensitive)
            }
            Op::Match | Op::Imatch => {
                if !kind.is_textual() {
                    return Err(format!(
                        "operator match/imatch needs a text column, not {:?}",
                        raw.column
                    ));
                }
                let pattern = if raw.op == Op::Imatch {
                    format!("(?i){}", raw.value)
                } else {
                    raw.value.clone()
                };
                Test::Regex(
                    regex::Regex::new(&pattern)
                        .map_err(|e| format!("invalid regular expression {:?}: {e}", raw.value))?,
                )
            }
            Op::Is => match raw.value.to_ascii_lowercase().as_str() {
                "null" => Test::IsNull,
                v @ ("true" | "false" | "unknown") => {
                    if kind != Kind::Bool {
                        return Err(format!(
                            "`is.{v}` needs a boolean column, not {:?}",
                            raw.column
                        ));
                    }
                    match v {
                        "unknown" => Test::IsNull,
                        v => Test::IsBool(v == "true"),
                    }
                }
                v => {
                    return Err(format!(
                        "`is` takes null, true, false or unknown, not {v:?}"
                    ));
                }
            },
            Op::IsDistinct => Test::IsDistinct(cast(&raw.value)?),
        };
        Ok(Condition {
            column: raw.column.clone(),
            negate: raw.negate,
            test,
            kind,
        })
    }

    /// Evaluates the condition on a column value given as Postgres text output (`None` = NULL).
    pub(crate) fn matches(&self, value: Option<&str>) -> bool {
        let Some(text) = value else {
            return match &self.test {
                Test::IsNull => !self.negate,
                Test::IsBool(_) => self.negate,
                Test::IsDistinct(_) => !self.negate,
                _ => false,
            };
        };
        let Some(v) = parse_scalar(&self.kind, text) else {
            return false;
        };
        let result = match &self.test {
            Test::Compare(op, rhs) => match compare(&v, rhs) {
                Some(o) => match op {
                    Op::Eq => o == Ordering::Equal,
                    Op::Neq => o != Ordering::Equal,
                    Op::Lt => o == Ordering::Less,
                    Op::Lte => o != Ordering::Greater,
                    Op::Gt => o == Ordering::Greater,
                    Op::Gte => o != Ordering::Less,
                    _ => false,
                },
                None => false,
            },
            Test::In(list) => list
                .iter()
                .any(|rhs| compare(&v, rhs) == Some(Ordering::Equal)),
            Test::Like(tokens, insensitive) => {
                let subject = if *insensitive {
                    text.to_lowercase()
                } else {
                    text.to_owned()
                };
                like_match(tokens, &subject.chars().collect::<Vec<_>>())
            }
            Test::Regex(re) => re.is_match(text),
            Test::IsNull => false,
            Test::IsBool(b) => matches!(v, Scalar::Bool(x) if x == *b),
            Test::IsDistinct(rhs) => compare(&v, rhs) != Some(Ordering::Equal),
        };
        result != self.negate
    }
}

fn like_tokens(pattern: &str) -> Vec<LikeToken> {
    let mut out = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            '%' => LikeToken::Any,
            '_' => LikeToken::One,
            '\\' => LikeToken::Char(chars.next().unwrap_or('\\')),
            c => LikeToken::Char(c),
        });
    }
    out
}

/// SQL LIKE matching with `%` and `_`, iterative with backtracking on the last `%`.
fn like_match(tokens: &[LikeToken], s: &[char]) -> bool {
    let (mut t, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match tokens.get(t) {
            Some(LikeToken::Any) => {
                star = Some((t, i));
                t += 1;
            }
            Some(LikeToken::One) => {
                t += 1;
                i += 1;
            }
            Some(LikeToken::Char(c)) if *c == s[i] => {
                t += 1;
                i += 1;
            }
            _ => match star {
                Some((st, si)) => {
                    t = st + 1;
                    i = si + 1;
                    star = Some((st, si + 1));
                }
                None => return false,
            },
        }
    }
    tokens[t.min(tokens.len())..]
        .iter()
        .all(|tok| *tok == LikeToken::Any)
}

fn parse_scalar(kind: &Kind, text: &str) -> Option<Scalar> {
    let t = text.trim();
    Some(match kind {
        Kind::Int => Scalar::Int(t.strip_prefix('+').unwrap_or(t).parse().ok()?),
        Kind::Float => Scalar::Float(parse_float(t)?),
        Kind::Numeric => Scalar::Numeric(Decimal::parse(t)?),
        Kind::Bool => Scalar::Bool(parse_bool(t)?),
        Kind::Text | Kind::Other => Scalar::Text(text.to_owned()),
        Kind::Bpchar => Scalar::Text(text.trim_end_matches(' ').to_owned()),
        Kind::CiText => Scalar::Text(text.to_lowercase()),
        Kind::Uuid => Scalar::Uuid(uuid::Uuid::parse_str(t).ok()?.as_u128()),
        Kind::Timestamp => Scalar::Instant(parse_timestamp(t, false)?),
        Kind::TimestampTz => Scalar::Instant(parse_timestamp(t, true)?),
        Kind::Date => Scalar::Instant(parse_date_days(t)?),
        Kind::Time => Scalar::Instant(parse_time(t, false)?),
        Kind::TimeTz => Scalar::Instant(parse_time(t, true)?),
        Kind::Json => Scalar::Json(serde_json::from_str(t).ok()?),
        Kind::Enum(labels) => Scalar::Enum(labels.iter().position(|l| l == text)?),
    })
}

fn compare(a: &Scalar, b: &Scalar) -> Option<Ordering> {
    Some(match (a, b) {
        (Scalar::Int(a), Scalar::Int(b)) => a.cmp(b),
        (Scalar::Float(a), Scalar::Float(b)) => match (a.is_nan(), b.is_nan()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            _ => a.partial_cmp(b)?,
        },
        (Scalar::Numeric(a), Scalar::Numeric(b)) => a.cmp(b),
        (Scalar::Bool(a), Scalar::Bool(b)) => a.cmp(b),
        (Scalar::Text(a), Scalar::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
        (Scalar::Uuid(a), Scalar::Uuid(b)) => a.cmp(b),
        (Scalar::Instant(a), Scalar::Instant(b)) => a.cmp(b),
        (Scalar::Enum(a), Scalar::Enum(b)) => a.cmp(b),
        (Scalar::Json(a), Scalar::Json(b)) => {
            if a == b {
                Ordering::Equal
            } else {
                a.to_string().cmp(&b.to_string())
            }
        }
        _ => return None,
    })
}

fn parse_float(t: &str) -> Option<f64> {
    match t.to_ascii_lowercase().as_str() {
        "nan" => Some(f64::NAN),
        "infinity" | "+infinity" | "inf" => Some(f64::INFINITY),
        "-infinity" | "-inf" => Some(f64::NEG_INFINITY),
        _ => t.parse().ok().filter(|f: &f64| f.is_finite()),
    }
}

/// Postgres `boolin`: t/true/y/yes/on/1 and f/false/n/no/off/0, case-insensitive, unique prefixes.
fn parse_bool(t: &str) -> Option<bool> {
    let l = t.to_ascii_lowercase();
    if l.is_empty() {
        return None;
    }
    let prefix_of = |word: &str| word.starts_with(l.as_str());
    if prefix_of("true") || prefix_of("yes") || l == "on" || l == "1" {
        Some(true)
    } else if prefix_of("false") || prefix_of("no") || l == "off" || l == "of" || l == "0" {
        Some(false)
    } else {
        None
    }
}

/// An exact decimal: `0.digits × 10^exp`, digits without leading or trailing zeros (empty = 0).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Decimal {
    nan: bool,
    negative: bool,
    digits: Vec<u8>,
    exp: i64,
}

impl Decimal {
    fn parse(t: &str) -> Option<Decimal> {
        if t.eq_ignore_ascii_case("nan") {
            return Some(Decimal {
                nan: true,
                negative: false,
                digits: Vec::new(),
                exp: 0,
            });
        }
        let (negative, t) = match t.as_bytes().first()? {
            b'-' => (true, &t[1..]),
            b'+' => (false, &t[1..]),
            _ => (false, t),
        };
        let (mantissa, exp10) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], t[i + 1..].parse::<i64>().ok()?),
            None => (t, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if int.is_empty() && frac.is_empty()
            || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let mut digits: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
        let mut exp = int.len() as i64 + exp10;
        let leading = digits.iter().take_while(|d| **d == 0).count();
        digits.drain(..leading);
        exp -= leading as i64;
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            return Some(Decimal {
                nan: false,
                negative: false,
                digits,
                exp: 0,
            });
        }
        Some(Decimal {
            nan: false,
            negative,
            digits,
            exp,
        })
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.nan, other.nan) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Greater,
            (false, true) => return Ordering::Less,
            _ => {}
        }
        let sign = |d: &Decimal| {
            if d.digits.is_empty() {
                0
            } else if d.negative {
                -1
            } else {
                1
            }
        };
        let (sa, sb) = (sign(self), sign(other));
        if sa != sb || sa == 0 {
            return sa.cmp(&sb);
        }
        let magnitude = self
            .exp
            .cmp(&other.exp)
            .then_with(|| self.digits.cmp(&other.digits));
        if sa < 0 {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn parse_date_days(t: &str) -> Option<i128> {
    match t.to_ascii_lowercase().as_str() {
        "infinity" => return Some(i128::MAX),
        "-infinity" => return Some(i128::MIN),
        _ => {}
    }
    let (y, rest) = t.split_once('-')?;
    let (m, d) = rest.split_once('-')?;
    let (y, m, d): (i64, u32, u32) = (y.parse().ok()?, m.parse().ok()?, d.get(..2)?.parse().ok()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(i128::from(days_from_civil(y, m, d)))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `HH:MM[:SS[.ffffff]]` → microseconds, and the rest of the string.
fn parse_clock(t: &str) -> Option<(i128, &str)> {
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || c == ':' || c == '.'))
        .unwrap_or(t.len());
    let (clock, rest) = t.split_at(end);
    let mut parts = clock.split(':');
    let h: i128 = parts.next()?.parse().ok()?;
    let m: i128 = parts.next()?.parse().ok()?;
    let (s, frac) = match parts.next() {
        Some(sec) => {
            let (s, f) = sec.split_once('.').unwrap_or((sec, ""));
            (s.parse::<i128>().ok()?, f)
        }
        None => (0, ""),
    };
    if parts.next().is_some() || h > 24 || m > 59 || s > 60 {
        return None;
    }
    let mut micros: i128 = 0;
    for (i, c) in frac.chars().take(6).enumerate() {
        micros += i128::from(c.to_digit(10)?) * 10i128.pow(5 - i as u32);
    }
    Some((((h * 60 + m) * 60 + s) * 1_000_000 + micros, rest))
}

/// A zone suffix (`Z`, `+HH`, `+HH:MM`, `-HHMM`, `+HH:MM:SS`) → offset in microseconds.
fn parse_offset(z: &str) -> Option<i128> {
    let z = z.trim();
    if z.is_empty() {
        return Some(0);
    }
    if z.eq_ignore_ascii_case("z") || z.eq_ignore_ascii_case("utc") {
        return Some(0);
    }
    let (sign, rest) = match z.as_bytes()[0] {
        b'+' => (1, &z[1..]),
        b'-' => (-1, &z[1..]),
        _ => return None,
    };
    let digits: String = rest.chars().filter(char::is_ascii_digit).collect();
    let field =
        |i: usize| -> Option<i128> { digits.get(i..i + 2).map_or(Some(0), |s| s.parse().ok()) };
    if digits.is_empty() {
        return None;
    }
    let (h, m, s) = if digits.len() == 1 {
        (digits.parse::<i128>().ok()?, 0, 0)
    } else {
        (field(0)?, field(2)?, field(4)?)
    };
    Some(sign * ((h * 60 + m) * 60 + s) * 1_000_000)
}

fn parse_timestamp(t: &str, with_zone: bool) -> Option<i128> {
    match t.to_ascii_lowercase().as_str() {
        "infinity" => return Some(i128::MAX),
        "-infinity" => return Some(i128::MIN),
        _ => {}
    }
    let date_end = t.find([' ', 'T', 't']).unwrap_or(t.len());
    let days = parse_date_days(&t[..date_end])?;
    let rest = t[date_end..].trim_start_matches([' ', 'T', 't']);
    let (clock, zone) = if rest.is_empty() {
        (0, "")
    } else {
        parse_clock(rest)?
    };
    let local = days * 86_400_000_000 + clock;
    if with_zone {
        Some(local - parse_offset(zone)?)
    } else {
        Some(local)
    }
}

fn parse_time(t: &str, with_zone: bool) -> Option<i128> {
    let (clock, zone) = parse_clock(t)?;
    if with_zone {
        Some(clock - parse_offset(zone)?)
    } else {
        zone.trim().is_empty().then_some(clock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(filter: &str, kind: Kind) -> Condition {
        let raw = parse(filter).unwrap();
        assert_eq!(raw.len(), 1, "{filter}");
        Condition::compile(&raw[0], kind).unwrap()
    }

    #[test]
    fn parses_the_syntax() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("   ").unwrap().is_empty());
        let c = parse(r#"a=eq.1,b=not.in.(x,"y,z"),name=eq."a,b""#).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            c[1],
            RawCondition {
                column: "b".into(),
                op: Op::In,
                negate: true,
                value: r#"x,"y,z""#.into()
            }
        );
        assert_eq!(c[2].value, "a,b");
        assert_eq!(parse(r#"n=eq."a\"b""#).unwrap()[0].value, "a\"b");
        assert!(parse("a=eq.1,,b=eq.2").is_err());
        assert!(parse("a=foo.1").is_err());
        assert!(parse("a=in.1,2").is_err());
        assert!(parse("noequals").is_err());
        assert!(parse("=eq.1").is_err());
    }

    #[test]
    fn in_lists() {
        assert_eq!(
            split_in_list(r#"a, "b,c" ,NULL,"NULL""#),
            vec![
                Some("a".into()),
                Some("b,c".into()),
                None,
                Some("NULL".into())
            ]
        );
        let c = cond("id=in.(1,2,3)", Kind::Int);
        assert!(c.matches(Some("2")) && !c.matches(Some("4")) && !c.matches(None));
        let many = format!(
            "id=in.({})",
            (0..101)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(Condition::compile(&parse(&many).unwrap()[0], Kind::Int).is_err());
        assert!(Condition::compile(&parse("id=in.(1,x)").unwrap()[0], Kind::Int).is_err());
    }

    #[test]
    fn comparisons_follow_the_type() {
        let c = cond("n=gt.9", Kind::Int);
        assert!(c.matches(Some("10")) && !c.matches(Some("9")));
        let c = cond("n=lt.10", Kind::Text);
        assert!(!c.matches(Some("9")), "text compares as text");
        let c = cond("n=eq.1.50", Kind::Numeric);
        assert!(c.matches(Some("1.5")) && c.matches(Some("001.500")) && !c.matches(Some("1.51")));
        let c = cond("n=gt.-2", Kind::Numeric);
        assert!(c.matches(Some("-1.999")) && !c.matches(Some("-2.0001")) && c.matches(Some("0")));
        let c = cond("n=eq.1e3", Kind::Numeric);
        assert!(c.matches(Some("1000")));
        let c = cond("f=gt.1e308", Kind::Float);
        assert!(c.matches(Some("Infinity")) && c.matches(Some("NaN")));
        let c = cond("b=eq.true", Kind::Bool);
        assert!(c.matches(Some("t")) && !c.matches(Some("f")));
        let c = cond("u=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11", Kind::Uuid);
        assert!(c.matches(Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")));
        let c = cond("t=gte.2025-01-01T12:00:00Z", Kind::TimestampTz);
        assert!(c.matches(Some("2025-01-01 13:00:00+01")));
        assert!(!c.matches(Some("2025-01-01 12:59:59.999+01")));
        let c = cond("t=eq.2025-01-01", Kind::Timestamp);
        assert!(c.matches(Some("2025-01-01 00:00:00")));
        let c = cond("d=lt.2025-03-01", Kind::Date);
        assert!(c.matches(Some("2025-02-28")) && !c.matches(Some("2025-03-01")));
        let c = cond("c=eq.ab", Kind::Bpchar);
        assert!(c.matches(Some("ab   ")));
        let c = cond(
            "s=lt.b",
            Kind::Enum(Arc::from(vec![
                "c".to_owned(),
                "b".to_owned(),
                "a".to_owned(),
            ])),
        );
        assert!(c.matches(Some("c")) && !c.matches(Some("a")));
        assert!(
            Condition::compile(
                &parse("s=eq.z").unwrap()[0],
                Kind::Enum(Arc::from(vec!["a".to_owned()]))
            )
            .is_err()
        );
        let c = cond(r#"j=eq."{\"b\":1,\"a\":2}""#, Kind::Json);
        assert!(c.matches(Some(r#"{"a": 2, "b": 1}"#)));
    }

    #[test]
    fn nulls_and_negation() {
        let c = cond("n=not.eq.1", Kind::Int);
        assert!(c.matches(Some("2")) && !c.matches(Some("1")) && !c.matches(None));
        let c = cond("n=is.null", Kind::Int);
        assert!(c.matches(None) && !c.matches(Some("1")));
        let c = cond("n=not.is.null", Kind::Int);
        assert!(!c.matches(None) && c.matches(Some("1")));
        let c = cond("b=is.true", Kind::Bool);
        assert!(c.matches(Some("t")) && !c.matches(Some("f")) && !c.matches(None));
        let c = cond("b=is.unknown", Kind::Bool);
        assert!(c.matches(None));
        assert!(Condition::compile(&parse("n=is.true").unwrap()[0], Kind::Int).is_err());
        let c = cond("n=isdistinct.1", Kind::Int);
        assert!(c.matches(None) && c.matches(Some("2")) && !c.matches(Some("1")));
        let c = cond("n=not.isdistinct.1", Kind::Int);
        assert!(!c.matches(None) && c.matches(Some("1")));
    }

    #[test]
    fn patterns() {
        let c = cond("s=like.a%c_", Kind::Text);
        assert!(c.matches(Some("abbbcd")) && c.matches(Some("acx")) && !c.matches(Some("abc")));
        let c = cond("s=ilike.%HELLO%", Kind::Text);
        assert!(c.matches(Some("say hello there")));
        let c = cond(r"s=like.100\%", Kind::Text);
        assert!(c.matches(Some("100%")) && !c.matches(Some("1000")));
        let c = cond("s=match.^a[0-9]+$", Kind::Text);
        assert!(c.matches(Some("a12")) && !c.matches(Some("a12b")));
        let c = cond("s=imatch.^ABC", Kind::Text);
        assert!(c.matches(Some("abcdef")));
        assert!(Condition::compile(&parse("s=match.(").unwrap()[0], Kind::Text).is_err());
        assert!(Condition::compile(&parse("n=like.1%").unwrap()[0], Kind::Int).is_err());
    }
}
