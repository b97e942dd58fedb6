//! Create, update, patch and delete: the metadata the server owns, status
//! subresource isolation, optimistic concurrency, finalizers, and admission
//! (ObjectMeta checks for every kind, schema and CEL for custom resources).

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::Shared;
use crate::error::ApiError;
use crate::fields::{self, Path};
use crate::kinds::Kind;
use crate::meta::{self, finalizers, is_deleting, metadata, metadata_mut};
use crate::patch::{self, PatchType};
use crate::schema::{self, FieldError};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{self, EventType, Key, Store};

/// Where a request points: one resource type at one version, in a namespace
/// (None for cluster-scoped kinds and cluster-wide collections).
pub(crate) struct Target {
    pub kind: Arc<Kind>,
    pub version: String,
    pub namespace: Option<String>,
}

impl Target {
    pub fn key(&self, name: &str) -> Key {
        store::key(
            &self.kind.group,
            &self.kind.plural,
            self.namespace.as_deref().unwrap_or(""),
            name,
        )
    }
}

/// Which part of the object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Part {
    Main,
    Status,
}

pub(crate) struct Written {
    /// As stored (or as it would have been, for dry runs).
    pub object: Value,
    pub code: u16,
}

/// Fields of ObjectMeta only the server sets; kept from the stored object.
const SERVER_META: &[&str] = &[
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "resourceVersion",
];

fn set_or_remove(obj: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = obj.as_object_mut() {
        match value {
            Some(v) => {
                map.insert(field.to_owned(), v);
            }
            None => {
                map.shift_remove(field);
            }
        }
    }
}

/// Checks the body's apiVersion/kind against the URL and fills them in.
fn stamp_type(obj: &mut Value, t: &Target) -> Result<(), ApiError> {
    let Some(map) = obj.as_object_mut() else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let want_version = t.kind.api_version(&t.version);
    if let Some(got) = map.get("apiVersion").and_then(Value::as_str)
        && !got.is_empty()
        && got != want_version
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({got}) does not match the expected API version ({want_version})"
        )));
    }
    if let Some(got) = map.get("kind").and_then(Value::as_str)
        && !got.is_empty()
        && got != t.kind.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({got}) does not match the expected kind ({})",
            t.kind.kind
        )));
    }
    map.insert("apiVersion".into(), Value::String(want_version));
    map.insert("kind".into(), Value::String(t.kind.kind.clone()));
    Ok(())
}

fn check_namespace(obj: &mut Value, t: &Target) -> Result<(), ApiError> {
    let meta = metadata_mut(obj);
    if !t.kind.namespaced {
        meta.shift_remove("namespace");
        return Ok(());
    }
    let Some(ns) = t.namespace.as_deref() else {
        return Err(ApiError::bad_request(
            "a namespaced object must be written under /namespaces/{namespace}/",
        ));
    };
    if let Some(got) = meta.get("namespace").and_then(Value::as_str)
        && !got.is_empty()
        && got != ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    meta.insert("namespace".into(), Value::String(ns.to_owned()));
    Ok(())
}

/// Secrets' `stringData` is write-only: real servers fold it into `data`.
fn normalize_builtin(kind: &Kind, obj: &mut Value) {
    if kind.group.is_empty()
        && kind.plural == "secrets"
        && let Some(map) = obj.as_object_mut()
        && let Some(Value::Object(string_data)) = map.shift_remove("stringData")
    {
        let data = map
            .entry("data")
            .or_insert_with(|| Value::Object(Map::new()));
        if !data.is_object() {
            *data = Value::Object(Map::new());
        }
        if let Some(data) = data.as_object_mut() {
            for (k, v) in string_data {
                let text = v.as_str().unwrap_or_default();
                let encoded = base64::engine::general_purpose::STANDARD.encode(text);
                data.insert(k, Value::String(encoded));
            }
        }
    }
}

