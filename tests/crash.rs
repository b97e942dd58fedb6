//! Crash safety: SIGKILL at random moments while every instance is being
//! rewritten never leaves a file that is half old, half new, or missing a key
//! someone else wrote; the next pass converges.

mod common;

use std::process::Stdio;
use std::time::Instant;

use common::*;
use serde_json::{Value, json};

const INSTANCES: usize = 60;
const KILLS: usize = 200;

fn version(h: &Host, dir: &str, plugin: &str, command: &str) {
    let root = h.path(dir);
    std::fs::create_dir_all(&root).unwrap();
    let mut d: Vec<String> = (0..INSTANCES)
        .map(|i| instance("dev", &format!("a{i}"), "coder"))
        .collect();
    d.push(binding(
        "dev",
        "coders",
        "agentType: coder",
        &[(plugin, true)],
    ));
    d.push(mcp(
        "dev",
        "s",
        "agentType: coder",
        &format!("stdio:\n  command: {command}\n"),
    ));
    std::fs::write(root.join("fleet.yaml"), docs(&d)).unwrap();
}

fn run_once(h: &Host, dir: &str) -> std::process::Child {
    agent_env()
        .args(["reconcile", "--once", "-o", "json", "-f"])
        .arg(h.path(dir))
        .arg("--env-root")
        .arg(h.root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Each file is valid JSON, its owned keys are exactly version A's or B's,
/// and the keys Claude Code wrote are intact.
fn check(h: &Host, when: &str) {
    let plugins = [json!({"a@tools": true}), json!({"b@tools": true})];
    let servers = [
        json!({"s": {"type": "stdio", "command": "run-a"}}),
        json!({"s": {"type": "stdio", "command": "run-b"}}),
    ];
    for i in 0..INSTANCES {
        let read = |f: &str| -> Value {
            let path = h.env_file(&format!("dev/a{i}/{f}"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{when}: {f} of a{i}: {e}"));
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "{when}: {f} of a{i} is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        let s = read("settings.json");
        assert!(
            plugins.contains(&s["enabledPlugins"]),
            "{when}: a{i} settings {s}"
        );
        assert_eq!(
            s["theme"],
            format!("dark-{i}"),
            "{when}: a{i} lost a user key"
        );
        let c = read(".claude.json");
        assert!(
            servers.contains(&c["mcpServers"]),
            "{when}: a{i} .claude.json {c}"
        );
        assert_eq!(c["numStartups"], i, "{when}: a{i} lost a user key");
        assert_eq!(c["projects"]["/w"]["allowedTools"], json!(["Bash"]));
    }
}

#[test]
fn sigkill_at_random_moments_leaves_every_file_whole() {
    let h = Host::new();
    version(&h, "a", "a@tools", "run-a");
    version(&h, "b", "b@tools", "run-b");
    assert!(run_once(&h, "a").wait().unwrap().success());
    // What Claude Code keeps in these files besides the owned keys.
    for i in 0..INSTANCES {
        let mut s = h.read_json(&format!("dev/a{i}/settings.json"));
        s["theme"] = json!(format!("dark-{i}"));
        h.write_json(&format!("dev/a{i}/settings.json"), &s);
        let mut c = h.read_json(&format!("dev/a{i}/.claude.json"));
        c["numStartups"] = json!(i);
        c["projects"] = json!({"/w": {"allowedTools": ["Bash"]}});
        h.write_json(&format!("dev/a{i}/.claude.json"), &c);
    }
    check(&h, "before");

    let started = Instant::now();
    assert!(run_once(&h, "b").wait().unwrap().success());
    let full = started.elapsed();
    check(&h, "after a full run");

    let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ u64::from(std::process::id());
    let mut killed = 0;
    let mut runs = 0;
    while killed < KILLS {
        runs += 1;
        let mut child = run_once(&h, if runs % 2 == 0 { "a" } else { "b" });
        std::thread::sleep(jitter(&mut seed, full));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            killed += 1;
        }
        child.wait().unwrap();
        check(&h, &format!("after kill {killed} (run {runs})"));
        assert!(runs < KILLS * 3, "runs finish before they can be killed");
    }
    eprintln!("{killed} kills in {runs} runs; a full run takes {full:?}");

    // The next pass converges, and the one after it has nothing to do.
    let out = agent_env()
        .args(["reconcile", "--once", "-o", "json", "-f"])
        .arg(h.path("a"))
        .arg("--env-root")
        .arg(h.root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = agent_env()
        .args(["reconcile", "--once", "-o", "json", "-f"])
        .arg(h.path("a"))
        .arg("--env-root")
        .arg(h.root())
        .output()
        .unwrap();
    let rows: Vec<Value> = serde_json::from_slice(&again.stdout).unwrap();
    assert!(rows.iter().all(|r| r["reason"] == "UpToDate"), "{rows:?}");
    check(&h, "after convergence");
    let plugins_a = json!({"a@tools": true});
    for i in 0..INSTANCES {
        assert_eq!(
            h.read_json(&format!("dev/a{i}/settings.json"))["enabledPlugins"],
            plugins_a
        );
    }
    let tmp: Vec<_> = files_under(&h.root())
        .into_iter()
        .filter(|f| f.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temp files left after the sweep: {tmp:?}");
}
