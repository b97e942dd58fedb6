//! `POST pods/{name}/eviction`: a delete that PodDisruptionBudgets may refuse.
//!
//! There is no disruption controller, so instead of reading a PDB's status
//! the budget is worked out from the pods (and their controllers' replicas)
//! present at the time of the request.

use serde_json::{Value, json};

use crate::Shared;
use crate::error::{ApiError, success_status};
use crate::meta::{self, is_deleting};
use crate::selector::LabelSelector;
use crate::store::Store;
use crate::write::{Target, delete_locked};

/// Running, or not yet given a status by anyone (there is no kubelet to
/// report one, so such pods are taken to be up).
fn is_healthy(pod: &Value) -> bool {
    if is_deleting(pod) {
        return false;
    }
    match pod.pointer("/status/phase").and_then(Value::as_str) {
        None | Some("Running") => true,
        Some(_) => false,
    }
}

/// Resolves an int-or-percentage against `total`, rounding up as the
/// disruption controller does.
fn scaled(v: &Value, total: i64) -> Result<i64, String> {
    if let Some(n) = v.as_i64() {
        return Ok(n);
    }
    let text = v.as_str().ok_or("must be an integer or a percentage")?;
    let pct: i64 = text
        .strip_suffix('%')
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("invalid value {text:?}: must be an integer or a percentage"))?;
    Ok((pct * total + 99) / 100)
}

/// How many pods the budgeted pods' controllers want: the replicas of each
/// owning StatefulSet or Deployment (a Deployment may be named as the pod's
/// owner directly, there being no ReplicaSets here), plus one for each pod
/// with no such owner.
fn controller_scale(store: &Store, namespace: &str, pods: &[&Value]) -> i64 {
    let mut owners = Vec::new();
    let mut orphans = 0;
    for pod in pods {
        let owner = pod
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|o| o.get("controller").and_then(Value::as_bool) == Some(true))
            .and_then(|o| {
                let plural = match o.get("kind").and_then(Value::as_str)? {
                    "StatefulSet" => "statefulsets",
                    "Deployment" => "deployments",
                    _ => return None,
                };
                let name = o.get("name").and_then(Value::as_str)?;
                store
                    .get(&crate::store::key("apps", plural, namespace, name))
                    .map(|c| (plural, name.to_owned(), c))
            });
        match owner {
            Some((plural, name, controller)) => {
                if !owners.iter().any(|(p, n, _)| *p == plural && *n == name) {
                    let replicas = controller
                        .pointer("/spec/replicas")
                        .and_then(Value::as_i64)
                        .unwrap_or(1);
                    owners.push((plural, name, replicas));
                }
            }
            None => orphans += 1,
        }
    }
    owners.iter().map(|(_, _, r)| r).sum::<i64>() + orphans
}

struct Budget {
    name: String,
    desired: i64,
    healthy: i64,
}

fn budget(
    store: &Store,
    namespace: &str,
    pdb: &Value,
    selector: &LabelSelector,
) -> Result<Budget, ApiError> {
    let name = meta::meta_str(pdb, "name").unwrap_or_default().to_owned();
    let pods: Vec<&Value> = store
        .scan("", "pods", Some(namespace))
        .map(|(_, p)| p)
        .filter(|p| selector.matches_object(p))
        .collect();
    let healthy = pods.iter().filter(|p| is_healthy(p)).count() as i64;
    let spec = pdb.get("spec").cloned().unwrap_or(Value::Null);
    let bad = |e: String| ApiError::internal(format!("PodDisruptionBudget {name}: {e}"));
    let desired = if let Some(max) = spec.get("maxUnavailable").filter(|v| !v.is_null()) {
        let expected = controller_scale(store, namespace, &pods);
        (expected - scaled(max, expected).map_err(bad)?).max(0)
    } else if let Some(min) = spec.get("minAvailable").filter(|v| !v.is_null()) {
        // Like the disruption controller: a plain number needs no scale, a
        // percentage is of the controllers' replicas.
        if min.is_string() {
            scaled(min, controller_scale(store, namespace, &pods)).map_err(bad)?
        } else {
            scaled(min, pods.len() as i64).map_err(bad)?
        }
    } else {
        // policy/v1 defaults an empty budget to minAvailable: 1.
        1
    };
    Ok(Budget {
        name,
        desired,
        healthy,
    })
}

pub(crate) fn evict(
    shared: &Shared,
    pods: &Target,
    name: &str,
    body: &Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    if let Some(n) = meta::meta_str(body, "name")
        && !n.is_empty()
        && n != name
    {
        return Err(ApiError::bad_request(
            "name in URL does not match name in Eviction object",
        ));
    }
    // kube-client 5 sends `delete_options`; the API spells it `deleteOptions`.
    let options = body
        .get("deleteOptions")
        .or_else(|| body.get("delete_options"))
        .filter(|o| o.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    let namespace = pods.namespace.as_deref().unwrap_or_default();
    let mut store = shared.store();
    let pod = store
        .get(&pods.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&pods.kind, name))?;

    if is_healthy(&pod) {
        let mut budgets = Vec::new();
        for (_, pdb) in store.scan("policy", "poddisruptionbudgets", Some(namespace)) {
            // A missing or malformed selector matches no pod, as on a real server.
            let Some(sel) = pdb.pointer("/spec/selector").filter(|s| s.is_object()) else {
                continue;
            };
            let Ok(selector) = LabelSelector::from_object(sel) else {
                continue;
            };
            if selector.matches_object(&pod) {
                budgets.push((pdb.clone(), selector));
            }
        }
        if budgets.len() > 1 {
            return Err(ApiError::internal(
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        if let Some((pdb, selector)) = budgets.first() {
            let b = budget(&store, namespace, pdb, selector)?;
            if b.healthy - b.desired < 1 {
                return Err(ApiError {
                    details: Some(json!({
                        "causes": [{
                            "reason": "DisruptionBudget",
                            "message": format!(
                                "The disruption budget {} needs {} healthy pods and has {} currently",
                                b.name, b.desired, b.healthy
                            ),
                        }]
                    })),
                    ..ApiError::new(
                        429,
                        "TooManyRequests",
                        "Cannot evict pod as it would violate the pod's disruption budget.",
                    )
                });
            }
        }
    }
    delete_locked(&mut store, pods, name, &options, dry_run)?;
    Ok(success_status(201))
}
