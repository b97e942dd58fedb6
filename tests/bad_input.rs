//! Every bad input gets a clear error naming the object (or file) and field,
//! and nothing is lost.

mod common;

use common::*;
use serde_json::json;

/// A host with one rendered instance, so "nothing lost" can be checked.
fn rendered() -> (Host, Vec<u8>) {
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            binding("dev", "base", "agentType: coder", &[("lint@tools", true)]),
        ]),
    );
    assert_eq!(h.reconcile().code, 0);
    let before = std::fs::read(h.env_file("dev/alice/settings.json")).unwrap();
    (h, before)
}

fn unchanged(h: &Host, before: &[u8]) {
    assert_eq!(
        std::fs::read(h.env_file("dev/alice/settings.json")).unwrap(),
        before,
        "the last good render was changed"
    );
}

#[test]
fn malformed_yaml_fails_the_load_and_names_the_file() {
    let (h, before) = rendered();
    h.manifest("broken", "apiVersion: v1\nkind: [unclosed\n");
    h.manifest(
        "more",
        &binding("dev", "m", "agentType: coder", &[("x@tools", true)]),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("broken.yaml") && run.stderr.contains("invalid YAML"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("line 2"), "{}", run.stderr);
    assert_eq!(run.stdout, "");
    unchanged(&h, &before);
}

#[test]
fn unknown_kind_names_file_document_and_kind() {
    let (h, before) = rendered();
    h.manifest(
        "typo",
        "apiVersion: agentenv.io/v1alpha1\nkind: PluginBindng\nmetadata:\n  name: x\n",
    );
    let run = h.reconcile();
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("typo.yaml:1 (document 1)"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("unknown kind \"PluginBindng\""),
        "{}",
        run.stderr
    );
    unchanged(&h, &before);
}

#[test]
fn binding_with_both_or_neither_target_holds_back_its_instances() {
    for target in ["agentType: coder\n    instance: alice", "{}"] {
        let (h, before) = rendered();
        let yaml = format!(
            "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata:\n  name: bad\n  namespace: dev\nspec:\n  target:\n    {target}\n  plugins:\n    - name: x@tools\n"
        )
        .replace("target:\n    {}", "target: {}");
        h.manifest("bad", &yaml);
        h.manifest("other", &instance("ops", "zed", "coder"));
        let run = h.reconcile();
        assert_eq!(run.code, 1, "{}", run.stderr);
        let row = run.row("dev", "alice");
        assert_eq!(row["ready"], false);
        assert_eq!(row["reason"], "InvalidObject");
        let msg = row["message"].as_str().unwrap();
        assert!(msg.contains("PluginBinding dev/bad"), "{msg}");
        assert!(msg.contains("field spec.target"), "{msg}");
        assert!(
            msg.contains("set exactly one of agentType or instance"),
            "{msg}"
        );
        unchanged(&h, &before);
        // Another namespace is unaffected.
        assert_eq!(run.row("ops", "zed")["ready"], true);
    }
}

#[test]
fn bad_plugin_id_names_the_field() {
    let (h, before) = rendered();
    h.manifest(
        "bad",
        &binding(
            "dev",
            "bad",
            "agentType: coder",
            &[("no-marketplace", true)],
        ),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 1);
    let msg = run.message("dev", "alice");
    assert!(msg.contains("field spec.plugins[0].name"), "{msg}");
    assert!(msg.contains("<plugin>@<marketplace>"), "{msg}");
    unchanged(&h, &before);
}

#[test]
fn env_dir_path_rules() {
    for (path, expect) in [
        ("../escape", "must not contain '.' or '..' segments"),
        ("a/../../b", "must not contain '.' or '..' segments"),
        ("/etc/agent", "must be relative to the env root"),
        (".agent-env/x", "must not be under .agent-env"),
    ] {
        let h = Host::new();
        h.manifest(
            "fleet",
            &instance_with(
                "dev",
                "alice",
                "coder",
                &format!("envDir:\n  path: \"{path}\""),
            ),
        );
        let run = h.reconcile();
        assert_eq!(run.code, 1, "{path}");
        let row = run.row("dev", "alice");
        assert_eq!(row["reason"], "InvalidObject");
        let msg = row["message"].as_str().unwrap();
        assert!(
            msg.contains("field spec.envDir.path") && msg.contains(expect),
            "{path}: {msg}"
        );
        assert!(!h.root().join("dev").exists());
    }
}

#[test]
fn two_instances_cannot_share_an_env_dir() {
    let h = Host::new();
    h.manifest(
        "fleet",
        &docs(&[
            instance("dev", "alice", "coder"),
            instance_with("dev", "mallory", "coder", "envDir:\n  path: dev/alice"),
        ]),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 1);
    for name in ["alice", "mallory"] {
        let msg = run.message("dev", name);
        assert!(
            msg.contains("field spec.envDir.path") && msg.contains("also used by"),
            "{msg}"
        );
    }
}

#[test]
fn symlinked_env_dir_leading_outside_the_root_is_refused() {
    let h = Host::new();
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(h.root().join("dev")).unwrap();
    std::os::unix::fs::symlink(outside.path(), h.root().join("dev/alice")).unwrap();
    h.manifest("fleet", &instance("dev", "alice", "coder"));
    let run = h.reconcile();
    assert_eq!(run.code, 1);
    let row = run.row("dev", "alice");
    assert_eq!(row["reason"], "UnsafePath");
    assert!(
        row["message"].as_str().unwrap().contains("dev/alice"),
        "{row}"
    );
    assert_eq!(
        std::fs::read_dir(outside.path()).unwrap().count(),
        0,
        "wrote outside the root"
    );
}

#[test]
fn corrupt_settings_json_is_moved_aside_and_rendered_fresh() {
    let (h, _) = rendered();
    std::fs::write(
        h.env_file("dev/alice/settings.json"),
        "{\"theme\": \"dark\", oops",
    )
    .unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    let row = run.row("dev", "alice");
    assert_eq!(row["ready"], true);
    let w = row["warnings"][0].as_str().unwrap();
    assert!(
        w.starts_with("CorruptFile: dev/alice/settings.json was corrupt"),
        "{w}"
    );
    assert_eq!(
        h.read_json("dev/alice/settings.json")["enabledPlugins"],
        json!({"lint@tools": true})
    );
    let kept: Vec<_> = std::fs::read_dir(h.env_file("dev/alice"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("settings.json.corrupt-")
        })
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        std::fs::read_to_string(kept[0].path()).unwrap(),
        "{\"theme\": \"dark\", oops"
    );
}

