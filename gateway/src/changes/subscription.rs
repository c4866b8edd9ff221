//! Turning a join's `postgres_changes` entries into subscriptions, checked against the
//! publication and the catalog for the subscriber's role (protocol.md §4.5, §7.1).
//!
//! One catalog query per entry at join time; nothing is queried per change.

use super::filter::{self, Condition, Kind};
use crate::db::DbError;
use serde_json::Value;
use std::sync::Arc;
use tokio_postgres::Client;

/// Which events a binding wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventFilter {
    All,
    Insert,
    Update,
    Delete,
}

/// A binding as the client sent it, parsed.
#[derive(Clone, Debug)]
pub(crate) struct Binding {
    pub(crate) id: u32,
    pub(crate) event: EventFilter,
    pub(crate) schema: String,
    /// `None`: every publication table of the schema.
    pub(crate) table: Option<String>,
    pub(crate) conditions: Vec<filter::RawCondition>,
    pub(crate) select: Option<Vec<String>>,
    /// The entry as the reference prints it in error messages.
    printed: String,
}

/// A published table as one role sees it.
#[derive(Clone, Debug)]
pub(crate) struct TableAccess {
    pub(crate) oid: u32,
    pub(crate) schema: String,
    pub(crate) table: String,
    pub(crate) rls: bool,
    /// Attribute order; `selectable` is the role's column privilege.
    pub(crate) columns: Vec<ColumnAccess>,
    pub(crate) has_primary_key: bool,
    /// The role may select every primary-key column.
    pub(crate) pk_selectable: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct ColumnAccess {
    pub(crate) name: String,
    pub(crate) is_pk: bool,
    pub(crate) selectable: bool,
    /// `format_type` of the column, for casts in visibility queries.
    pub(crate) sql_type: String,
}

/// A binding resolved to one table.
#[derive(Clone, Debug)]
pub(crate) struct TableBinding {
    pub(crate) binding_id: u32,
    pub(crate) event: EventFilter,
    pub(crate) access: Arc<TableAccess>,
    pub(crate) conditions: Vec<Condition>,
    /// Columns to deliver (select list plus primary key), `None` for all.
    pub(crate) select: Option<Vec<String>>,
}

/// Why a channel's `postgres_changes` entries could not be subscribed; the texts are the
/// reference's system messages.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum SubscribeError {
    /// The entries are invalid for this database and role: said once, not retried.
    #[error("{0}")]
    Invalid(String),
    /// The database could not be reached: tried again later.
    #[error("{0}")]
    Unavailable(String),
}

/// Parses one `config.postgres_changes` entry; errors are the reference's system messages.
pub(crate) fn parse_binding(entry: &Value, id: u32) -> Result<Binding, SubscribeError> {
    parse_entry(entry, id).map_err(SubscribeError::Invalid)
}

fn parse_entry(entry: &Value, id: u32) -> Result<Binding, String> {
    let Some(map) = entry.as_object() else {
        return Err(no_params(entry));
    };
    let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
    let event = match text("event").map(|e| e.to_ascii_uppercase()).as_deref() {
        Some("INSERT") => EventFilter::Insert,
        Some("UPDATE") => EventFilter::Update,
        Some("DELETE") => EventFilter::Delete,
        _ => EventFilter::All,
    };
    let (schema, table) = match (text("schema"), text("table")) {
        (None, None) => return Err(no_params(entry)),
        (schema, table) => (
            schema.unwrap_or_else(|| "public".to_owned()),
            table.filter(|t| t != "*"),
        ),
    };
    let conditions = match map.get("filter") {
        None => Vec::new(),
        Some(Value::String(f)) => {
            filter::parse(f).map_err(|e| format!("Error parsing `filter` params: {e}"))?
        }
        Some(other) => {
            return Err(format!(
                "Error parsing `filter` params: {other} is not a string"
            ));
        }
    };
    let select = match map.get("select") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let names: Option<Vec<String>> = items
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect();
            Some(names.ok_or_else(select_error)?)
        }
        Some(_) => return Err(select_error()),
    };
    if select.is_some() && (schema == "*" || table.is_none()) {
        return Err("Column selection is not supported for wildcard subscriptions. Provide an explicit schema and table name.".to_owned());
    }
    let printed = format!(
        "[event: {}, schema: {}, table: {}, filters: [{}], select: {}]",
        text("event").unwrap_or_else(|| "*".into()),
        schema,
        table.as_deref().unwrap_or("*"),
        conditions
            .iter()
            .map(|c| format!(
                "{{{:?}, {:?}, {:?}}}",
                c.column,
                format!("{:?}", c.op).to_lowercase(),
                c.value
            ))
            .collect::<Vec<_>>()
            .join(", "),
        select
            .as_ref()
            .map_or("nil".to_owned(), |s| format!("{s:?}")),
    );
    Ok(Binding {
        id,
        event,
        schema,
        table,
        conditions,
        select,
        printed,
    })
}

