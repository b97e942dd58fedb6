//! Sidecar delivery, controller half. For an instance with
//! `delivery.mode: Sidecar` the controller resolves and fills as for any
//! instance, then, instead of writing an env dir:
//!
//! - publishes the render in the Secret [`render_secret`] (a Secret, never a
//!   ConfigMap: it holds filled secret values), written only when its digest
//!   changed;
//! - creates the Secret [`report_secret`], where each pod's sidecar reports
//!   what it applied and which runtime installs it adopted;
//! - grants the instance's ServiceAccount reading that one render and
//!   patching that one report (a Role with `resourceNames`, and its
//!   RoleBinding), and nothing else;
//! - takes the newest report's installed set into its store, so the next
//!   render carries it to pods whose volume starts empty;
//! - sums up which pods hold the current render, for the status.
//!
//! Every object it creates has the AgentInstance as controller owner, so
//! deleting the instance deletes them.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::json;

use crate::cluster::FIELD_MANAGER;
use crate::cluster::catalog::{INSTANCE_LABEL, PodInfo};
use crate::crd::{SidecarPod, SidecarStatus};
use crate::engine::PublishedRender;
use crate::engine::published::{DATA_KEY, PodReport};
use crate::engine::resolve::Installed;
use crate::engine::snapshot::ObjectKey;
use crate::time::Timestamp;

/// Label on the render and report Secrets: `render` or `report`. Its value
/// for the instance is in [`INSTANCE_LABEL`].
pub const SIDECAR_LABEL: &str = "agentenv.io/sidecar";
/// Annotation on the render Secret: the digest of its render.
pub const DIGEST_ANNOTATION: &str = "agentenv.io/render-digest";

/// The Secret holding an instance's render.
pub fn render_secret(instance: &str) -> String {
    format!("agent-env-render-{instance}")
}

/// The Secret its sidecars report into.
pub fn report_secret(instance: &str) -> String {
    format!("agent-env-report-{instance}")
}

/// The Role (and RoleBinding) granting its ServiceAccount those two Secrets.
pub fn role_name(instance: &str) -> String {
    format!("agent-env-sidecar-{instance}")
}

/// Reason of a pod that has not reported yet.
pub const NOT_REPORTED: &str = "NotReported";

/// A pod's report, or why it cannot be read.
pub type Reported = Result<PodReport, String>;

/// What the controller knows of one instance's sidecar objects.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Digest of the render Secret as last seen (written or watched).
    pub render_digest: Option<String>,
    /// The report Secret exists.
    pub report_exists: bool,
    /// Reports by pod name.
    pub reports: BTreeMap<String, Reported>,
    /// The grant applied: (instance UID, ServiceAccount).
    pub grant: Option<(String, String)>,
    /// The report time whose installed set was last taken in.
    pub ingested: Option<Timestamp>,
    /// [`PublishedRender::declared_digest`] of the render this controller
    /// last published (unknown after a restart: no restart is asked for then).
    pub declared_digest: Option<String>,
}

impl Seen {
    /// Whether anything of sidecar delivery exists for the instance.
    pub fn any(&self) -> bool {
        self.render_digest.is_some() || self.report_exists || self.grant.is_some()
    }
}

/// The sidecar objects of every instance, fed by a watch on Secrets
/// labelled [`SIDECAR_LABEL`].
#[derive(Default)]
pub struct Tracker {
    inner: Mutex<HashMap<ObjectKey, Seen>>,
}

impl Tracker {
    /// What is known of one instance.
    pub fn seen(&self, key: &ObjectKey) -> Seen {
        self.lock().get(key).cloned().unwrap_or_default()
    }

