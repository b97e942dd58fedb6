//! Report, cluster half (pure): the status an outcome gives an object, and
//! the events worth sending. Times and transitions carry over from the
//! previous status, so a pass that changed nothing gives an equal status
//! and no API write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::EventType;

use crate::cluster::catalog::ObjectReport;
use crate::crd::{
    AgentInstanceStatus, DriftRecord, ObjectStatus, RenderSummary, RestartRecord, SidecarStatus,
};
use crate::engine::{Outcome, reason};

/// `Ready`: the object is fine.
pub const READY: &str = "Ready";
/// `Reconciling`: not fine yet, being worked on (a retry is scheduled).
pub const RECONCILING: &str = "Reconciling";
/// `Stalled`: not fine, and waits for its input to change.
pub const STALLED: &str = "Stalled";
/// `SecretsResolved`: every placeholder found its secret.
pub const SECRETS_RESOLVED: &str = "SecretsResolved";
/// `InSync`: the files hold what was declared.
pub const IN_SYNC: &str = "InSync";

/// Reasons that retry by themselves (the rest wait for an input change).
fn retrying(r: &str) -> bool {
    matches!(
        r,
        reason::WRITE_FAILED | reason::STATE_FAILED | reason::FILE_BUSY | "SecretProviderFailed"
    )
}

fn secret_reason(r: &str) -> bool {
    matches!(
        r,
        "MissingSecret" | "SecretConflict" | "UnsafeSecretValue" | "SecretProviderFailed"
    )
}

/// A condition, keeping `lastTransitionTime` when its status did not change.
fn condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let last = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// The `Ready` condition of the last pass that changed something, when
/// this pass found the files exactly as that one left them at the same
/// generation: the state is the same, so is its story. Without this the
/// pass that sees the echo of a render's own status write (`UpToDate` after
/// `Rendered`) would write the status a second time.
fn settled<'a>(r: &InstanceReport<'a>) -> Option<&'a Condition> {
    if r.outcome.reason != reason::UP_TO_DATE {
        return None;
    }
    let last = r.previous.conditions.iter().find(|c| c.type_ == READY)?;
    let same_render =
        r.previous.rendered.as_ref().map(|x| &x.content_hash) == r.outcome.content_hash.as_ref();
    (last.status == "True" && last.observed_generation == r.generation && same_render)
        .then_some(last)
}

/// `InSync` of a sidecar instance: whether every running pod holds the
/// current render, naming the pods that do not and why.
fn sidecar_sync(
    s: &SidecarStatus,
    cond: &dyn Fn(&str, &str, &str, &str) -> Condition,
) -> Condition {
    if s.pods.is_empty() {
        return cond(
            IN_SYNC,
            "Unknown",
            "NoPods",
            "no running pod is labelled agentenv.io/instance with this instance's name",
        );
    }
    let behind: Vec<String> = s
        .pods
        .iter()
        .filter(|p| !p.current)
        .map(|p| {
            if p.message.is_empty() {
                format!("{} ({})", p.name, p.reason)
            } else {
                format!("{} ({}: {})", p.name, p.reason, p.message)
            }
        })
        .collect();
    if behind.is_empty() {
        cond(
            IN_SYNC,
            "True",
            "PodsCurrent",
            &format!("{} pod(s) hold the current render", s.pods.len()),
        )
    } else {
        cond(
            IN_SYNC,
            "False",
            "PodsBehind",
            &format!("pods not on the current render: {}", behind.join("; ")),
        )
    }
}

/// What an instance's status is computed from.
pub struct InstanceReport<'a> {
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The status as served.
    pub previous: &'a AgentInstanceStatus,
    /// The pass.
    pub outcome: &'a Outcome,
    /// A restart asked for by this pass, and why.
    pub restart: Option<&'a str>,
    /// `reconcile.fluxcd.io/requestedAt`, when set.
    pub requested_at: Option<&'a str>,
    /// Now.
    pub now: Time,
    /// With sidecar delivery: how far the pods are.
    pub sidecar: Option<&'a SidecarStatus>,
}