fn no_params(entry: &Value) -> String {
    format!(
        "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {entry}"
    )
}

fn select_error() -> String {
    "Error parsing `select` params: expected a list of column name strings, e.g. select: [\"col1\", \"col2\"]".to_owned()
}

/// Resolves a binding against the publication and the catalog, for `role`.
pub(crate) async fn resolve(
    client: &Client,
    publication: &str,
    role: &str,
    binding: &Binding,
) -> Result<Vec<TableBinding>, SubscribeError> {
    let like = |s: &str| {
        if s == "*" {
            "%".to_owned()
        } else {
            s.to_owned()
        }
    };
    let table_pattern = binding.table.as_deref().map_or("%".to_owned(), like);
    let rows = client
        .query(
            CATALOG_QUERY,
            &[&publication, &like(&binding.schema), &table_pattern, &role],
        )
        .await
        .map_err(|e| match DbError::from(e) {
            e @ DbError::Unavailable(_) => {
                SubscribeError::Unavailable(exception(binding, &e.message()))
            }
            e => SubscribeError::Invalid(exception(binding, &e.message())),
        })?;
    if rows.is_empty() {
        return Err(SubscribeError::Invalid(format!(
            "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}",
            binding.printed
        )));
    }
    let mut tables: Vec<TableAccess> = Vec::new();
    let mut kinds: Vec<Vec<Kind>> = Vec::new();
    for row in rows {
        let oid: u32 = row.get("oid");
        if tables.last().is_none_or(|t| t.oid != oid) {
            tables.push(TableAccess {
                oid,
                schema: row.get("schema"),
                table: row.get("table"),
                rls: row.get("rls"),
                columns: Vec::new(),
                has_primary_key: false,
                pk_selectable: true,
            });
            kinds.push(Vec::new());
        }
        let (Some(t), Some(k)) = (tables.last_mut(), kinds.last_mut()) else {
            continue;
        };
        let column = ColumnAccess {
            name: row.get("column"),
            is_pk: row.get("is_pk"),
            selectable: row.get("selectable"),
            sql_type: row.get("sql_type"),
        };
        let base: String = row.get("base_type_name");
        let labels: Option<Vec<String>> = row.get("labels");
        k.push(match labels {
            Some(labels) => Kind::Enum(Arc::from(labels)),
            None => Kind::from_type_name(&base),
        });
        if column.is_pk {
            t.has_primary_key = true;
            t.pk_selectable &= column.selectable;
        }
        t.columns.push(column);
    }
    let mut out = Vec::with_capacity(tables.len());
    for (table, kinds) in tables.into_iter().zip(kinds) {
        let mut conditions = Vec::with_capacity(binding.conditions.len());
        for raw in &binding.conditions {
            let Some(i) = table
                .columns
                .iter()
                .position(|c| c.name == raw.column && c.selectable)
            else {
                return Err(SubscribeError::Invalid(exception(
                    binding,
                    &format!("invalid column for filter {}", raw.column),
                )));
            };
            let condition = Condition::compile(raw, kinds[i].clone())
                .map_err(|e| SubscribeError::Invalid(exception(binding, &e.to_string())))?;
            conditions.push(condition);
        }
        if let Some(select) = &binding.select
            && let Some(missing) = select
                .iter()
                .find(|s| !table.columns.iter().any(|c| &c.name == *s))
        {
            return Err(SubscribeError::Invalid(exception(
                binding,
                &format!("invalid column for select {missing}"),
            )));
        }
        out.push(TableBinding {
            binding_id: binding.id,
            event: binding.event,
            access: Arc::new(table),
            conditions,
            select: binding.select.clone(),
        });
    }
    Ok(out)
}

