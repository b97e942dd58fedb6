//! The checks the API server runs on our objects, run here on a manifest:
//! the CRD's CEL rules, the OpenAPI bounds kube's CEL validator leaves out,
//! and which fields the schema does not declare. Each kind's schema is
//! compiled once into a tree of what to check where, so checking a
//! document walks the document, not the schema's JSON. The rules are of a
//! few shapes (a regex, a prefix, exactly one of several fields, ...):
//! those are checked in that tree, as CEL would decide them (a test holds
//! each shape to CEL's verdict, and `tests/validation_parity.rs` to the
//! API server's); a rule of any other shape is left to kube's CEL
//! validator, which then runs for that kind.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

use crate::crd::{self, AgentInstance, McpServer, PluginBinding, PluginMarketplace};

/// The kinds with a schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `AgentInstance`.
    Instance,
    /// `PluginBinding`.
    Binding,
    /// `PluginMarketplace`.
    Marketplace,
    /// `McpServer`.
    Mcp,
}

impl Kind {
    fn of(kind: &str) -> Option<Kind> {
        Some(match kind {
            "AgentInstance" => Kind::Instance,
            "PluginBinding" => Kind::Binding,
            "PluginMarketplace" => Kind::Marketplace,
            "McpServer" => Kind::Mcp,
            _ => return None,
        })
    }

    fn compiled(self) -> &'static Compiled {
        static KINDS: LazyLock<[Compiled; 4]> = LazyLock::new(|| {
            [
                Compiled::of::<AgentInstance>(),
                Compiled::of::<PluginBinding>(),
                Compiled::of::<PluginMarketplace>(),
                Compiled::of::<McpServer>(),
            ]
        });
        &KINDS[self as usize]
    }
}

struct Compiled {
    /// Bounds, the rules checked here and declared fields.
    node: Node,
    /// The other CEL rules; `None` when every rule is checked here.
    cel: Option<kube::core::cel::CompiledSchema>,
}

impl Compiled {
    fn of<K: kube::CustomResourceExt>() -> Compiled {
        let crd = crd::definition::<K>();
        let schema = crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("derived CRDs have a schema");
        let mut schema = serde_json::to_value(schema).expect("schemas serialize");
        // The rules checked here leave the schema CEL compiles: evaluated by
        // CEL, `matches()` compiles its regex on every call, and the walk
        // turns each checked document into CEL values.
        let node = Node::compile(&mut schema);
        Compiled {
            node,
            cel: has_rules(&schema).then(|| kube::core::cel::compile_schema(&schema)),
        }
    }
}

/// One schema node: its bounds, its regex rules, what it declares below.
#[derive(Default)]
struct Node {
    min_length: Option<f64>,
    max_length: Option<f64>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    min_items: Option<f64>,
    max_items: Option<f64>,
    min_properties: Option<f64>,
    max_properties: Option<f64>,
    rules: Vec<Rule>,
    /// `x-kubernetes-preserve-unknown-fields`: any field is declared below.
    open: bool,
    /// `None`: no `properties` (a map, or a scalar).
    properties: Option<HashMap<String, Node>>,
    /// `additionalProperties` with a schema.
    additional: Option<Box<Node>>,
    items: Option<Box<Node>>,
}

/// A CEL rule of one of the shapes the CRDs use, checked here as CEL would.
struct Rule {
    test: Test,
    /// Whether the rule holds when the test passes (false for `!…`).
    holds_on_pass: bool,
    message: String,
}

enum Test {
    /// `self.matches('re')` on a string.
    Matches(Regex),
    /// `self.startsWith('lit')` on a string.
    StartsWith(String),
    /// `self.contains('lit')` on a string.
    Contains(String),
    /// `has(self.a) != has(self.b)` or
    /// `[has(self.a), has(self.b), …].filter(x, x).size() == 1` on an
    /// object: exactly one of the fields is set.
    ExactlyOne(Vec<String>),
    /// `self.field != 'value' || has(self.required)` on an object, `field`
    /// taking its schema default when unset.
    RequiredWith {
        field: String,
        value: String,
        default: Option<String>,
        required: String,
    },
    /// `(has(self.a.b) ? self.a.b : self.c.d) != 'value'` on an object:
    /// the first path's string, or the second's when the first is unset,
    /// is not `value`.
    NotEither {
        first: Vec<String>,
        second: Vec<String>,
        value: String,
    },
}

