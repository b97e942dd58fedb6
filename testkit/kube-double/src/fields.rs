//! Field ownership, as server-side apply keeps it in `managedFields`: which
//! manager set which field, per operation (apply or update) and
//! subresource. A manager that stops applying a field removes it, unless
//! another manager owns it too; that is how a field someone else wrote
//! (a JSON patch, a PUT) outlives every later apply that leaves it out.
//!
//! Fields are map keys; a list is one field, as the double's lists are
//! replaced whole.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use crate::write::Part;

/// A field: the map keys leading to it from the object's root.
pub(crate) type Path = Vec<String>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Manager {
    name: String,
    apply: bool,
    part: Part,
}

/// Who owns which fields of one object.
#[derive(Clone, Debug, Default)]
pub(crate) struct Owners {
    sets: BTreeMap<Manager, BTreeSet<Path>>,
}

/// The fields a write to `part` can own: under the status subresource its
/// `status`; otherwise all but the type, a status that has its own
/// subresource, and the metadata the server keeps.
pub(crate) fn view(obj: &Value, part: Part, has_status: bool) -> Value {
    let mut out = Map::new();
    let Some(map) = obj.as_object() else {
        return Value::Object(out);
    };
    for (k, v) in map {
        let keep = match (part, k.as_str()) {
            (Part::Status, field) => field == "status",
            (Part::Main, "apiVersion" | "kind" | "metadata") => false,
            (Part::Main, "status") => !has_status,
            (Part::Main, _) => true,
        };
        if keep {
            out.insert(k.clone(), v.clone());
        }
    }
    if part == Part::Main
        && let Some(meta) = obj.get("metadata").and_then(Value::as_object)
    {
        let owned: Map<String, Value> = ["labels", "annotations", "finalizers", "ownerReferences"]
            .into_iter()
            .filter_map(|f| meta.get(f).map(|v| (f.to_owned(), v.clone())))
            .collect();
        if !owned.is_empty() {
            out.insert("metadata".into(), Value::Object(owned));
        }
    }
    Value::Object(out)
}

/// Every field of a view, maps and what they hold; nulls set nothing.
pub(crate) fn fields(view: &Value) -> BTreeSet<Path> {
    fn walk(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
        if let Value::Object(m) = v {
            for (k, child) in m {
                if child.is_null() {
                    continue;
                }
                path.push(k.clone());
                out.insert(path.clone());
                walk(child, path, out);
                path.pop();
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(view, &mut Vec::new(), &mut out);
    // `metadata` as a whole is nobody's to remove.
    out.remove(&vec!["metadata".to_owned()]);
    out
}

/// What a write changed: fields set to a new value, and fields whose old
/// content is gone (removed, or replaced by something that is not a map).
fn changes(old: &Value, new: &Value) -> (BTreeSet<Path>, BTreeSet<Path>) {
    fn walk(
        old: Option<&Value>,
        new: Option<&Value>,
        path: &mut Path,
        set: &mut BTreeSet<Path>,
        gone: &mut BTreeSet<Path>,
    ) {
        match (old, new) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                for k in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                    path.push(k.clone());
                    walk(a.get(k), b.get(k), path, set, gone);
                    path.pop();
                }
            }
            (Some(_), None) => {
                gone.insert(path.clone());
            }
            (old, Some(v)) if old != Some(v) => {
                if old.is_some() {
                    gone.insert(path.clone());
                }
                let mut below = BTreeSet::new();
                let mut sub = Map::new();
                sub.insert(String::new(), v.clone());
                // `fields` of a one-key map names `v` and what it holds.
                for p in fields(&Value::Object(sub)) {
                    let mut full = path.clone();
                    full.extend(p.into_iter().skip(1));
                    below.insert(full);
                }
                if !v.is_null() {
                    set.insert(path.clone());
                }
                set.extend(below);
            }
            _ => {}
        }
    }
    let (mut set, mut gone) = (BTreeSet::new(), BTreeSet::new());
    walk(Some(old), Some(new), &mut Vec::new(), &mut set, &mut gone);
    (set, gone)
}

fn under(path: &Path, root: &Path) -> bool {
    path.len() >= root.len() && path[..root.len()] == root[..]
}

