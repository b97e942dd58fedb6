//! Secret hygiene. A fleet full of secrets (labelled Secrets given as
//! `stringData` and as base64 `data`, encrypted-store entries, several
//! namespaces, MCP servers with secrets in `url`, `args`, `env` and
//! `headers`, builtin servers, a runtime install carrying a token, secrets
//! that must never be used at all) goes through every command of the CLI
//! with `--log trace`, on a host and with `agent-env run` against the API
//! double. Then every byte the operator produced is scanned for every secret
//! value, in every encoding a leak could take: stdout, stderr, the logs, the
//! metrics endpoint, every object version written to the API (status,
//! events, leases), every file under the env root (the state database with
//! its `-wal`/`-shm`, copied while the process runs too, backups, temp
//! files) and the temp dir the processes were given.
//!
//! The one place plaintext belongs is the rendered `.claude.json`: in it,
//! only the fields a placeholder was substituted into (and the runtime
//! install's own token fields) are blanked before the scan. A moved-aside
//! backup of a `.claude.json` is the agent's own file as it was on disk, so
//! it may hold the values rendered into that same instance, and only those:
//! it is scanned for every other value, and must be mode 0600. `secret get`
//! is designed to print a value: only its stdout is left out.

mod common;
#[path = "common/kube.rs"]
mod kit;

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{agent_env, files_under};
use serde_json::{Value, json};

// ---- The scanner ----

/// 32 random hex digits: unique to this run, so any occurrence is a leak.
fn token() -> String {
    let s = std::collections::hash_map::RandomState::new();
    format!("{:016x}{:016x}", s.hash_one(1u8), s.hash_one(2u8))
}

/// A secret value: text around a random token. The token survives plain
/// text, JSON and Rust string escaping, percent-encoding and logging as it
/// is; the other encodings are derived from it.
#[derive(Clone, Debug)]
struct Secret {
    label: &'static str,
    value: String,
    token: String,
}

impl Secret {
    fn new(label: &'static str, before: &str, after: &str) -> Secret {
        let token = token();
        Secret {
            label,
            value: format!("{before}{token}{after}"),
            token,
        }
    }
}

