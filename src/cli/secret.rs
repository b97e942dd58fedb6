//! `agent-env secret`: the encrypted secret store. Values come in on stdin and
//! go out only through `get`; nothing else prints them.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::{EXIT_INPUT, Output, StateArgs, fail};
use crate::crypto::MasterKey;
use crate::engine::secrets::{SecretValue, is_secret_name};
use crate::report::aligned;
use crate::state::keyring;

/// `secret` subcommands.
#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Print a new random master key (base64), or write it to a new file (mode 0600).
    Keygen {
        /// Write the key to this file instead (refuses to replace one).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Store a secret; the value is read from stdin (one trailing newline dropped).
    Set(NamedArgs),
    /// Print a secret's value (no trailing newline).
    Get(NamedArgs),
    /// List secrets: names, key ids and times, never values.
    List(ListArgs),
    /// Delete a secret.
    Delete(NamedArgs),
    /// Re-seal every secret and runtime install with a new master key, in one
    /// transaction. Afterwards run everything with the new key file.
    RotateKey(RotateArgs),
}

/// One secret.
#[derive(Args, Debug)]
pub struct NamedArgs {
    /// The name `${SECRET:NAME}` refers to.
    pub name: String,
    /// Namespace of the instances that may use it.
    #[arg(short = 'n', long)]
    pub namespace: String,
    /// Database and key.
    #[command(flatten)]
    pub state: StateArgs,
}

/// `secret list`.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this namespace (default: all).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table")]
    pub output: Output,
    /// Database and key.
    #[command(flatten)]
    pub state: StateArgs,
}

/// `secret rotate-key`.
#[derive(Args, Debug)]
pub struct RotateArgs {
    /// File with the new key (`agent-env secret keygen --out <file>`).
    #[arg(long)]
    pub new_key_file: PathBuf,
    /// Database and current key.
    #[command(flatten)]
    pub state: StateArgs,
}

fn check_names(a: &NamedArgs) -> Result<(), ExitCode> {
    if !crate::crd::is_dns_label(&a.namespace) {
        eprintln!(
            "error: namespace {:?} is not a valid namespace name (lowercase letters, digits and '-', at most 63)",
            a.namespace
        );
        return Err(ExitCode::from(EXIT_INPUT));
    }
    if !is_secret_name(&a.name) {
        eprintln!(
            "error: secret name {:?} cannot be used as ${{SECRET:NAME}}: a name may hold only letters, digits, '-', '_' and '.'",
            a.name
        );
        return Err(ExitCode::from(EXIT_INPUT));
    }
    Ok(())
}

/// Reads the value from stdin: UTF-8, one trailing newline dropped (so
/// `echo value |` works), not empty, no `${` (Claude Code would expand it).
fn read_value(name: &str) -> Result<SecretValue, String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("reading the value of {name} from stdin; end with Ctrl-D");
    }
    let mut bytes = Zeroizing::new(Vec::new());
    stdin
        .lock()
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    let mut text = Zeroizing::new(
        String::from_utf8(std::mem::take(&mut *bytes))
            .map_err(|_| "the value on stdin is not UTF-8 text".to_owned())?,
    );
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err("the value on stdin is empty".into());
    }
    if text.contains("${") {
        return Err(
            "UnsafeSecretValue: the value contains '${', which Claude Code would expand again"
                .into(),
        );
    }
    Ok(SecretValue::new(std::mem::take(&mut *text)))
}

/// Runs a `secret` subcommand.
pub async fn run(cmd: SecretCommand) -> ExitCode {
    match cmd {
        SecretCommand::Keygen { out } => keygen(out),
        SecretCommand::Set(a) => set(a).await,
        SecretCommand::Get(a) => get(a).await,
        SecretCommand::List(a) => list(a).await,
        SecretCommand::Delete(a) => delete(a).await,
        SecretCommand::RotateKey(a) => rotate(a).await,
    }
}

