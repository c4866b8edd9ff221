//! Row visibility under RLS, batched: one query per (role + claims, table) for all rows of a batch
//! of changes, never one per subscriber per change.
//!
//! The query runs as the subscriber's role with `request.jwt.claims` (and `.sub`, `.role`) set
//! transaction-locally, and asks which of the changed primary keys the role can select now (after
//! commit), as the reference server does. The transaction is rolled back.

use super::policy::{AuthFunctions, Caller, TablePolicies};
use super::subscription::{ColumnAccess, TableAccess};
use crate::db::{Database, DbError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Who is looking: the role and claims of a channel's token.
#[derive(Debug)]
pub(crate) struct Viewer {
    pub(crate) role: String,
    /// `request.jwt.claims` as JSON text.
    pub(crate) claims: String,
    pub(crate) sub: Option<String>,
    /// The claims object, for policies evaluated in process.
    pub(crate) claims_json: serde_json::Value,
    pub(crate) bypass_rls: bool,
    /// Identity of the (role, claims) group: equal claims share one visibility query.
    pub(crate) group: Arc<str>,
}

impl Viewer {
    pub(crate) fn new(
        role: String,
        claims: &serde_json::Map<String, serde_json::Value>,
        bypass_rls: bool,
    ) -> Viewer {
        let claims_json = serde_json::Value::Object(claims.clone());
        let claims_text = claims_json.to_string();
        let sub = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let group = Arc::from(format!("{role}\u{0}{claims_text}"));
        Viewer {
            role,
            claims: claims_text,
            sub,
            claims_json,
            bypass_rls,
            group,
        }
    }
}

impl Viewer {
    /// The caller as the `auth` helper functions see it in an RLS check (see [`SET_CLAIMS`]).
    pub(crate) fn caller(&self, functions: &AuthFunctions) -> Caller<'_> {
        Caller::new(
            functions,
            &self.role,
            &self.claims_json,
            self.sub.as_deref(),
        )
    }
}

/// A table's policies for a role as `(permissive, USING)` text.
pub(crate) type PolicyTexts = Vec<(bool, Option<String>)>;

/// The SELECT policies of tables per role, for evaluation in process (see `policy`) and in SQL
/// on rows rebuilt from their values.
#[derive(Debug, Default)]
pub(crate) struct RowPolicies {
    pub(crate) functions: AuthFunctions,
    /// (role, table OID) → the policies, when every one is in the grammar and RLS applies to the
    /// role plainly (not the owner, no BYPASSRLS, SELECT granted on the whole table).
    pub(crate) tables: HashMap<(String, u32), TablePolicies>,
    /// (role, table OID) → the policies as `(permissive, USING)` text, whether compiled or not:
    /// what the old rows of DELETEs are judged by in SQL.
    pub(crate) raw: HashMap<(String, u32), PolicyTexts>,
}

/// The policies of each (role, table), deparsed with an empty `search_path` so that every name
/// outside `pg_catalog` is written qualified.
const POLICIES: &str = "select r.role, r.oid, \
       coalesce((select json_agg(json_build_array(p.polpermissive, pg_get_expr(p.polqual, p.polrelid)) \
                                 order by p.polname) \
                   from pg_policy p \
                  where p.polrelid = c.oid and p.polcmd in ('r', '*') \
                    and (0::oid = any(p.polroles) \
                         or exists (select 1 from unnest(p.polroles) as pr(oid) \
                                     where pr.oid <> 0 and pg_has_role(a.oid, pr.oid, 'USAGE')))), \
                '[]')::text, \
       exists (select 1 from pg_catalog.pg_attribute ca \
                 join pg_catalog.pg_collation co on co.oid = ca.attcollation \
                where ca.attrelid = c.oid and ca.attnum > 0 and not ca.attisdropped \
                  and not co.collisdeterministic) \
  from unnest($1::text[], $2::oid[]) as r(role, oid) \
  join pg_roles a on a.rolname = r.role \
  join pg_class c on c.oid = r.oid \
 where c.relrowsecurity and not a.rolsuper and not a.rolbypassrls \
   and has_table_privilege(a.oid, c.oid, 'SELECT') \
   and not pg_has_role(a.oid, c.relowner, 'USAGE')";