#[test]
fn owned_key_of_the_wrong_type_is_replaced_and_the_old_file_kept() {
    let (h, _) = rendered();
    std::fs::write(
        h.env_file("dev/alice/settings.json"),
        "{\"theme\": \"dark\", \"enabledPlugins\": [\"lint@tools\"]}",
    )
    .unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0);
    let s = h.read_json("dev/alice/settings.json");
    assert_eq!(s["theme"], "dark");
    assert_eq!(s["enabledPlugins"], json!({"lint@tools": true}));
    let w = run.row("dev", "alice")["warnings"][0]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(w.contains("key enabledPlugins is not a JSON object"), "{w}");
}

#[test]
fn missing_config_dir_fails_before_anything_is_written() {
    let h = Host::new();
    h.manifest("fleet", &instance("dev", "alice", "coder"));
    let run = h.reconcile_with(&["--config", "/nonexistent/agent-config"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("config dir /nonexistent/agent-config does not exist"),
        "{}",
        run.stderr
    );
    assert!(!h.root().exists());
}

#[test]
fn malformed_builtin_file_names_file_and_field() {
    let h = Host::new();
    h.config(
        "agents.json",
        r#"{"types":[{"name":"coder","plugins":["bad id@x"]}]}"#,
    );
    h.manifest("fleet", &instance("dev", "alice", "coder"));
    let run = h.reconcile();
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("agents.json: field types[0].plugins[0]"),
        "{}",
        run.stderr
    );
}

#[test]
fn schema_errors_name_the_field() {
    let (h, before) = rendered();
    h.manifest(
        "bad",
        &mcp(
            "dev",
            "m",
            "agentType: coder",
            "stdio:\n  command: x\n  args: \"not-a-list\"\n",
        ),
    );
    let run = h.reconcile();
    let msg = run.message("dev", "alice");
    assert!(
        msg.contains("McpServer dev/m") && msg.contains("field spec.stdio.args"),
        "{msg}"
    );
    unchanged(&h, &before);
}

