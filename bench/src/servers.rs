//! The servers a run measures: started here as child processes (the default), or already running
//! (address and pid given on the command line).

use crate::client::Endpoint;
use anyhow::{Context, bail};
use realtime_protocol::Vsn;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The JWT secret used for gateways this tool starts.
pub const DEV_SECRET: &str = "realtime-bench-secret-with-at-least-32-characters";

/// One server under test.
#[derive(Debug)]
pub struct Target {
    /// `gateway` or `limit-server`.
    pub name: String,
    pub endpoint: Endpoint,
    /// For `/proc` sampling.
    pub pid: Option<u32>,
    child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An anon key for `secret`, valid for a day.
pub fn anon_key(secret: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 86_400;
    realtime_gateway::auth::sign_hs256(secret, &json!({"role": "anon", "exp": exp}))
}

impl Target {
    /// A server that is already running.
    pub fn attach(name: &str, addr: &str, pid: Option<u32>, secret: &str) -> Target {
        Target {
            name: name.to_owned(),
            endpoint: Endpoint {
                addr: addr.to_owned(),
                token: anon_key(secret),
                vsn: Vsn::V2,
            },
            pid,
            child: None,
        }
    }

    /// Starts `binary` on a free loopback port with `env`, and waits until it accepts.
    pub fn spawn(name: &str, binary: &Path, env: &[(&str, String)]) -> anyhow::Result<Target> {
        let port = free_port()?;
        let mut cmd = Command::new(binary);
        cmd.env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("API_JWT_SECRET", DEV_SECRET)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let addr = format!("127.0.0.1:{port}");
        let target = Target {
            name: name.to_owned(),
            endpoint: Endpoint {
                addr: addr.clone(),
                token: anon_key(DEV_SECRET),
                vsn: Vsn::V2,
            },
            pid: Some(child.id()),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(&addr).is_err() {
            if Instant::now() > deadline {
                bail!("{name} did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(target)
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A binary next to this one (`target/release/…`), or in `dir` when given.
pub fn sibling_binary(dir: Option<&Path>, name: &str) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for the current executable")?
            .to_path_buf(),
    };
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found; build it first (cargo build --release -p realtime-gateway -p realtime-bench)",
            path.display()
        );
    }
    Ok(path)
}
