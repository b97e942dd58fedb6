//! Watches: newline-delimited JSON events, from the current state or from a
//! resourceVersion in the retained history, then live.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, MissedTickBehavior};

use crate::Shared;
use crate::error::ApiError;
use crate::meta::present;
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Event, EventType, Since};
use crate::write::Target;

const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
// Lines buffered towards a client; beyond this the writer task waits and the
// broadcast channel absorbs the backlog (ending the watch if it overflows).
const LINE_BUFFER: usize = 256;

pub(crate) struct WatchRequest {
    pub target: Target,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
    pub meta_only: bool,
    pub bookmarks: bool,
    pub send_initial_events: bool,
    pub timeout: Duration,
    pub resource_version: Option<String>,
}

impl WatchRequest {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches_object(obj) && self.fields.matches(obj)
    }

    fn covers(&self, event: &Event) -> bool {
        let kind = &self.target.kind;
        event.key.0 == kind.group
            && event.key.1 == kind.plural
            && self
                .target
                .namespace
                .as_deref()
                .is_none_or(|ns| event.key.2 == ns)
    }

    fn line(&self, kind: &str, obj: &Value) -> String {
        let api_version = self.target.kind.api_version(&self.target.version);
        let object = present(obj, &api_version, self.meta_only);
        format!("{}\n", json!({"type": kind, "object": object}))
    }

    fn bookmark(&self, rv: u64, initial_events_end: bool) -> String {
        let (api_version, kind) = if self.meta_only {
            (
                "meta.k8s.io/v1".to_owned(),
                "PartialObjectMetadata".to_owned(),
            )
        } else {
            (
                self.target.kind.api_version(&self.target.version),
                self.target.kind.kind.clone(),
            )
        };
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if initial_events_end {
            metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let object = json!({"apiVersion": api_version, "kind": kind, "metadata": metadata});
        format!("{}\n", json!({"type": "BOOKMARK", "object": object}))
    }

    /// The event this watcher sees, if any. An object that starts matching a
    /// selector is ADDED; one that stops matching is DELETED (its previous
    /// content at the new resourceVersion, as the watch cache sends it).
    fn translate(&self, event: &Event) -> Option<String> {
        if !self.covers(event) {
            return None;
        }
        let now = self.matches(&event.object);
        let before = event.old.as_ref().is_some_and(|o| self.matches(o));
        match event.kind {
            EventType::Added => now.then(|| self.line("ADDED", &event.object)),
            EventType::Deleted => (now || before).then(|| self.line("DELETED", &event.object)),
            EventType::Modified => match (before, now) {
                (true, true) => Some(self.line("MODIFIED", &event.object)),
                (false, true) => Some(self.line("ADDED", &event.object)),
                (true, false) => {
                    let mut last = event.old.clone().unwrap_or(Value::Null);
                    if let Some(m) = last.get_mut("metadata").and_then(Value::as_object_mut) {
                        m.insert(
                            "resourceVersion".into(),
                            Value::String(event.rv.to_string()),
                        );
                    }
                    Some(self.line("DELETED", &last))
                }
                (false, false) => None,
            },
        }
    }
}

/// Starts a watch; lines arrive on the returned channel until the watch ends.
pub(crate) fn start(
    shared: &Arc<Shared>,
    req: WatchRequest,
) -> Result<mpsc::Receiver<String>, ApiError> {
    if req.send_initial_events && !req.bookmarks {
        return Err(ApiError::bad_request(
            "sendInitialEvents is only allowed with allowWatchBookmarks=true",
        ));
    }
    let from_version = match req.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(_) if req.send_initial_events => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv:?}")))?,
        ),
    };

    let (tx, out) = mpsc::channel(LINE_BUFFER);
    let mut initial = Vec::new();
    let (start_rv, live) = {
        let store = shared.store();
        match from_version {
            None => {
                let kind = &req.target.kind;
                for (_, obj) in
                    store.scan(&kind.group, &kind.plural, req.target.namespace.as_deref())
                {
                    if req.matches(obj) {
                        initial.push(req.line("ADDED", obj));
                    }
                }
            }
            Some(rv) => match store.since(rv) {
                Since::Events(events) => {
                    initial.extend(events.iter().filter_map(|e| req.translate(e)));
                }
                Since::Expired { floor } => {
                    let status =
                        ApiError::expired(format!("too old resource version: {rv} ({floor})"))
                            .to_status();
                    let line = format!("{}\n", json!({"type": "ERROR", "object": status}));
                    // A fresh channel always has room for one line.
                    let _ = tx.try_send(line);
                    return Ok(out);
                }
            },
        }
        (store.resource_version(), store.subscribe())
    };
    // A resourceVersion ahead of the server's is waited for: nothing at or
    // below it is sent.
    let start_rv = start_rv.max(from_version.unwrap_or(0));
    tokio::spawn(serve(req, tx, initial, start_rv, live));
    Ok(out)
}

async fn serve(
    req: WatchRequest,
    tx: mpsc::Sender<String>,
    initial: Vec<String>,
    start_rv: u64,
    mut live: broadcast::Receiver<Arc<Event>>,
) {
    let deadline = tokio::time::sleep(req.timeout);
    tokio::pin!(deadline);
    for line in initial {
        if tx.send(line).await.is_err() {
            return;
        }
    }
    if req.send_initial_events && tx.send(req.bookmark(start_rv, true)).await.is_err() {
        return;
    }
    // Every event up to here has been sent, so bookmarking it is safe; it
    // then follows the events read from the channel, matching or not.
    let mut seen = start_rv;
    let mut ticks = tokio::time::interval_at(Instant::now() + BOOKMARK_INTERVAL, BOOKMARK_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let line = tokio::select! {
            biased;
            event = live.recv() => match event {
                Ok(event) if event.rv <= seen => None,
                Ok(event) => {
                    seen = event.rv;
                    req.translate(&event)
                }
                // Lagged: this watcher fell too far behind. Ending the stream
                // makes the client re-watch from its last resourceVersion.
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
            },
            _ = &mut deadline => return,
            _ = ticks.tick(), if req.bookmarks => Some(req.bookmark(seen, false)),
        };
        if let Some(line) = line
            && tx.send(line).await.is_err()
        {
            return;
        }
    }
}
