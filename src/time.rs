//! Wall-clock time, in the timestamp type the Kubernetes types use.

pub use k8s_openapi::jiff::Timestamp;

/// Now.
pub fn now() -> Timestamp {
    Timestamp::now()
}
