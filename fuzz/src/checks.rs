//! Invariants of manifest loading, the owned-key merge and secret
//! placeholders, checked on arbitrary input. Each entry point panics when an
//! invariant breaks. The fuzz targets call them, and so does the stable test
//! `tests/fuzz_corpus.rs` (through `#[path]`), on the committed seeds and on
//! every input that once broke an invariant, so what fuzzing found stays fixed.
//!
//! Only the library's public API, `serde`, `serde_json` and `futures` are
//! used here: the file compiles in the fuzz crate and in the root crate's tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use agent_env_operator::crd::Scope;
use agent_env_operator::engine::builtin::Builtin;
use agent_env_operator::engine::merge::{self, Document};
use agent_env_operator::engine::resolve;
use agent_env_operator::engine::secrets::{
    self, LabelledSecrets, Lookup, PLACEHOLDER_PREFIX, SecretProvider, SecretValue, UsedSecrets,
};
use agent_env_operator::engine::section::Section;
use agent_env_operator::engine::shape;
use agent_env_operator::engine::snapshot::{self, ObjectKey, Snapshot};
use agent_env_operator::host::manifest::{self, Loader, ManifestError, Object};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

// ---------------------------------------------------------------------------
// manifest

/// Input: the text of one manifest file (invalid UTF-8 is replaced).
///
/// Loading never panics; a refused file names itself and the document; every
/// accepted object obeys the rules the design puts on it and survives a
/// serialize/validate round trip unchanged; an object kept as invalid names
/// the field at fault; resolving what was accepted is deterministic.
pub fn manifest(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let file = Path::new("fuzz.yaml");
    let mut loader = Loader::default();
    match loader.add_file(file, &text) {
        Err(e) => check_manifest_error(&e),
        Ok(()) => check_snapshot(&loader.finish()),
    }
}

fn check_manifest_error(e: &ManifestError) {
    let msg = e.to_string();
    assert!(
        msg.contains("fuzz.yaml"),
        "error does not name the file: {msg}"
    );
    match e {
        ManifestError::Yaml { message, .. } => {
            assert!(!message.is_empty(), "empty YAML error: {msg}")
        }
        ManifestError::Document {
            source_doc,
            message,
        } => {
            assert!(source_doc.document >= 1, "{msg}");
            assert!(source_doc.line >= 1, "a file's document has a line: {msg}");
            assert!(msg.contains("(document "), "{msg}");
            assert!(!message.is_empty(), "{msg}");
        }
        ManifestError::Duplicate { first, second, .. } => {
            assert!(first.document < second.document, "{msg}")
        }
        ManifestError::Read { .. }
        | ManifestError::Foreign { .. }
        | ManifestError::KubectlMissing { .. }
        | ManifestError::Kustomize { .. } => {
            panic!("nothing is read from disk or built here: {msg}")
        }
        // Limits: each names the file and its limit.
        ManifestError::FileTooLarge { limit, .. } => {
            assert!(msg.contains(&limit.to_string()), "{msg}")
        }
        ManifestError::TooManyDocuments { limit, .. }
        | ManifestError::TooManyObjects { limit, .. } => {
            assert!(msg.contains(&limit.to_string()), "{msg}")
        }
    }
}

