//! `agent-env explain` through the real binary: every entry with its scope,
//! deciding object and manifest file:line, an entry's absence explained,
//! secrets never shown, and nothing under the env root changed.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

use common::*;
use serde_json::{Value, json};

/// `explain <args>` against the host's manifests, config, env root and state.
fn explain(h: &Host, args: &[&str]) -> Run {
    let mut cmd = agent_env();
    cmd.arg("explain").args(args);
    cmd.arg("-f").arg(h.manifests());
    cmd.arg("--env-root").arg(h.root());
    if h.path("config").exists() {
        cmd.arg("--config").arg(h.path("config"));
    }
    cmd.args(&h.state_args);
    Run::from(cmd.output().unwrap())
}

/// `explain <args> -o json`, parsed; it must succeed.
fn explain_json(h: &Host, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    let run = explain(h, &all);
    assert_eq!(
        run.code, 0,
        "stdout: {}\nstderr: {}",
        run.stdout, run.stderr
    );
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", run.stdout, run.stderr))
}

/// The one entry of an `explain <instance> <kind> <entry>` answer.
fn entry(v: &Value) -> &Value {
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{v:#}");
    &entries[0]
}

/// `<file>:<line>` of the document of manifest `file` that names `name`: the
/// line of its `---` marker, or 1 for the first document.
fn at(h: &Host, file: &str, name: &str) -> String {
    let path = h.manifests().join(format!("{file}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let named = lines
        .iter()
        .position(|l| *l == format!("  name: {name}"))
        .unwrap_or_else(|| panic!("{name} not in {file}"));
    let start = lines[..named]
        .iter()
        .rposition(|l| *l == "---")
        .map_or(1, |i| i + 1);
    format!("{}:{start}", path.display())
}

/// Builtin base@tools for coders; type binding `coders` enables lint@tools
/// and fmt@tools; instance binding `alice-off` disables lint@tools.
fn layered(h: &Host) {
    h.config(
        "agents.json",
        r#"{"types": [{"name": "coder", "plugins": ["base@tools"]}]}"#,
    );
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            binding(
                "dev",
                "coders",
                "agentType: coder",
                &[("lint@tools", true), ("fmt@tools", true)],
            ),
            binding(
                "dev",
                "alice-off",
                "instance: alice",
                &[("lint@tools", false)],
            ),
            binding(
                "dev",
                "reviewers",
                "agentType: reviewer",
                &[("review@tools", true)],
            ),
        ]),
    );
}

