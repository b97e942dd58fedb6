//! The rendered files as Claude Code itself reads them. Runs when the `claude`
//! binary is found (`AGENT_ENV_TEST_CLAUDE` or on PATH; `.ci/run` installs a
//! pinned version), and says so visibly when it is skipped.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn claude() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("AGENT_ENV_TEST_CLAUDE") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("claude"))
        .find(|p| p.is_file())
}

#[test]
fn claude_code_reads_every_rendered_mcp_server() {
    let Some(claude) = claude() else {
        eprintln!(
            "SKIPPED claude_code_reads_every_rendered_mcp_server: no claude binary (set AGENT_ENV_TEST_CLAUDE)"
        );
        return;
    };
    let h = Host::new();
    let local = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/marketplace");
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            binding("dev", "b", "agentType: coder", &[("release-notes@team-local", true)]),
            marketplace(
                "dev",
                "team-local",
                "agentType: coder",
                &format!("directory:\n  path: {local}\n"),
            ),
            // Only loopback addresses and a command that exits at once: `mcp list` connects.
            mcp("dev", "local-stdio", "agentType: coder", "stdio:\n  command: \"true\"\n  args: [\"--token\", \"${SECRET:T}\"]\n  env:\n    TOKEN: \"${SECRET:T}\"\ntimeout: 5000\n"),
            mcp("dev", "local-http", "agentType: coder", "http:\n  url: http://127.0.0.1:9/mcp\n  headers:\n    Authorization: \"Bearer ${SECRET:T}\"\n"),
            mcp("dev", "local-sse", "agentType: coder", "sse:\n  url: http://127.0.0.1:9/sse\n"),
            secret("dev", "s", &[("T", "tok")]),
        ]),
    );
    assert_eq!(h.reconcile().code, 0);
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(&claude)
        .args(["mcp", "list"])
        .env("CLAUDE_CONFIG_DIR", h.env_file("dev/alice"))
        .env("HOME", home.path())
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("DISABLE_TELEMETRY", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("Skipped"),
        "Claude Code refused an entry: {text}"
    );
    for line in [
        "local-stdio: true --token tok",
        "local-http: http://127.0.0.1:9/mcp (HTTP)",
        "local-sse: http://127.0.0.1:9/sse (SSE)",
    ] {
        assert!(text.contains(line), "missing {line:?} in: {text}");
    }
}
