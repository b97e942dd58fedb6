//! The continuous loop, run as the real binary on a temp env root: drift put
//! back and runtime installs adopted without waiting for a resync, exactly
//! the affected instances re-rendered, debounced restarts, clean SIGTERM, and
//! files that survive SIGKILL at any moment.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::host_loop::{Loop, wait_until};
use common::*;
use serde_json::{Value, json};

fn plugins(h: &Host, inst: &str) -> Value {
    std::fs::read_to_string(h.env_file(&format!("{inst}/settings.json")))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map_or(Value::Null, |v| v["enabledPlugins"].clone())
}

/// Replaces a file the way editors and Claude Code do: temp file, rename.
fn write_atomically(h: &Host, rel: &str, v: &Value) {
    let path = h.env_file(rel);
    let tmp = path.with_extension("edit");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).unwrap()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

fn fleet(h: &Host) {
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            instance("dev", "bob", "coder"),
            instance("dev", "carol", "researcher"),
            binding("dev", "coders", "agentType: coder", &[("lint@tools", true)]),
            binding(
                "dev",
                "researchers",
                "agentType: researcher",
                &[("notes@tools", true)],
            ),
        ]),
    );
}

#[test]
fn drift_is_put_back_and_runtime_installs_adopted_without_a_resync() {
    let h = Host::new();
    fleet(&h);
    let lp = Loop::start(&h, &[]);
    assert_eq!(plugins(&h, "dev/alice"), json!({"lint@tools": true}));

    // Drift on a declared key, written with a plain (non-atomic) write.
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["lint@tools"] = json!(false);
    s["theme"] = json!("dark");
    std::fs::write(
        h.env_file("dev/alice/settings.json"),
        serde_json::to_vec(&s).unwrap(),
    )
    .unwrap();
    wait_until(
        "drift put back",
        || plugins(&h, "dev/alice")["lint@tools"] == json!(true),
        || lp.log(),
    );
    assert_eq!(h.read_json("dev/alice/settings.json")["theme"], "dark");

    // A runtime install, as `claude plugin install` writes it.
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["mine@tools"] = json!(true);
    write_atomically(&h, "dev/alice/settings.json", &s);
    lp.wait_for_log("runtime installs adopted: enabledPlugins.mine@tools");

    // The container is rebuilt: the env dir is wiped and comes back, install
    // included. Moved out in one step: a file-by-file removal races with the
    // loop putting files back.
    std::fs::rename(h.env_file("dev/alice"), h.path("wiped-alice")).unwrap();
    // The two files are written one after the other: wait for both.
    wait_until(
        "env dir re-rendered",
        || {
            plugins(&h, "dev/alice") == json!({"lint@tools": true, "mine@tools": true})
                && h.env_file("dev/alice/.claude.json").exists()
        },
        || lp.log(),
    );

    // The env dir made again is watched again: drift in it is put back
    // without a resync (the loop's resync is an hour away).
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["lint@tools"] = json!(false);
    write_atomically(&h, "dev/alice/settings.json", &s);
    wait_until(
        "drift in the re-made env dir put back",
        || plugins(&h, "dev/alice")["lint@tools"] == json!(true),
        || lp.log(),
    );
}

/// (inode, mtime) of both files of an instance.
fn stamps(h: &Host, inst: &str) -> Vec<(u64, i64, i64)> {
    ["settings.json", ".claude.json"]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(h.env_file(&format!("{inst}/{f}"))).unwrap();
            (m.ino(), m.mtime(), m.mtime_nsec())
        })
        .collect()
}

#[test]
fn a_type_binding_edit_re_renders_exactly_that_types_instances() {
    let h = Host::new();
    fleet(&h);
    let lp = Loop::start(&h, &[]);
    let carol = stamps(&h, "dev/carol");
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            instance("dev", "bob", "coder"),
            instance("dev", "carol", "researcher"),
            binding(
                "dev",
                "coders",
                "agentType: coder",
                &[("lint@tools", true), ("fmt@tools", true)],
            ),
            binding(
                "dev",
                "researchers",
                "agentType: researcher",
                &[("notes@tools", true)],
            ),
        ]),
    );
    for inst in ["dev/alice", "dev/bob"] {
        wait_until(
            "the coders re-rendered",
            || plugins(&h, inst) == json!({"fmt@tools": true, "lint@tools": true}),
            || lp.log(),
        );
    }
    lp.wait_for_log("pass done instances=2 written=2");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stamps(&h, "dev/carol"),
        carol,
        "an instance of another type was touched"
    );
    let log = lp.log();
    let after_start = &log[log.find("watching for changes").unwrap()..];
    assert!(!after_start.contains("dev/carol"), "{log}");
}

