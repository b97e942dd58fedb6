//! Fixture builders for tests that run the real `agent-env` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

pub mod db;
pub mod host_loop;

use db::Backend;

/// A scratch host: manifests, config dir, env root, and the state database
/// every command uses.
pub struct Host {
    pub dir: TempDir,
    /// `--state`/`--master-key-file` arguments added to every command.
    pub state_args: Vec<String>,
}

/// One run of the binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The JSON rows of `reconcile -o json`.
    pub fn rows(&self) -> Vec<Value> {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON rows ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The message of one instance's row.
    pub fn message(&self, ns: &str, name: &str) -> String {
        self.row(ns, name)["message"].as_str().unwrap().to_owned()
    }

    /// The row of one instance.
    pub fn row(&self, ns: &str, name: &str) -> Value {
        self.rows()
            .into_iter()
            .find(|r| r["namespace"] == ns && r["name"] == name)
            .unwrap_or_else(|| panic!("no row for {ns}/{name}: {}", self.stdout))
    }
}

impl Host {
    pub fn new() -> Host {
        let h = Host {
            dir: tempfile::tempdir().unwrap(),
            state_args: Vec::new(),
        };
        std::fs::create_dir_all(h.manifests()).unwrap();
        h
    }

    /// A host whose state lives on `backend` (PostgreSQL needs a key file:
    /// one is made under the host dir).
    pub fn on(backend: &Backend) -> Host {
        let mut h = Host::new();
        if let Backend::Postgres(url) = backend {
            let key = h.path("master.key");
            let run = h.run(&["secret", "keygen", "--out", key.to_str().unwrap()], None);
            assert_eq!(run.code, 0, "{}", run.stderr);
            h.state_args = vec![
                "--state".into(),
                url.clone(),
                "--master-key-file".into(),
                key.display().to_string(),
            ];
        }
        h
    }

    /// Any command, with this host's env root and state, `stdin` piped in.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Run {
        use std::io::Write;
        let mut cmd = agent_env();
        cmd.args(args);
        if args.first() != Some(&"secret") || args.get(1) != Some(&"keygen") {
            cmd.arg("--env-root").arg(self.root());
            cmd.args(&self.state_args);
        }
        cmd.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        Run::from(child.wait_with_output().unwrap())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn manifests(&self) -> PathBuf {
        self.path("manifests")
    }

    pub fn root(&self) -> PathBuf {
        self.path("root")
    }

    /// Writes (or replaces) one manifest file.
    pub fn manifest(&self, name: &str, yaml: &str) {
        std::fs::write(self.manifests().join(format!("{name}.yaml")), yaml).unwrap();
    }

    pub fn remove_manifest(&self, name: &str) {
        std::fs::remove_file(self.manifests().join(format!("{name}.yaml"))).unwrap();
    }

    /// Writes one builtin config file.
    pub fn config(&self, file: &str, json: &str) {
        std::fs::create_dir_all(self.path("config")).unwrap();
        std::fs::write(self.path("config").join(file), json).unwrap();
    }

    /// A file under the env root.
    pub fn env_file(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    pub fn read_json(&self, rel: &str) -> Value {
        let p = self.env_file(rel);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap()
    }

    pub fn write_json(&self, rel: &str, v: &Value) {
        std::fs::write(self.env_file(rel), serde_json::to_string_pretty(v).unwrap()).unwrap();
    }

    fn base_args(&self, cmd: &mut Command) {
        cmd.arg("-f").arg(self.manifests());
        cmd.arg("--env-root").arg(self.root());
        if self.path("config").exists() {
            cmd.arg("--config").arg(self.path("config"));
        }
        cmd.arg("--no-fsync");
        cmd.args(&self.state_args);
    }

    /// `reconcile --once -o json`.
    pub fn reconcile(&self) -> Run {
        self.reconcile_with(&[])
    }

    pub fn reconcile_with(&self, extra: &[&str]) -> Run {
        Run::from(self.reconcile_command(extra).output().unwrap())
    }

    /// The command of [`Host::reconcile_with`], to run some other way.
    pub fn reconcile_command(&self, extra: &[&str]) -> Command {
        let mut cmd = agent_env();
        cmd.args(["reconcile", "--once", "-o", "json"]);
        self.base_args(&mut cmd);
        cmd.args(extra);
        cmd
    }

    /// `diff`.
    pub fn diff(&self) -> Run {
        let mut cmd = agent_env();
        cmd.arg("diff");
        self.base_args(&mut cmd);
        Run::from(cmd.output().unwrap())
    }
}

/// The binary under test, with logs on and no ambient configuration.
pub fn agent_env() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agent-env"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AGENT_ENV_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

pub fn instance(ns: &str, name: &str, agent_type: &str) -> String {
    format!(
        "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  agentType: {agent_type}\n"
    )
}

pub fn instance_with(ns: &str, name: &str, agent_type: &str, extra_spec: &str) -> String {
    format!(
        "{}{}",
        instance(ns, name, agent_type),
        indent(extra_spec, 2)
    )
}

fn indent(s: &str, n: usize) -> String {
    s.lines()
        .map(|l| format!("{}{l}\n", " ".repeat(n)))
        .collect()
}

/// `target` is `agentType: x` or `instance: y`.
pub fn binding(ns: &str, name: &str, target: &str, plugins: &[(&str, bool)]) -> String {
    let mut s = format!(
        "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  target:\n    {target}\n  plugins:\n"
    );
    for (p, enabled) in plugins {
        s.push_str(&format!("    - name: {p}\n      enabled: {enabled}\n"));
    }
    s
}

pub fn marketplace(ns: &str, name: &str, target: &str, source: &str) -> String {
    format!(
        "apiVersion: agentenv.io/v1alpha1\nkind: PluginMarketplace\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  target:\n    {target}\n  source:\n{}",
        indent(source, 4)
    )
}

/// `server` is the YAML of `stdio:`/`http:`/`sse:` and any other spec fields.
pub fn mcp(ns: &str, name: &str, target: &str, server: &str) -> String {
    format!(
        "apiVersion: agentenv.io/v1alpha1\nkind: McpServer\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  target:\n    {target}\n{}",
        indent(server, 2)
    )
}

pub fn secret(ns: &str, name: &str, data: &[(&str, &str)]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    agentenv.io/secrets: \"true\"\nstringData:\n"
    );
    for (k, v) in data {
        s.push_str(&format!("  {k}: \"{v}\"\n"));
    }
    s
}

pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A random point in `[0, max)` for kill timing (xorshift; no dependency).
pub fn jitter(seed: &mut u64, max: std::time::Duration) -> std::time::Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    max.mul_f64((*seed % 10_000) as f64 / 10_000.0)
}

/// The secret of [`forgejo_fleet`].
pub const FORGEJO_TOKEN: &str = "s3cr3t-forgejo-token-7f2a";

/// One coder instance whose MCP server takes `${SECRET:FORGEJO_TOKEN_DEV}`.
pub fn forgejo_fleet(h: &Host) {
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            mcp(
                "dev",
                "forgejo",
                "agentType: coder",
                "stdio:\n  command: forgejo-mcp\n  env:\n    FORGEJO_TOKEN: \"${SECRET:FORGEJO_TOKEN_DEV}\"\n",
            ),
        ]),
    );
}
