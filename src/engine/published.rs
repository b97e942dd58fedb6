//! A render published for a sidecar: what the controller resolved and filled
//! for one instance, in the form the sidecar hands to the same apply step
//! the other front ends use. The controller stays the only resolver; the
//! sidecar only merges, writes, and tells drift from runtime installs.
//!
//! It travels in a Secret (it holds filled secret values), as JSON under
//! [`DATA_KEY`]; its digest is the SHA-256 of exactly those bytes, so the
//! controller and every sidecar name a render the same way.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::crd::RuntimeInstalls;
use crate::engine::envdir::Owner;
use crate::engine::resolve::{Entries, Entry, Installed, ObjectId, Origin};
use crate::engine::section::PerSection;
use crate::engine::snapshot::ObjectKey;

/// The Secret data key holding the render.
pub const DATA_KEY: &str = "render.json";
/// The format this build writes and reads.
pub const FORMAT: u32 = 1;

/// One instance's render, as published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Published {
    /// [`FORMAT`].
    pub format: u32,
    /// The instance's namespace.
    pub namespace: String,
    /// The instance's name.
    pub name: String,
    /// `spec.runtimeInstalls`.
    pub runtime_installs: RuntimeInstalls,
    /// `spec.suspend`: the sidecar leaves the env dir as it is.
    #[serde(default)]
    pub suspend: bool,
    /// `spec.envDir.uid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// `spec.envDir.gid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Declared entries, secrets filled, per owned key.
    pub declared: PerSection<BTreeMap<String, PublishedEntry>>,
    /// The installed set as the controller's store holds it: what a pod
    /// whose volume starts empty gets back.
    pub installed: Installed,
}

/// One declared entry and where it came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PublishedEntry {
    /// The value in Claude Code's shape.
    pub value: Value,
    /// `builtin`, `type` or `instance`.
    pub scope: String,
    /// The deciding object, `<Kind>/<name>`, for `type` and `instance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// A render that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PublishedError {
    /// The data key is missing.
    #[error("the Secret has no data key {DATA_KEY}")]
    Missing,
    /// Not the JSON this build writes.
    #[error("{DATA_KEY} is not a render this build can read")]
    Parse(#[source] serde_json::Error),
    /// Written by a newer build.
    #[error("{DATA_KEY} has format {0}; this build reads format {FORMAT}")]
    Format(u32),
    /// An entry names a scope or object the engine does not know.
    #[error("{DATA_KEY}: entry {section}.{name}: {why}")]
    Entry {
        /// The owned key.
        section: &'static str,
        /// The entry.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Meant for another instance.
    #[error("{DATA_KEY} is the render of {found}, not of {expected}")]
    Instance {
        /// The instance this sidecar serves.
        expected: ObjectKey,
        /// The instance named in the render.
        found: ObjectKey,
    },
}

impl Published {
    /// Builds the render of `key` from filled declared entries.
    pub fn new(
        key: &ObjectKey,
        declared: &PerSection<Entries>,
        installed: Installed,
        runtime_installs: RuntimeInstalls,
        suspend: bool,
        owner: Owner,
    ) -> Published {
        Published {
            format: FORMAT,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            runtime_installs,
            suspend,
            uid: owner.uid,
            gid: owner.gid,
            declared: declared.map(|_, entries| {
                entries
                    .iter()
                    .map(|(name, e)| {
                        let entry = PublishedEntry {
                            value: Value::clone(&e.value),
                            scope: e.origin.scope().to_owned(),
                            object: e
                                .origin
                                .object()
                                .map(crate::engine::resolve::ObjectId::label),
                        };
                        (name.clone(), entry)
                    })
                    .collect()
            }),
            installed,
        }
    }

    /// The bytes stored in the Secret.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a render serializes")
    }

    /// Reads a render, checking it is one this build can apply.
    pub fn parse(bytes: &[u8]) -> Result<Published, PublishedError> {
        // The format first, so a newer build's render says so rather than
        // failing on a field this build does not know.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        let head: Head = serde_json::from_slice(bytes).map_err(PublishedError::Parse)?;
        if head.format != FORMAT {
            return Err(PublishedError::Format(head.format));
        }
        let p: Published = serde_json::from_slice(bytes).map_err(PublishedError::Parse)?;
        p.declared()?;
        Ok(p)
    }

    /// The instance it renders.
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    /// The owner of written files.
    pub fn owner(&self) -> Owner {
        Owner {
            uid: self.uid,
            gid: self.gid,
        }
    }

    /// The declared entries as the engine holds them.
    pub fn declared(&self) -> Result<PerSection<Entries>, PublishedError> {
        let mut out = PerSection::<Entries>::default();
        for (section, entries) in self.declared.iter() {
            for (name, e) in entries {
                let bad = |why: String| PublishedError::Entry {
                    section: section.key(),
                    name: name.clone(),
                    why,
                };
                let object = || -> Result<ObjectId, PublishedError> {
                    let text = e.object.as_deref().unwrap_or_default();
                    let (kind, obj) = text
                        .split_once('/')
                        .ok_or_else(|| bad(format!("object {text:?} is not <Kind>/<name>")))?;
                    let kind = ["PluginBinding", "PluginMarketplace", "McpServer"]
                        .into_iter()
                        .find(|k| *k == kind)
                        .ok_or_else(|| bad(format!("unknown kind {kind:?}")))?;
                    Ok(ObjectId {
                        kind,
                        name: obj.to_owned(),
                    })
                };
                let origin = match e.scope.as_str() {
                    "builtin" => Origin::Builtin,
                    "type" => Origin::Type(object()?),
                    "instance" => Origin::Instance(object()?),
                    other => return Err(bad(format!("unknown scope {other:?}"))),
                };
                out[section].insert(
                    name.clone(),
                    Entry {
                        value: Arc::new(e.value.clone()),
                        origin,
                    },
                );
            }
        }
        Ok(out)
    }
}

