//! Operator state: the ledger, the installed set, the encrypted secret store
//! and the audit trail, behind [`StateStore`]. One implementation serves
//! SQLite (default) and PostgreSQL through sqlx's `Any` driver, so both run
//! the same queries.

mod keys;
mod placement;
mod provider;
mod sql;
mod stored;

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, KeyError, MasterKey};
use crate::engine::ledger::Hasher;
use crate::engine::resolve::Installed;
use crate::engine::secrets::SecretValue;
use crate::engine::section::Section;
use crate::time::Timestamp;

pub use keys::{KeySource, create_key_file, create_key_file_with, default_key_path, keyring};
pub use placement::{check_sqlite, network_filesystem};
pub use provider::StoreSecrets;
pub use sql::SqlStore;

/// Instances are keyed like every object.
pub use crate::engine::snapshot::ObjectKey as InstanceKey;

/// The stored state of one instance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceState {
    /// What was last written, if anything.
    pub ledger: Option<crate::engine::ledger::Ledger>,
    /// Adopted runtime installs.
    pub installed: Installed,
    /// What a pass recorded it was about to write and never confirmed (it
    /// was killed between writing and saving): entries on disk matching it
    /// are the operator's, not runtime installs.
    pub pending: Option<LedgerEntries>,
}

/// Ledger entries per owned key.
pub type LedgerEntries =
    crate::engine::section::PerSection<BTreeMap<String, crate::engine::ledger::LedgerEntry>>;

/// One line of the audit trail; never holds a value, only names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// When.
    pub at: Timestamp,
    /// The reason reported (`Rendered`, `UpToDate`, `MissingSecret`, ...).
    pub outcome: String,
    /// Hash of what is rendered, when something is.
    pub content_hash: Option<String>,
    /// Entries written, as `<file>:<key>.<name>`.
    pub changed: Vec<String>,
    /// Declared entries put back.
    pub drift: Vec<String>,
    /// Runtime installs adopted.
    pub adopted: Vec<String>,
    /// The message reported.
    pub message: String,
    /// Passes that ended exactly like this one in a row (set by the store:
    /// identical passes that changed nothing are counted, not repeated).
    #[serde(default = "one")]
    pub repeats: u64,
    /// When the last of those passes ran, if more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<Timestamp>,
}

fn one() -> u64 {
    1
}

impl AuditRecord {
    /// What makes two records "the same pass again": only passes that
    /// changed nothing collapse.
    fn fingerprint(&self) -> Option<String> {
        use sha2::Digest;
        if !(self.changed.is_empty() && self.drift.is_empty() && self.adopted.is_empty()) {
            return None;
        }
        let mut h = sha2::Sha256::new();
        for part in [
            self.outcome.as_str(),
            self.content_hash.as_deref().unwrap_or(""),
            &self.message,
        ] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        Some(hex::encode(h.finalize()))
    }
}

/// A secret of the encrypted store, without its value.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretInfo {
    /// Namespace.
    pub namespace: String,
    /// Name (what `${SECRET:NAME}` refers to).
    pub name: String,
    /// Id of the master key it is sealed with.
    pub key_id: String,
    /// When first stored.
    pub created_at: Timestamp,
    /// When last set.
    pub updated_at: Timestamp,
}

/// An adopted runtime install, without its value.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct InstalledInfo {
    /// Instance namespace.
    pub namespace: String,
    /// Instance name.
    pub name: String,
    /// Owned key: `enabledPlugins`, `extraKnownMarketplaces` or `mcpServers`.
    pub section: Section,
    /// Entry name within it.
    pub entry: String,
    /// When adopted.
    pub adopted_at: Timestamp,
}

/// What a key rotation re-sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// Secrets re-sealed.
    pub secrets: usize,
    /// Installed entries re-sealed.
    pub installed: usize,
    /// Id of the key everything is now sealed with.
    pub key_id: String,
}

