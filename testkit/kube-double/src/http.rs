//! The HTTP surface: URL shapes, verbs, query parameters, and the request log.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use base64::Engine;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::meta::present;
use crate::patch::{PatchType, SUPPORTED};
use crate::selector::{FieldSelector, LabelSelector};
use crate::watch::{self, WatchRequest};
use crate::write::{self, Part, PatchRequest, Target};
use crate::{Request, Shared, discovery, eviction};

// Real servers pick 30-60 minutes for a watch without timeoutSeconds.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);
const MAX_BODY: usize = 64 << 20;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().fallback(handle).with_state(shared)
}

fn json_response(code: u16, body: &Value, content_type: &str) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(body.to_string()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

fn ok(code: u16, body: &Value) -> Response {
    json_response(code, body, "application/json")
}

fn error_response(e: &ApiError) -> Response {
    ok(e.code, &e.to_status())
}

type Query = HashMap<String, String>;

fn parse_query(q: Option<&str>) -> Query {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn is_true(q: &Query, key: &str) -> bool {
    matches!(q.get(key).map(String::as_str), Some("true" | "1"))
}

/// A parsed resource URL.
struct Route<'a> {
    group: &'a str,
    version: &'a str,
    namespace: Option<&'a str>,
    resource: &'a str,
    name: Option<&'a str>,
    subresource: Option<&'a str>,
}

fn parse_route<'a>(segments: &[&'a str]) -> Option<Route<'a>> {
    let (group, version, rest) = match segments {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    // `namespaces/{name}/status` is the Namespace's own subresource, not a
    // resource called "status" inside it.
    let namespace_subresource =
        group.is_empty() && rest.len() == 3 && matches!(rest[2], "status" | "finalize");
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() && !namespace_subresource => {
            (Some(*ns), tail)
        }
        _ => (None, rest),
    };
    match rest {
        [resource] => Some(Route {
            group,
            version,
            namespace,
            resource,
            name: None,
            subresource: None,
        }),
        [resource, name] => Some(Route {
            group,
            version,
            namespace,
            resource,
            name: Some(name),
            subresource: None,
        }),
        [resource, name, sub] => Some(Route {
            group,
            version,
            namespace,
            resource,
            name: Some(name),
            subresource: Some(sub),
        }),
        _ => None,
    }
}

fn verb(method: &Method, route: &Route<'_>, q: &Query) -> &'static str {
    match (method.as_str(), route.name) {
        ("GET", None) if is_true(q, "watch") => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", None) => "deletecollection",
        ("DELETE", Some(_)) => "delete",
        _ => "unknown",
    }
}

async fn handle(State(shared): State<Arc<Shared>>, req: axum::extract::Request) -> Response {
    let (parts, body) = req.into_parts();
    let segments: Vec<&str> = parts
        .uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(resp) = serve_discovery(&shared, &parts.headers, &segments) {
        return resp;
    }
    let Some(route) = parse_route(&segments) else {
        return error_response(&ApiError::path_not_found());
    };
    let q = parse_query(parts.uri.query());
    let verb = verb(&parts.method, &route, &q);
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(format!("reading the body: {e}"))),
    };
    let outcome = dispatch(
        &shared,
        verb,
        &parts.method,
        &parts.headers,
        &route,
        &q,
        &body,
    );
    let (response, code) = match outcome {
        Ok(Outcome::Json { code, body }) => (ok(code, &body), code),
        Ok(Outcome::Stream(rx)) => {
            let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
            let resp = Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(stream))
                .unwrap_or_else(|_| Response::new(Body::empty()));
            (resp, 200)
        }
        Err(e) => (error_response(&e), e.code),
    };
    // Who asked: the bearer token, so a test can tell the operator's calls
    // (made with the kubeconfig's token) from its own.
    let user = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_owned();
    shared.record(Request {
        user,
        verb: verb.to_owned(),
        group: route.group.to_owned(),
        version: route.version.to_owned(),
        resource: route.resource.to_owned(),
        subresource: route.subresource.map(str::to_owned),
        namespace: route.namespace.map(str::to_owned),
        name: route.name.map(str::to_owned),
        status: code,
    });
    response
}

fn serve_discovery(shared: &Shared, headers: &HeaderMap, segments: &[&str]) -> Option<Response> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let aggregated = discovery::wants_aggregated(accept);
    let reg = &shared.registry;
    let not_found = || error_response(&ApiError::path_not_found());
    let resp = match segments {
        ["version"] => ok(200, &discovery::version()),
        ["api"] if aggregated => json_response(
            200,
            &discovery::aggregated(reg, true),
            discovery::AGGREGATED_CONTENT_TYPE,
        ),
        ["api"] => ok(200, &discovery::core_versions(&shared.addr.to_string())),
        ["apis"] if aggregated => json_response(
            200,
            &discovery::aggregated(reg, false),
            discovery::AGGREGATED_CONTENT_TYPE,
        ),
        ["apis"] => ok(200, &discovery::group_list(reg)),
        ["api", v] => discovery::resource_list(reg, "", v).map_or_else(not_found, |d| ok(200, &d)),
        ["apis", g] => discovery::group(reg, g).map_or_else(not_found, |d| ok(200, &d)),
        ["apis", g, v] => {
            discovery::resource_list(reg, g, v).map_or_else(not_found, |d| ok(200, &d))
        }
        ["openapi", ..] => not_found(),
        ["healthz" | "livez" | "readyz", ..] => Response::new(Body::from("ok")),
        _ => return None,
    };
    Some(resp)
}

