//! `${SECRET:...}` placeholders: parsing, lookup behind [`SecretProvider`], and
//! substitution into declared MCP server entries.
//!
//! Plaintext leaves this module only inside the entries handed to the renderer.
//! [`SecretValue`] never prints its content, and every error names secrets,
//! never values.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use zeroize::Zeroizing;

/// Every placeholder starts with this.
pub const PLACEHOLDER_PREFIX: &str = "${SECRET:";

/// What a placeholder refers to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretRef {
    /// `${SECRET:NAME}`: a data key of any labelled Secret, then the operator's store.
    Bare(String),
    /// `${SECRET:secret-name/key}`: one key of one labelled Secret.
    Keyed {
        /// Secret object name.
        secret: String,
        /// Data key inside it.
        key: String,
    },
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Bare(n) => f.write_str(n),
            SecretRef::Keyed { secret, key } => write!(f, "{secret}/{key}"),
        }
    }
}

/// A secret's plaintext. Zeroed on drop and never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wraps a plaintext.
    pub fn new(value: String) -> Self {
        SecretValue(Zeroizing::new(value))
    }

    /// The plaintext, for the renderer only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(***)")
    }
}

/// A `${SECRET:...}` that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed secret placeholder {placeholder:?}: {reason}")]
pub struct PlaceholderError {
    /// The text from `${SECRET:` up to the closing brace or the end.
    pub placeholder: String,
    /// What is wrong.
    pub reason: &'static str,
}

/// Whether `s` can be a secret name in `${SECRET:NAME}` (or a Secret data key).
pub fn is_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A parsed piece of a string: literal text or a placeholder.
enum Piece<'a> {
    Text(&'a str),
    Secret(SecretRef),
}

fn pieces(s: &str) -> Result<Vec<Piece<'_>>, PlaceholderError> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find(PLACEHOLDER_PREFIX) {
        if start > 0 {
            out.push(Piece::Text(&rest[..start]));
        }
        let after = &rest[start + PLACEHOLDER_PREFIX.len()..];
        let Some(end) = after.find('}') else {
            return Err(PlaceholderError {
                placeholder: rest[start..].to_owned(),
                reason: "no closing '}'",
            });
        };
        let body = &after[..end];
        let placeholder = || format!("{PLACEHOLDER_PREFIX}{body}}}");
        let reference = match body.split_once('/') {
            None if is_secret_name(body) => SecretRef::Bare(body.to_owned()),
            None => {
                return Err(PlaceholderError {
                    placeholder: placeholder(),
                    reason: "a name may hold only letters, digits, '-', '_' and '.'",
                });
            }
            Some((secret, key)) => {
                if !crate::crd::is_dns_subdomain(secret) || !is_secret_name(key) {
                    return Err(PlaceholderError {
                        placeholder: placeholder(),
                        reason: "expected <secret-name>/<key> naming a Secret in the instance's own namespace",
                    });
                }
                SecretRef::Keyed {
                    secret: secret.to_owned(),
                    key: key.to_owned(),
                }
            }
        };
        out.push(Piece::Secret(reference));
        rest = &after[end + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest));
    }
    Ok(out)
}

/// The secrets a string refers to.
pub fn references(s: &str) -> Result<Vec<SecretRef>, PlaceholderError> {
    // Most fields hold no placeholder: those are not split into pieces.
    if !s.contains(PLACEHOLDER_PREFIX) {
        return Ok(Vec::new());
    }
    Ok(pieces(s)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Secret(r) => Some(r),
            Piece::Text(_) => None,
        })
        .collect())
}

/// Where a field that may hold placeholders sits in an `mcpServers` entry.
/// Shown only in errors, so it is kept as parts rather than formatted for
/// every field walked.
#[derive(Clone, Copy, Debug)]
pub enum FieldPath<'a> {
    /// `url`.
    Url,
    /// `args[i]`.
    Arg(usize),
    /// `env.K` or `headers.K`.
    Key(&'static str, &'a str),
}

