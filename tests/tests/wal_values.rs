//! Golden test of Postgres text → JSON: for every type, the JSON the listener's values produce must
//! equal what the test database's own `to_jsonb` returns for the same stored value (protocol.md §7.6).
//! Numbers are compared token by token as text too, so `numeric` precision is checked exactly.
//! One deliberate exception, from protocol.md: top-level `bytea` is hex without `\x` (Realtime ≥ 2.76.6),
//! compared with `to_jsonb(encode(x, 'hex'))`.

mod wal_common;

use std::collections::HashMap;

use realtime_wal_listener::{Change, TupleValue, value};
use serde_json::Value;
use wal_common::{config, db, start_ready};

const CASES: &[(&str, &[&str])] = &[
    ("int2", &["0", "-32768", "32767"]),
    ("int4", &["0", "-2147483648", "2147483647"]),
    ("int8", &["9223372036854775807", "-9223372036854775808"]),
    ("oid", &["0", "4294967295"]),
    (
        "float4",
        &[
            "1.5",
            "-0",
            "NaN",
            "Infinity",
            "-Infinity",
            "3.4028235e+38",
            "1e-45",
            "0.1",
        ],
    ),
    (
        "float8",
        &[
            "0.1",
            "1e100",
            "-1.7976931348623157e+308",
            "NaN",
            "Infinity",
            "5e-324",
            "-0",
        ],
    ),
    (
        "numeric",
        &[
            "12.3400",
            "NaN",
            "123456789012345678901234567890.123456789012345678901234567890",
            "-0.000001",
            "Infinity",
            "-Infinity",
            "1e-20",
            "0",
        ],
    ),
    ("numeric(10,2)", &["1.5", "-99999999.99"]),
    ("bool", &["true", "false"]),
    (
        "text",
        &[
            "hello",
            "quote \" backslash \\ nl \n tab \t cr \r",
            "unicode é 日本 🎉",
            "",
            "ctl \u{1} \u{1f}",
        ],
    ),
    ("varchar(20)", &["short"]),
    ("char(5)", &["ab"]),
    ("\"char\"", &["x"]),
    ("name", &["a_name"]),
    ("uuid", &["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
    (
        "json",
        &[
            r#"{"b": 1, "a": [1, 2.50, "x", null, true]}"#,
            "[]",
            "\"str\"",
            "3.14159265358979323846264338327950288",
            "null",
            r#"{"nested": {"deep": [{"k": "v\"q"}]}}"#,
        ],
    ),
    (
        "jsonb",
        &[
            r#"{"b": 1, "a": [1, 2.50, "x", null, true]}"#,
            "[]",
            "\"str\"",
            "3.14159265358979323846264338327950288",
            "false",
            "{}",
        ],
    ),
    (
        "timestamp",
        &[
            "2025-01-01 12:00:00.123456",
            "2025-01-01 00:00:00",
            "infinity",
            "-infinity",
            "0044-03-15 12:00:00 BC",
            "1999-12-31 23:59:59.5",
        ],
    ),
    (
        "timestamptz",
        &[
            "2025-01-01 12:00:00.123456+00",
            "2025-06-01 12:00:00+05:30",
            "infinity",
            "1900-01-01 00:00:00+00",
            "0044-03-15 12:00:00+00 BC",
        ],
    ),
    (
        "date",
        &["2025-01-01", "infinity", "-infinity", "0044-03-15 BC"],
    ),
    ("time", &["12:00:00", "23:59:59.999999"]),
    ("timetz", &["12:00:00+00", "12:00:00-03:30"]),
    ("interval", &["1 day 02:03:04", "-1 year", "00:00:00.5"]),
    (
        "int4[]",
        &[
            "{1,2,NULL}",
            "{}",
            "{{1,2},{3,4}}",
            "[0:1]={5,6}",
            "{{{1}},{{2}}}",
        ],
    ),
    (
        "text[]",
        &[
            r#"{"a b","x\"y","NULL",NULL,"{}",",","back\\slash"}"#,
            r#"{plain,""," lead"}"#,
            r#"{{a,b},{c,d}}"#,
            r#"{"é 日本"}"#,
        ],
    ),
    ("varchar[]", &["{a,b}"]),
    ("jsonb[]", &[r#"{"{\"a\": 1.50}","[1, 2]",NULL,"\"s\""}"#]),
    ("json[]", &[r#"{"{\"a\": 1.50}","3"}"#]),
    (
        "numeric[]",
        &["{1.50,NaN,-3,123456789012345678901234567890.5}"],
    ),
    ("float8[]", &["{NaN,Infinity,-Infinity,1.5,-0}"]),
    ("int8[]", &["{9223372036854775807}"]),
    ("bool[]", &["{t,f,NULL}"]),
    (
        "timestamptz[]",
        &[r#"{"2025-01-01 12:00:00+00",infinity,NULL}"#],
    ),
    ("timestamp[]", &[r#"{"2025-01-01 12:00:00.5"}"#]),
    ("date[]", &["{2025-01-01,infinity}"]),
    ("uuid[]", &["{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"]),
    ("bytea[]", &[r#"{"\\x0102ff",NULL}"#]),
    ("time[]", &["{12:00:00}"]),
    ("interval[]", &[r#"{"1 day"}"#]),
    ("mood", &["happy", "so-so"]),
    ("mood[]", &["{happy,sad,so-so}"]),
    ("posint", &["5"]),
    ("posint[]", &["{5,6}"]),
    ("shorttext", &["hi \"there\""]),
    ("price", &["1.230"]),
    ("point", &["(1,2)"]),
    ("box", &["(3,3),(1,1)"]),
    ("box[]", &["{(1,1),(0,0);(3,3),(2,2)}"]),
    ("inet", &["192.168.0.1/24", "::1"]),
    ("cidr", &["10.0.0.0/8"]),
    ("macaddr", &["08:00:2b:01:02:03"]),
    ("money", &["12.34"]),
    ("int4range", &["[1,5)", "empty"]),
    (
        "tstzrange",
        &["[2025-01-01 00:00:00+00,2025-02-01 00:00:00+00)"],
    ),
    ("tsvector", &["a fat cat"]),
    ("bit(3)", &["101"]),
    ("varbit", &["1"]),
    ("xml", &["<a>b</a>"]),
    ("int2vector", &["1 2"]),
    ("citext_like", &["MiXeD"]),
];

/// Number tokens outside strings, sorted (jsonb reorders object keys).
fn number_tokens(json: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut in_string = false;
    let mut escaped = false;
    let mut current = String::new();
    for c in json.chars() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        if c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E') {
            current.push(c);
            continue;
        }
        if !current.is_empty() {
            tokens.push(std::mem::take(&mut current));
        }
        if c == '"' {
            in_string = true;
        }
    }
    if !current.is_empty() {
        tokens.push(current);
    }
    tokens.retain(|t| t.chars().any(|c| c.is_ascii_digit()));
    tokens.sort();
    tokens
}

#[tokio::test]
async fn values_match_postgres_to_jsonb() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute(
        "CREATE TYPE mood AS ENUM ('happy', 'sad', 'so-so');
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE DOMAIN shorttext AS text;
         CREATE DOMAIN price AS numeric(10,3);
         CREATE DOMAIN citext_like AS varchar(50);",
    )
    .await?;
    for (i, (ty, _)) in CASES.iter().enumerate() {
        c.batch_execute(&format!("CREATE TABLE v{i} (id int PRIMARY KEY, x {ty})"))
            .await?;
    }
    let mut l = start_ready(config(&db.url, "values")).await?;
    for (i, (ty, values)) in CASES.iter().enumerate() {
        let sql = format!("INSERT INTO v{i} VALUES ($1, $2::text::{ty})");
        for (j, v) in values.iter().enumerate() {
            c.execute(&sql, &[&(j as i32), v]).await?;
        }
        // A NULL too.
        c.execute(&sql, &[&(values.len() as i32), &None::<&str>])
            .await?;
    }

    // Ours, per (table, id).
    let total: usize = CASES.iter().map(|(_, v)| v.len() + 1).sum();
    let mut ours: HashMap<(String, i32), (String, String)> = HashMap::new();
    while ours.len() < total {
        let tx = l.next().await?;
        for ch in &tx.changes {
            let Change::Insert { relation, new } = ch else {
                continue;
            };
            let id: i32 = new[0].as_str().unwrap_or_default().parse()?;
            let col = &relation.columns[1];
            let mut out = Vec::new();
            match &new[1] {
                TupleValue::Null => out.extend_from_slice(b"null"),
                v => value::write_json(&mut out, &col.pg_type.kind, v.as_str().unwrap_or_default()),
            }
            ours.insert(
                (relation.table.clone(), id),
                (String::from_utf8(out)?, col.pg_type.name.clone()),
            );
        }
    }

    let mut failures = Vec::new();
    for (i, (ty, values)) in CASES.iter().enumerate() {
        let table = format!("v{i}");
        let expr = if *ty == "bytea" {
            "to_jsonb(encode(x, 'hex'))"
        } else {
            "to_jsonb(x)"
        };
        let rows = c
            .query(
                &format!("SELECT id, {expr}::text, pg_typeof(x)::text FROM {table} ORDER BY id"),
                &[],
            )
            .await?;
        assert_eq!(rows.len(), values.len() + 1);
        for row in rows {
            let id: i32 = row.get(0);
            let expected: String = row
                .get::<_, Option<String>>(1)
                .unwrap_or_else(|| "null".into());
            let (got, _type_name) = &ours[&(table.clone(), id)];
            let same_value = serde_json::from_str::<Value>(got).ok()
                == serde_json::from_str::<Value>(&expected).ok();
            let same_numbers = number_tokens(got) == number_tokens(&expected);
            if !(same_value && same_numbers) {
                let input = values.get(id as usize).copied().unwrap_or("NULL");
                failures.push(format!("{ty} {input:?}: ours {got} vs to_jsonb {expected}"));
            }
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));

    // Column type names are pg_type.typname, as Realtime's `columns` needs.
    let names: HashMap<String, String> = ours
        .iter()
        .map(|((t, _), (_, n))| (t.clone(), n.clone()))
        .collect();
    let name_of = |ty: &str| {
        let i = CASES.iter().position(|(t, _)| *t == ty).expect("case");
        names[&format!("v{i}")].clone()
    };
    assert_eq!(name_of("int4[]"), "_int4");
    assert_eq!(name_of("varchar(20)"), "varchar");
    assert_eq!(name_of("mood"), "mood");
    assert_eq!(name_of("posint"), "posint");
    assert_eq!(name_of("timestamptz"), "timestamptz");
    l.stop().await
}

#[tokio::test]
async fn top_level_bytea_is_hex_without_prefix() -> anyhow::Result<()> {
    let (db, c) = db().await?;
    c.batch_execute("CREATE TABLE b (id int PRIMARY KEY, x bytea)")
        .await?;
    let mut l = start_ready(config(&db.url, "bytea")).await?;
    c.batch_execute("INSERT INTO b VALUES (1, '\\x0102ff'::bytea)")
        .await?;
    let tx = l.next().await?;
    let Change::Insert { relation, new } = &tx.changes[0] else {
        panic!()
    };
    let mut out = Vec::new();
    relation.write_record_json(&mut out, new, false);
    let expected: String = c
        .query_one(
            "SELECT json_build_object('id', id, 'x', encode(x, 'hex'))::text FROM b",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(
        serde_json::from_slice::<Value>(&out)?,
        serde_json::from_str::<Value>(&expected)?
    );
    l.stop().await
}
