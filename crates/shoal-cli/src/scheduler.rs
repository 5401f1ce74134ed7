//! `shoal scheduler`: the scheduler's QUIC service (shoal-scheduler) with its metrics and health
//! server (shoal-telemetry). The config is one TOML file (`--config`, a
//! `SchedulerServiceConfig`); every field is also a flag of the same name (`[core]` fields as
//! `--core-<name>`), and flags win over the file.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use shoal_scheduler::service::SchedulerService;
use shoal_scheduler::SchedulerServiceConfig;

use crate::peer::config_flags;

config_flags! {
    /// Every `SchedulerServiceConfig` field as a flag.
    pub struct SchedulerFlags => SchedulerServiceConfig {
        /// The scheduler certificate's name, which peers dial [default: shoal-scheduler].
        host_id: String => set host_id,
        /// UDP address of the QUIC service [default: 0.0.0.0:4471].
        listen: std::net::SocketAddr => set listen,
        /// Directory with tls.crt, tls.key and ca.crt [default: /etc/shoal/tls].
        tls_dir: PathBuf => set tls_dir,
        /// TCP address of /metrics, /healthz and /readyz [default: 0.0.0.0:4490].
        metrics_listen: std::net::SocketAddr => set metrics_listen,
        /// A host silent this long (s) is expired with its pieces.
        core_host_timeout_secs: u64 => set core.host_timeout_secs,
        /// Most hosts registered at once.
        core_max_hosts: usize => set core.max_hosts,
        /// Most tasks (blobs) tracked at once.
        core_max_tasks: usize => set core.max_tasks,
        /// Most tasks one peer takes part in at once.
        core_max_tasks_per_host: usize => set core.max_tasks_per_host,
        /// Most tasks one seed takes part in at once.
        core_max_tasks_per_seed: usize => set core.max_tasks_per_seed,
        /// Most peers tracked in one task.
        core_max_peers_per_task: usize => set core.max_peers_per_task,
        /// Most pieces one blob may have.
        core_max_pieces_per_task: u32 => set core.max_pieces_per_task,
        /// Longest zone or rack label.
        core_max_label_len: usize => set core.max_label_len,
        /// Most addresses one host may register.
        core_max_addresses: usize => set core.max_addresses,
        /// Most upload slots one host may claim.
        core_max_upload_slots: u32 => set core.max_upload_slots,
        /// Most parents in one decision (1..=8).
        core_max_parents: usize => set core.max_parents,
        /// Holders examined per decision before picking.
        core_candidate_limit: usize => set core.candidate_limit,
        /// Most holders examined in one decision.
        core_scan_limit: usize => set core.scan_limit,
        /// Most ordinary peers fetching one blob from the origin at once.
        core_back_to_source_limit: u32 => set core.back_to_source_limit,
        /// How long a waiting peer waits before asking again (ms).
        core_wait_retry_ms: u64 => set core.wait_retry_ms,
        /// Half-life of a host's failure score (s).
        core_failure_half_life_secs: u64 => set core.failure_half_life_secs,
        /// Most ancestors visited by the cycle check.
        core_cycle_check_limit: usize => set core.cycle_check_limit,
    }
    lists {
        /// The only origins tasks and preheats may name: registries as HOST[:PORT],
        /// s3://HOST[:PORT]/BUCKET, dir:/PATH [default: none].
        allowed_origins: String => allowed_origins,
    }
}

/// `shoal scheduler`: run the scheduler until SIGINT/SIGTERM.
#[derive(Args, Debug)]
pub struct SchedulerArgs {
    /// TOML config file (the fields of `SchedulerServiceConfig`); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective config as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    flags: SchedulerFlags,
}

/// The config from the file (if any) with the flags written over it.
pub fn effective_config(args: &SchedulerArgs) -> anyhow::Result<SchedulerServiceConfig> {
    let mut cfg = match &args.config {
        Some(path) => SchedulerServiceConfig::from_toml_file(path)?,
        None => SchedulerServiceConfig::default(),
    };
    args.flags.clone().apply(&mut cfg);
    cfg.validate()?;
    Ok(cfg)
}

/// Runs `shoal scheduler`.
pub fn run(args: SchedulerArgs) -> anyhow::Result<()> {
    let cfg = effective_config(&args)?;
    if args.print_config {
        print!("{}", toml::to_string(&cfg).context("printing the config")?);
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut registry = shoal_telemetry::Registry::default();
        let service = SchedulerService::start(cfg.service(), &mut registry)
            .context("starting the scheduler")?;
        // Ready as soon as the endpoint is bound: the state is soft and fills as peers register.
        let server =
            shoal_telemetry::serve(cfg.metrics_listen, registry, Arc::new(|| true)).await?;
        tracing::info!(quic = ?service.local_addr().ok(), metrics = %server.local_addr(), host = %cfg.host_id, "scheduler running");
        wait_for_signal().await?;
        tracing::info!("scheduler shutting down");
        service.shutdown();
        Ok(())
    })
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Command;

    #[test]
    fn every_config_field_has_a_flag_and_flags_override_the_file() {
        let value = toml::Value::try_from(SchedulerServiceConfig::default()).unwrap();
        let cmd = SchedulerArgs::augment_args(Command::new("scheduler"));
        assert_eq!(
            crate::peer::tests::missing_flags(&cmd, &value),
            Vec::<String>::new()
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "host_id = \"s1\"\n[core]\nmax_parents = 2\nmax_hosts = 10\n",
        )
        .unwrap();
        let m = cmd.get_matches_from([
            "scheduler",
            "--config",
            file.to_str().unwrap(),
            "--core-max-parents",
            "5",
            "--allowed-origins",
            "reg.example,127.0.0.1:5000",
        ]);
        let args = <SchedulerArgs as clap::FromArgMatches>::from_arg_matches(&m).unwrap();
        let cfg = effective_config(&args).unwrap();
        assert_eq!(cfg.host_id, "s1");
        assert_eq!(cfg.core.max_parents, 5);
        assert_eq!(cfg.core.max_hosts, 10);
        assert_eq!(cfg.allowed_origins, ["reg.example", "127.0.0.1:5000"]);
        assert_eq!(cfg.listen.port(), 4471);
    }
}
