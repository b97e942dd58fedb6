//! The encrypted store from the command line, on every backend: `secret`,
//! `installed`, `history`, secrets from the store reaching `.claude.json` and
//! nothing else, and key rotation surviving SIGKILL.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::db::{Backend, backends, dump_postgres};
use common::*;
use serde_json::{Value, json};

const TOKEN: &str = FORGEJO_TOKEN;

fn set(h: &Host, ns: &str, name: &str, value: &str) -> Run {
    h.run(&["secret", "set", name, "-n", ns], Some(value))
}

#[test]
fn secret_commands_store_show_list_and_delete() {
    for b in backends("secret commands") {
        let h = Host::on(&b);
        let run = set(&h, "dev", "API_KEY", "value-1\n");
        assert_eq!(run.code, 0, "{}: {}", b.name(), run.stderr);
        let get = h.run(&["secret", "get", "API_KEY", "-n", "dev"], None);
        assert_eq!((get.code, get.stdout.as_str()), (0, "value-1"));

        let list = h.run(&["secret", "list"], None);
        assert!(list.stdout.contains("API_KEY"), "{}", list.stdout);
        assert!(!list.stdout.contains("value-1"));
        let json: Value = serde_json::from_str(
            &h.run(&["secret", "list", "-n", "dev", "-o", "json"], None)
                .stdout,
        )
        .unwrap();
        assert_eq!(json[0]["name"], "API_KEY");
        assert!(json[0]["keyId"].as_str().unwrap().len() == 16);

        // Bad input names the problem and stores nothing.
        for (args, input, expect) in [
            (
                ["secret", "set", "API KEY", "-n", "dev"],
                "v",
                "letters, digits",
            ),
            (["secret", "set", "OK", "-n", "Dev_ns"], "v", "namespace"),
            (["secret", "set", "OK", "-n", "dev"], "\n", "empty"),
            (
                ["secret", "set", "OK", "-n", "dev"],
                "a${HOME}b",
                "UnsafeSecretValue",
            ),
        ] {
            let run = h.run(&args, Some(input));
            assert_eq!(run.code, 2, "{args:?}");
            assert!(run.stderr.contains(expect), "{args:?}: {}", run.stderr);
        }
        assert_eq!(h.run(&["secret", "get", "OK", "-n", "dev"], None).code, 1);

        assert_eq!(
            h.run(&["secret", "delete", "API_KEY", "-n", "dev"], None)
                .code,
            0
        );
        let gone = h.run(&["secret", "get", "API_KEY", "-n", "dev"], None);
        assert_eq!(gone.code, 1);
        assert!(gone.stderr.contains("no secret API_KEY in namespace dev"));
    }
}

#[test]
fn forgejo_token_from_the_encrypted_store_reaches_claude_json() {
    for b in backends("store secret render") {
        let h = Host::on(&b);
        forgejo_fleet(&h);
        // Stored for another namespace only: not usable by dev.
        assert_eq!(set(&h, "prod", "FORGEJO_TOKEN_DEV", TOKEN).code, 0);
        let run = h.reconcile();
        assert_eq!(
            run.row("dev", "alice")["reason"],
            "MissingSecret",
            "{}",
            b.name()
        );

        assert_eq!(set(&h, "dev", "FORGEJO_TOKEN_DEV", TOKEN).code, 0);
        let run = h.reconcile();
        assert_eq!(run.code, 0, "{}: {}", b.name(), run.stderr);
        let claude = h.read_json("dev/alice/.claude.json");
        assert_eq!(
            claude["mcpServers"]["forgejo"]["env"]["FORGEJO_TOKEN"],
            TOKEN
        );

        // A labelled Secret defining the same name comes first.
        h.manifest(
            "secret",
            &secret(
                "dev",
                "forgejo",
                &[("FORGEJO_TOKEN_DEV", "from-the-secret")],
            ),
        );
        assert_eq!(h.reconcile().code, 0);
        assert_eq!(
            h.read_json("dev/alice/.claude.json")["mcpServers"]["forgejo"]["env"]["FORGEJO_TOKEN"],
            "from-the-secret"
        );
    }
}

/// Every encoding a leaked value could take.
fn forms(value: &str) -> Vec<String> {
    vec![
        value.to_owned(),
        base64::engine::general_purpose::STANDARD.encode(value),
        serde_json::to_string(value)
            .unwrap()
            .trim_matches('"')
            .to_owned(),
        value.bytes().map(|b| format!("{b:02x}")).collect(),
    ]
}