/// Every form of `s` a leak could take, by name. Base64 is matched at each
/// of the three byte alignments, so a value inside a larger encoded blob
/// (a whole file, a Secret's data) is found too.
fn forms(s: &Secret) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![
        ("plain".to_owned(), s.value.clone().into_bytes()),
        ("token".to_owned(), s.token.clone().into_bytes()),
        (
            "JSON-escaped".to_owned(),
            serde_json::to_string(&s.value)
                .unwrap()
                .trim_matches('"')
                .as_bytes()
                .to_vec(),
        ),
        (
            "hex".to_owned(),
            hex(s.token.as_bytes()).to_lowercase().into_bytes(),
        ),
        (
            "HEX".to_owned(),
            hex(s.token.as_bytes()).to_uppercase().into_bytes(),
        ),
    ];
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    for (name, engine) in [("base64", &STANDARD), ("base64url", &URL_SAFE)] {
        for shift in 0..3 {
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(s.token.as_bytes());
            let enc = engine.encode(&shifted);
            // The first group mixes in the bytes before the token (when
            // shifted), the last one what follows it: keep what lies between.
            let start = if shift == 0 { 0 } else { 4 };
            let stable = &enc[start..enc.len() - 4];
            out.push((format!("{name}+{shift}"), stable.as_bytes().to_vec()));
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The first form of a secret in `hay`, as (label, form).
fn find(hay: &[u8], secrets: &[&Secret]) -> Option<(&'static str, String)> {
    secrets.iter().find_map(|s| {
        forms(s)
            .into_iter()
            .find(|(_, f)| hay.windows(f.len()).any(|w| w == f.as_slice()))
            .map(|(form, _)| (s.label, form))
    })
}

#[test]
fn the_scanner_finds_a_planted_value_in_every_form() {
    let s = Secret::new("planted", "q\"uo\\te\n", "-\t<&>");
    let all = [&s];
    let around = |inner: &[u8]| {
        let mut v = b"{\"some\": \"text before\", \"x\": \"".to_vec();
        v.extend_from_slice(inner);
        v.extend_from_slice(b"\", \"after\": 1}");
        v
    };
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let mut planted: Vec<(String, Vec<u8>)> = vec![
        ("plain".into(), around(s.value.as_bytes())),
        (
            "JSON".into(),
            serde_json::to_vec(&json!({"a": {"b": [s.value.clone()]}})).unwrap(),
        ),
        ("Debug".into(), format!("{:?}", s.value).into_bytes()),
        ("hex".into(), hex(&around(s.value.as_bytes())).into_bytes()),
        (
            "HEX".into(),
            hex(s.value.as_bytes()).to_uppercase().into_bytes(),
        ),
        (
            "percent".into(),
            percent_encoding::utf8_percent_encode(&s.value, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
                .into_bytes(),
        ),
    ];
    // Base64 of the value inside a larger blob, at every offset.
    for prefix in 0..6 {
        let mut blob = vec![b'x'; prefix];
        blob.extend_from_slice(s.value.as_bytes());
        blob.extend_from_slice(b"tail");
        for (name, enc) in [
            ("base64", STANDARD.encode(&blob)),
            ("base64 no pad", STANDARD_NO_PAD.encode(&blob)),
            ("base64url", URL_SAFE_NO_PAD.encode(&blob)),
        ] {
            planted.push((
                format!("{name} after {prefix} bytes"),
                around(enc.as_bytes()),
            ));
        }
    }
    for (what, hay) in &planted {
        assert!(find(hay, &all).is_some(), "not found: {what}");
    }
    // A near miss is not a hit.
    let mut near = s.token.clone().into_bytes();
    near[10] = if near[10] == b'0' { b'1' } else { b'0' };
    assert!(find(&around(&near), &all).is_none());
    assert!(find(b"", &all).is_none());
}

// ---- What was produced ----

/// Everything the operator produced, to be scanned.
#[derive(Default)]
struct Produced {
    /// (what, bytes).
    items: Vec<(String, Vec<u8>)>,
    /// Moved-aside `.claude.json` files: (what, bytes, instance dir).
    backups: Vec<(String, Vec<u8>, String)>,
}

impl Produced {
    fn add(&mut self, what: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.items.push((what.into(), bytes.into()));
    }

    /// Every file under `dir`, `.claude.json` files with their substituted
    /// fields blanked (see the module docs), backups of them checked and
    /// scanned against everything their instance was not given.
    fn add_tree(&mut self, what: &str, dir: &Path, fleet: &Fleet) {
        for f in files_under(dir) {
            let rel = f.strip_prefix(dir).unwrap().display().to_string();
            let bytes = std::fs::read(&f).unwrap();
            let label = format!("{what}: {rel}");
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let inst = f
                .parent()
                .and_then(|p| p.strip_prefix(dir).ok())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            if name == ".claude.json" {
                let mut v: Value = serde_json::from_slice(&bytes).unwrap();
                fleet.blank(&inst, &mut v);
                self.add(label, serde_json::to_vec(&v).unwrap());
            } else if name.starts_with(".claude.json.corrupt-") {
                let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{label} is readable by others");
                self.backups.push((label, bytes, inst));
            } else {
                self.add(label, bytes);
            }
        }
    }
}

/// Every secret of a fleet, and where each may legitimately be.
struct Fleet {
    secrets: Vec<Secret>,
    /// Per instance dir (`ns/name`), the JSON pointers into its
    /// `.claude.json` that a secret was substituted into (or, for a
    /// runtime install, that hold its own token).
    substituted: BTreeMap<String, Vec<String>>,
    /// Per instance dir, the labels of the secrets rendered into it.
    given: BTreeMap<String, Vec<&'static str>>,
}

impl Fleet {
    fn secret(&self, label: &str) -> &Secret {
        self.secrets
            .iter()
            .find(|s| s.label == label)
            .unwrap_or_else(|| panic!("no secret {label}"))
    }

    fn value(&self, label: &str) -> String {
        self.secret(label).value.clone()
    }

    fn blank(&self, inst: &str, v: &mut Value) {
        for p in self.substituted.get(inst).into_iter().flatten() {
            if let Some(x) = v.pointer_mut(p) {
                *x = Value::String(String::new());
            }
        }
    }

    fn all(&self) -> Vec<&Secret> {
        self.secrets.iter().collect()
    }

    fn not_given_to(&self, inst: &str) -> Vec<&Secret> {
        let given = self.given.get(inst).cloned().unwrap_or_default();
        self.secrets
            .iter()
            .filter(|s| !given.contains(&s.label))
            .collect()
    }
}

impl Produced {
    /// Panics naming every leak.
    fn scan(&self, fleet: &Fleet, master_keys: &[String]) {
        let mut keys: Vec<Secret> = master_keys
            .iter()
            .map(|k| Secret {
                label: "master key",
                value: k.clone(),
                token: k.clone(),
            })
            .collect();
        keys.retain(|k| !k.value.is_empty());
        let mut leaks = Vec::new();
        for (what, bytes) in &self.items {
            let mut all = fleet.all();
            // Key files hold the key, by design.
            if !what.ends_with(".key") {
                all.extend(keys.iter());
            }
            for s in all {
                if let Some((label, form)) = find(bytes, &[s]) {
                    leaks.push(format!("{what} holds {label} ({form})"));
                }
            }
        }
        // The key's raw bytes, too (a database holding the key itself).
        let raw: Vec<Vec<u8>> = master_keys
            .iter()
            .filter_map(|k| base64::engine::general_purpose::STANDARD.decode(k).ok())
            .collect();
        assert!(!raw.is_empty() || master_keys.is_empty());
        for (what, bytes) in &self.items {
            for r in &raw {
                if find_bytes(bytes, r) || find_bytes(bytes, hex(r).as_bytes()) {
                    leaks.push(format!("{what} holds the master key's raw bytes"));
                }
            }
        }
        for (what, bytes, inst) in &self.backups {
            for s in fleet.not_given_to(inst) {
                if let Some((label, form)) = find(bytes, &[s]) {
                    leaks.push(format!("{what} holds {label} ({form})"));
                }
            }
        }
        assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    }
}

// ---- Running the binary ----

/// One run's exit code and output.
struct Ran {
    code: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl Ran {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    fn rows(&self) -> Vec<Value> {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON rows ({e}): {}\n{}", self.out(), self.err()))
    }

    fn row(&self, ns: &str, name: &str) -> Value {
        self.rows()
            .into_iter()
            .find(|r| r["namespace"] == ns && r["name"] == name)
            .unwrap_or_else(|| panic!("no row {ns}/{name}: {}", self.out()))
    }
}

/// A scratch dir (manifests, config dir, env root, the processes' temp dir)
/// and everything the commands run in it produced.
struct Scratch {
    dir: tempfile::TempDir,
    produced: Produced,
    runs: usize,
}

impl Scratch {
    fn new() -> Scratch {
        let s = Scratch {
            dir: tempfile::tempdir().unwrap(),
            produced: Produced::default(),
            runs: 0,
        };
        for d in ["manifests", "config", "tmp", "root"] {
            std::fs::create_dir_all(s.path(d)).unwrap();
        }
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn p(&self, rel: &str) -> String {
        self.path(rel).display().to_string()
    }

    /// Runs `agent-env args...` with `TMPDIR` set to the scratch temp dir;
    /// its stdout and stderr are kept for the scan.
    fn run(&mut self, args: &[&str], stdin: Option<&str>) -> Ran {
        self.run_keeping(args, stdin, true)
    }

    /// As [`Self::run`]; `scan_stdout` false leaves stdout out of the scan
    /// (only for a command designed to print a secret).
    fn run_keeping(&mut self, args: &[&str], stdin: Option<&str>, scan_stdout: bool) -> Ran {
        let mut cmd = agent_env();
        cmd.args(args)
            .env("TMPDIR", self.path("tmp"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            // A command that refuses its arguments exits without reading.
            let _ = input.write_all(s.as_bytes());
        }
        drop(input);
        let out = child.wait_with_output().unwrap();
        self.runs += 1;
        let what = format!("run {}: agent-env {}", self.runs, args.join(" "));
        if scan_stdout {
            self.produced
                .add(format!("{what}: stdout"), out.stdout.clone());
        }
        self.produced
            .add(format!("{what}: stderr"), out.stderr.clone());
        Ran {
            code: out.status.code().unwrap_or(-1),
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }

    /// Writes one manifest file of JSON documents (valid YAML).
    fn manifest(&self, name: &str, docs: &[Value]) {
        let text: Vec<String> = docs
            .iter()
            .map(|d| serde_json::to_string_pretty(d).unwrap())
            .collect();
        std::fs::write(
            self.path("manifests").join(format!("{name}.yaml")),
            text.join("\n---\n"),
        )
        .unwrap();
    }

    fn env_json(&self, rel: &str) -> Value {
        kit::read_json(&self.path("root").join(rel))
    }

    fn write_env_json(&self, rel: &str, v: &Value) {
        std::fs::write(
            self.path("root").join(rel),
            serde_json::to_vec_pretty(v).unwrap(),
        )
        .unwrap();
    }

    /// The state database files under `root` (with `-wal`/`-shm` while a
    /// process has them open), copied now.
    fn copy_state(&mut self, when: &str, root: &Path) {
        for f in files_under(&root.join(".agent-env")) {
            if let Ok(bytes) = std::fs::read(&f) {
                let name = f.file_name().unwrap().to_string_lossy().into_owned();
                self.produced.add(format!("{when}: {name}"), bytes);
            }
        }
    }
}

fn master_key(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|k| k.trim().to_owned())
        .unwrap_or_default()
}

// ---- Objects ----

fn instance(ns: &str, name: &str, agent_type: &str, extra: Value) -> Value {
    kit::instance(ns, name, agent_type, extra)
}

/// An McpServer; `server` holds its `stdio`, `http` or `sse` field.
fn mcp(ns: &str, name: &str, target: Value, server: Value) -> Value {
    let mut spec = json!({"target": target});
    spec.as_object_mut()
        .unwrap()
        .extend(server.as_object().unwrap().clone());
    json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "McpServer",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    })
}

/// A Secret: `string_data` as `stringData`, `data` base64-encoded as `data`.
fn secret(
    ns: &str,
    name: &str,
    labelled: bool,
    string_data: &[(&str, &str)],
    data: &[(&str, &str)],
) -> Value {
    let mut s = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
    });
    if labelled {
        s["metadata"]["labels"] = json!({"agentenv.io/secrets": "true"});
    }
    if !string_data.is_empty() {
        s["stringData"] = string_data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), json!(v)))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    if !data.is_empty() {
        s["data"] = data
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_owned(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    s
}

fn ptrs(list: &[&str]) -> Vec<String> {
    list.iter().map(|p| format!("/mcpServers/{p}")).collect()
}

/// Polls `check` for up to 30 s.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A free loopback port.
fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A plain HTTP/1.0 GET: (status line, whole response).
fn http_get(addr: &str, path: &str) -> Option<(String, Vec<u8>)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let status = String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    Some((status, buf))
}

fn sigterm(child: &std::process::Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
}

// ---- On a host ----

fn host_secrets() -> Vec<Secret> {
    vec![
        Secret::new("dev LAB_PLAIN", "lab-", ""),
        Secret::new("dev LAB_QUOTE", "q\"uo'te-", ""),
        Secret::new("dev LAB_NL", "back\\slash\nnl-", ""),
        Secret::new("dev LAB_B64", "b64 ", " <&>"),
        Secret::new("prod LAB_PLAIN", "prod-lab-", ""),
        Secret::new("dev NEVER (unlabelled)", "unlabelled-", ""),
        Secret::new("dev UNSAFE", "uns${HOME}-", ""),
        Secret::new("dev DUP 1", "dup1-", ""),
        Secret::new("dev DUP 2", "dup2-", ""),
        Secret::new("dev STORE_A", "st-", ""),
        Secret::new("dev STORE_TAB", "st\t\u{fc}\"-", ""),
        Secret::new("prod STORE_A", "prod-st-", ""),
        Secret::new("dev BUILTIN", "bi-dev-", ""),
        Secret::new("prod BUILTIN", "bi-prod-", ""),
        Secret::new("ops BUILTIN", "bi-ops-", ""),
        Secret::new("ops GONE", "gone-", ""),
        Secret::new("refused by secret set", "set${X}-", ""),
        Secret::new("dev LAB_PLAIN rotated", "lab2-", ""),
        Secret::new("dev LAB_NL rotated", "nl2\\\"-", ""),
        Secret::new("dev LAB_PLAIN rotated again", "lab3-", ""),
        Secret::new("runtime install", "inst-", ""),
        Secret::new("broken YAML", "broken-yaml-", ""),
        Secret::new("broken YAML while running", "broken-run-", ""),
        Secret::new("bad base64", "bad-b64-", "!"),
    ]
}

fn host_fleet() -> Fleet {
    let mut substituted = BTreeMap::new();
    substituted.insert(
        "dev/alice".to_owned(),
        ptrs(&[
            "forgejo/url",
            "forgejo/headers/Authorization",
            "forgejo/headers/X-Keyed",
            "tools/args/0",
            "tools/args/1",
            "tools/env/TAB",
            "tools/env/PLAIN",
            "events/url",
            "events/headers/X-T",
            "builtin/headers/Authorization",
            // The runtime install's own token.
            "mine/headers/Authorization",
        ]),
    );
    substituted.insert(
        "prod/dave".to_owned(),
        ptrs(&[
            "forgejo/headers/Authorization",
            "tools/args/0",
            "builtin/headers/Authorization",
        ]),
    );
    substituted.insert(
        "ops/olga".to_owned(),
        ptrs(&["gone/env/G", "builtin/headers/Authorization"]),
    );
    let mut given = BTreeMap::new();
    given.insert(
        "dev/alice".to_owned(),
        vec![
            "dev LAB_PLAIN",
            "dev LAB_QUOTE",
            "dev LAB_NL",
            "dev LAB_B64",
            "dev STORE_A",
            "dev STORE_TAB",
            "dev BUILTIN",
            "dev LAB_PLAIN rotated",
            "dev LAB_NL rotated",
            "dev LAB_PLAIN rotated again",
            "runtime install",
        ],
    );
    given.insert(
        "prod/dave".to_owned(),
        vec!["prod LAB_PLAIN", "prod STORE_A", "prod BUILTIN"],
    );
    given.insert("ops/olga".to_owned(), vec!["ops BUILTIN", "ops GONE"]);
    Fleet {
        secrets: host_secrets(),
        substituted,
        given,
    }
}

/// The host fleet's objects; `plain` and `nl` are the current values of
/// dev's LAB_PLAIN and LAB_NL.
fn host_objects(f: &Fleet, plain: &str, nl: &str) -> Vec<Value> {
    let coder = json!({"agentType": "coder"});
    let v = |l: &str| f.value(l);
    vec![
        instance("dev", "alice", "coder", json!({})),
        instance("dev", "bob", "other", json!({})),
        instance("dev", "carl", "other", json!({})),
        instance("dev", "dan", "other", json!({})),
        instance("prod", "dave", "coder", json!({})),
        instance("ops", "olga", "other", json!({})),
        kit::binding("dev", "coders", coder.clone(), &["lint@tools"]),
        mcp(
            "dev",
            "forgejo",
            coder.clone(),
            json!({"http": {
                "url": "https://forgejo.example/mcp?t=${SECRET:LAB_QUOTE}",
                "headers": {
                    "Authorization": "Bearer ${SECRET:LAB_PLAIN}",
                    "X-Keyed": "${SECRET:b64/LAB_B64}",
                },
            }}),
        ),
        mcp(
            "dev",
            "tools",
            coder.clone(),
            json!({"stdio": {
                "command": "tools-mcp",
                "args": ["--token=${SECRET:STORE_A}", "${SECRET:LAB_NL}", "--verbose"],
                "env": {
                    "TAB": "${SECRET:STORE_TAB}",
                    "PLAIN": "${SECRET:creds/LAB_PLAIN}",
                    "HOME_DIR": "${HOME}",
                },
            }}),
        ),
        mcp(
            "dev",
            "events",
            json!({"instance": "alice"}),
            json!({"sse": {
                "url": "https://events.example/${SECRET:STORE_A}/stream",
                "headers": {"X-T": "${SECRET:LAB_NL}"},
            }}),
        ),
        mcp(
            "dev",
            "unsafe",
            json!({"instance": "bob"}),
            json!({"stdio": {"command": "u", "env": {"U": "${SECRET:UNSAFE}"}}}),
        ),
        mcp(
            "dev",
            "dup",
            json!({"instance": "carl"}),
            json!({"stdio": {"command": "d", "env": {"D": "${SECRET:DUP}"}}}),
        ),
        mcp(
            "dev",
            "never",
            json!({"instance": "dan"}),
            json!({"stdio": {"command": "n", "env": {"N": "${SECRET:unlabelled/NEVER}"}}}),
        ),
        mcp(
            "prod",
            "forgejo",
            coder.clone(),
            json!({"http": {
                "url": "https://forgejo.prod.example/mcp",
                "headers": {"Authorization": "Bearer ${SECRET:LAB_PLAIN}"},
            }}),
        ),
        mcp(
            "prod",
            "tools",
            coder,
            json!({"stdio": {"command": "tools-mcp", "args": ["${SECRET:STORE_A}"]}}),
        ),
        mcp(
            "ops",
            "gone",
            json!({"instance": "olga"}),
            json!({"stdio": {"command": "g", "env": {"G": "${SECRET:GONE}"}}}),
        ),
        secret(
            "dev",
            "creds",
            true,
            &[
                ("LAB_PLAIN", plain),
                ("LAB_QUOTE", &v("dev LAB_QUOTE")),
                ("LAB_NL", nl),
            ],
            &[],
        ),
        secret("dev", "b64", true, &[], &[("LAB_B64", &v("dev LAB_B64"))]),
        secret(
            "prod",
            "creds",
            true,
            &[("LAB_PLAIN", &v("prod LAB_PLAIN"))],
            &[],
        ),
        secret(
            "dev",
            "unlabelled",
            false,
            &[("NEVER", &v("dev NEVER (unlabelled)"))],
            &[],
        ),
        secret("dev", "unsafe", true, &[("UNSAFE", &v("dev UNSAFE"))], &[]),
        secret("dev", "dup1", true, &[("DUP", &v("dev DUP 1"))], &[]),
        secret("dev", "dup2", true, &[("DUP", &v("dev DUP 2"))], &[]),
    ]
}

const BUILTIN_MCP: &str = r#"{"mcpServers": {"builtin": {"type": "http", "url": "https://builtin.example/mcp", "headers": {"Authorization": "${SECRET:BUILTIN}"}}}}"#;

/// A Secret manifest that is not valid YAML, with a value on the bad line.
fn broken_yaml(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: broken\n  namespace: dev\n  labels:\n    agentenv.io/secrets: \"true\"\nstringData:\n  TOKEN: {value}: : [\n  OTHER: x\n"
    )
}

