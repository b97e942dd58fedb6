//! Apply, the IO step: read an env dir's two files, learn from them
//! (runtime installs, drift), merge the desired owned keys in and write what
//! changed. Synchronous on purpose: it runs on a blocking thread.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::crd::RuntimeInstalls;
use crate::engine::drift::{self, Findings};
use crate::engine::envdir::{
    EnvDirError, EnvRoot, InstanceDir, Owner, Refusal, Seen, Stamp, WriteOutcome,
};
use crate::engine::ledger::{Hasher, Ledger, LedgerEntry};
use crate::engine::merge::{Document, OwnedError};
use crate::engine::resolve::{self, Entries, Installed, Origin};
use crate::engine::section::{EnvFile, PerSection, Section};
use crate::state::InstanceState;

/// How often a file is read, merged and written again when someone else
/// keeps writing it between our read and our rename.
pub const MAX_ATTEMPTS: u32 = 8;

/// Everything the IO step needs for one instance.
pub struct ApplyInput<'a> {
    /// Env dir relative to the root.
    pub rel: &'a str,
    /// Owner of written files.
    pub owner: Owner,
    /// `spec.runtimeInstalls`.
    pub mode: RuntimeInstalls,
    /// Compute only; create, move and write nothing.
    pub dry_run: bool,
    /// Refuse (rather than move aside) a file that does not parse.
    pub defer_corrupt: bool,
    /// Remove temp files a killed run left in the env dir.
    pub sweep_temp_files: bool,
    /// Declared entries with secrets filled in.
    pub declared: &'a PerSection<Entries>,
    /// Stored state before this pass.
    pub state: &'a InstanceState,
    /// Ledger hasher.
    pub hasher: &'a Hasher,
}

/// How one entry changes.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The owned key.
    pub section: Section,
    /// Entry name.
    pub name: String,
    /// Value on disk before, if any. Values are kept in a dry run only (what
    /// `diff` shows): a pass that writes reports changes by name, and holding
    /// every changed value of a large fleet until its report would double
    /// what the pass holds (and keep filled secrets in memory).
    pub old: Option<Value>,
    /// Value after, if any (dry run only, as `old`).
    pub new: Option<Value>,
}

impl Change {
    /// `settings.json:enabledPlugins.p@m`.
    pub fn label(&self) -> String {
        format!("{}:{}.{}", self.section.file(), self.section, self.name)
    }
}

/// What the IO step did (or, in a dry run, would do).
#[derive(Debug)]
pub struct Applied {
    /// The installed set after learning from disk.
    pub installed: Installed,
    /// What is now on disk, as hashes.
    pub ledger: Ledger,
    /// The owned keys as rendered.
    pub rendered: PerSection<Entries>,
    /// What disk said, per owned key.
    pub findings: PerSection<Findings>,
    /// Entry changes, per file.
    pub changes: Vec<Change>,
    /// Files written.
    pub written: Vec<EnvFile>,
    /// Files moved or copied aside, with why.
    pub corrupt: Vec<String>,
}

/// One file as read and understood.
struct Observed {
    doc: Document,
    stamp: Option<Stamp>,
    mode: Option<u32>,
    /// Owned keys as present in the file (`None`: key absent).
    present: BTreeMap<Section, Map<String, Value>>,
    /// Owned keys classification may learn from: those of a file that was
    /// read and whose key is an object or absent (absent: every entry was
    /// removed). A missing file or a damaged key teaches nothing.
    learnable: Vec<Section>,
    /// What an absent key reads as.
    empty: Map<String, Value>,
}

impl Observed {
    /// What classification may learn from an owned key (`None`: nothing).
    fn learn(&self, section: Section) -> Option<&Map<String, Value>> {
        (self.learnable.contains(&section))
            .then(|| self.present.get(&section).unwrap_or(&self.empty))
    }
}