/// What one pod's sidecar last did, as it reports it (one data key per pod
/// in the instance's report Secret, named after the pod).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodReport {
    /// The pod's UID (a pod recreated under the same name reports anew).
    pub pod_uid: String,
    /// Digest of the render the env dir holds, when one was applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_digest: Option<String>,
    /// Whether the last pass succeeded.
    pub ready: bool,
    /// The last pass's reason (`Rendered`, `UpToDate`, `WriteFailed`, ...).
    pub reason: String,
    /// The last pass's message, secrets masked.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The pod's installed set: the runtime installs it adopted. The
    /// controller keeps the newest report's in its store, so a pod whose
    /// volume starts empty gets them back.
    #[serde(default)]
    pub installed: Installed,
    /// Declared entries put back by the last pass that found drift, as of
    /// the last report (a drift correction alone is not reported).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    /// When the pod's state last changed.
    pub at: crate::time::Timestamp,
}

/// The digest naming a render: SHA-256 of its bytes, hex.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Published {
        let declared = crate::engine::resolve::sample_render();
        let mut installed = Installed::default();
        installed.plugins.insert("mine@market".into(), json!(true));
        Published::new(
            &ObjectKey::new("team", "alice"),
            &declared,
            installed,
            RuntimeInstalls::Preserve,
            false,
            Owner {
                uid: Some(1000),
                gid: None,
            },
        )
    }

    #[test]
    fn round_trips_with_origins() {
        let p = sample();
        let bytes = p.to_bytes();
        let back = Published::parse(&bytes).unwrap();
        assert_eq!(back, p);
        let declared = back.declared().unwrap();
        assert_eq!(
            declared.plugins["lint@tools"].origin,
            Origin::Type(ObjectId {
                kind: "PluginBinding",
                name: "coders".into()
            })
        );
        assert_eq!(digest(&bytes), digest(&sample().to_bytes()));
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["format"] = json!(2);
        let e = Published::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(e.to_string().contains("format 2"), "{e}");

        let mut v = serde_json::to_value(sample()).unwrap();
        v["declared"]["enabledPlugins"]["lint@tools"]["object"] = json!("Deployment/x");
        let e = Published::parse(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .contains("entry enabledPlugins.lint@tools: unknown kind"),
            "{e}"
        );

        let e = Published::parse(b"{\"format\": 1, \"name\": 3}").unwrap_err();
        assert!(matches!(e, PublishedError::Parse(_)), "{e}");
    }
}
