//! Leader election on a `coordination.k8s.io/v1` Lease, so only one replica
//! writes files and status. As in client-go, expiry is judged by when this
//! replica last saw the lease change, not by the holder's clock.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;
use tracing::{info, warn};

/// Timings of the election.
#[derive(Clone, Copy, Debug)]
pub struct Timings {
    /// A lease not renewed for this long may be taken over.
    pub duration: Duration,
    /// How often the holder renews.
    pub renew: Duration,
    /// How often a candidate tries.
    pub retry: Duration,
}

impl Timings {
    /// Renew at a third of the duration, try at a fifth: a holder misses
    /// two renewals before anyone may take over.
    pub fn from_duration(duration: Duration) -> Timings {
        Timings {
            duration,
            renew: duration / 3,
            retry: (duration / 5).max(Duration::from_millis(100)),
        }
    }
}

/// Errors talking to the API about the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// A call failed.
    #[error("lease {namespace}/{name}: {action} failed")]
    Api {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What was tried.
        action: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// One candidate.
pub struct Elector {
    api: Api<Lease>,
    namespace: String,
    name: String,
    identity: String,
    timings: Timings,
    /// The lease as last seen: resourceVersion and when it was seen to change.
    observed: Option<(String, Instant)>,
    current: Option<Lease>,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    /// A candidate named `identity` for the lease `namespace/name`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timings: Timings,
    ) -> Elector {
        Elector {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timings,
            observed: None,
            current: None,
        }
    }

    fn err(&self, action: &'static str) -> impl FnOnce(kube::Error) -> LeaseError + '_ {
        move |source| LeaseError::Api {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            action,
            source,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(crate::time::now());
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(&self.identity);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.timings.duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(!ours),
            ),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take or keep the lease; true when this replica holds it.
    pub async fn try_acquire(&mut self) -> Result<bool, LeaseError> {
        let existing = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(self.err("get"))?;
        let Some(lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    namespace: Some(self.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => {
                    self.current = Some(l);
                    Ok(true)
                }
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(self.err("create")(e)),
            };
        };
        let rv = lease.metadata.resource_version.clone().unwrap_or_default();
        let now = Instant::now();
        let seen_at = match &self.observed {
            Some((old, at)) if *old == rv => *at,
            _ => now,
        };
        self.observed = Some((rv, seen_at));
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().unwrap_or("");
        let duration = spec
            .lease_duration_seconds
            .map_or(self.timings.duration, |s| {
                Duration::from_secs(s.max(0) as u64)
            });
        let free = holder.is_empty() || holder == self.identity;
        if !free && now.duration_since(seen_at) < duration {
            return Ok(false);
        }
        let mut next = lease.clone();
        next.spec = Some(self.spec(Some(&spec)));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(l) => {
                if holder != self.identity {
                    info!(lease = %self.name, previous = holder, "became the leader");
                }
                self.current = Some(l);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(self.err("update")(e)),
        }
    }

    /// Waits until this replica holds the lease, or `stop` fires (false).
    pub async fn acquire(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> bool {
        loop {
            match self.try_acquire().await {
                Ok(true) => return true,
                Ok(false) => {}
                Err(e) => warn!(error = %crate::error_chain(&e), "leader election"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.timings.retry) => {}
                _ = stop.changed() => return false,
            }
        }
    }

    /// Renews the lease until a renewal cannot be made within the lease
    /// duration (another replica may hold it by then); returns then.
    pub async fn hold(&mut self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.timings.renew).await;
            match self.renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "the lease was taken over");
                    return;
                }
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "cannot renew the lease");
                    if last_ok.elapsed() + self.timings.renew >= self.timings.duration {
                        return;
                    }
                }
            }
        }
    }

    async fn renew(&mut self) -> Result<bool, LeaseError> {
        let Some(current) = self.current.clone() else {
            return Ok(false);
        };
        let mut next = current.clone();
        next.spec = Some(self.spec(current.spec.as_ref()));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(l) => {
                self.current = Some(l);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => {
                // Someone else wrote it: ours only if it still names us.
                let fresh = self.api.get(&self.name).await.map_err(self.err("get"))?;
                let ours = fresh
                    .spec
                    .as_ref()
                    .and_then(|s| s.holder_identity.as_deref())
                    == Some(&self.identity);
                self.current = Some(fresh);
                if ours {
                    return Box::pin(self.renew()).await;
                }
                Ok(false)
            }
            Err(e) => Err(self.err("update")(e)),
        }
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&mut self) {
        let Some(mut lease) = self.current.take() else {
            return;
        };
        if let Some(spec) = lease.spec.as_mut() {
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(crate::time::now()));
        }
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.name, "released the lease"),
            Err(e) => warn!(error = %e, "cannot release the lease; it expires by itself"),
        }
    }
}
