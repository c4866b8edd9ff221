//! Row policies evaluated in process: the fast path of RLS visibility.
//!
//! Most policies that decide who reads a row compare the row's own columns with the caller's
//! claims: `auth.uid() = user_id`, `is_public or user_id = (select auth.uid())`,
//! `auth.uid() is not null`, `(auth.jwt() ->> 'email') = email`. For those, visibility is a pure
//! function of the committed row and the claims, and asking Postgres once per distinct user per
//! batch is the whole cost of Postgres Changes under RLS. So the gateway reads the policies that
//! apply to a role (`pg_get_expr` with an empty `search_path`, so every name outside `pg_catalog`
//! is qualified), and when *every* one of them is in the small grammar below, it decides
//! visibility itself, with SQL's three-valued logic and Postgres's equality per type.
//!
//! Anything outside the grammar (a subquery on another table, another function, a type whose
//! equality is not byte equality, an unchanged TOAST value, a `sub` that is not a UUID where
//! Postgres would raise an error) is *undecided*, and that row goes to the SQL check as before.
//! `auth.uid()`, `auth.role()` and `auth.jwt()` are recognised only when their bodies are the
//! ones Supabase ships (checked from `pg_proc` every batch).
//!
//! The row judged is the row as committed (the WAL tuple); the SQL check reads the row as it is
//! when the check runs. They differ only when the row changed again in between.

use std::fmt;

/// A value during evaluation. `Opaque` is a non-null value whose type is not modelled: it can be
/// tested for null, nothing else.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    Text(String),
    Uuid(u128),
    Int(i64),
    Opaque,
}

/// A cell of the row being judged.
#[derive(Clone, Copy, Debug)]
pub enum Cell<'a> {
    Null,
    /// The value's text output and its type's `typname`.
    Text(&'a str, &'a str),
    /// Not known here (an unchanged TOAST value, or binary).
    Unknown,
}

/// The row being judged, by column name.
pub trait Row {
    fn cell(&self, column: &str) -> Option<Cell<'_>>;
}

/// Evaluation could not decide: the SQL check must.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undecided;

type Eval<T> = Result<T, Undecided>;

/// Which definitions the `auth` helper functions have in this database.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthFunctions {
    pub uid: Option<UidForm>,
    pub role: Option<UidForm>,
    pub jwt: bool,
}

/// The two bodies Supabase has shipped for `auth.uid()` (and `auth.role()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UidForm {
    /// `nullif(current_setting('request.jwt.claim.<x>', true), '')::<type>`
    ClaimOnly,
    /// `coalesce(nullif(claim.<x>, ''), nullif(claims, '')::jsonb ->> '<x>')::<type>`
    ClaimThenClaims,
}

fn normalize(body: &str) -> String {
    let mut s: String = body
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_lowercase)
        .collect();
    while s.ends_with(';') {
        s.pop();
    }
    s
}

impl AuthFunctions {
    /// Recognises the bodies (`pg_proc.prosrc` of SQL functions without `SET` options) of
    /// `auth.uid()`, `auth.role()` and `auth.jwt()`.
    pub fn recognise(uid: Option<&str>, role: Option<&str>, jwt: Option<&str>) -> AuthFunctions {
        let form = |body: Option<&str>, claim: &str, ty: &str| {
            let body = normalize(body?);
            let claim_only =
                format!("selectnullif(current_setting('request.jwt.claim.{claim}',true),'')::{ty}");
            let both = format!(
                "selectcoalesce(nullif(current_setting('request.jwt.claim.{claim}',true),''),\
                 (nullif(current_setting('request.jwt.claims',true),'')::jsonb->>'{claim}'))::{ty}"
            );
            if body == claim_only {
                Some(UidForm::ClaimOnly)
            } else if body == both {
                Some(UidForm::ClaimThenClaims)
            } else {
                None
            }
        };
        AuthFunctions {
            uid: form(uid, "sub", "uuid"),
            role: form(role, "role", "text"),
            jwt: jwt.is_some_and(|b| {
                normalize(b)
                    == "selectcoalesce(nullif(current_setting('request.jwt.claim',true),''),\
                        nullif(current_setting('request.jwt.claims',true),''))::jsonb"
            }),
        }
    }
}

/// The caller, as the helper functions see it: the settings the SQL check makes
/// (`request.jwt.claims`, `request.jwt.claim.sub`, `request.jwt.claim.role`).
#[derive(Debug)]
pub struct Caller<'a> {
    uid: Eval<Value>,
    role: Eval<Value>,
    /// What `auth.jwt()` returns: the claims object, borrowed.
    jwt: Eval<&'a serde_json::Value>,
}

