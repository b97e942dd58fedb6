//! A running `agent-env reconcile` loop, for tests of the continuous mode.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{Host, agent_env};

/// A running `agent-env reconcile` loop; killed when dropped.
pub struct Loop {
    pub child: Child,
    log: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Loop {
    pub fn start(h: &Host, extra: &[&str]) -> Loop {
        Loop::start_with_env(h, extra, &[])
    }

    /// [`Loop::start`] with environment variables set for the binary.
    pub fn start_with_env(h: &Host, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Loop {
        let log = h.path("loop.log");
        let mut cmd = agent_env();
        cmd.envs(env.iter().copied());
        cmd.args(["reconcile", "-f"])
            .arg(h.manifests())
            .arg("--env-root")
            .arg(h.root())
            .args(["--no-fsync", "--resync-interval", "1h"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if h.path("config").exists() {
            cmd.arg("--config").arg(h.path("config"));
        }
        let l = Loop {
            child: cmd.spawn().unwrap(),
            log,
        };
        l.wait_for_log("watching for changes");
        l
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str) {
        wait_until(
            &format!("log line {needle:?}"),
            || self.log().contains(needle),
            || self.log(),
        );
    }

    pub fn sigterm(&mut self) -> i32 {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Polls `cond` until it holds; panics with `context()` after 15 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let started = Instant::now();
    while !cond() {
        if started.elapsed() > Duration::from_secs(15) {
            panic!("timed out waiting for {what}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
