//! Scenarios 4–6, which need Postgres: private channels (RLS on `realtime.messages` reading a
//! membership table), broadcast from the database (a trigger calling `realtime.send`), and the
//! Postgres Changes grid (subscribers × RLS × filter, commit rate stepped up, next to
//! `pg_recvlogical` on its own slot).
//!
//! The limit server has no database and no RLS, so these run against the gateway only; each has
//! a reference measured in the same run instead: the same plan on public channels (private), the
//! same fan-out published over a socket (database broadcast), `pg_recvlogical` draining the same
//! inserts (Postgres Changes).

use crate::client::{self, Client, HEARTBEAT_INTERVAL, now_us};
use crate::pg::{self, PgCluster, TestDb};
use crate::scenario::{Latency, broadcast, connect_all, ratio};
use crate::servers::Target;
use crate::sys::{CpuReport, CpuSampler};
use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Concurrent writer connections (single-row transactions).
pub const WRITERS: usize = 4;

// ---------------------------------------------------------------------------------------------
// Scenario 4: private channels.

/// SQL of the private scenario: the membership table and the policies (read and write) on
/// `realtime.messages`.
pub const PRIVATE_SQL: &str = "
create table public.room_members (room text not null, user_id uuid not null, primary key (room, user_id));
grant select on public.room_members to authenticated;
create policy \"members read their rooms\" on realtime.messages for select to authenticated
  using (exists (select 1 from public.room_members m where m.room = realtime.topic() and m.user_id = auth.uid()));
create policy \"members write to their rooms\" on realtime.messages for insert to authenticated
  with check (exists (select 1 from public.room_members m where m.room = realtime.topic() and m.user_id = auth.uid()));
";

/// Creates the membership table and the policies, with `pad` rows of other members.
pub async fn private_schema(db: &TestDb, pad: usize) -> anyhow::Result<()> {
    let c = db.client().await?;
    c.batch_execute(PRIVATE_SQL).await?;
    c.execute(
        "insert into public.room_members (room, user_id) \
         select 'pad-' || g, gen_random_uuid() from generate_series(1, $1::int) g",
        &[&(pad as i32)],
    )
    .await?;
    Ok(())
}

/// Makes every client of `plan` a distinct user, a member of the rooms it joins; returns the plan
/// with the users' tokens, private.
pub async fn private_members(
    db: &TestDb,
    secret: &str,
    mut plan: broadcast::Plan,
) -> anyhow::Result<broadcast::Plan> {
    let c = db.client().await?;
    let mut rooms = Vec::new();
    let mut users = Vec::new();
    plan.tokens.clear();
    for cp in &plan.clients {
        let sub = uuid::Uuid::new_v4();
        plan.tokens.push(pg::user_token(secret, &sub));
        for j in &cp.joins {
            rooms.push(j.clone());
            users.push(sub);
        }
    }
    c.execute(
        "insert into public.room_members (room, user_id) select * from unnest($1::text[], $2::uuid[])",
        &[&rooms, &users],
    )
    .await?;
    c.batch_execute("analyze public.room_members").await?;
    plan.private = true;
    Ok(plan)
}

/// Joins per second of a broadcast outcome (connect included).
pub fn joins_per_s(plan: &broadcast::Plan, o: &broadcast::Outcome) -> f64 {
    let joins: usize = plan.clients.iter().map(|c| c.joins.len()).sum();
    (joins as f64 / o.connect_join_s.max(1e-3)).round()
}

// ---------------------------------------------------------------------------------------------
// Readers shared by scenarios 5 and 6.

/// What one subscriber socket has received since the last [`Readers::take`].
#[derive(Default)]
struct ReaderStats {
    delivered: AtomicU64,
    last_us: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
    closed: AtomicU64,
}

/// Subscriber sockets read on their own tasks until cancelled.
pub struct Readers {
    stats: Vec<Arc<ReaderStats>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("sockets", &self.stats.len())
            .finish()
    }
}

