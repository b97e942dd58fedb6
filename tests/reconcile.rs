//! The cases the design comes from, each run through `agent-env reconcile --once`.

mod common;

use common::*;
use serde_json::{Value, json};

fn coder_fleet(h: &Host) {
    h.config(
        "agents.json",
        r#"{"types":[{"name":"coder","plugins":["base@tools","fmt@tools"]}]}"#,
    );
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            instance("dev", "bob", "coder"),
            binding("dev", "coders", "agentType: coder", &[("lint@tools", true)]),
        ]),
    );
}

fn plugins(h: &Host, inst: &str) -> Value {
    h.read_json(&format!("{inst}/settings.json"))["enabledPlugins"].clone()
}

#[test]
fn instance_binding_adds_a_plugin_the_type_lacks() {
    let h = Host::new();
    coder_fleet(&h);
    h.manifest(
        "alice",
        &binding(
            "dev",
            "alice-extra",
            "instance: alice",
            &[("profiler@tools", true)],
        ),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        plugins(&h, "dev/alice"),
        json!({"base@tools": true, "fmt@tools": true, "lint@tools": true, "profiler@tools": true})
    );
    assert_eq!(
        plugins(&h, "dev/bob"),
        json!({"base@tools": true, "fmt@tools": true, "lint@tools": true})
    );
    let row = run.row("dev", "alice");
    assert_eq!(
        row["plugins"],
        json!(["base@tools", "fmt@tools", "lint@tools", "profiler@tools"])
    );
    let source = |name: &str| {
        row["sources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(source("base@tools")["scope"], "builtin");
    assert_eq!(source("lint@tools")["object"], "PluginBinding/coders");
    assert_eq!(
        source("profiler@tools"),
        json!({"key": "enabledPlugins", "name": "profiler@tools", "scope": "instance", "object": "PluginBinding/alice-extra"})
    );
}

#[test]
fn instance_binding_disables_a_plugin_the_type_enables() {
    let h = Host::new();
    coder_fleet(&h);
    h.manifest(
        "alice",
        &binding(
            "dev",
            "alice-off",
            "instance: alice",
            &[("lint@tools", false), ("fmt@tools", false)],
        ),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        plugins(&h, "dev/alice"),
        json!({"base@tools": true, "fmt@tools": false, "lint@tools": false})
    );
    // The false entries are written, so they are listed.
    assert_eq!(
        run.row("dev", "alice")["plugins"],
        json!(["base@tools", "fmt@tools", "lint@tools"])
    );
}

const TOKEN: &str = FORGEJO_TOKEN;

#[test]
fn secret_reaches_claude_json_and_nowhere_else() {
    let h = Host::new();
    forgejo_fleet(&h);
    h.manifest(
        "secret",
        &secret("dev", "forgejo", &[("FORGEJO_TOKEN_DEV", TOKEN)]),
    );
    let run = h.reconcile_with(&["--log", "trace"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let claude = h.read_json("dev/alice/.claude.json");
    assert_eq!(
        claude["mcpServers"]["forgejo"],
        json!({"type": "stdio", "command": "forgejo-mcp", "env": {"FORGEJO_TOKEN": TOKEN}})
    );
    let mode = std::fs::metadata(h.env_file("dev/alice/.claude.json")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let diff = h.diff();
    let table = agent_env()
        .args(["reconcile", "--once", "--no-fsync", "-f"])
        .arg(h.manifests())
        .arg("--env-root")
        .arg(h.root())
        .output()
        .unwrap();
    for (what, text) in [
        ("stdout", run.stdout.as_str()),
        ("trace log", run.stderr.as_str()),
        ("diff", diff.stdout.as_str()),
        ("table", &String::from_utf8_lossy(&table.stdout)),
    ] {
        assert!(!text.contains(TOKEN), "the secret leaked into {what}");
    }
    for f in files_under(&h.root()) {
        if f.ends_with(".claude.json") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "the secret leaked into {}",
            f.display()
        );
    }
}

#[test]
fn missing_secret_renders_nothing_and_keeps_the_last_good_files() {
    let h = Host::new();
    forgejo_fleet(&h);
    h.manifest(
        "secret",
        &secret("dev", "forgejo", &[("FORGEJO_TOKEN_DEV", TOKEN)]),
    );
    assert_eq!(h.reconcile().code, 0);
    let before_settings = std::fs::read(h.env_file("dev/alice/settings.json")).unwrap();
    let before_claude = std::fs::read(h.env_file("dev/alice/.claude.json")).unwrap();

    // The Secret is gone and a new binding arrives: neither may reach the files.
    h.remove_manifest("secret");
    h.manifest(
        "more",
        &binding("dev", "more", "agentType: coder", &[("new@tools", true)]),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 1);
    let row = run.row("dev", "alice");
    assert_eq!(row["ready"], false);
    assert_eq!(row["reason"], "MissingSecret");
    assert!(
        row["message"]
            .as_str()
            .unwrap()
            .contains("FORGEJO_TOKEN_DEV"),
        "{row}"
    );
    assert_eq!(
        std::fs::read(h.env_file("dev/alice/settings.json")).unwrap(),
        before_settings
    );
    assert_eq!(
        std::fs::read(h.env_file("dev/alice/.claude.json")).unwrap(),
        before_claude
    );

    // It renders by itself once the secret is back.
    h.manifest(
        "secret",
        &secret("dev", "forgejo", &[("FORGEJO_TOKEN_DEV", TOKEN)]),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    assert_eq!(plugins(&h, "dev/alice"), json!({"new@tools": true}));
}

#[test]
fn missing_secret_names_every_missing_name() {
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            mcp(
                "dev",
                "s",
                "instance: alice",
                "http:\n  url: \"https://x/${SECRET:URL_PART}\"\n  headers:\n    A: \"${SECRET:api/key}\"\n",
            ),
        ]),
    );
    let run = h.reconcile();
    let msg = run.message("dev", "alice");
    assert!(msg.contains("URL_PART") && msg.contains("api/key"), "{msg}");
    assert!(!h.env_file("dev/alice/.claude.json").exists());
}

#[test]
fn runtime_install_survives_passes_and_a_wipe() {
    let h = Host::new();
    coder_fleet(&h);
    assert_eq!(h.reconcile().code, 0);

    // `claude plugin install user@tools` adds a key to enabledPlugins.
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["user@tools"] = json!(true);
    h.write_json("dev/alice/settings.json", &s);
    let run = h.reconcile();
    assert_eq!(
        run.row("dev", "alice")["adopted"],
        json!(["enabledPlugins.user@tools"])
    );
    assert_eq!(plugins(&h, "dev/alice")["user@tools"], json!(true));

    let run = h.reconcile();
    assert_eq!(run.row("dev", "alice")["reason"], "UpToDate");
    assert_eq!(plugins(&h, "dev/alice")["user@tools"], json!(true));

    // Container rebuild: the env dir is gone.
    std::fs::remove_dir_all(h.env_file("dev/alice")).unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    assert_eq!(
        plugins(&h, "dev/alice"),
        json!({"base@tools": true, "fmt@tools": true, "lint@tools": true, "user@tools": true})
    );
    assert!(h.env_file("dev/alice/.claude.json").exists());
    // Declared-only instances render exactly the declared set.
    assert_eq!(
        plugins(&h, "dev/bob"),
        json!({"base@tools": true, "fmt@tools": true, "lint@tools": true})
    );
}

#[test]
fn revert_removes_runtime_installs() {
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance_with("dev", "bob", "coder", "runtimeInstalls: Revert"),
            binding("dev", "coders", "agentType: coder", &[("lint@tools", true)]),
        ]),
    );
    assert_eq!(h.reconcile().code, 0);
    let mut s = h.read_json("dev/bob/settings.json");
    s["enabledPlugins"]["user@tools"] = json!(true);
    h.write_json("dev/bob/settings.json", &s);
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    assert_eq!(plugins(&h, "dev/bob"), json!({"lint@tools": true}));
    assert_eq!(run.row("dev", "bob")["adopted"], json!([]));
}

