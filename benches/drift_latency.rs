//! Drift-correction latency of the continuous loop: an external edit of a
//! declared entry until the file on disk holds the declared value again.
//!
//! `cargo bench --bench drift_latency` starts the release binary on a temp env
//! root with 1,200 instances, edits one instance's `settings.json` at a time
//! (each instance once, so no backoff kicks in) and polls the file. Prints
//! p50/p99/max and writes `bench/results/drift-latency.json`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const INSTANCES: usize = 1200;
const EDITS: usize = 1000;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let manifests = dir.path().join("m");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&manifests).unwrap();
    let mut docs: Vec<String> = (0..INSTANCES)
        .map(|i| format!("apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata:\n  name: a{i}\n  namespace: dev\nspec:\n  agentType: coder\n"))
        .collect();
    docs.push("apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata:\n  name: coders\n  namespace: dev\nspec:\n  target:\n    agentType: coder\n  plugins:\n    - name: lint@tools\n".into());
    std::fs::write(manifests.join("fleet.yaml"), docs.join("---\n")).unwrap();

    let log = dir.path().join("loop.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .args([
            "reconcile",
            "--resync-interval",
            "1h",
            "--log",
            "warn",
            "-f",
        ])
        .arg(&manifests)
        .arg("--env-root")
        .arg(&root)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let last = root.join(format!("dev/a{}/settings.json", INSTANCES - 1));
    let started = Instant::now();
    while !last.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no initial render"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));

    let mut samples = Vec::with_capacity(EDITS);
    for i in 0..EDITS {
        let path = root.join(format!("dev/a{i}/settings.json"));
        let edited = edit(&path);
        let t0 = Instant::now();
        loop {
            if std::fs::read(&path).is_ok_and(|b| b != edited) && restored(&path) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "edit {i} never corrected"
            );
            std::hint::spin_loop();
        }
        samples.push(t0.elapsed());
    }
    let _ = child.kill();
    let _ = child.wait();

    samples.sort();
    let q = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p99, max) = (ms(q(0.50)), ms(q(0.99)), ms(*samples.last().unwrap()));
    println!(
        "drift correction over {EDITS} edits ({INSTANCES} instances, fsync on): p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    std::fs::create_dir_all(&out).unwrap();
    let json = format!(
        "{{\n  \"benchmark\": \"drift_latency\",\n  \"instances\": {INSTANCES},\n  \"edits\": {EDITS},\n  \"fsync\": true,\n  \"p50_ms\": {p50:.3},\n  \"p99_ms\": {p99:.3},\n  \"max_ms\": {max:.3}\n}}\n"
    );
    std::fs::write(out.join("drift-latency.json"), json).unwrap();
}

/// Turns the declared plugin off with an atomic replace; returns the bytes written.
fn edit(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    let edited = text.replace("\"lint@tools\": true", "\"lint@tools\": false");
    assert_ne!(text, edited, "{}", path.display());
    let tmp = path.with_extension("bench");
    std::fs::write(&tmp, &edited).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    edited.into_bytes()
}

fn restored(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| t.contains("\"lint@tools\": true"))
}