impl<'a> Caller<'a> {
    /// `claims` is the JSON object set as `request.jwt.claims`; `sub` what is set as
    /// `request.jwt.claim.sub` (the claim when it is a string, else empty); `role` what is set as
    /// `request.jwt.claim.role`.
    pub fn new(
        functions: &AuthFunctions,
        role: &str,
        claims: &'a serde_json::Value,
        sub: Option<&str>,
    ) -> Caller<'a> {
        let from_setting = |setting: Option<&str>, key: &str, form: Option<UidForm>| {
            let setting = setting.filter(|s| !s.is_empty());
            match (form, setting) {
                (None, _) => Err(Undecided),
                (Some(_), Some(s)) => Ok(Value::Text(s.to_owned())),
                (Some(UidForm::ClaimOnly), None) => Ok(Value::Null),
                (Some(UidForm::ClaimThenClaims), None) => {
                    json_text(claims.get(key).unwrap_or(&serde_json::Value::Null))
                }
            }
        };
        let uid = from_setting(sub, "sub", functions.uid).and_then(|v| cast(v, "uuid"));
        let role = from_setting(Some(role), "role", functions.role);
        let jwt = if functions.jwt && claims.is_object() {
            Ok(claims)
        } else {
            Err(Undecided)
        };
        Caller { uid, role, jwt }
    }
}

/// `jsonb ->> key` of a value: strings as they are, SQL NULL for JSON null, integers and
/// booleans in Postgres's spelling; other numbers, objects and arrays are not modelled.
fn json_text(value: &serde_json::Value) -> Eval<Value> {
    match value {
        serde_json::Value::Null => Ok(Value::Null),
        serde_json::Value::String(s) => Ok(Value::Text(s.clone())),
        serde_json::Value::Bool(b) => Ok(Value::Text(b.to_string())),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Ok(Value::Text(i.to_string())),
            None => Err(Undecided),
        },
        _ => Err(Undecided),
    }
}

/// The parsed `USING` expression of one policy.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Const(Literal),
    Column(String),
    Uid,
    Role,
    Jwt,
    Cast(Box<Expr>, String),
    /// `->` (false) or `->>` (true) with a text key.
    JsonGet(Box<Expr>, String, bool),
    Eq(Box<Expr>, Box<Expr>),
    NotEq(Box<Expr>, Box<Expr>),
    EqAny(Box<Expr>, Vec<Expr>),
    IsNull(Box<Expr>, bool),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

/// A literal as the deparser writes it: `'text'::type`, an integer, `true`, `false`, `NULL`.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Null,
    Bool(bool),
    Int(i64),
    /// An untyped quoted literal; a cast around it gives the type.
    Unknown(String),
}

impl Expr {
    fn eval(&self, row: &dyn Row, caller: &Caller) -> Eval<Value> {
        Ok(match self {
            Expr::Const(Literal::Null) => Value::Null,
            Expr::Const(Literal::Bool(b)) => Value::Bool(*b),
            Expr::Const(Literal::Int(i)) => Value::Int(*i),
            // Postgres resolves an unknown literal against the other side; the deparser always
            // writes the cast, so a bare one is not modelled.
            Expr::Const(Literal::Unknown(_)) => return Err(Undecided),
            Expr::Column(name) => column(row.cell(name).ok_or(Undecided)?)?,
            Expr::Uid => caller.uid.clone()?,
            Expr::Role => caller.role.clone()?,
            // The claims object: not NULL, and not comparable here.
            Expr::Jwt => caller.jwt.map(|_| Value::Opaque)?,
            Expr::Cast(inner, ty) => match &**inner {
                Expr::Const(Literal::Unknown(text)) => cast(Value::Text(text.clone()), ty)?,
                inner => cast(inner.eval(row, caller)?, ty)?,
            },
            Expr::JsonGet(inner, key, as_text) => {
                match inner.json(caller)?.and_then(|v| v.get(key)) {
                    // A missing key, or a text key on a scalar or an array: NULL.
                    None => Value::Null,
                    Some(v) if *as_text => json_text(v)?,
                    // A JSON value (even JSON null): not NULL, and not comparable here.
                    Some(_) => Value::Opaque,
                }
            }
            Expr::Eq(a, b) => equal(&a.eval(row, caller)?, &b.eval(row, caller)?)?,
            Expr::NotEq(a, b) => not(equal(&a.eval(row, caller)?, &b.eval(row, caller)?)?)?,
            Expr::EqAny(a, items) => {
                let a = a.eval(row, caller)?;
                let mut result = Value::Bool(false);
                for item in items {
                    match equal(&a, &item.eval(row, caller)?)? {
                        Value::Bool(true) => return Ok(Value::Bool(true)),
                        Value::Null => result = Value::Null,
                        _ => {}
                    }
                }
                result
            }
            Expr::IsNull(inner, negated) => {
                let is_null = matches!(inner.eval(row, caller)?, Value::Null);
                Value::Bool(is_null != *negated)
            }
            Expr::Not(inner) => not(inner.eval(row, caller)?)?,
            Expr::And(items) => {
                // SQL: false wins over NULL. An undecided operand leaves the whole undecided,
                // even next to a false one: it may be an error, and Postgres picks the order.
                let mut result = Value::Bool(true);
                for item in items {
                    match item.eval(row, caller)? {
                        Value::Bool(false) => result = Value::Bool(false),
                        Value::Bool(true) => {}
                        Value::Null => {
                            if result != Value::Bool(false) {
                                result = Value::Null;
                            }
                        }
                        _ => return Err(Undecided),
                    }
                }
                result
            }
            Expr::Or(items) => {
                let mut result = Value::Bool(false);
                for item in items {
                    match item.eval(row, caller)? {
                        Value::Bool(true) => result = Value::Bool(true),
                        Value::Bool(false) => {}
                        Value::Null => {
                            if result != Value::Bool(true) {
                                result = Value::Null;
                            }
                        }
                        _ => return Err(Undecided),
                    }
                }
                result
            }
        })
    }
}

