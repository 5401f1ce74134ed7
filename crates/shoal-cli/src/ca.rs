//! `shoal ca`: create the cluster CA and issue node certificates (see shoal-tls).

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use shoal_tls::{ClusterCa, NodeCertRequest, DEFAULT_CA_DAYS, DEFAULT_NODE_DAYS};

/// The `shoal ca` subcommands.
#[derive(Subcommand)]
pub enum CaCommand {
    /// Create a cluster CA: writes ca.crt and ca.key (mode 0600) into DIR.
    Init {
        /// Directory for ca.crt and ca.key (created with mode 0700).
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Shoal cluster CA")]
        name: String,
        /// Days the CA is valid.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
    },
    /// Issue a node certificate: writes tls.crt, tls.key and ca.crt into OUT (a Secret's files).
    Issue {
        /// Node name: certificate common name and first DNS name (peers dial it by this name).
        #[arg(long)]
        name: String,
        /// The CA directory (from `shoal ca init`).
        #[arg(long = "dir")]
        ca_dir: PathBuf,
        /// Output directory (created with mode 0700).
        #[arg(long)]
        out: PathBuf,
        /// More DNS names for the certificate (repeatable).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses for the certificate (repeatable).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_NODE_DAYS)]
        days: u32,
    },
}

/// Runs one `shoal ca` subcommand.
pub fn run(cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Init { dir, name, days } => {
            ClusterCa::init(&dir, &name, days)
                .with_context(|| format!("creating the cluster CA in {}", dir.display()))?;
            println!("cluster CA written to {} (ca.crt, ca.key)", dir.display());
        }
        CaCommand::Issue {
            name,
            ca_dir,
            out,
            dns,
            ip,
            days,
        } => {
            if days == 0 || days > shoal_tls::MAX_DAYS {
                anyhow::bail!("--days {days}: choose 1 to {}", shoal_tls::MAX_DAYS);
            }
            let ca = ClusterCa::load(&ca_dir)
                .with_context(|| format!("loading the cluster CA from {}", ca_dir.display()))?;
            let mut req = NodeCertRequest::new(&name, days);
            req.dns = dns;
            req.ips = ip;
            ca.issue(&req)
                .with_context(|| format!("issuing a certificate for {name}"))?
                .write_to(&out)
                .with_context(|| {
                    format!("writing the certificate for {name} to {}", out.display())
                })?;
            println!(
                "certificate for {name} written to {} (tls.crt, tls.key, ca.crt)",
                out.display()
            );
        }
    }
    Ok(())
}