    /// Changes what is known of one instance.
    pub fn update(&self, key: &ObjectKey, f: impl FnOnce(&mut Seen)) {
        f(self.lock().entry(key.clone()).or_default());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Seen>> {
        self.inner.lock().expect("tracker lock")
    }

    /// Takes one watch event; returns the instances it concerns.
    pub fn on_event(&self, event: &watcher::Event<Secret>) -> Vec<ObjectKey> {
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                self.on_secret(s, true).into_iter().collect()
            }
            watcher::Event::Delete(s) => self.on_secret(s, false).into_iter().collect(),
            watcher::Event::Init | watcher::Event::InitDone => Vec::new(),
        }
    }

    fn on_secret(&self, s: &Secret, present: bool) -> Option<ObjectKey> {
        let labels = s.metadata.labels.as_ref()?;
        let instance = labels.get(INSTANCE_LABEL)?;
        let key = ObjectKey::new(s.metadata.namespace.clone()?, instance.clone());
        let role = labels.get(SIDECAR_LABEL)?.clone();
        self.update(&key, |seen| match role.as_str() {
            // The digest of the data as it is, not the annotation: a render
            // edited by hand no longer matches and is published again.
            "render" => {
                seen.render_digest = present
                    .then(|| {
                        s.data
                            .as_ref()
                            .and_then(|d| d.get(DATA_KEY))
                            .map(|b| crate::engine::published::digest(&b.0))
                    })
                    .flatten();
            }
            "report" => {
                seen.report_exists = present;
                seen.reports = if present {
                    read_reports(s)
                } else {
                    BTreeMap::new()
                };
            }
            _ => {}
        });
        Some(key)
    }
}

/// Every pod's report in a report Secret.
pub fn read_reports(s: &Secret) -> BTreeMap<String, Reported> {
    s.data
        .iter()
        .flatten()
        .map(|(pod, bytes)| {
            let report = serde_json::from_slice::<PodReport>(&bytes.0)
                .map_err(|e| format!("report of pod {pod} does not parse: {e}"));
            (pod.clone(), report)
        })
        .collect()
}

/// The installed set to take into the store: the newest readable report's,
/// when it is newer than the last one taken in.
pub fn newest_installed(
    reports: &BTreeMap<String, Reported>,
    after: Option<Timestamp>,
) -> Option<(Timestamp, Installed)> {
    reports
        .values()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| after.is_none_or(|a| r.at > a))
        .max_by_key(|r| r.at)
        .map(|r| (r.at, r.installed.clone()))
}

/// Which running pods hold the current render.
pub fn status(
    digest: &str,
    pods: &[PodInfo],
    reports: &BTreeMap<String, Reported>,
) -> SidecarStatus {
    let mut live: Vec<&PodInfo> = pods.iter().filter(|p| !p.terminating).collect();
    live.sort_by(|a, b| a.name.cmp(&b.name));
    let pods: Vec<SidecarPod> = live
        .iter()
        .map(|p| match reports.get(&p.name) {
            Some(Ok(r)) if r.pod_uid == p.uid => SidecarPod {
                name: p.name.clone(),
                current: r.ready && r.render_digest.as_deref() == Some(digest),
                reason: r.reason.clone(),
                message: r.message.clone(),
                time: Some(Time(r.at)),
            },
            Some(Err(e)) => SidecarPod {
                name: p.name.clone(),
                current: false,
                reason: "InvalidReport".into(),
                message: e.clone(),
                time: None,
            },
            _ => SidecarPod {
                name: p.name.clone(),
                current: false,
                reason: NOT_REPORTED.into(),
                message: "the pod's sidecar has not reported yet".into(),
                time: None,
            },
        })
        .collect();
    let current = pods.iter().filter(|p| p.current).count();
    SidecarStatus {
        render_digest: digest.to_owned(),
        pods_current: format!("{current}/{}", pods.len()),
        pods,
    }
}

/// Reports of pods that are gone, old enough that the pod watch has surely
/// seen any pod that wrote them: removed from the report Secret.
pub fn stale_reports(
    pods: &[PodInfo],
    reports: &BTreeMap<String, Reported>,
    now: Timestamp,
) -> Vec<String> {
    reports
        .iter()
        .filter(|(name, r)| {
            let live = pods.iter().any(|p| &p.name == *name);
            let old = r.as_ref().map_or(true, |r| {
                now.duration_since(r.at) > k8s_openapi::jiff::SignedDuration::from_secs(300)
            });
            !live && old
        })
        .map(|(name, _)| name.clone())
        .collect()
}

fn labels(key: &ObjectKey, role: &str) -> serde_json::Value {
    json!({ INSTANCE_LABEL: key.name, SIDECAR_LABEL: role, "app.kubernetes.io/managed-by": FIELD_MANAGER })
}

/// The render Secret.
pub fn render_object(
    key: &ObjectKey,
    owner: &OwnerReference,
    render: &PublishedRender,
) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": render_secret(&key.name),
            "namespace": key.namespace,
            "labels": labels(key, "render"),
            "annotations": { DIGEST_ANNOTATION: render.digest },
            "ownerReferences": [owner],
        },
        "type": "Opaque",
        "data": { DATA_KEY: base64::engine::general_purpose::STANDARD.encode(&render.bytes) },
    })
}