/// The status of an AgentInstance after a pass. Never holds a secret
/// value: messages are masked with the values the pass used.
pub fn instance_status(r: &InstanceReport<'_>) -> AgentInstanceStatus {
    let o = r.outcome;
    let prev = r.previous;
    let g = r.generation;
    let cond = |t: &str, s: &str, why: &str, msg: &str| {
        condition(&prev.conditions, t, s, why, msg, g, &r.now)
    };
    let ready = o.ready;
    let (why, message) = match settled(r) {
        Some(last) => (last.reason.as_str(), last.message.clone()),
        None => (o.reason, o.used_secrets.mask(&o.message)),
    };
    let mut conditions = vec![cond(
        READY,
        if ready { "True" } else { "False" },
        why,
        &message,
    )];
    let stalled = !ready && !retrying(why);
    conditions.push(cond(
        STALLED,
        if stalled { "True" } else { "False" },
        why,
        if stalled { &message } else { "" },
    ));
    let reconciling = !ready && retrying(why);
    conditions.push(cond(
        RECONCILING,
        if reconciling { "True" } else { "False" },
        why,
        if reconciling { &message } else { "" },
    ));
    let secrets = if secret_reason(why) {
        cond(SECRETS_RESOLVED, "False", why, &message)
    } else if ready && why != reason::SUSPENDED {
        let n = o.secret_refs.len();
        cond(
            SECRETS_RESOLVED,
            "True",
            "Resolved",
            &format!("{n} secret reference(s) resolved"),
        )
    } else {
        cond(
            SECRETS_RESOLVED,
            "Unknown",
            why,
            "not checked: the pass stopped before secrets",
        )
    };
    conditions.push(secrets);
    let in_sync = if let Some(s) = r.sidecar.filter(|_| ready && why != reason::SUSPENDED) {
        sidecar_sync(s, &cond)
    } else if ready && why != reason::SUSPENDED {
        if o.drift.is_empty() {
            cond(IN_SYNC, "True", why, "the files hold the declared entries")
        } else {
            cond(
                IN_SYNC,
                "True",
                "DriftCorrected",
                &format!("put back: {}", o.drift.join(", ")),
            )
        }
    } else if retrying(why) {
        cond(IN_SYNC, "False", why, &message)
    } else {
        cond(IN_SYNC, "Unknown", why, "the files were not checked")
    };
    conditions.push(in_sync);

    let rendered = if ready && why != reason::SUSPENDED {
        let old = prev.rendered.as_ref();
        let hash = o.content_hash.clone().unwrap_or_default();
        let same = old.is_some_and(|p| p.content_hash == hash);
        Some(Box::new(RenderSummary {
            plugins: o.rendered.plugins.len() as i32,
            marketplaces: o.rendered.marketplaces.len() as i32,
            mcp_servers: o.rendered.mcp_servers.len() as i32,
            content_hash: hash,
            time: if same {
                old.and_then(|p| p.time.clone())
            } else {
                Some(r.now.clone())
            },
            entries: o.sources.clone(),
            adopted: o
                .sources
                .iter()
                .filter(|s| s.scope == "installed")
                .map(|s| format!("{}/{}", s.key, s.name))
                .collect(),
        }))
    } else {
        prev.rendered.clone()
    };
    AgentInstanceStatus {
        observed_generation: g,
        conditions,
        rendered,
        last_drift: if o.drift.is_empty() {
            prev.last_drift.clone()
        } else {
            Some(Box::new(DriftRecord {
                time: r.now.clone(),
                entries: o.drift.clone(),
            }))
        },
        last_restart: match r.restart {
            Some(why) => Some(Box::new(RestartRecord {
                time: r.now.clone(),
                reason: why.to_owned(),
            })),
            None => prev.last_restart.clone(),
        },
        last_handled_reconcile_at: r
            .requested_at
            .map(str::to_owned)
            .or_else(|| prev.last_handled_reconcile_at.clone()),
        sidecar: r.sidecar.cloned().map(Box::new),
    }
}