/// Runs the IO step.
pub fn apply(root: &EnvRoot, input: &ApplyInput<'_>) -> Result<Applied, EnvDirError> {
    let dir = root.instance(input.rel, !input.dry_run, input.owner)?;
    // Before anything is read: a stamp must be older than the look at it.
    let looked_at = crate::time::now();
    let mut stamps = Vec::with_capacity(EnvFile::ALL.len());
    let mut out = Applied {
        installed: input.state.installed.clone(),
        ledger: Ledger {
            entries: PerSection::default(),
            content_hash: String::new(),
            written_at: crate::time::now(),
            seen: None,
        },
        rendered: PerSection::default(),
        findings: PerSection::default(),
        changes: Vec::new(),
        written: Vec::new(),
        corrupt: Vec::new(),
    };
    let empty_ledger = PerSection::default();
    let ledger = input
        .state
        .ledger
        .as_ref()
        .map_or(&empty_ledger, |l| &l.entries);

    if input.sweep_temp_files && !input.dry_run {
        // A dir this pass created holds no one's temp files.
        let swept = (dir.as_ref())
            .filter(|d| !d.created())
            .map_or(0, InstanceDir::sweep_temp_files);
        if swept > 0 {
            tracing::info!(swept, "removed temp files left by an interrupted write");
        }
    }
    for file in EnvFile::ALL {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let observed = observe(dir.as_ref(), file, input, &mut out.corrupt)?;
            let mut sections = Vec::new();
            for &section in file.sections() {
                let mut installed = out.installed[section].clone();
                let ledger = drift::with_pending(
                    &ledger[section],
                    input.state.pending.as_ref().map(|p| &p[section]),
                    observed.learn(section),
                    input.hasher,
                );
                let findings = drift::classify(
                    section,
                    observed.learn(section),
                    &ledger,
                    &input.declared[section],
                    &mut installed,
                    input.mode,
                    input.hasher,
                );
                let desired = resolve::desired_section(
                    section,
                    &input.declared[section],
                    &installed,
                    input.mode,
                );
                sections.push((section, installed, findings, desired));
            }
            let unchanged = observed.stamp.is_some()
                && sections
                    .iter()
                    .all(|(s, _, _, d)| same(observed.present.get(s), d));
            // The owned keys as maps only when something is to be written.
            let new_maps: Vec<(Section, Map<String, Value>)> = if unchanged {
                Vec::new()
            } else {
                (sections.iter())
                    .map(|(s, _, _, d)| (*s, to_map(d)))
                    .collect()
            };
            let mut changes = Vec::new();
            for (s, m) in &new_maps {
                changes.extend(entry_changes(*s, observed.present.get(s), m, input.dry_run));
            }
            let done = match (&dir, unchanged || input.dry_run) {
                (_, true) => true,
                (None, false) => unreachable!("apply creates the env dir unless dry-running"),
                (Some(dir), false) => {
                    let owned: Vec<(&'static str, &Map<String, Value>)> =
                        new_maps.iter().map(|(s, m)| (s.key(), m)).collect();
                    let bytes = observed.doc.render(&owned);
                    let mode = match file {
                        EnvFile::ClaudeJson => file.mode(),
                        EnvFile::Settings => observed.mode.unwrap_or(file.mode()),
                    };
                    match dir.write(file, &bytes, observed.stamp, mode, input.owner)? {
                        WriteOutcome::Written => {
                            out.written.push(file);
                            true
                        }
                        WriteOutcome::Raced => false,
                    }
                }
            };
            if done {
                stamps.extend(observed.stamp);
                for (section, installed, findings, desired) in sections {
                    out.installed[section] = installed;
                    out.findings[section] = findings;
                    out.rendered[section] = desired;
                }
                out.changes.extend(changes);
                break;
            }
            if attempt >= MAX_ATTEMPTS {
                return Err(EnvDirError::Contended {
                    path: dir
                        .as_ref()
                        .map_or_else(String::new, |d| d.display(file.file_name())),
                    attempts: attempt,
                });
            }
        }
    }

    out.ledger.entries = ledger_entries(input.hasher, &out.rendered);
    out.ledger.content_hash = content_hash(input.hasher, &out.rendered);
    // Stamps of a file written here would be taken in the tick it was
    // written in: the next pass reads it once more and keeps those. A pass
    // right after a file event finds the file too fresh to stamp as well,
    // so passes that follow events store nothing new; the stamps it keeps
    // then no longer match the files, which only means they are read.
    let kept = input.state.ledger.as_ref().and_then(|l| l.seen.clone());
    out.ledger.seen = match (out.written.is_empty(), input.dry_run) {
        (false, _) => None,
        (true, false) => Seen::settled(looked_at, stamps).or(kept),
        (true, true) => kept,
    };
    Ok(out)
}

/// Whether the files in `dir` are still those `seen` stamped. When they
/// are, a pass has nothing to read or learn there; what it skips besides
/// reading is the temp-file sweep: a write of ours cut short leaves its
/// temp file only where it was about to change a file, so the ledger
/// (pending entries, or stamps of the file as it was) no longer matches,
/// and the pass reads and sweeps.
pub fn still_as_seen(dir: &InstanceDir, seen: &Seen, rel: &str) -> bool {
    let still = dir.still(seen);
    if still {
        tracing::debug!(env_dir = rel, since = %seen.at, "files unchanged since a pass found them current; not read");
    }
    still
}

/// The ledger's record of a render: each entry's salted hash and whether
/// it came from the installed set.
pub fn ledger_entries(
    hasher: &Hasher,
    rendered: &PerSection<Entries>,
) -> PerSection<BTreeMap<String, LedgerEntry>> {
    rendered.map(|_, entries| {
        (entries.iter())
            .map(|(name, e)| {
                let entry = LedgerEntry {
                    installed: e.origin == Origin::Installed,
                    hash: hasher.entry(&e.value),
                };
                (name.clone(), entry)
            })
            .collect()
    })
}

/// The ledger's hash over a whole render.
pub fn content_hash(hasher: &Hasher, rendered: &PerSection<Entries>) -> String {
    hasher.content(
        (rendered.iter()).map(|(s, entries)| (s, entries.iter().map(|(k, e)| (k, &*e.value)))),
    )
}