#[test]
fn user_uninstall_of_an_adopted_plugin_is_respected() {
    let h = Host::new();
    coder_fleet(&h);
    h.reconcile();
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["user@tools"] = json!(true);
    h.write_json("dev/alice/settings.json", &s);
    h.reconcile();
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]
        .as_object_mut()
        .unwrap()
        .remove("user@tools");
    h.write_json("dev/alice/settings.json", &s);
    h.reconcile();
    std::fs::remove_dir_all(h.env_file("dev/alice")).unwrap();
    h.reconcile();
    assert!(plugins(&h, "dev/alice").get("user@tools").is_none());
}

#[test]
fn installed_marketplace_wins_a_collision_and_empty_sources_are_skipped() {
    let h = Host::new();
    h.manifest("fleet", &instance("dev", "alice", "coder"));
    h.reconcile();
    let mut s = h.read_json("dev/alice/settings.json");
    s["extraKnownMarketplaces"]["tools"] =
        json!({"source": {"source": "github", "repo": "me/pinned"}});
    s["extraKnownMarketplaces"]["nothing"] = json!({"source": {}});
    h.write_json("dev/alice/settings.json", &s);
    let run = h.reconcile();
    assert_eq!(
        run.row("dev", "alice")["adopted"],
        json!(["extraKnownMarketplaces.tools"])
    );

    // A declared marketplace of the same name arrives later: the installed one wins.
    h.manifest(
        "mk",
        &marketplace(
            "dev",
            "tools",
            "agentType: coder",
            "github:\n  repo: org/tools\n",
        ),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    let mk = h.read_json("dev/alice/settings.json")["extraKnownMarketplaces"].clone();
    assert_eq!(
        mk,
        json!({"tools": {"source": {"source": "github", "repo": "me/pinned"}}})
    );
}

#[test]
fn drift_on_a_declared_entry_is_put_back() {
    let h = Host::new();
    coder_fleet(&h);
    h.manifest(
        "mcp",
        &mcp(
            "dev",
            "git",
            "agentType: coder",
            "stdio:\n  command: git-mcp\n",
        ),
    );
    h.reconcile();
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["lint@tools"] = json!(false);
    s["enabledPlugins"]
        .as_object_mut()
        .unwrap()
        .remove("fmt@tools");
    h.write_json("dev/alice/settings.json", &s);
    let mut c = h.read_json("dev/alice/.claude.json");
    c["mcpServers"]["git"]["command"] = json!("evil");
    h.write_json("dev/alice/.claude.json", &c);

    let run = h.reconcile();
    assert_eq!(run.code, 0);
    let row = run.row("dev", "alice");
    assert_eq!(
        row["drift"],
        json!([
            "enabledPlugins.fmt@tools",
            "enabledPlugins.lint@tools",
            "mcpServers.git"
        ])
    );
    assert_eq!(
        plugins(&h, "dev/alice"),
        json!({"base@tools": true, "fmt@tools": true, "lint@tools": true})
    );
    assert_eq!(
        h.read_json("dev/alice/.claude.json")["mcpServers"]["git"]["command"],
        "git-mcp"
    );
}

#[test]
fn keys_the_operator_does_not_own_survive_in_order() {
    let h = Host::new();
    coder_fleet(&h);
    std::fs::create_dir_all(h.env_file("dev/alice")).unwrap();
    let claude = "{\n  \"numStartups\": 7,\n  \"mcpServers\": {},\n  \"projects\": {\"/w\": {\"allowedTools\": [\"Bash\"], \"history\": [1, 2]}},\n  \"oauthAccount\": {\"x\": \"y\"}\n}\n";
    let settings =
        "{\"theme\":\"dark\",\"permissions\":{\"allow\":[\"Read\"]},\"enabledPlugins\":{}}";
    std::fs::write(h.env_file("dev/alice/.claude.json"), claude).unwrap();
    std::fs::write(h.env_file("dev/alice/settings.json"), settings).unwrap();
    h.manifest(
        "mcp",
        &mcp(
            "dev",
            "git",
            "agentType: coder",
            "stdio:\n  command: git-mcp\n",
        ),
    );
    for _ in 0..3 {
        assert_eq!(h.reconcile().code, 0);
        let c = std::fs::read_to_string(h.env_file("dev/alice/.claude.json")).unwrap();
        let keys: Vec<String> = serde_json::from_str::<serde_json::Map<String, Value>>(&c)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            ["numStartups", "mcpServers", "projects", "oauthAccount"]
        );
        // Untouched values keep their exact bytes.
        assert!(c.contains(
            "\"projects\": {\"/w\": {\"allowedTools\": [\"Bash\"], \"history\": [1, 2]}}"
        ));
        let s: Value = h.read_json("dev/alice/settings.json");
        assert_eq!(s["theme"], "dark");
        assert_eq!(s["permissions"], json!({"allow": ["Read"]}));
        let keys: Vec<&String> = s.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "theme",
                "permissions",
                "enabledPlugins",
                "extraKnownMarketplaces"
            ]
        );
    }
}