#[test]
fn no_command_on_a_host_leaks_a_secret() {
    let f = host_fleet();
    let v = |l: &str| f.value(l);
    let mut s = Scratch::new();
    let (root, manifests, config) = (s.p("root"), s.p("manifests"), s.p("config"));
    let state = ["--env-root", root.as_str()];
    let input = [
        "-f",
        manifests.as_str(),
        "--config",
        config.as_str(),
        "--env-root",
        root.as_str(),
        "--no-fsync",
    ];
    let trace = ["--log", "trace"];
    let cat = |parts: &[&[&str]]| -> Vec<String> {
        parts
            .iter()
            .flat_map(|p| p.iter().map(|x| (*x).to_owned()))
            .collect()
    };
    let run = |s: &mut Scratch, args: Vec<String>, stdin: Option<&str>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        s.run(&a, stdin)
    };
    std::fs::write(s.path("config/mcp-builtin.json"), BUILTIN_MCP).unwrap();
    s.manifest(
        "fleet",
        &host_objects(&f, &v("dev LAB_PLAIN"), &v("dev LAB_NL")),
    );
    let mut master_keys = Vec::new();

    // Commands that touch no secret, and a key for the rotation below.
    for args in [
        &["--help"][..],
        &["--version"],
        &["crd"],
        &["secret", "keygen"],
    ] {
        assert_eq!(s.run(args, None).code, 0, "{args:?}");
    }
    let new_key = s.p("new.key");
    assert_eq!(
        s.run(&["secret", "keygen", "--out", &new_key], None).code,
        0
    );

    // The encrypted store.
    for (ns, name, label) in [
        ("dev", "STORE_A", "dev STORE_A"),
        ("dev", "STORE_TAB", "dev STORE_TAB"),
        ("prod", "STORE_A", "prod STORE_A"),
        ("dev", "BUILTIN", "dev BUILTIN"),
        ("prod", "BUILTIN", "prod BUILTIN"),
        ("ops", "BUILTIN", "ops BUILTIN"),
        ("ops", "GONE", "ops GONE"),
    ] {
        let r = run(
            &mut s,
            cat(&[&["secret", "set", name, "-n", ns], &state, &trace]),
            Some(&v(label)),
        );
        assert_eq!(r.code, 0, "{}", r.err());
    }
    let key_file = s.path("root/.agent-env/master.key");
    master_keys.push(master_key(&key_file));
    let r = run(
        &mut s,
        cat(&[&["secret", "set", "BAD", "-n", "dev"], &state, &trace]),
        Some(&v("refused by secret set")),
    );
    assert_eq!(r.code, 2, "a value holding '${{' is refused: {}", r.err());
    let r = run(
        &mut s,
        cat(&[&["secret", "set", "bad name", "-n", "dev"], &state]),
        Some(&v("refused by secret set")),
    );
    assert_eq!(r.code, 2);
    for extra in [&[][..], &["-o", "json"], &["-n", "dev", "--log", "trace"]] {
        let r = run(&mut s, cat(&[&["secret", "list"], extra, &state]), None);
        assert_eq!(r.code, 0, "{}", r.err());
    }
    // `secret get` prints the value by design: its stdout alone is not scanned.
    let args = cat(&[&["secret", "get", "STORE_TAB", "-n", "dev"], &state, &trace]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = s.run_keeping(&a, None, false);
    assert_eq!(r.out(), v("dev STORE_TAB"));
    let r = run(
        &mut s,
        cat(&[&["secret", "get", "STORE_A", "-n", "ops"], &state]),
        None,
    );
    assert_eq!(r.code, 1);

    // One pass, as a table and as JSON (JSON log lines once).
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once"], &input, &trace]),
        None,
    );
    assert_eq!(r.code, 1, "{}", r.err());
    let r = run(
        &mut s,
        cat(&[
            &["reconcile", "--once", "-o", "json", "--log-format", "json"],
            &input,
            &trace,
        ]),
        None,
    );
    for (ns, name, reason) in [
        ("dev", "alice", "UpToDate"),
        ("prod", "dave", "UpToDate"),
        ("ops", "olga", "UpToDate"),
        ("dev", "bob", "UnsafeSecretValue"),
        ("dev", "carl", "SecretConflict"),
        ("dev", "dan", "MissingSecret"),
    ] {
        assert_eq!(r.row(ns, name)["reason"], reason, "{ns}/{name}");
    }
    let claude = s.env_json("dev/alice/.claude.json");
    assert_eq!(
        claude["mcpServers"]["tools"]["env"]["TAB"],
        v("dev STORE_TAB")
    );
    assert_eq!(
        claude["mcpServers"]["forgejo"]["headers"]["X-Keyed"],
        v("dev LAB_B64")
    );

    // A runtime install carrying a token is adopted.
    let mut claude = s.env_json("dev/alice/.claude.json");
    claude["mcpServers"]["mine"] = json!({"type": "http", "url": "https://mine.example/mcp",
        "headers": {"Authorization": v("runtime install")}});
    s.write_env_json("dev/alice/.claude.json", &claude);
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once", "-o", "json"], &input, &trace]),
        None,
    );
    assert_eq!(r.row("dev", "alice")["adopted"], json!(["mcpServers.mine"]));

    // Drift on secret-bearing fields, then both Secrets used in `args` and
    // `url` change: `diff` shows old and new values of those entries.
    let mut claude = s.env_json("dev/alice/.claude.json");
    claude["mcpServers"]["forgejo"]["headers"]["Authorization"] = json!("tampered");
    claude["mcpServers"]["tools"]["args"][2] = json!("--quiet");
    s.write_env_json("dev/alice/.claude.json", &claude);
    let r = run(&mut s, cat(&[&["diff"], &input, &trace]), None);
    assert_eq!(r.code, 2, "bob, carl and dan are not ready: {}", r.out());
    assert!(r.out().contains("~ mcpServers.tools"), "{}", r.out());
    s.manifest(
        "fleet",
        &host_objects(&f, &v("dev LAB_PLAIN rotated"), &v("dev LAB_NL rotated")),
    );
    let r = run(&mut s, cat(&[&["diff"], &input, &trace]), None);
    assert!(r.out().contains("~ mcpServers.forgejo"), "{}", r.out());
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once"], &input, &trace]),
        None,
    );
    assert_eq!(r.code, 1);
    assert_eq!(
        s.env_json("dev/alice/.claude.json")["mcpServers"]["tools"]["args"][1],
        v("dev LAB_NL rotated")
    );

    // A wiped env dir: `diff` shows every entry as new, the adopted one too.
    std::fs::remove_dir_all(s.path("root/dev/alice")).unwrap();
    let r = run(&mut s, cat(&[&["diff"], &input, &trace]), None);
    assert!(r.out().contains("+ mcpServers.mine"), "{}", r.out());
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once"], &input, &trace]),
        None,
    );
    assert_eq!(r.code, 1);

    // Damaged files: a `.claude.json` cut short (moved aside, with the
    // values rendered into it), then owned keys that are not objects (the
    // file copied aside).
    let path = s.path("root/dev/alice/.claude.json");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() * 3 / 4]).unwrap();
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once", "-o", "json"], &input, &trace]),
        None,
    );
    assert!(
        r.row("dev", "alice")["warnings"]
            .to_string()
            .contains("CorruptFile"),
        "{}",
        r.out()
    );
    let mut claude = s.env_json("dev/alice/.claude.json");
    claude["mcpServers"] = json!("not an object");
    claude["userSetting"] = json!(true);
    s.write_env_json("dev/alice/.claude.json", &claude);
    let mut settings = s.env_json("dev/alice/settings.json");
    settings["enabledPlugins"] = json!(["not", "an", "object"]);
    s.write_env_json("dev/alice/settings.json", &settings);
    let r = run(&mut s, cat(&[&["diff"], &input, &trace]), None);
    assert_eq!(r.code, 2);
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once"], &input, &trace]),
        None,
    );
    assert_eq!(r.code, 1);

    // What the state holds.
    for args in [
        &["installed", "list"][..],
        &[
            "installed",
            "list",
            "dev/alice",
            "-o",
            "json",
            "--log",
            "trace",
        ],
        &["history", "dev/alice", "--log", "trace"],
        &["history", "dev/alice", "-o", "json"],
        &["history", "dev/bob", "-o", "json"],
        &["history", "dev/carl"],
        &["history", "dev/dan"],
    ] {
        let r = run(&mut s, cat(&[args, &state]), None);
        assert_eq!(r.code, 0, "{args:?}: {}", r.err());
    }
    // Why each instance renders what it does: values as declared, an
    // adopted install's value withheld, never a filled secret.
    for args in [
        &["explain", "dev/alice"][..],
        &["explain", "dev/alice", "-o", "json"],
        &["explain", "dev/alice", "mcp", "mine"],
        &["explain", "dev/bob", "-o", "json"],
    ] {
        let r = run(&mut s, cat(&[args, &input, &trace]), None);
        assert_eq!(r.code, 0, "{args:?}: {}", r.err());
    }
    let r = run(
        &mut s,
        cat(&[
            &["installed", "forget", "dev/alice", "mcp", "mine"],
            &state,
            &trace,
        ]),
        None,
    );
    assert_eq!(r.code, 0, "{}", r.err());
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once"], &input, &trace]),
        None,
    );
    assert_eq!(r.code, 1);

    // A new master key, then a deleted store entry.
    let r = run(
        &mut s,
        cat(&[
            &["secret", "rotate-key", "--new-key-file", &new_key],
            &state,
            &trace,
        ]),
        None,
    );
    assert_eq!(r.code, 0, "{}", r.err());
    master_keys.push(master_key(&key_file));
    assert_ne!(master_keys[0], master_keys[1]);
    let r = run(
        &mut s,
        cat(&[&["secret", "delete", "GONE", "-n", "ops"], &state, &trace]),
        None,
    );
    assert_eq!(r.code, 0, "{}", r.err());
    let r = run(
        &mut s,
        cat(&[&["secret", "delete", "GONE", "-n", "ops"], &state]),
        None,
    );
    assert_eq!(r.code, 1);
    let r = run(
        &mut s,
        cat(&[&["reconcile", "--once", "-o", "json"], &input, &trace]),
        None,
    );
    assert_eq!(r.row("ops", "olga")["reason"], "MissingSecret");

    // An init container's wait on a host: nothing to wait for.
    let dir = s.p("root/dev/alice");
    let r = s.run(
        &[
            "wait",
            "--env-dir",
            &dir,
            "--pod-uid",
            "0000",
            "--timeout",
            "200ms",
            "--log",
            "trace",
        ],
        None,
    );
    assert_eq!(r.code, 1);

    // Manifests that cannot be read, with values on the offending lines.
    std::fs::create_dir_all(s.path("broken")).unwrap();
    std::fs::write(s.path("broken/secret.yaml"), broken_yaml(&v("broken YAML"))).unwrap();
    std::fs::create_dir_all(s.path("badb64")).unwrap();
    std::fs::write(
        s.path("badb64/secret.yaml"),
        serde_json::to_string(&json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "b", "namespace": "dev", "labels": {"agentenv.io/secrets": "true"}},
            "data": {"X": v("bad base64")},
        }))
        .unwrap(),
    )
    .unwrap();
    for (cmd, dir) in [
        ("reconcile", "broken"),
        ("diff", "broken"),
        ("reconcile", "badb64"),
    ] {
        let once: &[&str] = if cmd == "reconcile" { &["--once"] } else { &[] };
        let d = s.p(dir);
        let r = run(
            &mut s,
            cat(&[&[cmd], once, &["-f", &d, "--env-root", &root], &trace]),
            None,
        );
        assert_eq!(r.code, 2, "{cmd} -f {dir}: {}", r.err());
        assert!(r.err().contains("secret.yaml"), "{}", r.err());
    }

    continuous(&mut s, &f, &input);

    // Every file under the env root and in the temp dir.
    let fleet = &f;
    let root_path = s.path("root");
    s.produced.add_tree("env root", &root_path, fleet);
    let tmp = s.path("tmp");
    s.produced.add_tree("temp dir", &tmp, fleet);
    // The scan runs on real data: plaintext is where it belongs.
    let claude = s.env_json("dev/alice/.claude.json");
    assert_eq!(
        claude["mcpServers"]["forgejo"]["headers"]["Authorization"],
        format!("Bearer {}", v("dev LAB_PLAIN rotated again"))
    );
    assert!(
        !s.produced.backups.is_empty(),
        "a .claude.json was moved aside"
    );
    assert!(
        s.produced.backups.iter().any(|(_, b, inst)| {
            let given: Vec<&Secret> = f.given[inst].iter().map(|l| f.secret(l)).collect();
            find(b, &given).is_some()
        }),
        "the cut .claude.json held the values rendered into it"
    );
    let trace_lines = s
        .produced
        .items
        .iter()
        .filter(|(w, b)| {
            w.ends_with("stderr")
                && (find_bytes(b, b" TRACE ") || find_bytes(b, b"\"level\":\"TRACE\""))
        })
        .count();
    assert!(trace_lines > 10, "--log trace logged at trace level");
    assert!(
        s.produced
            .items
            .iter()
            .any(|(w, b)| w.ends_with("state.db") && b.len() > 4096),
        "the state database was scanned"
    );
    s.produced.scan(&f, &master_keys);
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `reconcile` without `--once`: drift, a Secret change, a manifest that
/// does not parse, a wiped env dir, the metrics endpoint, SIGTERM. JSON log
/// lines at trace level; the state database copied while it is open.
fn continuous(s: &mut Scratch, f: &Fleet, input: &[&str]) {
    let v = |l: &str| f.value(l);
    let addr = free_addr();
    let log = s.path("continuous.log");
    let out = s.path("continuous.out");
    let mut child = agent_env()
        .args(["reconcile"])
        .args(input)
        .args([
            "--log",
            "trace",
            "--log-format",
            "json",
            "--metrics-addr",
            &addr,
            "--resync-interval",
            "1s",
            "--restart-command",
            "true {namespace} {name}",
        ])
        .env("TMPDIR", s.path("tmp"))
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let ready = || http_get(&addr, "/readyz").is_some_and(|(st, _)| st.contains(" 200"));
    eventually("the first pass", ready);
    let auth = |s: &Scratch| {
        s.env_json("dev/alice/.claude.json")["mcpServers"]["forgejo"]["headers"]["Authorization"]
            .clone()
    };

    // Drift put back.
    let mut claude = s.env_json("dev/alice/.claude.json");
    claude["mcpServers"]["forgejo"]["headers"]["Authorization"] = json!("tampered");
    s.write_env_json("dev/alice/.claude.json", &claude);
    let want = json!(format!("Bearer {}", v("dev LAB_PLAIN rotated")));
    eventually("drift put back", || auth(s) == want);

    // A Secret value changes.
    s.manifest(
        "fleet",
        &host_objects(
            f,
            &v("dev LAB_PLAIN rotated again"),
            &v("dev LAB_NL rotated"),
        ),
    );
    let want = json!(format!("Bearer {}", v("dev LAB_PLAIN rotated again")));
    eventually("the new value rendered", || auth(s) == want);
    let root = s.path("root");
    s.copy_state("while running", &root);

    // A manifest that does not parse, with a value on the bad line.
    let broken = s.path("manifests/broken.yaml");
    std::fs::write(&broken, broken_yaml(&v("broken YAML while running"))).unwrap();
    eventually("the bad manifest logged", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("cannot read the manifests"))
    });
    std::fs::remove_file(&broken).unwrap();

    // A wiped env dir comes back (prod's: dev/alice keeps its backups).
    std::fs::remove_dir_all(s.path("root/prod/dave")).unwrap();
    let dave = json!(format!("Bearer {}", v("prod LAB_PLAIN")));
    eventually("the env dir rendered again", || {
        s.env_json("prod/dave/.claude.json")["mcpServers"]["forgejo"]["headers"]["Authorization"]
            == dave
    });
    s.copy_state("while running, after a wipe", &root);
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, body) = http_get(&addr, path).unwrap();
        assert!(status.contains(" 200"), "{path}: {status}");
        s.produced.add(format!("GET {path}"), body);
    }
    sigterm(&child);
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    s.produced.add(
        "reconcile (continuous): stderr",
        std::fs::read(&log).unwrap(),
    );
    s.produced.add(
        "reconcile (continuous): stdout",
        std::fs::read(&out).unwrap(),
    );
}

