//! SQLite: the default store, one file, no server.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use super::{AuditRecord, InstanceKey, InstanceState, StateStore, StoreError};
use crate::ledger::{Hasher, Ledger, LedgerEntry};
use crate::section::{PerSection, Section};
use crate::time::Timestamp;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite store.
pub struct SqliteStore {
    pool: SqlitePool,
    hasher: Hasher,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredEntries(PerSection<BTreeMap<String, LedgerEntry>>);

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let url = format!("sqlite:{}", path.display());
        let opts = SqliteConnectOptions::from_str(&url)
            .map_err(|source| StoreError::Open {
                url: url.clone(),
                source,
            })?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(std::time::Duration::from_secs(10));
        Self::connect(&url, opts, 4).await
    }

    /// A throwaway in-memory store, for dry runs on a host with no state yet.
    pub async fn open_memory() -> Result<SqliteStore, StoreError> {
        let url = "sqlite::memory:";
        let opts = SqliteConnectOptions::from_str(url).map_err(|source| StoreError::Open {
            url: url.into(),
            source,
        })?;
        // Each connection would get its own memory database: keep one.
        Self::connect(url, opts, 1).await
    }

    async fn connect(
        url: &str,
        opts: SqliteConnectOptions,
        connections: u32,
    ) -> Result<SqliteStore, StoreError> {
        let pool = SqlitePoolOptions::new()
            .max_connections(connections)
            .connect_with(opts)
            .await
            .map_err(|source| StoreError::Open {
                url: url.to_owned(),
                source,
            })?;
        MIGRATOR.run(&pool).await.map_err(StoreError::Migrate)?;
        let salt = salt(&pool).await?;
        Ok(SqliteStore {
            pool,
            hasher: Hasher::new(salt),
        })
    }
}

async fn salt(pool: &SqlitePool) -> Result<Vec<u8>, StoreError> {
    let fresh = hex::encode(rand_bytes());
    sqlx::query(
        "INSERT INTO meta (key, value) VALUES ('ledger_salt', ?) ON CONFLICT (key) DO NOTHING",
    )
    .bind(&fresh)
    .execute(pool)
    .await
    .map_err(|e| StoreError::Query("creating the ledger salt", e))?;
    let row = sqlx::query("SELECT value FROM meta WHERE key = 'ledger_salt'")
        .fetch_one(pool)
        .await
        .map_err(|e| StoreError::Query("reading the ledger salt", e))?;
    let salt: String = row.get(0);
    Ok(salt.into_bytes())
}

fn rand_bytes() -> [u8; 16] {
    use chacha20poly1305::aead::rand_core::RngCore;
    let mut b = [0u8; 16];
    chacha20poly1305::aead::OsRng.fill_bytes(&mut b);
    b
}

fn corrupt(what: &'static str, key: &InstanceKey) -> impl FnOnce(serde_json::Error) -> StoreError {
    let instance = key.to_string();
    move |source| StoreError::Corrupt {
        what,
        instance,
        source,
    }
}

fn row_key(row: &sqlx::sqlite::SqliteRow) -> InstanceKey {
    InstanceKey::new(
        row.get::<String, _>("namespace"),
        row.get::<String, _>("name"),
    )
}

fn parse_ledger(key: &InstanceKey, row: &sqlx::sqlite::SqliteRow) -> Result<Ledger, StoreError> {
    let entries: String = row.get("entries");
    let written_at: String = row.get("written_at");
    let entries: StoredEntries = serde_json::from_str(&entries).map_err(corrupt("ledger", key))?;
    let written_at = serde_json::from_value::<Timestamp>(serde_json::Value::String(written_at))
        .map_err(corrupt("ledger time", key))?;
    Ok(Ledger {
        entries: entries.0,
        content_hash: row.get("content_hash"),
        written_at,
    })
}

fn put_installed(
    state: &mut InstanceState,
    key: &InstanceKey,
    row: &sqlx::sqlite::SqliteRow,
) -> Result<(), StoreError> {
    let section: String = row.get("section");
    let Some(section) = Section::from_key(&section) else {
        return Ok(());
    };
    let value: String = row.get("value");
    let value = serde_json::from_str(&value).map_err(corrupt("installed entry", key))?;
    state.installed[section].insert(row.get("entry"), value);
    Ok(())
}

