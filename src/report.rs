//! Report, local half: per-instance rows as a table or JSON, and `diff`
//! output. Every value shown passes through masking first.

use std::io::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::crd::EntrySource;
use crate::engine::Outcome;
use crate::engine::apply::Change;
use crate::engine::secrets::UsedSecrets;
use crate::engine::section::Section;

/// One output row (`reconcile --output json` prints an array of these).
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `spec.agentType`.
    pub agent_type: String,
    /// Env dir relative to the env root.
    pub env_dir: String,
    /// Ready condition.
    pub ready: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Human message.
    pub message: String,
    /// `enabledPlugins` keys written, sorted (including `false` ones).
    pub plugins: Vec<String>,
    /// `extraKnownMarketplaces` keys written, sorted.
    pub marketplaces: Vec<String>,
    /// `mcpServers` keys written, sorted.
    pub mcp_servers: Vec<String>,
    /// Where each rendered entry came from: key, name, scope, object.
    pub sources: Vec<EntrySource>,
    /// Entries changed by this pass, `<file>:<key>.<name>`.
    pub changed: Vec<String>,
    /// Declared entries put back.
    pub drift: Vec<String>,
    /// Runtime installs adopted.
    pub adopted: Vec<String>,
    /// Conflicts and damaged files.
    pub warnings: Vec<String>,
}

impl From<Outcome> for Row {
    /// Takes the outcome's lists instead of copying them: a report row is
    /// the last use of an outcome.
    fn from(o: Outcome) -> Row {
        let mask = |s: &String| o.used_secrets.mask(s);
        Row {
            message: mask(&o.message),
            warnings: o.warnings.iter().map(mask).collect(),
            changed: o.changes.iter().map(Change::label).collect(),
            namespace: o.key.namespace,
            name: o.key.name,
            agent_type: o.agent_type,
            env_dir: o.env_dir,
            ready: o.ready,
            reason: o.reason.to_owned(),
            plugins: o.rendered.plugins,
            marketplaces: o.rendered.marketplaces,
            mcp_servers: o.rendered.mcp_servers,
            sources: o.sources,
            drift: o.drift,
            adopted: o.adopted,
        }
    }
}

/// A report written as outcomes come: JSON rows go out one by one (a large
/// fleet's report is never held whole; 10,000 instances make about 60 MB of
/// it), a table keeps only its cells until it can align them.
pub struct Streamed<W: std::io::Write> {
    out: std::io::BufWriter<W>,
    /// `Some`: a table's rows so far; `None`: JSON.
    table: Option<Vec<(Vec<String>, Vec<String>)>>,
    /// The JSON row being written, kept for the next.
    row: Vec<u8>,
    rows: usize,
    error: Option<std::io::Error>,
}

impl<W: std::io::Write> Streamed<W> {
    /// A JSON array of [`Row`]s.
    pub fn json(w: W) -> Self {
        Streamed {
            // Large writes: a fleet's report is tens of megabytes.
            out: std::io::BufWriter::with_capacity(1 << 18, w),
            table: None,
            row: Vec::new(),
            rows: 0,
            error: None,
        }
    }

    /// An aligned table, warnings under their instance.
    pub fn table(w: W) -> Self {
        Streamed {
            table: Some(Vec::new()),
            ..Streamed::json(w)
        }
    }

    /// Adds an instance's row.
    pub fn push(&mut self, o: Outcome) {
        if let Some(rows) = &mut self.table {
            rows.push(table_row(o));
            return;
        }
        if self.error.is_some() {
            return;
        }
        // The layout `serde_json` gives an array of pretty objects: each
        // row pretty, one level in. A row is made whole first and indented
        // in one walk: serde_json writes token by token, and looking at
        // each token for a newline cost as much as making the row.
        self.row.clear();
        let sep: &[u8] = if self.rows == 0 { b"[\n  " } else { b",\n  " };
        let written = serde_json::to_writer_pretty(&mut self.row, &Row::from(o))
            .map_err(std::io::Error::from)
            .and_then(|()| self.out.write_all(sep))
            .and_then(|()| indented_once(&mut self.out, &self.row));
        if let Err(e) = written {
            self.error = Some(e);
        }
        self.rows += 1;
    }