impl Node {
    /// Compiles `schema`, taking its single-regex rules out of it.
    fn compile(schema: &mut Value) -> Node {
        let bound = |k: &str| schema.get(k).and_then(Value::as_f64);
        let mut node = Node {
            min_length: bound("minLength"),
            max_length: bound("maxLength"),
            minimum: bound("minimum"),
            maximum: bound("maximum"),
            min_items: bound("minItems"),
            max_items: bound("maxItems"),
            min_properties: bound("minProperties"),
            max_properties: bound("maxProperties"),
            open: schema.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)),
            ..Node::default()
        };
        // The rules are taken out while each is read against what the node
        // declares (which fields exist below, which have defaults); those
        // left to CEL go back.
        let rules = match schema.get_mut("x-kubernetes-validations") {
            Some(Value::Array(rules)) => std::mem::take(rules),
            _ => Vec::new(),
        };
        if !rules.is_empty() {
            let declared: &Value = schema;
            let field = |path: &str| -> Option<Option<Value>> {
                let mut at = declared;
                for part in path.split('.') {
                    at = at.get("properties")?.get(part)?;
                }
                Some(at.get("default").cloned())
            };
            let mut kept = Vec::new();
            for rule in rules {
                match Rule::of(&rule, &field) {
                    Some(r) => node.rules.push(r),
                    None => kept.push(rule),
                }
            }
            schema["x-kubernetes-validations"] = Value::Array(kept);
        }
        if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
            node.properties = Some(
                props
                    .iter_mut()
                    .map(|(k, s)| (k.clone(), Node::compile(s)))
                    .collect(),
            );
        }
        node.additional = schema
            .get_mut("additionalProperties")
            .filter(|s| s.is_object())
            .map(|s| Box::new(Node::compile(s)));
        node.items = schema.get_mut("items").map(|s| Box::new(Node::compile(s)));
        node
    }

    fn child(&self, key: &str) -> Option<&Node> {
        (self.properties.as_ref())
            .and_then(|p| p.get(key))
            .or(self.additional.as_deref())
    }
}

impl Rule {
    /// The rule, if it is exactly one of the shapes of [`Test`] (or its
    /// negation, for the string tests) with a fixed message; literals
    /// holding no escape but `\\`, fields plain identifiers. Anything else
    /// stays with CEL. `field` gives a field below the node (a dotted path)
    /// with its schema default, `None` if undeclared: CEL sees defaults
    /// applied, so a rule asking whether a field with a default is set
    /// stays with CEL.
    fn of(rule: &Value, field: &dyn Fn(&str) -> Option<Option<Value>>) -> Option<Rule> {
        let text = rule.get("rule")?.as_str()?;
        let message = rule.get("message")?.as_str()?.to_owned();
        if rule.get("messageExpression").is_some()
            || rule.get("fieldPath").is_some()
            || rule.get("reason").is_some()
        {
            return None;
        }
        let no_default = |f: &str| field(f).is_some_and(|d| d.is_none());
        if let Some(fields) = exactly_one(text)
            && fields.iter().all(|f| no_default(f))
        {
            return Some(Rule {
                test: Test::ExactlyOne(fields),
                holds_on_pass: true,
                message,
            });
        }
        if let Some((name, value, required)) = required_with(text)
            && no_default(&required)
        {
            let default = match field(&name)? {
                None => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(_) => return None,
            };
            return Some(Rule {
                test: Test::RequiredWith {
                    field: name,
                    value,
                    default,
                    required,
                },
                holds_on_pass: true,
                message,
            });
        }
        if let Some((first, second, value)) = not_either(text)
            && no_default(&first.join("."))
        {
            return Some(Rule {
                test: Test::NotEither {
                    first,
                    second,
                    value,
                },
                holds_on_pass: true,
                message,
            });
        }
        let (holds_on_pass, call) = match text.strip_prefix('!') {
            Some(rest) => (false, rest),
            None => (true, text),
        };
        let (method, rest) = call.strip_prefix("self.")?.split_once("('")?;
        let literal = unescape(rest.strip_suffix("')")?)?;
        let test = match method {
            // CEL's `matches()` is this crate's `Regex::is_match` too.
            "matches" => Test::Matches(Regex::new(&literal).ok()?),
            "startsWith" => Test::StartsWith(literal),
            "contains" => Test::Contains(literal),
            _ => return None,
        };
        Some(Rule {
            test,
            holds_on_pass,
            message,
        })
    }

