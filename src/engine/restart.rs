//! Restarting an agent after its config changed or drift was put back,
//! debounced per workload, never more than one in flight per workload,
//! failures retried with backoff. How a restart is done is a
//! [`RestartAction`]: a command template run without a shell on a host, the
//! eviction or rollout API in a cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use async_trait::async_trait;

use crate::crd::{RestartPolicy, RestartStrategy, WorkloadRef};
use crate::engine::snapshot::ObjectKey;
use crate::metrics::Metrics;

/// Placeholders a restart command template may use.
pub const PLACEHOLDERS: [&str; 4] = ["{namespace}", "{name}", "{agentType}", "{envDir}"];
/// Least time between restarts when `restart.minInterval` is not set.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// How long an instance must be quiet before its restart runs (shorter when
/// `minInterval` is): a burst of changes gives one restart after the burst.
pub const SETTLE: Duration = Duration::from_secs(1);
/// First retry delay of a failed restart; doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// Longest retry delay.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Least time between two restarts of one workload whatever
/// `restart.minInterval` says (`0s` passes its validation): a flood of drift
/// or edits restarts a workload at most this often.
pub const MIN_INTERVAL_FLOOR: Duration = Duration::from_secs(1);

/// Wait before retrying a restart that failed `failures` times in a row.
fn backoff(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => FIRST_BACKOFF
            .saturating_mul(1 << (n - 1).min(8))
            .min(MAX_BACKOFF),
    }
}

/// A `--restart-command` template, split like a shell would (no shell runs it).
#[derive(Clone, Debug)]
pub struct RestartCommand {
    argv: Vec<String>,
}

impl RestartCommand {
    /// Parses a template such as `systemctl restart agent@{name}`.
    pub fn parse(template: &str) -> Result<RestartCommand, String> {
        let argv = shlex::split(template)
            .ok_or_else(|| format!("restart command {template:?} has unbalanced quotes"))?;
        if argv.is_empty() {
            return Err("restart command is empty".into());
        }
        for arg in &argv {
            let mut rest = arg.as_str();
            while let Some(start) = rest.find('{') {
                let end = rest[start..].find('}').map(|e| start + e + 1);
                let Some(end) = end else { break };
                let word = &rest[start..end];
                if !PLACEHOLDERS.contains(&word) {
                    return Err(format!(
                        "restart command uses unknown placeholder {word}; known: {}",
                        PLACEHOLDERS.join(", ")
                    ));
                }
                rest = &rest[end..];
            }
        }
        Ok(RestartCommand { argv })
    }

    /// The argv for one instance.
    pub fn render(&self, target: &Target) -> Vec<String> {
        self.argv
            .iter()
            .map(|a| {
                a.replace("{namespace}", &target.key.namespace)
                    .replace("{name}", &target.key.name)
                    .replace("{agentType}", &target.agent_type)
                    .replace("{envDir}", &target.env_dir)
            })
            .collect()
    }
}

/// Which instance to restart and what to fill in.
#[derive(Clone, Debug)]
pub struct Target {
    /// The instance.
    pub key: ObjectKey,
    /// `spec.agentType`.
    pub agent_type: String,
    /// Absolute env dir.
    pub env_dir: String,
    /// `spec.workload`, when set.
    pub workload: Option<WorkloadRef>,
    /// `spec.restart.strategy`.
    pub strategy: RestartStrategy,
}

impl Target {
    /// What restarts are debounced by: the workload (several instances may
    /// share one), or the instance when it names none.
    fn debounce_key(&self) -> ObjectKey {
        match &self.workload {
            Some(w) => ObjectKey::new(&self.key.namespace, format!("{:?}/{}", w.kind, w.name)),
            None => self.key.clone(),
        }
    }
}

/// Restarts one target; `true` when it worked. Failures are logged by the
/// action and retried by the [`Restarter`].
#[async_trait]
pub trait RestartAction: Send + Sync + 'static {
    /// Does the restart.
    async fn restart(&self, target: &Target, why: &str) -> bool;
}

