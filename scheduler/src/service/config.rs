//! `shoal scheduler`'s config file: where and as whom the QUIC service runs, and the core's
//! settings as `[core]`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ServiceConfig;
use crate::{SchedulerConfig, SchedulerError};

/// Everything `shoal scheduler` can be told: one TOML file (`--config`); every field is also a
/// flag of the same name (`[core]` fields as `--core-<name>`). The scheduler keeps no data on
/// disk (its state is soft), so there is no data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerServiceConfig {
    /// The scheduler's name: its certificate's common name, which peers dial (their `scheduler_name`).
    pub host_id: String,
    /// UDP address of the QUIC service.
    pub listen: SocketAddr,
    /// Directory holding `tls.crt`, `tls.key` and `ca.crt` (a mounted Secret).
    pub tls_dir: PathBuf,
    /// TCP address of `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: SocketAddr,
    /// The only origins a task (or a preheat) may name, so the only ones seeds are ordered to:
    /// registries as `host[:port]`, `s3://HOST[:PORT]/BUCKET`, `dir:/PATH`. Empty: none.
    pub allowed_origins: Vec<String>,
    /// The core's limits and selection settings.
    pub core: SchedulerConfig,
}

impl Default for SchedulerServiceConfig {
    fn default() -> Self {
        Self {
            host_id: "shoal-scheduler".into(),
            listen: SocketAddr::from(([0, 0, 0, 0], 4471)),
            tls_dir: PathBuf::from("/etc/shoal/tls"),
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 4490)),
            allowed_origins: Vec::new(),
            core: SchedulerConfig::default(),
        }
    }
}

impl SchedulerServiceConfig {
    /// Reads a TOML config file; unknown fields are an error naming the field.
    pub fn from_toml_file(path: &Path) -> Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SchedulerError::Config(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| SchedulerError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks every field (the core's ranges included).
    pub fn validate(&self) -> Result<(), SchedulerError> {
        if self.host_id.is_empty() {
            return Err(SchedulerError::Config(
                "host_id must be the scheduler certificate's name".into(),
            ));
        }
        allowed_list(&self.allowed_origins)?;
        self.core.validate()
    }

    /// The settings the QUIC service runs with.
    pub fn service(&self) -> ServiceConfig {
        ServiceConfig {
            listen: self.listen,
            host_id: self.host_id.clone(),
            tls_dir: self.tls_dir.clone(),
            allowed_origins: self.allowed_origins.clone(),
            core: self.core.clone(),
        }
    }
}

/// `allowed_origins` parsed, with an error naming the bad entry.
pub(crate) fn allowed_list(
    list: &[String],
) -> Result<shoal_origin::AllowedOrigins, SchedulerError> {
    shoal_origin::AllowedOrigins::parse(list, shoal_origin::ListOwner::Scheduler)
        .map_err(|e| SchedulerError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_config_reads_toml_with_a_core_section_and_keeps_defaults() {
        let text = "host_id = \"sched-a\"\nlisten = \"127.0.0.1:5000\"\n[core]\nmax_parents = 3\n";
        let cfg: SchedulerServiceConfig = toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.core.max_parents, 3);
        assert_eq!(cfg.metrics_listen.port(), 4490);
        assert_eq!(cfg.service().listen.port(), 5000);
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(SchedulerServiceConfig::default().listen.port(), 4471);
        let err = toml::from_str::<SchedulerServiceConfig>("listen_addr = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let bad = SchedulerServiceConfig {
            allowed_origins: vec!["reg.example".into(), "http://reg.example".into()],
            ..cfg.clone()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("allowed_origins entry \"http://reg.example\""),
            "{err}"
        );
        let round = toml::to_string(&cfg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            toml::from_str::<SchedulerServiceConfig>(&round).ok(),
            Some(cfg)
        );
    }
}