impl Expr {
    /// The JSON value of `auth.jwt()` and `->` chains on it, borrowed from the caller; `None` is
    /// SQL NULL. JSON from anywhere else is not modelled.
    fn json<'c>(&self, caller: &Caller<'c>) -> Eval<Option<&'c serde_json::Value>> {
        match self {
            Expr::Jwt => caller.jwt.map(Some),
            Expr::JsonGet(inner, key, false) => Ok(inner.json(caller)?.and_then(|v| v.get(key))),
            _ => Err(Undecided),
        }
    }
}

/// A cell as a typed value: only types whose text form decides equality exactly.
fn column(cell: Cell<'_>) -> Eval<Value> {
    match cell {
        Cell::Null => Ok(Value::Null),
        Cell::Unknown => Err(Undecided),
        Cell::Text(text, ty) => Ok(match ty {
            "uuid" => Value::Uuid(parse_uuid(text).ok_or(Undecided)?),
            "text" | "varchar" => Value::Text(text.to_owned()),
            "bool" => match text {
                "t" => Value::Bool(true),
                "f" => Value::Bool(false),
                _ => return Err(Undecided),
            },
            "int2" | "int4" | "int8" => Value::Int(text.parse().map_err(|_| Undecided)?),
            _ => Value::Opaque,
        }),
    }
}

/// Casts the deparser writes: to `text`, `uuid`, `character varying` (no length), integers and
/// `boolean` from their own type.
fn cast(value: Value, ty: &str) -> Eval<Value> {
    Ok(match (value, ty) {
        (Value::Null, _) => Value::Null,
        (Value::Text(s), "text" | "character varying") => Value::Text(s),
        (Value::Uuid(u), "text" | "character varying") => Value::Text(format_uuid(u)),
        (Value::Int(i), "text" | "character varying") => Value::Text(i.to_string()),
        (Value::Bool(b), "text" | "character varying") => Value::Text(b.to_string()),
        (Value::Text(s), "uuid") => Value::Uuid(parse_uuid(&s).ok_or(Undecided)?),
        (Value::Uuid(u), "uuid") => Value::Uuid(u),
        (Value::Text(s), "integer" | "bigint" | "smallint") => {
            let i: i64 = s.trim().parse().map_err(|_| Undecided)?;
            int_in_range(i, ty)?
        }
        (Value::Int(i), "integer" | "bigint" | "smallint") => int_in_range(i, ty)?,
        (Value::Bool(b), "boolean") => Value::Bool(b),
        (Value::Text(s), "boolean") => match s.as_str() {
            "true" | "t" => Value::Bool(true),
            "false" | "f" => Value::Bool(false),
            _ => return Err(Undecided),
        },
        _ => return Err(Undecided),
    })
}

fn int_in_range(i: i64, ty: &str) -> Eval<Value> {
    let ok = match ty {
        "smallint" => i16::try_from(i).is_ok(),
        "integer" => i32::try_from(i).is_ok(),
        _ => true,
    };
    if ok {
        Ok(Value::Int(i))
    } else {
        Err(Undecided)
    }
}

fn not(value: Value) -> Eval<Value> {
    match value {
        Value::Bool(b) => Ok(Value::Bool(!b)),
        Value::Null => Ok(Value::Null),
        _ => Err(Undecided),
    }
}

/// `=` for two values of the same modelled type; NULL if either is NULL.
fn equal(a: &Value, b: &Value) -> Eval<Value> {
    Ok(match (a, b) {
        (Value::Null, _) | (_, Value::Null) => Value::Null,
        (Value::Uuid(x), Value::Uuid(y)) => Value::Bool(x == y),
        // text equality under a deterministic collation is byte equality.
        (Value::Text(x), Value::Text(y)) => Value::Bool(x == y),
        (Value::Int(x), Value::Int(y)) => Value::Bool(x == y),
        (Value::Bool(x), Value::Bool(y)) => Value::Bool(x == y),
        _ => return Err(Undecided),
    })
}

