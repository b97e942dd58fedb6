//! Telling drift from runtime installs (DESIGN section 5), as a pure function
//! of what is on disk, what the ledger says was written, and what is declared.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::crd::RuntimeInstalls;
use crate::engine::ledger::{Hasher, LedgerEntry};
use crate::engine::resolve::Entries;
use crate::engine::section::Section;
use crate::engine::shape;

/// What one owned key on disk says about the world.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    /// Runtime installs taken into the installed set.
    pub adopted: Vec<String>,
    /// Installed entries the user changed; the installed set follows.
    pub user_changed: Vec<String>,
    /// Installed entries the user removed; the installed set forgets them.
    pub user_removed: Vec<String>,
    /// Declared entries changed or removed on disk; they are put back.
    pub drift: Vec<String>,
    /// Runtime entries that will be removed (`Revert`, or nothing to fetch).
    pub reverted: Vec<String>,
}

/// Compares one owned key on disk with the ledger and the declared entries,
/// and updates `installed` accordingly.
///
/// `on_disk` is `None` when the file does not exist (or was corrupt): nothing
/// can be learnt then, and the next render writes everything, installed set
/// included. An existing file without the key is an empty map: the user
/// removed every entry.
pub fn classify(
    section: Section,
    on_disk: Option<&Map<String, Value>>,
    ledger: &BTreeMap<String, LedgerEntry>,
    declared: &Entries,
    installed: &mut BTreeMap<String, Value>,
    mode: RuntimeInstalls,
    hasher: &Hasher,
) -> Findings {
    let mut f = Findings::default();
    let Some(disk) = on_disk else {
        return f;
    };
    let preserve = mode == RuntimeInstalls::Preserve;
    let unfetchable =
        |v: &Value| section == Section::Marketplaces && shape::marketplace_source_is_empty(v);

    for (name, value) in disk {
        match ledger.get(name) {
            None => {
                if declared.contains_key(name) || installed.contains_key(name) {
                    continue;
                }
                if preserve && !unfetchable(value) {
                    installed.insert(name.clone(), value.clone());
                    f.adopted.push(name.clone());
                } else {
                    f.reverted.push(name.clone());
                }
            }
            Some(l) if l.installed => {
                if !preserve || hasher.entry(value) == l.hash {
                    continue;
                }
                if unfetchable(value) {
                    installed.remove(name);
                    f.reverted.push(name.clone());
                } else {
                    installed.insert(name.clone(), value.clone());
                    f.user_changed.push(name.clone());
                }
            }
            Some(l) => {
                if declared.contains_key(name) && hasher.entry(value) != l.hash {
                    f.drift.push(name.clone());
                }
            }
        }
    }
    for (name, l) in ledger {
        if disk.contains_key(name) {
            continue;
        }
        if l.installed {
            if preserve && installed.remove(name).is_some() {
                f.user_removed.push(name.clone());
            }
        } else if declared.contains_key(name) {
            f.drift.push(name.clone());
        }
    }
    // Both loops feed `drift`; sorted, reports are the same for the same inputs.
    f.drift.sort();
    f
}