enum Outcome {
    Json { code: u16, body: Value },
    Stream(tokio::sync::mpsc::Receiver<String>),
}

fn json(code: u16, body: Value) -> Outcome {
    Outcome::Json { code, body }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the request body as JSON: {e}")))
}

fn is_dry_run(q: &Query, body: Option<&Value>) -> bool {
    q.get("dryRun").is_some_and(|v| v == "All")
        || body
            .and_then(|b| b.get("dryRun"))
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|v| v == "All"))
}

fn wants_metadata_only(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=PartialObjectMetadata"))
        })
}

fn selectors(
    kind: &crate::kinds::Kind,
    q: &Query,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(
        q.get("fieldSelector").map_or("", String::as_str),
        &kind.selectable_fields,
    )
    .map_err(ApiError::bad_request)?;
    Ok((labels, fields))
}

fn dispatch(
    shared: &Arc<Shared>,
    verb: &str,
    method: &Method,
    headers: &HeaderMap,
    route: &Route<'_>,
    q: &Query,
    body: &Bytes,
) -> Result<Outcome, ApiError> {
    let kind = shared
        .registry
        .find(route.group, route.version, route.resource)
        .cloned()
        .ok_or_else(ApiError::path_not_found)?;
    if route.namespace.is_some() && !kind.namespaced {
        return Err(ApiError::path_not_found());
    }
    let single_object = route.name.is_some();
    if single_object && kind.namespaced && route.namespace.is_none() {
        return Err(ApiError::path_not_found());
    }
    let part = match route.subresource {
        None => Part::Main,
        Some("status") if kind.status => Part::Status,
        Some("eviction") if kind.eviction => {
            if *method != Method::POST {
                return Err(ApiError::method_not_allowed(format!(
                    "{method} is not supported on pods/eviction"
                )));
            }
            Part::Main
        }
        Some(_) => return Err(ApiError::path_not_found()),
    };
    let t = Target {
        version: route.version.to_owned(),
        namespace: route.namespace.map(str::to_owned),
        kind: kind.clone(),
    };
    let api_version = kind.api_version(route.version);
    let meta_only = wants_metadata_only(headers);
    let show = |obj: &Value| present(obj, &api_version, meta_only);
    let written = |w: write::Written| Outcome::Json {
        code: w.code,
        body: present(&w.object, &api_version, meta_only),
    };

    match (verb, route.name) {
        ("get", Some(name)) => {
            let obj = shared
                .store()
                .get(&t.key(name))
                .cloned()
                .ok_or_else(|| ApiError::not_found(&kind, name))?;
            Ok(json(200, show(&obj)))
        }
        ("list", None) => list(shared, &t, q, meta_only).map(|v| json(200, v)),
        ("watch", None) => {
            let (labels, fields) = selectors(&kind, q)?;
            let timeout = match q.get("timeoutSeconds") {
                Some(s) => Duration::from_secs(s.parse().map_err(|_| {
                    ApiError::bad_request(format!("invalid timeoutSeconds: {s:?}"))
                })?),
                None => DEFAULT_WATCH_TIMEOUT,
            };
            if is_true(q, "sendInitialEvents")
                && q.get("resourceVersionMatch").map(String::as_str) != Some("NotOlderThan")
            {
                return Err(ApiError::bad_request(
                    "sendInitialEvents requires resourceVersionMatch=NotOlderThan",
                ));
            }
            let req = WatchRequest {
                target: t,
                labels,
                fields,
                meta_only,
                bookmarks: is_true(q, "allowWatchBookmarks"),
                send_initial_events: is_true(q, "sendInitialEvents"),
                timeout,
                resource_version: q.get("resourceVersion").cloned(),
            };
            watch::start(shared, req).map(Outcome::Stream)
        }
        ("create", None) => {
            if part != Part::Main {
                return Err(ApiError::method_not_allowed(
                    "create is not supported on this subresource",
                ));
            }
            let obj = parse_json(body)?;
            let dry_run = is_dry_run(q, None);
            let manager = q.get("fieldManager").map(String::as_str);
            let w = write::create(shared, &t, obj, manager, dry_run)?;
            Ok(written(w))
        }
        ("create", Some(name)) if route.subresource == Some("eviction") => {
            let obj = parse_json(body)?;
            let dry_run = is_dry_run(q, None);
            eviction::evict(shared, &t, name, &obj, dry_run).map(|s| json(201, s))
        }
        ("update", Some(name)) => {
            let obj = parse_json(body)?;
            let manager = q.get("fieldManager").map(String::as_str);
            let w = write::replace(shared, &t, name, obj, part, manager, is_dry_run(q, None))?;
            Ok(written(w))
        }
        ("patch", Some(name)) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let patch_type = PatchType::from_content_type(ct).ok_or_else(|| {
                ApiError::unsupported_media_type(format!(
                    "the body of the request was in an unknown format - accepted media types include: {SUPPORTED}"
                ))
            })?;
            let req = PatchRequest {
                patch_type,
                body,
                field_manager: q.get("fieldManager").map(String::as_str),
                dry_run: is_dry_run(q, None),
            };
            let w = write::patch(shared, &t, name, part, &req)?;
            Ok(written(w))
        }
        ("delete", Some(name)) => {
            if part != Part::Main {
                return Err(ApiError::method_not_allowed(
                    "delete is not supported on this subresource",
                ));
            }
            let options = if body.is_empty() {
                json!({})
            } else {
                parse_json(body)?
            };
            let dry_run = is_dry_run(q, Some(&options));
            let w = write::delete(shared, &t, name, &options, dry_run)?;
            Ok(json(200, show(&w.object)))
        }
        ("deletecollection", None) => {
            let (labels, fields) = selectors(&kind, q)?;
            let options = if body.is_empty() {
                json!({})
            } else {
                parse_json(body)?
            };
            let dry_run = is_dry_run(q, Some(&options));
            let deleted =
                write::delete_collection(shared, &t, &labels, &fields, &options, dry_run)?;
            let items: Vec<Value> = deleted
                .iter()
                .map(|o| list_item(&kind, o, &api_version, meta_only))
                .collect();
            let rv = shared.store().resource_version();
            Ok(json(
                200,
                list_doc(&kind, &api_version, meta_only, rv, None, items),
            ))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "{method} is not supported on {}",
            if single_object {
                "an object"
            } else {
                "a collection"
            }
        ))),
    }
}