/// Postgres's `uuid_in`: 32 hex digits, optionally in braces, with a hyphen allowed after any
/// group of four digits; any case.
fn parse_uuid(text: &str) -> Option<u128> {
    let inner = match text.strip_prefix('{') {
        Some(rest) => rest.strip_suffix('}')?,
        None => text,
    };
    let bytes = inner.as_bytes();
    let mut value: u128 = 0;
    let mut digits = 0;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c == b'-' {
            // After a group of four digits, not first, not last, not doubled.
            if digits == 0 || digits % 4 != 0 || digits == 32 {
                return None;
            }
            i += 1;
            if i >= bytes.len() || bytes[i] == b'-' {
                return None;
            }
            continue;
        }
        let d = (c as char).to_digit(16)?;
        value = (value << 4) | u128::from(d);
        digits += 1;
        if digits > 32 {
            return None;
        }
        i += 1;
    }
    (digits == 32).then_some(value)
}

fn format_uuid(u: u128) -> String {
    let h = format!("{u:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The policies of one table that apply to one role for SELECT.
#[derive(Clone, Debug, Default)]
pub struct TablePolicies {
    permissive: Vec<Expr>,
    restrictive: Vec<Expr>,
}

impl TablePolicies {
    /// Compiles `(permissive, pg_get_expr(polqual))` pairs; `None` when any one is outside the
    /// grammar (then the SQL check decides every row).
    pub fn compile(policies: &[(bool, Option<String>)]) -> Option<TablePolicies> {
        let mut compiled = TablePolicies::default();
        for (permissive, qual) in policies {
            let expr = parse(qual.as_deref()?).ok()?;
            if *permissive {
                compiled.permissive.push(expr);
            } else {
                compiled.restrictive.push(expr);
            }
        }
        Some(compiled)
    }

    /// Whether `caller` may read `row`: some permissive policy is true and every restrictive one
    /// is (no permissive policy: nothing is visible).
    pub fn decide(&self, row: &dyn Row, caller: &Caller) -> Result<bool, Undecided> {
        let mut any = false;
        let mut undecided = false;
        for expr in &self.permissive {
            match expr.eval(row, caller) {
                Ok(Value::Bool(true)) => {
                    any = true;
                    break;
                }
                Ok(_) => {}
                Err(Undecided) => undecided = true,
            }
        }
        if !any {
            // With an undecided permissive policy, the row may or may not be visible.
            return if undecided { Err(Undecided) } else { Ok(false) };
        }
        let mut all = true;
        for expr in &self.restrictive {
            match expr.eval(row, caller) {
                Ok(Value::Bool(true)) => {}
                Ok(_) => all = false,
                Err(Undecided) => undecided = true,
            }
        }
        // Postgres evaluates the combined quals in an order of its choosing; an undecided one
        // may be an error that hides the row entirely, so only an all-decided answer stands.
        if undecided { Err(Undecided) } else { Ok(all) }
    }
}

/// Why a policy expression is outside the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotModelled(pub String);

impl fmt::Display for NotModelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "policy not modelled: {}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Ident(String),
    /// A double-quoted identifier.
    Quoted(String),
    Str(String),
    Int(i64),
    Sym(&'static str),
}

fn tokenize(text: &str) -> Result<Vec<Token>, NotModelled> {
    let err = |m: &str| NotModelled(m.to_owned());
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' | b')' | b'[' | b']' | b',' | b'.' => {
                out.push(Token::Sym(match c {
                    b'(' => "(",
                    b')' => ")",
                    b'[' => "[",
                    b']' => "]",
                    b',' => ",",
                    _ => ".",
                }));
                i += 1;
            }
            b'\'' => {
                let mut s = Vec::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(err("unterminated string")),
                        Some(b'\'') if b.get(i + 1) == Some(&b'\'') => {
                            s.push(b'\'');
                            i += 2;
                        }
                        Some(b'\'') => {
                            i += 1;
                            break;
                        }
                        Some(&x) => {
                            s.push(x);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Str(
                    String::from_utf8(s).map_err(|_| err("string not UTF-8"))?,
                ));
            }
            b'"' => {
                let mut s = Vec::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Err(err("unterminated identifier")),
                        Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                            s.push(b'"');
                            i += 2;
                        }
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(&x) => {
                            s.push(x);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Quoted(
                    String::from_utf8(s).map_err(|_| err("identifier not UTF-8"))?,
                ));
            }
            b'0'..=b'9' => {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                if i < b.len() && (b[i] == b'.' || b[i].is_ascii_alphabetic()) {
                    return Err(err("non-integer number"));
                }
                let n = text[start..i]
                    .parse()
                    .map_err(|_| err("integer too large"))?;
                out.push(Token::Int(n));
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'$')
                {
                    i += 1;
                }
                out.push(Token::Ident(text[start..i].to_owned()));
            }
            _ => {
                let rest = &text[i..];
                let sym = ["->>", "->", "::", "<>", "="]
                    .into_iter()
                    .find(|s| rest.starts_with(s))
                    .ok_or_else(|| err(&format!("operator at {:?}", rest.chars().next())))?;
                out.push(Token::Sym(sym));
                i += sym.len();
            }
        }
    }
    Ok(out)
}