/// The bodies of the `auth` helpers, when they are plain SQL functions.
const AUTH_FUNCTIONS: &str = "select p.proname::text, p.prosrc, \
       coalesce(current_setting('request.jwt.claim', true), '') \
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace \
  join pg_language l on l.oid = p.prolang \
 where n.nspname = 'auth' and p.proname in ('uid', 'role', 'jwt') and p.pronargs = 0 \
   and l.lanname = 'sql' and p.proconfig is null and p.prokind = 'f' and not p.proretset";

/// Reads the policies for `pairs` of (role, table OID): one round trip per batch, so policy
/// changes apply from the next batch, as they do for the SQL check.
pub(crate) async fn row_policies(
    db: &Database,
    pairs: &[(String, u32)],
) -> Result<RowPolicies, DbError> {
    let db_error = DbError::from;
    let mut client = db.exclusive().await?;
    let policies = client.prepared(POLICIES).await.map_err(db_error)?;
    let functions = client.prepared(AUTH_FUNCTIONS).await.map_err(db_error)?;
    let client = &*client;
    let roles: Vec<&str> = pairs.iter().map(|(r, _)| r.as_str()).collect();
    let oids: Vec<u32> = pairs.iter().map(|(_, o)| *o).collect();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&roles, &oids];
    let (begin, tables, bodies, _commit) = tokio::join!(
        client.batch_execute("begin read only; set local search_path to ''"),
        client.query(&policies, &params),
        client.query(&functions, &[]),
        client.batch_execute("commit"),
    );
    begin.map_err(db_error)?;
    let (tables, bodies) = (tables.map_err(db_error)?, bodies.map_err(db_error)?);
    let body = |name: &str| {
        bodies
            .iter()
            .find(|r| r.get::<_, &str>(0) == name)
            .map(|r| r.get::<_, String>(1))
    };
    let mut functions = AuthFunctions::recognise(
        body("uid").as_deref(),
        body("role").as_deref(),
        body("jwt").as_deref(),
    );
    // `auth.jwt()` prefers `request.jwt.claim`, which the check does not set: if this session
    // has it, the claims are not what the function returns.
    if bodies
        .first()
        .is_some_and(|r| !r.get::<_, &str>(2).is_empty())
    {
        functions.jwt = false;
    }
    let mut out = RowPolicies {
        functions,
        tables: HashMap::new(),
        raw: HashMap::new(),
    };
    for row in tables {
        let role: String = row.get(0);
        let oid: u32 = row.get(1);
        let list: Vec<(bool, Option<String>)> = serde_json::from_str(row.get::<_, &str>(2))
            .map_err(|e| DbError::Statement(format!("policy list: {e}")))?;
        // Text compares byte-wise in process, which is Postgres's equality only under a
        // deterministic collation: a table with a non-deterministic one goes to the SQL check.
        let nondeterministic: bool = row.get(3);
        if !nondeterministic && let Some(compiled) = TablePolicies::compile(&list) {
            out.tables.insert((role.clone(), oid), compiled);
        }
        out.raw.insert((role, oid), list);
    }
    Ok(out)
}

/// The transaction-local settings of an RLS check.
const SET_CLAIMS: &str = "select set_config('role', $1, true), set_config('request.jwt.claims', $2, true), \
     set_config('request.jwt.claim.sub', $3, true), set_config('request.jwt.claim.role', $1, true)";