/// Real servers leave apiVersion/kind off the items of built-in lists but
/// keep them on custom resources; clients must cope with both.
fn list_item(kind: &crate::kinds::Kind, obj: &Value, api_version: &str, meta_only: bool) -> Value {
    let mut item = present(obj, api_version, meta_only);
    if !meta_only
        && !kind.is_custom()
        && let Some(m) = item.as_object_mut()
    {
        m.shift_remove("apiVersion");
        m.shift_remove("kind");
    }
    item
}

fn list_doc(
    kind: &crate::kinds::Kind,
    api_version: &str,
    meta_only: bool,
    rv: u64,
    continue_token: Option<String>,
    items: Vec<Value>,
) -> Value {
    let (api_version, list_kind) = if meta_only {
        ("meta.k8s.io/v1", "PartialObjectMetadataList")
    } else {
        (api_version, kind.list_kind.as_str())
    };
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = continue_token {
        metadata["continue"] = Value::String(c);
    }
    json!({"kind": list_kind, "apiVersion": api_version, "metadata": metadata, "items": items})
}

/// Opaque to clients: the snapshot resourceVersion and the last key served.
fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    let raw = json!({"rv": rv, "start": [namespace, name]}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let bad = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&raw).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let ns = v
        .pointer("/start/0")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    let name = v
        .pointer("/start/1")
        .and_then(Value::as_str)
        .ok_or_else(bad)?;
    Ok((rv, ns.to_owned(), name.to_owned()))
}

fn list(shared: &Shared, t: &Target, q: &Query, meta_only: bool) -> Result<Value, ApiError> {
    let kind = &t.kind;
    let (labels, fields) = selectors(kind, q)?;
    let limit = match q.get("limit") {
        Some(s) => s
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit: {s:?}")))?,
        None => 0,
    };
    let after = q
        .get("continue")
        .filter(|c| !c.is_empty())
        .map(|c| decode_continue(c))
        .transpose()?;
    let store = shared.store();
    let rv = match &after {
        Some((rv, _, _)) => {
            if !store.retains(*rv) {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                ));
            }
            *rv
        }
        None => store.resource_version(),
    };
    let api_version = kind.api_version(&t.version);
    let mut items = Vec::new();
    let mut continue_token = None;
    let mut last: Option<(String, String)> = None;
    for (key, obj) in store.scan(&kind.group, &kind.plural, t.namespace.as_deref()) {
        if let Some((_, ns, name)) = &after
            && (key.2.as_str(), key.3.as_str()) <= (ns.as_str(), name.as_str())
        {
            continue;
        }
        if !(labels.matches_object(obj) && fields.matches(obj)) {
            continue;
        }
        if limit > 0 && items.len() == limit {
            if let Some((ns, name)) = &last {
                continue_token = Some(encode_continue(rv, ns, name));
            }
            break;
        }
        items.push(list_item(kind, obj, &api_version, meta_only));
        last = Some((key.2.clone(), key.3.clone()));
    }
    // Custom resource lists are unstructured on a real server, whose
    // `continue` is there even when empty.
    let continue_token = match continue_token {
        None if kind.is_custom() && !meta_only => Some(String::new()),
        other => other,
    };
    Ok(list_doc(
        kind,
        &api_version,
        meta_only,
        rv,
        continue_token,
        items,
    ))
}
