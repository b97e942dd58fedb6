//! The builtin and type layers of a pass, resolved once per agent type: every
//! instance of a type in a namespace starts from the same result, and on a
//! fleet of few types resolving it again for each instance was most of the
//! resolve step. The same goes for filling the base's secrets: once per
//! type, by the first of its instances to need it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use crate::engine::resolve::Declared;
use crate::engine::secrets::{self, Filled, SecretProvider, SecretRef, UsedSecrets};

/// Types kept per pass. Past this many a type is resolved for each of its
/// instances, as before: a fleet of one type per instance would otherwise
/// hold a resolved base per instance for the whole pass.
const KEPT: usize = 1024;

/// [`crate::engine::resolve::resolve_type`] results of one pass, by
/// namespace and agent type. Made per pass, so a changed builtin config,
/// object or secret is never read from an older pass.
#[derive(Default)]
pub(crate) struct TypeBases {
    by_namespace: Mutex<HashMap<String, HashMap<String, Arc<TypeBase>>>>,
}

/// One type's base in one namespace.
pub(crate) struct TypeBase {
    /// The builtin and type layers, resolved.
    pub(crate) declared: Declared,
    /// `declared` with its secrets filled, or `None` when that failed.
    filled: tokio::sync::OnceCell<Option<FilledBase>>,
}

/// A base whose every placeholder was filled.
pub(crate) struct FilledBase {
    /// The base, its `mcpServers` filled.
    pub(crate) declared: Declared,
    refs: BTreeSet<SecretRef>,
    used: UsedSecrets,
}

impl TypeBase {
    fn new(declared: Declared) -> TypeBase {
        TypeBase {
            declared,
            filled: tokio::sync::OnceCell::new(),
        }
    }

    /// The base with its secrets filled from `secrets` (the first call
    /// fills, the others wait for it), or `None` when they could not all be
    /// filled: an instance then fills its entries whole, since its own
    /// layer may replace the entry that failed and render after all.
    pub(crate) async fn filled(
        &self,
        namespace: &str,
        secrets: &dyn SecretProvider,
    ) -> Option<&FilledBase> {
        let fill = || async {
            let mut declared = self.declared.clone();
            let values =
                (declared.sections.mcp_servers.values_mut()).map(|e| Arc::make_mut(&mut e.value));
            let filled = secrets::fill_all(namespace, values, secrets).await;
            Some(FilledBase {
                used: filled.result.ok()?,
                refs: filled.refs,
                declared,
            })
        };
        self.filled.get_or_init(fill).await.as_ref()
    }
}

impl FilledBase {
    /// What filling an instance's own entries over this base comes to: the
    /// references and values of both. (Those of a base entry the instance
    /// replaced are kept too: one more reference to watch, one more value
    /// masked in messages, never one less.)
    pub(crate) fn with(&self, own: Filled) -> Filled {
        let mut refs = self.refs.clone();
        refs.extend(own.refs);
        let result = own.result.map(|own| {
            let used: BTreeMap<SecretRef, _> = (self.used.0.iter().cloned()).chain(own.0).collect();
            UsedSecrets(used.into_iter().collect())
        });
        Filled { refs, result }
    }
}