fn find_leak(hay: &[u8], values: &[&str]) -> Option<String> {
    values
        .iter()
        .flat_map(|v| forms(v))
        .find(|f| hay.windows(f.len()).any(|w| w == f.as_bytes()))
}

#[test]
fn no_secret_value_in_the_database_logs_or_any_output() {
    const STORED: &str = "st0red-\"quoted\"-\\slash-4d1";
    const LABELLED: &str = "lab3lled-secret-88e";
    const INSTALLED: &str = "inst4lled-bearer-0c7";
    for b in backends("plaintext scan") {
        let h = Host::on(&b);
        h.manifest(
            "fleet",
            &docs(&[
                instance("dev", "alice", "coder"),
                mcp(
                    "dev",
                    "svc",
                    "agentType: coder",
                    "http:\n  url: \"https://svc.example/mcp\"\n  headers:\n    X-Stored: \"${SECRET:STORED}\"\n    X-Labelled: \"${SECRET:creds/LABELLED}\"\n",
                ),
                secret("dev", "creds", &[("LABELLED", LABELLED)]),
            ]),
        );
        let mut outputs = vec![set(&h, "dev", "STORED", STORED)];
        outputs.push(h.reconcile_with(&["--log", "trace"]));
        assert_eq!(
            outputs.last().unwrap().code,
            0,
            "{}",
            outputs.last().unwrap().stderr
        );
        // A user adds a server with a token at runtime; it is adopted.
        let mut claude = h.read_json("dev/alice/.claude.json");
        claude["mcpServers"]["mine"] = json!({"type": "http", "url": "https://mine.example/mcp", "headers": {"Authorization": format!("Bearer {INSTALLED}")}});
        h.write_json("dev/alice/.claude.json", &claude);
        let run = h.reconcile_with(&["--log", "trace"]);
        assert_eq!(
            run.row("dev", "alice")["adopted"],
            json!(["mcpServers.mine"])
        );
        outputs.push(run);
        // A wipe: the adopted server comes back from the (sealed) installed set.
        std::fs::remove_dir_all(h.env_file("dev/alice")).unwrap();
        outputs.push(h.reconcile_with(&["--log", "trace", "--log-format", "json"]));
        assert_eq!(
            h.read_json("dev/alice/.claude.json")["mcpServers"]["mine"]["headers"]["Authorization"],
            format!("Bearer {INSTALLED}")
        );
        for args in [
            &[
                "diff",
                "-f",
                h.manifests().to_str().unwrap(),
                "--log",
                "trace",
            ][..],
            &["history", "dev/alice", "-o", "json", "--log", "trace"],
            &["history", "dev/alice"],
            &["installed", "list", "-o", "json"],
            &["secret", "list", "-o", "json", "--log", "trace"],
        ] {
            outputs.push(h.run(args, None));
        }
        let values = [STORED, LABELLED, INSTALLED];
        for (i, o) in outputs.iter().enumerate() {
            for (what, text) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
                if let Some(leak) = find_leak(text.as_bytes(), &values) {
                    panic!("{}: run {i} {what} holds {leak:?}:\n{text}", b.name());
                }
            }
        }
        // Every file under the env root but the rendered .claude.json
        // (the one place plaintext belongs): the database, its WAL, the key.
        for f in files_under(&h.root()) {
            if f.ends_with(".claude.json") {
                continue;
            }
            if let Some(leak) = find_leak(&std::fs::read(&f).unwrap(), &values) {
                panic!("{}: {} holds {leak:?}", b.name(), f.display());
            }
        }
        if let Backend::Postgres(url) = &b
            && let Some(leak) = find_leak(&dump_postgres(url), &values)
        {
            panic!("the PostgreSQL database holds {leak:?}");
        }
    }
}

fn plugins(h: &Host) -> Value {
    h.read_json("dev/alice/settings.json")["enabledPlugins"].clone()
}

