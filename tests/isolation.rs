//! Tenant isolation. What one namespace declares (bindings, marketplaces and
//! MCP servers at type and instance scope), labels as a Secret or keeps in
//! the encrypted store never reaches an instance of another namespace, on a
//! host (`reconcile`) and in a cluster (`run` against the API double), even
//! when both namespaces use the same names for everything. No placeholder
//! form reaches into another namespace. No two instances' env dirs can be
//! one directory or lie inside each other, however the paths are spelled,
//! and an instance cannot put its env dir into another namespace's part of
//! the env root.

mod common;
#[path = "common/kube.rs"]
mod kit;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use serde_json::{Value, json};

const NAMESPACES: [&str; 2] = ["team-a", "team-b"];

/// The value of `${SECRET:TOKEN}` (and `tokens/TOKEN`) in `ns`.
fn labelled_value(ns: &str) -> String {
    format!("{ns}-labelled-5e1c")
}

/// The value of the store entry `STORED` in `ns`.
fn stored_value(ns: &str) -> String {
    format!("{ns}-stored-90ab")
}

/// `team-a` only: a store entry and a Secret key that `team-b` asks for.
const ONLY_A_STORED: &str = "only-a-stored-77d2";
const ONLY_A_LABELLED: &str = "only-a-labelled-c3f0";

/// The same object names, type name, instance name, Secret name and keys in
/// every namespace, with contents that name the namespace.
fn twin(ns: &str) -> Vec<String> {
    let mut tokens = vec![("TOKEN".to_owned(), labelled_value(ns))];
    if ns == "team-a" {
        tokens.push(("ONLY_A_KEY".into(), ONLY_A_LABELLED.into()));
    }
    let tokens: Vec<(&str, &str)> = tokens
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    vec![
        instance(ns, "alice", "coder"),
        binding(
            ns,
            "coders",
            "agentType: coder",
            &[(&format!("{ns}-type@tools"), true)],
        ),
        binding(
            ns,
            "alice",
            "instance: alice",
            &[(&format!("{ns}-instance@tools"), true)],
        ),
        marketplace(
            ns,
            "tools",
            "agentType: coder",
            &format!("github:\n  repo: {ns}/tools\n"),
        ),
        marketplace(
            ns,
            "mine",
            "instance: alice",
            &format!("git:\n  url: https://git.example/{ns}/mine.git\n"),
        ),
        mcp(
            ns,
            "forgejo",
            "agentType: coder",
            &format!(
                "http:\n  url: \"https://{ns}.example/mcp\"\n  headers:\n    Authorization: \"Bearer ${{SECRET:TOKEN}}\"\n    X-Keyed: \"${{SECRET:tokens/TOKEN}}\"\n"
            ),
        ),
        mcp(
            ns,
            "stored",
            "instance: alice",
            "stdio:\n  command: stored-mcp\n  args: [\"--token=${SECRET:STORED}\"]\n  env:\n    T: \"${SECRET:STORED}\"\n",
        ),
        secret(ns, "tokens", &tokens),
    ]
}

/// `team-b/bob` asks for what only `team-a` has, by both forms.
fn bob_asks_for_team_a() -> Vec<String> {
    vec![
        instance("team-b", "bob", "other"),
        mcp(
            "team-b",
            "only-a",
            "instance: bob",
            "stdio:\n  command: x\n  env:\n    A: \"${SECRET:ONLY_A}\"\n    B: \"${SECRET:tokens/ONLY_A_KEY}\"\n",
        ),
    ]
}

/// What `ns/alice` renders: its own namespace's objects and values only.
fn expected(ns: &str) -> (Value, Value) {
    let settings = json!({
        "enabledPlugins": {
            format!("{ns}-type@tools"): true,
            format!("{ns}-instance@tools"): true,
        },
        "extraKnownMarketplaces": {
            "tools": {"source": {"source": "github", "repo": format!("{ns}/tools")}},
            "mine": {"source": {"source": "git", "url": format!("https://git.example/{ns}/mine.git")}},
        },
    });
    let claude = json!({"mcpServers": {
        "forgejo": {"type": "http", "url": format!("https://{ns}.example/mcp"), "headers": {
            "Authorization": format!("Bearer {}", labelled_value(ns)),
            "X-Keyed": labelled_value(ns),
        }},
        "stored": {"type": "stdio", "command": "stored-mcp",
            "args": [format!("--token={}", stored_value(ns))],
            "env": {"T": stored_value(ns)}},
    }});
    (settings, claude)
}

