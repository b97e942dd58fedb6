//! `POST pods/{name}/eviction`: a delete that PodDisruptionBudgets may refuse.
//!
//! A budget whose status has been written (by a test playing the disruption
//! controller) decides as on a real server: from its status, which each
//! eviction spends. One that no one has observed yet is worked out from the
//! pods (and their controllers' replicas) present at the time of the
//! request, standing in for the disruption controller the double lacks.

use serde_json::{Map, Value, json};

use crate::Shared;
use crate::error::{ApiError, success_status};
use crate::meta::{self, is_deleting};
use crate::selector::LabelSelector;
use crate::store::{self, EventType, Store};
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

/// Whether the eviction API may delete the pod without asking a budget:
/// it is not running yet, has finished, or is already being deleted.
fn can_ignore_budgets(pod: &Value) -> bool {
    is_deleting(pod)
        || matches!(
            pod.pointer("/status/phase").and_then(Value::as_str),
            Some("Pending" | "Succeeded" | "Failed")
        )
}

/// A pod's `Ready` condition is `True`.
fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn too_many_requests(cause: String, retry_after: Option<u64>) -> ApiError {
    let mut details = json!({"causes": [{"reason": "DisruptionBudget", "message": cause}]});
    if let Some(secs) = retry_after {
        details["retryAfterSeconds"] = json!(secs);
    }
    ApiError {
        details: Some(details),
        ..ApiError::new(
            429,
            "TooManyRequests",
            "Cannot evict pod as it would violate the pod's disruption budget.",
        )
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// What a budget with a status says, as kube-apiserver reads it: `Ok(None)`
/// to evict without spending it, `Ok(Some(status))` to evict and store the
/// spent status, or the refusal.
fn decide_by_status(pdb: &Value, pod: &Value, pod_name: &str) -> Result<Option<Value>, ApiError> {
    let name = meta::meta_str(pdb, "name").unwrap_or_default();
    let status = &pdb["status"];
    if !is_ready(pod) {
        // An unready pod does not count as healthy: taking it away costs
        // nothing while the budget is met, or always under AlwaysAllow.
        let always = pdb.pointer("/spec/unhealthyPodEvictionPolicy") == Some(&json!("AlwaysAllow"));
        let desired = int(&status["desiredHealthy"]);
        if always || (int(&status["currentHealthy"]) >= desired && desired > 0) {
            return Ok(None);
        }
    }
    let generation = pdb
        .pointer("/metadata/generation")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if int(&status["observedGeneration"]) < generation {
        return Err(too_many_requests(
            format!("The disruption budget {name} is still being processed by the server."),
            Some(10),
        ));
    }
    let allowed = int(&status["disruptionsAllowed"]);
    if allowed < 0 {
        return Err(ApiError::forbidden(
            "policy",
            "poddisruptionbudgets",
            name,
            "pdb disruptions allowed is negative",
        ));
    }
    if allowed == 0 {
        return Err(too_many_requests(
            format!("The disruption budget {name} does not allow evicting pods currently"),
            None,
        ));
    }
    let mut spent = status.clone();
    spent["disruptionsAllowed"] = json!(allowed - 1);
    if allowed == 1 {
        set_condition(
            &mut spent,
            json!({"type": "DisruptionAllowed", "status": "False", "reason": "InsufficientPods",
                   "message": "", "observedGeneration": status["observedGeneration"]}),
        );
    }
    if !spent["disruptedPods"].is_object() {
        spent["disruptedPods"] = Value::Object(Map::new());
    }
    spent["disruptedPods"][pod_name] = json!(meta::now());
    Ok(Some(spent))
}

/// `meta.SetStatusCondition`: replaces the condition of the same type,
/// keeping its transition time unless the status changes.
fn set_condition(status: &mut Value, mut condition: Value) {
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let Some(conditions) = status["conditions"].as_array_mut() else {
        return;
    };
    match conditions
        .iter_mut()
        .find(|c| c["type"] == condition["type"])
    {
        Some(existing) => {
            condition["lastTransitionTime"] = if existing["status"] == condition["status"] {
                existing["lastTransitionTime"].clone()
            } else {
                json!(meta::now())
            };
            *existing = condition;
        }
        None => {
            condition["lastTransitionTime"] = json!(meta::now());
            conditions.push(condition);
        }
    }
}

/// Writes a changed status of an object kept by the double itself (a
/// budget, a pod), as its own controller would.
fn store_status(store: &mut Store, key: store::Key, old: &Value, status: Value) {
    let mut new = old.clone();
    new["status"] = status;
    if new == *old {
        return;
    }
    new["metadata"]["resourceVersion"] = json!(store.next_rv().to_string());
    store.put(key, new, EventType::Modified);
}

/// Marks the pod as disrupted by the eviction API before deleting it, as
/// kube-apiserver does.
fn mark_disrupted(store: &mut Store, pods: &Target, name: &str) {
    let key = pods.key(name);
    let Some(pod) = store.get(&key).cloned() else {
        return;
    };
    let mut status = pod.get("status").cloned().unwrap_or_else(|| json!({}));
    let condition = json!({"type": "DisruptionTarget", "status": "True", "lastProbeTime": null,
                           "reason": "EvictionByEvictionAPI", "message": "Eviction API: evicting"});
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    if let Some(conditions) = status["conditions"].as_array_mut() {
        match conditions
            .iter_mut()
            .find(|c| c["type"] == "DisruptionTarget")
        {
            Some(existing) => {
                let mut c = condition;
                c["lastTransitionTime"] = if existing["status"] == "True" {
                    existing["lastTransitionTime"].clone()
                } else {
                    json!(meta::now())
                };
                *existing = c;
            }
            None => {
                let mut c = condition;
                c["lastTransitionTime"] = json!(meta::now());
                conditions.push(c);
            }
        }
    }
    store_status(store, key, &pod, status);
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
    // Only `deleteOptions` counts: the `delete_options` kube-client 5 sends
    // is an unknown field to a real server, which ignores it.
    let options = body
        .get("deleteOptions")
        .filter(|o| o.is_object())
        .cloned()
        .unwrap_or_else(|| json!({}));
    let namespace = pods.namespace.as_deref().unwrap_or_default();
    let mut store = shared.store();
    let pod = store
        .get(&pods.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&pods.kind, name))?;

    if !can_ignore_budgets(&pod) {
        let mut budgets = Vec::new();
        for (key, pdb) in store.scan("policy", "poddisruptionbudgets", Some(namespace)) {
            // A missing or malformed selector matches no pod, as on a real server.
            let Some(sel) = pdb.pointer("/spec/selector").filter(|s| s.is_object()) else {
                continue;
            };
            let Ok(selector) = LabelSelector::from_object(sel) else {
                continue;
            };
            if selector.matches_object(&pod) {
                budgets.push((key.clone(), pdb.clone(), selector));
            }
        }
        if budgets.len() > 1 {
            // Built by hand in the eviction handler: a Status with no reason.
            return Err(ApiError::new(
                500,
                "",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            ));
        }
        if let Some((key, pdb, selector)) = budgets.into_iter().next() {
            let observed = pdb
                .pointer("/status/observedGeneration")
                .is_some_and(|g| !g.is_null());
            if observed {
                if let Some(spent) = decide_by_status(&pdb, &pod, name)?
                    && !dry_run
                {
                    store_status(&mut store, key, &pdb, spent);
                }
            } else if is_healthy(&pod) {
                let b = budget(&store, namespace, &pdb, &selector)?;
                if b.healthy - b.desired < 1 {
                    return Err(too_many_requests(
                        format!(
                            "The disruption budget {} needs {} healthy pods and has {} currently",
                            b.name, b.desired, b.healthy
                        ),
                        None,
                    ));
                }
            }
        }
    }
    if !dry_run {
        mark_disrupted(&mut store, pods, name);
    }
    delete_locked(&mut store, pods, name, &options, dry_run)?;
    Ok(success_status(201))
}
