//! The builtin and type layers of a pass, resolved once per agent type: every
//! instance of a type in a namespace starts from the same result, and on a
//! fleet of few types resolving it again for each instance was most of the
//! resolve step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::engine::resolve::Declared;

/// Types kept per pass. Past this many a type is resolved for each of its
/// instances, as before: a fleet of one type per instance would otherwise
/// hold a resolved base per instance for the whole pass.
const KEPT: usize = 1024;

/// [`crate::engine::resolve::resolve_type`] results of one pass, by
/// namespace and agent type. Made per pass, so a changed builtin config or
/// object is never read from an older pass.
#[derive(Default)]
pub(crate) struct TypeBases {
    by_namespace: Mutex<HashMap<String, HashMap<String, Arc<Declared>>>>,
}

impl TypeBases {
    /// The base of `agent_type` in `namespace`, resolved by `resolve` the
    /// first time it is asked for.
    pub(crate) fn get(
        &self,
        namespace: &str,
        agent_type: &str,
        resolve: impl FnOnce() -> Declared,
    ) -> Arc<Declared> {
        if let Some(base) = self
            .lock()
            .get(namespace)
            .and_then(|types| types.get(agent_type))
        {
            return base.clone();
        }
        // Resolved without the lock: instances of other types go on
        // meanwhile, and two of one type both resolving it costs one resolve.
        let base = Arc::new(resolve());
        let mut kept = self.lock();
        if kept.values().map(HashMap::len).sum::<usize>() < KEPT {
            let types = kept.entry(namespace.to_owned()).or_default();
            return types.entry(agent_type.to_owned()).or_insert(base).clone();
        }
        base
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Arc<Declared>>>> {
        // A panic elsewhere cannot leave a half-made entry: inserts are whole.
        self.by_namespace
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