/// A `--restart-command` with its timeout.
pub struct CommandAction {
    /// The template.
    pub command: RestartCommand,
    /// How long it may run.
    pub timeout: Duration,
}

#[async_trait]
impl RestartAction for CommandAction {
    async fn restart(&self, target: &Target, why: &str) -> bool {
        run_command(&target.key, &self.command.render(target), self.timeout, why).await
    }
}

/// Why an instance is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// What the agent runs with changed (`restart.onChange`).
    ConfigChanged,
    /// Drift was put back (`restart.onDrift`).
    DriftCorrected,
}

impl Why {
    /// The CamelCase reason (status, events).
    pub fn reason(self) -> &'static str {
        match self {
            Why::ConfigChanged => "ConfigChanged",
            Why::DriftCorrected => "DriftCorrected",
        }
    }

    /// For log lines.
    pub fn label(self) -> &'static str {
        match self {
            Why::ConfigChanged => "config changed",
            Why::DriftCorrected => "drift corrected",
        }
    }
}

/// Whether a pass calls for a restart under `policy`. A change a drift
/// correction explains is not a config change.
pub fn decide(policy: &RestartPolicy, outcome: &crate::engine::Outcome) -> Option<Why> {
    let changed = outcome
        .changes
        .iter()
        .any(|c| !outcome.drift.contains(&format!("{}.{}", c.section, c.name)));
    if changed && policy.on_change {
        Some(Why::ConfigChanged)
    } else if !outcome.drift.is_empty() && policy.on_drift {
        Some(Why::DriftCorrected)
    } else {
        None
    }
}

/// Parses `restart.minInterval`, at least [`MIN_INTERVAL_FLOOR`].
pub fn min_interval(policy: &RestartPolicy) -> Duration {
    policy
        .min_interval
        .as_deref()
        .and_then(|s| humantime::parse_duration(s).ok())
        .unwrap_or(DEFAULT_MIN_INTERVAL)
        .max(MIN_INTERVAL_FLOOR)
}

struct Request {
    target: Target,
    min_interval: Duration,
    why: String,
}

/// Hands restart requests to the background task that runs them.
#[derive(Clone)]
pub struct Restarter {
    tx: mpsc::UnboundedSender<Request>,
}

#[derive(Default)]
struct Pending {
    target: Option<Target>,
    min_interval: Duration,
    why: Vec<String>,
    /// The reasons of the restart in flight: given back to `why` when it
    /// fails, so the retry says why it restarts.
    running_why: Vec<String>,
    due: Option<Instant>,
    last_run: Option<Instant>,
    running: bool,
    failures: u32,
}

impl Restarter {
    /// Starts the task; it ends when every `Restarter` is dropped and no
    /// restart is left in flight.
    pub fn spawn(action: Arc<dyn RestartAction>, metrics: Arc<Metrics>) -> Restarter {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(action, metrics, rx));
        Restarter { tx }
    }

    /// Asks for a restart of `target` (debounced).
    pub fn request(&self, target: Target, min_interval: Duration, why: String) {
        let _ = self.tx.send(Request {
            target,
            min_interval,
            why,
        });
    }
}