fn exception(binding: &Binding, detail: &str) -> String {
    format!(
        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: {detail}",
        binding.printed
    )
}

/// Whether a role bypasses RLS (superuser or BYPASSRLS), or `None` when it does not exist.
pub(crate) async fn role_bypasses_rls(
    client: &Client,
    role: &str,
) -> Result<Option<bool>, DbError> {
    let row = client
        .query_opt(
            "select rolsuper or rolbypassrls from pg_roles where rolname = $1",
            &[&role],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Published tables matching (schema LIKE $2, table LIKE $3), their columns in attribute order,
/// and what role $4 may select. Names are matched with LIKE, as the reference server does.
const CATALOG_QUERY: &str = "
select c.oid as oid, n.nspname::text as schema, c.relname::text as table,
       c.relrowsecurity as rls,
       a.attname::text as column,
       coalesce(bt.typname, t.typname)::text as base_type_name,
       format_type(a.atttypid, a.atttypmod) as sql_type,
       coalesce(a.attnum = any(pk.conkey), false) as is_pk,
       (has_table_privilege($4::text, c.oid, 'SELECT')
        or has_column_privilege($4::text, c.oid, a.attnum, 'SELECT')) as selectable,
       (select array_agg(e.enumlabel::text order by e.enumsortorder)
          from pg_enum e where e.enumtypid = coalesce(bt.oid, t.oid)) as labels
  from pg_publication_tables pt
  join pg_namespace n on n.nspname = pt.schemaname
  join pg_class c on c.relnamespace = n.oid and c.relname = pt.tablename
  join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
  join pg_type t on t.oid = a.atttypid
  left join pg_type bt on t.typtype = 'd' and bt.oid = t.typbasetype
  left join pg_constraint pk on pk.conrelid = c.oid and pk.contype = 'p'
 where pt.pubname = $1 and pt.schemaname like $2 and pt.tablename like $3
 order by c.oid, a.attnum";

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_bindings() {
        let b = parse_binding(
            &json!({"event":"insert","schema":"public","table":"todos","filter":"id=eq.1"}),
            7,
        )
        .unwrap();
        assert_eq!(b.event, EventFilter::Insert);
        assert_eq!(b.table.as_deref(), Some("todos"));
        assert_eq!(b.conditions.len(), 1);
        let b = parse_binding(&json!({"event":"*","table":"todos"}), 1).unwrap();
        assert_eq!(b.schema, "public");
        let b = parse_binding(&json!({"event":"bogus","schema":"app"}), 1).unwrap();
        assert_eq!(b.event, EventFilter::All);
        assert!(b.table.is_none());
    }

    #[test]
    fn binding_errors_are_the_reference_messages() {
        let e = parse_binding(&json!({"event":"*"}), 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("No subscription params provided."), "{e}");
        let e = parse_binding(&json!({"table":"t","filter":"id=foo.1"}), 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Error parsing `filter` params: "), "{e}");
        let e = parse_binding(&json!({"table":"t","filter":null}), 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Error parsing `filter` params: "), "{e}");
        let e = parse_binding(&json!({"table":"t","select":"id"}), 1)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Error parsing `select` params"), "{e}");
        let e = parse_binding(&json!({"schema":"public","select":["id"]}), 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("Column selection is not supported for wildcard"),
            "{e}"
        );
    }
}