fn check_snapshot(snap: &Snapshot) {
    for (key, o) in &snap.instances {
        check_meta(key, o.metadata.name.as_ref(), o.metadata.namespace.as_ref());
        let path = snapshot::env_path(key, o);
        check_env_path(&path);
        round_trip("AgentInstance", o, |x| match x {
            Object::Instance(i) => Some(serde_json::to_value(i).unwrap()),
            _ => None,
        });
    }
    for (key, o) in &snap.bindings {
        check_meta(key, o.metadata.name.as_ref(), o.metadata.namespace.as_ref());
        assert!(
            o.spec.target.scope().is_some(),
            "binding {key} targets nothing"
        );
        let mut seen = BTreeSet::new();
        for p in &o.spec.plugins {
            assert!(
                shape::is_plugin_id(&p.name),
                "{key}: plugin id {:?}",
                p.name
            );
            assert!(seen.insert(&p.name), "{key}: {:?} listed twice", p.name);
        }
        round_trip("PluginBinding", o, |x| match x {
            Object::Binding(b) => Some(serde_json::to_value(b).unwrap()),
            _ => None,
        });
    }
    for (key, o) in &snap.marketplaces {
        check_meta(key, o.metadata.name.as_ref(), o.metadata.namespace.as_ref());
        assert!(
            o.spec.target.scope().is_some(),
            "marketplace {key} targets nothing"
        );
        let name = resolve::marketplace_name(o);
        assert!(
            shape::is_marketplace_name(&name),
            "{key}: marketplace name {name:?}"
        );
        let entry = shape::marketplace_entry(&o.spec.source);
        assert!(
            !shape::marketplace_source_is_empty(&entry),
            "{key}: empty source"
        );
        assert_eq!(
            shape::check_marketplace_entry(&entry),
            Ok(()),
            "{key}: rendered entry {entry}"
        );
        round_trip("PluginMarketplace", o, |x| match x {
            Object::Marketplace(m) => Some(serde_json::to_value(m).unwrap()),
            _ => None,
        });
    }
    for (key, o) in &snap.mcp_servers {
        check_meta(key, o.metadata.name.as_ref(), o.metadata.namespace.as_ref());
        assert!(
            o.spec.target.scope().is_some(),
            "MCP server {key} targets nothing"
        );
        let name = resolve::mcp_name(o);
        assert!(
            !name.is_empty() && name != shape::RESERVED_MCP_NAME,
            "{key}: MCP server name {name:?}"
        );
        // A declared server must render to an entry the builtin-file check
        // accepts too: one notion of a valid entry, whatever its origin.
        let entry = shape::mcp_entry(&o.spec);
        assert_eq!(
            shape::check_mcp_entry(&entry),
            Ok(()),
            "{key}: rendered entry {entry}"
        );
        assert!(
            secrets::check_entry_placeholders(&entry).is_ok(),
            "{key}: accepted with a malformed placeholder: {entry}"
        );
        round_trip("McpServer", o, |x| match x {
            Object::Mcp(m) => Some(serde_json::to_value(m).unwrap()),
            _ => None,
        });
    }
    for inv in &snap.invalid {
        assert!(
            inv.message.starts_with("field "),
            "an invalid object must name the field: {inv}"
        );
        assert!(
            inv.source.starts_with("fuzz.yaml:") && inv.source.contains(" (document "),
            "{inv}"
        );
    }

    // Resolution of what was accepted: deterministic, and each entry comes
    // from an object of the instance's own namespace and scopes.
    let index = snap.index();
    let builtin = Builtin::default();
    for (key, inst) in &snap.instances {
        let t = index.layer(&key.namespace, &Scope::Type(inst.spec.agent_type.clone()));
        let i = index.layer(&key.namespace, &Scope::Instance(key.name.clone()));
        let a = resolve::resolve_declared(&builtin, &inst.spec.agent_type, &t, &i);
        let b = resolve::resolve_declared(&builtin, &inst.spec.agent_type, &t, &i);
        assert_eq!(a, b, "resolution of {key} is not deterministic");
        for (_, entries) in a.sections.iter() {
            for entry in entries.values() {
                let obj = entry
                    .origin
                    .object()
                    .expect("no builtin or installed layer here");
                let in_ns = |kind: &str| match kind {
                    "PluginBinding" => snap
                        .bindings
                        .contains_key(&ObjectKey::new(&key.namespace, &obj.name)),
                    "PluginMarketplace" => snap
                        .marketplaces
                        .contains_key(&ObjectKey::new(&key.namespace, &obj.name)),
                    "McpServer" => snap
                        .mcp_servers
                        .contains_key(&ObjectKey::new(&key.namespace, &obj.name)),
                    _ => false,
                };
                assert!(
                    in_ns(obj.kind),
                    "{key} got an entry from {obj} outside its namespace"
                );
            }
        }
    }
}

/// The names the API server would accept: an object's name is a DNS
/// subdomain and its namespace a DNS label, so neither can steer an env dir.
fn check_meta(key: &ObjectKey, name: Option<&String>, namespace: Option<&String>) {
    assert_eq!(name, Some(&key.name));
    assert_eq!(namespace, Some(&key.namespace));
    assert!(is_dns_subdomain(&key.name), "accepted name {:?}", key.name);
    assert!(
        is_dns_label(&key.namespace),
        "accepted namespace {:?}",
        key.namespace
    );
}