/// Quotes an identifier for SQL.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Waits until transactions `xids` (32-bit, from the stream) are visible to new snapshots.
///
/// A commit reaches the WAL stream before the committing backend leaves the proc array, so for a
/// moment after a change is streamed, a fresh snapshot may still see its transaction as running
/// and an RLS check would miss the row. One query per batch, normally answered at once.
pub(crate) async fn wait_visible(
    db: &Database,
    xids: &[u32],
    timeout: std::time::Duration,
) -> Result<bool, DbError> {
    if xids.is_empty() {
        return Ok(true);
    }
    let xids: Vec<i64> = xids.iter().map(|x| i64::from(*x)).collect();
    let client = db.client().await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // Widen each 32-bit xid to the xid8 of the current epoch (one epoch back when it would
        // lie beyond the snapshot's xmax), then ask the current snapshot.
        let row = client
            .query_one(
                "with s as (select pg_current_snapshot() as snap,
                                   pg_snapshot_xmax(pg_current_snapshot())::text::bigint as xmax)
                 select coalesce(bool_and(pg_visible_in_snapshot(
                          (case when ((s.xmax >> 32) << 32 | x) > s.xmax
                                then (((s.xmax >> 32) - 1) << 32 | x)
                                else ((s.xmax >> 32) << 32 | x) end)::text::xid8,
                          s.snap)), true)
                   from s, unnest($1::bigint[]) as x",
                &[&xids],
            )
            .await
            .map_err(DbError::from)?;
        if row.get::<_, bool>(0) {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// `from "s"."t" t join unnest(<arrays>) with ordinality as k(k0, …, i) on t."a" = k.k0 and …`,
/// with one array per primary-key column, already cast to the column's type.
///
/// The keys are cast as whole arrays, outside the scan: a cast in the join clause is not
/// leakproof, so Postgres would have to apply the RLS policy to every row of the table before
/// joining (a sequential scan per check) instead of looking the keys up.
fn key_join(access: &TableAccess, pk: &[&ColumnAccess], arrays: &[String]) -> String {
    let names: Vec<String> = (0..pk.len()).map(|i| format!("k{i}")).collect();
    let on: Vec<String> = pk
        .iter()
        .enumerate()
        .map(|(i, c)| format!("t.{} = k.k{i}", quote_ident(&c.name)))
        .collect();
    format!(
        "from {}.{} t join unnest({}) with ordinality as k({}, i) on {}",
        quote_ident(&access.schema),
        quote_ident(&access.table),
        arrays.join(", "),
        names.join(", "),
        on.join(" and ")
    )
}

/// Distinguishes the SQL-level prepared statements of [`visible_for_many`].
static STATEMENT_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Quotes a value as an escape string literal (`E'…'`), whatever `standard_conforming_strings`.
fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// For each of `viewers`, the indexes of the `keys` (text values in primary-key column order) it
/// can select from the table, in one round trip: a statement with the keys is prepared, and
/// `realtime.visible_key_indexes` runs it once per viewer with that viewer's role and claims.
/// `None` for a viewer whose check raised an error (it sees nothing). An `Err` means the whole
/// call failed (e.g. the function is missing): the caller falls back to [`visible_keys`].
pub(crate) async fn visible_for_many(
    db: &Database,
    viewers: &[Arc<Viewer>],
    access: &TableAccess,
    keys: &[Vec<String>],
) -> Result<Vec<Option<HashSet<usize>>>, DbError> {
    let pk: Vec<_> = access.columns.iter().filter(|c| c.is_pk).collect();
    if pk.is_empty() || keys.is_empty() || viewers.is_empty() {
        return Ok(vec![Some(HashSet::new()); viewers.len()]);
    }
    let arrays: Vec<String> = pk
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let literals: Vec<String> = keys.iter().map(|key| quote_literal(&key[i])).collect();
            format!("array[{}]::text[]::{}[]", literals.join(","), c.sql_type)
        })
        .collect();
    let sql = format!(
        "select coalesce(array_agg(k.i::int), '{{}}') {}",
        key_join(access, &pk, &arrays)
    );
    run_for_many(db, viewers, &sql).await
}