// ---- In a cluster ----

fn cluster_fleet() -> Fleet {
    let secrets = vec![
        Secret::new("team-a TOKEN", "cl\"q-", ""),
        Secret::new("team-a NL", "cl\\\nnl-", ""),
        Secret::new("team-b TOKEN", "clb-", ""),
        Secret::new("team-a unlabelled", "cl-unl-", ""),
        Secret::new("team-a STORED", "cl-st-", ""),
        Secret::new("team-b STORED", "clb-st\t-", ""),
        Secret::new("team-a BUILTIN", "cl-bi-", ""),
        Secret::new("team-b BUILTIN", "clb-bi-", ""),
        Secret::new("team-a UNSAFE", "cl-u${X}-", ""),
        Secret::new("team-a TOKEN rotated", "cl-rot\"-", ""),
        Secret::new("runtime install", "cl-inst-", ""),
    ];
    let mut substituted = BTreeMap::new();
    substituted.insert(
        "team-a/alice".to_owned(),
        ptrs(&[
            "forgejo/url",
            "forgejo/headers/Authorization",
            "forgejo/headers/X-NL",
            "tools/args/0",
            "tools/env/S",
            "builtin/headers/Authorization",
            "mine/headers/Authorization",
        ]),
    );
    substituted.insert(
        "team-b/carol".to_owned(),
        ptrs(&[
            "forgejo/headers/Authorization",
            "tools/args/0",
            "builtin/headers/Authorization",
        ]),
    );
    let mut given = BTreeMap::new();
    given.insert(
        "team-a/alice".to_owned(),
        vec![
            "team-a TOKEN",
            "team-a NL",
            "team-a STORED",
            "team-a BUILTIN",
            "team-a TOKEN rotated",
            "runtime install",
        ],
    );
    given.insert(
        "team-b/carol".to_owned(),
        vec!["team-b TOKEN", "team-b STORED", "team-b BUILTIN"],
    );
    // bob and dan never render their own servers, but may render the
    // builtin one before those arrive: watches deliver in no fixed order.
    for inst in ["team-a/bob", "team-a/dan"] {
        substituted.insert(inst.to_owned(), ptrs(&["builtin/headers/Authorization"]));
        given.insert(inst.to_owned(), vec!["team-a BUILTIN"]);
    }
    Fleet {
        secrets,
        substituted,
        given,
    }
}

