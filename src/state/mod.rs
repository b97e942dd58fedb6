//! Operator state: the ledger, the installed set and the audit trail, behind
//! [`StateStore`] so SQLite (default) and PostgreSQL share one engine.

mod sqlite;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::ledger::{Hasher, Ledger};
use crate::resolve::Installed;
use crate::time::Timestamp;

pub use sqlite::SqliteStore;

/// Instances are keyed like every object.
pub use crate::snapshot::ObjectKey as InstanceKey;

/// The stored state of one instance.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceState {
    /// What was last written, if anything.
    pub ledger: Option<Ledger>,
    /// Adopted runtime installs.
    pub installed: Installed,
}

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
}

/// The store failed; the pass stops before anything is written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The `--state` value is not a database URL this build can open.
    #[error("unsupported state URL {0:?}: expected sqlite:<path> or a file path")]
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
        source: serde_json::Error,
    },
    /// Cannot create the directory holding the database file.
    #[error("cannot create state directory {}", .path.display())]
    Dir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where the operator keeps its state.
#[async_trait]
pub trait StateStore: Send + Sync {
    /// Hashes ledger entries with this database's salt.
    fn hasher(&self) -> &Hasher;
    /// One instance's state (empty when unknown).
    async fn load(&self, key: &InstanceKey) -> Result<InstanceState, StoreError>;
    /// Every instance's state, in one go, for a full pass.
    async fn load_all(&self) -> Result<HashMap<InstanceKey, InstanceState>, StoreError>;
    /// Stores an instance's state and appends an audit record, in one transaction.
    async fn save(
        &self,
        key: &InstanceKey,
        state: &InstanceState,
        audit: &AuditRecord,
    ) -> Result<(), StoreError>;
    /// Appends an audit record alone (a pass that wrote nothing).
    async fn audit(&self, key: &InstanceKey, audit: &AuditRecord) -> Result<(), StoreError>;
    /// The audit trail of an instance, oldest first.
    async fn history(&self, key: &InstanceKey) -> Result<Vec<AuditRecord>, StoreError>;
}

fn sqlite_path(url: &str) -> Result<&Path, StoreError> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    if path.is_empty() || path.contains("://") {
        return Err(StoreError::Url(url.to_owned()));
    }
    Ok(Path::new(path))
}

/// Opens the store named by `url`: `sqlite:<path>`, `sqlite://<path>` or a
/// plain file path.
pub async fn open(url: &str) -> Result<Arc<dyn StateStore>, StoreError> {
    Ok(Arc::new(SqliteStore::open(sqlite_path(url)?).await?))
}

/// Opens the store for a pass that must create nothing: a database that does
/// not exist yet is an empty one in memory.
pub async fn open_existing(url: &str) -> Result<Arc<dyn StateStore>, StoreError> {
    let path = sqlite_path(url)?;
    if path.exists() {
        Ok(Arc::new(SqliteStore::open(path).await?))
    } else {
        Ok(Arc::new(SqliteStore::open_memory().await?))
    }
}