/// One event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Normal or Warning.
    pub warning: bool,
    /// CamelCase reason.
    pub reason: String,
    /// What happened.
    pub note: String,
}

impl Note {
    /// The kube event type.
    pub fn event_type(&self) -> EventType {
        if self.warning {
            EventType::Warning
        } else {
            EventType::Normal
        }
    }
}

/// The events a pass is worth: what it did, and failures when they start
/// or change (not on every retry).
pub fn instance_events(r: &InstanceReport<'_>) -> Vec<Note> {
    let o = r.outcome;
    let mut out = Vec::new();
    let mut note = |warning: bool, reason: &str, note: String| {
        out.push(Note {
            warning,
            reason: reason.to_owned(),
            note: o.used_secrets.mask(&note),
        })
    };
    if o.reason == reason::RENDERED {
        let changed: Vec<String> = o.changes.iter().map(|c| c.label()).collect();
        let what = if changed.is_empty() {
            o.message.clone()
        } else {
            format!("{}: {}", o.message, changed.join(", "))
        };
        note(false, "Rendered", what);
    }
    if !o.drift.is_empty() {
        note(
            true,
            "DriftCorrected",
            format!("put back: {}", o.drift.join(", ")),
        );
    }
    if !o.adopted.is_empty() {
        note(
            false,
            "RuntimeInstallAdopted",
            format!("adopted: {}", o.adopted.join(", ")),
        );
    }
    for w in &o.warnings {
        if let Some(rest) = w.strip_prefix("CorruptFile: ") {
            note(true, "CorruptFile", rest.to_owned());
        }
    }
    if let Some(why) = r.restart {
        note(
            false,
            "RestartRequested",
            format!("restart requested: {why}"),
        );
    }
    if !o.ready && !matches!(o.reason, reason::FILE_BUSY) {
        let before = r
            .previous
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| (c.reason.as_str(), c.message.as_str()));
        let message = o.used_secrets.mask(&o.message);
        if before != Some((o.reason, message.as_str())) {
            note(true, o.reason, message);
        }
    }
    out
}

