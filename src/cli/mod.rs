//! Command line: argument definitions and the commands they run.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::engine::builtin::Builtin;
use crate::engine::envdir::{EnvRoot, STATE_DIR};
use crate::engine::restart::RestartCommand;
use crate::engine::secrets::{Chain, SecretProvider};
use crate::engine::{Engine, Mode, Outcome, PassOptions};
use crate::host::{self as local, manifest};
use crate::metrics::Metrics;
use crate::state::{KeySource, StateStore, StoreSecrets};
use crate::{error_chain, report, state};

mod cluster;
mod explain;
mod inspect;
mod progress;
mod secret;
mod sidecar;

/// Renders Claude Code plugins, marketplaces and MCP servers into agent env dirs.
#[derive(Parser, Debug)]
#[command(name = "agent-env", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log filter (tracing env-filter syntax), e.g. `info` or `agent_env_operator=debug`.
    #[arg(
        long,
        env = "AGENT_ENV_LOG",
        default_value = "info,sqlx=warn",
        global = true
    )]
    pub log: String,
    /// Log line format.
    #[arg(
        long,
        env = "AGENT_ENV_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// Log line formats.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Render every AgentInstance of the manifests into its env dir.
    Reconcile(ReconcileArgs),
    /// Run the controller in a Kubernetes cluster (in-cluster config or kubeconfig).
    Run(cluster::RunArgs),
    /// Block until the operator has checked this pod's env dir (an init container).
    Wait(cluster::WaitArgs),
    /// Keep this pod's env dir at the render the controller published for
    /// its instance (`delivery.mode: Sidecar`; a native sidecar container).
    Sidecar(sidecar::SidecarArgs),
    /// Show what `reconcile` would change, secrets masked; changes nothing.
    /// Exit 0: no changes, 1: changes, 2: error, an invalid object or an
    /// instance not ready.
    Diff(InputArgs),
    /// Manage the encrypted secret store (`${SECRET:NAME}` values after labelled Secrets).
    Secret {
        /// What to do.
        #[command(subcommand)]
        command: secret::SecretCommand,
    },
    /// List or forget adopted runtime installs.
    Installed {
        /// What to do.
        #[command(subcommand)]
        command: inspect::InstalledCommand,
    },
    /// Show the audit trail of an instance: what each pass did.
    History(inspect::HistoryArgs),
    /// Explain one instance: every entry with its scope, deciding object and
    /// manifest file:line, or why one entry is absent; secrets masked,
    /// changes nothing. Exit 0: explained, 2: input error or the instance
    /// unknown or invalid.
    Explain(explain::ExplainArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd,
}

/// Where the state database and its master key are.
#[derive(Args, Debug, Clone)]
pub struct StateArgs {
    /// Env root: instance env dirs live under it.
    #[arg(long, env = "AGENT_ENV_ROOT", default_value = "./agent-env")]
    pub env_root: PathBuf,
    /// State database: `sqlite:<path>`, a file path, or `postgres://user@host/db`;
    /// default `<env-root>/.agent-env/state.db`.
    #[arg(long, env = "AGENT_ENV_STATE")]
    pub state: Option<String>,
    /// File with the 32-byte master key sealing secrets and runtime installs
    /// (base64, as `agent-env secret keygen` prints). Default for SQLite:
    /// `master.key` beside the database, created on first use; required for PostgreSQL.
    #[arg(long, env = "AGENT_ENV_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// The previous master key while a rotation is under way: it only opens.
    #[arg(long, env = "AGENT_ENV_PREVIOUS_MASTER_KEY_FILE")]
    pub previous_master_key_file: Option<PathBuf>,
    /// Open a SQLite database on a network filesystem (NFS, SMB, CephFS, ...)
    /// anyway, with a warning; by default that is refused, since SQLite's
    /// file locks are not safe there.
    #[arg(long, env = "AGENT_ENV_ALLOW_NETWORK_STATE")]
    pub allow_network_state: bool,
}

impl StateArgs {
    /// The database URL.
    pub fn url(&self) -> String {
        self.state.clone().unwrap_or_else(|| {
            format!(
                "sqlite:{}",
                self.env_root.join(STATE_DIR).join("state.db").display()
            )
        })
    }

    /// Where the master key comes from.
    pub fn keys(&self) -> KeySource {
        KeySource {
            master: self.master_key_file.clone(),
            previous: self.previous_master_key_file.clone(),
        }
    }