#[async_trait]
impl StateStore for SqliteStore {
    fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    async fn load(&self, key: &InstanceKey) -> Result<InstanceState, StoreError> {
        let mut state = InstanceState::default();
        let row = sqlx::query("SELECT * FROM ledger WHERE namespace = ? AND name = ?")
            .bind(&key.namespace)
            .bind(&key.name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::Query("loading a ledger", e))?;
        if let Some(row) = row {
            state.ledger = Some(parse_ledger(key, &row)?);
        }
        let rows = sqlx::query("SELECT * FROM installed WHERE namespace = ? AND name = ?")
            .bind(&key.namespace)
            .bind(&key.name)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::Query("loading installed entries", e))?;
        for row in &rows {
            put_installed(&mut state, key, row)?;
        }
        Ok(state)
    }

    async fn load_all(&self) -> Result<HashMap<InstanceKey, InstanceState>, StoreError> {
        let mut out: HashMap<InstanceKey, InstanceState> = HashMap::new();
        let rows = sqlx::query("SELECT * FROM ledger")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::Query("loading ledgers", e))?;
        for row in &rows {
            let key = row_key(row);
            let ledger = parse_ledger(&key, row)?;
            out.entry(key).or_default().ledger = Some(ledger);
        }
        let rows = sqlx::query("SELECT * FROM installed")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| StoreError::Query("loading installed entries", e))?;
        for row in &rows {
            let key = row_key(row);
            let state = out.entry(key.clone()).or_default();
            put_installed(state, &key, row)?;
        }
        Ok(out)
    }

    async fn save(
        &self,
        key: &InstanceKey,
        state: &InstanceState,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        let q = |what| move |e| StoreError::Query(what, e);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("starting a transaction"))?;
        match &state.ledger {
            Some(l) => {
                let entries = serde_json::to_string(&StoredEntries(l.entries.clone()))
                    .expect("ledger entries serialize");
                sqlx::query(
                    "INSERT INTO ledger (namespace, name, entries, content_hash, written_at) VALUES (?, ?, ?, ?, ?)
                     ON CONFLICT (namespace, name) DO UPDATE SET entries = excluded.entries,
                     content_hash = excluded.content_hash, written_at = excluded.written_at",
                )
                .bind(&key.namespace)
                .bind(&key.name)
                .bind(entries)
                .bind(&l.content_hash)
                .bind(l.written_at.to_string())
                .execute(&mut *tx)
                .await
                .map_err(q("saving a ledger"))?;
            }
            None => {
                sqlx::query("DELETE FROM ledger WHERE namespace = ? AND name = ?")
                    .bind(&key.namespace)
                    .bind(&key.name)
                    .execute(&mut *tx)
                    .await
                    .map_err(q("deleting a ledger"))?;
            }
        }
        let existing = sqlx::query(
            "SELECT section, entry, value FROM installed WHERE namespace = ? AND name = ?",
        )
        .bind(&key.namespace)
        .bind(&key.name)
        .fetch_all(&mut *tx)
        .await
        .map_err(q("loading installed entries"))?;
        let mut stale: Vec<(String, String)> = Vec::new();
        let mut same: Vec<(String, String, String)> = Vec::new();
        for row in &existing {
            let (section, entry, value): (String, String, String) =
                (row.get(0), row.get(1), row.get(2));
            match Section::from_key(&section).and_then(|s| state.installed[s].get(&entry)) {
                None => stale.push((section, entry)),
                Some(v) if serde_json::to_string(v).ok().as_deref() == Some(&value) => {
                    same.push((section, entry, value))
                }
                Some(_) => {}
            }
        }
        for (section, entry) in stale {
            sqlx::query("DELETE FROM installed WHERE namespace = ? AND name = ? AND section = ? AND entry = ?")
                .bind(&key.namespace)
                .bind(&key.name)
                .bind(section)
                .bind(entry)
                .execute(&mut *tx)
                .await
                .map_err(q("forgetting an installed entry"))?;
        }
        let now = audit.at.to_string();
        for (section, entries) in state.installed.iter() {
            for (entry, value) in entries {
                if same
                    .iter()
                    .any(|(s, e, _)| s == section.key() && e == entry)
                {
                    continue;
                }
                sqlx::query(
                    "INSERT INTO installed (namespace, name, section, entry, value, adopted_at) VALUES (?, ?, ?, ?, ?, ?)
                     ON CONFLICT (namespace, name, section, entry) DO UPDATE SET value = excluded.value",
                )
                .bind(&key.namespace)
                .bind(&key.name)
                .bind(section.key())
                .bind(entry)
                .bind(serde_json::to_string(value).expect("JSON values serialize"))
                .bind(&now)
                .execute(&mut *tx)
                .await
                .map_err(q("saving an installed entry"))?;
            }
        }
        insert_audit(&mut tx, key, audit).await?;
        tx.commit().await.map_err(q("committing"))?;
        Ok(())
    }

    async fn audit(&self, key: &InstanceKey, audit: &AuditRecord) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| StoreError::Query("starting a transaction", e))?;
        insert_audit(&mut tx, key, audit).await?;
        tx.commit()
            .await
            .map_err(|e| StoreError::Query("committing", e))
    }

    async fn history(&self, key: &InstanceKey) -> Result<Vec<AuditRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT details FROM audit WHERE namespace = ? AND name = ? ORDER BY id")
                .bind(&key.namespace)
                .bind(&key.name)
                .fetch_all(&self.pool)
                .await
                .map_err(|e| StoreError::Query("reading the audit trail", e))?;
        rows.iter()
            .map(|r| {
                serde_json::from_str(&r.get::<String, _>(0)).map_err(corrupt("audit record", key))
            })
            .collect()
    }
}

async fn insert_audit(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    key: &InstanceKey,
    audit: &AuditRecord,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (namespace, name, at, outcome, content_hash, details) VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(audit.at.to_string())
    .bind(&audit.outcome)
    .bind(&audit.content_hash)
    .bind(serde_json::to_string(audit).expect("audit records serialize"))
    .execute(&mut **tx)
    .await
    .map_err(|e| StoreError::Query("appending to the audit trail", e))?;
    Ok(())
}