fn keygen(out: Option<PathBuf>) -> ExitCode {
    match out {
        None => {
            println!("{}", &*MasterKey::generate().encode());
            ExitCode::SUCCESS
        }
        Some(path) => match crate::state::create_key_file(&path) {
            Ok(key) => {
                eprintln!("wrote master key {} to {}", key.id(), path.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
    }
}

async fn set(a: NamedArgs) -> ExitCode {
    if let Err(code) = check_names(&a) {
        return code;
    }
    let value = match read_value(&a.name) {
        Ok(v) => v,
        Err(message) => {
            eprintln!("error: secret {} not stored: {message}", a.name);
            return ExitCode::from(EXIT_INPUT);
        }
    };
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.put_secret(&a.namespace, &a.name, &value).await {
        Ok(()) => {
            eprintln!("stored secret {} in namespace {}", a.name, a.namespace);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

async fn get(a: NamedArgs) -> ExitCode {
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.secret(&a.namespace, &a.name).await {
        Ok(Some(v)) => {
            print!("{}", v.expose());
            ExitCode::SUCCESS
        }
        Ok(None) => not_found(&a),
        Err(e) => fail(&e),
    }
}

fn not_found(a: &NamedArgs) -> ExitCode {
    eprintln!(
        "error: no secret {} in namespace {} in the encrypted store",
        a.name, a.namespace
    );
    ExitCode::from(1)
}

async fn list(a: ListArgs) -> ExitCode {
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let secrets = match store.list_secrets(a.namespace.as_deref()).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    match a.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&secrets).expect("secret infos serialize")
        ),
        Output::Table => {
            let rows: Vec<(Vec<String>, Vec<String>)> = secrets
                .into_iter()
                .map(|s| {
                    (
                        vec![
                            s.namespace,
                            s.name,
                            s.key_id,
                            s.created_at.to_string(),
                            s.updated_at.to_string(),
                        ],
                        vec![],
                    )
                })
                .collect();
            print!(
                "{}",
                aligned(&["NAMESPACE", "NAME", "KEY", "CREATED", "UPDATED"], &rows)
            );
        }
    }
    ExitCode::SUCCESS
}

async fn delete(a: NamedArgs) -> ExitCode {
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.delete_secret(&a.namespace, &a.name).await {
        Ok(true) => {
            eprintln!("deleted secret {} in namespace {}", a.name, a.namespace);
            ExitCode::SUCCESS
        }
        Ok(false) => not_found(&a),
        Err(e) => fail(&e),
    }
}

async fn rotate(a: RotateArgs) -> ExitCode {
    let new = match MasterKey::read(&a.new_key_file) {
        Ok(k) => k,
        Err(e) => return fail(&e),
    };
    // The current key must already exist: rotating from a key made up now
    // would open nothing.
    let db = match crate::state::Database::parse(&a.state.url()) {
        Ok(db) => db,
        Err(e) => return fail(&e),
    };
    if let Err(e) = keyring(&db, &a.state.keys(), false) {
        return fail(&e);
    }
    let store = match a.state.open().await {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.rotate_key(&new).await {
        Ok(r) => {
            println!(
                "re-sealed {} secret(s) and {} runtime install(s) with master key {}",
                r.secrets, r.installed, r.key_id
            );
            if a.state.master_key_file.is_none()
                && let Some(path) = crate::state::default_key_path(&db)
            {
                return replace_default_key(&path, &new);
            }
            eprintln!(
                "now run every agent-env with --master-key-file {}",
                a.new_key_file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// The default key file follows the rotation: replaced atomically, so it holds
/// either key (and the new key file still exists if this step is cut short).
fn replace_default_key(path: &std::path::Path, key: &MasterKey) -> ExitCode {
    let tmp = path.with_extension("key.new");
    let _ = std::fs::remove_file(&tmp);
    let written = crate::state::create_key_file_with(&tmp, key)
        .map_err(|e| crate::error_chain(&e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    match written {
        Ok(()) => {
            eprintln!("replaced {} with the new key", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: rows are sealed with the new key, but {} could not be replaced ({e}): pass --master-key-file with the new key file",
                path.display()
            );
            ExitCode::from(EXIT_INPUT)
        }
    }
}