// Written out again on purpose: the oracle does not share the code it checks.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn check_env_path(path: &str) {
    assert!(!path.is_empty(), "empty env dir path");
    assert!(!path.starts_with('/'), "absolute env dir path {path:?}");
    for seg in path.split('/') {
        assert!(
            seg != "." && seg != "..",
            "env dir path {path:?} has a {seg:?} segment"
        );
    }
    assert!(
        path.split('/').next() != Some(".agent-env"),
        "env dir path {path:?} lies in the operator's state dir"
    );
}

/// Serializing an accepted object and validating it again gives it back.
fn round_trip<T: serde::Serialize>(kind: &str, o: &T, back: impl Fn(&Object) -> Option<Value>) {
    let v = serde_json::to_value(o).expect("objects serialize");
    match manifest::validate(kind, &v, "round trip") {
        Ok(again) => {
            let again = back(&again).expect("validate keeps the kind");
            assert_eq!(again, v, "{kind} changed in a round trip");
        }
        Err(inv) => panic!("{kind} accepted once, refused after a round trip: {inv}\n{v}"),
    }
}

// ---------------------------------------------------------------------------
// merge

/// Input: an existing file, optionally followed by a NUL byte and a JSON
/// object holding the owned keys to write (other bytes after the NUL name
/// entries instead, so mutations there still reach the renderer).
///
/// A file is taken as corrupt only when it is not a JSON object; the owned
/// keys read from it agree with an independent reading; the rendered file is
/// a JSON object whose foreign keys keep their raw bytes and order, whose
/// owned keys hold exactly what was written, and which renders to the same
/// bytes again.
pub fn merge(data: &[u8]) {
    let (file, spec) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let owned = owned_maps(spec);
    let owned_refs: Vec<(&'static str, &Map<String, Value>)> =
        owned.iter().map(|(k, m)| (*k, m)).collect();

    let doc = match Document::parse(file) {
        Ok(doc) => doc,
        Err(e) => {
            let as_value = merge::parse_value(file);
            assert!(
                !matches!(as_value, Ok(Value::Object(_))),
                "a JSON object was called corrupt: {e}"
            );
            return;
        }
    };
    let entries = if file.iter().all(u8::is_ascii_whitespace) {
        Vec::new()
    } else {
        serde_json::from_slice::<TopLevel>(file)
            .expect("a parsed document is a JSON object")
            .0
    };
    // Later duplicates win but keep the first one's place, as JSON.parse does.
    let mut current: Vec<(String, String)> = Vec::new();
    for (k, v) in &entries {
        match current.iter_mut().find(|(ck, _)| ck == k) {
            Some(slot) => slot.1 = v.get().to_owned(),
            None => current.push((k.clone(), v.get().to_owned())),
        }
    }
    for s in Section::ALL {
        let key = s.key();
        let raw = current.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        match (
            doc.owned(key),
            raw.map(|r| merge::parse_value(r.as_bytes())),
        ) {
            (Ok(None), None) => {}
            (Ok(Some(m)), Some(Ok(Value::Object(want)))) => assert_eq!(m, want, "{key}"),
            (Err(_), Some(Ok(v))) => assert!(!v.is_object(), "{key} is an object: {v}"),
            (Err(_), Some(Err(_))) => {}
            (got, want) => panic!("{key}: owned() gave {got:?}, the file holds {want:?}"),
        }
    }

    let out = doc.render(&owned_refs);
    let text = std::str::from_utf8(&out).expect("rendered file is UTF-8");
    if merge::parse_value(file).is_ok() || file.iter().all(u8::is_ascii_whitespace) {
        let v = merge::parse_value(&out).expect("rendered file is JSON");
        assert!(v.is_object());
    }
    let rendered = serde_json::from_str::<TopLevel>(text)
        .unwrap_or_else(|e| panic!("rendered file is not a JSON object ({e}):\n{text}"))
        .0;

    let mut expected: Vec<(String, Option<String>)> = current
        .iter()
        .map(|(k, v)| (k.clone(), Some(v.clone())))
        .collect();
    for (key, _) in &owned {
        match expected.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = None,
            None => expected.push(((*key).to_owned(), None)),
        }
    }
    let keys: Vec<&str> = rendered.iter().map(|(k, _)| k.as_str()).collect();
    let want_keys: Vec<&str> = expected.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, want_keys, "keys or their order changed:\n{text}");
    for ((k, got), (_, want)) in rendered.iter().zip(&expected) {
        match want {
            Some(raw) => assert_eq!(got.get(), raw, "foreign key {k:?} changed"),
            None => {
                let want = &owned.iter().find(|(o, _)| o == k).expect("owned").1;
                let got = merge::parse_value(got.get().as_bytes()).expect("owned value is JSON");
                assert_eq!(
                    got.as_object(),
                    Some(want),
                    "owned key {k} holds something else"
                );
            }
        }
    }

    let again = Document::parse(&out).expect("a rendered file parses");
    for (key, map) in &owned {
        assert_eq!(again.owned(key).ok().flatten().as_ref(), Some(map), "{key}");
    }
    assert_eq!(
        again.render(&owned_refs),
        out,
        "rendering a rendered file changed it"
    );
}