    /// Whether the rule holds for `v`, a value of the rule's node.
    fn holds(&self, v: &Value) -> bool {
        let set = |m: &serde_json::Map<String, Value>, f: &str| m.contains_key(f);
        let passes = match (&self.test, v) {
            (Test::Matches(re), Value::String(s)) => re.is_match(s),
            (Test::StartsWith(lit), Value::String(s)) => s.starts_with(lit.as_str()),
            (Test::Contains(lit), Value::String(s)) => s.contains(lit.as_str()),
            (Test::ExactlyOne(fields), Value::Object(m)) => {
                fields.iter().filter(|f| set(m, f)).count() == 1
            }
            (
                Test::RequiredWith {
                    field,
                    value,
                    default,
                    required,
                },
                Value::Object(m),
            ) => {
                let current = m.get(field).and_then(Value::as_str).or(default.as_deref());
                current != Some(value.as_str()) || set(m, required)
            }
            (
                Test::NotEither {
                    first,
                    second,
                    value,
                },
                v @ Value::Object(_),
            ) => {
                let at = |path: &[String]| path.iter().try_fold(v, |v, p| v.get(p));
                // An unset second path is an error CEL reports its own way;
                // the objects checked here always have theirs (metadata.name).
                let chosen = at(first).or_else(|| at(second));
                chosen.and_then(Value::as_str) != Some(value.as_str())
            }
            // A value of another type: the schema refuses it already.
            _ => return true,
        };
        passes == self.holds_on_pass
    }
}

/// A field name in a rule: letters, digits and `_`.
fn identifier(s: &str) -> Option<String> {
    (!s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .then(|| s.to_owned())
}

/// `has(self.<f>)` → `f`.
fn has_field(s: &str) -> Option<String> {
    identifier(s.trim().strip_prefix("has(self.")?.strip_suffix(')')?)
}

/// The fields of `has(self.a) != has(self.b)` or
/// `[has(self.a), …].filter(x, x).size() == 1`.
fn exactly_one(rule: &str) -> Option<Vec<String>> {
    if let Some((a, b)) = rule.split_once(" != ") {
        return Some(vec![has_field(a)?, has_field(b)?]);
    }
    let list = rule
        .strip_prefix('[')?
        .strip_suffix("].filter(x, x).size() == 1")?;
    let fields: Vec<String> = list.split(',').map(has_field).collect::<Option<_>>()?;
    (fields.len() >= 2).then_some(fields)
}

/// `(first, second, value)` of
/// `(has(self.<first>) ? self.<first> : self.<second>) != '<value>'`, paths dotted.
fn not_either(rule: &str) -> Option<(Vec<String>, Vec<String>, String)> {
    let (choice, value) = rule.strip_prefix('(')?.split_once(") != '")?;
    let value = unescape(value.strip_suffix('\'')?)?;
    let (has, rest) = choice.split_once(" ? ")?;
    let (then, otherwise) = rest.split_once(" : ")?;
    let path = |s: &str| -> Option<Vec<String>> {
        s.strip_prefix("self.")?
            .split('.')
            .map(identifier)
            .collect()
    };
    let first = path(has.strip_prefix("has(")?.strip_suffix(')')?)?;
    (path(then)? == first).then_some((first, path(otherwise)?, value))
}

/// `(field, value, required)` of `self.<field> != '<value>' || has(self.<required>)`.
fn required_with(rule: &str) -> Option<(String, String, String)> {
    let (test, has) = rule.split_once(" || ")?;
    let (field, value) = test.strip_prefix("self.")?.split_once(" != '")?;
    let value = unescape(value.strip_suffix('\'')?)?;
    Some((identifier(field)?, value, has_field(has)?))
}

/// A CEL single-quoted literal's text, if it holds no escape but `\\`.
fn unescape(literal: &str) -> Option<String> {
    let mut out = String::with_capacity(literal.len());
    let mut chars = literal.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.next()? == '\\' => out.push('\\'),
            '\\' | '\'' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Whether any `x-kubernetes-validations` rule is left in `schema`.
fn has_rules(schema: &Value) -> bool {
    match schema {
        Value::Object(m) => m.iter().any(|(k, v)| {
            (k == "x-kubernetes-validations" && v.as_array().is_some_and(|a| !a.is_empty()))
                || has_rules(v)
        }),
        Value::Array(items) => items.iter().any(has_rules),
        _ => false,
    }
}

/// Deserializes `doc` as `K` and runs the kind's checks on it: every error,
/// each naming its field, joined.
pub fn typed<K: serde::de::DeserializeOwned>(doc: &Value, kind: &str) -> Result<K, String> {
    let obj: K = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        format!("field {path}: {}", e.into_inner())
    })?;
    let Some(compiled) = Kind::of(kind).map(Kind::compiled) else {
        return Ok(obj);
    };
    let mut errors = Vec::new();
    check(&compiled.node, doc, &mut String::new(), &mut errors);
    // The rules' order varies from run to run; a message should not.
    let mut rules = Vec::new();
    if let Some(cel) = &compiled.cel
        && let Err(cel) = kube::core::cel::validate_compiled(cel, doc, None)
    {
        rules.extend(
            cel.iter()
                .map(|e| format!("field {}: {}", e.field_path, e.message)),
        );
    }
    rules.extend(errors.iter().filter(|e| e.rule).map(|e| e.text.clone()));
    rules.sort();
    let mut all: Vec<String> = errors
        .into_iter()
        .filter(|e| !e.rule)
        .map(|e| e.text)
        .collect();
    all.extend(rules);
    if !all.is_empty() {
        return Err(all.join("; "));
    }
    Ok(obj)
}