/// ObjectMeta checks for every kind, then schema and CEL for custom kinds.
fn admit(
    store: &Store,
    t: &Target,
    name: &str,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    normalize_builtin(&t.kind, obj);
    let is_namespace = t.kind.group.is_empty() && t.kind.plural == "namespaces";
    let mut errs = meta::validate(obj, is_namespace);
    if t.kind.is_custom() {
        errs.extend(schema::admit(
            &store.validator,
            &t.kind,
            &t.version,
            obj,
            old,
        ));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(&t.kind, name, &errs))
    }
}

/// Whether a change counts for `metadata.generation`: anything but metadata,
/// and, for kinds with a status subresource, anything but status.
fn spec_changed(kind: &Kind, old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            for f in ["metadata", "apiVersion", "kind"] {
                m.shift_remove(f);
            }
            if kind.status {
                m.shift_remove("status");
            }
        }
        v
    };
    strip(old) != strip(new)
}

fn generation(obj: &Value) -> i64 {
    metadata(obj)
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64)
        .unwrap_or(0)
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    metadata_mut(obj).insert(field.to_owned(), value);
}

fn same_ignoring_version(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        set_or_remove(&mut v, "apiVersion", None);
        v
    };
    strip(a) == strip(b)
}

/// The manager a write without `fieldManager` is recorded under.
const NO_MANAGER: &str = "";

pub(crate) fn create(
    shared: &Shared,
    t: &Target,
    body: Value,
    field_manager: Option<&str>,
    dry_run: bool,
) -> Result<Written, ApiError> {
    let mut store = shared.store();
    let w = create_locked(&mut store, t, body, dry_run)?;
    if !dry_run {
        let key = t.key(meta::meta_str(&w.object, "name").unwrap_or_default());
        let mut owners = store.owners(&key);
        let view = fields::view(&w.object, Part::Main, t.kind.status);
        owners.update(
            field_manager.unwrap_or(NO_MANAGER),
            Part::Main,
            &json!({}),
            &view,
        );
        store.set_owners(&key, owners);
    }
    Ok(w)
}

