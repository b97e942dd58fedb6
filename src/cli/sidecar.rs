//! `agent-env sidecar`: the env dir writer inside an agent's pod.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::{StateArgs, fail};
use crate::engine::snapshot::ObjectKey;
use crate::metrics::Metrics;
use crate::sidecar;

/// `sidecar` arguments; the pod's own facts come from the downward API.
#[derive(Args, Debug)]
pub struct SidecarArgs {
    /// The pod-local volume (`--env-root`), the sidecar's state database
    /// (default `<env-root>/.agent-env/state.db`) and master key.
    #[command(flatten)]
    pub state: StateArgs,
    /// The env dir relative to the env root: the agent's `CLAUDE_CONFIG_DIR`
    /// is `<env-root mount in the agent container>/<env-dir>`.
    #[arg(long, env = "AGENT_ENV_ENV_DIR", default_value = "claude")]
    pub env_dir: String,
    /// The AgentInstance this pod runs (downward API: the pod's
    /// `agentenv.io/instance` label).
    #[arg(long, env = "AGENT_ENV_INSTANCE")]
    pub instance: String,
    /// The pod's namespace (downward API: `metadata.namespace`).
    #[arg(long, env = "AGENT_ENV_POD_NAMESPACE")]
    pub namespace: String,
    /// The pod's name (downward API: `metadata.name`).
    #[arg(long, env = "AGENT_ENV_POD_NAME")]
    pub pod_name: String,
    /// The pod's UID (downward API: `metadata.uid`).
    #[arg(long, env = "AGENT_ENV_POD_UID")]
    pub pod_uid: String,
    /// Serve `/readyz` (200 once the first render is on disk: the startup
    /// probe), `/healthz` and `/metrics` here.
    #[arg(long, env = "AGENT_ENV_PROBE_ADDR", default_value = "0.0.0.0:8081")]
    pub probe_addr: std::net::SocketAddr,
    /// A full pass this often, besides the filesystem watch.
    #[arg(long, env = "AGENT_ENV_RESYNC_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync_interval: Duration,
    /// Skip fsync of written files (faster, not crash-safe).
    #[arg(long, env = "AGENT_ENV_NO_FSYNC")]
    pub no_fsync: bool,
}

/// Runs the sidecar.
pub async fn run(args: SidecarArgs) -> ExitCode {
    let config = match kube::Config::infer().await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let client = match kube::Client::try_from(config) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let engine = match args.state.engine(!args.no_fsync).await {
        Ok(e) => e.with_concurrency(1),
        Err(code) => return code,
    };
    let settings = sidecar::Settings {
        instance: ObjectKey::new(args.namespace, args.instance),
        pod_name: args.pod_name,
        pod_uid: args.pod_uid,
        env_dir: args.env_dir,
        env_root: std::path::absolute(&args.state.env_root).unwrap_or(args.state.env_root),
        resync: args.resync_interval,
        probe_addr: Some(args.probe_addr),
    };
    match sidecar::run(settings, engine, client, Arc::new(Metrics::default())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::error_chain(&e));
            ExitCode::from(1)
        }
    }
}