/// Parses the output of `pg_get_expr` (with an empty `search_path`) for a policy's `USING`.
pub fn parse(text: &str) -> Result<Expr, NotModelled> {
    let tokens = tokenize(text)?;
    let mut p = Parser { tokens, pos: 0 };
    let expr = p.or()?;
    if p.pos != p.tokens.len() {
        return Err(NotModelled(format!("trailing input in {text:?}")));
    }
    Ok(expr)
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn peek_at(&self, n: usize) -> Option<&Token> {
        self.tokens.get(self.pos + n)
    }

    fn fail<T>(&self, what: &str) -> Result<T, NotModelled> {
        Err(NotModelled(format!(
            "{what} at token {} ({:?})",
            self.pos,
            self.peek()
        )))
    }

    fn sym(&mut self, s: &str) -> bool {
        if matches!(self.peek(), Some(Token::Sym(x)) if *x == s) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, s: &str) -> Result<(), NotModelled> {
        if self.sym(s) {
            Ok(())
        } else {
            self.fail(&format!("expected {s}"))
        }
    }

    /// A keyword: unquoted, case-insensitive.
    fn keyword(&mut self, k: &str) -> bool {
        if matches!(self.peek(), Some(Token::Ident(x)) if x.eq_ignore_ascii_case(k)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn or(&mut self) -> Result<Expr, NotModelled> {
        let mut items = vec![self.and()?];
        while self.keyword("OR") {
            items.push(self.and()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Expr::Const(Literal::Null))
        } else {
            Expr::Or(items)
        })
    }

    fn and(&mut self) -> Result<Expr, NotModelled> {
        let mut items = vec![self.not()?];
        while self.keyword("AND") {
            items.push(self.not()?);
        }
        Ok(if items.len() == 1 {
            items.pop().unwrap_or(Expr::Const(Literal::Null))
        } else {
            Expr::And(items)
        })
    }

    fn not(&mut self) -> Result<Expr, NotModelled> {
        if self.keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.predicate()
    }

    fn predicate(&mut self) -> Result<Expr, NotModelled> {
        let left = self.term()?;
        if self.sym("=") {
            if self.keyword("ANY") {
                self.expect("(")?;
                if !self.keyword("ARRAY") {
                    return self.fail("expected ARRAY");
                }
                self.expect("[")?;
                let mut items = vec![self.term()?];
                while self.sym(",") {
                    items.push(self.term()?);
                }
                self.expect("]")?;
                self.expect(")")?;
                return Ok(Expr::EqAny(Box::new(left), items));
            }
            let right = self.term()?;
            return Ok(Expr::Eq(Box::new(left), Box::new(right)));
        }
        if self.sym("<>") {
            let right = self.term()?;
            return Ok(Expr::NotEq(Box::new(left), Box::new(right)));
        }
        if self.keyword("IS") {
            let negated = self.keyword("NOT");
            if !self.keyword("NULL") {
                return self.fail("expected NULL");
            }
            return Ok(Expr::IsNull(Box::new(left), negated));
        }
        Ok(left)
    }

    /// A primary with its postfix `::type`, `->` and `->>`.
    fn term(&mut self) -> Result<Expr, NotModelled> {
        let mut expr = self.primary()?;
        loop {
            if self.sym("::") {
                let ty = self.type_name()?;
                expr = Expr::Cast(Box::new(expr), ty);
            } else if self.sym("->>") {
                let key = self.json_key()?;
                expr = Expr::JsonGet(Box::new(expr), key, true);
            } else if self.sym("->") {
                let key = self.json_key()?;
                expr = Expr::JsonGet(Box::new(expr), key, false);
            } else {
                return Ok(expr);
            }
        }
    }

    /// `'key'::text`, the only key form the deparser writes for a text key.
    fn json_key(&mut self) -> Result<String, NotModelled> {
        let Some(Token::Str(key)) = self.peek().cloned() else {
            return self.fail("expected a text key");
        };
        self.pos += 1;
        self.expect("::")?;
        if !self.keyword("text") {
            return self.fail("expected a text key");
        }
        Ok(key)
    }

    fn type_name(&mut self) -> Result<String, NotModelled> {
        let Some(Token::Ident(first)) = self.peek().cloned() else {
            return self.fail("expected a type");
        };
        self.pos += 1;
        let name = if first.eq_ignore_ascii_case("character") && self.keyword("varying") {
            "character varying".to_owned()
        } else {
            first.to_ascii_lowercase()
        };
        // A qualified type, an array type or a typmod: not modelled.
        if matches!(self.peek(), Some(Token::Sym("." | "(" | "["))) {
            return self.fail("type with qualifier, modifier or array");
        }
        Ok(name)
    }

    fn primary(&mut self) -> Result<Expr, NotModelled> {
        match self.peek().cloned() {
            Some(Token::Sym("(")) => {
                self.pos += 1;
                // `( SELECT <constant term> AS name)`: a scalar subquery without FROM.
                if self.keyword("SELECT") {
                    let inner = self.term()?;
                    if inner.reads_row() {
                        return self.fail("subquery reading the row");
                    }
                    if self.keyword("AS") {
                        match self.peek() {
                            Some(Token::Ident(_) | Token::Quoted(_)) => self.pos += 1,
                            _ => return self.fail("expected an alias"),
                        }
                    }
                    self.expect(")")?;
                    return Ok(inner);
                }
                let inner = self.or()?;
                self.expect(")")?;
                Ok(inner)
            }
            Some(Token::Str(s)) => {
                self.pos += 1;
                Ok(Expr::Const(Literal::Unknown(s)))
            }
            Some(Token::Int(n)) => {
                self.pos += 1;
                Ok(Expr::Const(Literal::Int(n)))
            }
            Some(Token::Quoted(name)) => {
                self.pos += 1;
                if matches!(self.peek(), Some(Token::Sym("." | "("))) {
                    return self.fail("qualified name or function");
                }
                Ok(Expr::Column(name))
            }
            Some(Token::Ident(word)) => {
                // auth.uid() / auth.role() / auth.jwt()
                if word == "auth"
                    && matches!(self.peek_at(1), Some(Token::Sym(".")))
                    && matches!(self.peek_at(3), Some(Token::Sym("(")))
                    && matches!(self.peek_at(4), Some(Token::Sym(")")))
                {
                    let f = match self.peek_at(2) {
                        Some(Token::Ident(f)) if f == "uid" => Expr::Uid,
                        Some(Token::Ident(f)) if f == "role" => Expr::Role,
                        Some(Token::Ident(f)) if f == "jwt" => Expr::Jwt,
                        _ => return self.fail("function"),
                    };
                    self.pos += 5;
                    return Ok(f);
                }
                for (k, lit) in [
                    ("true", Literal::Bool(true)),
                    ("false", Literal::Bool(false)),
                    ("NULL", Literal::Null),
                ] {
                    if word.eq_ignore_ascii_case(k) {
                        self.pos += 1;
                        return Ok(Expr::Const(lit));
                    }
                }
                if RESERVED.iter().any(|k| word.eq_ignore_ascii_case(k)) {
                    return self.fail("keyword");
                }
                self.pos += 1;
                if matches!(self.peek(), Some(Token::Sym("." | "("))) {
                    return self.fail("qualified name or function");
                }
                // The deparser quotes any name that is not all lower case.
                Ok(Expr::Column(word))
            }
            _ => self.fail("unexpected token"),
        }
    }
}

/// Words that end or extend an expression and so are never a column here.
const RESERVED: &[&str] = &[
    "AND", "OR", "NOT", "IS", "ANY", "ALL", "ARRAY", "SELECT", "AS", "CASE", "EXISTS", "IN",
    "LIKE", "ILIKE", "SIMILAR", "BETWEEN", "FROM", "WHERE", "COLLATE", "DISTINCT", "ROW",
];

impl Expr {
    fn reads_row(&self) -> bool {
        match self {
            Expr::Column(_) => true,
            Expr::Const(_) | Expr::Uid | Expr::Role | Expr::Jwt => false,
            Expr::Cast(e, _) | Expr::JsonGet(e, _, _) | Expr::Not(e) | Expr::IsNull(e, _) => {
                e.reads_row()
            }
            Expr::Eq(a, b) | Expr::NotEq(a, b) => a.reads_row() || b.reads_row(),
            Expr::EqAny(a, items) => a.reads_row() || items.iter().any(Expr::reads_row),
            Expr::And(items) | Expr::Or(items) => items.iter().any(Expr::reads_row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct TestRow(HashMap<&'static str, (Option<&'static str>, &'static str)>);

    impl Row for TestRow {
        fn cell(&self, column: &str) -> Option<Cell<'_>> {
            self.0.get(column).map(|(v, ty)| match v {
                Some(v) => Cell::Text(v, ty),
                None => Cell::Null,
            })
        }
    }

    const A: &str = "5b2d1c8e-4f0a-4c5e-9a57-3f1e2d9c8b70";
    const B: &str = "0f0e0d0c-0b0a-4908-8706-050403020100";

    fn functions() -> AuthFunctions {
        AuthFunctions {
            uid: Some(UidForm::ClaimThenClaims),
            role: Some(UidForm::ClaimThenClaims),
            jwt: true,
        }
    }

    fn caller(sub: Option<&str>, extra: serde_json::Value) -> Caller<'static> {
        let mut claims = serde_json::Map::new();
        if let Some(sub) = sub {
            claims.insert("sub".into(), sub.into());
        }
        if let serde_json::Value::Object(m) = extra {
            claims.extend(m);
        }
        // Leaked: a few small maps per test run.
        let claims: &'static serde_json::Value =
            Box::leak(Box::new(serde_json::Value::Object(claims)));
        Caller::new(&functions(), "authenticated", claims, sub)
    }

    fn row(cells: &[(&'static str, Option<&'static str>, &'static str)]) -> TestRow {
        TestRow(cells.iter().map(|(n, v, t)| (*n, (*v, *t))).collect())
    }

    fn decide(quals: &[&str], row: &dyn Row, caller: &Caller) -> Result<bool, Undecided> {
        let policies: Vec<_> = quals.iter().map(|q| (true, Some(q.to_string()))).collect();
        TablePolicies::compile(&policies)
            .expect("compiles")
            .decide(row, caller)
    }

    #[test]
    fn deparsed_policies_parse() {
        for q in [
            "(auth.uid() IS NOT NULL)",
            "(auth.uid() = user_id)",
            "true",
            "(is_public OR (user_id = auth.uid()))",
            "(auth.uid() = ANY (ARRAY[sender_id, recipient_id]))",
            "(( SELECT auth.uid() AS uid) = user_id)",
            "((auth.jwt() ->> 'email'::text) = email)",
            "(((auth.jwt() -> 'app_metadata'::text) ->> 'role'::text) = 'admin'::text)",
            "(auth.role() = 'authenticated'::text)",
            "((room)::text = 'lobby'::text)",
            "(NOT hidden)",
            "(\"OwnerId\" = auth.uid())",
            "((room_id IS NOT NULL) AND (room_id <> 'secret'::text))",
            "(n = 1)",
        ] {
            parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
        }
    }

    #[test]
    fn outside_the_grammar_is_refused() {
        for q in [
            "(EXISTS ( SELECT 1 FROM room_members m WHERE ((m.room_id = messages.room_id) AND (m.user_id = auth.uid()))))",
            "(user_id = public.current_user_id())",
            "(name ~~ 'a%'::text)",
            "(created_at > (now() - '1 day'::interval))",
            "(id IN ( SELECT x.id FROM x))",
            "(( SELECT t.user_id FROM t) = auth.uid())",
            "(x = 1.5)",
            "(x OPERATOR(public.=) y)",
            "((room)::character varying(10) = 'a'::text)",
            "(auth.uid() = ANY (members))",
            "(CASE WHEN a THEN b ELSE c END)",
        ] {
            assert!(
                TablePolicies::compile(&[(true, Some(q.to_owned()))]).is_none(),
                "{q} should not compile"
            );
        }
        assert!(TablePolicies::compile(&[(true, None)]).is_none());
    }

    #[test]
    fn owner_policy() {
        let r = row(&[("user_id", Some(A), "uuid")]);
        let q = ["(auth.uid() = user_id)"];
        assert_eq!(
            decide(&q, &r, &caller(Some(A), serde_json::json!({}))),
            Ok(true)
        );
        assert_eq!(
            decide(
                &q,
                &r,
                &caller(Some(&A.to_uppercase()), serde_json::json!({}))
            ),
            Ok(true)
        );
        assert_eq!(
            decide(&q, &r, &caller(Some(B), serde_json::json!({}))),
            Ok(false)
        );
        // No sub: auth.uid() is NULL, the comparison NULL, the row hidden.
        assert_eq!(
            decide(&q, &r, &caller(None, serde_json::json!({}))),
            Ok(false)
        );
        // A sub that is not a UUID is an error in Postgres: the SQL check decides.
        assert_eq!(
            decide(&q, &r, &caller(Some("user-1"), serde_json::json!({}))),
            Err(Undecided)
        );
        let null = row(&[("user_id", None, "uuid")]);
        assert_eq!(
            decide(&q, &null, &caller(Some(A), serde_json::json!({}))),
            Ok(false)
        );
    }

    #[test]
    fn three_valued_logic() {
        let q = ["(is_public OR (user_id = auth.uid()))"];
        let public = row(&[
            ("is_public", Some("t"), "bool"),
            ("user_id", Some(B), "uuid"),
        ]);
        let private = row(&[
            ("is_public", Some("f"), "bool"),
            ("user_id", Some(B), "uuid"),
        ]);
        let unknown = row(&[("is_public", None, "bool"), ("user_id", Some(A), "uuid")]);
        let anon = caller(None, serde_json::json!({}));
        assert_eq!(decide(&q, &public, &anon), Ok(true));
        assert_eq!(decide(&q, &private, &anon), Ok(false));
        assert_eq!(
            decide(&q, &unknown, &caller(Some(A), serde_json::json!({}))),
            Ok(true)
        );
        assert_eq!(decide(&q, &unknown, &anon), Ok(false));
        let not = ["(NOT hidden)"];
        assert_eq!(
            decide(&not, &row(&[("hidden", None, "bool")]), &anon),
            Ok(false)
        );
        assert_eq!(
            decide(&not, &row(&[("hidden", Some("f"), "bool")]), &anon),
            Ok(true)
        );
    }

    #[test]
    fn any_and_jwt_and_role() {
        let q = ["(auth.uid() = ANY (ARRAY[sender_id, recipient_id]))"];
        let r = row(&[
            ("sender_id", Some(B), "uuid"),
            ("recipient_id", None, "uuid"),
        ]);
        assert_eq!(
            decide(&q, &r, &caller(Some(B), serde_json::json!({}))),
            Ok(true)
        );
        assert_eq!(
            decide(&q, &r, &caller(Some(A), serde_json::json!({}))),
            Ok(false)
        );

        let q = ["(((auth.jwt() -> 'app_metadata'::text) ->> 'team'::text) = team)"];
        let r = row(&[("team", Some("red"), "text")]);
        let red = caller(
            Some(A),
            serde_json::json!({"app_metadata": {"team": "red"}}),
        );
        let blue = caller(
            Some(A),
            serde_json::json!({"app_metadata": {"team": "blue"}}),
        );
        let none = caller(Some(A), serde_json::json!({}));
        assert_eq!(decide(&q, &r, &red), Ok(true));
        assert_eq!(decide(&q, &r, &blue), Ok(false));
        assert_eq!(decide(&q, &r, &none), Ok(false));

        let q = ["(auth.role() = 'authenticated'::text)"];
        assert_eq!(decide(&q, &r, &none), Ok(true));
    }

    #[test]
    fn restrictive_policies_and_default_deny() {
        let r = row(&[("user_id", Some(A), "uuid"), ("hidden", Some("t"), "bool")]);
        let me = caller(Some(A), serde_json::json!({}));
        let both = TablePolicies::compile(&[
            (true, Some("(auth.uid() = user_id)".into())),
            (false, Some("(NOT hidden)".into())),
        ])
        .expect("compiles");
        assert_eq!(both.decide(&r, &me), Ok(false));
        let none = TablePolicies::compile(&[]).expect("compiles");
        assert_eq!(none.decide(&r, &me), Ok(false));
    }

    #[test]
    fn types_not_modelled_are_undecided() {
        let me = caller(Some(A), serde_json::json!({}));
        let r = row(&[("code", Some("abc  "), "bpchar")]);
        assert_eq!(decide(&["(code = 'abc'::bpchar)"], &r, &me), Err(Undecided));
        assert_eq!(decide(&["(code IS NOT NULL)"], &r, &me), Ok(true));
        // An unchanged TOAST value is unknown.
        struct Toast;
        impl Row for Toast {
            fn cell(&self, _: &str) -> Option<Cell<'_>> {
                Some(Cell::Unknown)
            }
        }
        assert_eq!(
            decide(&["(body IS NOT NULL)"], &row(&[]), &me),
            Err(Undecided)
        );
        assert_eq!(decide(&["(body IS NOT NULL)"], &Toast, &me), Err(Undecided));
    }

    #[test]
    fn uuid_input_like_postgres() {
        let canonical = parse_uuid(A).expect("canonical");
        for ok in [
            "5B2D1C8E-4F0A-4C5E-9A57-3F1E2D9C8B70",
            "{5b2d1c8e-4f0a-4c5e-9a57-3f1e2d9c8b70}",
            "5b2d1c8e4f0a4c5e9a573f1e2d9c8b70",
            "5b2d-1c8e-4f0a-4c5e-9a57-3f1e-2d9c-8b70",
        ] {
            assert_eq!(parse_uuid(ok), Some(canonical), "{ok}");
        }
        for bad in [
            "5b2d1c8e-4f0a-4c5e-9a57-3f1e2d9c8b7",
            "-5b2d1c8e4f0a4c5e9a573f1e2d9c8b70",
            "5b2d1c8e4f0a4c5e9a573f1e2d9c8b70-",
            "5b2d1c8e--4f0a4c5e9a573f1e2d9c8b70",
            "5b2d1c8e4f0a4c5e9a573f1e2d9c8b70a",
            "{5b2d1c8e4f0a4c5e9a573f1e2d9c8b70",
            "",
        ] {
            assert_eq!(parse_uuid(bad), None, "{bad}");
        }
        assert_eq!(format_uuid(canonical), A);
    }

    #[test]
    fn auth_function_bodies() {
        let f = AuthFunctions::recognise(
            Some(
                "\n  select\n  coalesce(\n    nullif(current_setting('request.jwt.claim.sub', true), ''),\n    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')\n  )::uuid\n",
            ),
            Some("select nullif(current_setting('request.jwt.claim.role', true), '')::text;"),
            Some(
                "select coalesce(nullif(current_setting('request.jwt.claim', true), ''), nullif(current_setting('request.jwt.claims', true), ''))::jsonb",
            ),
        );
        assert_eq!(
            f,
            AuthFunctions {
                uid: Some(UidForm::ClaimThenClaims),
                role: Some(UidForm::ClaimOnly),
                jwt: true
            }
        );
        let g = AuthFunctions::recognise(
            Some("select '00000000-0000-0000-0000-000000000000'::uuid"),
            None,
            None,
        );
        assert_eq!(g, AuthFunctions::default());
    }
}
