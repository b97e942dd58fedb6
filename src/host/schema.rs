//! The checks the API server runs on our objects, run here on a manifest:
//! the CRD's CEL rules (kube's CEL validator, the same rules the server
//! runs), the OpenAPI bounds that validator leaves out, and which fields the
//! schema does not declare. Each kind's schema is compiled once into a tree
//! of what to check where, so checking a document walks the document, not
//! the schema's JSON.

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
    /// Bounds, single-regex rules and declared fields.
    node: Node,
    /// The other CEL rules.
    cel: kube::core::cel::CompiledSchema,
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
        // The regex rules leave the schema CEL compiles: evaluated by CEL,
        // `matches()` compiles its regex on every call.
        let node = Node::compile(&mut schema);
        Compiled {
            node,
            cel: kube::core::cel::compile_schema(&schema),
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
    patterns: Vec<Pattern>,
    /// `x-kubernetes-preserve-unknown-fields`: any field is declared below.
    open: bool,
    /// `None`: no `properties` (a map, or a scalar).
    properties: Option<HashMap<String, Node>>,
    /// `additionalProperties` with a schema.
    additional: Option<Box<Node>>,
    items: Option<Box<Node>>,
}

/// A CEL rule that is one regex match: `self.matches('re')` or its negation.
struct Pattern {
    regex: Regex,
    /// Whether the rule holds when the regex matches.
    holds_on_match: bool,
    message: String,
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
        if let Some(rules) = schema
            .get_mut("x-kubernetes-validations")
            .and_then(Value::as_array_mut)
        {
            rules.retain(|rule| match Pattern::of(rule) {
                Some(p) => {
                    node.patterns.push(p);
                    false
                }
                None => true,
            });
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

impl Pattern {
    /// The rule, if it is exactly `self.matches('<re>')` or
    /// `!self.matches('<re>')` with a fixed message and a literal that holds
    /// no escape but `\\`; anything else stays with CEL.
    fn of(rule: &Value) -> Option<Pattern> {
        let text = rule.get("rule")?.as_str()?;
        let message = rule.get("message")?.as_str()?;
        if rule.get("messageExpression").is_some() || rule.get("fieldPath").is_some() {
            return None;
        }
        let (holds_on_match, call) = match text.strip_prefix('!') {
            Some(rest) => (false, rest),
            None => (true, text),
        };
        let literal = call.strip_prefix("self.matches('")?.strip_suffix("')")?;
        let mut re = String::with_capacity(literal.len());
        let mut chars = literal.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' if chars.next()? == '\\' => re.push('\\'),
                '\\' | '\'' => return None,
                c => re.push(c),
            }
        }
        Some(Pattern {
            // CEL's `matches()` is this crate's `Regex::is_match` too.
            regex: Regex::new(&re).ok()?,
            holds_on_match,
            message: message.to_owned(),
        })
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
    if let Err(cel) = kube::core::cel::validate_compiled(&compiled.cel, doc, None) {
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
            for p in &node.patterns {
                if p.regex.is_match(s) != p.holds_on_match {
                    errors.push(Finding {
                        rule: true,
                        text: format!("field {path}: {}", p.message),
                    });
                }
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
    /// checked with every rule left to CEL and with the regex rules taken
    /// out give the same errors, on values that pass and fail each rule.
    #[test]
    fn regex_rules_taken_out_of_cel_report_what_cel_reported() {
        let instance = |path: &str, interval: &str| {
            json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "AgentInstance",
                   "metadata": {"name": "a", "namespace": "dev"},
                   "spec": {"agentType": "coder", "envDir": {"path": path},
                            "restart": {"minInterval": interval}}})
        };
        let binding = |plugin: &str| {
            json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "PluginBinding",
                   "metadata": {"name": "b", "namespace": "dev"},
                   "spec": {"target": {"agentType": "coder"},
                            "plugins": [{"name": plugin}, {"name": "ok@m"}]}})
        };
        let market = |name: &str, repo: &str| {
            json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "PluginMarketplace",
                   "metadata": {"name": "m", "namespace": "dev"},
                   "spec": {"target": {"agentType": "coder"}, "name": name,
                            "source": {"github": {"repo": repo}}}})
        };
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
        ];
        let mut failed = 0;
        for (kind, doc) in cases {
            let compiled = Kind::of(kind).unwrap().compiled();
            let schema = match kind {
                "AgentInstance" => crd::definition::<AgentInstance>(),
                "PluginBinding" => crd::definition::<PluginBinding>(),
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
            let mut ours = cel(&compiled.cel);
            let mut findings = Vec::new();
            check(&compiled.node, &doc, &mut String::new(), &mut findings);
            ours.extend(findings.into_iter().filter(|f| f.rule).map(|f| f.text));
            ours.sort();
            assert_eq!(ours, cel(&all_cel), "{kind} {doc}");
            failed += usize::from(!ours.is_empty());
        }
        // The cases do exercise the rules.
        assert!(failed >= 9, "{failed}");
    }

    /// Every `matches()` rule of the CRDs is one CEL no longer compiles.
    #[test]
    fn every_regex_rule_leaves_cel() {
        fn patterns(n: &Node) -> usize {
            let below = n.properties.iter().flat_map(|p| p.values());
            n.patterns.len()
                + below
                    .chain(n.additional.as_deref())
                    .chain(n.items.as_deref())
                    .map(patterns)
                    .sum::<usize>()
        }
        let crds = crd::to_yaml();
        let rules = crds.matches("self.matches(").count();
        let taken: usize = [Kind::Instance, Kind::Binding, Kind::Marketplace, Kind::Mcp]
            .into_iter()
            .map(|k| patterns(&k.compiled().node))
            .sum();
        assert!(rules > 0);
        assert_eq!(taken, rules);
    }
}