/// The report Secret, as the controller owns it: metadata only, so the
/// sidecars' data is never touched by its applies.
pub fn report_object(key: &ObjectKey, owner: &OwnerReference) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": report_secret(&key.name),
            "namespace": key.namespace,
            "labels": labels(key, "report"),
            "ownerReferences": [owner],
        },
        "type": "Opaque",
    })
}

/// The Role granting exactly this instance's two Secrets: watching the
/// render by name (a list or watch with `metadata.name=` is authorized
/// against `resourceNames`) and patching its own report. No `get`: RBAC lets
/// the controller grant only verbs it holds itself, and it reads Secrets
/// through watches alone.
pub fn role_object(key: &ObjectKey, owner: &OwnerReference) -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {
            "name": role_name(&key.name),
            "namespace": key.namespace,
            "labels": { INSTANCE_LABEL: key.name, "app.kubernetes.io/managed-by": FIELD_MANAGER },
            "ownerReferences": [owner],
        },
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"],
             "resourceNames": [render_secret(&key.name)], "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["secrets"],
             "resourceNames": [report_secret(&key.name)], "verbs": ["patch"]},
        ],
    })
}

/// The RoleBinding giving that Role to the instance's ServiceAccount.
pub fn binding_object(key: &ObjectKey, owner: &OwnerReference, sa: &str) -> serde_json::Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": role_name(&key.name),
            "namespace": key.namespace,
            "labels": { INSTANCE_LABEL: key.name, "app.kubernetes.io/managed-by": FIELD_MANAGER },
            "ownerReferences": [owner],
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name(&key.name)},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": key.namespace}],
    })
}

/// A sidecar delivery API call failed.
#[derive(Debug, thiserror::Error)]
#[error("{action} for the sidecars of AgentInstance {key} failed")]
pub struct DeliveryError {
    /// The instance.
    pub key: ObjectKey,
    /// What was tried.
    pub action: &'static str,
    /// Why.
    #[source]
    pub source: kube::Error,
}

/// Puts one instance's sidecar objects in place: the grant, the report
/// Secret and the render, each only when it is not already as wanted.
pub async fn publish(
    client: &kube::Client,
    tracker: &Tracker,
    key: &ObjectKey,
    owner: &OwnerReference,
    service_account: &str,
    render: &PublishedRender,
) -> Result<Published, DeliveryError> {
    let seen = tracker.seen(key);
    let ns = key.namespace.as_str();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let grant = (owner.uid.clone(), service_account.to_owned());
    if seen.grant.as_ref() != Some(&grant) {
        Api::<Role>::namespaced(client.clone(), ns)
            .patch(
                &role_name(&key.name),
                &pp,
                &Patch::Apply(role_object(key, owner)),
            )
            .await
            .map_err(failed(key, "granting the render (Role)"))?;
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .patch(
                &role_name(&key.name),
                &pp,
                &Patch::Apply(binding_object(key, owner, service_account)),
            )
            .await
            .map_err(failed(key, "granting the render (RoleBinding)"))?;
        tracker.update(key, |s| s.grant = Some(grant));
    }
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    if !seen.report_exists {
        secrets
            .patch(
                &report_secret(&key.name),
                &pp,
                &Patch::Apply(report_object(key, owner)),
            )
            .await
            .map_err(failed(key, "creating the report Secret"))?;
        tracker.update(key, |s| s.report_exists = true);
    }
    let declared_changed = seen
        .declared_digest
        .as_ref()
        .is_some_and(|d| *d != render.declared_digest);
    tracker.update(key, |s| {
        s.declared_digest = Some(render.declared_digest.clone())
    });
    if seen.render_digest.as_deref() == Some(render.digest.as_str()) {
        return Ok(Published {
            written: false,
            declared_changed,
        });
    }
    secrets
        .patch(
            &render_secret(&key.name),
            &pp,
            &Patch::Apply(render_object(key, owner, render)),
        )
        .await
        .map_err(failed(key, "publishing the render Secret"))?;
    tracker.update(key, |s| s.render_digest = Some(render.digest.clone()));
    Ok(Published {
        written: true,
        declared_changed,
    })
}

/// What [`publish`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The render Secret was written.
    pub written: bool,
    /// The declared entries differ from the render published before.
    pub declared_changed: bool,
}