/// How a committed write is recorded in the object's field ownership.
enum Writer<'a> {
    Update(&'a str),
    Apply(&'a str, BTreeSet<Path>),
}

fn record(
    store: &mut Store,
    t: &Target,
    name: &str,
    part: Part,
    writer: Writer<'_>,
    old: &Value,
    new: &Value,
) {
    let key = t.key(name);
    let mut owners = store.owners(&key);
    let old = fields::view(old, part, t.kind.status);
    let new = fields::view(new, part, t.kind.status);
    match writer {
        Writer::Update(manager) => owners.update(manager, part, &old, &new),
        Writer::Apply(manager, applied) => owners.apply(manager, part, applied, &old, &new),
    }
    store.set_owners(&key, owners);
}

fn create_locked(
    store: &mut Store,
    t: &Target,
    mut obj: Value,
    dry_run: bool,
) -> Result<Written, ApiError> {
    stamp_type(&mut obj, t)?;
    check_namespace(&mut obj, t)?;
    if meta::resource_version(&obj).is_some() {
        // What etcd storage answers; kube users meet it when re-creating a
        // fetched object.
        return Err(ApiError::internal(
            "resourceVersion should not be set on objects to be created",
        ));
    }
    let given = meta::meta_str(&obj, "name")
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let name = match given {
        Some(n) => n,
        None => match meta::meta_str(&obj, "generateName").filter(|p| !p.is_empty()) {
            Some(prefix) => {
                let prefix = prefix.to_owned();
                loop {
                    let candidate = format!("{prefix}{}", meta::name_suffix());
                    if store.get(&t.key(&candidate)).is_none() {
                        break candidate;
                    }
                }
            }
            None => {
                return Err(ApiError::invalid(
                    &t.kind,
                    "",
                    &[FieldError::required(
                        "metadata.name",
                        "name or generateName is required",
                    )],
                ));
            }
        },
    };
    {
        let m = metadata_mut(&mut obj);
        for f in SERVER_META {
            m.shift_remove(*f);
        }
        m.shift_remove("managedFields");
        m.shift_remove("selfLink");
        m.insert("name".into(), Value::String(name.clone()));
    }
    if t.kind.status {
        // Real servers reset status on create; it is written via /status.
        set_or_remove(&mut obj, "status", None);
    }
    admit(store, t, &name, &mut obj, None)?;
    meta::drop_empty_meta(&mut obj);
    let key = t.key(&name);
    if store.get(&key).is_some() {
        return Err(ApiError::already_exists(&t.kind, &name));
    }
    set_meta(&mut obj, "uid", Value::String(meta::new_uid()));
    set_meta(&mut obj, "creationTimestamp", Value::String(meta::now()));
    set_meta(&mut obj, "generation", json!(1));
    if !dry_run {
        set_meta(
            &mut obj,
            "resourceVersion",
            Value::String(store.next_rv().to_string()),
        );
        store.put(key, obj.clone(), EventType::Added);
    }
    Ok(Written {
        object: obj,
        code: 201,
    })
}

/// The shared tail of PUT, PATCH and apply: `new` is the whole object the
/// client wants; this keeps what it may not change and commits the rest.
fn commit_update(
    store: &mut Store,
    t: &Target,
    name: &str,
    old: &Value,
    mut new: Value,
    part: Part,
    dry_run: bool,
) -> Result<Written, ApiError> {
    stamp_type(&mut new, t)?;
    if let Some(rv) = meta::resource_version(&new)
        && Some(rv) != meta::resource_version(old)
    {
        return Err(ApiError::modified(&t.kind, name));
    }
    if let Some(n) = meta::meta_str(&new, "name")
        && !n.is_empty()
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    check_namespace(&mut new, t)?;
    match part {
        Part::Status => {
            let status = new.get("status").cloned();
            new = old.clone();
            set_or_remove(&mut new, "status", status);
            stamp_type(&mut new, t)?;
        }
        Part::Main => {
            if t.kind.status {
                set_or_remove(&mut new, "status", old.get("status").cloned());
            }
            let old_meta = metadata(old).cloned().unwrap_or_default();
            let m = metadata_mut(&mut new);
            for f in SERVER_META {
                match old_meta.get(*f) {
                    Some(v) => m.insert((*f).to_owned(), v.clone()),
                    None => m.shift_remove(*f),
                };
            }
            m.shift_remove("managedFields");
            m.shift_remove("selfLink");
            m.insert("name".into(), Value::String(name.to_owned()));
        }
    }
    if is_deleting(old) {
        let before = finalizers(old);
        let added: Vec<String> = finalizers(&new)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            // Go's `%#v` of a []string.
            let quoted: Vec<String> = added.iter().map(|f| json!(f).to_string()).collect();
            let error = FieldError::forbidden(
                "metadata.finalizers",
                &format!(
                    "no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                    quoted.join(", ")
                ),
            );
            // Custom resources go through this check twice (the generic
            // ObjectMeta update check and the CRD strategy's), so the real
            // server lists the cause twice and names it once.
            let errors = if t.kind.is_custom() {
                vec![error.clone(), error]
            } else {
                vec![error]
            };
            return Err(ApiError::invalid(&t.kind, name, &errors));
        }
    }
    admit(store, t, name, &mut new, Some(old))?;
    meta::drop_empty_meta(&mut new);
    if spec_changed(&t.kind, old, &new) {
        set_meta(&mut new, "generation", json!(generation(old) + 1));
    }
    if same_ignoring_version(old, &new) {
        // Real servers do not bump resourceVersion or send events for no-ops.
        return Ok(Written {
            object: old.clone(),
            code: 200,
        });
    }
    if dry_run {
        return Ok(Written {
            object: new,
            code: 200,
        });
    }
    set_meta(
        &mut new,
        "resourceVersion",
        Value::String(store.next_rv().to_string()),
    );
    let key = t.key(name);
    if is_deleting(&new) && finalizers(&new).is_empty() {
        // The write that lets a deletion finish deletes what was stored: its
        // DELETED event carries the object as it was, finalizers and all.
        let mut last = old.clone();
        set_meta(
            &mut last,
            "resourceVersion",
            new["metadata"]["resourceVersion"].clone(),
        );
        store.remove(&key, last);
    } else {
        store.put(key, new.clone(), EventType::Modified);
    }
    Ok(Written {
        object: new,
        code: 200,
    })
}

