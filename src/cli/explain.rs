//! `agent-env explain`: why one instance renders what it renders, and why an
//! entry is absent. Reads what `diff` reads and writes nothing.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, ValueEnum};

use super::{InputArgs, Output, fail};
use crate::engine::builtin::Builtin;
use crate::engine::envdir::EnvRoot;
use crate::engine::secrets::{Chain, Lookup, SecretProvider, SecretRef};
use crate::engine::section::Section;
use crate::engine::snapshot::{ObjectKey, Snapshot};
use crate::engine::{Engine, Mode, PassOptions};
use crate::explain::{
    self, EntryExplanation, EntryStatus, Explanation, Inputs, PassVerdict, SecretState, Step,
};
use crate::report::aligned;
use crate::state::{self, StoreSecrets};

/// The owned key of the entry asked about.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// `enabledPlugins` in settings.json.
    Plugin,
    /// `extraKnownMarketplaces` in settings.json.
    Marketplace,
    /// `mcpServers` in .claude.json.
    Mcp,
}

impl From<EntryKind> for Section {
    fn from(k: EntryKind) -> Section {
        match k {
            EntryKind::Plugin => Section::Plugins,
            EntryKind::Marketplace => Section::Marketplaces,
            EntryKind::Mcp => Section::McpServers,
        }
    }
}

/// `explain` arguments.
#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// `<namespace>/<name>` of the AgentInstance.
    #[arg(value_parser = super::inspect::parse_instance)]
    pub instance: ObjectKey,
    /// Explain one entry of this owned key (default: every entry).
    #[arg(value_enum, requires = "entry")]
    pub kind: Option<EntryKind>,
    /// The entry's name as in the file (`<plugin>@<marketplace>` for a plugin).
    pub entry: Option<String>,
    /// Where objects, builtins, env dirs and state are (as for `diff`).
    #[command(flatten)]
    pub input: InputArgs,
    /// Output format.
    #[arg(
        short = 'o',
        long,
        env = "AGENT_ENV_OUTPUT",
        value_enum,
        default_value = "table"
    )]
    pub output: Output,
}

/// Runs `explain`: exit 0 when explained (an absent entry included), 2 when
/// the input cannot be read or the instance is unknown or invalid.
pub async fn run(args: ExplainArgs) -> ExitCode {
    match build(&args).await {
        Ok(e) => {
            match args.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&e).expect("explanations serialize")
                ),
                Output::Table => print!("{}", table(&e, args.kind.is_some())),
            }
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

async fn build(args: &ExplainArgs) -> Result<Explanation, ExitCode> {
    let input = &args.input;
    let key = &args.instance;
    let builtin = Builtin::load(input.config.as_deref()).map_err(|e| fail(&e))?;
    // Sources (file:line per object) are kept only for this command: a pass
    // has no use for them.
    let snapshot: Snapshot =
        crate::host::manifest::load_with_sources(&input.inputs()).map_err(|e| fail(&e))?;
    if let Some(summary) = snapshot.skipped_summary() {
        tracing::info!("{summary}");
    }
    // The instance is checked before the state is opened: naming a wrong
    // instance should not depend on the database.
    let refs = explain::secrets_to_check(&snapshot, &builtin, key).map_err(|e| fail(&e))?;

    // Read-only, as `diff`: an absent database is an empty one, never created.
    input.state.check_placement()?;
    let store = state::open_existing(&input.state.url(), &input.state.keys())
        .await
        .map_err(|e| fail(&e))?;
    let root = EnvRoot::open(&input.state.env_root, false).map_err(|e| fail(&e))?;
    let provider: Arc<dyn SecretProvider> = Arc::new(Chain(vec![
        Arc::new(snapshot.secrets.clone()),
        Arc::new(StoreSecrets::new(store.clone())),
    ]));
    let secrets = lookup_all(provider.as_ref(), &key.namespace, refs).await;
    let installed = store.load(key).await.map_err(|e| fail(&e))?.installed;

    let mut explanation = explain::explain(
        &Inputs {
            snapshot: &snapshot,
            builtin: &builtin,
            installed: &installed,
            secrets: &secrets,
        },
        key,
        args.kind
            .zip(args.entry.as_deref())
            .map(|(k, e)| (k.into(), e)),
    )
    .map_err(|e| fail(&e))?;

    // The pass's own verdict beside the explanation: it also sees what only
    // the env dir shows (runtime installs not yet adopted, drift, unsafe paths).
    let engine = Engine::new(root, store, builtin);
    let opts = PassOptions {
        only: Some(HashSet::from([key.clone()])),
        ..PassOptions::new(Mode::DryRun)
    };
    let outcomes = engine
        .pass_with(&Arc::new(snapshot), &provider, &opts)
        .await
        .map_err(|e| fail(&e))?;
    explanation.pass = outcomes
        .into_iter()
        .find(|o| &o.key == key)
        .map(|o| PassVerdict {
            ready: o.ready,
            reason: o.reason.to_owned(),
            message: o.used_secrets.mask(&o.message),
            adopted: o.adopted,
            drift: o.drift,
        });
    Ok(explanation)
}