/// The send stamp `"t":<µs>` in a frame, spaces after the colon allowed (jsonb prints them).
pub fn stamp(frame: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"t\":";
    let at = frame.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &frame[at..];
    let mut n: u64 = 0;
    let mut any = false;
    for d in rest
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit())
    {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// Whether `msg` is a delivery of the kind the scenario waits for.
fn is_delivery(msg: &Message, pg_changes: bool) -> Option<&[u8]> {
    match msg {
        Message::Binary(b) if !pg_changes => Some(b),
        Message::Text(t) => {
            let s = t.as_str();
            let hit = if pg_changes {
                s.contains("\"postgres_changes\"")
            } else {
                s.contains("\"broadcast\"")
            };
            hit.then_some(s.as_bytes())
        }
        _ => None,
    }
}

impl Readers {
    /// Reads `clients`; deliveries stamped before `since_us` (rows of an earlier cell that the
    /// gateway was still working through when these sockets joined) are ignored.
    pub fn start(clients: Vec<Client>, pg_changes: bool, since_us: u64) -> Readers {
        let stop = CancellationToken::new();
        let mut stats = Vec::new();
        let mut tasks = Vec::new();
        for mut c in clients {
            let s = Arc::new(ReaderStats::default());
            stats.push(s.clone());
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut heartbeat = Instant::now() + HEARTBEAT_INTERVAL;
                loop {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep_until(heartbeat) => {
                            let hb = c.heartbeat();
                            let _ = c.ws.send(hb).await;
                            heartbeat += HEARTBEAT_INTERVAL;
                        }
                        msg = c.ws.next() => match msg {
                            Some(Ok(msg)) => {
                                if let Some(bytes) = is_delivery(&msg, pg_changes) {
                                    let t = stamp(bytes);
                                    if t.is_some_and(|t| t < since_us) {
                                        continue;
                                    }
                                    let now = now_us();
                                    s.delivered.fetch_add(1, Ordering::Relaxed);
                                    s.last_us.fetch_max(now, Ordering::Relaxed);
                                    if let Some(t) = t {
                                        let us = u32::try_from(now.saturating_sub(t)).unwrap_or(u32::MAX);
                                        s.latencies_us.lock().expect("latencies").push(us);
                                    }
                                }
                            }
                            _ => {
                                s.closed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        },
                    }
                }
                let _ = c.ws.close(None).await;
            }));
        }
        Readers { stats, stop, tasks }
    }

    /// Deliveries so far (since the last take).
    pub fn delivered(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.delivered.load(Ordering::Relaxed))
            .sum()
    }

    /// Sockets that were closed under the readers.
    pub fn closed(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.closed.load(Ordering::Relaxed))
            .sum()
    }

    /// Deliveries, the last receive time (µs, [`now_us`]) and the latency samples since the last
    /// take; resets them.
    pub fn take(&self) -> (u64, u64, Vec<u32>) {
        let mut lat = Vec::new();
        let (mut n, mut last) = (0, 0);
        for s in &self.stats {
            n += s.delivered.swap(0, Ordering::Relaxed);
            last = last.max(s.last_us.swap(0, Ordering::Relaxed));
            lat.append(&mut s.latencies_us.lock().expect("latencies"));
        }
        (n, last, lat)
    }

    /// Waits until `expected` deliveries arrived or nothing arrived for `quiet`, at most `max`.
    pub async fn wait_for(&self, expected: u64, quiet: Duration, max: Duration) {
        let deadline = Instant::now() + max;
        let mut seen = self.delivered();
        let mut changed = Instant::now();
        while seen < expected && Instant::now() < deadline && changed.elapsed() < quiet {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = self.delivered();
            if now != seen {
                seen = now;
                changed = Instant::now();
            }
        }
    }

    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Inserts at `rate` rows/s for `seconds` from [`WRITERS`] connections, one statement at a time
