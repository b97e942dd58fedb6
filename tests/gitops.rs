//! Local mode on a GitOps repository, through the real binary: what Argo CD
//! or Flux would sync beside the agent objects is skipped with one summary
//! line (refused under `--strict`), every invalid agent object is reported
//! and fails the run as `kubectl apply` would, `-k` builds a kustomization
//! as the cluster gets it, and long passes show progress only on a terminal.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::host_loop::{Loop, wait_until};
use common::*;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gitops")
}

/// `reconcile --once -o json` of `inputs` (`-f`/`-k` and paths) into `h`'s env root.
fn reconcile(h: &Host, inputs: &[&Path], extra: &[&str]) -> Run {
    let mut cmd = agent_env();
    cmd.args(["reconcile", "--once", "-o", "json", "--no-fsync"]);
    cmd.arg("--env-root").arg(h.root());
    for p in inputs {
        cmd.arg(p);
    }
    cmd.args(extra);
    Run::from(cmd.output().unwrap())
}

fn flag(f: &str) -> &Path {
    Path::new(f)
}

fn settings(h: &Host, inst: &str) -> Value {
    h.read_json(&format!("{inst}/settings.json"))
}

/// A kubectl to build kustomizations with: `PATH`'s, or the one beside the
/// envtest binaries.
fn kubectl() -> Option<PathBuf> {
    let on_path = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return Some("kubectl".into());
    }
    let assets = std::env::var_os("KUBEBUILDER_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/envtest/bin"));
    Some(assets.join("kubectl")).filter(|k| k.is_file())
}

#[test]
fn a_gitops_repository_renders_its_agents_and_skips_the_rest_with_one_summary() {
    let h = Host::new();
    let run = reconcile(&h, &[flag("-f"), &repo()], &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for name in ["alice", "bob"] {
        assert_eq!(
            run.row("team-a", name)["ready"],
            json!(true),
            "{}",
            run.stdout
        );
        assert_eq!(
            settings(&h, &format!("team-a/{name}"))["enabledPlugins"],
            json!({"fmt@acme-tools": true})
        );
        let claude = h.read_json(&format!("team-a/{name}/.claude.json"));
        assert_eq!(
            claude["mcpServers"]["tracker"]["headers"]["Authorization"],
            json!("Bearer tracker-token-value")
        );
    }
    // One line says what was left out, by kind; the patch of the overlay is
    // part of its kustomization, not a second PluginBinding.
    let summaries: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("not for agent-env"))
        .collect();
    assert_eq!(summaries.len(), 1, "{}", run.stderr);
    assert!(
        summaries[0].contains(
            "skipped 13 not for agent-env (ConfigMap 1, Deployment 1, GitRepository 1, Helm chart 1, \
             HelmRelease 1, Kustomization 1, Namespace 1, Service 1, document without apiVersion and kind 1, \
             kustomization file 3, kustomize patch 1)"
        ),
        "{}",
        summaries[0]
    );
    assert!(summaries[0].contains(" INFO "), "{}", summaries[0]);
    assert!(
        !run.stderr.lines().any(|l| l.starts_with("invalid ")),
        "{}",
        run.stderr
    );
}

#[test]
fn strict_refuses_what_is_not_for_agent_env_and_writes_nothing() {
    let h = Host::new();
    let run = reconcile(&h, &[flag("-f"), &repo()], &["--strict"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("kustomization.yaml: a kustomization file, not agent-env objects: refused under --strict"),
        "{}",
        run.stderr
    );
    assert!(!h.root().join("team-a").exists());

    // A foreign document in a file of its own is named by file, line and document.
    let dir = h.path("strict");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("mixed.yaml"),
        format!(
            "{}---\n# the web tier\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n",
            instance("team-a", "alice", "coder")
        ),
    )
    .unwrap();
    let run = reconcile(&h, &[flag("-f"), &dir], &["--strict"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "mixed.yaml:8 (document 2): a Deployment, not an agent-env object: refused under --strict"
        ),
        "{}",
        run.stderr
    );
    assert!(!h.root().join("team-a").exists());
}

