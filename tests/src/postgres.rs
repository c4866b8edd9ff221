//! A throwaway Postgres cluster for tests: one per test process, a fresh database per test.
//!
//! [`cluster`] starts the cluster on first use (initdb into a temporary directory, `wal_level=logical`,
//! listening on 127.0.0.1 on a free port, `fsync=off`) and shares it with every test of the process.
//! `initdb` refuses to run as root, so when the tests run as root (CI does) the Postgres binaries run as
//! the unprivileged `postgres` user through `runuser`.
//!
//! Statics are never dropped, so the cluster is not stopped by a destructor: a watchdog process, started
//! with the cluster in its own session, polls the test process and, once it has exited for whatever
//! reason (success, panic, kill -9, Ctrl-C), stops Postgres with `pg_ctl stop -m immediate` and removes
//! the directory.
//!
//! Authentication: the superuser `postgres` is trusted from 127.0.0.1; every other role must log in with
//! its password (`md5` in `pg_hba.conf`, which also accepts SCRAM-stored passwords). TLS is on when
//! `openssl` is available to make a self-signed certificate ([`PgCluster::tls`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tokio::sync::OnceCell;

/// A running throwaway cluster.
#[derive(Debug)]
pub struct PgCluster {
    port: u16,
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<&'static str>,
    tls: bool,
}

/// A database created for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    /// Superuser URL of this database.
    pub url: String,
}

impl TestDb {
    /// A connected superuser client; its connection driver runs on a spawned task.
    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

/// Connects a tokio-postgres client (no TLS) and spawns its driver.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

static CLUSTER: OnceCell<PgCluster> = OnceCell::const_new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The process's cluster, started on first call.
pub async fn cluster() -> &'static PgCluster {
    CLUSTER
        .get_or_init(|| async {
            tokio::task::spawn_blocking(PgCluster::start)
                .await
                .expect("cluster start task")
                .unwrap_or_else(|e| panic!("cannot start the test postgres cluster: {e:#}"))
        })
        .await
}

impl PgCluster {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Superuser URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// URL for another role with a password.
    pub fn url_for(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Whether the server accepts TLS (a self-signed certificate).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The directory holding the Postgres binaries (`pg_recvlogical`, `pg_ctl`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A command running Postgres binary `name` as the cluster's owner.
    pub fn command(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        }
    }

    /// Creates an empty database for one test.
    pub async fn fresh_database(&self) -> anyhow::Result<TestDb> {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{}_{n}", std::process::id());
        let admin = connect(&self.url("postgres")).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .context("create database")?;
        Ok(TestDb {
            url: self.url(&name),
            name,
        })
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every connection is cut.
    pub fn restart(&self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-t", "60", "-m", "fast", "restart"]))
        .context("pg_ctl restart")
    }

    fn start() -> anyhow::Result<PgCluster> {
        let bin = find_bin_dir()?;
        let run_as = if is_root() { Some("postgres") } else { None };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("realtime-pg-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).context("create cluster dir")?;
        if let Some(user) = run_as {
            run(Command::new("chown").arg(format!("{user}:")).arg(&dir))?;
        }
        let data = dir.join("data");
        let port = free_port()?;
        let mut cluster = PgCluster {
            port,
            dir: dir.clone(),
            bin,
            run_as,
            tls: false,
        };
        // The watchdog first, so that a failure below still cleans up.
        spawn_watchdog(&cluster)?;
        run(cluster.command("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]))
        .context("initdb")?;
        cluster.tls = make_certificate(&cluster, &data);
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 64\nmax_wal_senders = 64\n\
             max_connections = 200\nfsync = off\nfull_page_writes = off\n\
             synchronous_commit = on\nwal_sender_timeout = 60s\nTimeZone = 'UTC'\n\
             log_min_messages = warning\n",
            dir.display()
        );
        if cluster.tls {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        append(&data.join("postgresql.conf"), &conf)?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 md5\n\
             host replication all 127.0.0.1/32 md5\n",
        )?;
        run(cluster
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "start"]))
        .with_context(|| {
            format!(
                "pg_ctl start; log:\n{}",
                std::fs::read_to_string(dir.join("log")).unwrap_or_default()
            )
        })?;
        Ok(cluster)
    }
}

fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    // Highest version first.
    candidates.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path));
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
        .context(
            "initdb not found in /usr/lib/postgresql/*/bin or on PATH: \
             install the Debian package `postgresql` (apt-get install postgresql)",
        )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A self-signed certificate in the data directory; false if openssl is unavailable.
fn make_certificate(cluster: &PgCluster, data: &Path) -> bool {
    let made = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-x509",
            "-days",
            "2",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-newkey", "rsa:2048", "-keyout"])
        .arg(data.join("server.key"))
        .arg("-out")
        .arg(data.join("server.crt"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !made {
        return false;
    }
    if let Some(user) = cluster.run_as {
        let owned = Command::new("chown")
            .arg(format!("{user}:"))
            .arg(data.join("server.key"))
            .arg(data.join("server.crt"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !owned {
            return false;
        }
    }
    Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts a process in its own session that stops the cluster once this process is gone.
fn spawn_watchdog(cluster: &PgCluster) -> anyhow::Result<()> {
    let pid = std::process::id();
    let data = cluster.dir.join("data");
    let pg_ctl = cluster.bin.join("pg_ctl");
    let stop = match cluster.run_as {
        Some(user) => format!(
            "runuser -u {user} -- '{}' -D '{}' -m immediate stop",
            pg_ctl.display(),
            data.display()
        ),
        None => format!(
            "'{}' -D '{}' -m immediate stop",
            pg_ctl.display(),
            data.display()
        ),
    };
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         {stop} >/dev/null 2>&1; rm -rf '{}'",
        cluster.dir.display()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn cluster watchdog (setsid sh)")?;
    Ok(())
}

/// Polls `check` every 20 ms until it returns `Some`, failing after `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
