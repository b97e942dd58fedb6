//! Label selectors (the query-string syntax and the `LabelSelector` object
//! form PDBs use) and field selectors.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
}

/// Requirements ANDed together; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector {
    requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (x,y),f notin (z),g,!h,i>3`.
    pub fn parse(text: &str) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text)? {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            requirements.push(parse_requirement(part)?);
        }
        Ok(LabelSelector { requirements })
    }

    /// From a `metav1.LabelSelector` object (matchLabels + matchExpressions).
    pub fn from_object(sel: &Value) -> Result<LabelSelector, String> {
        let mut requirements = Vec::new();
        if let Some(labels) = sel.get("matchLabels").and_then(Value::as_object) {
            for (k, v) in labels {
                let v = v
                    .as_str()
                    .ok_or_else(|| format!("matchLabels.{k} is not a string"))?;
                requirements.push(Requirement {
                    key: k.clone(),
                    op: Op::In(vec![v.to_owned()]),
                });
            }
        }
        for e in sel
            .get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = e
                .get("key")
                .and_then(Value::as_str)
                .ok_or("a matchExpression has no key")?
                .to_owned();
            let values: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            let op = match e.get("operator").and_then(Value::as_str) {
                Some("In") => Op::In(values),
                Some("NotIn") => Op::NotIn(values),
                Some("Exists") => Op::Exists,
                Some("DoesNotExist") => Op::DoesNotExist,
                other => return Err(format!("unknown matchExpression operator {other:?}")),
            };
            requirements.push(Requirement { key, op });
        }
        Ok(LabelSelector { requirements })
    }

    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.requirements.iter().all(|r| {
            let value = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            match (&r.op, value) {
                (Op::In(vals), Some(v)) => vals.iter().any(|x| x == v),
                (Op::In(_), None) => false,
                (Op::NotIn(vals), Some(v)) => !vals.iter().any(|x| x == v),
                (Op::NotIn(_), None) => true,
                (Op::Exists, v) => v.is_some(),
                (Op::DoesNotExist, v) => v.is_none(),
                (Op::Gt(n), Some(v)) => v.parse::<i64>().is_ok_and(|x| x > *n),
                (Op::Lt(n), Some(v)) => v.parse::<i64>().is_ok_and(|x| x < *n),
                (Op::Gt(_) | Op::Lt(_), None) => false,
            }
        })
    }

    pub fn matches_object(&self, obj: &Value) -> bool {
        self.matches(obj.pointer("/metadata/labels").and_then(Value::as_object))
    }
}

/// Splits on commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "unable to parse requirement: unbalanced ')' in {text:?}"
                    ));
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!(
            "unable to parse requirement: unbalanced '(' in {text:?}"
        ));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    let bad = || format!("unable to parse requirement: {part:?}");
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key).map_err(|e| format!("{}: {e}", bad()))?;
        return Ok(Requirement {
            key: key.to_owned(),
            op: Op::DoesNotExist,
        });
    }
    // Set-based: `key in (a,b)` / `key notin (a,b)`.
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let close = part.rfind(')').ok_or_else(bad)?;
        if !part[close + 1..].trim().is_empty() {
            return Err(bad());
        }
        let values: Vec<String> = part[open + 1..close]
            .split(',')
            .map(|v| v.trim().to_owned())
            .collect();
        for v in &values {
            check_value(v).map_err(|e| format!("{}: {e}", bad()))?;
        }
        let (key, op) = if let Some(k) = head.strip_suffix("notin") {
            (k.trim(), Op::NotIn(values))
        } else if let Some(k) = head.strip_suffix("in") {
            (k.trim(), Op::In(values))
        } else {
            return Err(bad());
        };
        if key.is_empty() || !head[key.len()..].starts_with(char::is_whitespace) {
            return Err(bad());
        }
        check_key(key).map_err(|e| format!("{}: {e}", bad()))?;
        return Ok(Requirement {
            key: key.to_owned(),
            op,
        });
    }
    for (token, make) in [
        ("==", None),
        ("!=", Some(true)),
        ("=", None),
        (">", Some(false)),
        ("<", Some(false)),
    ] {
        if let Some(i) = part.find(token) {
            let key = part[..i].trim();
            let value = part[i + token.len()..].trim();
            check_key(key).map_err(|e| format!("{}: {e}", bad()))?;
            let op = match (token, make) {
                (">", _) | ("<", _) => {
                    let n: i64 = value
                        .parse()
                        .map_err(|_| format!("{}: {value:?} is not an integer", bad()))?;
                    if token == ">" { Op::Gt(n) } else { Op::Lt(n) }
                }
                (_, Some(true)) => {
                    check_value(value).map_err(|e| format!("{}: {e}", bad()))?;
                    Op::NotIn(vec![value.to_owned()])
                }
                _ => {
                    check_value(value).map_err(|e| format!("{}: {e}", bad()))?;
                    Op::In(vec![value.to_owned()])
                }
            };
            return Ok(Requirement {
                key: key.to_owned(),
                op,
            });
        }
    }
    check_key(part).map_err(|e| format!("{}: {e}", bad()))?;
    Ok(Requirement {
        key: part.to_owned(),
        op: Op::Exists,
    })
}

fn check_key(key: &str) -> Result<(), String> {
    crate::meta::check_qualified_name(key)
}

fn check_value(value: &str) -> Result<(), String> {
    crate::meta::check_label_value(value)
}

#[derive(Debug, Clone, PartialEq)]
struct FieldRequirement {
    path: String,
    value: String,
    equal: bool,
}

/// `metadata.name=x,metadata.namespace!=y`; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSelector {
    requirements: Vec<FieldRequirement>,
}

impl FieldSelector {
    /// `allowed` are the fields the kind supports beyond metadata.name and
    /// metadata.namespace; others are refused as the real server does.
    pub fn parse(text: &str, allowed: &[String]) -> Result<FieldSelector, String> {
        let mut requirements = Vec::new();
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (path, value, equal) = if let Some((p, v)) = part.split_once("!=") {
                (p, v, false)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, v, true)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{part}'; can't understand '{part}'"
                ));
            };
            let path = path.trim();
            if path != "metadata.name"
                && path != "metadata.namespace"
                && !allowed.iter().any(|a| a == path)
            {
                return Err(format!("field label not supported: {path}"));
            }
            requirements.push(FieldRequirement {
                path: path.to_owned(),
                value: value.trim().to_owned(),
                equal,
            });
        }
        Ok(FieldSelector { requirements })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.requirements.iter().all(|r| {
            let actual = field_value(obj, &r.path);
            (actual == r.value) == r.equal
        })
    }
}

/// A field as field selectors see it: absent is "", scalars as text.
fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for seg in path.split('.') {
        match cur.get(seg) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn equality_set_and_existence() {
        let l = labels(json!({"app": "web", "tier": "front", "n": "5"}));
        let m = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches(Some(&l)));
        assert_eq!(m("app=web"), Ok(true));
        assert_eq!(m("app==web"), Ok(true));
        assert_eq!(m("app!=web"), Ok(false));
        assert_eq!(m("missing!=x"), Ok(true));
        assert_eq!(m("app in (db, web)"), Ok(true));
        assert_eq!(m("app notin (web)"), Ok(false));
        assert_eq!(m("missing notin (web)"), Ok(true));
        assert_eq!(m("tier"), Ok(true));
        assert_eq!(m("!tier"), Ok(false));
        assert_eq!(m("!missing"), Ok(true));
        assert_eq!(m("app=web,tier in (front),!missing"), Ok(true));
        assert_eq!(m("app=web,tier=back"), Ok(false));
        assert_eq!(m("n>4"), Ok(true));
        assert_eq!(m("n<4"), Ok(false));
        assert_eq!(m(""), Ok(true));
    }

    #[test]
    fn malformed_selectors_are_refused() {
        for bad in ["app in (web", "app=we b", "in (x)", "a b", "a>x"] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn object_selectors() {
        let sel = LabelSelector::from_object(&json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["back"]}]
        }))
        .expect("valid selector");
        assert!(sel.matches(Some(&labels(json!({"app": "web"})))));
        assert!(!sel.matches(Some(&labels(json!({"app": "web", "tier": "back"})))));
        assert!(!sel.matches(None));
    }

    #[test]
    fn field_selectors() {
        let obj =
            json!({"metadata": {"name": "a", "namespace": "ns"}, "status": {"phase": "Running"}});
        let sel = FieldSelector::parse("metadata.name=a,metadata.namespace!=other", &[])
            .expect("valid selector");
        assert!(sel.matches(&obj));
        assert!(FieldSelector::parse("status.phase=Running", &[]).is_err());
        let sel = FieldSelector::parse("status.phase==Running", &["status.phase".to_owned()])
            .expect("allowed field");
        assert!(sel.matches(&obj));
    }
}