/// per connection (single-row transactions), each row stamped with [`now_us`] as its `t` column.
/// `sql` takes `$1` = t (int8). Returns (rows inserted, seconds the writing took).
pub async fn paced_inserts(
    writers: &[Arc<tokio_postgres::Client>],
    sql: &str,
    rate: f64,
    seconds: f64,
) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(seconds);
    let total = (rate * seconds).round() as u64;
    let n = writers.len() as u64;
    let mut tasks = Vec::new();
    for (w, c) in writers.iter().enumerate() {
        let c = c.clone();
        let sql = sql.to_owned();
        tasks.push(tokio::spawn(async move {
            let stmt = c.prepare(&sql).await?;
            let mut done = 0u64;
            let mut k = w as u64;
            while k < total {
                let due = started + Duration::from_secs_f64(k as f64 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let t = i64::try_from(now_us()).unwrap_or(i64::MAX);
                c.execute(&stmt, &[&t]).await?;
                done += 1;
                k += n;
            }
            anyhow::Ok(done)
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await??;
    }
    Ok((done, started.elapsed().as_secs_f64()))
}

/// `WRITERS` superuser connections to `db`.
pub async fn writers(db: &TestDb) -> anyhow::Result<Vec<Arc<tokio_postgres::Client>>> {
    let mut out = Vec::new();
    for _ in 0..WRITERS {
        out.push(Arc::new(db.client().await?));
    }
    Ok(out)
}

/// One rate step of scenarios 5 and 6 against the subscribers in `readers`.
#[derive(Clone, Debug, Serialize)]
pub struct RateStep {
    /// Target commit rate.
    pub rate: f64,
    pub inserted: u64,
    /// Rows committed per second (what the writers achieved).
    pub changes_per_s: f64,
    pub expected: u64,
    pub delivered: u64,
    /// Deliveries over the time from the first insert to the last delivery.
    pub deliveries_per_s: f64,
    pub latency: Latency,
    /// ≥ 97 % delivered within the drain and p95 < 1 s.
    pub keeping_up: bool,
    /// ≥ 97 % delivered within the drain (the backlog does not grow), at any latency.
    pub delivered_all: bool,
    pub closed_sockets: u64,
    pub cpu: CpuReport,
}

/// Runs `rate` for `seconds`, then waits up to `drain` for the deliveries.
#[allow(clippy::too_many_arguments)]
pub async fn rate_step(
    target: &Target,
    readers: &Readers,
    writers: &[Arc<tokio_postgres::Client>],
    sql: &str,
    subscribers: usize,
    rate: f64,
    seconds: f64,
    drain: Duration,
) -> anyhow::Result<RateStep> {
    readers.take();
    let cpu = CpuSampler::start(target.pid);
    let t0 = now_us();
    let (inserted, write_s) = paced_inserts(writers, sql, rate, seconds).await?;
    let expected = inserted * subscribers as u64;
    readers
        .wait_for(expected, Duration::from_secs(6), drain)
        .await;
    let cpu = cpu.finish();
    let (delivered, last, mut lat) = readers.take();
    let latency = Latency::from_us(&mut lat);
    let span_s = (last.saturating_sub(t0) as f64 / 1e6).max(write_s);
    Ok(RateStep {
        rate,
        inserted,
        changes_per_s: (inserted as f64 / write_s).round(),
        expected,
        delivered,
        deliveries_per_s: (delivered as f64 / span_s).round(),
        keeping_up: delivered as f64 >= 0.97 * expected as f64 && latency.p95_ms < 1000.0,
        delivered_all: delivered as f64 >= 0.97 * expected as f64,
        latency,
        closed_sockets: readers.closed(),
        cpu,
    })
}

/// Inserts one row at a time until the readers see a delivery (the stream is live), up to 30 s;
/// then waits until every warm-up row reached every subscriber (or 6 s of quiet, at most 60 s),
/// so that no warm-up delivery is counted in the first step.
async fn warm_up(
    readers: &Readers,
    writer: &tokio_postgres::Client,
    sql: &str,
    subscribers: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut rows = 0u64;
    while readers.delivered() == 0 {
        if Instant::now() > deadline {
            bail!("no delivery within 30 s of the first inserts (is the stream live?)");
        }
        let t = i64::try_from(now_us()).unwrap_or(i64::MAX);
        writer.execute(sql, &[&t]).await?;
        rows += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    readers
        .wait_for(
            rows * subscribers as u64,
            Duration::from_secs(6),
            Duration::from_secs(60),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    readers.take();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenario 5: broadcast from the database.

/// The table and trigger of scenario 5: every insert calls `realtime.send` to `topic` (public, so
/// the figure is the database path, not RLS).
pub fn db_broadcast_sql(topic: &str) -> String {
    format!(
        "create table public.bench_events (id bigserial primary key, t int8 not null, body text not null default 'x');
         create function public.bench_events_send() returns trigger language plpgsql as $$
         begin
           perform realtime.send(jsonb_build_object('t', new.t, 'body', new.body), 'insert', '{topic}', false);
           return null;
         end $$;
         create trigger bench_events_send after insert on public.bench_events
           for each row execute function public.bench_events_send();"
    )
}

pub const DB_BROADCAST_INSERT: &str = "insert into public.bench_events (t) values ($1)";

/// Scenario 5 against a gateway started on `db`: `subscribers` sockets in one public channel; for
/// each rate, inserts/s → deliveries/s and insert→client latency. Stops after the first rate
/// that does not keep up. Returns the steps.
pub async fn db_broadcast(
    target: &Target,
    db: &TestDb,
    subscribers: usize,
    rates: &[f64],
    seconds: f64,
) -> anyhow::Result<(f64, Vec<RateStep>)> {
    let topic = "db-room";
    db.client()
        .await?
        .batch_execute(&db_broadcast_sql(topic))
        .await?;
    let since = now_us();
    let token = target.endpoint.token.clone();
    let (clients, join_s) = connect_all(&target.endpoint, subscribers, |_, mut c| {
        let token = token.clone();
        async move {
            c.join(topic, false, None, &token).await?;
            Ok(c)
        }
    })
    .await?;
    let readers = Readers::start(clients, false, since);
    let writers = writers(db).await?;
    warm_up(&readers, &writers[0], DB_BROADCAST_INSERT, subscribers).await?;
    let mut steps = Vec::new();
    for &rate in rates {
        let s = rate_step(
            target,
            &readers,
            &writers,
            DB_BROADCAST_INSERT,
            subscribers,
            rate,
            seconds,
            Duration::from_secs(15),
        )
        .await?;
        let ok = s.keeping_up;
        steps.push(s);
        if !ok {
            break;
        }
    }
    readers.stop().await;
    Ok((join_s, steps))
}

// ---------------------------------------------------------------------------------------------
// Scenario 6: the Postgres Changes grid.

/// Tables of scenario 6: `pgc` without RLS, `pgc_rls` with RLS (any signed-in user reads every
/// row: a policy the gateway decides in process), `pgc_member` with RLS through a membership
/// table (a subquery: checked in SQL); all in `supabase_realtime`.
pub const PG_CHANGES_SQL: &str = "
create table public.pgc (id bigserial primary key, room int not null, t int8 not null, body text not null default 'x');
create table public.pgc_rls (like public.pgc including all);
alter table public.pgc_rls enable row level security;
create policy \"signed-in users read\" on public.pgc_rls for select to authenticated using (auth.uid() is not null);
grant select on public.pgc, public.pgc_rls to anon, authenticated;
alter publication supabase_realtime add table public.pgc, public.pgc_rls;
create table public.pgc_members (room int not null, user_id uuid not null, primary key (room, user_id));
create table public.pgc_member (like public.pgc including all);
alter table public.pgc_member enable row level security;
create policy \"room members read\" on public.pgc_member for select to authenticated
  using (exists (select 1 from public.pgc_members m where m.room = pgc_member.room and m.user_id = auth.uid()));
grant select on public.pgc_member, public.pgc_members to authenticated;
alter publication supabase_realtime add table public.pgc_member;
";

/// One cell of the grid.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Cell {
    pub subscribers: usize,
    pub rls: bool,
    /// With `rls`: the membership policy (`pgc_member`) instead of `auth.uid() is not null`.
    pub member_policy: bool,
    pub filter: bool,
    /// Every subscriber joins the same channel name (as the Supabase docs' examples do), so a
    /// change is one frame shared by all; otherwise each has its own (a frame per subscriber).
    pub shared_topic: bool,
}

impl Cell {
    fn table(&self) -> &'static str {
        match (self.rls, self.member_policy) {
            (false, _) => "pgc",
            (true, false) => "pgc_rls",
            (true, true) => "pgc_member",
        }
    }

    /// Every row goes to room 1, so `room=eq.1` matches every change: the filter's cost without
    /// changing the deliveries.
    fn bindings(&self) -> String {
        let filter = if self.filter {
            ",\"filter\":\"room=eq.1\""
        } else {
            ""
        };
        format!(
            "[{{\"event\":\"INSERT\",\"schema\":\"public\",\"table\":\"{}\"{filter}}}]",
            self.table()
        )
    }

    fn insert_sql(&self) -> String {
        format!(
            "insert into public.{} (room, t) values (1, $1)",
            self.table()
        )
    }

    pub fn label(&self) -> String {
        format!(
            "{} subscribers, rls {}, filter {}{}",
            self.subscribers,
            match (self.rls, self.member_policy) {
                (false, _) => "off",
                (true, false) => "on",
                (true, true) => "member",
            },
            if self.filter { "eq" } else { "none" },
            if self.shared_topic {
                ", one shared topic"
            } else {
                ""
            }
        )
    }
}

/// The outcome of one cell.
#[derive(Clone, Debug, Serialize)]
pub struct CellOutcome {
    pub server: String,
    pub subscribers: usize,
    pub rls: bool,
    pub member_policy: bool,
    pub filter: bool,
    pub shared_topic: bool,
    pub connect_join_s: f64,
    /// Highest commit rate kept up with (changes/s the writers achieved) with p95 < 1 s, 0 if
    /// none.
    pub changes_per_s: f64,
    /// Highest commit rate whose changes all arrived within the drain, at any latency (p95 < 5 s).
    pub changes_per_s_any_latency: f64,
    /// p95 at that step, ms.
    pub p95_ms_any_latency: f64,
    /// Deliveries/s at that step.
    pub deliveries_per_s: f64,
    /// p95 / p99 at that step.
    pub latency: Latency,
    pub steps: Vec<RateStep>,
    /// `pg_recvlogical` draining every change of this cell's steps from its own slot.
    pub recvlogical: Option<RecvLogical>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecvLogical {
    pub changes: u64,
    pub seconds: f64,
    pub changes_per_s: f64,
}

/// Joins one subscriber: the binding, the ok reply, then the "Subscribed to PostgreSQL" system
/// message.
async fn join_pg(c: &mut Client, name: &str, token: &str, bindings: &str) -> anyhow::Result<()> {
    let payload = client::join_payload_with(false, None, token, false, bindings);
    c.join_with(name, &payload).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline, c.ws.next())
            .await
            .context("no \"Subscribed to PostgreSQL\" within 30 s")?
            .context("socket closed while subscribing")??;
        if let Message::Text(t) = &msg {
            if t.contains("Subscribed to PostgreSQL") {
                return Ok(());
            }
            if t.contains("\"system\"") && t.contains("\"error\"") {
                bail!("subscription refused: {t}");
            }
        }
    }
}

/// Runs one cell: `subscribers` sockets (each its own channel name unless `shared_topic`, one
/// INSERT binding), then the
/// rates in turn until one leaves over 3 % undelivered after the drain (the backlog grows) or
/// has p95 ≥ 5 s, then `pg_recvlogical` over the same changes from a slot created before
/// the first step.
#[allow(clippy::too_many_arguments)]
pub async fn pg_changes_cell(
    target: &Target,
    cluster: &PgCluster,
    db: &TestDb,
    secret: &str,
    cell: Cell,
    rates: &[f64],
    seconds: f64,
    recvlogical: bool,
) -> anyhow::Result<CellOutcome> {
    let bindings = cell.bindings();
    let anon = target.endpoint.token.clone();
    let users: Vec<uuid::Uuid> = (0..cell.subscribers)
        .map(|_| uuid::Uuid::new_v4())
        .collect();
    let tokens: Vec<String> = users
        .iter()
        .map(|user| {
            if cell.rls {
                pg::user_token(secret, user)
            } else {
                anon.clone()
            }
        })
        .collect();
    if cell.rls && cell.member_policy {
        // Every user is a member of room 1, where every row goes: deliveries stay N per change.
        db.client()
            .await?
            .execute(
                "insert into public.pgc_members (room, user_id) select 1, unnest($1::uuid[])",
                &[&users],
            )
            .await?;
    }
    let since = now_us();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let (clients, connect_join_s) = connect_all(&target.endpoint, cell.subscribers, |i, mut c| {
        let name = if cell.shared_topic {
            format!("pgc-{}", &run[..8])
        } else {
            format!("pgc-{}-{i}", &run[..8])
        };
        let token = tokens[i].clone();
        let bindings = bindings.clone();
        async move {
            join_pg(&mut c, &name, &token, &bindings).await?;
            Ok(c)
        }
    })
    .await?;
    let readers = Readers::start(clients, true, since);
    let writers = writers(db).await?;
    let insert = cell.insert_sql();
    warm_up(&readers, &writers[0], &insert, cell.subscribers).await?;
    let admin = db.client().await?;
    let slot = format!("bench_recv_{}", &run[..12]);
    if recvlogical {
        admin
            .execute(
                "select pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
    }
    let mut steps: Vec<RateStep> = Vec::new();
    for &rate in rates {
        let s = rate_step(
            target,
            &readers,
            &writers,
            &insert,
            cell.subscribers,
            rate,
            seconds,
            Duration::from_secs(15),
        )
        .await?;
        eprintln!(
            "summary: pg-changes {} @ {rate}/s: {} changes/s committed, {} deliveries/s ({} of {}), p50 {:.0} ms p95 {:.0} ms p99 {:.0} ms{}",
            cell.label(),
            s.changes_per_s,
            s.deliveries_per_s,
            s.delivered,
            s.expected,
            s.latency.p50_ms,
            s.latency.p95_ms,
            s.latency.p99_ms,
            if s.keeping_up {
                ""
            } else {
                " (not keeping up)"
            }
        );
        // Go on while everything arrives (the backlog does not grow) and p95 < 5 s, so that the
        // rate delivered at any latency is known too; p95 < 1 s is the sustained figure.
        let go_on = s.delivered_all && s.latency.p95_ms < 5000.0;
        steps.push(s);
        if !go_on {
            break;
        }
    }
    readers.stop().await;
    let recv = if recvlogical {
        let end: String = admin
            .query_one("select pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let changes: u64 = steps.iter().map(|s| s.inserted).sum();
        let seconds = pg::recvlogical(cluster, db, &slot, "supabase_realtime", &end)?;
        pg::drop_slot(&admin, &slot).await?;
        Some(RecvLogical {
            changes,
            seconds: (seconds * 1000.0).round() / 1000.0,
            changes_per_s: (changes as f64 / seconds).round(),
        })
    } else {
        None
    };
    // The sustained step: the last of the unbroken run of steps that kept up from the first.
    let best = steps.iter().take_while(|s| s.keeping_up).last();
    let any = steps
        .iter()
        .take_while(|s| s.delivered_all && s.latency.p95_ms < 5000.0)
        .last();
    Ok(CellOutcome {
        server: target.name.clone(),
        subscribers: cell.subscribers,
        rls: cell.rls,
        member_policy: cell.member_policy,
        filter: cell.filter,
        shared_topic: cell.shared_topic,
        connect_join_s: (connect_join_s * 1000.0).round() / 1000.0,
        changes_per_s: best.map_or(0.0, |s| s.changes_per_s),
        changes_per_s_any_latency: any.map_or(0.0, |s| s.changes_per_s),
        p95_ms_any_latency: any.map_or(0.0, |s| s.latency.p95_ms),
        deliveries_per_s: best.map_or(0.0, |s| s.deliveries_per_s),
        latency: best.map_or_else(Latency::default, |s| s.latency.clone()),
        steps,
        recvlogical: recv,
    })
}

/// The JSON step of a cell: the gateway's result and `pg_recvlogical`'s, with their ratio.
pub fn cell_json(cell: &Cell, o: &CellOutcome) -> anyhow::Result<Value> {
    let mut results = vec![serde_json::to_value(o)?];
    let mut ratios = Value::Null;
    if let Some(r) = &o.recvlogical {
        results.push(
            json!({"server": "pg_recvlogical", "changes_per_s": r.changes_per_s,
                            "changes": r.changes, "seconds": r.seconds}),
        );
        ratios = json!({"changes_per_s": ratio(o.changes_per_s, r.changes_per_s)});
    }
    Ok(json!({
        "step": {"subscribers": cell.subscribers, "rls": cell.rls, "member_policy": cell.member_policy, "filter": if cell.filter { "eq" } else { "none" },
                 "topics": if cell.shared_topic { "shared" } else { "distinct" }},
        "results": results,
        "ratios": ratios,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stamp_reads_through_jsonb_spacing() {
        assert_eq!(stamp(br#"{"t": 123, "id": "x"}"#), Some(123));
        assert_eq!(stamp(br#"{"record":{"id":1,"t":42}}"#), Some(42));
        assert_eq!(stamp(br#"{"columns":[{"name":"t","type":"int8"}]}"#), None);
    }
}