fn read(dir: &Path, file: &str) -> Value {
    let p = dir.join(file);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

/// Every file under `dir` with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files_under(dir)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap();
            (f.strip_prefix(dir).unwrap().display().to_string(), bytes)
        })
        .collect()
}

/// Checks both namespaces' `alice` and an empty third namespace's: each has
/// exactly its own entries and values, and nothing under one namespace's
/// part of the env root mentions another namespace.
fn check_twins(root: &Path) {
    for ns in NAMESPACES {
        let dir = root.join(ns).join("alice");
        let (settings, claude) = expected(ns);
        assert_eq!(read(&dir, "settings.json"), settings, "{ns}/alice");
        assert_eq!(read(&dir, ".claude.json"), claude, "{ns}/alice");
    }
    let empty = root.join("team-c/alice");
    assert_eq!(
        read(&empty, "settings.json"),
        json!({"enabledPlugins": {}, "extraKnownMarketplaces": {}})
    );
    assert_eq!(read(&empty, ".claude.json"), json!({"mcpServers": {}}));
    let all = ["team-a", "team-b", "team-c", "only-a"];
    for ns in ["team-a", "team-b", "team-c"] {
        for (file, bytes) in contents(&root.join(ns)) {
            let text = String::from_utf8_lossy(&bytes);
            for other in all.iter().filter(|o| **o != ns) {
                assert!(
                    !text.contains(other),
                    "{ns}/{file} mentions {other}: {text}"
                );
            }
        }
    }
}