impl fmt::Display for FieldPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldPath::Url => f.write_str("url"),
            FieldPath::Arg(i) => write!(f, "args[{i}]"),
            FieldPath::Key(map, k) => write!(f, "{map}.{k}"),
        }
    }
}

/// Calls `f` with the path and text of every field of an `mcpServers` entry
/// that may hold placeholders: `args[i]`, `env.K`, `url`, `headers.K`.
pub fn for_each_secret_field(entry: &mut Value, mut f: impl FnMut(FieldPath<'_>, &mut String)) {
    let Some(obj) = entry.as_object_mut() else {
        return;
    };
    // One walk of the entry's fields instead of a hashed lookup of each
    // (every MCP server of every instance, every pass); then the fields in
    // a fixed order, which is the order errors are found in.
    let (mut url, mut args, mut env, mut headers) = (None, None, None, None);
    for (k, v) in obj.iter_mut() {
        match k.as_str() {
            "url" => url = Some(v),
            "args" => args = Some(v),
            "env" => env = Some(v),
            "headers" => headers = Some(v),
            _ => {}
        }
    }
    if let Some(Value::String(url)) = url {
        f(FieldPath::Url, url);
    }
    if let Some(Value::Array(args)) = args {
        for (i, a) in args.iter_mut().enumerate() {
            if let Value::String(a) = a {
                f(FieldPath::Arg(i), a);
            }
        }
    }
    for (map, value) in [("env", env), ("headers", headers)] {
        if let Some(Value::Object(m)) = value {
            for (k, v) in m.iter_mut() {
                if let Value::String(v) = v {
                    f(FieldPath::Key(map, k), v);
                }
            }
        }
    }
}

/// Checks every placeholder of an `mcpServers` entry; returns the field and error of the first bad one.
pub fn check_entry_placeholders(entry: &Value) -> Result<(), (String, PlaceholderError)> {
    let mut copy = entry.clone();
    let mut first = None;
    for_each_secret_field(&mut copy, |path, text| {
        if first.is_none()
            && let Err(e) = references(text)
        {
            first = Some((path.to_string(), e));
        }
    });
    first.map_or(Ok(()), Err)
}

/// Result of looking one reference up.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Found exactly once.
    Found(SecretValue),
    /// Not known to this provider.
    Missing,
    /// Defined by more than one labelled Secret (their names).
    Conflict(Vec<String>),
}

/// A provider failed (as opposed to not knowing a secret).
#[derive(Debug, thiserror::Error)]
#[error("secret provider {provider} failed")]
pub struct ProviderError {
    /// Which provider.
    pub provider: &'static str,
    /// Why.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Where placeholder values come from. Implemented by labelled Secrets (from
/// manifests or the cluster) and by the operator's encrypted store; chained by
/// [`Chain`].
#[async_trait]
pub trait SecretProvider: Send + Sync {
    /// Looks `reference` up for an instance in `namespace`.
    async fn lookup(&self, namespace: &str, reference: &SecretRef)
    -> Result<Lookup, ProviderError>;
}

/// Asks providers in order; the first that finds (or conflicts on) a reference decides.
pub struct Chain(pub Vec<Arc<dyn SecretProvider>>);

#[async_trait]
impl SecretProvider for Chain {
    async fn lookup(
        &self,
        namespace: &str,
        reference: &SecretRef,
    ) -> Result<Lookup, ProviderError> {
        for p in &self.0 {
            match p.lookup(namespace, reference).await? {
                Lookup::Missing => continue,
                decided => return Ok(decided),
            }
        }
        Ok(Lookup::Missing)
    }
}

/// The contents of Secrets labelled `agentenv.io/secrets: "true"`, by namespace.
/// Built from manifests here and from a reflector store in a cluster.
#[derive(Default, Debug, Clone)]
pub struct LabelledSecrets {
    by_namespace: HashMap<String, BTreeMap<String, BTreeMap<String, SecretValue>>>,
}

impl LabelledSecrets {
    /// Adds (or replaces) one labelled Secret's data.
    pub fn insert(&mut self, namespace: &str, name: &str, data: BTreeMap<String, SecretValue>) {
        self.by_namespace
            .entry(namespace.to_owned())
            .or_default()
            .insert(name.to_owned(), data);
    }

