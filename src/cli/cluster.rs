//! `agent-env run` (the controller) and `agent-env wait` (the agent pod's
//! init container).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{StateArgs, fail};
use crate::cluster;
use crate::metrics::Metrics;

/// Where the service account's namespace is mounted in a pod.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// `run` arguments.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Env root (a volume shared with the agents), state database and master key.
    #[command(flatten)]
    pub state: StateArgs,
    /// Watch only this namespace; all namespaces when unset.
    #[arg(long, env = "AGENT_ENV_NAMESPACE")]
    pub namespace: Option<String>,
    /// Namespace of the builtin ConfigMap and the leader Lease; default: the
    /// service account's namespace, else `agent-env-system`.
    #[arg(long, env = "AGENT_ENV_OPERATOR_NAMESPACE")]
    pub operator_namespace: Option<String>,
    /// Name of the ConfigMap holding the builtin layer (`agents.json`,
    /// `marketplaces-builtin.json`, `mcp-builtin.json`).
    #[arg(
        long,
        env = "AGENT_ENV_CONFIG_MAP",
        default_value = "agent-env-builtin"
    )]
    pub config_map: String,
    /// Name of the Lease replicas elect a leader on.
    #[arg(
        long,
        env = "AGENT_ENV_LEASE_NAME",
        default_value = "agent-env-operator"
    )]
    pub lease_name: String,
    /// This replica's name in the Lease and in events; default: the host name.
    #[arg(long, env = "AGENT_ENV_IDENTITY")]
    pub identity: Option<String>,
    /// How long a leader that stopped renewing keeps the Lease.
    #[arg(long, env = "AGENT_ENV_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// Instances reconciled at once.
    #[arg(long, env = "AGENT_ENV_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Every instance is checked again this often.
    #[arg(long, env = "AGENT_ENV_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` here, e.g. `0.0.0.0:8080`.
    #[arg(long, env = "AGENT_ENV_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Skip fsync of written files (faster, not crash-safe).
    #[arg(long, env = "AGENT_ENV_NO_FSYNC")]
    pub no_fsync: bool,
}

/// `wait` arguments.
#[derive(Args, Debug)]
pub struct WaitArgs {
    /// The env dir as mounted in this pod.
    #[arg(long, env = "AGENT_ENV_ENV_DIR")]
    pub env_dir: PathBuf,
    /// This pod's UID (from the downward API: `metadata.uid`).
    #[arg(long, env = "AGENT_ENV_POD_UID")]
    pub pod_uid: String,
    /// Give up after this long.
    #[arg(long, env = "AGENT_ENV_WAIT_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn operator_namespace(given: Option<String>) -> String {
    given
        .or_else(|| {
            std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE)
                .ok()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "agent-env-system".to_owned())
}

fn identity(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("agent-env-{}", std::process::id()))
}

/// Runs the controller.
pub async fn run(args: RunArgs) -> ExitCode {
    let config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let client = match kube::Client::try_from(config.clone()) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    // Evictions get their own client without the built-in retry of 429:
    // a PodDisruptionBudget's "not now" must come back at once so the
    // restarter's own backoff (and its logging) decides when to try again.
    let mut eviction_config = config;
    eviction_config.default_retry = false;
    let eviction_client = match kube::Client::try_from(eviction_config) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let engine = match args.state.engine(!args.no_fsync).await {
        Ok(e) => e.with_concurrency(1),
        Err(code) => return code,
    };
    let settings = cluster::Settings {
        namespace: args.namespace,
        operator_namespace: operator_namespace(args.operator_namespace),
        config_map: args.config_map,
        lease_name: args.lease_name,
        identity: identity(args.identity),
        lease_duration: args.lease_duration,
        concurrency: args.concurrency.clamp(1, u16::MAX as usize),
        resync: args.resync_interval,
        metrics_addr: args.metrics_addr,
        env_root: std::path::absolute(&args.state.env_root).unwrap_or(args.state.env_root),
    };
    let clients = cluster::Clients {
        main: client,
        eviction: eviction_client,
    };
    match cluster::run(settings, engine, clients, Arc::new(Metrics::default())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error_chain(&e));
            ExitCode::from(1)
        }
    }
}

/// Blocks until the operator checked the env dir for this pod.
pub async fn wait(args: WaitArgs) -> ExitCode {
    match crate::handshake::wait(&args.env_dir, &args.pod_uid, args.timeout).await {
        Ok(m) => {
            eprintln!(
                "{} is ready for pod {} (content {})",
                args.env_dir.display(),
                args.pod_uid,
                m.content_hash
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
