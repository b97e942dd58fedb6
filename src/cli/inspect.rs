//! `agent-env installed` and `agent-env history`: what the state holds per
//! instance, by name only (never a value).

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::{Output, StateArgs, fail};
use crate::engine::section::Section;
use crate::report::aligned;
use crate::state::InstanceKey;

/// `installed` subcommands.
#[derive(Subcommand, Debug)]
pub enum InstalledCommand {
    /// List adopted runtime installs (all, or one instance's).
    List(ListArgs),
    /// Forget one adopted install. The next pass treats the entry, if still on
    /// disk, as a new runtime install: adopted again under `runtimeInstalls:
    /// Preserve`, removed under `Revert`.
    Forget(ForgetArgs),
}

/// `installed list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// `<namespace>/<name>` of one instance (default: all).
    #[arg(value_parser = parse_instance)]
    pub instance: Option<InstanceKey>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Database and key.
    #[command(flatten)]
    pub state: StateArgs,
}

/// `installed forget`.
#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// `<namespace>/<name>` of the instance.
    #[arg(value_parser = parse_instance)]
    pub instance: InstanceKey,
    /// Owned key: `enabledPlugins` (or `plugin`), `extraKnownMarketplaces`
    /// (`marketplace`) or `mcpServers` (`mcp`).
    #[arg(value_parser = parse_section)]
    pub section: Section,
    /// Entry name, as in the file (`name@marketplace` for a plugin).
    pub entry: String,
    /// Database and key.
    #[command(flatten)]
    pub state: StateArgs,
}

/// `history`.
#[derive(Args, Debug)]
pub struct HistoryArgs {
    /// `<namespace>/<name>` of the instance.
    #[arg(value_parser = parse_instance)]
    pub instance: InstanceKey,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Database and key.
    #[command(flatten)]
    pub state: StateArgs,
}

pub(super) fn parse_instance(s: &str) -> Result<InstanceKey, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(InstanceKey::new(ns, name))
        }
        _ => Err(format!("expected <namespace>/<name>, got {s:?}")),
    }
}

fn parse_section(s: &str) -> Result<Section, String> {
    Section::from_key(s)
        .or(match s {
            "plugin" | "plugins" => Some(Section::Plugins),
            "marketplace" | "marketplaces" => Some(Section::Marketplaces),
            "mcp" | "mcp-server" | "mcp-servers" => Some(Section::McpServers),
            _ => None,
        })
        .ok_or_else(|| {
            format!("expected enabledPlugins, extraKnownMarketplaces or mcpServers, got {s:?}")
        })
}

/// Runs an `installed` subcommand.
pub async fn installed(cmd: InstalledCommand) -> ExitCode {
    match cmd {
        InstalledCommand::List(a) => list(a).await,
        InstalledCommand::Forget(a) => forget(a).await,
    }
}

async fn list(a: ListArgs) -> ExitCode {
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let entries = match store.list_installed(a.instance.as_ref()).await {
        Ok(e) => e,
        Err(e) => return fail(&e),
    };
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&entries).expect("installed infos serialize")
        ),
        Output::Table => {
            let rows: Vec<(Vec<String>, Vec<String>)> = entries
                .into_iter()
                .map(|e| {
                    (
                        vec![
                            e.namespace,
                            e.name,
                            e.section.key().to_owned(),
                            e.entry,
                            e.adopted_at.to_string(),
                        ],
                        vec![],
                    )
                })
                .collect();
            print!(
                "{}",
                aligned(&["NAMESPACE", "NAME", "KEY", "ENTRY", "ADOPTED"], &rows)
            );
        }
    }
    ExitCode::SUCCESS
}

async fn forget(a: ForgetArgs) -> ExitCode {
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store
        .forget_installed(&a.instance, a.section, &a.entry)
        .await
    {
        Ok(true) => {
            eprintln!(
                "forgot {}.{} of {}; the next pass treats it per spec.runtimeInstalls",
                a.section, a.entry, a.instance
            );
            ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!(
                "error: {} has no adopted install {}.{}",
                a.instance, a.section, a.entry
            );
            ExitCode::from(1)
        }
        Err(e) => fail(&e),
    }
}

/// Runs `history`.
pub async fn history(a: HistoryArgs) -> ExitCode {
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let records = match store.history(&a.instance).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if records.is_empty() {
        eprintln!("error: no history for {}", a.instance);
        return ExitCode::from(1);
    }
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&records).expect("audit records serialize")
        ),
        Output::Table => {
            let rows: Vec<(Vec<String>, Vec<String>)> = records
                .into_iter()
                .map(|r| {
                    let at = match (&r.last_at, r.repeats) {
                        (Some(last), n) if n > 1 => format!("{} (x{n} to {last})", r.at),
                        _ => r.at.to_string(),
                    };
                    let mut what = Vec::new();
                    for (label, list) in [
                        ("changed", &r.changed),
                        ("drift put back", &r.drift),
                        ("adopted", &r.adopted),
                    ] {
                        if !list.is_empty() {
                            what.push(format!("{label}: {}", list.join(", ")));
                        }
                    }
                    let hash = r
                        .content_hash
                        .as_deref()
                        .map_or("-", |h| &h[..h.len().min(12)]);
                    (vec![at, r.outcome, hash.to_owned(), r.message], what)
                })
                .collect();
            print!(
                "{}",
                aligned(&["TIME", "OUTCOME", "CONTENT", "MESSAGE"], &rows)
            );
        }
    }
    ExitCode::SUCCESS
}