    /// A digest of one namespace's Secrets (names, keys and values), to
    /// notice a change without keeping a second copy of any value.
    pub fn digest(&self, namespace: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (secret, data) in self.by_namespace.get(namespace).into_iter().flatten() {
            for (k, v) in data {
                for part in [secret.as_str(), k.as_str(), v.expose()] {
                    h.update((part.len() as u64).to_be_bytes());
                    h.update(part);
                }
            }
        }
        h.finalize().into()
    }

    /// Whether no Secret is known.
    pub fn is_empty(&self) -> bool {
        self.by_namespace.is_empty()
    }
}

#[async_trait]
impl SecretProvider for LabelledSecrets {
    async fn lookup(
        &self,
        namespace: &str,
        reference: &SecretRef,
    ) -> Result<Lookup, ProviderError> {
        let Some(secrets) = self.by_namespace.get(namespace) else {
            return Ok(Lookup::Missing);
        };
        Ok(match reference {
            SecretRef::Keyed { secret, key } => secrets
                .get(secret)
                .and_then(|d| d.get(key))
                .map_or(Lookup::Missing, |v| Lookup::Found(v.clone())),
            SecretRef::Bare(name) => {
                let mut hits = secrets
                    .iter()
                    .filter_map(|(secret, data)| data.get(name).map(|v| (secret, v)));
                match (hits.next(), hits.next()) {
                    (None, _) => Lookup::Missing,
                    (Some((_, v)), None) => Lookup::Found(v.clone()),
                    (Some((a, _)), Some((b, _))) => {
                        let mut names = vec![a.clone(), b.clone()];
                        names.extend(hits.map(|(s, _)| s.clone()));
                        Lookup::Conflict(names)
                    }
                }
            }
        })
    }
}

/// Why secrets could not be filled in; names secrets, never values.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Some referenced secrets exist nowhere.
    #[error("missing secrets: {}", .names.join(", "))]
    Missing {
        /// Every missing reference, sorted.
        names: Vec<String>,
    },
    /// A bare name is defined by more than one labelled Secret.
    #[error("secret {name} is defined by more than one labelled Secret: {}", .secrets.join(", "))]
    Conflict {
        /// The bare name.
        name: String,
        /// The Secrets defining it.
        secrets: Vec<String>,
    },
    /// A value contains `${`, which Claude Code would expand again.
    #[error("secret {name} has a value containing '${{', which Claude Code would expand again")]
    Unsafe {
        /// The reference.
        name: String,
    },
    /// A value joins the text next to it into `${` (a `$` before a value
    /// starting with `{`, or the reverse), which Claude Code would expand.
    #[error(
        "secret {name} in field {field} joins the text next to it into '${{', which Claude Code would expand"
    )]
    UnsafeJoin {
        /// The reference.
        name: String,
        /// The field it is filled into.
        field: String,
    },
    /// A placeholder cannot be parsed. Objects and builtin files are checked
    /// when loaded, so this is a caller's mistake; filling around it would
    /// render a half-substituted field.
    #[error("field {field}: {source}")]
    Malformed {
        /// The field holding it.
        field: String,
        /// What is wrong.
        #[source]
        source: PlaceholderError,
    },
    /// A provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

impl SecretError {
    /// The CamelCase reason reported in status and output.
    pub fn reason(&self) -> &'static str {
        match self {
            SecretError::Missing { .. } => "MissingSecret",
            SecretError::Conflict { .. } => "SecretConflict",
            SecretError::Unsafe { .. } | SecretError::UnsafeJoin { .. } => "UnsafeSecretValue",
            SecretError::Malformed { .. } => "InvalidObject",
            SecretError::Provider(_) => "SecretProviderFailed",
        }
    }
}