/// Runs `sql` (a statement returning the `int[]` of 1-based indexes its caller may see) for each
/// viewer as its role with its claims, all in one call of `realtime.visible_key_indexes`.
async fn run_for_many(
    db: &Database,
    viewers: &[Arc<Viewer>],
    sql: &str,
) -> Result<Vec<Option<HashSet<usize>>>, DbError> {
    let name = format!(
        "realtime_visibility_{}",
        STATEMENT_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let roles: Vec<&str> = viewers.iter().map(|v| v.role.as_str()).collect();
    let claims: Vec<&str> = viewers.iter().map(|v| v.claims.as_str()).collect();
    let subs: Vec<&str> = viewers
        .iter()
        .map(|v| v.sub.as_deref().unwrap_or_default())
        .collect();

    let db_error = DbError::from;
    let mut client = db.exclusive().await?;
    let call = client
        .prepared("select caller, visible from realtime.visible_key_indexes($1, $2, $3, $4)")
        .await
        .map_err(db_error)?;
    let client = &*client;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&name, &roles, &claims, &subs];
    let prepare = format!("begin; prepare {} as {sql}", quote_ident(&name));
    let cleanup = format!("rollback; deallocate {}", quote_ident(&name));
    // Pipelined: one round trip. The statement is dropped even when a step fails (a failed
    // `prepare` leaves nothing to drop, and that error is ignored).
    let (prepared, rows, _cleanup) = tokio::join!(
        client.batch_execute(&prepare),
        client.query(&call, &params),
        client.batch_execute(&cleanup),
    );
    prepared.map_err(db_error)?;
    let rows = rows.map_err(db_error)?;
    let mut out: Vec<Option<HashSet<usize>>> = vec![None; viewers.len()];
    for row in rows {
        let caller: i32 = row.get(0);
        let visible: Option<Vec<i32>> = row.get(1);
        if let Some(slot) = usize::try_from(caller - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
        {
            *slot = visible.map(|v| {
                v.into_iter()
                    .filter_map(|i| usize::try_from(i - 1).ok())
                    .collect()
            });
        }
    }
    Ok(out)
}

/// The primary keys among `keys` (text values in primary-key column order) that `viewer` can
/// select from the table.
pub(crate) async fn visible_keys(
    db: &Database,
    viewer: &Viewer,
    access: &TableAccess,
    keys: &[Vec<String>],
) -> Result<HashSet<Vec<String>>, DbError> {
    let pk: Vec<_> = access.columns.iter().filter(|c| c.is_pk).collect();
    if pk.is_empty() || keys.is_empty() {
        return Ok(HashSet::new());
    }
    let selected: Vec<String> = pk
        .iter()
        .map(|c| format!("t.{}::text", quote_ident(&c.name)))
        .collect();
    let arrays: Vec<String> = pk
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::text[]::{}[]", i + 1, c.sql_type))
        .collect();
    let sql = format!(
        "select {} {}",
        selected.join(", "),
        key_join(access, &pk, &arrays)
    );
    let columns: Vec<Vec<&str>> = (0..pk.len())
        .map(|i| keys.iter().map(|k| k[i].as_str()).collect())
        .collect();

    let mut client = db.exclusive().await?;
    let db_error = DbError::from;
    let set_statement = client.prepared(SET_CLAIMS).await.map_err(db_error)?;
    let check_statement = match client.prepared(&sql).await {
        Ok(statement) => statement,
        // The role may not select the table at all: nothing is visible. (Preparing checks
        // nothing about privileges; executing does. Other errors are errors.)
        Err(e) => return Err(db_error(e)),
    };
    let client = &*client;
    let sub = viewer.sub.clone().unwrap_or_default();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = columns
        .iter()
        .map(|c| c as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    // The four statements are pipelined: tokio-postgres sends requests issued together in order
    // without waiting for each answer, so the check costs about one round trip, not four. The
    // rollback runs even when the check fails (an aborted transaction accepts it).
    let set_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&viewer.role, &viewer.claims, &sub];
    // Statements are prepared, so each request below is written at its first poll, in order.
    let (begin, set, rows, _rollback) = tokio::join!(
        client.batch_execute("begin"),
        client.execute(&set_statement, &set_params),
        client.query(&check_statement, &params),
        client.batch_execute("rollback"),
    );
    begin.map_err(DbError::from)?;
    set.map_err(DbError::from)?;
    let rows = match rows {
        Ok(rows) => rows,
        // The role may not select the table at all: nothing is visible.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            return Ok(HashSet::new());
        }
        Err(e) => return Err(e.into()),
    };
    Ok(rows
        .iter()
        .map(|row| {
            (0..pk.len())
                .map(|i| row.get::<_, Option<String>>(i).unwrap_or_default())
                .collect()
        })
        .collect())
}