#[test]
fn second_pass_with_the_same_inputs_writes_nothing() {
    let h = Host::new();
    coder_fleet(&h);
    assert_eq!(h.reconcile().code, 0);
    let stamp = |f: &str| {
        let m = std::fs::metadata(h.env_file(f)).unwrap();
        (
            m.modified().unwrap(),
            std::os::unix::fs::MetadataExt::ino(&m),
        )
    };
    let before: Vec<_> = [
        "dev/alice/settings.json",
        "dev/alice/.claude.json",
        "dev/bob/settings.json",
    ]
    .iter()
    .map(|f| stamp(f))
    .collect();
    let bytes = std::fs::read(h.env_file("dev/alice/settings.json")).unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    for r in run.rows() {
        assert_eq!(r["reason"], "UpToDate", "{r}");
        assert_eq!(r["changed"], json!([]));
    }
    let after: Vec<_> = [
        "dev/alice/settings.json",
        "dev/alice/.claude.json",
        "dev/bob/settings.json",
    ]
    .iter()
    .map(|f| stamp(f))
    .collect();
    assert_eq!(before, after);
    assert_eq!(
        std::fs::read(h.env_file("dev/alice/settings.json")).unwrap(),
        bytes
    );
}

/// A full pass that finds the files holding exactly the render stamps them;
/// the passes after it leave them unread while the stamps hold, and any
/// change to a file (or to the way to it) is read and acted on at once.
#[test]
fn files_unchanged_since_a_full_pass_are_not_read_again_until_they_change() {
    const UNREAD: &str = "files unchanged since a pass found them current; not read";
    let h = Host::new();
    coder_fleet(&h);
    assert_eq!(h.reconcile().code, 0);
    let unread = |run: &Run| -> Vec<String> {
        let mut dirs: Vec<String> = (run.stderr.lines())
            .filter(|l| l.contains(UNREAD))
            .map(|l| {
                l.split("env_dir=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .trim_matches('"')
                    .to_owned()
            })
            .collect();
        dirs.sort();
        dirs
    };
    // Files written moments ago are read: their stamps are from the tick
    // a concurrent edit could still share.
    let run = h.reconcile_with(&["--log", "debug"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(unread(&run), Vec::<String>::new());
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let run = h.reconcile_with(&["--log", "debug"]);
    assert_eq!(
        unread(&run),
        Vec::<String>::new(),
        "stamps are kept by this pass"
    );
    let run = h.reconcile_with(&["--log", "debug"]);
    assert_eq!(unread(&run), ["dev/alice", "dev/bob"], "{}", run.stderr);
    for r in run.rows() {
        assert_eq!(r["reason"], "UpToDate", "{r}");
        assert_eq!(
            r["plugins"],
            json!(["base@tools", "fmt@tools", "lint@tools"]),
            "{r}"
        );
        assert_eq!(r["sources"].as_array().unwrap().len(), 3, "{r}");
    }

    // An edit in place, right after: read and put back.
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["fmt@tools"] = json!(false);
    h.write_json("dev/alice/settings.json", &s);
    let run = h.reconcile_with(&["--log", "debug"]);
    assert_eq!(unread(&run), ["dev/bob"]);
    assert_eq!(
        run.row("dev", "alice")["drift"],
        json!(["enabledPlugins.fmt@tools"])
    );
    assert_eq!(plugins(&h, "dev/alice")["fmt@tools"], true);

    // Bob's env dir swapped for a symlink to itself: same files, same
    // stamps, and refused before any stamp is looked at.
    let bob = h.env_file("dev/bob");
    std::fs::rename(&bob, h.env_file("dev/bob-moved")).unwrap();
    std::os::unix::fs::symlink("bob-moved", &bob).unwrap();
    let run = h.reconcile_with(&["--log", "debug"]);
    assert_eq!(
        run.row("dev", "bob")["reason"],
        "UnsafePath",
        "{}",
        run.stderr
    );
    assert!(!unread(&run).contains(&"dev/bob".to_owned()));
}

#[test]
fn same_layer_conflict_renders_and_warns_with_both_names() {
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            binding("dev", "a-on", "agentType: coder", &[("p@tools", true)]),
            binding("dev", "b-off", "agentType: coder", &[("p@tools", false)]),
        ]),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    let row = run.row("dev", "alice");
    assert_eq!(row["ready"], true);
    let w = row["warnings"][0].as_str().unwrap();
    assert!(
        w.contains("PluginBinding/b-off") && w.contains("PluginBinding/a-on"),
        "{w}"
    );
    assert_eq!(plugins(&h, "dev/alice"), json!({"p@tools": false}));
}

#[test]
fn bindings_never_cross_namespaces() {
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            instance("prod", "alice", "coder"),
            binding("dev", "b", "instance: alice", &[("dev-only@tools", true)]),
            secret("prod", "s", &[("T", "prod-value")]),
            mcp(
                "dev",
                "m",
                "instance: alice",
                "http:\n  url: \"https://x/${SECRET:T}\"\n",
            ),
        ]),
    );
    let run = h.reconcile();
    assert_eq!(run.row("dev", "alice")["reason"], "MissingSecret");
    assert_eq!(run.row("prod", "alice")["plugins"], json!([]));
}