/// Removes reports of pods that are gone.
pub async fn prune(
    client: &kube::Client,
    key: &ObjectKey,
    stale: &[String],
) -> Result<(), DeliveryError> {
    let data: serde_json::Map<String, serde_json::Value> = stale
        .iter()
        .map(|p| (p.clone(), serde_json::Value::Null))
        .collect();
    Api::<Secret>::namespaced(client.clone(), &key.namespace)
        .patch(
            &report_secret(&key.name),
            &PatchParams::default(),
            &Patch::Merge(json!({"data": data})),
        )
        .await
        .map_err(failed(key, "removing reports of pods that are gone"))?;
    Ok(())
}

/// Removes an instance's sidecar objects (it no longer uses sidecars): the
/// render holds filled secrets nobody should read any more.
pub async fn retract(
    client: &kube::Client,
    tracker: &Tracker,
    key: &ObjectKey,
) -> Result<(), DeliveryError> {
    let ns = key.namespace.as_str();
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    delete_if_present(&secrets, &render_secret(&key.name))
        .await
        .map_err(failed(key, "removing the render Secret"))?;
    delete_if_present(&secrets, &report_secret(&key.name))
        .await
        .map_err(failed(key, "removing the report Secret"))?;
    delete_if_present(
        &Api::<RoleBinding>::namespaced(client.clone(), ns),
        &role_name(&key.name),
    )
    .await
    .map_err(failed(key, "removing the RoleBinding"))?;
    delete_if_present(
        &Api::<Role>::namespaced(client.clone(), ns),
        &role_name(&key.name),
    )
    .await
    .map_err(failed(key, "removing the Role"))?;
    tracker.update(key, |s| *s = Seen::default());
    Ok(())
}

/// Deletes one object; one already gone is fine.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Turns an API error into a [`DeliveryError`] naming the instance and the step.
fn failed(key: &ObjectKey, action: &'static str) -> impl FnOnce(kube::Error) -> DeliveryError {
    let key = key.clone();
    move |source| DeliveryError {
        key,
        action,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, uid: &str) -> PodInfo {
        PodInfo {
            name: name.into(),
            uid: uid.into(),
            terminating: false,
            running: true,
        }
    }

    fn report(uid: &str, digest: &str, at: i64) -> Reported {
        Ok(PodReport {
            pod_uid: uid.into(),
            render_digest: Some(digest.into()),
            ready: true,
            reason: "Rendered".into(),
            message: String::new(),
            installed: Installed::default(),
            drift: Vec::new(),
            at: Timestamp::from_second(at).unwrap(),
        })
    }

    #[test]
    fn counts_pods_on_the_current_render() {
        let pods = [pod("a", "1"), pod("b", "2"), pod("c", "3")];
        let reports = BTreeMap::from([
            ("a".to_owned(), report("1", "new", 10)),
            ("b".to_owned(), report("2", "old", 10)),
            // A report of an earlier pod of the same name does not count.
            ("c".to_owned(), report("9", "new", 10)),
        ]);
        let s = status("new", &pods, &reports);
        assert_eq!(s.pods_current, "1/3");
        assert_eq!(s.pods[1].reason, "Rendered");
        assert!(!s.pods[1].current);
        assert_eq!(s.pods[2].reason, NOT_REPORTED);
    }

    #[test]
    fn takes_the_newest_installed_set_once() {
        let mut newer = report("2", "x", 20).unwrap();
        newer.installed.plugins.insert("mine@m".into(), json!(true));
        let reports = BTreeMap::from([
            ("a".to_owned(), report("1", "x", 10)),
            ("b".to_owned(), Ok(newer)),
            ("c".to_owned(), Err("bad".to_owned())),
        ]);
        let (at, installed) = newest_installed(&reports, None).unwrap();
        assert!(installed.plugins.contains_key("mine@m"));
        assert!(newest_installed(&reports, Some(at)).is_none());
    }

    #[test]
    fn prunes_only_old_reports_of_gone_pods() {
        let reports = BTreeMap::from([
            ("gone".to_owned(), report("1", "x", 0)),
            ("young".to_owned(), report("2", "x", 1000)),
            ("live".to_owned(), report("3", "x", 0)),
        ]);
        let now = Timestamp::from_second(1100).unwrap();
        assert_eq!(stale_reports(&[pod("live", "3")], &reports, now), ["gone"]);
    }
}