#[test]
fn a_forgotten_install_is_not_brought_back_by_a_rebuild() {
    for b in backends("installed forget") {
        let h = Host::on(&b);
        h.manifest(
            "fleet",
            &docs(&[
                instance("dev", "alice", "coder"),
                binding("dev", "base", "agentType: coder", &[("base@tools", true)]),
            ]),
        );
        assert_eq!(h.reconcile().code, 0);
        let mut settings = h.read_json("dev/alice/settings.json");
        settings["enabledPlugins"]["mine@tools"] = json!(true);
        settings["enabledPlugins"]["keep@tools"] = json!(true);
        h.write_json("dev/alice/settings.json", &settings);
        assert_eq!(h.reconcile().code, 0);

        let list = h.run(&["installed", "list", "dev/alice"], None);
        assert!(list.stdout.contains("mine@tools"), "{}", list.stdout);
        let json: Value =
            serde_json::from_str(&h.run(&["installed", "list", "-o", "json"], None).stdout)
                .unwrap();
        assert_eq!(json.as_array().unwrap().len(), 2);
        assert_eq!(json[0]["section"], "enabledPlugins");

        let forget = h.run(
            &["installed", "forget", "dev/alice", "plugin", "mine@tools"],
            None,
        );
        assert_eq!(forget.code, 0, "{}", forget.stderr);
        let again = h.run(
            &["installed", "forget", "dev/alice", "plugin", "mine@tools"],
            None,
        );
        assert_eq!(again.code, 1);
        let bad = h.run(&["installed", "forget", "alice", "plugin", "x"], None);
        assert_eq!(bad.code, 2);

        // The container is rebuilt: only what is still adopted comes back.
        std::fs::remove_dir_all(h.env_file("dev/alice")).unwrap();
        assert_eq!(h.reconcile().code, 0, "{}", b.name());
        assert_eq!(
            plugins(&h),
            json!({"base@tools": true, "keep@tools": true}),
            "{}",
            b.name()
        );

        // Still on disk after a forget, it is a new runtime install again:
        // adopted under Preserve (the default).
        let forget = h.run(
            &[
                "installed",
                "forget",
                "dev/alice",
                "enabledPlugins",
                "keep@tools",
            ],
            None,
        );
        assert_eq!(forget.code, 0);
        let run = h.reconcile();
        assert_eq!(
            run.row("dev", "alice")["adopted"],
            json!(["enabledPlugins.keep@tools"])
        );
    }
}

#[test]
fn history_shows_what_each_pass_did() {
    for b in backends("history") {
        let h = Host::on(&b);
        h.manifest(
            "fleet",
            &docs(&[
                instance("dev", "alice", "coder"),
                binding("dev", "base", "agentType: coder", &[("base@tools", true)]),
            ]),
        );
        for _ in 0..3 {
            assert_eq!(h.reconcile().code, 0);
        }
        let mut settings = h.read_json("dev/alice/settings.json");
        settings["enabledPlugins"]["base@tools"] = json!(false);
        h.write_json("dev/alice/settings.json", &settings);
        assert_eq!(h.reconcile().code, 0);

        let run = h.run(&["history", "dev/alice", "-o", "json"], None);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let h_json: Value = serde_json::from_str(&run.stdout).unwrap();
        let summary: Vec<(String, u64)> = h_json
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["outcome"].as_str().unwrap().to_owned(),
                    r["repeats"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("Rendered".to_owned(), 1),
                ("UpToDate".to_owned(), 2),
                ("Rendered".to_owned(), 1)
            ],
            "{}",
            b.name()
        );
        assert_eq!(h_json[2]["drift"], json!(["enabledPlugins.base@tools"]));
        assert!(
            h_json[0]["changed"]
                .as_array()
                .unwrap()
                .contains(&json!("settings.json:enabledPlugins.base@tools")),
            "{}",
            h_json[0]
        );
        assert!(h_json[0]["contentHash"].as_str().unwrap().len() == 64);

        let table = h.run(&["history", "dev/alice"], None);
        assert!(table.stdout.contains("UpToDate"), "{}", table.stdout);
        assert!(
            table
                .stdout
                .contains("drift put back: enabledPlugins.base@tools")
        );
        let none = h.run(&["history", "dev/nobody"], None);
        assert_eq!(none.code, 1);
    }
}

fn key_id(path: &Path) -> String {
    agent_env_operator::crypto::MasterKey::read(path)
        .unwrap()
        .id()
        .to_owned()
}