fn cluster_objects(f: &Fleet) -> Vec<Value> {
    let v = |l: &str| f.value(l);
    let coder = json!({"agentType": "coder"});
    vec![
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "agent-env-builtin", "namespace": kit::OPERATOR_NS},
            "data": {"mcp-builtin.json": BUILTIN_MCP},
        }),
        instance(
            "team-a",
            "alice",
            "coder",
            json!({
                "workload": {"kind": "Deployment", "name": "agent-alice"},
                "restart": {"onDrift": true, "minInterval": "1s"},
            }),
        ),
        instance("team-a", "bob", "other", json!({})),
        instance("team-a", "dan", "other", json!({})),
        instance("team-b", "carol", "coder", json!({})),
        kit::pod("team-a", "agent-alice-1", "alice"),
        mcp(
            "team-a",
            "forgejo",
            coder.clone(),
            json!({"http": {
                "url": "https://forgejo.example/${SECRET:STORED}/mcp",
                "headers": {"Authorization": "Bearer ${SECRET:TOKEN}", "X-NL": "${SECRET:creds/NL}"},
            }}),
        ),
        mcp(
            "team-a",
            "tools",
            coder.clone(),
            json!({"stdio": {"command": "tools-mcp", "args": ["${SECRET:TOKEN}"],
                "env": {"S": "${SECRET:STORED}"}}}),
        ),
        mcp(
            "team-a",
            "unsafe",
            json!({"instance": "bob"}),
            json!({"stdio": {"command": "u", "env": {"U": "${SECRET:UNSAFE}"}}}),
        ),
        mcp(
            "team-a",
            "never",
            json!({"instance": "dan"}),
            json!({"stdio": {"command": "n", "env": {"N": "${SECRET:plain/TOKEN2}"}}}),
        ),
        mcp(
            "team-b",
            "forgejo",
            coder.clone(),
            json!({"http": {"url": "https://forgejo.b.example/mcp",
                "headers": {"Authorization": "${SECRET:TOKEN}"}}}),
        ),
        mcp(
            "team-b",
            "tools",
            coder,
            json!({"stdio": {"command": "tools-mcp", "args": ["${SECRET:STORED}"]}}),
        ),
        secret(
            "team-a",
            "creds",
            true,
            &[("TOKEN", &v("team-a TOKEN"))],
            &[("NL", &v("team-a NL"))],
        ),
        secret(
            "team-b",
            "creds",
            true,
            &[("TOKEN", &v("team-b TOKEN"))],
            &[],
        ),
        secret(
            "team-a",
            "plain",
            false,
            &[("TOKEN2", &v("team-a unlabelled"))],
            &[],
        ),
        secret(
            "team-a",
            "unsafe",
            true,
            &[("UNSAFE", &v("team-a UNSAFE"))],
            &[],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_command_in_a_cluster_leaks_a_secret() {
    let f = cluster_fleet();
    let v = |l: &str| f.value(l);
    let c = kit::Cluster::start().await;
    let mut s = Scratch::new();
    let root = c.root().display().to_string();
    let state = ["--env-root", root.as_str(), "--log", "trace"];
    let with_state = |args: &[&str]| -> Vec<String> {
        args.iter()
            .chain(state.iter())
            .map(|x| (*x).to_owned())
            .collect()
    };
    let run = |s: &mut Scratch, args: Vec<String>, stdin: Option<&str>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        s.run(&a, stdin)
    };
    for (ns, name) in [
        ("team-a", "STORED"),
        ("team-b", "STORED"),
        ("team-a", "BUILTIN"),
        ("team-b", "BUILTIN"),
    ] {
        let r = run(
            &mut s,
            with_state(&["secret", "set", name, "-n", ns]),
            Some(&v(&format!("{ns} {name}"))),
        );
        assert_eq!(r.code, 0, "{}", r.err());
    }
    let master_keys = vec![master_key(&c.root().join(".agent-env/master.key"))];

    let addr = free_addr();
    let tmp = s.path("tmp");
    let mut op = c.operator_with_env(
        "a",
        &["--log", "trace", "--metrics-addr", &addr],
        &[("TMPDIR", &tmp)],
    );
    for o in cluster_objects(&f) {
        c.apply(o).await;
    }
    c.ready("team-a", "alice").await;
    c.ready("team-b", "carol").await;
    for (name, reason) in [("bob", "UnsafeSecretValue"), ("dan", "MissingSecret")] {
        kit::eventually(&format!("{name}: {reason}"), || async {
            c.condition("team-a", name, "Ready")
                .is_some_and(|r| r["reason"] == reason)
        })
        .await;
    }
    let claude = |rel: &str| kit::read_json(&c.root().join(rel).join(".claude.json"));
    let auth =
        || claude("team-a/alice")["mcpServers"]["forgejo"]["headers"]["Authorization"].clone();
    assert_eq!(auth(), json!(format!("Bearer {}", v("team-a TOKEN"))));

    // Drift put back (and the pod evicted); a runtime install adopted.
    let file = c.root().join("team-a/alice/.claude.json");
    let mut edited = claude("team-a/alice");
    edited["mcpServers"]["forgejo"]["headers"]["Authorization"] = json!("tampered");
    edited["mcpServers"]["mine"] = json!({"type": "http", "url": "https://mine.example/mcp",
        "headers": {"Authorization": v("runtime install")}});
    std::fs::write(&file, serde_json::to_vec_pretty(&edited).unwrap()).unwrap();
    let want = json!(format!("Bearer {}", v("team-a TOKEN")));
    kit::eventually("drift put back", || async { auth() == want }).await;
    kit::eventually("the install adopted", || async {
        c.instance_json("team-a", "alice")
            .is_some_and(|o| o["status"].to_string().contains("mine"))
    })
    .await;

    // A Secret's value changes.
    c.apply(secret(
        "team-a",
        "creds",
        true,
        &[("TOKEN", &v("team-a TOKEN rotated"))],
        &[("NL", &v("team-a NL"))],
    ))
    .await;
    let want = json!(format!("Bearer {}", v("team-a TOKEN rotated")));
    kit::eventually("the new value rendered", || async { auth() == want }).await;

    // A new pod's init container waits for its marker.
    c.apply(kit::pod("team-a", "agent-alice-2", "alice")).await;
    let uid = c
        .server
        .get("", "pods", Some("team-a"), "agent-alice-2")
        .unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = c.root().join("team-a/alice").display().to_string();
    let r = run(
        &mut s,
        vec![
            "wait".into(),
            "--env-dir".into(),
            dir,
            "--pod-uid".into(),
            uid,
            "--timeout".into(),
            "20s".into(),
            "--log".into(),
            "trace".into(),
        ],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.err());

    // The state commands against the running operator's database.
    for args in [
        &["history", "team-a/alice", "-o", "json"][..],
        &["history", "team-a/bob"],
        &["installed", "list", "-o", "json"],
        &["secret", "list"],
    ] {
        let r = run(&mut s, with_state(args), None);
        assert_eq!(r.code, 0, "{args:?}: {}", r.err());
    }
    s.copy_state("while running", &c.root());
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (status, body) = http_get(&addr, path).unwrap();
        assert!(status.contains(" 200"), "{path}: {status}");
        s.produced.add(format!("GET {path}"), body);
    }
    assert_eq!(op.stop(), 0, "{}", op.log());
    s.produced
        .add("run: stderr", std::fs::read(&op.log).unwrap());
    s.produced.add(
        "run: stdout",
        std::fs::read(c.dir.path().join("a.out")).unwrap(),
    );

    // Everything written to the API but the Secrets this test wrote: the
    // operator never writes a Secret.
    let writes = ["create", "update", "patch", "delete", "deletecollection"];
    let secret_writes: Vec<_> = c
        .server
        .requests()
        .into_iter()
        .filter(|r| r.user == "double-token" && r.resource == "secrets")
        .filter(|r| writes.contains(&r.verb.as_str()))
        .collect();
    assert!(secret_writes.is_empty(), "{secret_writes:?}");
    let mut statuses = 0;
    let mut events = 0;
    for (group, resource, ns, obj) in c.server.history() {
        if group.is_empty() && resource == "secrets" {
            continue;
        }
        statuses += usize::from(obj.get("status").is_some_and(|s| !s.is_null()));
        events += usize::from(resource == "events");
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        s.produced.add(
            format!("API: {group}/{resource} {ns}/{name}"),
            serde_json::to_vec(&obj).unwrap(),
        );
    }
    assert!(
        statuses > 10 && events > 3,
        "status and events were scanned"
    );

    s.produced.add_tree("env root", &c.root(), &f);
    s.produced.add_tree("temp dir", &tmp, &f);
    assert!(
        s.produced
            .items
            .iter()
            .any(|(w, b)| w == "run: stderr" && find_bytes(b, b" TRACE ")),
        "the operator logged at trace level"
    );
    s.produced.scan(&f, &master_keys);
}