#[test]
fn an_instance_disabling_a_type_plugin_names_the_disabling_object_and_its_line() {
    let h = Host::new();
    layered(&h);
    assert_eq!(h.reconcile().code, 0);

    let v = explain_json(&h, &["dev/alice", "plugin", "lint@tools"]);
    assert_eq!(v["namespace"], "dev");
    assert_eq!(v["agentType"], "coder");
    assert_eq!(v["source"], at(&h, "fleet", "alice"));
    let x = entry(&v);
    assert_eq!(x["key"], "enabledPlugins");
    assert_eq!(x["status"], "disabled");
    assert_eq!(x["written"], true);
    assert_eq!(x["value"], false);
    assert_eq!(x["scope"], "instance");
    assert_eq!(x["object"]["kind"], "PluginBinding");
    assert_eq!(x["object"]["name"], "alice-off");
    assert_eq!(x["object"]["source"], at(&h, "fleet", "alice-off"));
    assert_eq!(x["overrode"][0]["scope"], "type");
    assert_eq!(x["overrode"][0]["object"]["name"], "coders");
    assert_eq!(
        x["overrode"][0]["object"]["source"],
        at(&h, "fleet", "coders")
    );
    assert_eq!(x["overrode"][0]["value"], true);
    assert_eq!(v["pass"]["ready"], true);
    assert_eq!(v["pass"]["reason"], "UpToDate");

    let run = explain(&h, &["dev/alice", "plugin", "lint@tools"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let want = format!(
        "written as false: disabled at instance scope by PluginBinding/alice-off ({}) with enabled: false",
        at(&h, "fleet", "alice-off")
    );
    assert!(run.stdout.contains(&want), "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!(
            "overrode PluginBinding/coders ({}) at type scope (value true)",
            at(&h, "fleet", "coders")
        )),
        "{}",
        run.stdout
    );

    // Every entry, each with its scope and object; the other type's binding is not one.
    let v = explain_json(&h, &["dev/alice"]);
    let rows: BTreeMap<String, (String, String, String)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_owned(),
                (
                    x["status"].as_str().unwrap().to_owned(),
                    x["scope"].as_str().unwrap_or("-").to_owned(),
                    x["object"]["name"].as_str().unwrap_or("-").to_owned(),
                ),
            )
        })
        .collect();
    let row = |s: &str, scope: &str, o: &str| (s.to_owned(), scope.to_owned(), o.to_owned());
    assert_eq!(
        rows,
        BTreeMap::from([
            ("base@tools".to_owned(), row("rendered", "builtin", "-")),
            ("fmt@tools".to_owned(), row("rendered", "type", "coders")),
            (
                "lint@tools".to_owned(),
                row("disabled", "instance", "alice-off")
            ),
        ])
    );
    // The table says the same, one row per entry.
    let run = explain(&h, &["dev/alice"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let line = |name: &str| {
        run.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {}", run.stdout))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("base@tools")[..5],
        ["plugin", "base@tools", "rendered", "builtin", "-"]
    );
    assert_eq!(line("base@tools")[5], "agents.json");
    assert_eq!(
        line("lint@tools"),
        [
            "plugin",
            "lint@tools",
            "disabled",
            "instance",
            "PluginBinding/alice-off",
            at(&h, "fleet", "alice-off").as_str()
        ]
    );
}

#[test]
fn an_undeclared_entry_says_so_and_where_it_is_declared_instead() {
    let h = Host::new();
    layered(&h);
    let v = explain_json(&h, &["dev/alice", "plugin", "review@tools"]);
    let x = entry(&v);
    assert_eq!(x["status"], "undeclared");
    assert!(
        x["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("not declared for this instance"),
        "{x:#}"
    );
    assert_eq!(
        x["elsewhere"][0],
        format!(
            "PluginBinding dev/reviewers ({}) declares it but targets agentType reviewer",
            at(&h, "fleet", "reviewers")
        )
    );

    let v = explain_json(&h, &["dev/alice", "plugin", "lnt@tools"]);
    assert_eq!(entry(&v)["didYouMean"], json!(["lint@tools"]));
}

#[test]
fn a_missing_secret_is_named_and_no_value_is_ever_shown() {
    let h = Host::new();
    forgejo_fleet(&h);
    let v = explain_json(&h, &["dev/alice", "mcp", "forgejo"]);
    assert_eq!(v["blocked"][0]["reason"], "MissingSecret");
    assert!(
        v["blocked"][0]["message"]
            .as_str()
            .unwrap()
            .contains("FORGEJO_TOKEN_DEV"),
        "{v:#}"
    );
    assert_eq!(v["pass"]["reason"], "MissingSecret");
    let x = entry(&v);
    assert_eq!(x["status"], "rendered");
    assert_eq!(x["written"], false);
    assert_eq!(
        x["secrets"],
        json!([{"name": "FORGEJO_TOKEN_DEV", "state": "missing"}])
    );
    assert_eq!(
        x["value"]["env"]["FORGEJO_TOKEN"],
        "${SECRET:FORGEJO_TOKEN_DEV}"
    );
    let run = explain(&h, &["dev/alice", "mcp", "forgejo"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .contains("needs secret FORGEJO_TOKEN_DEV, which is missing"),
        "{}",
        run.stdout
    );

    // With the secret: rendered, and its value appears nowhere.
    h.manifest(
        "secret",
        &secret("dev", "forgejo", &[("FORGEJO_TOKEN_DEV", FORGEJO_TOKEN)]),
    );
    assert_eq!(h.reconcile().code, 0);
    let v = explain_json(&h, &["dev/alice", "mcp", "forgejo"]);
    assert_eq!(v["blocked"], json!([]));
    assert_eq!(v["pass"]["ready"], true);
    let x = entry(&v);
    assert_eq!(x["written"], true);
    assert_eq!(x["secrets"][0]["state"], "found");
    for args in [
        &["dev/alice", "mcp", "forgejo"][..],
        &["dev/alice", "mcp", "forgejo", "-o", "json"],
        &["dev/alice"],
        &["dev/alice", "-o", "json"],
    ] {
        let run = explain(&h, args);
        assert_eq!(run.code, 0, "{}", run.stderr);
        for out in [&run.stdout, &run.stderr] {
            assert!(
                !out.contains(FORGEJO_TOKEN),
                "{args:?} showed the secret: {out}"
            );
        }
    }
}

#[test]
fn an_invalid_binding_holding_the_instance_back_is_named_with_its_line() {
    let h = Host::new();
    layered(&h);
    assert_eq!(h.reconcile().code, 0);
    h.manifest(
        "bad",
        &docs(&[
            binding("dev", "fine", "instance: alice", &[("ok@tools", true)]),
            binding("dev", "broken", "instance: alice", &[("nope", true)]),
        ]),
    );
    let v = explain_json(&h, &["dev/alice", "plugin", "fmt@tools"]);
    let blocked = v["blocked"].as_array().unwrap();
    assert_eq!(blocked.len(), 1, "{v:#}");
    assert_eq!(blocked[0]["reason"], "InvalidObject");
    assert_eq!(blocked[0]["object"]["kind"], "PluginBinding");
    assert_eq!(blocked[0]["object"]["name"], "broken");
    assert_eq!(blocked[0]["object"]["source"], at(&h, "bad", "broken"));
    assert!(
        blocked[0]["message"]
            .as_str()
            .unwrap()
            .contains("spec.plugins"),
        "{v:#}"
    );
    assert_eq!(v["pass"]["ready"], false);
    assert_eq!(v["pass"]["reason"], "InvalidObject");
    let x = entry(&v);
    assert_eq!(x["status"], "rendered");
    assert_eq!(x["written"], false);

    let run = explain(&h, &["dev/alice", "plugin", "fmt@tools"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "held back: InvalidObject PluginBinding/broken ({})",
            at(&h, "bad", "broken")
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("rendered, not written"),
        "{}",
        run.stdout
    );
}

#[test]
fn a_same_layer_conflict_names_winner_loser_rule_and_lines() {
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            mcp(
                "dev",
                "zeta",
                "agentType: coder",
                "name: docs\nhttp:\n  url: https://z.example\n",
            ),
            mcp(
                "dev",
                "alpha",
                "agentType: coder",
                "name: docs\nhttp:\n  url: https://a.example\n",
            ),
        ]),
    );
    let v = explain_json(&h, &["dev/alice", "mcp", "docs"]);
    let x = entry(&v);
    assert_eq!(x["object"]["name"], "alpha");
    assert_eq!(x["object"]["source"], at(&h, "fleet", "alpha"));
    assert_eq!(x["value"]["url"], "https://a.example");
    assert_eq!(x["wonOver"][0]["name"], "zeta");
    assert_eq!(x["wonOver"][0]["source"], at(&h, "fleet", "zeta"));
    assert_eq!(x["rule"], "the name that sorts first wins");
    let outcomes: Vec<&str> = x["story"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["decides", "lostConflict"]);
}

#[test]
fn an_adopted_runtime_install_wins_over_the_declared_value() {
    let h = Host::new();
    h.manifest("fleet", &instance("dev", "alice", "coder"));
    assert_eq!(h.reconcile().code, 0);
    // What `claude plugin marketplace add` and `claude plugin install` leave behind.
    let mut s = h.read_json("dev/alice/settings.json");
    s["extraKnownMarketplaces"]["tools"] = json!({"source": {"source": "url",
        "url": "https://tools.example/marketplace.json",
        "headers": {"Authorization": "Bearer runtime-t0ken-9c1"}}});
    s["enabledPlugins"]["user@tools"] = json!(true);
    h.write_json("dev/alice/settings.json", &s);
    let run = h.reconcile();
    assert_eq!(
        run.row("dev", "alice")["adopted"],
        json!(["enabledPlugins.user@tools", "extraKnownMarketplaces.tools"])
    );
    // The same marketplace declared afterwards.
    h.manifest(
        "mk",
        &marketplace(
            "dev",
            "tools",
            "agentType: coder",
            "github:\n  repo: org/tools\n",
        ),
    );

    let v = explain_json(&h, &["dev/alice", "marketplace", "tools"]);
    let x = entry(&v);
    assert_eq!(x["status"], "rendered");
    assert_eq!(x["scope"], "installed");
    assert_eq!(x["valueWithheld"], true);
    assert_eq!(x.get("value"), None);
    assert_eq!(x["overrode"][0]["outcome"], "replacedByInstall");
    assert_eq!(x["overrode"][0]["object"]["kind"], "PluginMarketplace");
    assert_eq!(x["overrode"][0]["object"]["source"], at(&h, "mk", "tools"));
    assert_eq!(
        x["overrode"][0]["value"],
        json!({"source": {"source": "github", "repo": "org/tools"}})
    );
    let run = explain(&h, &["dev/alice", "marketplace", "tools"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("rendered from the installed set"),
        "{}",
        run.stdout
    );
    for out in [run.stdout.as_str(), &v.to_string()] {
        assert!(!out.contains("runtime-t0ken-9c1"), "{out}");
    }

    let v = explain_json(&h, &["dev/alice", "plugin", "user@tools"]);
    let x = entry(&v);
    assert_eq!(x["scope"], "installed");
    assert_eq!(x["value"], true);
}

#[test]
fn unknown_or_invalid_instances_and_kind_words_are_input_errors() {
    let h = Host::new();
    layered(&h);
    h.manifest(
        "broken-instance",
        "apiVersion: agentenv.io/v1alpha1\nkind: AgentInstance\nmetadata:\n  name: bob\n  namespace: dev\nspec:\n  agentType: coder\n  envDir:\n    path: /etc\n",
    );
    let run = explain(&h, &["dev/alicia"]);
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains("no AgentInstance dev/alicia")
            && run.stderr.contains("did you mean dev/alice?"),
        "{}",
        run.stderr
    );
    assert_eq!(run.stdout, "");

    let run = explain(&h, &["dev/bob", "-o", "json"]);
    assert_eq!(run.code, 2, "{}", run.stdout);
    assert!(
        run.stderr.contains("AgentInstance dev/bob is invalid")
            && run.stderr.contains(&at(&h, "broken-instance", "bob"))
            && run.stderr.contains("spec.envDir.path"),
        "{}",
        run.stderr
    );

    let run = explain(&h, &["dev/alice", "plugins", "lint@tools"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("invalid value 'plugins'")
            && run.stderr.contains("plugin, marketplace, mcp"),
        "{}",
        run.stderr
    );
    let run = explain(&h, &["dev/alice", "plugin"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("<ENTRY>"), "{}", run.stderr);
}

/// Every file under the env root but the state database, with its bytes and
/// modification time. SQLite's own files are compared by what they hold
/// (see [`state`]): opening a database in WAL mode may checkpoint the log
/// another process left and touches the shared-memory index, which changes
/// bytes and times but no row.
fn tree(h: &Host) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    files_under(&h.root())
        .into_iter()
        .filter(|p| !p.starts_with(h.root().join(".agent-env")))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
            (p, (bytes, mtime))
        })
        .collect()
}

