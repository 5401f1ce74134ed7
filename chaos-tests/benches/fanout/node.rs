//! The bench's child processes: `fanout node scheduler|peer ...` runs one Shoal node in the
//! network namespace `ip netns exec` put it in, until SIGTERM/SIGKILL. One process per node, so
//! each has its own CPU counters in /proc and can be killed alone.

use std::net::SocketAddr;
use std::path::PathBuf;

use shoal_peer::PeerConfig;
use shoal_scheduler::service::ServiceConfig;
use shoal_scheduler::SchedulerConfig;

/// Runs the node named by `args` (`scheduler LISTEN TLS_DIR ALLOWED,ORIGINS` or `peer CONFIG.toml`); exits
/// non-zero with the reason when it cannot start.
pub fn run(args: &[String]) -> ! {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fail(&format!("tokio runtime: {e}")),
    };
    let result = match args {
        [role, listen, tls, allowed] if role == "scheduler" => {
            let listen: SocketAddr = match listen.parse() {
                Ok(a) => a,
                Err(e) => fail(&format!("scheduler listen address {listen}: {e}")),
            };
            let cfg = ServiceConfig {
                listen,
                host_id: "scheduler".into(),
                tls_dir: PathBuf::from(tls),
                allowed_origins: allowed.split(',').map(str::to_string).collect(),
                core: SchedulerConfig::default(),
            };
            rt.block_on(shoal_scheduler::service::run(cfg))
                .map_err(|e| e.to_string())
        }
        [role, config] if role == "peer" => {
            match PeerConfig::from_toml_file(std::path::Path::new(config)) {
                Ok(cfg) => rt.block_on(shoal_peer::run(cfg)).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
        _ => Err(format!("unknown node command {args:?}")),
    };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("fanout node: {msg}");
    std::process::exit(1)
}