pub(crate) fn replace(
    shared: &Shared,
    t: &Target,
    name: &str,
    body: Value,
    part: Part,
    field_manager: Option<&str>,
    dry_run: bool,
) -> Result<Written, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let mut store = shared.store();
    let old = store
        .get(&t.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&t.kind, name))?;
    let writer = Writer::Update(field_manager.unwrap_or(NO_MANAGER));
    if meta::resource_version(&body).is_none() && !t.kind.allows_unconditional_update() {
        return Err(ApiError::invalid(
            &t.kind,
            name,
            &[FieldError::invalid_rendered(
                "metadata.resourceVersion",
                "0x0",
                "must be specified for an update",
            )],
        ));
    }
    let w = commit_update(&mut store, t, name, &old, body, part, dry_run)?;
    if !dry_run {
        record(&mut store, t, name, part, writer, &old, &w.object);
    }
    Ok(w)
}

pub(crate) struct PatchRequest<'a> {
    pub patch_type: PatchType,
    pub body: &'a [u8],
    pub field_manager: Option<&'a str>,
    pub dry_run: bool,
}

pub(crate) fn patch(
    shared: &Shared,
    t: &Target,
    name: &str,
    part: Part,
    req: &PatchRequest<'_>,
) -> Result<Written, ApiError> {
    if req.patch_type == PatchType::Apply && req.field_manager.is_none_or(str::is_empty) {
        return Err(ApiError::bad_request(
            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
        ));
    }
    if req.patch_type == PatchType::Strategic && t.kind.is_custom() {
        return Err(ApiError::unsupported_media_type(format!(
            "the body of the request was in an unknown format - accepted media types include: {}",
            patch::SUPPORTED
        )));
    }
    let body = patch::parse_body(req.body, req.patch_type)?;
    let mut store = shared.store();
    let Some(old) = store.get(&t.key(name)).cloned() else {
        if req.patch_type == PatchType::Apply && part == Part::Main {
            let applied = fields::fields(&fields::view(&body, part, t.kind.status));
            let w = apply_create(&mut store, t, name, body, req.dry_run)?;
            if !req.dry_run {
                let manager = req.field_manager.unwrap_or(NO_MANAGER);
                record(
                    &mut store,
                    t,
                    name,
                    part,
                    Writer::Apply(manager, applied),
                    &json!({}),
                    &w.object,
                );
            }
            return Ok(w);
        }
        return Err(ApiError::not_found(&t.kind, name));
    };
    // Patches apply to the object as read at the request's version.
    let mut view = old.clone();
    view["apiVersion"] = Value::String(t.kind.api_version(&t.version));
    let manager = req.field_manager.unwrap_or(NO_MANAGER);
    let (candidate, writer) = match req.patch_type {
        PatchType::Apply => {
            check_applied_object(&body)?;
            let applied = fields::fields(&fields::view(&body, part, t.kind.status));
            let mut c = match part {
                Part::Main => patch::apply(&view, PatchType::Apply, &body)?,
                Part::Status => {
                    let mut c = view;
                    if let Some(status) = body.get("status") {
                        c = patch::apply(&c, PatchType::Apply, &json!({"status": status}))?;
                    }
                    if let Some(rv) = meta::resource_version(&body) {
                        set_meta(&mut c, "resourceVersion", Value::String(rv.to_owned()));
                    }
                    c
                }
            };
            // What this manager applied before and leaves out now goes,
            // unless another manager set it too.
            for path in store.owners(&t.key(name)).dropped(manager, part, &applied) {
                fields::remove(&mut c, &path);
            }
            (c, Writer::Apply(manager, applied))
        }
        other => (patch::apply(&view, other, &body)?, Writer::Update(manager)),
    };
    let w = commit_update(&mut store, t, name, &old, candidate, part, req.dry_run)?;
    if !req.dry_run {
        record(&mut store, t, name, part, writer, &old, &w.object);
    }
    Ok(w)
}