/// The owned keys to write. A JSON object after the NUL gives them (only
/// owned keys with object values count); anything else names one entry.
fn owned_maps(spec: Option<&[u8]>) -> Vec<(&'static str, Map<String, Value>)> {
    let Some(spec) = spec else {
        return Section::ALL.iter().map(|s| (s.key(), Map::new())).collect();
    };
    if let Ok(Value::Object(m)) = merge::parse_value(spec) {
        return m
            .into_iter()
            .filter_map(|(k, v)| {
                let s = Section::from_key(&k)?;
                match v {
                    Value::Object(v) => Some((s.key(), v)),
                    _ => None,
                }
            })
            .collect();
    }
    let name = String::from_utf8_lossy(spec).into_owned();
    let one = |v: Value| Map::from_iter([(name.clone(), v)]);
    vec![
        (
            Section::McpServers.key(),
            one(json!({"type": "stdio", "command": name})),
        ),
        (Section::Plugins.key(), one(json!(true))),
    ]
}

/// A JSON object's top-level entries as written: duplicates kept, values raw.
struct TopLevel(Vec<(String, Box<RawValue>)>);

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<TopLevel, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = m.next_entry::<String, Box<RawValue>>()? {
                    out.push(e);
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(V)
    }
}

// ---------------------------------------------------------------------------
// placeholders

const NAMESPACE: &str = "fuzz";
/// Values of another namespace's Secrets: never to be seen in a fill.
const FOREIGN_MARK: &str = "other-namespace-value";