#[test]
fn diff_shows_changes_masked_and_changes_nothing() {
    let h = Host::new();
    forgejo_fleet(&h);
    h.manifest(
        "secret",
        &secret("dev", "forgejo", &[("FORGEJO_TOKEN_DEV", TOKEN)]),
    );
    let run = h.diff();
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("+ mcpServers.forgejo"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("\"FORGEJO_TOKEN\":\"***\""),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains(TOKEN));
    assert!(!h.root().exists(), "diff created the env root");

    assert_eq!(h.reconcile().code, 0);
    let run = h.diff();
    assert_eq!(run.code, 0, "{}", run.stdout);
    assert_eq!(run.stdout, "");

    h.manifest(
        "b",
        &binding("dev", "b", "instance: alice", &[("x@tools", true)]),
    );
    let run = h.diff();
    assert_eq!(run.code, 1);
    assert!(
        run.stdout
            .contains("settings.json:\n    + enabledPlugins.x@tools: true"),
        "{}",
        run.stdout
    );
    assert!(plugins(&h, "dev/alice").get("x@tools").is_none());
}

#[test]
fn the_example_fleet_renders() {
    let h = Host::new();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = agent_env()
        .args(["reconcile", "--once", "-o", "json", "--no-fsync"])
        .args(["-f", &format!("{root}/examples/fleet")])
        .args(["--config", &format!("{root}/config")])
        .arg("--env-root")
        .arg(h.root())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 4);
    let alice = h.read_json("dev/alice/.claude.json");
    assert_eq!(
        alice["mcpServers"]["forgejo"]["env"]["FORGEJO_TOKEN"],
        "example-forgejo-token"
    );
    let carol = h.read_json("dev/research/carol/.claude.json");
    assert_eq!(
        carol["mcpServers"]["search"]["headers"]["Authorization"],
        "Bearer example-search-token"
    );
}