/// The statement that judges `rows` on their own values (as committed, or as they were before a
/// DELETE), not on the table as it is now: the role's policies applied to each row rebuilt with
/// `jsonb_populate_record`. `rows` are JSON objects of the rows' values. `None` when a policy
/// has no `USING` to apply; `Some(None)` when no permissive policy applies (nothing visible).
/// Built once per (table, role) and run for each chunk of its viewers with
/// [`visible_for_many_sql`].
///
/// The policy texts are the server's own (`pg_get_expr` of `pg_policy.polqual`), written into
/// the statement as Postgres does when it applies them; the row is aliased with the table's
/// name, so references qualified with it resolve to the row.
pub(crate) fn rows_statement(
    access: &TableAccess,
    policies: &[(bool, Option<String>)],
    rows: &[serde_json::Value],
) -> Option<Option<String>> {
    let mut permissive = Vec::new();
    let mut restrictive = Vec::new();
    for (is_permissive, qual) in policies {
        let qual = format!("({})", qual.as_ref()?);
        if *is_permissive {
            permissive.push(qual);
        } else {
            restrictive.push(qual);
        }
    }
    if permissive.is_empty() || rows.is_empty() {
        return Some(None);
    }
    let mut condition = format!("({})", permissive.join(" or "));
    for r in &restrictive {
        condition.push_str(" and ");
        condition.push_str(r);
    }
    let literals: Vec<String> = rows.iter().map(|r| quote_literal(&r.to_string())).collect();
    let table = quote_ident(&access.table);
    Some(Some(format!(
        "select coalesce(array_agg(r.i::int), '{{}}') \
           from unnest(array[{}]::text[]::jsonb[]) with ordinality as r(j, i), \
                lateral jsonb_populate_record(null::{}.{table}, r.j) as {table} \
          where {condition}",
        literals.join(","),
        quote_ident(&access.schema),
    )))
}

/// Runs a [`rows_statement`] for each viewer as its role with its claims: per viewer, the
/// 0-based positions of the rows it may see (`None` when its check raised an error).
pub(crate) async fn visible_for_many_sql(
    db: &Database,
    viewers: &[Arc<Viewer>],
    sql: &str,
) -> Result<Vec<Option<HashSet<usize>>>, DbError> {
    if viewers.is_empty() {
        return Ok(Vec::new());
    }
    run_for_many(db, viewers, sql).await
}

/// A row as the JSON object `jsonb_populate_record` takes: text values as strings (each
/// column's input function reads them), `json`/`jsonb` values as JSON.
pub(crate) fn row_json(
    relation: &realtime_wal_listener::Relation,
    row: &[realtime_wal_listener::TupleValue],
) -> Option<serde_json::Value> {
    use realtime_wal_listener::TupleValue;
    let mut object = serde_json::Map::with_capacity(row.len());
    for (column, value) in relation.columns.iter().zip(row) {
        let value = match value {
            TupleValue::Null => serde_json::Value::Null,
            TupleValue::Text(_) => {
                let text = value.as_str()?;
                if matches!(column.pg_type.name.as_str(), "json" | "jsonb") {
                    serde_json::from_str(text).ok()?
                } else {
                    serde_json::Value::String(text.to_owned())
                }
            }
            TupleValue::UnchangedToast | TupleValue::Binary(_) => return None,
        };
        object.insert(column.name.clone(), value);
    }
    Some(serde_json::Value::Object(object))
}
