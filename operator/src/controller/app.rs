//! `kvroute operator`: flags, and the wiring of metrics server, leader election and controller.
//!
//! Owns start-up only; reconcile logic lives in the parent module. Flags fall back to
//! `KVROUTE_*` environment variables; they are validated once here, errors naming the flag.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tracing::{error, info};

use super::capacity::GrpcCapacity;
use super::desired::AgentDefaults;
use super::metrics::{self, Metrics};
use super::Context;
use crate::k8s::lease::{LeaseError, LeaseLock};

/// Flags of `kvroute operator`.
#[derive(clap::Args, Debug, Clone)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "KVROUTE_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Agent image for ModelDeployments that name none.
    #[arg(
        long,
        env = "KVROUTE_AGENT_IMAGE",
        default_value = "kvroute-agent:latest"
    )]
    pub agent_image: String,
    /// Image of the init container that downloads `spec.model.url` (needs curl).
    #[arg(
        long,
        env = "KVROUTE_FETCH_IMAGE",
        default_value = "curlimages/curl:8.11.1"
    )]
    pub fetch_image: String,
    /// Images a ModelDeployment may name (`agentImage`, `model.image.reference`) must start with
    /// one of these (repeat the flag, or comma-separate; e.g. `registry.example/kvroute/`);
    /// none: any image. A spec naming another is refused (status `Invalid`).
    #[arg(
        long = "allowed-image-prefix",
        env = "KVROUTE_ALLOWED_IMAGE_PREFIXES",
        value_delimiter = ','
    )]
    pub allowed_image_prefixes: Vec<String>,
    /// Directories a ModelDeployment's `model.hostPath` must lie in (repeat, or comma-separate);
    /// none: any path. A spec naming another is refused (status `Invalid`).
    #[arg(
        long = "allowed-host-path",
        env = "KVROUTE_ALLOWED_HOST_PATHS",
        value_delimiter = ','
    )]
    pub allowed_host_paths: Vec<String>,
    /// Secret (in each ModelDeployment's namespace) holding the token agents require of every
    /// caller: mounted into agent pods as their `--auth-token-file`. Give the gateways the same
    /// token (`--agent-token-file`; the chart's `agentToken.secretName` does both).
    #[arg(long, env = "KVROUTE_AGENT_TOKEN_SECRET")]
    pub agent_token_secret: Option<String>,
    /// Key of the token in that Secret.
    #[arg(long, env = "KVROUTE_AGENT_TOKEN_KEY", default_value = "token")]
    pub agent_token_key: String,
    /// Gateway base URL written into each ModelDeployment's `status.endpoint`.
    #[arg(long, env = "KVROUTE_GATEWAY_ENDPOINT")]
    pub gateway_endpoint: Option<String>,
    /// Address of the `/metrics` and `/healthz` server.
    #[arg(long, env = "KVROUTE_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Reconcile only while holding a coordination.k8s.io Lease (run two replicas safely).
    #[arg(long, env = "KVROUTE_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, env = "KVROUTE_LEASE_NAME", default_value = "kvroute-operator")]
    pub lease_name: String,
    /// Namespace of the leader Lease (default: the pod's namespace, `POD_NAMESPACE`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// This candidate's identity (default: the pod name, `POD_NAME`).
    #[arg(long, env = "POD_NAME")]
    pub holder_id: Option<String>,
    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "KVROUTE_LEASE_SECONDS", default_value_t = 15)]
    pub lease_seconds: u64,
}

/// Start-up errors.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("--{flag}: {message} (got {value:?})")]
    Flag {
        flag: &'static str,
        value: String,
        message: &'static str,
    },
    #[error("connecting to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error("metrics server on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl OperatorArgs {
    /// Checks the flags that clap's types cannot.
    pub fn validate(&self) -> Result<(), AppError> {
        if let Some(url) = &self.gateway_endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(AppError::Flag {
                    flag: "gateway-endpoint",
                    value: url.clone(),
                    message: "must be an http:// or https:// URL",
                });
            }
        }
        if self.leader_election && !(4..=3600).contains(&self.lease_seconds) {
            return Err(AppError::Flag {
                flag: "lease-seconds",
                value: self.lease_seconds.to_string(),
                message: "must be within 4..=3600",
            });
        }
        for p in &self.allowed_host_paths {
            if !p.trim().is_empty() && !p.trim().starts_with('/') {
                return Err(AppError::Flag {
                    flag: "allowed-host-path",
                    value: p.clone(),
                    message: "must be an absolute directory",
                });
            }
        }
        for (flag, v) in [
            ("agent-image", &self.agent_image),
            ("fetch-image", &self.fetch_image),
            ("lease-name", &self.lease_name),
            ("agent-token-key", &self.agent_token_key),
        ] {
            if v.trim().is_empty() {
                return Err(AppError::Flag {
                    flag,
                    value: v.clone(),
                    message: "must not be empty",
                });
            }
        }
        Ok(())
    }

    pub fn defaults(&self) -> AgentDefaults {
        AgentDefaults {
            agent_image: self.agent_image.clone(),
            fetch_image: self.fetch_image.clone(),
            gateway_endpoint: self.gateway_endpoint.clone(),
            allowed_image_prefixes: non_empty(&self.allowed_image_prefixes),
            allowed_host_paths: non_empty(&self.allowed_host_paths),
            agent_token: self
                .agent_token_secret
                .as_ref()
                .filter(|s| !s.trim().is_empty())
                .map(|s| (s.trim().to_string(), self.agent_token_key.clone())),
        }
    }
}