#[test]
fn env_dir_owner_is_applied_to_dir_and_files() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED env_dir_owner_is_applied_to_dir_and_files: needs root to chown");
        return;
    }
    let h = Host::new();
    h.manifest(
        "fleet",
        &instance_with("dev", "alice", "coder", "envDir:\n  uid: 4321\n  gid: 4322"),
    );
    assert_eq!(h.reconcile().code, 0);
    for f in [
        "dev/alice",
        "dev/alice/settings.json",
        "dev/alice/.claude.json",
    ] {
        let m = std::fs::metadata(h.env_file(f)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((m.uid(), m.gid()), (4321, 4322), "{f}");
    }
}

/// A fleet larger than the chunks a pass loads states in: every instance is
/// reported once, in key order with the invalid ones in their places, each
/// with its own render, and a second pass finds every one up to date (each
/// state went to its own instance).
#[test]
fn a_fleet_of_many_chunks_is_reported_in_order_with_each_state_its_own() {
    let h = Host::new();
    h.config(
        "agents.json",
        r#"{"types":[{"name":"t0","plugins":["base@tools"]},{"name":"t1","plugins":["other@tools"]}]}"#,
    );
    let mut parts = Vec::new();
    let mut expected = Vec::new();
    for i in 0..600usize {
        let name = format!("a{i:03}");
        parts.push(instance("dev", &name, &format!("t{}", i % 2)));
        if i.is_multiple_of(7) {
            let own = format!("own-{name}@tools");
            parts.push(binding(
                "dev",
                &format!("{name}-own"),
                &format!("instance: {name}"),
                &[(own.as_str(), true)],
            ));
        }
        expected.push(name.clone());
        if i % 250 == 3 {
            // Sorts right after `name`; invalid: no agent type.
            let bad = format!("{name}x");
            parts.push(format!(
                "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata:\n  name: {bad}\n  namespace: dev\nspec:\n  suspend: false\n"
            ));
            expected.push(bad);
        }
    }
    h.manifest("fleet", &docs(&parts));

    let first = h.reconcile();
    let names = |run: &Run| -> Vec<String> {
        run.rows()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&first), expected);
    for r in first.rows() {
        let name = r["name"].as_str().unwrap();
        if name.ends_with('x') {
            assert_eq!(r["reason"], "InvalidObject", "{r}");
            continue;
        }
        let i: usize = name[1..].parse().unwrap();
        let mut want = vec![
            if i.is_multiple_of(2) {
                "base@tools"
            } else {
                "other@tools"
            }
            .to_owned(),
        ];
        if i.is_multiple_of(7) {
            want.push(format!("own-{name}@tools"));
        }
        want.sort();
        assert_eq!(r["plugins"], json!(want), "{r}");
        assert_eq!(r["reason"], "Rendered", "{r}");
    }

    let second = h.reconcile();
    assert_eq!(names(&second), expected);
    for r in second.rows() {
        if !r["name"].as_str().unwrap().ends_with('x') {
            assert_eq!(r["reason"], "UpToDate", "{r}");
        }
    }
}