#[test]
fn a_broken_agent_document_is_still_an_error_naming_file_document_and_field() {
    let h = Host::new();
    let dir = h.path("broken");
    std::fs::create_dir_all(&dir).unwrap();
    for (text, said) in [
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: agentenv.io/v1alpha1\nkind: PluginBindng\nmetadata: {name: x}\n",
            "broken.yaml:4 (document 2): unknown kind \"PluginBindng\"",
        ),
        (
            "apiVersion: agentenv.io/v1alpha1\nkind: McpServer\nspec: {}\n",
            "broken.yaml:1 (document 1): McpServer has no metadata.name",
        ),
        (
            "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata: {name: Alice}\nspec: {agentType: coder}\n",
            "broken.yaml:1 (document 1): field metadata.name: \"Alice\" is not a valid object name",
        ),
    ] {
        std::fs::write(dir.join("broken.yaml"), text).unwrap();
        let run = reconcile(&h, &[flag("-f"), &dir], &[]);
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stderr.contains(said), "{said}\n{}", run.stderr);
    }
}

/// A binding with both targets and a plugin without a marketplace: the API
/// server refuses it whatever it targets.
const BOTH_TARGETS: &str = "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata:\n  name: both\n  namespace: team-b\nspec:\n  target:\n    agentType: nobody\n    instance: no-one\n  plugins:\n    - name: nope\n";

#[test]
fn every_invalid_object_is_reported_and_fails_the_run_even_when_it_targets_nothing() {
    let h = Host::new();
    h.manifest("alice", &instance("team-a", "alice", "coder"));
    h.manifest("both", BOTH_TARGETS);
    let expected = "invalid PluginBinding team-b/both (";
    let run = h.reconcile();
    assert_eq!(run.code, 1, "{}", run.stderr);
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with(expected))
        .unwrap_or_else(|| panic!("{}", run.stderr));
    assert!(line.contains("both.yaml:1 (document 1)"), "{line}");
    assert!(line.contains("spec.target"), "{line}");
    assert!(line.contains("spec.plugins[0].name"), "{line}");
    // The instance it does not target renders as before.
    assert_eq!(run.row("team-a", "alice")["ready"], json!(true));
    assert!(h.env_file("team-a/alice/settings.json").exists());

    // `diff` reports it too, as an error rather than a pending change.
    let run = h.diff();
    assert_eq!(run.code, 2, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.lines().any(|l| l.starts_with(expected)),
        "{}",
        run.stderr
    );

    // Fixed: both commands are clean again.
    h.manifest(
        "both",
        &binding("team-b", "both", "agentType: nobody", &[("ok@tools", true)]),
    );
    assert_eq!(h.reconcile().code, 0);
    assert_eq!(h.diff().code, 0);
}

#[test]
fn the_loop_logs_an_invalid_object_once_per_change() {
    let h = Host::new();
    h.manifest("alice", &instance("team-a", "alice", "coder"));
    h.manifest("both", BOTH_TARGETS);
    let count = |l: &Loop| l.log().matches("invalid PluginBinding team-b/both").count();
    let l = Loop::start(&h, &[]);
    assert_eq!(count(&l), 1, "{}", l.log());

    // Another file changes: the same invalid object is not logged again.
    h.manifest(
        "tools",
        &binding(
            "team-a",
            "tools",
            "agentType: coder",
            &[("fmt@tools", true)],
        ),
    );
    wait_until(
        "the new binding rendered",
        || {
            std::fs::read_to_string(h.env_file("team-a/alice/settings.json"))
                .is_ok_and(|t| t.contains("fmt@tools"))
        },
        || l.log(),
    );
    assert_eq!(count(&l), 1, "{}", l.log());

    // The invalid object itself changes (still invalid): it is logged again.
    h.manifest(
        "both",
        &BOTH_TARGETS.replace("name: nope", "name: nope-again"),
    );
    wait_until("the changed object logged", || count(&l) == 2, || l.log());
}