impl Owners {
    fn key(name: &str, apply: bool, part: Part) -> Manager {
        Manager {
            name: name.to_owned(),
            apply,
            part,
        }
    }

    /// Other managers lose what this write set anew or took away.
    fn release(&mut self, except: &Manager, old: &Value, new: &Value) -> BTreeSet<Path> {
        let (set, gone) = changes(old, new);
        for (manager, owned) in self.sets.iter_mut() {
            if manager == except {
                continue;
            }
            owned.retain(|p| !set.contains(p) && !gone.iter().any(|g| under(p, g)));
        }
        self.sets.retain(|_, owned| !owned.is_empty());
        set
    }

    /// A create, replace or non-apply patch by `name`: it owns what it
    /// changed. `old` and `new` are [`view`]s.
    pub fn update(&mut self, name: &str, part: Part, old: &Value, new: &Value) {
        let me = Self::key(name, false, part);
        let set = self.release(&me, old, new);
        if !set.is_empty() {
            self.sets.entry(me).or_default().extend(set);
        }
    }

    /// The fields `name` applied last time and leaves out of `applied` now
    /// that no other manager owns (nor anything under them): the apply
    /// removes them.
    pub fn dropped(&self, name: &str, part: Part, applied: &BTreeSet<Path>) -> Vec<Path> {
        let me = Self::key(name, true, part);
        let Some(before) = self.sets.get(&me) else {
            return Vec::new();
        };
        let mut out: Vec<Path> = Vec::new();
        for p in before.difference(applied) {
            if out.iter().any(|done| under(p, done)) {
                continue;
            }
            let kept = self
                .sets
                .iter()
                .filter(|(m, _)| **m != me)
                .any(|(_, owned)| owned.iter().any(|q| under(q, p)));
            if !kept {
                out.push(p.clone());
            }
        }
        out
    }

    /// An apply by `name` of the fields `applied`, which took the object
    /// from `old` to `new` ([`view`]s): it owns exactly those now.
    pub fn apply(
        &mut self,
        name: &str,
        part: Part,
        applied: BTreeSet<Path>,
        old: &Value,
        new: &Value,
    ) {
        let me = Self::key(name, true, part);
        self.release(&me, old, new);
        if applied.is_empty() {
            self.sets.remove(&me);
        } else {
            self.sets.insert(me, applied);
        }
    }
}

/// Removes the field at `path` from `obj`.
pub(crate) fn remove(obj: &mut Value, path: &Path) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = obj;
    for k in parents {
        match at.get_mut(k) {
            Some(next) => at = next,
            None => return,
        }
    }
    if let Some(m) = at.as_object_mut() {
        m.shift_remove(last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> Path {
        s.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn an_apply_drops_what_it_alone_set_before() {
        let mut owners = Owners::default();
        let first = json!({"status": {"a": 1, "b": {"c": 2}}});
        owners.apply("m", Part::Status, fields(&first), &json!({}), &first);
        let second = json!({"status": {"a": 1}});
        let dropped = owners.dropped("m", Part::Status, &fields(&second));
        assert_eq!(dropped, vec![p("status.b")]);
    }

    #[test]
    fn what_another_manager_wrote_outlives_the_apply() {
        let mut owners = Owners::default();
        let patched = json!({"status": {"a": 1, "r": {"x": 1}}});
        owners.update("patcher", Part::Status, &json!({}), &patched);
        let applied = json!({"status": {"a": 2}});
        let after = json!({"status": {"a": 2, "r": {"x": 1}}});
        owners.apply("m", Part::Status, fields(&applied), &patched, &after);
        // The apply took status.a; status.r stays the patcher's.
        let dropped = owners.dropped("m", Part::Status, &fields(&json!({"status": {}})));
        assert_eq!(dropped, vec![p("status.a")]);
    }

    #[test]
    fn a_field_someone_else_changed_is_theirs() {
        let mut owners = Owners::default();
        let applied = json!({"spec": {"a": 1}});
        owners.apply("m", Part::Main, fields(&applied), &json!({}), &applied);
        owners.update("u", Part::Main, &applied, &json!({"spec": {"a": 5}}));
        // m no longer owns spec.a, so leaving it out removes nothing there.
        let dropped = owners.dropped("m", Part::Main, &BTreeSet::new());
        assert_eq!(dropped, Vec::<Path>::new());
    }
}