/// How each reference resolves; values are looked at (for `${`) and dropped.
async fn lookup_all(
    provider: &dyn SecretProvider,
    namespace: &str,
    refs: impl IntoIterator<Item = SecretRef>,
) -> BTreeMap<SecretRef, SecretState> {
    let mut out = BTreeMap::new();
    for r in refs {
        let state = match provider.lookup(namespace, &r).await {
            Ok(Lookup::Found(v)) if v.expose().contains("${") => SecretState::Unsafe,
            Ok(Lookup::Found(_)) => SecretState::Found,
            Ok(Lookup::Missing) => SecretState::Missing,
            Ok(Lookup::Conflict(secrets)) => SecretState::Conflict { secrets },
            Err(e) => SecretState::Failed {
                error: crate::error_chain(&e),
            },
        };
        out.insert(r, state);
    }
    out
}

fn status_word(e: &EntryExplanation) -> String {
    let s = match e.status {
        EntryStatus::Rendered => "rendered",
        EntryStatus::Disabled => "disabled",
        EntryStatus::Absent => "absent",
        EntryStatus::Undeclared => "undeclared",
    };
    if e.in_key() && !e.written {
        format!("{s}, not written")
    } else {
        s.to_owned()
    }
}

/// Where a builtin or installed value comes from, for the SOURCE column.
fn origin_source(e: &EntryExplanation) -> String {
    match (&e.object, e.scope) {
        (Some(o), _) => o.source.clone().unwrap_or_else(|| "-".into()),
        (None, Some("builtin")) => match e.key {
            Section::Plugins => crate::engine::builtin::AGENTS_FILE,
            Section::Marketplaces => crate::engine::builtin::MARKETPLACES_FILE,
            Section::McpServers => crate::engine::builtin::MCP_FILE,
        }
        .to_owned(),
        (None, Some("installed")) => "state store".to_owned(),
        _ => "-".to_owned(),
    }
}

fn header(e: &Explanation) -> String {
    let mut out = format!(
        "AgentInstance {}/{} (agentType {}, runtimeInstalls {:?})",
        e.namespace, e.name, e.agent_type, e.runtime_installs
    );
    if let Some(s) = &e.source {
        out.push_str(&format!(" at {s}"));
    }
    out.push('\n');
    for b in &e.blocked {
        let obj = b
            .object
            .as_ref()
            .map(|o| format!(" {o}"))
            .unwrap_or_default();
        out.push_str(&format!("  held back: {}{obj}: {}\n", b.reason, b.message));
    }
    if let Some(p) = &e.pass {
        let ready = if p.ready { "ready" } else { "not ready" };
        out.push_str(&format!(
            "  a pass now: {ready} ({}): {}\n",
            p.reason, p.message
        ));
        if !p.adopted.is_empty() {
            out.push_str(&format!(
                "  runtime installs on disk a pass would adopt: {}\n",
                p.adopted.join(", ")
            ));
        }
        if !p.drift.is_empty() {
            out.push_str(&format!(
                "  drift a pass would put back: {}\n",
                p.drift.join(", ")
            ));
        }
    }
    out
}