async fn run(
    action: Arc<dyn RestartAction>,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Request>,
) {
    let mut pending: HashMap<ObjectKey, Pending> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(ObjectKey, bool)>();
    let mut open = true;
    loop {
        let next = pending
            .values()
            .filter(|p| !p.running)
            .filter_map(|p| p.due)
            .min();
        if !open && next.is_none() && !pending.values().any(|p| p.running) {
            return;
        }
        tokio::select! {
            req = rx.recv(), if open => match req {
                None => open = false,
                Some(req) => {
                    let p = pending.entry(req.target.debounce_key()).or_default();
                    // Enforced here too, so no caller can ask for a faster rate.
                    let min_interval = req.min_interval.max(MIN_INTERVAL_FLOOR);
                    let settle = SETTLE.min(min_interval);
                    // A new request never cuts a failing restart's backoff
                    // short: a flood of drift would otherwise retry it at
                    // every request.
                    let earliest = p
                        .last_run
                        .map(|l| l + min_interval.max(backoff(p.failures)));
                    let due = (Instant::now() + settle).max(earliest.unwrap_or_else(Instant::now));
                    p.due = Some(due);
                    p.min_interval = min_interval;
                    p.target = Some(req.target);
                    // One line per distinct reason however many requests came.
                    if !p.why.contains(&req.why) {
                        p.why.push(req.why);
                    }
                }
            },
            Some((key, ok)) = done_rx.recv() => {
                metrics.restart(ok);
                if let Some(p) = pending.get_mut(&key) {
                    p.running = false;
                    p.last_run = Some(Instant::now());
                    let tried = std::mem::take(&mut p.running_why);
                    if !ok {
                        for why in tried.into_iter().rev() {
                            if !p.why.contains(&why) {
                                p.why.insert(0, why);
                            }
                        }
                    }
                    if ok {
                        p.failures = 0;
                        if p.due.is_none() {
                            pending.remove(&key);
                        }
                    } else {
                        p.failures += 1;
                        let backoff = backoff(p.failures);
                        // A newer request keeps its own (later) due time.
                        p.due = Some(p.due.unwrap_or(Instant::now()).max(Instant::now() + backoff));
                        warn!(instance = %key, retry_in = ?backoff, "restart failed; retrying");
                    }
                }
            },
            () = sleep_until(next) => {
                let now = Instant::now();
                for (key, p) in pending.iter_mut() {
                    if p.running || p.due.is_none_or(|d| d > now) {
                        continue;
                    }
                    p.due = None;
                    p.running = true;
                    let target = p.target.clone().expect("set with the request");
                    p.running_why = std::mem::take(&mut p.why);
                    let why = p.running_why.join("; ");
                    let done = done_tx.clone();
                    let key = key.clone();
                    let action = action.clone();
                    tokio::spawn(async move {
                        let ok = action.restart(&target, &why).await;
                        let _ = done.send((key, ok));
                    });
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever when there is nothing to wait for (a
/// `select!` branch that never fires).
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn run_command(key: &ObjectKey, argv: &[String], timeout: Duration, why: &str) -> bool {
    info!(instance = %key, command = ?argv, why, "restarting");
    let child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, child).await {
        Err(_) => {
            warn!(instance = %key, ?timeout, "restart command timed out; killed");
            false
        }
        Ok(Err(e)) => {
            warn!(instance = %key, error = %e, "restart command could not start");
            false
        }
        Ok(Ok(out)) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                info!(instance = %key, stdout = %stdout.trim_end(), stderr = %stderr.trim_end(), "restart command succeeded");
                true
            } else {
                warn!(instance = %key, status = %out.status, stdout = %stdout.trim_end(), stderr = %stderr.trim_end(), "restart command failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn target() -> Target {
        Target {
            key: ObjectKey::new("dev", "alice"),
            agent_type: "coder".into(),
            env_dir: "/srv/env/dev/alice".into(),
            workload: None,
            strategy: RestartStrategy::Evict,
        }
    }

    /// Records when it ran and why; succeeds as told.
    struct Recorder {
        ok: bool,
        runs: Mutex<Vec<(Instant, String)>>,
    }

    #[async_trait]
    impl RestartAction for Recorder {
        async fn restart(&self, _: &Target, why: &str) -> bool {
            self.runs
                .lock()
                .unwrap()
                .push((Instant::now(), why.to_owned()));
            self.ok
        }
    }

    /// Requests a restart every `every` for `for_`, with `minInterval: 0s`
    /// (which passes validation), and returns the runs.
    async fn flood(ok: bool, every: Duration, for_: Duration) -> Vec<(Instant, String)> {
        let action = Arc::new(Recorder {
            ok,
            runs: Mutex::new(Vec::new()),
        });
        let r = Restarter::spawn(action.clone(), Arc::new(Metrics::default()));
        let started = Instant::now();
        let mut i = 0;
        while started.elapsed() < for_ {
            let why = if i % 2 == 0 {
                "drift corrected"
            } else {
                "config changed"
            };
            r.request(target(), Duration::ZERO, why.into());
            i += 1;
            tokio::time::sleep(every).await;
        }
        drop(r);
        tokio::time::sleep(MAX_BACKOFF).await;
        action.runs.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_requests_gives_one_restart_after_it() {
        // 6,000 requests in 60 s: `0s` would restart at every one of them.
        let runs = flood(true, Duration::from_millis(10), Duration::from_secs(60)).await;
        assert_eq!(runs.len(), 1, "{runs:?}");
        // One line per distinct reason, not one per request.
        assert_eq!(runs[0].1, "drift corrected; config changed");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_do_not_cut_a_failing_restarts_backoff_short() {
        // Each request is followed by a quiet second, so the debounce alone
        // would retry after every one of them.
        let runs = flood(false, Duration::from_millis(1500), Duration::from_secs(600)).await;
        // Retries 2 s, 4 s, ... 256 s after each failure, then 300 s.
        for (i, w) in runs.windows(2).enumerate() {
            let gap = w[1].0 - w[0].0;
            assert!(gap >= backoff(i as u32 + 1), "retry {}: {gap:?}", i + 1);
        }
        assert!((8..=12).contains(&runs.len()), "{} attempts", runs.len());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_restart_says_why_it_restarts() {
        let action = Arc::new(Recorder {
            ok: false,
            runs: Mutex::new(Vec::new()),
        });
        let r = Restarter::spawn(action.clone(), Arc::new(Metrics::default()));
        r.request(target(), Duration::ZERO, "config changed".into());
        tokio::time::sleep(Duration::from_secs(20)).await;
        drop(r);
        tokio::time::sleep(MAX_BACKOFF).await;
        let runs = action.runs.lock().unwrap().clone();
        assert!(runs.len() >= 3, "{runs:?}");
        assert!(
            runs.iter().all(|(_, why)| why == "config changed"),
            "{runs:?}"
        );
    }

    #[test]
    fn min_interval_has_a_floor() {
        let policy = |s: &str| RestartPolicy {
            min_interval: Some(s.into()),
            ..RestartPolicy::default()
        };
        assert_eq!(min_interval(&policy("0s")), MIN_INTERVAL_FLOOR);
        assert_eq!(min_interval(&policy("1ms")), MIN_INTERVAL_FLOOR);
        assert_eq!(min_interval(&policy("5m")), Duration::from_secs(300));
        assert_eq!(
            min_interval(&RestartPolicy::default()),
            DEFAULT_MIN_INTERVAL
        );
    }

    #[test]
    fn templates_split_without_a_shell_and_fill_placeholders() {
        let c = RestartCommand::parse("systemctl restart 'agent@{name}.service' --env {envDir}")
            .unwrap();
        let t = Target {
            key: ObjectKey::new("dev", "alice"),
            agent_type: "coder".into(),
            env_dir: "/srv/env/dev/alice".into(),
            workload: None,
            strategy: RestartStrategy::Evict,
        };
        assert_eq!(
            c.render(&t),
            [
                "systemctl",
                "restart",
                "agent@alice.service",
                "--env",
                "/srv/env/dev/alice"
            ]
        );
        assert!(
            RestartCommand::parse("x {nme}")
                .unwrap_err()
                .contains("{nme}")
        );
        assert!(RestartCommand::parse("x 'open").is_err());
        assert!(RestartCommand::parse("").is_err());
    }
}