#[test]
fn a_kustomization_is_read_as_the_cluster_gets_it() {
    let Some(kubectl) = kubectl() else {
        eprintln!(
            "SKIPPED: no kubectl on PATH or in KUBEBUILDER_ASSETS to build kustomizations with"
        );
        return;
    };
    let h = Host::new();
    let overlay = repo().join("agents/overlays/prod");
    let mut cmd = agent_env();
    cmd.args(["reconcile", "--once", "-o", "json", "--no-fsync", "-k"])
        .arg(&overlay)
        .arg("--env-root")
        .arg(h.root())
        .env("AGENT_ENV_KUBECTL", &kubectl);
    let run = Run::from(cmd.output().unwrap());
    assert_eq!(run.code, 0, "{}", run.stderr);
    // The overlay's patch applied: prod coders also get the linter.
    for name in ["alice", "bob"] {
        assert_eq!(
            settings(&h, &format!("team-a/{name}"))["enabledPlugins"],
            json!({"fmt@acme-tools": true, "lint@acme-tools": true})
        );
    }
    assert!(
        run.stderr
            .contains("skipped 2 not for agent-env (ConfigMap 1, Namespace 1)"),
        "{}",
        run.stderr
    );

    // `diff` on the same kustomization sees nothing left to do.
    let mut cmd = agent_env();
    cmd.args(["diff", "-k"])
        .arg(&overlay)
        .arg("--env-root")
        .arg(h.root())
        .env("AGENT_ENV_KUBECTL", &kubectl);
    let run = Run::from(cmd.output().unwrap());
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);

    // A kustomization that does not build: kustomize's own words, exit 2.
    let broken = h.path("broken-overlay");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(
        broken.join("kustomization.yaml"),
        "resources:\n  - missing.yaml\n",
    )
    .unwrap();
    let mut cmd = agent_env();
    cmd.args(["reconcile", "--once", "-k"])
        .arg(&broken)
        .arg("--env-root")
        .arg(h.root())
        .env("AGENT_ENV_KUBECTL", &kubectl);
    let run = Run::from(cmd.output().unwrap());
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "-k {}: `kubectl kustomize` failed: ",
            broken.display()
        )) && run.stderr.contains("missing.yaml"),
        "{}",
        run.stderr
    );
}

#[test]
fn the_loop_builds_a_kustomization_again_when_its_files_change() {
    let Some(kubectl) = kubectl() else {
        eprintln!(
            "SKIPPED: no kubectl on PATH or in KUBEBUILDER_ASSETS to build kustomizations with"
        );
        return;
    };
    let h = Host::new();
    let agents = h.path("agents");
    copy_dir(&repo().join("agents"), &agents);
    let overlay = agents.join("overlays/prod");
    let l = Loop::start_with_env(
        &h,
        &["-k", overlay.to_str().unwrap()],
        &[("AGENT_ENV_KUBECTL", kubectl.as_os_str())],
    );
    assert_eq!(
        settings(&h, "team-a/alice")["enabledPlugins"],
        json!({"fmt@acme-tools": true, "lint@acme-tools": true})
    );
    // The overlay's patch edited: the loop builds the kustomization again.
    let patch = overlay.join("more-plugins.yaml");
    let text = std::fs::read_to_string(&patch).unwrap();
    std::fs::write(
        &patch,
        text.replace("lint@acme-tools", "profiler@acme-tools"),
    )
    .unwrap();
    wait_until(
        "the edited patch rendered",
        || {
            std::fs::read_to_string(h.env_file("team-a/alice/settings.json"))
                .is_ok_and(|t| t.contains("profiler@acme-tools") && !t.contains("lint@"))
        },
        || l.log(),
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn without_kubectl_k_says_what_to_install() {
    let h = Host::new();
    let overlay = repo().join("agents/overlays/prod");
    let mut cmd = agent_env();
    cmd.args(["reconcile", "--once", "-k"])
        .arg(&overlay)
        .arg("--env-root")
        .arg(h.root())
        .env("AGENT_ENV_KUBECTL", "/nonexistent/kubectl");
    let run = Run::from(cmd.output().unwrap());
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "-k {}: cannot run \"/nonexistent/kubectl\" to build the kustomization (install kubectl, or set AGENT_ENV_KUBECTL to its path)",
            overlay.display()
        )),
        "{}",
        run.stderr
    );
    assert!(!h.root().join("team-a").exists());
}

/// 150 instances of one type, enough for a progress bar.
fn fleet(h: &Host) {
    let parts: Vec<String> = (0..150)
        .map(|i| instance("fleet", &format!("agent-{i}"), "coder"))
        .collect();
    h.manifest("fleet", &docs(&parts));
}

#[test]
fn progress_shows_on_a_terminal_and_nothing_extra_otherwise() {
    let h = Host::new();
    fleet(&h);
    // Not a terminal: stderr holds logs and nothing else.
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!run.stderr.contains("/150 instances"), "{}", run.stderr);
    assert!(!run.stderr.contains('\r'), "{}", run.stderr);

    // A terminal (a pseudo-terminal from `script`): a bar of instances done.
    let has_script = Command::new("script")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_script {
        eprintln!("SKIPPED the terminal half: no `script` (util-linux) to make a pseudo-terminal");
        return;
    }
    let h = Host::new();
    fleet(&h);
    let cmd = h.reconcile_command(&["--log", "warn"]);
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shlex::try_quote(&a.to_string_lossy()).unwrap().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args(["-qec", &format!("{line} >/dev/null"), "/dev/null"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("/150 instances"), "{shown:?}");
    assert_eq!(h.reconcile().code, 0);
}