/// The values used by one fill, kept so output can mask them.
#[derive(Default, Debug)]
pub struct UsedSecrets(pub Vec<(SecretRef, SecretValue)>);

impl UsedSecrets {
    /// Replaces every used secret value in `text` with its placeholder.
    ///
    /// One pass, longest value first at each position: replacing values one
    /// after another would mask a value inside a longer one first and leave
    /// the rest of the longer one in the clear, and could mask inside a
    /// placeholder already put in.
    pub fn mask(&self, text: &str) -> String {
        // Most texts hold none of the values: those are not walked.
        let mut values: Vec<(&str, String)> = self
            .0
            .iter()
            .filter(|(_, v)| !v.expose().is_empty() && text.contains(v.expose()))
            .map(|(r, v)| (v.expose(), format!("{PLACEHOLDER_PREFIX}{r}}}")))
            .collect();
        if values.is_empty() {
            return text.to_owned();
        }
        values.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            match values.iter().find(|(v, _)| rest.starts_with(v)) {
                Some((v, placeholder)) => {
                    out.push_str(placeholder);
                    rest = &rest[v.len()..];
                }
                None => {
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }

    /// A value as JSON text with every used secret value masked. Strings are
    /// masked before serializing: in JSON text a value holding a quote, a
    /// backslash or a control character is escaped and would not be found.
    pub fn mask_json(&self, v: &Value) -> String {
        serde_json::to_string(&self.mask_value(v)).expect("values serialize")
    }

    fn mask_value(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(self.mask(s)),
            Value::Array(a) => Value::Array(a.iter().map(|x| self.mask_value(x)).collect()),
            Value::Object(m) => Value::Object(
                m.iter()
                    .map(|(k, x)| (self.mask(k), self.mask_value(x)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
}

/// What [`fill_all`] found and did.
#[derive(Debug)]
pub struct Filled {
    /// Every well-formed reference of the entries, also when the fill
    /// failed: what a controller watches to try again.
    pub refs: BTreeSet<SecretRef>,
    /// The fill's result, as [`fill`] gives it.
    pub result: Result<UsedSecrets, SecretError>,
}

/// Fills every placeholder in `entries` (declared `mcpServers` entries). Either
/// every placeholder is filled, or nothing is changed and the error names every
/// missing secret (or the first other problem).
pub async fn fill<'a>(
    namespace: &str,
    entries: impl IntoIterator<Item = &'a mut Value>,
    provider: &dyn SecretProvider,
) -> Result<UsedSecrets, SecretError> {
    fill_all(namespace, entries, provider).await.result
}

/// [`fill`], also giving the references it found on the way.
pub async fn fill_all<'a>(
    namespace: &str,
    entries: impl IntoIterator<Item = &'a mut Value>,
    provider: &dyn SecretProvider,
) -> Filled {
    let mut entries: Vec<&mut Value> = entries.into_iter().collect();
    let mut refs = BTreeSet::new();
    let mut malformed = None;
    for e in entries.iter_mut() {
        for_each_secret_field(e, |field, text| match references(text) {
            Ok(found) => refs.extend(found),
            Err(source) => {
                malformed.get_or_insert_with(|| SecretError::Malformed {
                    field: field.to_string(),
                    source,
                });
            }
        });
    }
    let result = match malformed {
        Some(e) => Err(e),
        None => substitute_all(namespace, &mut entries, &refs, provider).await,
    };
    Filled { refs, result }
}

/// Looks `wanted` up and puts the values into `entries`, all or nothing.
async fn substitute_all(
    namespace: &str,
    entries: &mut [&mut Value],
    wanted: &BTreeSet<SecretRef>,
    provider: &dyn SecretProvider,
) -> Result<UsedSecrets, SecretError> {
    if wanted.is_empty() {
        return Ok(UsedSecrets::default());
    }
    let mut found = BTreeMap::new();
    let mut missing = Vec::new();
    for r in wanted {
        match provider.lookup(namespace, r).await? {
            Lookup::Found(v) if v.expose().contains("${") => {
                return Err(SecretError::Unsafe {
                    name: r.to_string(),
                });
            }
            Lookup::Found(v) => {
                found.insert(r.clone(), v);
            }
            Lookup::Missing => missing.push(r.to_string()),
            Lookup::Conflict(secrets) => {
                return Err(SecretError::Conflict {
                    name: r.to_string(),
                    secrets,
                });
            }
        }
    }
    if !missing.is_empty() {
        return Err(SecretError::Missing { names: missing });
    }
    // Every field's new text first, put in only if none is refused, so a
    // refusal half-way leaves every entry as it was.
    let mut texts: Vec<Option<String>> = Vec::new();
    let mut refused = None;
    for e in entries.iter_mut() {
        for_each_secret_field(e, |field, text| {
            if refused.is_some() {
                return;
            }
            match substitute(text, &found) {
                Ok(new) => texts.push(new),
                Err(r) => {
                    refused = Some(SecretError::UnsafeJoin {
                        name: r.to_string(),
                        field: field.to_string(),
                    });
                }
            }
        });
    }
    if let Some(e) = refused {
        return Err(e);
    }
    let mut texts = texts.into_iter();
    for e in entries.iter_mut() {
        for_each_secret_field(e, |_, text| {
            if let Some(Some(new)) = texts.next() {
                *text = new;
            }
        });
    }
    Ok(UsedSecrets(found.into_iter().collect()))
}

/// `text` with its placeholders filled (`None`: it has none), or the
/// reference whose value would form a `${` with the text next to it.
fn substitute<'r>(
    text: &str,
    found: &'r BTreeMap<SecretRef, SecretValue>,
) -> Result<Option<String>, &'r SecretRef> {
    if !text.contains(PLACEHOLDER_PREFIX) {
        return Ok(None);
    }
    let Ok(pieces) = pieces(text) else {
        unreachable!("fill refuses malformed placeholders before substituting")
    };
    if !pieces.iter().any(|p| matches!(p, Piece::Secret(_))) {
        return Ok(None);
    }
    let mut out = String::with_capacity(text.len());
    let mut last_secret = None;
    for p in &pieces {
        let (s, secret) = match p {
            Piece::Text(t) => (*t, None),
            Piece::Secret(r) => {
                let (r, v) = found.get_key_value(r).expect("every reference was found");
                (v.expose(), Some(r))
            }
        };
        // Two pieces meet only where a secret stands (or stood, if empty).
        if out.ends_with('$') && s.starts_with('{') {
            return Err(secret
                .or(last_secret)
                .expect("text pieces meet only around a secret"));
        }
        out.push_str(s);
        if secret.is_some() {
            last_secret = secret;
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secrets() -> LabelledSecrets {
        let mut s = LabelledSecrets::default();
        let v = |x: &str| SecretValue::new(x.into());
        s.insert(
            "dev",
            "forgejo",
            BTreeMap::from([("FORGEJO_TOKEN_DEV".into(), v("tok-123"))]),
        );
        s.insert("dev", "a", BTreeMap::from([("DUP".into(), v("1"))]));
        s.insert("dev", "b", BTreeMap::from([("DUP".into(), v("2"))]));
        s.insert(
            "dev",
            "bad",
            BTreeMap::from([("LOOP".into(), v("${HOME}"))]),
        );
        s.insert("prod", "p", BTreeMap::from([("ONLY_PROD".into(), v("x"))]));
        s
    }

    #[test]
    fn parses_both_forms_and_leaves_other_expansions() {
        assert_eq!(
            references("a ${SECRET:X_1} ${HOME} ${VAR:-d} ${SECRET:my-secret/key.1}").unwrap(),
            vec![
                SecretRef::Bare("X_1".into()),
                SecretRef::Keyed {
                    secret: "my-secret".into(),
                    key: "key.1".into()
                }
            ]
        );
        for bad in [
            "${SECRET:}",
            "${SECRET:a b}",
            "${SECRET:ns/s/k}",
            "${SECRET:Upper/k}",
            "${SECRET:X",
        ] {
            assert!(references(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn fills_every_field_kind() {
        let mut e = json!({"type": "stdio", "command": "run", "args": ["--t=${SECRET:FORGEJO_TOKEN_DEV}"],
            "env": {"T": "${SECRET:forgejo/FORGEJO_TOKEN_DEV}", "H": "${HOME}"}});
        let used = fill("dev", [&mut e], &secrets()).await.unwrap();
        assert_eq!(e["args"][0], "--t=tok-123");
        assert_eq!(e["env"]["T"], "tok-123");
        assert_eq!(e["env"]["H"], "${HOME}");
        assert_eq!(used.mask("x tok-123"), "x ${SECRET:FORGEJO_TOKEN_DEV}");
    }

    #[tokio::test]
    async fn names_every_missing_secret_and_changes_nothing() {
        let mut e = json!({"url": "${SECRET:A}", "headers": {"h": "${SECRET:B} ${SECRET:FORGEJO_TOKEN_DEV}"}});
        let before = e.clone();
        let err = fill("dev", [&mut e], &secrets()).await.unwrap_err();
        assert_eq!(err.to_string(), "missing secrets: A, B");
        assert_eq!(e, before);
    }

    #[tokio::test]
    async fn a_failed_fill_still_names_every_reference_it_found() {
        let mut missing =
            json!({"url": "${SECRET:A}", "env": {"T": "${SECRET:forgejo/FORGEJO_TOKEN_DEV}"}});
        let mut malformed = json!({"args": ["${SECRET:B}", "${SECRET:a b}"]});
        let filled = fill_all("dev", [&mut missing, &mut malformed], &secrets()).await;
        assert_eq!(filled.result.unwrap_err().reason(), "InvalidObject");
        let refs: Vec<String> = filled.refs.iter().map(ToString::to_string).collect();
        assert_eq!(refs, ["A", "B", "forgejo/FORGEJO_TOKEN_DEV"]);
        let filled = fill_all("dev", [&mut missing], &secrets()).await;
        assert_eq!(filled.result.unwrap_err().to_string(), "missing secrets: A");
        assert_eq!(filled.refs.len(), 2);
    }

    #[test]
    fn masking_leaves_a_text_without_values_as_it_is() {
        let used = UsedSecrets(vec![(
            SecretRef::Bare("T".into()),
            SecretValue::new("tok".into()),
        )]);
        assert_eq!(
            used.mask("up to date (3 plugins)"),
            "up to date (3 plugins)"
        );
        assert_eq!(used.mask("a tok b"), "a ${SECRET:T} b");
    }

    #[tokio::test]
    async fn other_namespaces_are_invisible() {
        let mut e = json!({"url": "${SECRET:ONLY_PROD}"});
        let err = fill("dev", [&mut e], &secrets()).await.unwrap_err();
        assert_eq!(err.reason(), "MissingSecret");
    }

    #[tokio::test]
    async fn chain_asks_the_next_provider_only_for_what_is_missing() {
        let mut second = LabelledSecrets::default();
        second.insert(
            "dev",
            "store",
            BTreeMap::from([
                (
                    "FORGEJO_TOKEN_DEV".into(),
                    SecretValue::new("shadowed".into()),
                ),
                ("FROM_STORE".into(), SecretValue::new("stored".into())),
            ]),
        );
        let chain = Chain(vec![Arc::new(secrets()), Arc::new(second)]);
        let mut e = json!({"args": ["${SECRET:FORGEJO_TOKEN_DEV}", "${SECRET:FROM_STORE}"]});
        fill("dev", [&mut e], &chain).await.unwrap();
        assert_eq!(e["args"], json!(["tok-123", "stored"]));
        // A conflict in the first provider is final, not passed on.
        let mut e = json!({"url": "${SECRET:DUP}"});
        assert_eq!(
            fill("dev", [&mut e], &chain).await.unwrap_err().reason(),
            "SecretConflict"
        );
    }

    #[tokio::test]
    async fn a_malformed_placeholder_fails_the_fill_and_changes_nothing() {
        let mut ok = json!({"url": "${SECRET:FORGEJO_TOKEN_DEV}"});
        let mut bad = json!({"args": ["${SECRET:FORGEJO_TOKEN_DEV} ${SECRET:a b}"]});
        let before = (ok.clone(), bad.clone());
        let err = fill("dev", [&mut ok, &mut bad], &secrets())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "InvalidObject");
        assert!(
            err.to_string()
                .starts_with("field args[0]: malformed secret placeholder"),
            "{err}"
        );
        assert_eq!((ok, bad), before);
    }

    #[tokio::test]
    async fn a_value_that_joins_its_neighbours_into_an_expansion_is_refused() {
        let mut s = secrets();
        let v = |x: &str| SecretValue::new(x.into());
        s.insert(
            "dev",
            "join",
            BTreeMap::from([
                ("BRACE".into(), v("{HOME}")),
                ("DOLLAR".into(), v("x$")),
                ("EMPTY".into(), v("")),
            ]),
        );
        for text in [
            "$${SECRET:BRACE}",
            "${SECRET:DOLLAR}{HOME}",
            "${SECRET:DOLLAR}${SECRET:BRACE}",
            "$${SECRET:EMPTY}{HOME}",
        ] {
            let mut first = json!({"url": "${SECRET:FORGEJO_TOKEN_DEV}"});
            let mut e = json!({"env": {"E": text}});
            let before = (first.clone(), e.clone());
            let err = fill("dev", [&mut first, &mut e], &s).await.unwrap_err();
            assert_eq!(err.reason(), "UnsafeSecretValue", "{text}");
            assert!(err.to_string().contains("field env.E"), "{err}");
            assert_eq!((first, e), before, "{text}: a refused fill changed entries");
        }
        // Apart, the same values are fine.
        let mut e = json!({"args": ["${SECRET:DOLLAR} ${SECRET:BRACE}", "$ ${SECRET:BRACE}"]});
        fill("dev", [&mut e], &s).await.unwrap();
        assert_eq!(e["args"], json!(["x$ {HOME}", "$ {HOME}"]));
    }

    #[test]
    fn masking_takes_the_longest_value_and_sees_through_json_escapes() {
        let v = |x: &str| SecretValue::new(x.into());
        let used = UsedSecrets(vec![
            (SecretRef::Bare("A".into()), v("b")),
            (SecretRef::Bare("B".into()), v("abc")),
            (SecretRef::Bare("Q".into()), v("p\"w\\d")),
        ]);
        // One after the other, `b` would be masked inside `abc` first,
        // leaving `a` and `c` in the clear.
        assert_eq!(used.mask("abc b"), "${SECRET:B} ${SECRET:A}");
        let shown = used.mask_json(&json!({"args": ["--t=p\"w\\d"], "abc": 1}));
        assert_eq!(shown, r#"{"args":["--t=${SECRET:Q}"],"${SECRET:B}":1}"#);
    }

    #[tokio::test]
    async fn conflict_and_unsafe() {
        let mut e = json!({"url": "${SECRET:DUP}"});
        let err = fill("dev", [&mut e], &secrets()).await.unwrap_err();
        assert_eq!(err.reason(), "SecretConflict");
        assert!(err.to_string().contains("a, b"));
        let mut e = json!({"url": "${SECRET:LOOP}"});
        let err = fill("dev", [&mut e], &secrets()).await.unwrap_err();
        assert_eq!(err.reason(), "UnsafeSecretValue");
        assert!(!err.to_string().contains("HOME"));
    }
}
