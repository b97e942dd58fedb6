//! The encrypted store as a secret provider: asked after labelled Secrets,
//! for bare `${SECRET:NAME}` references only.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::StateStore;
use crate::engine::secrets::{Lookup, ProviderError, SecretProvider, SecretRef, SecretValue};

/// Reads a namespace's secrets once per provider (one pass), so a fleet of
/// instances costs one query and one decryption per secret, not per use.
pub struct StoreSecrets {
    store: Arc<dyn StateStore>,
    cache: Mutex<HashMap<String, Arc<BTreeMap<String, SecretValue>>>>,
}

impl StoreSecrets {
    /// A provider over `store`, with an empty cache.
    pub fn new(store: Arc<dyn StateStore>) -> StoreSecrets {
        StoreSecrets {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl SecretProvider for StoreSecrets {
    async fn lookup(
        &self,
        namespace: &str,
        reference: &SecretRef,
    ) -> Result<Lookup, ProviderError> {
        // `secret-name/key` names a Kubernetes Secret, never the store.
        let SecretRef::Bare(name) = reference else {
            return Ok(Lookup::Missing);
        };
        let mut cache = self.cache.lock().await;
        let secrets = match cache.get(namespace) {
            Some(s) => s.clone(),
            None => {
                let loaded =
                    Arc::new(self.store.namespace_secrets(namespace).await.map_err(|e| {
                        ProviderError {
                            provider: "encrypted store",
                            source: Box::new(e),
                        }
                    })?);
                cache.insert(namespace.to_owned(), loaded.clone());
                loaded
            }
        };
        Ok(secrets
            .get(name)
            .map_or(Lookup::Missing, |v| Lookup::Found(v.clone())))
    }
}