/// Input: a JSON object `{"secrets": {"NAME" | "secret/key": "value"},
/// "entries": [<mcpServers entry>...], "text": "..."}`; anything else is
/// taken as text put into every field of two fixed entries.
///
/// A fill changes nothing but the placeholder fields, fills them exactly,
/// makes no new `${` Claude Code would expand, uses no other namespace's
/// Secrets, and on failure changes nothing at all; a malformed placeholder
/// is an error; error messages do not depend on secret values; masking
/// leaves no secret value in text or in a rendered entry.
pub fn placeholders(data: &[u8]) {
    let input = PlaceholderInput::parse(data);
    let provider = input.provider(|v| v.to_owned());
    let originals = input.entries.clone();

    let mut fields = Vec::new();
    let mut malformed = false;
    let mut refs = BTreeSet::new();
    for e in &originals {
        for (path, text) in secret_fields(e) {
            match secrets::references(&text) {
                Ok(r) => refs.extend(r),
                Err(_) => malformed = true,
            }
            fields.push((path, text));
        }
    }
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut missing = BTreeSet::new();
    for r in &refs {
        match futures::executor::block_on(provider.lookup(NAMESPACE, r)).expect("no IO") {
            Lookup::Found(v) => {
                values.insert(r.to_string(), v.expose().to_owned());
            }
            Lookup::Missing => {
                missing.insert(r.to_string());
            }
            Lookup::Conflict(_) => {}
        }
    }

    let mut filled = originals.clone();
    let result =
        futures::executor::block_on(secrets::fill(NAMESPACE, filled.iter_mut(), &provider));
    let used = match result {
        Err(e) => {
            assert_eq!(filled, originals, "a failed fill changed entries ({e})");
            let msg = e.to_string();
            // The same names with other values of the same shape ('$' and '{'
            // kept) must fail the same way: a message naming a value would not.
            let shadow = input.provider(shadow);
            let mut again = originals.clone();
            let e2 =
                futures::executor::block_on(secrets::fill(NAMESPACE, again.iter_mut(), &shadow))
                    .expect_err("the same names fail the same way");
            assert_eq!(
                msg,
                e2.to_string(),
                "an error message depends on secret values"
            );
            match e.reason() {
                "MissingSecret" if !malformed => {
                    let named: BTreeSet<String> = match &e {
                        secrets::SecretError::Missing { names } => names.iter().cloned().collect(),
                        _ => unreachable!(),
                    };
                    assert_eq!(named, missing, "{msg}");
                }
                "UnsafeSecretValue" => {
                    let expands = values.values().any(|v| v.contains("${"))
                        || fields.iter().any(|(_, t)| {
                            secrets::references(t).is_ok_and(|r| {
                                r.iter().all(|r| values.contains_key(&r.to_string()))
                            }) && new_expansions(t, &values) > 0
                        });
                    assert!(expands, "refused as unsafe without cause: {msg}");
                }
                _ => {}
            }
            if malformed {
                assert_eq!(
                    e.reason(),
                    "InvalidObject",
                    "a malformed placeholder gave: {msg}"
                );
            }
            return;
        }
        Ok(used) => used,
    };
    assert!(
        !malformed,
        "a malformed placeholder was passed through: {originals:?}"
    );
    assert!(missing.is_empty(), "filled despite missing {missing:?}");

    let used_refs: BTreeMap<String, String> = used
        .0
        .iter()
        .map(|(r, v)| (r.to_string(), v.expose().to_owned()))
        .collect();
    assert_eq!(
        used_refs, values,
        "used secrets differ from those referenced"
    );

    for (orig, new) in originals.iter().zip(&filled) {
        assert_eq!(
            blank_secret_fields(orig),
            blank_secret_fields(new),
            "a fill changed something outside the placeholder fields"
        );
        for ((path, before), (_, after)) in secret_fields(orig).iter().zip(secret_fields(new)) {
            let want = substitute(before, |r| values[r].clone());
            assert_eq!(&after, &want, "field {path} filled wrongly");
            assert_eq!(
                new_expansions(before, &values),
                0,
                "field {path}: a value forms a new '${{' with its neighbours: {after:?}"
            );
        }
    }
    let input_text = String::from_utf8_lossy(data);
    if !input_text.contains(FOREIGN_MARK) {
        let all = serde_json::to_string(&filled).unwrap();
        assert!(
            !all.contains(FOREIGN_MARK),
            "another namespace's secret was used"
        );
    }

    check_masking(&used, &input.text, &filled);
}

fn check_masking(used: &UsedSecrets, text: &str, filled: &[Value]) {
    let values: Vec<&str> = used
        .0
        .iter()
        .map(|(_, v)| v.expose())
        .filter(|v| !v.is_empty())
        .collect();
    if values.is_empty() {
        return;
    }
    let sentinel = (0xE000u32..)
        .filter_map(char::from_u32)
        .find(|c| !values.iter().any(|v| v.contains(*c)))
        .expect("some char is in no value");
    let placeholders: Vec<String> = used
        .0
        .iter()
        .map(|(r, _)| format!("{PLACEHOLDER_PREFIX}{r}}}"))
        .collect();
    // What masking put in is a placeholder; anything else must hold no value.
    let no_value_left = |masked: &str, what: &str| {
        let mut s = masked.to_owned();
        for p in &placeholders {
            s = s.replace(p.as_str(), &sentinel.to_string());
        }
        for v in &values {
            assert!(
                !s.contains(v),
                "masked {what} still holds a secret value {v:?}: {masked:?}"
            );
        }
    };

    let mut plain = text.to_owned();
    for e in filled {
        for (_, t) in secret_fields(e) {
            plain.push('\n');
            plain.push_str(&t);
        }
    }
    no_value_left(&used.mask(&plain), "text");

    for e in filled {
        let shown = used.mask_json(e);
        let back = merge::parse_value(shown.as_bytes())
            .unwrap_or_else(|err| panic!("masked entry is not JSON ({err}): {shown}"));
        each_string(&back, &mut |s| no_value_left(s, "entry"));
    }
}