    /// Ends the report: the first write error, if any.
    pub fn finish(mut self) -> std::io::Result<()> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.table.take() {
            Some(rows) => self
                .out
                .write_all(aligned(&TABLE_HEADER, &rows).as_bytes())?,
            None if self.rows == 0 => self.out.write_all(b"[]\n")?,
            None => self.out.write_all(b"\n]\n")?,
        }
        self.out.flush()
    }
}

/// Writes `json` one level further in: JSON strings hold no raw newline,
/// so every newline is layout, and each is followed by the indent.
fn indented_once(out: &mut impl std::io::Write, json: &[u8]) -> std::io::Result<()> {
    let mut lines = json.split(|b| *b == b'\n');
    if let Some(first) = lines.next() {
        out.write_all(first)?;
    }
    for line in lines {
        out.write_all(b"\n  ")?;
        out.write_all(line)?;
    }
    Ok(())
}

const TABLE_HEADER: [&str; 9] = [
    "NAMESPACE",
    "NAME",
    "TYPE",
    "READY",
    "REASON",
    "PLUGINS",
    "MARKETPLACES",
    "MCP",
    "MESSAGE",
];

/// An instance's cells in the table, and its warnings.
fn table_row(o: Outcome) -> (Vec<String>, Vec<String>) {
    let r = Row::from(o);
    (
        vec![
            r.namespace,
            r.name,
            r.agent_type,
            r.ready.to_string(),
            r.reason,
            r.plugins.len().to_string(),
            r.marketplaces.len().to_string(),
            r.mcp_servers.len().to_string(),
            r.message,
        ],
        r.warnings.iter().map(|w| format!("warning: {w}")).collect(),
    )
}