#[test]
fn a_burst_of_five_edits_restarts_once() {
    let h = Host::new();
    let restarts = h.path("restarts.log");
    let cmd = format!(
        "sh -c 'echo {{namespace}}/{{name}} >> {}'",
        restarts.display()
    );
    let manifest = |n: usize| {
        let mut plugins = vec![("lint@tools".to_owned(), true)];
        plugins.extend((0..n).map(|i| (format!("p{i}@tools"), true)));
        let plugins: Vec<(&str, bool)> = plugins.iter().map(|(p, e)| (p.as_str(), *e)).collect();
        docs(&[
            instance_with(
                "dev",
                "alice",
                "coder",
                "restart:\n  onChange: true\n  minInterval: 1s",
            ),
            instance_with(
                "dev",
                "bob",
                "other",
                "restart:\n  onChange: true\n  minInterval: 1s",
            ),
            binding("dev", "coders", "agentType: coder", &plugins),
        ])
    };
    h.manifest("fleet", &manifest(0));
    let lp = Loop::start(&h, &["--restart-command", &cmd]);
    let count = |who: &str| {
        std::fs::read_to_string(&restarts)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == who)
            .count()
    };
    // The first render is a change too.
    wait_until("the first restart", || count("dev/alice") == 1, || lp.log());
    for n in 1..=5 {
        h.manifest("fleet", &manifest(n));
        std::thread::sleep(Duration::from_millis(60));
    }
    wait_until(
        "the burst applied",
        || {
            plugins(&h, "dev/alice")
                .as_object()
                .is_some_and(|m| m.len() == 6)
        },
        || lp.log(),
    );
    wait_until(
        "the restart after the burst",
        || count("dev/alice") == 2,
        || lp.log(),
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(count("dev/alice"), 2, "{}", lp.log());
    // bob's type has nothing declared: its empty first render changed no entry.
    assert_eq!(count("dev/bob"), 0);
}

#[test]
fn sigterm_finishes_the_pass_in_flight_and_leaves_no_temp_file() {
    let h = Host::new();
    let many = |plugin: &str| {
        let mut d: Vec<String> = (0..400)
            .map(|i| instance("dev", &format!("a{i}"), "coder"))
            .collect();
        d.push(binding(
            "dev",
            "coders",
            "agentType: coder",
            &[(plugin, true)],
        ));
        docs(&d)
    };
    h.manifest("fleet", &many("one@tools"));
    let mut lp = Loop::start(&h, &[]);
    h.manifest("fleet", &many("two@tools"));
    wait_until(
        "the re-render to start",
        || {
            plugins(&h, "dev/a0").get("two@tools").is_some()
                || plugins(&h, "dev/a399").get("two@tools").is_some()
        },
        || lp.log(),
    );
    assert_eq!(lp.sigterm(), 0, "{}", lp.log());
    let tmp: Vec<_> = files_under(&h.root())
        .into_iter()
        .filter(|f| f.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "temp files left: {tmp:?}");
    assert!(lp.log().contains("SIGTERM: stopping"));
    // Every file is whole.
    for i in 0..400 {
        let p = plugins(&h, &format!("dev/a{i}"));
        assert!(
            p == json!({"one@tools": true}) || p == json!({"two@tools": true}),
            "a{i}: {p}"
        );
    }
}

#[test]
fn metrics_endpoint_counts_what_the_loop_did() {
    let h = Host::new();
    fleet(&h);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let lp = Loop::start(&h, &["--metrics-addr", &addr]);
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["lint@tools"] = json!(false);
    write_atomically(&h, "dev/alice/settings.json", &s);
    lp.wait_for_log("drift put back");
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            c,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    let body = get("/metrics");
    for line in [
        "agent_env_renders_total 4",
        "agent_env_drift_corrected_total 1",
        "agent_env_instances 3",
    ] {
        assert!(body.contains(line), "{line} missing:\n{body}");
    }
    assert!(get("/healthz").starts_with("HTTP/1.1 200"));
}

/// Writes `key` into `.claude.json` the way Claude Code saves its config:
/// holding `<file>.lock` (an atomic mkdir) around read, modify, rename.
fn locked_update(path: &std::path::Path, key: &str, value: Value) {
    let lock = path.with_file_name(".claude.json.lock");
    while std::fs::create_dir(&lock).is_err() {
        std::thread::yield_now();
    }
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v[key] = value;
    let tmp = path.with_file_name(".claude.json.writer");
    std::fs::write(&tmp, serde_json::to_vec(&v).unwrap()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
    std::fs::remove_dir(&lock).unwrap();
}

#[test]
fn a_concurrent_writer_and_the_operator_lose_nothing() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let h = Host::new();
    let version = |n: usize| {
        docs(&[
            instance("dev", "alice", "coder"),
            mcp(
                "dev",
                "s",
                "agentType: coder",
                &format!("stdio:\n  command: run-{n}\n"),
            ),
        ])
    };
    h.manifest("fleet", &version(0));
    let lp = Loop::start(&h, &[]);
    let path = h.env_file("dev/alice/.claude.json");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), path.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                locked_update(&path, &format!("k{n}"), json!(n));
                n += 1;
            }
            n
        })
    };
    const VERSIONS: usize = 40;
    for n in 1..=VERSIONS {
        h.manifest("fleet", &version(n));
        std::thread::sleep(Duration::from_millis(25));
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    let command = |v: &Value| v["mcpServers"]["s"]["command"].clone();
    wait_until(
        "the last version rendered",
        || command(&h.read_json("dev/alice/.claude.json")) == json!(format!("run-{VERSIONS}")),
        || lp.log(),
    );
    let file = h.read_json("dev/alice/.claude.json");
    let lost: Vec<usize> = (0..written)
        .filter(|n| file[format!("k{n}")] != json!(n))
        .collect();
    assert!(written > 100, "the writer only managed {written} writes");
    assert!(
        lost.is_empty(),
        "{} of {written} writer keys lost: {lost:?}",
        lost.len()
    );
    eprintln!("{written} concurrent writes, none lost; the operator rendered {VERSIONS} versions");
}