/// Every secret opens with one of the two keys, and all with the same one.
fn check_all_readable(h: &Host, a: &Path, b: &Path, n: usize) -> String {
    let run = h.run(
        &[
            "secret",
            "list",
            "-o",
            "json",
            "--master-key-file",
            a.to_str().unwrap(),
            "--previous-master-key-file",
            b.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let list: Value = serde_json::from_str(&run.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), n);
    let ids: std::collections::BTreeSet<&str> =
        list.iter().map(|s| s["keyId"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "a rotation was half applied: {ids:?}");
    let id = ids.into_iter().next().unwrap().to_owned();
    let key = if id == key_id(a) { a } else { b };
    for i in [0, n / 2, n - 1] {
        let get = h.run(
            &[
                "secret",
                "get",
                &format!("S{i}"),
                "-n",
                "dev",
                "--master-key-file",
                key.to_str().unwrap(),
            ],
            None,
        );
        assert_eq!(get.stdout, format!("value-{i}"), "{}", get.stderr);
    }
    id
}

#[test]
fn a_rotation_killed_at_random_moments_loses_nothing() {
    for b in backends("rotation under SIGKILL") {
        let mut h = Host::on(&b);
        let (ka, kb) = (h.path("a.key"), h.path("b.key"));
        for k in [&ka, &kb] {
            assert_eq!(
                h.run(&["secret", "keygen", "--out", k.to_str().unwrap()], None)
                    .code,
                0
            );
        }
        // Key files are passed per command from here on.
        h.state_args.truncate(2);
        const N: usize = 1500;
        populate(&h, &b, &ka, N);

        // A full rotation's duration bounds the random kill delays: the
        // shorter of two (the first pays for cold caches), and only most of
        // it, so on a loaded machine most kills still land midway.
        let mut full = Duration::MAX;
        for (from, to) in [(&ka, &kb), (&kb, &ka)] {
            let started = Instant::now();
            let run = h.run(
                &[
                    "secret",
                    "rotate-key",
                    "--master-key-file",
                    from.to_str().unwrap(),
                    "--new-key-file",
                    to.to_str().unwrap(),
                ],
                None,
            );
            assert_eq!(run.code, 0, "{}", run.stderr);
            full = full.min(started.elapsed());
            assert_eq!(check_all_readable(&h, &ka, &kb, N), key_id(to));
        }

        let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(std::process::id());
        let (mut killed, mut finished) = (0, 0);
        for _ in 0..if matches!(b, Backend::Sqlite) { 40 } else { 15 } {
            let current = check_all_readable(&h, &ka, &kb, N);
            let (from, to) = if current == key_id(&ka) {
                (&ka, &kb)
            } else {
                (&kb, &ka)
            };
            let mut cmd = agent_env();
            cmd.args(["secret", "rotate-key", "--env-root"])
                .arg(h.root())
                .args(&h.state_args)
                .arg("--master-key-file")
                .arg(from)
                .arg("--new-key-file")
                .arg(to)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let mut child = cmd.spawn().unwrap();
            std::thread::sleep(jitter(&mut seed, full.mul_f64(0.8)));
            match child.try_wait().unwrap() {
                Some(_) => finished += 1,
                None => {
                    child.kill().unwrap();
                    killed += 1;
                }
            }
            child.wait().unwrap();
        }
        check_all_readable(&h, &ka, &kb, N);
        eprintln!(
            "{}: {killed} rotations killed midway, {finished} finished; a full one takes {full:?}",
            b.name()
        );
        assert!(
            killed >= 10,
            "{}: only {killed} rotations were killed midway ({finished} finished)",
            b.name()
        );
    }
}

/// Stores `n` secrets under key `key` through the library (faster than `n` processes).
fn populate(h: &Host, b: &Backend, key: &Path, n: usize) {
    use agent_env_operator::engine::secrets::SecretValue;
    use agent_env_operator::state::{self, KeySource};
    let url = match b {
        Backend::Sqlite => format!("sqlite:{}/.agent-env/state.db", h.root().display()),
        Backend::Postgres(url) => url.clone(),
    };
    let keys = KeySource {
        master: Some(key.to_owned()),
        previous: None,
    };
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let store = state::open(&url, &keys).await.unwrap();
        for i in 0..n {
            store
                .put_secret(
                    "dev",
                    &format!("S{i}"),
                    &SecretValue::new(format!("value-{i}")),
                )
                .await
                .unwrap();
        }
    });
}