    /// Opens the store, creating it if needed.
    async fn open(&self) -> Result<Arc<dyn StateStore>, ExitCode> {
        self.check_placement()?;
        state::open(&self.url(), &self.keys())
            .await
            .map_err(|e| fail(&e))
    }

    /// The engine of a long-running command: the store opened (created if
    /// needed), the env root created if needed, no builtin layer yet.
    async fn engine(&self, fsync: bool) -> Result<Engine, ExitCode> {
        let store = self.open().await?;
        let root = EnvRoot::open(&self.env_root, true)
            .map_err(|e| fail(&e))?
            .with_fsync(fsync);
        Ok(Engine::new(root, store, Builtin::default()))
    }

    /// Refuses a SQLite database on a network filesystem (see `--allow-network-state`).
    fn check_placement(&self) -> Result<(), ExitCode> {
        match state::Database::parse(&self.url()) {
            Ok(state::Database::Sqlite(path)) => {
                state::check_sqlite(&path, self.allow_network_state).map_err(|e| fail(&e))
            }
            _ => Ok(()),
        }
    }
}

/// Where objects, builtins, env dirs and state are.
#[derive(Args, Debug)]
pub struct InputArgs {
    /// Manifest files or directories (multi-document YAML; directories are
    /// read recursively). Documents of other kinds, kustomization files and
    /// Helm chart directories are skipped (`--strict` refuses them).
    #[arg(
        short = 'f',
        long = "filename",
        env = "AGENT_ENV_MANIFESTS",
        value_delimiter = ',',
        required_unless_present = "kustomize"
    )]
    pub files: Vec<PathBuf>,
    /// Kustomization directories, built with `kubectl kustomize` (as Argo CD
    /// and Flux build them); kubectl from `PATH` or `AGENT_ENV_KUBECTL`.
    #[arg(
        short = 'k',
        long = "kustomize",
        env = "AGENT_ENV_KUSTOMIZE",
        value_delimiter = ','
    )]
    pub kustomize: Vec<PathBuf>,
    /// Config dir with the builtin layer (agents.json, marketplaces-builtin.json, mcp-builtin.json).
    #[arg(long, env = "AGENT_ENV_CONFIG")]
    pub config: Option<PathBuf>,
    /// Env root, state database and master key.
    #[command(flatten)]
    pub state: StateArgs,
    /// Instances worked on at once.
    #[arg(long, env = "AGENT_ENV_CONCURRENCY", default_value_t = 16)]
    pub concurrency: usize,
    /// Skip fsync of written files (faster, not crash-safe; for throwaway env roots).
    #[arg(long, env = "AGENT_ENV_NO_FSYNC")]
    pub no_fsync: bool,
    /// Refuse an object with a field its schema does not declare (as `kubectl
    /// apply` does by default) instead of warning and ignoring the field (as
    /// the API server does for a client that asks for no strictness); also
    /// refuse documents and files that are not for agent-env instead of
    /// skipping them.
    #[arg(long, env = "AGENT_ENV_STRICT")]
    pub strict: bool,
    /// Most objects all manifest files may hold together (Secrets included);
    /// past it the load fails rather than hold whatever a repository holds.
    #[arg(long, env = "AGENT_ENV_MAX_OBJECTS", default_value_t = manifest::MAX_OBJECTS)]
    pub max_objects: usize,
}

impl InputArgs {
    /// Where the manifests are and how strictly they are read.
    pub fn inputs(&self) -> manifest::Inputs {
        manifest::Inputs {
            files: self.files.clone(),
            kustomize: self.kustomize.clone(),
            fields: if self.strict {
                manifest::FieldValidation::Strict
            } else {
                manifest::FieldValidation::Warn
            },
            max_objects: self.max_objects,
        }
    }
}