struct Finding {
    /// From a rule (sorted with CEL's), not a bound.
    rule: bool,
    text: String,
}

/// The OpenAPI bounds the API server enforces besides CEL (`minLength`,
/// `maxLength`, `minimum`, `maximum`, `maxItems`, `maxProperties`), which
/// kube's CEL validator leaves out: without them an empty
/// `target.agentType`, a `timeout: 0` or a 2,000-plugin binding would pass
/// here and not in a cluster. Lengths count characters, as the server does.
/// And the single-regex rules, as CEL would report them. `path` is the
/// field's path, grown and cut back as the walk goes.
fn check(node: &Node, v: &Value, path: &mut String, errors: &mut Vec<Finding>) {
    for r in &node.rules {
        if !r.holds(v) {
            errors.push(Finding {
                rule: true,
                text: format!("field {path}: {}", r.message),
            });
        }
    }
    let mut bound = |text: String| errors.push(Finding { rule: false, text });
    // `verb` is "be" for a string's length, "have" for a list's or map's size.
    let mut count = |n: usize, min: Option<f64>, max: Option<f64>, verb: &str, what: &str| {
        if let Some(m) = min
            && (n as f64) < m
        {
            bound(format!("field {path}: must {verb} at least {m} {what}"));
        }
        if let Some(m) = max
            && (n as f64) > m
        {
            bound(format!(
                "field {path}: must {verb} at most {m} {what}, not {n}"
            ));
        }
    };
    match v {
        Value::String(s) => {
            if node.min_length.is_some() || node.max_length.is_some() {
                let chars = s.chars().count();
                count(chars, node.min_length, node.max_length, "be", "characters");
            }
        }
        Value::Number(n) => {
            if let Some(n) = n.as_f64() {
                if let Some(min) = node.minimum
                    && n < min
                {
                    bound(format!("field {path}: must be at least {min}"));
                }
                if let Some(max) = node.maximum
                    && n > max
                {
                    bound(format!("field {path}: must be at most {max}"));
                }
            }
        }
        Value::Object(m) => {
            count(
                m.len(),
                node.min_properties,
                node.max_properties,
                "have",
                "entries",
            );
            for (k, x) in m {
                if let Some(sub) = node.child(k) {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                    check(sub, x, path, errors);
                    path.truncate(len);
                }
            }
        }
        Value::Array(items) => {
            count(items.len(), node.min_items, node.max_items, "have", "items");
            if let Some(sub) = &node.items {
                for (i, x) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    check(sub, x, path, errors);
                    path.truncate(len);
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

/// The fields of ObjectMeta a manifest may set; the API server also knows
/// the ones it sets itself, so it does not call them unknown.
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// The top-level fields of a core v1 Secret.
const SECRET_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata",
    "data",
    "stringData",
    "type",
    "immutable",
];

/// Paths (`spec.plugins[0].nmae`, as the API server writes them) of the
/// fields of `doc` that the schema of `kind` does not declare. The server
/// prunes them from custom resources and drops them from built-in ones; a
/// typo such as `spec.plugin` would otherwise vanish without a word.
pub fn unknown_fields(kind: &str, doc: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let Some(obj) = doc.as_object() else {
        return out;
    };
    if let Some(meta) = obj.get("metadata").and_then(Value::as_object) {
        out.extend(
            meta.keys()
                .filter(|k| !OBJECT_META_FIELDS.contains(&k.as_str()))
                .map(|k| format!("metadata.{k}")),
        );
    }
    let Some(compiled) = Kind::of(kind).map(Kind::compiled) else {
        out.extend(
            obj.keys()
                .filter(|k| !SECRET_FIELDS.contains(&k.as_str()))
                .cloned(),
        );
        return out;
    };
    let top = compiled.node.properties.as_ref();
    for (k, v) in obj {
        match k.as_str() {
            "apiVersion" | "kind" | "metadata" => {}
            _ => match top.and_then(|p| p.get(k)) {
                Some(sub) => undeclared(sub, v, &mut k.clone(), &mut out),
                None => out.push(k.clone()),
            },
        }
    }
    out
}

fn undeclared(node: &Node, v: &Value, path: &mut String, out: &mut Vec<String>) {
    if node.open {
        return;
    }
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                match node.child(k) {
                    Some(sub) => undeclared(sub, x, path, out),
                    // A map without a value schema takes any key.
                    None if node.properties.is_none() => {}
                    None => out.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            if let Some(sub) = &node.items {
                for (i, x) in items.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{i}]"));
                    undeclared(sub, x, path, out);
                    path.truncate(len);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The rules taken out of CEL say what CEL said: each kind's schema
    /// checked with every rule left to CEL and with the rules checked here
    /// taken out give the same errors, on values that pass and fail each
    /// rule.
    #[test]
    fn rules_taken_out_of_cel_report_what_cel_reported() {
        let instance_with = |path: &str, interval: &str, delivery: Value| {
            json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "AgentInstance",
                   "metadata": {"name": "a", "namespace": "dev"},
                   "spec": {"agentType": "coder", "envDir": {"path": path},
                            "restart": {"minInterval": interval}, "delivery": delivery}})
        };
        let instance = |path: &str, interval: &str| instance_with(path, interval, json!({}));
        let binding_to = |target: Value, plugin: &str| {
            json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "PluginBinding",
                   "metadata": {"name": "b", "namespace": "dev"},
                   "spec": {"target": target,
                            "plugins": [{"name": plugin}, {"name": "ok@m"}]}})
        };
        let binding = |plugin: &str| binding_to(json!({"agentType": "coder"}), plugin);
        let market_from = |name: &str, source: Value| {
            json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "PluginMarketplace",
                   "metadata": {"name": "m", "namespace": "dev"},
                   "spec": {"target": {"agentType": "coder"}, "name": name,
                            "source": source}})
        };
        let market = |name: &str, repo: &str| market_from(name, json!({"github": {"repo": repo}}));
        let mcp = |name: &str, target: Value, server: Value| {
            let mut spec = json!({"target": target});
            for (k, v) in server.as_object().unwrap() {
                spec[k] = v.clone();
            }
            json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "McpServer",
                   "metadata": {"name": name, "namespace": "dev"}, "spec": spec})
        };
        let coder = || json!({"agentType": "coder"});
        let stdio = |command: &str| json!({"stdio": {"command": command}});
        let cases = [
            ("AgentInstance", instance("dev/a", "30s")),
            ("AgentInstance", instance("../a", "1h30m")),
            ("AgentInstance", instance("a/./b", "soon")),
            ("AgentInstance", instance(".agent-env/x", "5 m")),
            ("AgentInstance", instance(".agent-envy/x", "500ms")),
            ("PluginBinding", binding("lint@tools")),
            ("PluginBinding", binding("lint")),
            ("PluginBinding", binding("a@b@c")),
            ("PluginBinding", binding("a b@c")),
            ("PluginMarketplace", market("tools", "o/r")),
            ("PluginMarketplace", market("to/ols", "o/r/x")),
            ("PluginMarketplace", market("t@ols", "o r/x")),
            ("PluginMarketplace", market("", "or")),
            ("AgentInstance", instance("/abs", "30s")),
            (
                "AgentInstance",
                instance_with("a", "30s", json!({"mode": "Sidecar"})),
            ),
            (
                "AgentInstance",
                instance_with(
                    "a",
                    "30s",
                    json!({"mode": "Sidecar", "serviceAccountName": "agent"}),
                ),
            ),
            (
                "AgentInstance",
                instance_with("a", "30s", json!({"mode": "Volume"})),
            ),
            (
                "AgentInstance",
                instance_with("a", "30s", json!({"serviceAccountName": "agent"})),
            ),
            ("PluginBinding", binding_to(json!({}), "lint@tools")),
            (
                "PluginBinding",
                binding_to(json!({"agentType": "c", "instance": "i"}), "lint@tools"),
            ),
            (
                "PluginBinding",
                binding_to(json!({"instance": "i"}), "lint@tools"),
            ),
            ("PluginMarketplace", market_from("t", json!({}))),
            (
                "PluginMarketplace",
                market_from(
                    "t",
                    json!({"github": {"repo": "o/r"}, "url": {"url": "https://x"}}),
                ),
            ),
            (
                "PluginMarketplace",
                market_from("t", json!({"directory": {"path": "rel"}})),
            ),
            (
                "PluginMarketplace",
                market_from("t", json!({"directory": {"path": "/abs"}})),
            ),
            (
                "PluginMarketplace",
                market_from("t", json!({"file": {"path": "m.json"}})),
            ),
            ("McpServer", mcp("gh", coder(), stdio("gh"))),
            ("McpServer", mcp("gh", coder(), stdio("gh ${SECRET:TOKEN}"))),
            ("McpServer", mcp("gh", json!({}), stdio("gh"))),
            (
                "McpServer",
                mcp(
                    "gh",
                    json!({"agentType": "c", "instance": "i"}),
                    stdio("gh"),
                ),
            ),
            ("McpServer", mcp("gh", coder(), json!({}))),
            (
                "McpServer",
                mcp(
                    "gh",
                    coder(),
                    json!({"stdio": {"command": "gh"}, "http": {"url": "https://x"}}),
                ),
            ),
            ("McpServer", mcp("workspace", coder(), stdio("gh"))),
            ("McpServer", {
                let mut d = mcp("gh", coder(), stdio("gh"));
                d["spec"]["name"] = json!("workspace");
                d
            }),
            ("McpServer", {
                let mut d = mcp("workspace", coder(), stdio("gh"));
                d["spec"]["name"] = json!("gh");
                d
            }),
        ];
        let mut failed = 0;
        for (kind, doc) in cases {
            let compiled = Kind::of(kind).unwrap().compiled();
            let schema = match kind {
                "AgentInstance" => crd::definition::<AgentInstance>(),
                "PluginBinding" => crd::definition::<PluginBinding>(),
                "McpServer" => crd::definition::<McpServer>(),
                _ => crd::definition::<PluginMarketplace>(),
            };
            let schema = serde_json::to_value(
                schema.spec.versions[0]
                    .schema
                    .as_ref()
                    .unwrap()
                    .open_api_v3_schema
                    .as_ref()
                    .unwrap(),
            )
            .unwrap();
            let all_cel = kube::core::cel::compile_schema(&schema);
            let cel = |c: &kube::core::cel::CompiledSchema| -> Vec<String> {
                let mut v: Vec<String> = kube::core::cel::validate_compiled(c, &doc, None)
                    .err()
                    .map(|e| {
                        e.iter()
                            .map(|e| format!("field {}: {}", e.field_path, e.message))
                            .collect()
                    })
                    .unwrap_or_default();
                v.sort();
                v
            };
            let mut ours = compiled.cel.as_ref().map(cel).unwrap_or_default();
            let mut findings = Vec::new();
            check(&compiled.node, &doc, &mut String::new(), &mut findings);
            ours.extend(findings.into_iter().filter(|f| f.rule).map(|f| f.text));
            ours.sort();
            assert_eq!(ours, cel(&all_cel), "{kind} {doc}");
            failed += usize::from(!ours.is_empty());
        }
        // The cases do exercise the rules.
        assert!(failed >= 24, "{failed}");
    }

    /// Every rule of the CRDs is checked here: CEL runs for no kind.
    #[test]
    fn every_rule_leaves_cel() {
        fn rules(n: &Node) -> usize {
            let below = n.properties.iter().flat_map(|p| p.values());
            n.rules.len()
                + below
                    .chain(n.additional.as_deref())
                    .chain(n.items.as_deref())
                    .map(rules)
                    .sum::<usize>()
        }
        let crds = crd::to_yaml();
        let all = crds.matches("rule: ").count();
        let kinds = [Kind::Instance, Kind::Binding, Kind::Marketplace, Kind::Mcp];
        let taken: usize = kinds.iter().map(|k| rules(&k.compiled().node)).sum();
        assert!(all > 10);
        assert_eq!(taken, all);
        assert!(kinds.iter().all(|k| k.compiled().cel.is_none()));
    }
}
