//! Fleet benchmark: cold render, no-op pass, write floor and the scripted jq
//! baseline per fleet size; then, on the largest fleet, the continuous loop:
//! fan-out of one type binding, drift-correction latency, peak RSS and idle
//! CPU. Everything runs in one process tree on one machine, so the ratios
//! hold even where absolute times are noisy.
//!
//! `cargo bench --bench fleet` (release build). Environment:
//! - `FLEET_SIZES` (default `1000,10000`): fleet sizes, comma-separated;
//! - `FLEET_BASELINE` (default `1`): `0` skips the jq baseline;
//! - `FLEET_BASELINE_MAX` (default `1000`): largest fleet the jq baseline
//!   runs on (it takes about 80 ms per instance and run here, three runs);
//! - `FLEET_DIR` (default `target/bench-fleet`): where fleets are generated
//!   (a real disk: fsync on tmpfs is free);
//! - `FLEET_IDLE_SECS` (default `60`): the idle CPU window;
//! - `FLEET_LOOP_SIZE` (default: the largest of `FLEET_SIZES`): the fleet
//!   size the continuous loop is measured on (`1000,10000,100000` with
//!   `10000` measures `--once` up to 100,000 and the loop at 10,000);
//! - `FLEET_PARTS` (default `host,cluster,sidecar`): `host` is all of the
//!   above, `cluster` the controller on a real kube-apiserver (`cluster.rs`;
//!   needs `KUBEBUILDER_ASSETS`, skipped without), `sidecar` sidecar
//!   delivery's drift latency and memory there (`sidecar.rs`);
//! - `FLEET_CLUSTER_SIZES` (default `1000,10000`): fleet sizes of the
//!   cluster part;
//! - `FLEET_REPORT_ONLY=1`: rewrite the `.md` tables from the `.json`
//!   results and stop;
//! - `FLEET_LOOP_ONLY=1`: only the continuous loop, on the fleet of
//!   `FLEET_LOOP_SIZE` an earlier run left rendered in `FLEET_DIR`; prints
//!   its results and writes no file (for comparing two builds).
//!
//! Writes `bench/results/fleet.json` and `fleet.md` (host), `cluster.json`
//! and `cluster.md` (cluster), `sidecar.json` and `sidecar.md` (sidecar).

mod cluster;
mod fleet_gen;
mod probe;
mod sidecar;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use fleet_gen::{NS, TYPES, instance_name, type_name, type_of};

const BIN: &str = env!("CARGO_BIN_EXE_agent-env");
const DRIFT_EDITS: usize = 1000;
/// The type whose binding the fan-out step changes.
const FANOUT_TYPE: usize = 3;

fn main() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results");
    // Only the tables again, from the last results (after changing a layout).
    if std::env::var("FLEET_REPORT_ONLY").is_ok_and(|v| v == "1") {
        let read = |f: &str| -> Option<Value> {
            serde_json::from_slice(&std::fs::read(out.join(f)).ok()?).ok()
        };
        if let Some(r) = read("fleet.json") {
            std::fs::write(out.join("fleet.md"), markdown(&r)).unwrap();
        }
        if let Some(r) = read("cluster.json") {
            std::fs::write(out.join("cluster.md"), cluster_markdown(&r)).unwrap();
        }
        return;
    }
    // `cargo bench` passes `--bench`; there is nothing to filter.
    let sizes = |var: &str| -> Vec<usize> {
        std::env::var(var)
            .unwrap_or_else(|_| "1000,10000".into())
            .split(',')
            .map(|s| s.trim().parse().expect("fleet sizes: numbers"))
            .collect()
    };
    let parts = std::env::var("FLEET_PARTS").unwrap_or_else(|_| "host,cluster,sidecar".into());
    let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
    let base = std::env::var_os("FLEET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-fleet"),
        PathBuf::from,
    );
    if !loop_only() {
        let _ = std::fs::remove_dir_all(&base);
    }
    std::fs::create_dir_all(&base).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    if parts.contains(&"host") {
        host(&base, &sizes("FLEET_SIZES"), &out);
    }
    if parts.contains(&"sidecar") {
        let measured = sidecar::measure(&base);
        if !measured.is_null() {
            let report = json!({
                "benchmark": "sidecar",
                "date": date(),
                "machine": probe::machine(),
                "sidecar": measured,
            });
            std::fs::write(
                out.join("sidecar.json"),
                serde_json::to_string_pretty(&report).unwrap() + "\n",
            )
            .unwrap();
            let table = sidecar::markdown(&report);
            std::fs::write(out.join("sidecar.md"), &table).unwrap();
            println!("{table}");
        }
    }
    if parts.contains(&"cluster") {
        let fleets = cluster::measure(&base, &sizes("FLEET_CLUSTER_SIZES"));
        if fleets.is_null() {
            return;
        }
        let report = json!({
            "benchmark": "cluster",
            "date": date(),
            "machine": probe::machine(),
            "fleets": fleets,
        });
        std::fs::write(
            out.join("cluster.json"),
            serde_json::to_string_pretty(&report).unwrap() + "\n",
        )
        .unwrap();
        let table = cluster_markdown(&report);
        std::fs::write(out.join("cluster.md"), &table).unwrap();
        println!("{table}");
    }
}