/// The status of a PluginBinding, PluginMarketplace or McpServer.
pub fn object_status(r: &ObjectReport, previous: &ObjectStatus, now: &Time) -> ObjectStatus {
    let g = r.generation;
    let cond = |t: &str, s: &str, why: &str, msg: &str| {
        condition(&previous.conditions, t, s, why, msg, g, now)
    };
    let conditions = match &r.invalid {
        Some(msg) => vec![
            cond(READY, "False", reason::INVALID_OBJECT, msg),
            cond(STALLED, "True", reason::INVALID_OBJECT, msg),
            cond(RECONCILING, "False", reason::INVALID_OBJECT, ""),
        ],
        None => {
            let (why, msg) = if r.conflicts.is_empty() {
                ("Applied", format!("applies to {} instance(s)", r.instances))
            } else {
                (
                    "Conflict",
                    format!(
                        "applies to {} instance(s); {} conflict(s) at the same layer: {}",
                        r.instances,
                        r.conflicts.len(),
                        r.conflicts.join("; ")
                    ),
                )
            };
            vec![
                cond(READY, "True", why, &msg),
                cond(STALLED, "False", why, ""),
                cond(RECONCILING, "False", why, ""),
            ]
        }
    };
    ObjectStatus {
        observed_generation: g,
        conditions,
        instances: r.instances as i32,
        conflicts: r.conflicts.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::snapshot::ObjectKey;

    fn outcome(ready: bool, why: &'static str) -> Outcome {
        let mut o = Outcome::new(&ObjectKey::new("ns", "a"), "coder", "ns/a".into());
        o.ready = ready;
        o.reason = why;
        o.message = format!("{why} message");
        o.content_hash = Some("h1".into());
        o
    }

    fn t(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn get<'a>(s: &'a AgentInstanceStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn a_quiet_pass_gives_an_equal_status() {
        let first = instance_status(&InstanceReport {
            generation: Some(3),
            previous: &AgentInstanceStatus::default(),
            outcome: &outcome(true, reason::RENDERED),
            restart: None,
            requested_at: None,
            now: t(100),
            sidecar: None,
        });
        assert_eq!(first.observed_generation, Some(3));
        assert_eq!(get(&first, READY).status, "True");
        assert_eq!(get(&first, STALLED).status, "False");
        let again = instance_status(&InstanceReport {
            generation: Some(3),
            previous: &first,
            outcome: &outcome(true, reason::RENDERED),
            restart: None,
            requested_at: None,
            now: t(200),
            sidecar: None,
        });
        assert_eq!(again, first, "times carry over; nothing to patch");
    }

    #[test]
    fn the_pass_after_a_render_that_finds_it_in_place_changes_nothing() {
        let rendered = instance_status(&InstanceReport {
            generation: Some(1),
            previous: &AgentInstanceStatus::default(),
            outcome: &outcome(true, reason::RENDERED),
            restart: None,
            requested_at: None,
            now: t(100),
            sidecar: None,
        });
        let echo = InstanceReport {
            generation: Some(1),
            previous: &rendered,
            outcome: &outcome(true, reason::UP_TO_DATE),
            restart: None,
            requested_at: None,
            now: t(101),
            sidecar: None,
        };
        assert_eq!(instance_status(&echo), rendered);
        // A new generation is news even when the files are as they were.
        let edited = instance_status(&InstanceReport {
            generation: Some(2),
            ..echo
        });
        assert_eq!(get(&edited, READY).reason, reason::UP_TO_DATE);
        assert_eq!(edited.observed_generation, Some(2));
        // So is a different render.
        let mut other = outcome(true, reason::UP_TO_DATE);
        other.content_hash = Some("h2".into());
        let moved = instance_status(&InstanceReport {
            generation: Some(1),
            previous: &rendered,
            outcome: &other,
            restart: None,
            requested_at: None,
            now: t(102),
            sidecar: None,
        });
        assert_eq!(get(&moved, READY).reason, reason::UP_TO_DATE);
    }

    #[test]
    fn a_missing_secret_stalls_and_warns_once() {
        let ok = instance_status(&InstanceReport {
            generation: Some(1),
            previous: &AgentInstanceStatus::default(),
            outcome: &outcome(true, reason::UP_TO_DATE),
            restart: None,
            requested_at: None,
            now: t(100),
            sidecar: None,
        });
        let missing = outcome(false, "MissingSecret");
        let report = InstanceReport {
            generation: Some(1),
            previous: &ok,
            outcome: &missing,
            restart: None,
            requested_at: None,
            now: t(200),
            sidecar: None,
        };
        let s = instance_status(&report);
        assert_eq!(get(&s, READY).status, "False");
        assert_eq!(get(&s, STALLED).status, "True");
        assert_eq!(get(&s, STALLED).reason, "MissingSecret");
        assert_eq!(get(&s, RECONCILING).status, "False");
        assert_eq!(get(&s, SECRETS_RESOLVED).status, "False");
        assert_eq!(get(&s, READY).last_transition_time, t(200));
        assert_eq!(s.rendered, ok.rendered, "the last good render is kept");
        let events = instance_events(&report);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, "MissingSecret");
        assert!(events[0].warning);
        let again = InstanceReport {
            previous: &s,
            ..report
        };
        assert!(instance_events(&again).is_empty(), "no event per retry");
    }

    #[test]
    fn write_failures_are_reconciling_not_stalled() {
        let s = instance_status(&InstanceReport {
            generation: Some(1),
            previous: &AgentInstanceStatus::default(),
            outcome: &outcome(false, reason::WRITE_FAILED),
            restart: None,
            requested_at: Some("2026-01-01T00:00:00Z"),
            now: t(100),
            sidecar: None,
        });
        assert_eq!(get(&s, RECONCILING).status, "True");
        assert_eq!(get(&s, STALLED).status, "False");
        assert_eq!(get(&s, IN_SYNC).status, "False");
        assert_eq!(
            s.last_handled_reconcile_at.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
    }
}