#[test]
fn secret_placeholder_in_command_and_reserved_names_are_refused() {
    let (h, _) = rendered();
    h.manifest(
        "bad",
        &docs(&[
            mcp(
                "dev",
                "m",
                "agentType: coder",
                "stdio:\n  command: \"${SECRET:X}\"\n",
            ),
            mcp(
                "dev",
                "workspace",
                "instance: alice",
                "http:\n  url: https://x\n",
            ),
        ]),
    );
    let run = h.reconcile();
    let msg = run.message("dev", "alice");
    assert!(
        msg.contains("field spec.stdio.command: secret placeholders are not allowed"),
        "{msg}"
    );
    assert!(msg.contains("'workspace' is reserved"), "{msg}");
}

#[test]
fn duplicate_object_names_both_places() {
    let h = Host::new();
    h.manifest("a", &instance("dev", "alice", "coder"));
    h.manifest("b", &instance("dev", "alice", "other"));
    let run = h.reconcile();
    assert_eq!(run.code, 2);
    assert!(
        run.stderr
            .contains("AgentInstance dev/alice is defined twice"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("a.yaml") && run.stderr.contains("b.yaml"),
        "{}",
        run.stderr
    );
}

#[test]
fn missing_manifest_path_is_an_input_error() {
    let h = Host::new();
    let out = agent_env()
        .args([
            "reconcile",
            "--once",
            "-f",
            "/nonexistent/manifests",
            "--env-root",
        ])
        .arg(h.root())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/manifests"));
}

#[test]
fn relative_marketplace_directory_is_refused() {
    let (h, before) = rendered();
    h.manifest(
        "mk",
        &marketplace(
            "dev",
            "local",
            "agentType: coder",
            "directory:\n  path: plugins/local\n",
        ),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 1);
    let msg = run.message("dev", "alice");
    assert!(
        msg.contains("field spec.source.directory.path: must be an absolute path"),
        "{msg}"
    );
    unchanged(&h, &before);
}

/// `spec.plugin` for `plugins`, `enabeld` for `enabled`.
const TYPO_BINDING: &str = "apiVersion: agentenv.io/v1alpha1\nkind: PluginBinding\nmetadata:\n  name: typo\n  namespace: dev\nspec:\n  target:\n    agentType: coder\n  plugin:\n    - name: fmt@tools\n  plugins:\n    - name: x@tools\n      enabeld: false\n";
/// `strinData` for `stringData`.
const TYPO_SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: tokens\n  namespace: dev\n  labels: {agentenv.io/secrets: \"true\"}\nstrinData:\n  A: b\n";

#[test]
fn an_unknown_field_is_a_warning_by_default_and_refused_under_strict() {
    let (h, before) = rendered();
    h.manifest(
        "typos",
        &docs(&[TYPO_BINDING.to_owned(), TYPO_SECRET.to_owned()]),
    );
    // As the API server without strictness: the object is taken without the
    // fields, and each is named with its file and object.
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    for (object, field) in [
        ("PluginBinding dev/typo", "spec.plugin"),
        ("PluginBinding dev/typo", "spec.plugins[0].enabeld"),
        ("Secret dev/tokens", "strinData"),
    ] {
        assert!(
            run.stderr.lines().any(|l| l.contains("typos.yaml:")
                && l.contains(" (document ")
                && l.contains(object)
                && l.contains(&format!("unknown field {field:?}"))),
            "{object} {field}: {}",
            run.stderr
        );
    }
    let settings: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.env_file("dev/alice/settings.json")).unwrap())
            .unwrap();
    assert_eq!(settings["enabledPlugins"]["x@tools"], json!(true));
    assert!(settings["enabledPlugins"].get("fmt@tools").is_none());

    // As kubectl apply: refused, naming every unknown field; nothing lost.
    h.manifest("typos", TYPO_BINDING);
    std::fs::write(h.env_file("dev/alice/settings.json"), &before).unwrap();
    let run = h.reconcile_with(&["--strict"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let row = &run.rows()[0];
    assert_eq!(row["reason"], "InvalidObject");
    let message = row["message"].as_str().unwrap();
    assert!(
        message.contains("PluginBinding dev/typo")
            && message.contains("unknown field \"spec.plugin\"")
            && message.contains("unknown field \"spec.plugins[0].enabeld\""),
        "{message}"
    );
    unchanged(&h, &before);

    // A Secret cannot be held back by itself: under --strict it fails the load.
    h.manifest("typos", TYPO_SECRET);
    let run = h.reconcile_with(&["--strict"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("typos.yaml:1 (document 1): Secret dev/tokens: unknown field \"strinData\""),
        "{}",
        run.stderr
    );
    unchanged(&h, &before);
}