/// The list without empty entries (an empty environment variable gives one).
fn non_empty(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Runs the operator until a shutdown signal (or until the Lease is lost, which is an error so
/// the pod restarts and campaigns again).
pub async fn serve(args: OperatorArgs) -> Result<(), AppError> {
    args.validate()?;
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|source| AppError::Metrics {
            addr: args.metrics_addr,
            source,
        })?;
    let m = metrics.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::serve_on(listener, m).await {
            error!(error = %e, "metrics server stopped");
        }
    });
    let reporter = kube::runtime::events::Reporter {
        controller: crate::k8s::FIELD_MANAGER.into(),
        instance: args.holder_id.clone(),
    };
    let ctx = Arc::new(Context::new(
        client.clone(),
        args.defaults(),
        metrics.clone(),
        Arc::new(GrpcCapacity::default()),
        reporter,
    ));
    if !args.leader_election {
        metrics.set_leader(true);
        super::run(ctx, args.namespace.clone()).await;
        return Ok(());
    }
    let lease_ns = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let holder = args
        .holder_id
        .clone()
        .unwrap_or_else(|| format!("kvroute-operator-{}", std::process::id()));
    let lock = LeaseLock {
        api: Api::<Lease>::namespaced(client, &lease_ns),
        name: args.lease_name.clone(),
        holder,
        duration: Duration::from_secs(args.lease_seconds),
    };
    info!(lease = %lock.name, namespace = %lease_ns, holder = %lock.holder, "campaigning for leadership");
    lock.acquire(Duration::from_secs(2)).await?;
    metrics.set_leader(true);
    // Renew at a third of the lease duration: two renewals may fail before the lease lapses.
    let renew = Duration::from_secs((args.lease_seconds / 3).max(1));
    tokio::select! {
        _ = super::run(ctx, args.namespace.clone()) => {
            // Graceful shutdown (SIGTERM): hand the lease over now rather than after it lapses.
            metrics.set_leader(false);
            lock.release().await?;
            Ok(())
        }
        lost = lock.keep(renew) => {
            metrics.set_leader(false);
            Err(lost.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: OperatorArgs,
    }

    #[test]
    fn flags_parse_and_bad_values_name_the_flag() {
        let ok = Cli::try_parse_from([
            "x",
            "--gateway-endpoint",
            "http://gw:80/v1",
            "--leader-election",
        ])
        .unwrap();
        assert!(ok.args.validate().is_ok());
        assert_eq!(
            ok.args.defaults().gateway_endpoint.as_deref(),
            Some("http://gw:80/v1")
        );
        let bad = Cli::try_parse_from(["x", "--gateway-endpoint", "gw:80"]).unwrap();
        let e = bad.args.validate().unwrap_err().to_string();
        assert!(e.starts_with("--gateway-endpoint"), "{e}");
        let bad = Cli::try_parse_from(["x", "--leader-election", "--lease-seconds", "1"]).unwrap();
        assert!(bad
            .args
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--lease-seconds"));
        assert!(Cli::try_parse_from(["x", "--metrics-addr", "nonsense"]).is_err());
    }

    #[test]
    fn allow_lists_repeat_or_comma_separate_and_a_relative_host_path_is_refused() {
        let ok = Cli::try_parse_from([
            "x",
            "--allowed-image-prefix",
            "a.example/,b.example/kvroute/",
            "--allowed-image-prefix",
            "c.example/",
            "--allowed-host-path",
            "/models,",
        ])
        .unwrap();
        assert!(ok.args.validate().is_ok());
        let d = ok.args.defaults();
        assert_eq!(
            d.allowed_image_prefixes,
            ["a.example/", "b.example/kvroute/", "c.example/"]
        );
        assert_eq!(d.allowed_host_paths, ["/models"], "empty entries dropped");
        let none = Cli::try_parse_from(["x"]).unwrap().args.defaults();
        assert!(none.allowed_image_prefixes.is_empty() && none.allowed_host_paths.is_empty());
        assert_eq!(none.agent_token, None);
        let token = Cli::try_parse_from(["x", "--agent-token-secret", "s"]).unwrap();
        assert_eq!(
            token.args.defaults().agent_token,
            Some(("s".to_string(), "token".to_string()))
        );
        let bad = Cli::try_parse_from(["x", "--agent-token-key", " "]).unwrap();
        assert!(bad
            .args
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("--agent-token-key"));
        let bad = Cli::try_parse_from(["x", "--allowed-host-path", "models"]).unwrap();
        let e = bad.args.validate().unwrap_err().to_string();
        assert!(e.starts_with("--allowed-host-path"), "{e}");
    }
}