/// The ledger to classify against after a pass that recorded `pending` and
/// was then killed: an entry on disk equal to what it was about to write is
/// the operator's (not a runtime install), and a ledger entry missing from
/// disk that it was about to remove is gone by the operator's hand (not drift).
pub fn with_pending<'a>(
    ledger: &'a BTreeMap<String, LedgerEntry>,
    pending: Option<&BTreeMap<String, LedgerEntry>>,
    on_disk: Option<&Map<String, Value>>,
    hasher: &Hasher,
) -> std::borrow::Cow<'a, BTreeMap<String, LedgerEntry>> {
    let (Some(pending), Some(disk)) = (pending, on_disk) else {
        return std::borrow::Cow::Borrowed(ledger);
    };
    let mut out = ledger.clone();
    for (name, value) in disk {
        if let Some(p) = pending.get(name)
            && ledger.get(name).is_none_or(|l| l.hash != p.hash)
            && hasher.entry(value) == p.hash
        {
            out.insert(name.clone(), p.clone());
        }
    }
    out.retain(|name, _| disk.contains_key(name) || pending.contains_key(name));
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::resolve::{Entry, Origin};
    use serde_json::json;

    fn hasher() -> Hasher {
        Hasher::new(vec![1, 2, 3])
    }

    fn ledger(items: &[(&str, bool, Value)]) -> BTreeMap<String, LedgerEntry> {
        items
            .iter()
            .map(|(k, installed, v)| {
                (
                    k.to_string(),
                    LedgerEntry {
                        installed: *installed,
                        hash: hasher().entry(v),
                    },
                )
            })
            .collect()
    }

    fn declared(names: &[&str]) -> Entries {
        names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    Entry {
                        value: json!(true).into(),
                        origin: Origin::Builtin,
                    },
                )
            })
            .collect()
    }

    fn disk(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn runtime_install_is_adopted_or_reverted() {
        let d = disk(json!({"mine@m": true, "user@m": true}));
        let l = ledger(&[("mine@m", false, json!(true))]);
        let mut installed = BTreeMap::new();
        let f = classify(
            Section::Plugins,
            Some(&d),
            &l,
            &declared(&["mine@m"]),
            &mut installed,
            RuntimeInstalls::Preserve,
            &hasher(),
        );
        assert_eq!(f.adopted, ["user@m"]);
        assert_eq!(installed["user@m"], json!(true));

        let mut installed = BTreeMap::new();
        let f = classify(
            Section::Plugins,
            Some(&d),
            &l,
            &declared(&["mine@m"]),
            &mut installed,
            RuntimeInstalls::Revert,
            &hasher(),
        );
        assert_eq!(f.reverted, ["user@m"]);
        assert!(installed.is_empty());
    }

    #[test]
    fn declared_change_or_removal_is_drift() {
        let l = ledger(&[("a@m", false, json!(true)), ("b@m", false, json!(true))]);
        let d = disk(json!({"a@m": false}));
        let mut installed = BTreeMap::new();
        let f = classify(
            Section::Plugins,
            Some(&d),
            &l,
            &declared(&["a@m", "b@m"]),
            &mut installed,
            RuntimeInstalls::Preserve,
            &hasher(),
        );
        assert_eq!(f.drift, ["a@m", "b@m"]);
        assert!(f.adopted.is_empty());
    }

    #[test]
    fn user_changes_and_removes_own_installs() {
        let l = ledger(&[("x@m", true, json!(true)), ("y@m", true, json!(true))]);
        let mut installed = BTreeMap::from([
            ("x@m".to_string(), json!(true)),
            ("y@m".to_string(), json!(true)),
        ]);
        let d = disk(json!({"x@m": false}));
        let f = classify(
            Section::Plugins,
            Some(&d),
            &l,
            &declared(&[]),
            &mut installed,
            RuntimeInstalls::Preserve,
            &hasher(),
        );
        assert_eq!(f.user_changed, ["x@m"]);
        assert_eq!(f.user_removed, ["y@m"]);
        assert_eq!(
            installed,
            BTreeMap::from([("x@m".to_string(), json!(false))])
        );
    }

    #[test]
    fn missing_file_teaches_nothing_and_empty_sources_are_not_adopted() {
        let l = ledger(&[("x@m", true, json!(true))]);
        let mut installed = BTreeMap::from([("x@m".to_string(), json!(true))]);
        let f = classify(
            Section::Plugins,
            None,
            &l,
            &declared(&[]),
            &mut installed,
            RuntimeInstalls::Preserve,
            &hasher(),
        );
        assert_eq!(f, Findings::default());
        assert_eq!(installed.len(), 1);

        let d = disk(json!({"empty": {"source": {}}, "none": {}}));
        let mut installed = BTreeMap::new();
        let f = classify(
            Section::Marketplaces,
            Some(&d),
            &BTreeMap::new(),
            &declared(&[]),
            &mut installed,
            RuntimeInstalls::Preserve,
            &hasher(),
        );
        assert_eq!(f.reverted, ["empty", "none"]);
        assert!(installed.is_empty());
    }

    #[test]
    fn an_interrupted_write_is_recognised_as_the_operators() {
        // Committed: a@m. A pass about to write b@m instead wrote the file and was killed.
        let committed = ledger(&[("a@m", false, json!(true))]);
        let pending = ledger(&[("b@m", false, json!(true))]);
        let d = disk(json!({"b@m": true, "user@m": true}));
        let effective = with_pending(&committed, Some(&pending), Some(&d), &hasher());
        let mut installed = BTreeMap::new();
        let f = classify(
            Section::Plugins,
            Some(&d),
            &effective,
            &declared(&["a@m"]),
            &mut installed,
            RuntimeInstalls::Preserve,
            &hasher(),
        );
        // b@m is ours (not adopted), a@m was removed by us (not drift), the user's stays theirs.
        assert_eq!(f.adopted, ["user@m"]);
        assert!(f.drift.is_empty(), "{f:?}");
        assert!(!installed.contains_key("b@m"));
        // A value the pending pass would not have written is not taken for ours.
        let d = disk(json!({"b@m": false}));
        let effective = with_pending(&committed, Some(&pending), Some(&d), &hasher());
        assert!(!effective.contains_key("b@m"));
        // Without a pending record nothing changes.
        assert!(matches!(
            with_pending(&committed, None, Some(&d), &hasher()),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
