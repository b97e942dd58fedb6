//! Counters of what the loop did, served in Prometheus text format on
//! `--metrics-addr` (with `/healthz` and `/readyz`), the same endpoint in
//! both run modes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::engine::{Outcome, reason};

/// Labels of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The CamelCase reason.
    pub reason: String,
}

/// Labels of the restart counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `failed`.
    pub result: String,
}

/// Every counter the operator keeps.
pub struct Metrics {
    registry: Registry,
    /// Passes run (full or partial).
    pub passes: Counter,
    /// Instances whose files were written.
    pub renders: Counter,
    /// Instances found up to date: nothing written.
    pub writes_skipped: Counter,
    /// Declared entries put back.
    pub drift_corrected: Counter,
    /// Runtime installs adopted.
    pub adoptions: Counter,
    /// Restart commands run, by result.
    pub restarts: Family<ResultLabel, Counter>,
    /// Instances not ready after a pass, by reason.
    pub errors: Family<ReasonLabel, Counter>,
    /// Instances in the current snapshot.
    pub instances: Gauge,
    /// Kubernetes events dropped because the queue to send them was full.
    pub events_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("agent_env");
        let m = Metrics {
            passes: Counter::default(),
            renders: Counter::default(),
            writes_skipped: Counter::default(),
            drift_corrected: Counter::default(),
            adoptions: Counter::default(),
            restarts: Family::default(),
            errors: Family::default(),
            events_dropped: Counter::default(),
            instances: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("passes", "Reconcile passes run", m.passes.clone());
        registry.register(
            "renders",
            "Instances whose files were written",
            m.renders.clone(),
        );
        registry.register(
            "writes_skipped",
            "Instances found up to date (nothing written)",
            m.writes_skipped.clone(),
        );
        registry.register(
            "drift_corrected",
            "Declared entries put back after an external change",
            m.drift_corrected.clone(),
        );
        registry.register("adoptions", "Runtime installs adopted", m.adoptions.clone());
        registry.register("restarts", "Restart commands run", m.restarts.clone());
        registry.register(
            "errors",
            "Instances not ready after a pass",
            m.errors.clone(),
        );
        registry.register("instances", "AgentInstances known", m.instances.clone());
        registry.register(
            "events_dropped",
            "Kubernetes events dropped because the queue to send them was full",
            m.events_dropped.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Counts a pass of one instance and what it did.
    pub fn record(&self, outcome: &Outcome) {
        self.passes.inc();
        self.record_instance(outcome);
    }

    /// Counts a pass (of any number of instances).
    pub fn record_pass(&self) {
        self.passes.inc();
    }

    /// Counts what a pass did to one instance.
    pub fn record_instance(&self, o: &Outcome) {
        match o.reason {
            reason::RENDERED => {
                self.renders.inc();
            }
            reason::UP_TO_DATE => {
                self.writes_skipped.inc();
            }
            _ if !o.ready => {
                self.errors
                    .get_or_create(&ReasonLabel {
                        reason: o.reason.to_owned(),
                    })
                    .inc();
            }
            _ => {}
        }
        self.drift_corrected.inc_by(o.drift.len() as u64);
        self.adoptions.inc_by(o.adopted.len() as u64);
    }

    /// Counts one restart command.
    pub fn restart(&self, ok: bool) {
        self.restarts
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "failed" }.to_owned(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics`, `/healthz` (the process answers) and `/readyz` (`ready`
/// is set: the first pass is done, or every watch has synced) on `listener`
/// until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::Acquire);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