/// Rows in aligned columns under `header`; the last column is not padded.
/// The second part of a row is printed below it as indented lines.
pub fn aligned(header: &[&str], rows: &[(Vec<String>, Vec<String>)]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for (cells, _) in rows {
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut out = line(&header);
    for (cells, warnings) in rows {
        out.push_str(&line(cells));
        for w in warnings {
            out.push_str(&format!("  {w}\n"));
        }
    }
    out
}

/// Shows a value with secrets hidden: every `env` and `headers` value of an
/// MCP server is masked (runtime installs may carry tokens there too), and
/// any used secret elsewhere is replaced by its placeholder. Each string is
/// masked before the value is serialized: a secret with a quote, backslash
/// or newline in it looks different once JSON-escaped.
fn show(section: Section, v: &Value, used: &UsedSecrets) -> String {
    let mut v = v.clone();
    if section == Section::McpServers
        && let Some(obj) = v.as_object_mut()
    {
        for map in ["env", "headers"] {
            if let Some(Value::Object(m)) = obj.get_mut(map) {
                for val in m.values_mut() {
                    *val = Value::String("***".into());
                }
            }
        }
    }
    if section == Section::Marketplaces
        && let Some(Value::Object(h)) = v.pointer_mut("/source/headers")
    {
        for val in h.values_mut() {
            *val = Value::String("***".into());
        }
    }
    mask_strings(&mut v, used);
    serde_json::to_string(&v).expect("values serialize")
}

fn mask_strings(v: &mut Value, used: &UsedSecrets) {
    match v {
        Value::String(s) => *s = used.mask(s),
        Value::Array(items) => items.iter_mut().for_each(|x| mask_strings(x, used)),
        Value::Object(m) => m.values_mut().for_each(|x| mask_strings(x, used)),
        _ => {}
    }
}

/// The old value of a changed entry, as far as `diff` may show it. An MCP
/// server on disk may hold secrets this pass no longer uses (a Secret's value
/// changed, a placeholder was dropped), which no mask knows: its `url` and
/// each of its `args` is shown only where it equals the new value's, `***`
/// elsewhere.
fn old_shown(section: Section, old: &Value, new: &Value) -> Value {
    let mut old = old.clone();
    if section != Section::McpServers {
        return old;
    }
    let hidden = || Value::String("***".into());
    if let Some(url) = old.get_mut("url")
        && Some(&*url) != new.get("url")
    {
        *url = hidden();
    }
    if let Some(Value::Array(args)) = old.get_mut("args") {
        for (i, a) in args.iter_mut().enumerate() {
            if new.get("args").and_then(|n| n.get(i)) != Some(&*a) {
                *a = hidden();
            }
        }
    }
    old
}

/// `diff` output: per instance, per file and key, what a pass would change.
pub fn diff(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    for o in outcomes {
        if !o.ready {
            out.push_str(&format!(
                "{}: not ready ({}): {}\n",
                o.key,
                o.reason,
                o.used_secrets.mask(&o.message)
            ));
            continue;
        }
        if o.changes.is_empty() {
            continue;
        }
        out.push_str(&format!("{} ({}):\n", o.key, o.env_dir));
        for file in crate::engine::section::EnvFile::ALL {
            let changes: Vec<&Change> = o
                .changes
                .iter()
                .filter(|c| c.section.file() == file)
                .collect();
            if changes.is_empty() {
                continue;
            }
            out.push_str(&format!("  {file}:\n"));
            for c in changes {
                let at = format!("{}.{}", c.section, c.name);
                let line = match (&c.old, &c.new) {
                    (None, Some(n)) => {
                        format!("    + {at}: {}", show(c.section, n, &o.used_secrets))
                    }
                    (Some(_), None) => format!("    - {at}"),
                    (Some(old), Some(n)) => format!(
                        "    ~ {at}: {} -> {}",
                        show(c.section, &old_shown(c.section, old, n), &o.used_secrets),
                        show(c.section, n, &o.used_secrets)
                    ),
                    (None, None) => continue,
                };
                out.push_str(&line);
                out.push('\n');
            }
        }
        for w in &o.warnings {
            out.push_str(&format!("  warning: {}\n", o.used_secrets.mask(w)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::secrets::{SecretRef, SecretValue};
    use serde_json::json;

    #[test]
    fn streamed_json_is_what_serde_json_makes_of_the_rows() {
        let outcome = |name: &str, message: &str| {
            let key = crate::engine::snapshot::ObjectKey {
                namespace: "team".into(),
                name: name.into(),
            };
            let mut o = Outcome::new(&key, "reviewer", format!("team/{name}"));
            o.message = message.into();
            o.rendered.plugins = vec!["a@m".into(), "b@m".into()];
            o.warnings = vec!["two\nlines \"quoted\"".into()];
            o
        };
        let outcomes = || [outcome("a", "up to date"), outcome("b", "x\n  y")];
        for n in 0..=2 {
            let mut out = Vec::new();
            let mut s = Streamed::json(&mut out);
            for o in outcomes().into_iter().take(n) {
                s.push(o);
            }
            s.finish().unwrap();
            let rows: Vec<Row> = outcomes().into_iter().take(n).map(Row::from).collect();
            let expected = serde_json::to_string_pretty(&rows).unwrap() + "\n";
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{n} rows");
        }
    }

    #[test]
    fn diff_values_hide_escaped_secrets_and_old_ones_no_mask_knows() {
        let value = "q\"uo\\te\nnl";
        let used = UsedSecrets(vec![(
            SecretRef::Bare("Q".into()),
            SecretValue::new(value.into()),
        )]);
        let new = json!({"type": "stdio", "command": "x",
            "args": [format!("--t={value}"), "--v"], "env": {"E": value}});
        let shown = show(Section::McpServers, &new, &used);
        assert_eq!(
            shown,
            r#"{"type":"stdio","command":"x","args":["--t=${SECRET:Q}","--v"],"env":{"E":"***"}}"#
        );
        let old = json!({"type": "stdio", "command": "x", "args": ["--t=old-secret", "--v"]});
        assert_eq!(
            old_shown(Section::McpServers, &old, &new)["args"],
            json!(["***", "--v"])
        );
        let old = json!({"type": "http", "url": "https://x/?t=old-secret"});
        let new = json!({"type": "http", "url": "https://x/?t=new-secret"});
        assert_eq!(old_shown(Section::McpServers, &old, &new)["url"], "***");
    }
}