impl TypeBases {
    /// The base of `agent_type` in `namespace`, resolved by `resolve` the
    /// first time it is asked for.
    pub(crate) fn get(
        &self,
        namespace: &str,
        agent_type: &str,
        resolve: impl FnOnce() -> Declared,
    ) -> Arc<TypeBase> {
        if let Some(base) = self
            .lock()
            .get(namespace)
            .and_then(|types| types.get(agent_type))
        {
            return base.clone();
        }
        // Resolved without the lock: instances of other types go on
        // meanwhile, and two of one type both resolving it costs one resolve.
        let base = Arc::new(TypeBase::new(resolve()));
        let mut kept = self.lock();
        if kept.values().map(HashMap::len).sum::<usize>() < KEPT {
            let types = kept.entry(namespace.to_owned()).or_default();
            return types.entry(agent_type.to_owned()).or_insert(base).clone();
        }
        base
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Arc<TypeBase>>>> {
        // A panic elsewhere cannot leave a half-made entry: inserts are whole.
        self.by_namespace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::resolve::{Entry, Origin};
    use crate::engine::secrets::{LabelledSecrets, Lookup, ProviderError, SecretValue};
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Labelled Secrets that count their lookups.
    struct Counted(LabelledSecrets, AtomicUsize);

    #[async_trait::async_trait]
    impl SecretProvider for Counted {
        async fn lookup(&self, ns: &str, r: &SecretRef) -> Result<Lookup, ProviderError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.lookup(ns, r).await
        }
    }

    fn with_server(url: &str) -> Declared {
        let mut d = Declared::default();
        d.sections.mcp_servers.insert(
            "docs".into(),
            Entry {
                value: json!({"type": "http", "url": url}).into(),
                origin: Origin::Builtin,
            },
        );
        d
    }

    #[tokio::test]
    async fn a_base_is_filled_once_and_not_at_all_when_a_secret_is_missing() {
        let mut labelled = LabelledSecrets::default();
        let data = [("T".to_owned(), SecretValue::new("v1".into()))];
        labelled.insert("a", "s", data.into_iter().collect());
        let secrets = Counted(labelled, AtomicUsize::new(0));
        let bases = TypeBases::default();
        let url = "https://docs/${SECRET:T}";
        for _ in 0..3 {
            let base = bases.get("a", "x", || with_server(url));
            let filled = base.filled("a", &secrets).await.expect("T is there");
            assert_eq!(
                filled.declared.sections.mcp_servers["docs"].value["url"],
                "https://docs/v1"
            );
            // The resolved base itself keeps its placeholder.
            assert_eq!(base.declared.sections.mcp_servers["docs"].value["url"], url);
        }
        assert_eq!(secrets.1.load(Ordering::Relaxed), 1);

        let base = bases.get("a", "y", || with_server("https://docs/${SECRET:GONE}"));
        assert!(base.filled("a", &secrets).await.is_none());
        assert!(base.filled("a", &secrets).await.is_none());
        assert_eq!(
            secrets.1.load(Ordering::Relaxed),
            2,
            "a failed fill is not tried again"
        );
    }

    #[tokio::test]
    async fn an_instance_fill_over_a_filled_base_has_the_references_and_values_of_both() {
        let mut labelled = LabelledSecrets::default();
        let data =
            [("T", "v1"), ("U", "v2")].map(|(k, v)| (k.to_owned(), SecretValue::new(v.into())));
        labelled.insert("a", "s", data.into_iter().collect());
        let base = TypeBase::new(with_server("https://docs/${SECRET:T}"));
        let filled = base.filled("a", &labelled).await.unwrap();
        let mut own = json!({"type": "http", "url": "https://own/${SECRET:U}"});
        let own = secrets::fill_all("a", [&mut own], &labelled).await;
        let both = filled.with(own);
        let names: Vec<String> = both.refs.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["T", "U"]);
        let used = both.result.unwrap();
        assert_eq!(used.mask("v1 and v2"), "${SECRET:T} and ${SECRET:U}");

        let mut own = json!({"type": "http", "url": "https://own/${SECRET:GONE}"});
        let own = secrets::fill_all("a", [&mut own], &labelled).await;
        let failed = filled.with(own);
        assert!(failed.result.is_err());
        assert_eq!(
            failed.refs.len(),
            2,
            "references are kept when the fill fails"
        );
    }

    #[test]
    fn a_type_is_resolved_once_per_namespace() {
        let bases = TypeBases::default();
        let mut calls = 0;
        for (ns, t) in [("a", "x"), ("a", "x"), ("b", "x"), ("a", "y"), ("b", "x")] {
            bases.get(ns, t, || {
                calls += 1;
                Declared::default()
            });
        }
        assert_eq!(calls, 3);
    }

    #[test]
    fn past_the_bound_a_type_is_resolved_each_time() {
        let bases = TypeBases::default();
        for i in 0..KEPT {
            bases.get("ns", &format!("t{i}"), Declared::default);
        }
        let mut calls = 0;
        for _ in 0..2 {
            bases.get("ns", "one-more", || {
                calls += 1;
                Declared::default()
            });
        }
        assert_eq!(calls, 2);
        let mut again = 0;
        bases.get("ns", "t0", || {
            again += 1;
            Declared::default()
        });
        assert_eq!(again, 0, "types kept before the bound stay kept");
    }
}