fn check_applied_object(body: &Value) -> Result<(), ApiError> {
    let has = |f: &str| {
        body.get(f)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    if !body.is_object() || !has("apiVersion") || !has("kind") {
        return Err(ApiError::bad_request(
            "an apply patch must be an object with apiVersion and kind",
        ));
    }
    Ok(())
}

/// Server-side apply of an absent object creates it.
fn apply_create(
    store: &mut Store,
    t: &Target,
    name: &str,
    mut body: Value,
    dry_run: bool,
) -> Result<Written, ApiError> {
    check_applied_object(&body)?;
    if let Some(n) = meta::meta_str(&body, "name")
        && !n.is_empty()
        && n != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({name})"
        )));
    }
    let m = metadata_mut(&mut body);
    m.insert("name".into(), Value::String(name.to_owned()));
    m.shift_remove("resourceVersion");
    create_locked(store, t, body, dry_run)
}

fn check_preconditions(
    t: &Target,
    name: &str,
    obj: &Value,
    options: &Value,
) -> Result<(), ApiError> {
    let Some(pre) = options.get("preconditions") else {
        return Ok(());
    };
    if let Some(uid) = pre.get("uid").and_then(Value::as_str) {
        let actual = meta::meta_str(obj, "uid").unwrap_or("");
        if uid != actual {
            return Err(ApiError::conflict(
                &t.kind,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"
                ),
            ));
        }
    }
    if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str) {
        let actual = meta::resource_version(obj).unwrap_or("");
        if rv != actual {
            return Err(ApiError::conflict(
                &t.kind,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in meta: {actual}"
                ),
            ));
        }
    }
    Ok(())
}

pub(crate) fn delete(
    shared: &Shared,
    t: &Target,
    name: &str,
    options: &Value,
    dry_run: bool,
) -> Result<Written, ApiError> {
    let mut store = shared.store();
    delete_locked(&mut store, t, name, options, dry_run)
}

/// Deletes now, or, while finalizers remain, marks the object as deleting.
pub(crate) fn delete_locked(
    store: &mut Store,
    t: &Target,
    name: &str,
    options: &Value,
    dry_run: bool,
) -> Result<Written, ApiError> {
    let key = t.key(name);
    let old = store
        .get(&key)
        .cloned()
        .ok_or_else(|| ApiError::not_found(&t.kind, name))?;
    check_preconditions(t, name, &old, options)?;
    let done = |object| Written { object, code: 200 };
    if t.kind.group.is_empty()
        && t.kind.plural == "pods"
        && let Some(w) = delete_pod_gracefully(store, &key, &old, options, dry_run)
    {
        return Ok(w);
    }
    if !finalizers(&old).is_empty() {
        if is_deleting(&old) {
            return Ok(done(old));
        }
        let mut new = old.clone();
        set_meta(&mut new, "deletionTimestamp", Value::String(meta::now()));
        set_meta(&mut new, "deletionGracePeriodSeconds", json!(0));
        if generation(&old) > 0 {
            set_meta(&mut new, "generation", json!(generation(&old) + 1));
        }
        if dry_run {
            return Ok(done(new));
        }
        set_meta(
            &mut new,
            "resourceVersion",
            Value::String(store.next_rv().to_string()),
        );
        store.put(key, new.clone(), EventType::Modified);
        return Ok(done(new));
    }
    if dry_run {
        return Ok(done(old));
    }
    let mut gone = old;
    set_meta(
        &mut gone,
        "resourceVersion",
        Value::String(store.next_rv().to_string()),
    );
    store.remove(&key, gone.clone());
    Ok(done(gone))
}

/// What a pod's `terminationGracePeriodSeconds` is defaulted to.
const DEFAULT_GRACE_PERIOD: i64 = 30;