/// The store failed; the pass stops before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `--state` value is not a database URL this build can open.
    #[error("unsupported state URL {0:?}: expected sqlite:<path>, a file path, or postgres://...")]
    Url(String),
    /// Cannot connect or open.
    #[error("cannot open state database {url}")]
    Open {
        /// The database, with any password removed.
        url: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// Schema migration failed.
    #[error("cannot migrate state database")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The database writer task stopped (the runtime is shutting down).
    #[error("the state database writer has stopped")]
    WriterGone,
    /// A query failed.
    #[error("state database query failed while {0}")]
    Query(&'static str, #[source] sqlx::Error),
    /// A stored row is not what this version wrote.
    #[error("state database holds an unreadable {what} for {instance}")]
    Corrupt {
        /// Which row.
        what: &'static str,
        /// Which instance.
        instance: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A sealed row could not be opened.
    #[error("cannot open {what}")]
    Sealed {
        /// Which row, by name.
        what: String,
        /// Why.
        #[source]
        source: CryptoError,
    },
    /// No usable master key.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A server database with no master key given.
    #[error(
        "a PostgreSQL state database needs --master-key-file (or AGENT_ENV_MASTER_KEY_FILE): every replica must use the same key; create one with `agent-env secret keygen`"
    )]
    NoKey,
    /// A SQLite database on a filesystem whose locks it cannot trust.
    #[error(
        "state database {} is on a network filesystem ({filesystem}), where SQLite's file locks are not safe: keep it on a local disk or its own ReadWriteOnce volume (--state sqlite:<path>), or use PostgreSQL (--state postgres://...); --allow-network-state starts anyway",
        .path.display()
    )]
    NetworkFilesystem {
        /// The database.
        path: std::path::PathBuf,
        /// What statfs says it is on.
        filesystem: String,
    },
    /// Cannot create the directory holding the database or key file.
    #[error("cannot create {}", .path.display())]
    Dir {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where the operator keeps its state.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Hashes ledger entries with this database's (sealed) salt.
    fn hasher(&self) -> &Hasher;
    /// One instance's state (empty when unknown).
    async fn load(&self, key: &InstanceKey) -> Result<InstanceState, StoreError>;
    /// The states of `keys` in a few queries (a pass loads a chunk of
    /// instances at a time); a key with no state is left out.
    async fn load_many(
        &self,
        keys: &[InstanceKey],
    ) -> Result<HashMap<InstanceKey, InstanceState>, StoreError>;
    /// Stores an instance's state and appends an audit record, in one transaction.
    async fn save(
        &self,
        key: &InstanceKey,
        state: &InstanceState,
        audit: &AuditRecord,
    ) -> Result<(), StoreError>;
    /// Records what a pass is about to write, before it writes (cleared by
    /// the next [`StateStore::save`]).
    async fn save_pending(
        &self,
        key: &InstanceKey,
        pending: &LedgerEntries,
    ) -> Result<(), StoreError>;
    /// Keeps stamps of unchanged files for ledgers with the given content
    /// hash (a ledger changed since is left alone), in one transaction.
    async fn save_seen(
        &self,
        seen: &[(InstanceKey, String, crate::engine::envdir::Seen)],
    ) -> Result<(), StoreError>;
    /// Appends audit records of passes that stored no state, in one transaction.
    async fn audit(&self, records: &[(InstanceKey, AuditRecord)]) -> Result<(), StoreError>;
    /// The audit trail of an instance, oldest first.
    async fn history(&self, key: &InstanceKey) -> Result<Vec<AuditRecord>, StoreError>;

    /// Stores (or replaces) a secret, sealed with the current master key.
    async fn put_secret(
        &self,
        namespace: &str,
        name: &str,
        value: &SecretValue,
    ) -> Result<(), StoreError>;
    /// One secret's value.
    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretValue>, StoreError>;
    /// Every secret of a namespace, opened.
    async fn namespace_secrets(
        &self,
        namespace: &str,
    ) -> Result<BTreeMap<String, SecretValue>, StoreError>;
    /// Secrets (all, or one namespace's), without values.
    async fn list_secrets(&self, namespace: Option<&str>) -> Result<Vec<SecretInfo>, StoreError>;
    /// Deletes a secret; false when there was none.
    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, StoreError>;
    /// Re-seals every sealed row with `new`, in one transaction: on any
    /// failure nothing changes and every row stays readable with the old key.
    async fn rotate_key(&self, new: &MasterKey) -> Result<Rotation, StoreError>;

    /// Adopted runtime installs (all, or one instance's), without values.
    async fn list_installed(
        &self,
        instance: Option<&InstanceKey>,
    ) -> Result<Vec<InstalledInfo>, StoreError>;
    /// Forgets an instance's ledger and installed set (its env dir was
    /// removed with it); the audit trail stays.
    async fn forget_instance(&self, instance: &InstanceKey) -> Result<(), StoreError>;
    /// Forgets one adopted install, also from the ledger, so the next pass
    /// treats the entry on disk as a new runtime install. False when unknown.
    async fn forget_installed(
        &self,
        instance: &InstanceKey,
        section: Section,
        entry: &str,
    ) -> Result<bool, StoreError>;
}

/// Which database a `--state` URL names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// A SQLite file.
    Sqlite(std::path::PathBuf),
    /// A PostgreSQL server (`postgres://` or `postgresql://` URL).
    Postgres(String),
}

impl Database {
    /// Parses `sqlite:<path>`, `sqlite://<path>`, a plain file path, or a
    /// PostgreSQL URL.
    pub fn parse(url: &str) -> Result<Database, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Database::Postgres(url.to_owned()));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() || path.contains("://") {
            return Err(StoreError::Url(url.to_owned()));
        }
        Ok(Database::Sqlite(path.into()))
    }

    /// The URL without any password, for messages.
    pub fn display(&self) -> String {
        match self {
            Database::Sqlite(p) => format!("sqlite:{}", p.display()),
            Database::Postgres(url) => match url::Url::parse(url) {
                Ok(mut u) if u.password().is_some() => {
                    let _ = u.set_password(Some("***"));
                    u.to_string()
                }
                _ => url.clone(),
            },
        }
    }
}

/// Opens (creating and migrating if needed) the store named by `url`, with
/// the master key `keys` names (for SQLite, by default a key file beside the
/// database, created on first use).
pub async fn open(
    url: &str,
    keys: &KeySource,
) -> Result<std::sync::Arc<dyn StateStore>, StoreError> {
    let db = Database::parse(url)?;
    let ring = keyring(&db, keys, true)?;
    Ok(std::sync::Arc::new(SqlStore::open(&db, ring).await?))
}

/// Opens the store for a pass that must create nothing: a SQLite database
/// that does not exist yet is an empty one in memory.
pub async fn open_existing(
    url: &str,
    keys: &KeySource,
) -> Result<std::sync::Arc<dyn StateStore>, StoreError> {
    let db = Database::parse(url)?;
    let ring = keyring(&db, keys, false)?;
    let store = match &db {
        Database::Sqlite(path) if !path.exists() => SqlStore::open_memory(ring).await?,
        _ => SqlStore::open(&db, ring).await?,
    };
    Ok(std::sync::Arc::new(store))
}