/// Whether an owned key as present in a file holds exactly `entries`.
fn same(present: Option<&Map<String, Value>>, entries: &Entries) -> bool {
    present.is_some_and(|p| {
        p.len() == entries.len() && entries.iter().all(|(k, e)| p.get(k) == Some(&*e.value))
    })
}

fn to_map(entries: &Entries) -> Map<String, Value> {
    entries
        .iter()
        .map(|(k, e)| (k.clone(), Value::clone(&e.value)))
        .collect()
}

fn observe(
    dir: Option<&InstanceDir>,
    file: EnvFile,
    input: &ApplyInput<'_>,
    corrupt: &mut Vec<String>,
) -> Result<Observed, EnvDirError> {
    let dry_run = input.dry_run;
    let mut o = Observed {
        doc: Document::empty(),
        stamp: None,
        mode: None,
        present: BTreeMap::new(),
        learnable: Vec::new(),
        empty: Map::new(),
    };
    let Some(read) = dir.map(|d| d.read(file)).transpose()?.flatten() else {
        return Ok(o);
    };
    let dir = dir.expect("a file was read from it");
    let doc = match Document::parse(&read.bytes) {
        Ok(doc) => doc,
        Err(reason) if input.defer_corrupt => {
            return Err(EnvDirError::Unparsable {
                path: dir.display(file.file_name()),
                reason: reason.to_string(),
            });
        }
        Err(reason) => {
            let note = if dry_run {
                format!(
                    "{} is corrupt ({reason}) and would be moved aside",
                    dir.display(file.file_name())
                )
            } else {
                let aside = dir.move_aside(file)?;
                format!(
                    "{} was corrupt ({reason}); moved aside to {aside}",
                    dir.display(file.file_name())
                )
            };
            corrupt.push(note);
            return Ok(o);
        }
    };
    o.stamp = Some(read.stamp);
    o.mode = Some(read.mode);
    let mut copied = false;
    for &section in file.sections() {
        match doc.owned(section.key()) {
            Ok(Some(m)) => {
                o.present.insert(section, m);
                o.learnable.push(section);
            }
            // The file exists without the key: the user removed every entry.
            Ok(None) => o.learnable.push(section),
            // Valid JSON, only deeper than we parse: neither damaged nor ours
            // to replace, so the file is left exactly as it is.
            Err(OwnedError::TooDeep { key, limit }) => {
                return Err(EnvDirError::Refused {
                    path: dir.display(file.file_name()),
                    why: Refusal::TooDeep { key, limit },
                });
            }
            Err(wrong @ OwnedError::WrongType { .. }) => {
                let note = if dry_run {
                    format!(
                        "{}: {wrong}; it would be replaced",
                        dir.display(file.file_name())
                    )
                } else {
                    let aside = if copied {
                        String::from("the copy above")
                    } else {
                        copied = true;
                        dir.copy_aside(file, &read.bytes)?
                    };
                    format!(
                        "{}: {wrong}; replaced, old file kept as {aside}",
                        dir.display(file.file_name())
                    )
                };
                corrupt.push(note);
            }
        }
    }
    o.doc = doc;
    Ok(o)
}

/// The entries of one owned key that differ between `old` and `new`, with
/// both values when `values` is set.
fn entry_changes(
    section: Section,
    old: Option<&Map<String, Value>>,
    new: &Map<String, Value>,
    values: bool,
) -> Vec<Change> {
    let empty = Map::new();
    let old = old.unwrap_or(&empty);
    let kept = |v: Option<&Value>| v.filter(|_| values).cloned();
    let mut out = Vec::new();
    for (name, v) in new {
        if old.get(name) != Some(v) {
            out.push(Change {
                section,
                name: name.clone(),
                old: kept(old.get(name)),
                new: kept(Some(v)),
            });
        }
    }
    for (name, v) in old {
        if !new.contains_key(name) {
            out.push(Change {
                section,
                name: name.clone(),
                old: kept(Some(v)),
                new: None,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// A dry run keeps what `diff` shows; a writing pass names its changes
    /// and holds no values (nor the secrets filled into them).
    #[test]
    fn changed_values_are_kept_in_a_dry_run_only() {
        let old = map(json!({"a": {"token": "s1"}, "gone": 1, "same": 2}));
        let new = map(json!({"a": {"token": "s2"}, "added": 3, "same": 2}));
        let named =
            |changes: &[Change]| -> Vec<String> { changes.iter().map(Change::label).collect() };
        let dry = entry_changes(Section::McpServers, Some(&old), &new, true);
        let wet = entry_changes(Section::McpServers, Some(&old), &new, false);
        assert_eq!(named(&dry), named(&wet));
        assert_eq!(
            named(&dry),
            [
                ".claude.json:mcpServers.a",
                ".claude.json:mcpServers.added",
                ".claude.json:mcpServers.gone"
            ]
        );
        assert_eq!(dry[0].old, Some(json!({"token": "s1"})));
        assert_eq!(dry[0].new, Some(json!({"token": "s2"})));
        assert_eq!(dry[2].old, Some(json!(1)));
        assert!(wet.iter().all(|c| c.old.is_none() && c.new.is_none()));
    }
}