/// `reconcile` arguments.
#[derive(Args, Debug)]
pub struct ReconcileArgs {
    /// Where everything is.
    #[command(flatten)]
    pub input: InputArgs,
    /// One full pass, then exit. Exit 0: every instance ready, 1: any not
    /// ready or any object invalid, 2: the input could not be read. Without it: keep running,
    /// watching the manifests and the env root, until SIGTERM or SIGINT.
    #[arg(long, env = "AGENT_ENV_ONCE")]
    pub once: bool,
    /// Full pass period while running (network filesystems send no events).
    #[arg(long, env = "AGENT_ENV_RESYNC_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub resync_interval: std::time::Duration,
    /// Command run (without a shell) to restart an agent whose config changed
    /// (`restart.onChange`) or whose drift was put back (`restart.onDrift`);
    /// placeholders {namespace}, {name}, {agentType}, {envDir}.
    #[arg(long, env = "AGENT_ENV_RESTART_COMMAND", value_parser = RestartCommand::parse)]
    pub restart_command: Option<RestartCommand>,
    /// Time a restart command may take before it is killed.
    #[arg(long, env = "AGENT_ENV_RESTART_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub restart_timeout: std::time::Duration,
    /// Serve Prometheus `/metrics` and `/healthz` here, e.g. `127.0.0.1:9464`.
    #[arg(long, env = "AGENT_ENV_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Output format.
    #[arg(
        short = 'o',
        long,
        env = "AGENT_ENV_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub output: Output,
}

/// Output formats.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// A JSON array, one object per instance.
    Json,
}

impl Command {
    /// Runs beside an agent in its pod, where a small footprint matters
    /// more than parallel passes.
    pub fn is_small(&self) -> bool {
        matches!(self, Command::Sidecar(_))
    }

    /// Most threads the runtime starts for blocking work, where a command
    /// bounds it. An instance's file IO runs there, one task per instance
    /// being worked on; left at the runtime's default (512), a burst of
    /// short tasks starts threads faster than finished ones are seen idle,
    /// and each extra thread keeps its stack and its own allocator pages
    /// until it has idled ten seconds: the loop's memory grew with every
    /// fan-out. A few more than the concurrency are left for work that is
    /// not an instance's (name lookups of the API client).
    pub fn blocking_threads(&self) -> Option<usize> {
        const BESIDE_INSTANCES: usize = 4;
        match self {
            Command::Sidecar(_) => Some(BESIDE_INSTANCES),
            Command::Reconcile(a) => Some(a.input.concurrency.max(1) + BESIDE_INSTANCES),
            Command::Run(a) => Some(a.concurrency.clamp(1, u16::MAX as usize) + BESIDE_INSTANCES),
            _ => None,
        }
    }
}

/// Exit code for input that could not be read at all.
pub const EXIT_INPUT: u8 = 2;

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::to_yaml());
            ExitCode::SUCCESS
        }
        Command::Reconcile(args) => reconcile(args).await,
        Command::Run(args) => cluster::run(args).await,
        Command::Wait(args) => cluster::wait(args).await,
        Command::Sidecar(args) => sidecar::run(args).await,
        Command::Diff(args) => diff(args).await,
        Command::Secret { command } => secret::run(command).await,
        Command::Installed { command } => inspect::installed(command).await,
        Command::History(args) => inspect::history(args).await,
        Command::Explain(args) => explain::run(args).await,
    }
}

/// Prints an error (with its sources) and gives the input-error exit code.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {}", error_chain(e));
    ExitCode::from(EXIT_INPUT)
}

/// Everything loaded for a pass.
struct Loaded {
    engine: Engine,
    snapshot: Arc<crate::engine::snapshot::Snapshot>,
    secrets: Arc<dyn SecretProvider>,
}

async fn load(input: &InputArgs, mode: Mode) -> Result<Loaded, ExitCode> {
    let builtin = Builtin::load(input.config.as_deref()).map_err(|e| fail(&e))?;
    let snapshot = manifest::load(&input.inputs()).map_err(|e| fail(&e))?;
    if let Some(summary) = snapshot.skipped_summary() {
        tracing::info!("{summary}");
    }
    let store = match mode {
        Mode::Apply => input.state.open().await?,
        Mode::DryRun => {
            input.state.check_placement()?;
            state::open_existing(&input.state.url(), &input.state.keys())
                .await
                .map_err(|e| fail(&e))?
        }
    };
    let root = EnvRoot::open(&input.state.env_root, mode == Mode::Apply)
        .map_err(|e| fail(&e))?
        .with_fsync(!input.no_fsync);
    // Labelled Secrets first, then the encrypted store (DESIGN section 4).
    let secrets: Arc<dyn SecretProvider> = Arc::new(Chain(vec![
        Arc::new(snapshot.secrets.clone()),
        Arc::new(StoreSecrets::new(store.clone())),
    ]));
    let engine = Engine::new(root, store, builtin).with_concurrency(input.concurrency);
    Ok(Loaded {
        engine,
        snapshot: Arc::new(snapshot),
        secrets,
    })
}

