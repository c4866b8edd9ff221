//! Entry points for the fuzz targets (`fuzz/`): the two parsers that take outside input, with
//! their results exercised, so a panic anywhere on the way is found.

use super::filter::{self, Condition, Kind};
use super::policy::{AuthFunctions, Caller, Cell, Row, TablePolicies, UidForm};

/// A `postgres_changes` filter from a client: parsed, each condition compiled for every kind of
/// column, and evaluated on a few values.
pub fn filter(text: &str) {
    let Ok(conditions) = filter::parse(text) else {
        return;
    };
    let kinds = [
        Kind::Int,
        Kind::Float,
        Kind::Numeric,
        Kind::Bool,
        Kind::Text,
        Kind::Bpchar,
        Kind::CiText,
        Kind::Uuid,
        Kind::Timestamp,
        Kind::TimestampTz,
        Kind::Date,
        Kind::Time,
        Kind::TimeTz,
        Kind::Json,
        Kind::Enum(std::sync::Arc::from(vec!["a".to_owned(), "b".to_owned()])),
        Kind::Other,
    ];
    for raw in &conditions {
        for kind in &kinds {
            if let Ok(condition) = Condition::compile(raw, kind.clone()) {
                evaluate(&condition, text);
            }
        }
    }
}

fn evaluate(condition: &Condition, text: &str) {
    for value in [
        None,
        Some(text),
        Some("1"),
        Some("-0.5e3"),
        Some("t"),
        Some("2024-01-02 03:04:05.678+01"),
        Some("00000000-0000-0000-0000-000000000001"),
        Some(""),
    ] {
        let _ = condition.matches(value);
    }
}

/// A policy expression as `pg_get_expr` prints it (from the database): compiled, and decided
/// for a row and a caller whose values come from the input too.
pub fn policy(text: &str) {
    let policies = [
        (true, Some(text.to_owned())),
        (false, Some(text.to_owned())),
    ];
    for set in [&policies[..1], &policies[1..], &policies[..]] {
        let Some(compiled) = TablePolicies::compile(set) else {
            continue;
        };
        let claims = serde_json::json!({"sub": text, "role": "authenticated", "email": text});
        for functions in [
            AuthFunctions {
                uid: Some(UidForm::ClaimOnly),
                role: Some(UidForm::ClaimOnly),
                jwt: true,
            },
            AuthFunctions {
                uid: Some(UidForm::ClaimThenClaims),
                role: Some(UidForm::ClaimThenClaims),
                jwt: true,
            },
        ] {
            let caller = Caller::new(&functions, "authenticated", &claims, Some(text));
            let _ = compiled.decide(&AnyRow(text), &caller);
        }
    }
}

/// A row whose every column holds `text` (as text, uuid, integer and boolean by name).
struct AnyRow<'a>(&'a str);

impl Row for AnyRow<'_> {
    fn cell(&self, column: &str) -> Option<Cell<'_>> {
        let type_name = match column.len() % 5 {
            0 => "text",
            1 => "uuid",
            2 => "int8",
            3 => "bool",
            _ => return Some(Cell::Null),
        };
        Some(Cell::Text(self.0, type_name))
    }
}

#[cfg(test)]
mod tests {
    /// The fuzz entry points on a seed corpus: real shapes and broken ones.
    #[test]
    fn seeds_never_panic() {
        for text in [
            "id=eq.1",
            "name=in.(a,\"b,c\",d)",
            "id=gt.5,name=neq.x",
            "v=match.^a.*$",
            "d=gte.2024-01-01",
            "x=is.null",
            "x=not.in.()",
            "=eq.",
            "a=in.(\"",
            "a=eq.\u{0}\u{ffff}",
            "",
        ] {
            super::filter(text);
        }
        for text in [
            "(auth.uid() = user_id)",
            "((is_public = true) OR (( SELECT auth.uid() AS uid) = owner))",
            "((auth.jwt() ->> 'email'::text) = email)",
            "(auth.role() = 'authenticated'::text)",
            "(NOT hidden)",
            "(user_id = ANY (ARRAY[auth.uid()]))",
            "((((",
            "('",
            "(a = )",
            "",
        ] {
            super::policy(text);
        }
    }
}
