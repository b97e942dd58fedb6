//! Events sent beside the reconciles, not inside them: a reconcile queues
//! its events and goes on to the next instance, and one sender publishes
//! them in order. Status says whether an instance is ready; an event only
//! tells the story, so it must not hold the status of the next instance
//! back when the API server is busy (a cold start of a large fleet sends one
//! per instance). As with client-go's event broadcaster, a full queue drops
//! the event (counted in `agent_env_events_dropped`) rather than grow
//! without bound.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, Recorder};
use tokio::sync::mpsc;
use tracing::warn;

use crate::metrics::Metrics;

/// Events that may wait to be sent; past it, new ones are dropped.
pub const QUEUE: usize = 16_384;

/// Where reconciles queue their events.
#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(Event, ObjectReference)>,
    metrics: std::sync::Arc<Metrics>,
}

impl EventSink {
    /// Starts the sender; it runs until every sink is dropped.
    pub fn spawn(recorder: Recorder, metrics: std::sync::Arc<Metrics>) -> EventSink {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        tokio::spawn(async move {
            while let Some((event, reference)) = rx.recv().await {
                if let Err(e) = recorder.publish(&event, &reference).await {
                    warn!(error = %e, reason = %event.reason, "cannot publish an event");
                }
            }
        });
        EventSink { tx, metrics }
    }

    /// Queues one event about `reference`.
    pub fn send(&self, event: Event, reference: ObjectReference) {
        if let Err(mpsc::error::TrySendError::Full((event, _))) =
            self.tx.try_send((event, reference))
        {
            self.metrics.events_dropped.inc();
            warn!(reason = %event.reason, "the event queue is full; event dropped");
        }
    }
}