fn loop_only() -> bool {
    std::env::var("FLEET_LOOP_ONLY").is_ok_and(|v| v == "1")
}

/// The host part: `reconcile --once` per size, then the loop on the largest.
fn host(base: &Path, sizes: &[usize], out: &Path) {
    let baseline = std::env::var("FLEET_BASELINE").map_or(true, |v| v != "0");
    let baseline_max: usize = std::env::var("FLEET_BASELINE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let idle_secs: u64 = std::env::var("FLEET_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);

    let loop_size: usize = std::env::var("FLEET_LOOP_SIZE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| sizes.iter().copied().max().unwrap_or_default());
    if loop_only() {
        let dir = base.join(format!("n{loop_size}"));
        // The type binding as generated: the fan-out's edit must change it.
        std::fs::write(
            dir.join(format!("manifests/types/{}.yaml", type_name(FANOUT_TYPE))),
            fleet_gen::type_manifest(FANOUT_TYPE, &[]),
        )
        .unwrap();
        let r = measure_loop(&dir, loop_size, idle_secs);
        println!("{}", serde_json::to_string_pretty(&r).unwrap());
        return;
    }
    let mut fleets = Vec::new();
    let mut loop_result = Value::Null;
    for &n in sizes {
        let dir = base.join(format!("n{n}"));
        fleet_gen::generate(&dir, n);
        eprintln!("== {n} instances");
        let mut r = measure_passes(&dir, n);
        if baseline && n <= baseline_max {
            r["baseline"] = measure_baseline(&dir, n, &r);
        }
        if n == loop_size {
            loop_result = measure_loop(&dir, n, idle_secs);
        }
        fleets.push(r);
        let _ = std::fs::remove_dir_all(dir.join("nofsync"));
        let _ = std::fs::remove_dir_all(dir.join("floor"));
    }

    let report = json!({
        "benchmark": "fleet",
        "date": date(),
        "machine": probe::machine(),
        "fleets": fleets,
        "loop": loop_result,
    });
    std::fs::write(
        out.join("fleet.json"),
        serde_json::to_string_pretty(&report).unwrap() + "\n",
    )
    .unwrap();
    let table = markdown(&report);
    std::fs::write(out.join("fleet.md"), &table).unwrap();
    println!("{table}");
}

/// Cold render and no-op pass, with and without fsync, and the write floors.
fn measure_passes(dir: &Path, n: usize) -> Value {
    let mut r = json!({"instances": n});
    for (fsync, label) in [(true, "fsync"), (false, "nofsync")] {
        let root = dir.join(label);
        let cold = reconcile_once(dir, &root, fsync);
        assert_eq!(
            cold.reasons.get("Rendered"),
            Some(&n),
            "cold render: {:?}",
            cold.reasons
        );
        let files = rendered_files(&root.join(NS));
        let floor = write_floor(&dir.join("floor"), &files, fsync);
        let _ = std::fs::remove_dir_all(dir.join("floor"));
        eprintln!(
            "cold render ({label}): {:.3} s (load {:.3} s, pass {:.3} s), write floor {:.3} s, peak RSS {} MB",
            cold.wall.as_secs_f64(),
            cold.load_ms / 1000.0,
            cold.pass_ms / 1000.0,
            floor.as_secs_f64(),
            cold.peak_rss / 1_000_000
        );
        r[format!("cold_{label}_s")] = secs(cold.wall);
        r[format!("cold_{label}_pass_s")] = json!(cold.pass_ms / 1000.0);
        r[format!("cold_{label}_load_s")] = json!(cold.load_ms / 1000.0);
        r[format!("cold_{label}_per_s")] = json!((n as f64 / cold.wall.as_secs_f64()).round());
        r[format!("floor_{label}_s")] = secs(floor);
        r[format!("cold_over_floor_{label}")] = ratio(cold.wall, floor);
        r[format!("cold_{label}_peak_rss_mb")] = json!(cold.peak_rss / 1_000_000);
        if fsync {
            r["per_instance_ms"] =
                json!((cold.wall.as_secs_f64() * 1000.0 / n as f64 * 1000.0).round() / 1000.0);
            r["per_instance_rss_kb"] = json!((cold.peak_rss / 1000) / n as u64);
        }
        r["files"] = json!(files.len());
        r["bytes"] = json!(files.iter().map(|(_, b)| b.len()).sum::<usize>());
        if fsync {
            // The first pass after a render reads every file and keeps their
            // stamps once they are old enough (2 s); the passes after it
            // read only files whose stamps changed. Both are measured: the
            // first after the files have settled, then the steady one.
            std::thread::sleep(Duration::from_millis(2100));
            for (key, first) in [("noop_first", true), ("noop", false)] {
                let before = probe::stamps(&root.join(NS));
                let noop = reconcile_once(dir, &root, fsync);
                let written = probe::changed(&before, &probe::stamps(&root.join(NS)));
                assert_eq!(
                    noop.reasons.get("UpToDate"),
                    Some(&n),
                    "no-op: {:?}",
                    noop.reasons
                );
                eprintln!(
                    "no-op reconcile --once ({}): {:.3} s (pass {:.3} s), {} files written, peak RSS {} MB",
                    if first {
                        "first after the render"
                    } else {
                        "steady"
                    },
                    noop.wall.as_secs_f64(),
                    noop.pass_ms / 1000.0,
                    written.len(),
                    noop.peak_rss / 1_000_000
                );
                r[format!("{key}_s")] = secs(noop.wall);
                r[format!("{key}_pass_s")] = json!(noop.pass_ms / 1000.0);
                r[format!("{key}_files_written")] = json!(written.len());
                r[format!("{key}_peak_rss_mb")] = json!(noop.peak_rss / 1_000_000);
            }
        }
    }
    r
}

struct Once {
    wall: Duration,
    peak_rss: u64,
    reasons: BTreeMap<String, usize>,
    /// Reading and checking the manifests, as the command logged it.
    load_ms: f64,
    /// The pass itself, as the command logged it.
    pass_ms: f64,
}

/// The fields of the log lines (JSON format) with this message.
fn logged(log: &Path, message: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .map(|v| v["fields"].clone())
        .collect()
}

/// `agent-env reconcile --once` as a user runs it, end to end.
fn reconcile_once(dir: &Path, root: &Path, fsync: bool) -> Once {
    let out = dir.join("once.json");
    let log = dir.join("once.log");
    let mut cmd = Command::new(BIN);
    cmd.args([
        "reconcile",
        "--once",
        "--log",
        "info",
        "--log-format",
        "json",
        "-o",
        "json",
        "-f",
    ])
    .arg(dir.join("manifests"))
    .arg("--config")
    .arg(dir.join("config"))
    .arg("--env-root")
    .arg(root)
    .stdout(File::create(&out).unwrap())
    .stderr(File::create(&log).unwrap());
    if !fsync {
        cmd.arg("--no-fsync");
    }
    let (status, wall, peak_rss) = probe::wait_with_peak(cmd.spawn().unwrap());
    assert!(status.success(), "reconcile --once failed: {status}");
    let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let mut reasons = BTreeMap::new();
    for row in rows {
        *reasons
            .entry(row["reason"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let done = logged(&log, "pass done");
    let field = |k: &str| {
        done.last()
            .and_then(|f| f[k].as_f64())
            .expect("a pass done log line")
    };
    Once {
        wall,
        peak_rss,
        reasons,
        load_ms: field("load_ms"),
        pass_ms: field("pass_ms"),
    }
}

/// Every env file under `ns_root`, relative path and bytes.
fn rendered_files(ns_root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for i in std::fs::read_dir(ns_root).unwrap() {
        let dir = i.unwrap().path();
        for f in ["settings.json", ".claude.json"] {
            let p = dir.join(f);
            let rel = p.strip_prefix(ns_root).unwrap().to_owned();
            out.push((rel, std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// The least any renderer must do: create the dirs and write the same bytes
/// to the same number of files, with the same fsync policy, in a plain loop.
fn write_floor(dest: &Path, files: &[(PathBuf, Vec<u8>)], fsync: bool) -> Duration {
    let _ = std::fs::remove_dir_all(dest);
    let started = Instant::now();
    let mut made = HashSet::new();
    for (rel, bytes) in files {
        let path = dest.join(rel);
        let parent = path.parent().unwrap().to_owned();
        if made.insert(parent.clone()) {
            std::fs::create_dir_all(&parent).unwrap();
        }
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        if fsync {
            f.sync_all().unwrap();
        }
    }
    started.elapsed()
}

/// The jq script on the same fleet: cold with and without fsync, then a
/// no-op run; its output checked against ours on a sample.
fn measure_baseline(dir: &Path, n: usize, ours: &Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/baseline/render.sh");
    let run = |root: &Path, fsync: bool| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script).arg(dir.join("baseline")).arg(root);
        if fsync {
            cmd.arg("--fsync");
        }
        let started = Instant::now();
        let status = cmd.status().unwrap();
        assert!(status.success(), "baseline script failed: {status}");
        started.elapsed()
    };
    let mut r = json!({});
    for (fsync, label) in [(true, "fsync"), (false, "nofsync")] {
        let root = dir.join(format!("jq-{label}"));
        let cold = run(&root, fsync);
        eprintln!("jq baseline cold ({label}): {:.3} s", cold.as_secs_f64());
        r[format!("cold_{label}_s")] = secs(cold);
        let ours_s = ours[format!("cold_{label}_s")].as_f64().unwrap();
        r[format!("speedup_cold_{label}")] = json!(round2(cold.as_secs_f64() / ours_s));
        if fsync {
            let sample = compare_sample(&dir.join("fsync").join(NS), &root, n);
            r["sample_checked"] = json!(sample);
            let before = probe::stamps(&root);
            let noop = run(&root, fsync);
            let written = probe::changed(&before, &probe::stamps(&root));
            eprintln!(
                "jq baseline no-op: {:.3} s, {} files written",
                noop.as_secs_f64(),
                written.len()
            );
            r["noop_s"] = secs(noop);
            r["noop_files_written"] = json!(written.len());
            let ours_noop = ours["noop_s"].as_f64().unwrap();
            r["speedup_noop"] = json!(round2(noop.as_secs_f64() / ours_noop));
        }
        let _ = std::fs::remove_dir_all(&root);
    }
    r
}

/// The owned keys of ours and the script's files agree, for every 50th instance.
fn compare_sample(ours: &Path, theirs: &Path, n: usize) -> usize {
    let read = |p: PathBuf| -> Value {
        serde_json::from_slice(&std::fs::read(&p).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let mut checked = 0;
    for i in (0..n).step_by(50) {
        let name = instance_name(i);
        for (file, keys) in [
            (
                "settings.json",
                &["enabledPlugins", "extraKnownMarketplaces"][..],
            ),
            (".claude.json", &["mcpServers"][..]),
        ] {
            let a = read(ours.join(&name).join(file));
            let b = read(theirs.join(&name).join(file));
            for k in keys {
                assert_eq!(
                    a[k], b[k],
                    "{name}/{file} key {k}: ours and the script's differ"
                );
            }
        }
        checked += 1;
    }
    checked
}

/// The continuous loop on the rendered fleet: fan-out, drift, memory, idle.
fn measure_loop(dir: &Path, n: usize, idle_secs: u64) -> Value {
    let root = dir.join("fsync");
    let ns_root = root.join(NS);
    let log = dir.join("loop.log");
    let mut child = Loop(
        Command::new(BIN)
            .args([
                "reconcile",
                "--resync-interval",
                "1h",
                "--log",
                "info",
                "--log-format",
                "json",
                "-f",
            ])
            .arg(dir.join("manifests"))
            .arg("--config")
            .arg(dir.join("config"))
            .arg("--env-root")
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("watching for changes")
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the loop never got ready"
        );
        assert!(child.try_wait().unwrap().is_none(), "the loop exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Everything was rendered by `reconcile --once`: the loop's first full
    // pass is a no-op pass over the whole fleet, timed by the loop itself.
    let noop_pass_ms = logged(&log, "pass done")
        .first()
        .and_then(|f| f["pass_ms"].as_f64())
        .expect("the first pass logged");
    let noop_written = logged(&log, "pass done")[0]["written"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "loop ready after {:.3} s; its first (no-op) full pass {:.3} s, {noop_written} instances written",
        started.elapsed().as_secs_f64(),
        noop_pass_ms / 1000.0
    );
    std::thread::sleep(Duration::from_millis(500));

    let mut fanout = measure_fanout(dir, &ns_root, n);
    fanout["pass_ms"] = logged(&log, "pass done")
        .iter()
        .find(|f| f["written"].as_u64().unwrap_or(0) > 0)
        .map_or(Value::Null, |f| f["pass_ms"].clone());
    let drift = measure_drift(&ns_root, n);

    std::thread::sleep(Duration::from_secs(5));
    let cpu0 = probe::cpu_time(child.id());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_millicores =
        (probe::cpu_time(child.id()) - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64() * 1000.0;
    let peak = probe::peak_rss(child.id()).unwrap();
    eprintln!(
        "loop: peak RSS {} MB, idle CPU {idle_millicores:.2} millicores over {idle_secs} s",
        peak / 1_000_000
    );
    drop(child);
    json!({
        "instances": n,
        "noop_pass_s": noop_pass_ms / 1000.0,
        "noop_instances_written": noop_written,
        "fanout": fanout,
        "drift": drift,
        "peak_rss_mb": peak / 1_000_000,
        "idle_millicores": round2(idle_millicores),
        "idle_window_s": idle_secs,
    })
}

/// One type binding gains a plugin: time from the manifest write to the
/// last affected `settings.json` holding it; no other instance's files touched.
fn measure_fanout(dir: &Path, ns_root: &Path, n: usize) -> Value {
    use notify::Watcher as _;
    let affected: Vec<PathBuf> = (0..n)
        .filter(|i| type_of(*i) == FANOUT_TYPE)
        .map(|i| ns_root.join(instance_name(i)))
        .collect();
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let at = Instant::now();
            for p in ev.paths {
                let _ = tx.send((at, p));
            }
        }
    })
    .unwrap();
    for d in &affected {
        watcher
            .watch(d, notify::RecursiveMode::NonRecursive)
            .unwrap();
    }
    let before = probe::stamps(ns_root);
    let plugin = "fanout";
    let id = format!("\"{plugin}@mkt-{}\": true", type_name(FANOUT_TYPE));
    let manifest = dir.join(format!("manifests/types/{}.yaml", type_name(FANOUT_TYPE)));
    let text = fleet_gen::type_manifest(FANOUT_TYPE, &[plugin]);
    let t0 = Instant::now();
    std::fs::write(&manifest, text).unwrap();

    let mut pending: HashSet<PathBuf> = affected.iter().cloned().collect();
    let mut last = Duration::ZERO;
    while !pending.is_empty() {
        let (at, path) = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("fan-out: {} instances never written", pending.len()));
        if path.file_name().is_some_and(|f| f == "settings.json")
            && let Some(d) = path.parent()
            && pending.contains(d)
            && std::fs::read_to_string(&path).is_ok_and(|t| t.contains(&id))
        {
            pending.remove(d);
            last = last.max(at - t0);
        }
    }
    drop(watcher);
    std::thread::sleep(Duration::from_millis(500));
    let touched = probe::changed(&before, &probe::stamps(ns_root));
    let others: Vec<&PathBuf> = touched
        .iter()
        .filter(|p| !affected.iter().any(|d| p.starts_with(d)))
        .collect();
    let claude_touched = touched
        .iter()
        .filter(|p| p.ends_with(".claude.json"))
        .count();
    eprintln!(
        "fan-out: {} instances in {:.1} ms to the last write; {} other instances' files touched, {} .claude.json",
        affected.len(),
        ms(last),
        others.len(),
        claude_touched
    );
    assert!(
        others.is_empty(),
        "fan-out touched other instances: {others:?}"
    );
    json!({
        "instances": affected.len(),
        "last_write_ms": round2(ms(last)),
        "files_written": touched.len(),
        "other_instances_touched": others.len(),
    })
}

/// Edits an owned key of random instances (each once, so no fight backoff)
/// and times each until the file holds the declared value again.
fn measure_drift(ns_root: &Path, n: usize) -> Value {
    let edits = DRIFT_EDITS.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    for i in (1..order.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        order.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    // Waiting on inotify, not by reading the file in a loop: a reader
    // spinning on one of two cores would take it from the operator.
    use notify::Watcher as _;
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok() {
            let _ = tx.send(());
        }
    })
    .unwrap();
    let mut samples = Vec::with_capacity(edits);
    for &i in order.iter().take(edits) {
        let ty = type_name(type_of(i));
        let dir = ns_root.join(instance_name(i));
        let path = dir.join("settings.json");
        let on = format!("\"p05@mkt-{ty}\": true");
        let off = format!("\"p05@mkt-{ty}\": false");
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replace(&on, &off);
        assert_ne!(text, edited, "{}", path.display());
        let tmp = path.with_extension("bench");
        std::fs::write(&tmp, &edited).unwrap();
        watcher
            .watch(&dir, notify::RecursiveMode::NonRecursive)
            .unwrap();
        while rx.try_recv().is_ok() {}
        let t0 = Instant::now();
        std::fs::rename(&tmp, &path).unwrap();
        // Timed when the file is read back corrected: an upper bound (an
        // event may be our own rename, the correction already behind it).
        let put_back = loop {
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("edit of {} never corrected", path.display()));
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(&on)) {
                break Instant::now();
            }
        };
        watcher.unwatch(&dir).unwrap();
        samples.push(put_back - t0);
    }
    samples.sort();
    let q = |p: f64| ms(samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]);
    let (p50, p99, max) = (q(0.50), q(0.99), ms(*samples.last().unwrap()));
    eprintln!("drift: {edits} edits, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms");
    json!({"edits": edits, "p50_ms": round2(p50), "p99_ms": round2(p99), "max_ms": round2(max)})
}

/// The loop under test, stopped however the bench ends (a failed check
/// must not leave it running on the next run's files).
struct Loop(Child);

impl Drop for Loop {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}

impl std::ops::Deref for Loop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Loop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn markdown(r: &Value) -> String {
    let fleets = r["fleets"].as_array().unwrap();
    let mut s = String::new();
    let m = &r["machine"];
    s.push_str(&format!(
        "Fleet benchmark, {} on {} ({} cores, {} GiB), {} agent types, 20 plugins and 10 MCP servers with secrets per type, 3 instance-scope overrides per instance.\n\n",
        r["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["cores"],
        m["memory_gib"],
        TYPES
    ));
    s.push_str("| measure |");
    for f in fleets {
        s.push_str(&format!(" {} instances |", f["instances"]));
    }
    s.push_str(" target |\n|---|");
    for _ in fleets {
        s.push_str("---|");
    }
    s.push_str("---|\n");
    let row = |s: &mut String, label: &str, f: &dyn Fn(&Value) -> String, target: &str| {
        s.push_str(&format!("| {label} |"));
        for fl in fleets {
            s.push_str(&format!(" {} |", f(fl)));
        }
        s.push_str(&format!(" {target} |\n"));
    };
    let num = |v: &Value| v.as_f64().map_or("n/a".to_owned(), |x| format!("{x}"));
    // (label, where in a fleet's results, target)
    const ROWS: &[(&str, &str, &str)] = &[
        (
            "cold render, fsync: `reconcile --once` (s)",
            "/cold_fsync_s",
            "100k < 60 s",
        ),
        (
            "  of which reading the manifests (s)",
            "/cold_fsync_load_s",
            "10k < 0.4 s",
        ),
        ("  of which the pass (s)", "/cold_fsync_pass_s", ""),
        ("write floor, fsync (s)", "/floor_fsync_s", ""),
        ("cold / floor, fsync", "/cold_over_floor_fsync", "≤ 1.5"),
        (
            "cold render, no fsync: `reconcile --once` (s)",
            "/cold_nofsync_s",
            "10k < 3 s",
        ),
        ("  of which the pass (s)", "/cold_nofsync_pass_s", ""),
        ("write floor, no fsync (s)", "/floor_nofsync_s", ""),
        ("cold / floor, no fsync", "/cold_over_floor_nofsync", "≤ 3"),
        ("instances/s, fsync", "/cold_fsync_per_s", ""),
        (
            "first no-op after a render: `reconcile --once` (s)",
            "/noop_first_s",
            "",
        ),
        (
            "first no-op after a render: the pass (s)",
            "/noop_first_pass_s",
            "",
        ),
        (
            "first no-op after a render: files written",
            "/noop_first_files_written",
            "0",
        ),
        ("no-op: `reconcile --once` (s)", "/noop_s", "10k < 1.5 s"),
        ("no-op: the pass (s)", "/noop_pass_s", "10k < 0.5 s"),
        ("no-op: files written", "/noop_files_written", "0"),
        ("jq baseline cold, fsync (s)", "/baseline/cold_fsync_s", ""),
        (
            "speedup over jq, fsync",
            "/baseline/speedup_cold_fsync",
            "≥ 10",
        ),
        (
            "jq baseline cold, no fsync (s)",
            "/baseline/cold_nofsync_s",
            "",
        ),
        (
            "speedup over jq, no fsync",
            "/baseline/speedup_cold_nofsync",
            "≥ 10",
        ),
        ("jq baseline no-op (s)", "/baseline/noop_s", ""),
        ("speedup over jq, no-op", "/baseline/speedup_noop", ""),
        (
            "peak RSS, cold render (MB)",
            "/cold_fsync_peak_rss_mb",
            "10k < 150, 100k < 1000",
        ),
        ("peak RSS, no-op (MB)", "/noop_peak_rss_mb", "10k < 150"),
        (
            "peak RSS, first no-op after a render (MB)",
            "/noop_first_peak_rss_mb",
            "10k < 150",
        ),
        ("per instance: cold, fsync (ms)", "/per_instance_ms", ""),
        ("per instance: peak RSS (KB)", "/per_instance_rss_kb", ""),
    ];
    for (label, at, target) in ROWS {
        row(
            &mut s,
            label,
            &|f| num(f.pointer(at).unwrap_or(&Value::Null)),
            target,
        );
    }
    let l = &r["loop"];
    if !l.is_null() {
        s.push_str(&format!(
            "\nContinuous loop on {} instances (fsync on):\n\n| measure | value | target |\n|---|---|---|\n",
            l["instances"]
        ));
        s.push_str(&format!(
            "| no-op full pass (the loop's first, after `reconcile --once`) | {} s, {} written | 10k < 0.5 s |\n",
            l["noop_pass_s"], l["noop_instances_written"]
        ));
        s.push_str(&format!(
            "| fan-out of one type binding to {} instances, manifest write to the last file write | {} ms (pass {} ms) | < 300 ms |\n",
            l["fanout"]["instances"], l["fanout"]["last_write_ms"], l["fanout"]["pass_ms"]
        ));
        s.push_str(&format!(
            "| other instances' files touched by the fan-out | {} | 0 |\n",
            l["fanout"]["other_instances_touched"]
        ));
        s.push_str(&format!(
            "| drift correction over {} edits: p50 / p99 / max | {} / {} / {} ms | p99 < 5, max < 25 |\n",
            l["drift"]["edits"], l["drift"]["p50_ms"], l["drift"]["p99_ms"], l["drift"]["max_ms"]
        ));
        s.push_str(&format!(
            "| peak RSS of the loop | {} MB | < 120 MB |\n",
            l["peak_rss_mb"]
        ));
        s.push_str(&format!(
            "| idle CPU over {} s | {} millicores | < 10 |\n",
            l["idle_window_s"], l["idle_millicores"]
        ));
    }
    s
}

fn cluster_markdown(r: &Value) -> String {
    let fleets = r["fleets"].as_array().unwrap();
    let m = &r["machine"];
    let mut s = format!(
        "Cluster benchmark, {} on {} ({} cores, {} GiB): `agent-env run` as its service account against kube-apiserver and etcd on the same machine, the fleet of the fleet benchmark created through the API (instance-scope objects before the instances).\n\n| measure |",
        r["date"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["cores"],
        m["memory_gib"],
    );
    for f in fleets {
        s.push_str(&format!(" {} instances |", f["instances"]));
    }
    s.push_str(" target |\n|---|");
    for _ in fleets {
        s.push_str("---|");
    }
    s.push_str("---|\n");
    const ROWS: &[(&str, &str, &str)] = &[
        ("objects in the namespace", "/objects", ""),
        (
            "live: creating the instances, 16 at a time (s)",
            "/live/create_s",
            "",
        ),
        (
            "live: last create to all Ready (s)",
            "/live/ready_after_last_create_s",
            "10k < 10 s",
        ),
        (
            "live: operator API requests per instance",
            "/live/requests_per_instance/total",
            "",
        ),
        (
            "live: operator peak RSS (MB)",
            "/live/peak_rss_mb",
            "10k < 200",
        ),
        ("cold start to all Ready (s)", "/cold/all_ready_s", ""),
        (
            "  of which listing every object, until leading (s)",
            "/cold/leading_s",
            "",
        ),
        (
            "cold start: operator API requests per instance",
            "/cold/requests_per_instance/total",
            "",
        ),
        (
            "cold start: operator peak RSS (MB)",
            "/cold/peak_rss_mb",
            "10k < 200",
        ),
        ("floor: the same status applies alone (s)", "/floor_s", ""),
        ("cold start / floor", "/cold_over_floor", "≤ 1.5"),
        (
            "floor with the one event per instance the operator sends (s)",
            "/floor_with_events_s",
            "",
        ),
        (
            "cold start / floor with events",
            "/cold_over_floor_with_events",
            "",
        ),
    ];
    for (label, at, target) in ROWS {
        s.push_str(&format!("| {label} |"));
        for f in fleets {
            let v = f.pointer(at).unwrap_or(&Value::Null);
            s.push_str(&format!(
                " {} |",
                if v.is_null() {
                    "n/a".into()
                } else {
                    v.to_string()
                }
            ));
        }
        s.push_str(&format!(" {target} |\n"));
    }
    s
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn secs(d: Duration) -> Value {
    json!((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> Value {
    json!(round2(a.as_secs_f64() / b.as_secs_f64()))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