/// How long a pod may take to stop, as the pod strategy reckons it: what
/// the delete asks for, else the pod's own grace period; none for a pod on
/// no node (no kubelet will stop it) or one that has finished.
fn pod_grace_period(pod: &Value, options: &Value) -> i64 {
    let asked = options.get("gracePeriodSeconds").and_then(Value::as_i64);
    let own = pod
        .pointer("/spec/terminationGracePeriodSeconds")
        .and_then(Value::as_i64);
    let scheduled = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let finished = matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    );
    if asked.is_some_and(|p| p < 0) {
        1
    } else if !scheduled || finished {
        0
    } else {
        asked.or(own).unwrap_or(DEFAULT_GRACE_PERIOD)
    }
}

/// Pods are deleted gracefully: the deletion is stamped on the pod
/// (`deletionTimestamp` at the deadline, `deletionGracePeriodSeconds`) and
/// the pod stays until its kubelet deletes it again with a grace period of
/// 0; with no time to give (no node, finished, or 0 asked for) it goes at
/// once, after that stamp. A pod already stopping may only be given less
/// time. None when the ordinary deletion applies instead.
fn delete_pod_gracefully(
    store: &mut Store,
    key: &Key,
    old: &Value,
    options: &Value,
    dry_run: bool,
) -> Option<Written> {
    let given = metadata(old)
        .and_then(|m| m.get("deletionGracePeriodSeconds"))
        .and_then(Value::as_i64);
    let mut new = old.clone();
    let period = if is_deleting(old) {
        let current = given.filter(|g| *g > 0)?;
        let asked = options.get("gracePeriodSeconds").and_then(Value::as_i64);
        let period = match asked {
            Some(p) if p < current => p.max(0),
            _ => {
                return Some(Written {
                    object: old.clone(),
                    code: 200,
                });
            }
        };
        let deadline = meta::meta_str(old, "deletionTimestamp")
            .and_then(|t| meta::shift_time(t, period - current))
            .unwrap_or_else(|| meta::seconds_from_now(period));
        set_meta(&mut new, "deletionTimestamp", Value::String(deadline));
        period
    } else {
        let period = pod_grace_period(old, options);
        set_meta(
            &mut new,
            "deletionTimestamp",
            Value::String(meta::seconds_from_now(period)),
        );
        if generation(old) > 0 {
            set_meta(&mut new, "generation", json!(generation(old) + 1));
        }
        period
    };
    set_meta(&mut new, "deletionGracePeriodSeconds", json!(period));
    if dry_run {
        return Some(Written {
            object: new,
            code: 200,
        });
    }
    set_meta(
        &mut new,
        "resourceVersion",
        Value::String(store.next_rv().to_string()),
    );
    store.put(key.clone(), new.clone(), EventType::Modified);
    if period == 0 && finalizers(&new).is_empty() {
        set_meta(
            &mut new,
            "resourceVersion",
            Value::String(store.next_rv().to_string()),
        );
        store.remove(key, new.clone());
    }
    Some(Written {
        object: new,
        code: 200,
    })
}

pub(crate) fn delete_collection(
    shared: &Shared,
    t: &Target,
    labels: &LabelSelector,
    fields: &FieldSelector,
    options: &Value,
    dry_run: bool,
) -> Result<Vec<Value>, ApiError> {
    let mut store = shared.store();
    let names: Vec<(Option<String>, String)> = store
        .scan(&t.kind.group, &t.kind.plural, t.namespace.as_deref())
        .filter(|(_, obj)| labels.matches_object(obj) && fields.matches(obj))
        .map(|(k, _)| ((!k.2.is_empty()).then(|| k.2.clone()), k.3.clone()))
        .collect();
    let mut deleted = Vec::new();
    for (namespace, name) in names {
        let one = Target {
            kind: t.kind.clone(),
            version: t.version.clone(),
            namespace,
        };
        deleted.push(delete_locked(&mut store, &one, &name, options, dry_run)?.object);
    }
    Ok(deleted)
}