/// The explanation as text: one row per entry with its notes, or the whole
/// story of the one entry asked about.
fn table(e: &Explanation, one: bool) -> String {
    let mut out = header(e);
    if one {
        for entry in &e.entries {
            out.push_str(&entry_story(entry));
        }
        return out;
    }
    let rows: Vec<(Vec<String>, Vec<String>)> = e
        .entries
        .iter()
        .map(|x| {
            let object = x
                .object
                .as_ref()
                .map_or("-".to_owned(), |o| format!("{}/{}", o.kind, o.name));
            let cells = vec![
                x.kind.to_owned(),
                x.name.clone(),
                status_word(x),
                x.scope.unwrap_or("-").to_owned(),
                object,
                origin_source(x),
            ];
            // The first reason is what the row already says.
            (cells, x.reasons.iter().skip(1).cloned().collect())
        })
        .collect();
    out.push('\n');
    out.push_str(&aligned(
        &["KIND", "NAME", "STATUS", "SCOPE", "OBJECT", "SOURCE"],
        &rows,
    ));
    out
}

fn step_line(s: &Step) -> String {
    let who = s
        .object
        .as_ref()
        .map_or("-".to_owned(), ToString::to_string);
    let value = match (&s.value, s.enabled) {
        (Some(v), _) => compact(v),
        (None, false) => "enabled: false".to_owned(),
        (None, true) => "(value not shown)".to_owned(),
    };
    format!("  {:<9} {who}: {value}\n      {}\n", s.scope, s.note)
}

fn compact(v: &serde_json::Value) -> String {
    serde_json::to_string(v).expect("values serialize")
}

fn entry_story(x: &EntryExplanation) -> String {
    let mut out = format!(
        "\n{} {:?} ({} in {}): {}\n",
        x.kind,
        x.name,
        x.key,
        x.key.file(),
        status_word(x)
    );
    for r in &x.reasons {
        out.push_str(&format!("  {r}\n"));
    }
    if let Some(v) = &x.value {
        out.push_str("value (placeholders as written):\n");
        let pretty = serde_json::to_string_pretty(v).expect("values serialize");
        for line in pretty.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    } else if x.value_withheld {
        out.push_str(
            "value: not shown (a runtime install may hold a token; it is sealed in the state store)\n",
        );
    }
    if !x.secrets.is_empty() {
        out.push_str("secrets:\n");
        for s in &x.secrets {
            let state = match &s.state {
                SecretState::Found => "found".to_owned(),
                SecretState::Missing => "missing".to_owned(),
                SecretState::Conflict { secrets } => {
                    format!(
                        "defined by several labelled Secrets: {}",
                        secrets.join(", ")
                    )
                }
                SecretState::Unsafe => "value contains '${', refused".to_owned(),
                SecretState::Failed { error } => format!("lookup failed: {error}"),
            };
            out.push_str(&format!("  {}: {state}\n", s.name));
        }
    }
    if !x.story.is_empty() {
        out.push_str("story, lowest layer first:\n");
        for s in &x.story {
            out.push_str(&step_line(s));
        }
    }
    if !x.elsewhere.is_empty() {
        out.push_str("declared elsewhere:\n");
        for s in &x.elsewhere {
            out.push_str(&format!("  {s}\n"));
        }
    }
    if !x.did_you_mean.is_empty() {
        out.push_str(&format!("did you mean: {}\n", x.did_you_mean.join(", ")));
    }
    out
}