fn each_string(v: &Value, f: &mut impl FnMut(&str)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().for_each(|x| each_string(x, f)),
        Value::Object(m) => {
            for (k, x) in m {
                f(k);
                each_string(x, f);
            }
        }
        _ => {}
    }
}

/// Replaces each placeholder of a well-formed text by `value(<ref>)`.
fn substitute(text: &str, mut value: impl FnMut(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(PLACEHOLDER_PREFIX) {
        out.push_str(&rest[..i]);
        let after = &rest[i + PLACEHOLDER_PREFIX.len()..];
        let end = after.find('}').expect("a well-formed placeholder closes");
        out.push_str(&value(&after[..end]));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// How many more `${` a filled text has than its literal parts hold.
fn new_expansions(text: &str, values: &BTreeMap<String, String>) -> usize {
    let filled = substitute(text, |r| values.get(r).cloned().unwrap_or_default());
    let literal = substitute(text, |_| "\u{0}".into());
    filled
        .matches("${")
        .count()
        .saturating_sub(literal.matches("${").count())
}

fn secret_fields(entry: &Value) -> Vec<(String, String)> {
    let mut copy = entry.clone();
    let mut out = Vec::new();
    secrets::for_each_secret_field(&mut copy, |path, text| {
        out.push((path.to_string(), text.clone()))
    });
    out
}

fn blank_secret_fields(entry: &Value) -> Value {
    let mut copy = entry.clone();
    secrets::for_each_secret_field(&mut copy, |_, text| text.clear());
    copy
}

/// Keeps what makes a value unsafe ('$' and '{') and its length; changes the rest.
fn shadow(v: &str) -> String {
    v.chars()
        .map(|c| {
            if matches!(c, '$' | '{') {
                c
            } else if c == 'x' {
                'y'
            } else {
                'x'
            }
        })
        .collect()
}

struct PlaceholderInput {
    secrets: Vec<(String, String)>,
    entries: Vec<Value>,
    text: String,
}

impl PlaceholderInput {
    fn parse(data: &[u8]) -> PlaceholderInput {
        if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(data) {
            let secrets = match m.get("secrets") {
                Some(Value::Object(s)) => s
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect(),
                _ => Vec::new(),
            };
            let entries = match m.get("entries") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            let text = m
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            return PlaceholderInput {
                secrets,
                entries,
                text,
            };
        }
        let t = String::from_utf8_lossy(data).into_owned();
        PlaceholderInput {
            secrets: vec![
                ("TOKEN".into(), "s3cr\"et\\value".into()),
                ("api-key/token".into(), "k-1".into()),
            ],
            entries: vec![
                json!({"type": "stdio", "command": "run", "args": [t], "env": {"E": t}}),
                json!({"type": "http", "url": t, "headers": {"H": t}}),
            ],
            text: t,
        }
    }

    /// Labelled Secrets: `secret/key` names one key of one Secret, a bare
    /// name a key of the Secret `bare`. The same names exist in another
    /// namespace with other values.
    fn provider(&self, value: impl Fn(&str) -> String) -> LabelledSecrets {
        let mut by_secret: BTreeMap<String, BTreeMap<String, SecretValue>> = BTreeMap::new();
        let mut foreign: BTreeMap<String, BTreeMap<String, SecretValue>> = BTreeMap::new();
        for (k, v) in &self.secrets {
            let (secret, key) = k.split_once('/').unwrap_or(("bare", k));
            by_secret
                .entry(secret.to_owned())
                .or_default()
                .insert(key.to_owned(), SecretValue::new(value(v)));
            foreign.entry(secret.to_owned()).or_default().insert(
                key.to_owned(),
                SecretValue::new(format!("{FOREIGN_MARK}-{k}")),
            );
        }
        let mut s = LabelledSecrets::default();
        for (name, data) in by_secret {
            s.insert(NAMESPACE, &name, data);
        }
        for (name, data) in foreign {
            s.insert("other", &name, data);
        }
        s
    }
}
