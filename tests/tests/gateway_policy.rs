//! Row policies evaluated in process, with Postgres as the oracle: for many policies, rows and
//! callers, every decision the gateway's evaluator makes must equal what `select` answers as that
//! role with those claims (the SQL check). Undecided is always allowed (the SQL check then runs),
//! but the modelled shapes must be decided.

use realtime_gateway::changes::policy::{AuthFunctions, Caller, Cell, Row, TablePolicies};
use realtime_tests::postgres::cluster;
use serde_json::{Value, json};
use std::collections::HashMap;

const ROLES_AND_AUTH: &str = include_str!("../../supabase/migrations/0001_roles_and_auth.sql");

const A: &str = "5b2d1c8e-4f0a-4c5e-9a57-3f1e2d9c8b70";
const B: &str = "0f0e0d0c-0b0a-4908-8706-050403020100";

/// The policy sets: (permissive, USING) lists, and whether every row must be decided for the
/// callers whose `sub` is a UUID or absent.
fn policy_sets() -> Vec<(Vec<(bool, &'static str)>, bool)> {
    vec![
        (vec![(true, "auth.uid() is not null")], true),
        (vec![(true, "auth.uid() = user_id")], true),
        (vec![(true, "user_id = (select auth.uid())")], true),
        (vec![(true, "is_public or user_id = auth.uid()")], true),
        (vec![(true, "auth.uid() in (user_id, other_id)")], true),
        (vec![(true, "true")], true),
        (vec![(true, "room is not null and room <> 'secret'")], true),
        (vec![(true, "not hidden")], true),
        (vec![(true, "n = 1"), (true, "team = 'red'")], true),
        (vec![(true, "code = 'abc'")], true),
        (vec![(true, "(auth.jwt() ->> 'email') = email")], true),
        (
            vec![(true, "(auth.jwt() -> 'app_metadata' ->> 'team') = team")],
            true,
        ),
        (vec![(true, "auth.role() = 'authenticated'")], true),
        (vec![(true, "user_id::text = auth.uid()::text")], true),
        (
            vec![(true, "auth.uid() = user_id"), (false, "not hidden")],
            true,
        ),
        (
            vec![(true, "true"), (false, "team = 'red' or team is null")],
            true,
        ),
        // Not modelled: every row goes to SQL.
        (
            vec![(
                true,
                "exists (select 1 from public.members m where m.user_id = auth.uid() and m.team = t.team)",
            )],
            false,
        ),
        (vec![(true, "created_at > now() - interval '1 day'")], false),
        (vec![(true, "email like '%@example.com'")], false),
    ]
}

fn callers() -> Vec<(&'static str, Value)> {
    vec![
        (
            "authenticated",
            json!({"sub": A, "role": "authenticated", "email": "a@example.com", "app_metadata": {"team": "red"}}),
        ),
        (
            "authenticated",
            json!({"sub": B, "role": "authenticated", "email": "b@example.com", "app_metadata": {"team": "blue"}}),
        ),
        (
            "authenticated",
            json!({"sub": A.to_uppercase(), "role": "authenticated"}),
        ),
        ("authenticated", json!({"role": "authenticated"})),
        ("anon", json!({"role": "anon"})),
        (
            "authenticated",
            json!({"sub": "not-a-uuid", "role": "authenticated"}),
        ),
        (
            "authenticated",
            json!({"sub": A, "role": "authenticated", "app_metadata": {"team": 3}}),
        ),
    ]
}

struct TextRow(HashMap<String, (Option<String>, String)>);

impl Row for TextRow {
    fn cell(&self, column: &str) -> Option<Cell<'_>> {
        self.0.get(column).map(|(v, ty)| match v {
            Some(v) => Cell::Text(v, ty),
            None => Cell::Null,
        })
    }
}