#[test]
fn on_a_host_namespaces_using_the_same_names_never_see_each_other() {
    let h = Host::new();
    let mut parts: Vec<String> = NAMESPACES.iter().flat_map(|ns| twin(ns)).collect();
    parts.push(instance("team-c", "alice", "coder"));
    parts.extend(bob_asks_for_team_a());
    h.manifest("fleet", &docs(&parts));
    for ns in NAMESPACES {
        let run = h.run(
            &["secret", "set", "STORED", "-n", ns],
            Some(&stored_value(ns)),
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    let run = h.run(
        &["secret", "set", "ONLY_A", "-n", "team-a"],
        Some(ONLY_A_STORED),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);

    let run = h.reconcile();
    assert_eq!(run.code, 1, "bob is not ready: {}", run.stdout);
    for ns in ["team-a", "team-b", "team-c"] {
        assert_eq!(run.row(ns, "alice")["ready"], true, "{}", run.stdout);
    }
    check_twins(&h.root());

    // team-a's store entry and team-a's Secret key are missing for team-b,
    // and bob gets no env dir at all.
    let bob = run.row("team-b", "bob");
    assert_eq!(bob["reason"], "MissingSecret");
    let msg = bob["message"].as_str().unwrap();
    assert!(
        msg.contains("ONLY_A") && msg.contains("tokens/ONLY_A_KEY"),
        "{msg}"
    );
    assert!(!h.root().join("team-b/bob").exists());

    // An agent cannot make the operator fill a placeholder for it: a
    // runtime install is adopted as written, placeholders and all.
    let grab = json!({"type": "stdio", "command": "grab",
        "args": ["${SECRET:tokens/TOKEN}"], "env": {"T": "${SECRET:STORED}"}});
    let file = h.root().join("team-b/alice/.claude.json");
    let mut claude = read(&h.root().join("team-b/alice"), ".claude.json");
    claude["mcpServers"]["grab"] = grab.clone();
    std::fs::write(&file, serde_json::to_vec(&claude).unwrap()).unwrap();
    let run = h.reconcile();
    assert_eq!(
        run.row("team-b", "alice")["adopted"],
        json!(["mcpServers.grab"])
    );
    std::fs::remove_dir_all(h.root().join("team-b/alice")).unwrap();
    h.reconcile();
    let claude = read(&h.root().join("team-b/alice"), ".claude.json");
    assert_eq!(claude["mcpServers"]["grab"], grab);
}

/// Placeholder forms that try to name another namespace: none is read from
/// it. The three-part and other malformed forms are refused when the object
/// is read (naming the object and field); a two-part form is the
/// `secret-name/key` form, so it names a Secret in the instance's own
/// namespace and is missing there. Either way nothing is written.
#[test]
fn no_placeholder_form_reaches_another_namespace() {
    let refused = [
        "${SECRET:team-a/tokens/TOKEN}",
        "${SECRET:/team-a/tokens/TOKEN}",
        "${SECRET:../team-a/tokens/TOKEN}",
        "${SECRET:team-a:tokens/TOKEN}",
        "${SECRET:team-a:TOKEN}",
        "${SECRET:team-a/STORED/}",
    ];
    let missing = [
        ("${SECRET:team-a/TOKEN}", "team-a/TOKEN"),
        ("${SECRET:tokens/ONLY_A_KEY}", "tokens/ONLY_A_KEY"),
        ("${SECRET:team-a.tokens/TOKEN}", "team-a.tokens/TOKEN"),
        ("${SECRET:ONLY_A}", "ONLY_A"),
    ];
    let h = Host::new();
    let mut base: Vec<String> = NAMESPACES.iter().flat_map(|ns| twin(ns)).collect();
    base.push(instance("team-c", "alice", "coder"));
    h.manifest("fleet", &docs(&base));
    for ns in NAMESPACES {
        h.run(
            &["secret", "set", "STORED", "-n", ns],
            Some(&stored_value(ns)),
        );
    }
    h.run(
        &["secret", "set", "ONLY_A", "-n", "team-a"],
        Some(ONLY_A_STORED),
    );
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stdout);
    let before = contents(&h.root().join("team-b"));

    let steal = |form: &str| {
        mcp(
            "team-b",
            "steal",
            "instance: alice",
            &format!(
                "http:\n  url: https://steal.example/mcp\n  headers:\n    X-Steal: \"{form}\"\n"
            ),
        )
    };
    for form in refused {
        h.manifest("steal", &steal(form));
        let run = h.reconcile();
        assert_eq!(run.code, 1, "{form}: {}", run.stdout);
        let row = run.row("team-b", "alice");
        assert_eq!(row["reason"], "InvalidObject", "{form}");
        let msg = row["message"].as_str().unwrap();
        assert!(
            msg.contains("McpServer team-b/steal")
                && msg.contains("field spec.http.headers.X-Steal")
                && msg.contains("malformed secret placeholder"),
            "{form}: {msg}"
        );
        assert_eq!(contents(&h.root().join("team-b")), before, "{form}");
        assert_eq!(run.row("team-a", "alice")["reason"], "UpToDate");
    }
    for (form, name) in missing {
        h.manifest("steal", &steal(form));
        let run = h.reconcile();
        assert_eq!(run.code, 1, "{form}: {}", run.stdout);
        let row = run.row("team-b", "alice");
        assert_eq!(row["reason"], "MissingSecret", "{form}");
        let msg = row["message"].as_str().unwrap();
        assert!(msg.contains(name), "{form}: {msg}");
        assert_eq!(contents(&h.root().join("team-b")), before, "{form}");
    }
    h.remove_manifest("steal");
    assert_eq!(h.reconcile().code, 0);
    check_twins(&h.root());
}

/// `dev/alice` and `prod/dave` are rendered; then `dev/mallory` asks for an
/// env dir path. `refused` are the instances that must then report why, by
/// a fragment of their message; every other instance stays ready, and not a
/// byte under the env root changes.
#[test]
fn env_dirs_never_overlap_however_the_path_is_spelled() {
    let alice_holds = "holds the env dir of AgentInstance dev/mallory";
    let cases: &[(&str, &[(&str, &str)])] = &[
        // The same dir as alice's default.
        (
            "dev/alice/",
            &[
                ("alice", "is also used by AgentInstance dev/mallory"),
                ("mallory", "is also used by AgentInstance dev/alice"),
            ],
        ),
        (
            "dev//alice",
            &[("alice", "is also used by"), ("mallory", "is also used by")],
        ),
        // One dir on a case-insensitive filesystem.
        (
            "dev/ALICE",
            &[("alice", "is also used by"), ("mallory", "is also used by")],
        ),
        // Inside alice's env dir, at any depth.
        (
            "dev/alice/inner",
            &[
                ("alice", alice_holds),
                (
                    "mallory",
                    "lies inside the env dir of AgentInstance dev/alice",
                ),
            ],
        ),
        (
            "dev/Alice//deeper/still/",
            &[("alice", alice_holds), ("mallory", "lies inside")],
        ),
        // `.` and `..` are refused before they could mean alice's dir.
        (
            "dev/./alice",
            &[("mallory", "must not contain '.' or '..' segments")],
        ),
        (
            "dev/x/../alice",
            &[("mallory", "must not contain '.' or '..' segments")],
        ),
        (
            "./dev/alice",
            &[("mallory", "must not contain '.' or '..' segments")],
        ),
        ("/dev/alice", &[("mallory", "must be relative")]),
        // Another namespace's part of the env root: refused for mallory
        // alone, so dev cannot hold back prod's instance by claiming its dir.
        ("prod/dave", &[("mallory", "must lie under dev/")]),
        ("prod/dave/inner", &[("mallory", "must lie under dev/")]),
        ("Dev/mallory", &[("mallory", "must lie under dev/")]),
        ("dev", &[("mallory", "must lie under dev/")]),
    ];
    for (path, refused) in cases {
        let h = Host::new();
        let fleet = vec![
            instance("dev", "alice", "coder"),
            instance("prod", "dave", "coder"),
            binding("dev", "b", "agentType: coder", &[("lint@tools", true)]),
            binding("prod", "b", "agentType: coder", &[("lint@tools", true)]),
        ];
        h.manifest("fleet", &docs(&fleet));
        assert_eq!(h.reconcile().code, 0);
        let before = contents(&h.root());
        h.manifest(
            "mallory",
            &instance_with(
                "dev",
                "mallory",
                "coder",
                &format!("envDir:\n  path: \"{path}\""),
            ),
        );
        let run = h.reconcile();
        assert_eq!(run.code, 1, "{path}: {}", run.stdout);
        for (ns, name) in [("dev", "alice"), ("prod", "dave"), ("dev", "mallory")] {
            let row = run.row(ns, name);
            match refused.iter().find(|(n, _)| *n == name) {
                Some((_, fragment)) => {
                    assert_eq!(row["reason"], "InvalidObject", "{path}: {name}");
                    let msg = row["message"].as_str().unwrap();
                    assert!(
                        msg.contains("field spec.envDir.path") && msg.contains(fragment),
                        "{path}: {name}: {msg}"
                    );
                }
                None => assert_eq!(row["reason"], "UpToDate", "{path}: {name}"),
            }
        }
        let after = contents(&h.root());
        let changed: Vec<&String> = after
            .keys()
            .chain(before.keys())
            .filter(|f| !f.starts_with(".agent-env/") && before.get(*f) != after.get(*f))
            .collect();
        assert!(changed.is_empty(), "{path}: written: {changed:?}");
    }
}

// ---- In a cluster ----

use kit::Cluster;

/// The manifests above, as objects to apply (Secrets as the API takes them).
fn objects(manifests: &[String]) -> Vec<Value> {
    manifests
        .iter()
        .map(|m| serde_saphyr::from_str::<Value>(m).unwrap())
        .collect()
}

/// `agent-env secret set` against the operator's default state under the
/// env root.
fn store(c: &Cluster, ns: &str, name: &str, value: &str) {
    let mut cmd = agent_env();
    cmd.args(["secret", "set", name, "-n", ns, "--env-root"])
        .arg(c.root())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(value.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn condition(c: &Cluster, resource: &str, ns: &str, name: &str, type_: &str) -> Option<Value> {
    let obj = c.server.get("agentenv.io", resource, Some(ns), name)?;
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|x| x["type"] == type_)
        .cloned()
}

async fn reason_is(c: &Cluster, resource: &str, ns: &str, name: &str, reason: &str) -> String {
    kit::eventually(&format!("{ns}/{name} Ready reason {reason}"), || async {
        condition(c, resource, ns, name, "Ready").is_some_and(|r| r["reason"] == reason)
    })
    .await;
    condition(c, resource, ns, name, "Ready").unwrap()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn stamp(p: &Path) -> (u64, i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_namespaces_using_the_same_names_never_see_each_other() {
    let c = Cluster::start().await;
    for ns in NAMESPACES {
        store(&c, ns, "STORED", &stored_value(ns));
    }
    store(&c, "team-a", "ONLY_A", ONLY_A_STORED);
    let _op = c.operator("a", &[]);
    let mut parts: Vec<String> = NAMESPACES.iter().flat_map(|ns| twin(ns)).collect();
    parts.push(instance("team-c", "alice", "coder"));
    parts.extend(bob_asks_for_team_a());
    // team-b tries to render into team-a's env dir.
    parts.push(instance_with(
        "team-b",
        "mallory",
        "coder",
        "envDir:\n  path: team-a/alice",
    ));
    for o in objects(&parts) {
        c.apply(o).await;
    }
    for ns in ["team-a", "team-b", "team-c"] {
        c.ready(ns, "alice").await;
    }
    check_twins(&c.root());
    let msg = reason_is(&c, "agentinstances", "team-b", "bob", "MissingSecret").await;
    assert!(
        msg.contains("ONLY_A") && msg.contains("tokens/ONLY_A_KEY"),
        "{msg}"
    );
    let msg = reason_is(&c, "agentinstances", "team-b", "mallory", "InvalidObject").await;
    assert!(
        msg.contains("field spec.envDir.path") && msg.contains("must lie under team-b/"),
        "{msg}"
    );
    // bob may have rendered before its McpServer arrived; never after.
    let bob = kit::read_json(&c.root().join("team-b/bob/.claude.json"));
    assert!(bob.is_null() || bob == json!({"mcpServers": {}}), "{bob}");

    // A Secret change in team-a re-renders team-a and leaves team-b alone.
    let b_claude = c.root().join("team-b/alice/.claude.json");
    let b_before = stamp(&b_claude);
    c.apply(kit::labelled_secret(
        "team-a",
        "tokens",
        "TOKEN",
        "team-a-rotated-2b6e",
        true,
    ))
    .await;
    kit::eventually("team-a/alice gets the new token", || async {
        kit::read_json(&c.root().join("team-a/alice/.claude.json"))["mcpServers"]["forgejo"]
            ["headers"]["X-Keyed"]
            == "team-a-rotated-2b6e"
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(stamp(&b_claude), b_before, "team-b/alice was rewritten");
    assert_eq!(
        read(&c.root().join("team-b/alice"), ".claude.json"),
        expected("team-b").1
    );

    // A three-part placeholder naming team-a is refused on the object and
    // holds team-b/alice back with its last good render.
    let b_files = contents(&c.root().join("team-b"));
    c.apply(kit::mcp(
        "team-b",
        "steal",
        json!({"instance": "alice"}),
        "${SECRET:team-a/tokens/TOKEN}",
    ))
    .await;
    let msg = reason_is(&c, "mcpservers", "team-b", "steal", "InvalidObject").await;
    assert!(
        msg.contains("field spec.http.headers.Authorization")
            && msg.contains("malformed secret placeholder"),
        "{msg}"
    );
    let msg = reason_is(&c, "agentinstances", "team-b", "alice", "InvalidObject").await;
    assert!(msg.contains("McpServer team-b/steal"), "{msg}");
    assert_eq!(contents(&c.root().join("team-b")), b_files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_cluster_env_dirs_never_overlap() {
    let c = Cluster::start().await;
    let _op = c.operator("a", &[]);
    c.apply(kit::binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(kit::instance("team-a", "alice", "coder", json!({})))
        .await;
    c.ready("team-a", "alice").await;
    let alice = contents(&c.root().join("team-a/alice"));

    // An env dir inside alice's: both are held back, nothing is written.
    c.apply(kit::instance(
        "team-a",
        "eve",
        "coder",
        json!({"envDir": {"path": "team-a/alice/eve"}}),
    ))
    .await;
    let msg = reason_is(&c, "agentinstances", "team-a", "eve", "InvalidObject").await;
    assert!(
        msg.contains("lies inside the env dir of AgentInstance team-a/alice"),
        "{msg}"
    );
    let msg = reason_is(&c, "agentinstances", "team-a", "alice", "InvalidObject").await;
    assert!(
        msg.contains("holds the env dir of AgentInstance team-a/eve"),
        "{msg}"
    );
    assert_eq!(contents(&c.root().join("team-a/alice")), alice);

    // Moved to a dir of its own: both render.
    c.apply(kit::instance(
        "team-a",
        "eve",
        "coder",
        json!({"envDir": {"path": "team-a/eve-dir"}}),
    ))
    .await;
    c.ready("team-a", "alice").await;
    c.ready("team-a", "eve").await;

    // The same dir as alice's, spelled with another case and a trailing slash.
    c.apply(kit::instance(
        "team-a",
        "frank",
        "coder",
        json!({"envDir": {"path": "team-a/Alice/"}}),
    ))
    .await;
    for name in ["alice", "frank"] {
        let msg = reason_is(&c, "agentinstances", "team-a", name, "InvalidObject").await;
        assert!(msg.contains("is also used by AgentInstance"), "{msg}");
    }
    assert!(!c.root().join("team-a/Alice").exists());
}
