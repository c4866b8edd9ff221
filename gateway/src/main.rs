//! The `realtime-gateway` binary: reads the configuration, sets up logging, runs the gateway
//! until SIGINT or SIGTERM.

use anyhow::Context;
use realtime_gateway::config::LogFormat;
use realtime_gateway::{Config, Secret};
use tracing_subscriber::EnvFilter;

/// mimalloc: frames are allocated by the router's thread and freed by whichever socket task
/// drops the last reference; glibc malloc serialises those cross-thread frees on the arena lock
/// (about a quarter of the gateway's CPU under Postgres Changes fan-out, by `perf`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let mut config = Config::from_env_and_args();
    if let Err(e) = config.validate() {
        eprintln!("realtime-gateway: invalid configuration: {e}");
        return std::process::ExitCode::from(2);
    }
    init_logging(config.log_format);
    if config.jwt_secret.is_none() {
        config.jwt_secret = Some(development_secret());
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("realtime-gateway: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("realtime-gateway: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let addr = std::net::SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!("realtime-gateway listening on {local} (ws://{local}/realtime/v1/websocket)");
    realtime_gateway::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// No secret configured: a random one for this run, and keys a developer can paste into
/// `createClient(url, key)`.
fn development_secret() -> Secret {
    use rand::Rng;
    let secret: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + 10 * 365 * 86_400)
        .unwrap_or(u64::MAX / 2);
    let key = |role: &str| {
        realtime_gateway::auth::sign_hs256(
            &secret,
            &serde_json::json!({"iss": "supabase", "role": role, "exp": exp}),
        )
    };
    println!("no API_JWT_SECRET set: generated a secret for this run only");
    println!("anon key:         {}", key("anon"));
    println!("service_role key: {}", key("service_role"));
    Secret::new(secret)
}