/// What a pass came to, its outcomes having gone to a sink.
struct Passed {
    /// Whether every instance is ready.
    ready: bool,
    /// How many objects were invalid (each already reported on stderr).
    invalid: usize,
}

/// Loads the input and runs a pass, handing each outcome to `sink` by key.
async fn pass(
    input: &InputArgs,
    mode: Mode,
    sink: &mut (dyn FnMut(Outcome) + Send),
) -> Result<Passed, ExitCode> {
    let started = std::time::Instant::now();
    let loaded = load(input, mode).await?;
    let loaded_in = started.elapsed();
    // Every invalid object, whether or not it targets an instance: `kubectl
    // apply` of the same files would fail on each.
    for inv in &loaded.snapshot.invalid {
        eprintln!("invalid {inv}");
    }
    let bar = progress::Bar::start(loaded.snapshot.instances.len());
    let mut opts = PassOptions::new(mode);
    opts.progress = bar.as_ref().map(progress::Bar::ticker);
    let (mut instances, mut written, mut ready) = (0, 0, true);
    let passed = loaded
        .engine
        .pass_each(&loaded.snapshot, &loaded.secrets, &opts, &mut |o| {
            instances += 1;
            written += usize::from(o.wrote());
            ready &= o.ready;
            sink(o);
        })
        .await
        .map_err(|e| fail(&e));
    drop(bar);
    passed?;
    tracing::info!(
        instances,
        written,
        invalid = loaded.snapshot.invalid.len(),
        load_ms = loaded_in.as_millis() as u64,
        pass_ms = (started.elapsed() - loaded_in).as_millis() as u64,
        "pass done"
    );
    Ok(Passed {
        ready,
        invalid: loaded.snapshot.invalid.len(),
    })
}

async fn reconcile(args: ReconcileArgs) -> ExitCode {
    if !args.once {
        return watch(args).await;
    }
    let mut report = match args.output {
        Output::Table => report::Streamed::table(std::io::stdout()),
        Output::Json => report::Streamed::json(std::io::stdout()),
    };
    let passed = pass(&args.input, Mode::Apply, &mut |o| report.push(o)).await;
    let Passed { ready, invalid } = match passed {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Err(e) = report.finish() {
        return fail(&e);
    }
    if invalid == 0 && ready {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn watch(args: ReconcileArgs) -> ExitCode {
    let input = &args.input;
    let engine = match input.state.engine(!input.no_fsync).await {
        Ok(e) => e.with_concurrency(input.concurrency),
        Err(code) => return code,
    };
    let settings = local::Settings {
        inputs: input.inputs(),
        config: input.config.clone(),
        env_root: input.state.env_root.clone(),
        resync: args.resync_interval,
        restart: args.restart_command.map(|c| (c, args.restart_timeout)),
        metrics_addr: args.metrics_addr,
    };
    match local::run(settings, engine, Arc::new(Metrics::default())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

async fn diff(args: InputArgs) -> ExitCode {
    let mut outcomes = Vec::new();
    let Passed { ready, invalid } = match pass(&args, Mode::DryRun, &mut |o| outcomes.push(o)).await
    {
        Ok(p) => p,
        Err(code) => return code,
    };
    print!("{}", report::diff(&outcomes));
    // An invalid object is an error, not a change (as with `kubectl diff`,
    // whose 1 means differences): a gate on "1: apply pending" must not take
    // a broken manifest for a pending change.
    if invalid > 0 || !ready {
        ExitCode::from(EXIT_INPUT)
    } else if outcomes.iter().any(|o| !o.changes.is_empty()) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: &[&str]) -> Command {
        Cli::try_parse_from([&["agent-env"], args].concat())
            .expect("the command line parses")
            .command
    }

    #[test]
    fn blocking_threads_follow_the_concurrency() {
        let reconcile = ["reconcile", "-f", "m", "--env-root", "r"];
        assert_eq!(command(&reconcile).blocking_threads(), Some(16 + 4));
        let three = [&reconcile[..], &["--concurrency", "3"]].concat();
        assert_eq!(command(&three).blocking_threads(), Some(3 + 4));
        let run = ["run", "--env-root", "r", "--concurrency", "5"];
        assert_eq!(command(&run).blocking_threads(), Some(5 + 4));
        let diff = ["diff", "-f", "m", "--env-root", "r"];
        assert_eq!(command(&diff).blocking_threads(), None);
    }
}
