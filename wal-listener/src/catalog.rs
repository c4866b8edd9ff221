//! The admin connection (tokio-postgres): server checks before streaming, slot state, type names.
//!
//! It runs over the same [`crate::transport`] stream as the replication connection, so TLS behaves the
//! same for both; tokio-postgres is told TLS is off because the stream is already encrypted.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

use crate::Error;
use crate::config::ConnectConfig;
use crate::transport;
use crate::value::ValueKind;

/// A resolved column type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgType {
    pub oid: u32,
    /// `pg_type.typname`: `int4`, `_text`, an enum's or domain's own name.
    pub name: String,
    pub kind: ValueKind,
    /// `pg_type.typdelim`: the element separator in the text of arrays of this type.
    pub(crate) delimiter: u8,
}

impl PgType {
    /// A type as the catalog would describe it, with `,` as the array delimiter (every built-in
    /// type but `box`): for consumers' tests that build relations by hand.
    pub fn new(oid: u32, name: impl Into<String>, kind: crate::value::ValueKind) -> PgType {
        PgType {
            oid,
            name: name.into(),
            kind,
            delimiter: b',',
        }
    }
}

/// Opens an admin connection; its driver runs on a spawned task that ends with the client.
pub async fn connect(cfg: &ConnectConfig) -> Result<Client, Error> {
    let stream = transport::connect(cfg).await?;
    let mut pg = tokio_postgres::Config::new();
    pg.user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name(&cfg.application_name)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(p) = &cfg.password {
        pg.password(p.expose());
    }
    let (client, connection) =
        tokio::time::timeout(cfg.connect_timeout, pg.connect_raw(stream, NoTls))
            .await
            .map_err(|_| {
                Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "sql connection startup timed out",
                ))
            })??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "admin connection ended");
        }
    });
    Ok(client)
}

/// What `pg_replication_slots` says about our slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotState {
    pub(crate) plugin: Option<String>,
    pub(crate) database: Option<String>,
    pub(crate) wal_status: Option<String>,
}

/// Checks that a publication exists.
pub(crate) async fn check_publication(client: &Client, publication: &str) -> Result<(), Error> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    match exists {
        Some(_) => Ok(()),
        None => Err(Error::PublicationMissing {
            publication: publication.to_owned(),
        }),
    }
}

/// Checks the server can stream `publication` for `user`; returns the slot's state if it exists.
pub(crate) async fn preflight(
    client: &Client,
    user: &str,
    slot: &str,
    publication: &str,
) -> Result<Option<SlotState>, Error> {
    // One round trip for every check: startup cost matters when the listener reconnects.
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'),
                    (SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user),
                    EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $2),
                    s.slot_name IS NOT NULL, s.plugin::text, s.database::text, s.wal_status,
                    current_database()::text
             FROM (SELECT 1) AS one
             LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&slot, &publication],
        )
        .await?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(Error::WalLevelNotLogical { actual: wal_level });
    }
    if !row.get::<_, Option<bool>>(1).unwrap_or(false) {
        return Err(Error::MissingReplicationPrivilege {
            user: user.to_owned(),
        });
    }
    if !row.get::<_, bool>(2) {
        return Err(Error::PublicationMissing {
            publication: publication.to_owned(),
        });
    }
    if !row.get::<_, bool>(3) {
        return Ok(None);
    }
    let state = SlotState {
        plugin: row.get(4),
        database: row.get(5),
        wal_status: row.get(6),
    };
    let current_db: String = row.get(7);
    if state.wal_status.as_deref() == Some("lost") {
        return Err(Error::SlotInvalidated {
            slot: slot.to_owned(),
        });
    }
    if state.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::SlotMismatch {
            slot: slot.to_owned(),
            reason: format!("uses plugin {:?}, not pgoutput", state.plugin),
        });
    }
    if state.database.as_deref() != Some(current_db.as_str()) {
        return Err(Error::SlotMismatch {
            slot: slot.to_owned(),
            reason: format!("belongs to database {:?}", state.database),
        });
    }
    Ok(Some(state))
}

/// Row of `pg_type` needed to classify a type.
struct TypeRow {
    name: String,
    typtype: i8,
    base: u32,
    elem: u32,
    category: i8,
    delim: i8,
}

/// Resolves names and JSON kinds for `oids`, filling `cache`. Domain base types and array element
/// types are looked up too. OIDs the catalog no longer knows become `Text` named by their number.
pub(crate) async fn resolve_types(
    client: &Client,
    cache: &mut HashMap<u32, Arc<PgType>>,
    oids: &[u32],
) -> Result<(), Error> {
    let mut rows: HashMap<u32, TypeRow> = HashMap::new();
    let mut wanted: Vec<u32> = oids
        .iter()
        .copied()
        .filter(|o| !cache.contains_key(o))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    if wanted.is_empty() {
        return Ok(());
    }
    let roots = wanted.clone();
    // Domains over arrays of domains need a few rounds; 8 is far beyond real nesting.
    for _ in 0..8 {
        if wanted.is_empty() {
            break;
        }
        let found = client
            .query(
                "SELECT oid, typname::text, typtype, typbasetype, typelem, typcategory, typdelim
                 FROM pg_type WHERE oid = ANY($1)",
                &[&wanted],
            )
            .await?;
        let mut next = Vec::new();
        for r in found {
            let oid: u32 = r.get(0);
            let row = TypeRow {
                name: r.get(1),
                typtype: r.get(2),
                base: r.get(3),
                elem: r.get(4),
                category: r.get(5),
                delim: r.get(6),
            };
            for dep in [row.base, row.elem] {
                if dep != 0 && !rows.contains_key(&dep) && !cache.contains_key(&dep) {
                    next.push(dep);
                }
            }
            rows.insert(oid, row);
        }
        wanted = next;
    }
    for oid in roots {
        let kind = classify(oid, &rows, cache, 0);
        let name = rows
            .get(&oid)
            .map(|r| r.name.clone())
            .unwrap_or_else(|| oid.to_string());
        let delimiter = rows.get(&oid).map(|r| r.delim as u8).unwrap_or(b',');
        cache.insert(
            oid,
            Arc::new(PgType {
                oid,
                name,
                kind,
                delimiter,
            }),
        );
    }
    Ok(())
}

fn classify(
    oid: u32,
    rows: &HashMap<u32, TypeRow>,
    cache: &HashMap<u32, Arc<PgType>>,
    depth: u32,
) -> ValueKind {
    if let Some(t) = cache.get(&oid) {
        return t.kind.clone();
    }
    let Some(row) = rows.get(&oid) else {
        return ValueKind::for_scalar_oid(oid);
    };
    if depth > 8 {
        return ValueKind::Text;
    }
    if row.typtype == b'd' as i8 && row.base != 0 {
        return classify(row.base, rows, cache, depth + 1);
    }
    if row.category == b'A' as i8 && row.elem != 0 {
        let delimiter = match (rows.get(&row.elem), cache.get(&row.elem)) {
            (Some(e), _) => e.delim as u8,
            (None, Some(t)) => t.delimiter,
            (None, None) => b',',
        };
        return ValueKind::Array {
            element: Box::new(classify(row.elem, rows, cache, depth + 1)),
            delimiter,
        };
    }
    ValueKind::for_scalar_oid(oid)
}