/// What the state database holds for dev/alice: adopted installs and the
/// audit trail (every pass that writes adds to it).
fn state(h: &Host) -> (String, String) {
    let installed = h.run(&["installed", "list", "dev/alice", "-o", "json"], None);
    let history = h.run(&["history", "dev/alice", "-o", "json"], None);
    assert_eq!(installed.code, 0, "{}", installed.stderr);
    assert_eq!(history.code, 0, "{}", history.stderr);
    (installed.stdout, history.stdout)
}

#[test]
fn explain_changes_nothing_under_the_env_root() {
    let h = Host::new();
    layered(&h);
    assert_eq!(h.reconcile().code, 0);
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["kept@tools"] = json!(true);
    h.write_json("dev/alice/settings.json", &s);
    assert_eq!(h.reconcile().code, 0);
    // A runtime install not yet adopted, drift on a declared entry and a
    // manifest change not yet rendered: a pass would write all three.
    let mut s = h.read_json("dev/alice/settings.json");
    s["enabledPlugins"]["user@tools"] = json!(true);
    s["enabledPlugins"]["fmt@tools"] = json!(false);
    h.write_json("dev/alice/settings.json", &s);
    h.manifest(
        "more",
        &binding("dev", "extra", "instance: alice", &[("extra@tools", true)]),
    );
    let dirs_before: Vec<PathBuf> = walk_dirs(&h.root());
    let before = tree(&h);
    assert_eq!(before.len(), 2, "{before:?}");
    let state_before = state(&h);
    assert!(state_before.0.contains("kept@tools"), "{}", state_before.0);

    let v = explain_json(&h, &["dev/alice"]);
    assert_eq!(v["pass"]["adopted"], json!(["enabledPlugins.user@tools"]));
    assert_eq!(v["pass"]["drift"], json!(["enabledPlugins.fmt@tools"]));
    for args in [
        &["dev/alice"][..],
        &["dev/alice", "plugin", "extra@tools"],
        &["dev/alice", "plugin", "user@tools", "-o", "json"],
        &["dev/alice", "mcp", "none"],
    ] {
        let run = explain(&h, args);
        assert_eq!(run.code, 0, "{args:?}: {}", run.stderr);
    }
    let after = tree(&h);
    let changed: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    assert!(changed.is_empty(), "explain changed {changed:?}");
    assert_eq!(walk_dirs(&h.root()), dirs_before);
    assert_eq!(state(&h), state_before, "explain changed the state");

    // On a host with no env root and no database, nothing is created either.
    let fresh = Host::new();
    layered(&fresh);
    let run = explain(&fresh, &["dev/alice"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(!fresh.root().exists(), "explain created the env root");
}

fn walk_dirs(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk_dirs(&e.path()));
        }
    }
    out.sort();
    out
}