#[tokio::test]
async fn policies_decided_in_process_agree_with_postgres() -> anyhow::Result<()> {
    let db = cluster().await.fresh_database().await?;
    let client = db.client().await?;
    client.batch_execute(ROLES_AND_AUTH).await?;
    client
        .batch_execute(
            "create table public.members (user_id uuid, team text);
             insert into public.members values ('5b2d1c8e-4f0a-4c5e-9a57-3f1e2d9c8b70', 'red');
             grant select on public.members to anon, authenticated;
             create table public.t (
               id int primary key, user_id uuid, other_id uuid, is_public bool, hidden bool,
               room text, team text, n int, code varchar, email text,
               created_at timestamptz default now());
             alter table public.t enable row level security;
             grant select on public.t to anon, authenticated;",
        )
        .await?;
    // Rows covering NULLs and each value the policies compare.
    let uuids = [Some(A), Some(B), None];
    let bools = [Some(true), Some(false), None];
    let mut id = 0;
    for user in uuids {
        for other in [Some(B), None] {
            for flag in bools {
                id += 1;
                let room = ["lobby", "secret"][id % 2];
                let team = [Some("red"), Some("blue"), None][id % 3];
                let n = [Some(1), Some(2), None][(id / 3) % 3];
                let code = ["abc", "ABC", "abc "][id % 3];
                let email = ["a@example.com", "b@example.com"][(id / 2) % 2];
                client
                    .execute(
                        "insert into public.t (id, user_id, other_id, is_public, hidden, room, team, n, code, email)
                         values ($1, $2::text::uuid, $3::text::uuid, $4, $5, $6, $7, $8, $9, $10)",
                        &[&(id as i32), &user, &other, &flag, &flag.map(|f| !f), &room, &team, &n, &code, &email],
                    )
                    .await?;
            }
        }
    }
    // The rows as the WAL would give them: text output and typname per column.
    let columns: Vec<(String, String)> = client
        .query(
            "select a.attname::text, t.typname::text from pg_attribute a join pg_type t on t.oid = a.atttypid
              where a.attrelid = 'public.t'::regclass and a.attnum > 0 and not a.attisdropped order by a.attnum",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let select_text = columns
        .iter()
        // The type's output function, as pgoutput writes it (`bool::text` would say `true`).
        .map(|(c, _)| format!("case when {c} is null then null else format('%s', {c}) end"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows: Vec<(i32, TextRow)> = client
        .query(
            &format!("select id, {select_text} from public.t order by 1"),
            &[],
        )
        .await?
        .iter()
        .map(|r| {
            let cells = columns
                .iter()
                .enumerate()
                .map(|(i, (c, ty))| (c.clone(), (r.get::<_, Option<String>>(i + 1), ty.clone())))
                .collect();
            (r.get(0), TextRow(cells))
        })
        .collect();

    let body = |name: &str| {
        let client = &client;
        let name = name.to_owned();
        async move {
            client
                .query_opt(
                    "select p.prosrc from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                      where n.nspname = 'auth' and p.proname = $1",
                    &[&name],
                )
                .await
                .map(|r| r.map(|r| r.get::<_, String>(0)))
        }
    };
    let functions = AuthFunctions::recognise(
        body("uid").await?.as_deref(),
        body("role").await?.as_deref(),
        body("jwt").await?.as_deref(),
    );
    assert!(functions.uid.is_some() && functions.role.is_some() && functions.jwt);

    let mut decided = 0;
    let mut undecided = 0;
    for (set, (policies, modelled)) in policy_sets().into_iter().enumerate() {
        client
            .batch_execute(
                "do $$ declare p record; begin
                   for p in select polname from pg_policy where polrelid = 'public.t'::regclass loop
                     execute format('drop policy %I on public.t', p.polname);
                   end loop; end $$;",
            )
            .await?;
        for (i, (permissive, using)) in policies.iter().enumerate() {
            let kind = if *permissive {
                "permissive"
            } else {
                "restrictive"
            };
            client
                .batch_execute(&format!(
                    "create policy p{i} on public.t as {kind} for select to anon, authenticated using ({using})"
                ))
                .await?;
        }
        // Deparsed as the gateway reads them.
        client.batch_execute("set search_path to ''").await?;
        let deparsed: Vec<(bool, Option<String>)> = client
            .query(
                "select polpermissive, pg_get_expr(polqual, polrelid) from pg_catalog.pg_policy
                  where polrelid = 'public.t'::regclass order by polname",
                &[],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        client.batch_execute("reset search_path").await?;
        let compiled = TablePolicies::compile(&deparsed);
        assert_eq!(
            compiled.is_some(),
            modelled,
            "set {set}: {deparsed:?} compiled: {}",
            compiled.is_some()
        );
        let Some(compiled) = compiled else {
            continue;
        };
        for (role, claims) in callers() {
            let sub = claims.get("sub").and_then(Value::as_str);
            let caller = Caller::new(&functions, role, &claims, sub);
            // The SQL check, as the gateway runs it.
            client.batch_execute("begin").await?;
            client
                .execute(
                    "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true),
                            set_config('request.jwt.claim.sub', $3, true), set_config('request.jwt.claim.role', $1, true)",
                    &[&role, &claims.to_string(), &sub.unwrap_or_default()],
                )
                .await?;
            let truth = client.query("select id from public.t", &[]).await;
            client.batch_execute("rollback").await?;
            let truth: Option<Vec<i32>> = truth
                .ok()
                .map(|rows| rows.iter().map(|r| r.get(0)).collect());
            let sub_is_uuid_or_absent = sub.is_none_or(|s| s.len() == 36);
            for (id, row) in &rows {
                match compiled.decide(row, &caller) {
                    Ok(visible) => {
                        decided += 1;
                        let truth = truth.as_ref().unwrap_or_else(|| {
                            panic!("set {set}, {role} {claims}: decided row {id} where Postgres raised an error")
                        });
                        assert_eq!(
                            visible,
                            truth.contains(id),
                            "set {set} {deparsed:?}, {role} {claims}, row {id}"
                        );
                    }
                    Err(_) => {
                        undecided += 1;
                        // On modelled shapes only a `sub` that is not a UUID (an error in
                        // Postgres) is left to the SQL check.
                        assert!(
                            !sub_is_uuid_or_absent,
                            "set {set} {deparsed:?}, {role} {claims}, row {id}: undecided"
                        );
                    }
                }
            }
        }
    }
    assert!(decided > 1000, "decided {decided}, undecided {undecided}");
    Ok(())
}