/// A type's secrets are filled once per pass, and each instance's own
/// servers over them; a type server whose secret is missing holds back
/// each instance of the type except one whose own layer replaces it.
#[test]
fn type_and_instance_servers_fill_their_secrets_and_a_replaced_one_needs_none() {
    let h = Host::new();
    let server = |name: &str, url: &str, header: Option<&str>| {
        let mut s = format!("name: {name}\nhttp:\n  url: \"{url}\"\n");
        if let Some(secret) = header {
            s += &format!("  headers:\n    Authorization: \"Bearer ${{SECRET:{secret}}}\"\n");
        }
        s
    };
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            instance("dev", "bob", "coder"),
            instance("dev", "carol", "writer"),
            instance("dev", "dave", "writer"),
            secret(
                "dev",
                "tokens",
                &[("WIKI_TOKEN", TOKEN), ("OWN_TOKEN", "own-93ac1")],
            ),
            mcp(
                "dev",
                "coder-docs",
                "agentType: coder",
                &server("docs", "https://docs", Some("DOCS_TOKEN")),
            ),
            mcp(
                "dev",
                "coder-wiki",
                "agentType: coder",
                &server("wiki", "https://wiki", Some("WIKI_TOKEN")),
            ),
            mcp(
                "dev",
                "alice-docs",
                "instance: alice",
                &server("docs", "https://docs.alice", None),
            ),
            mcp(
                "dev",
                "writer-wiki",
                "agentType: writer",
                &server("wiki", "https://wiki", Some("WIKI_TOKEN")),
            ),
            mcp(
                "dev",
                "carol-own",
                "instance: carol",
                &server("own", "https://own", Some("OWN_TOKEN")),
            ),
        ]),
    );
    let run = h.reconcile();
    assert_eq!(
        run.row("dev", "bob")["reason"],
        "MissingSecret",
        "{}",
        run.stdout
    );
    assert!(run.message("dev", "bob").contains("DOCS_TOKEN"));
    assert!(!h.env_file("dev/bob/.claude.json").exists());
    let servers =
        |inst: &str| h.read_json(&format!("dev/{inst}/.claude.json"))["mcpServers"].clone();
    let bearer = |v: &str| json!(format!("Bearer {v}"));
    assert_eq!(
        run.row("dev", "alice")["reason"],
        "Rendered",
        "{}",
        run.stdout
    );
    assert_eq!(servers("alice")["docs"]["url"], "https://docs.alice");
    assert_eq!(
        servers("alice")["wiki"]["headers"]["Authorization"],
        bearer(TOKEN)
    );
    for inst in ["carol", "dave"] {
        assert_eq!(run.row("dev", inst)["reason"], "Rendered", "{}", run.stdout);
        assert_eq!(
            servers(inst)["wiki"]["headers"]["Authorization"],
            bearer(TOKEN)
        );
    }
    assert_eq!(
        servers("carol")["own"]["headers"]["Authorization"],
        bearer("own-93ac1")
    );
    assert!(servers("dave").get("own").is_none());
    // Values never reach the report.
    assert!(!run.stdout.contains(TOKEN) && !run.stdout.contains("own-93ac1"));
}
