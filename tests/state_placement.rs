//! A SQLite state database on a network filesystem is refused before
//! anything is written, naming the path, the filesystem and the fix; with
//! `--allow-network-state` it is opened with a warning. The network
//! filesystem here is a real FUSE mount of rclone (the subtype the kernel
//! reports, `fuse.rclone`, is how such mounts are told apart from local
//! FUSE ones); the test prints SKIPPED where rclone or FUSE is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// An rclone mount of a scratch directory; unmounted when dropped.
struct Mount {
    _src: tempfile::TempDir,
    dir: tempfile::TempDir,
}

impl Mount {
    fn start() -> Result<Mount, String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("no /dev/fuse".into());
        }
        let src = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let started = Command::new("rclone")
            .args(["mount", "--daemon", "--vfs-cache-mode", "writes"])
            .arg(src.path())
            .arg(dir.path())
            .status()
            .map_err(|e| format!("rclone: {e}"))?;
        if !started.success() {
            return Err(format!("rclone mount failed: {started}"));
        }
        let mount = Mount { _src: src, dir };
        let since = Instant::now();
        while !mount.mounted() {
            if since.elapsed() > Duration::from_secs(10) {
                return Err("the rclone mount never appeared".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(mount)
    }

    fn mounted(&self) -> bool {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(self.dir.path().to_str().unwrap()) && l.contains("fuse.rclone"))
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_sqlite_database_on_a_network_filesystem_is_refused_unless_insisted_on() {
    let mount = match Mount::start() {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED state on a network filesystem: {why}");
            return;
        }
    };
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            binding("dev", "base", "agentType: coder", &[("lint@tools", true)]),
        ]),
    );
    let db = mount.path().join("state/state.db");
    let state = format!("sqlite:{}", db.display());

    let run = h.reconcile_with(&["--state", &state]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let says = [
        db.display().to_string(),
        "network filesystem (FUSE (rclone))".to_owned(),
        "--state postgres://".to_owned(),
        "--allow-network-state".to_owned(),
    ];
    for s in &says {
        assert!(run.stderr.contains(s.as_str()), "{s}: {}", run.stderr);
    }
    assert!(!db.exists(), "nothing was created");
    assert!(!h.env_file("dev/alice/settings.json").exists());

    // Every command that opens the store checks, diff and the secret store included.
    let diff = h.run(
        &[
            "diff",
            "-f",
            h.manifests().to_str().unwrap(),
            "--state",
            &state,
        ],
        None,
    );
    assert_eq!(diff.code, 2, "{}", diff.stderr);
    assert!(
        diff.stderr.contains("network filesystem"),
        "{}",
        diff.stderr
    );
    let list = h.run(&["secret", "list", "--state", &state], None);
    assert_eq!(list.code, 2, "{}", list.stderr);

    let run = h.reconcile_with(&["--state", &state, "--allow-network-state"]);
    assert!(
        run.stderr.contains("network filesystem") && run.stderr.contains("started anyway"),
        "{}",
        run.stderr
    );
}
