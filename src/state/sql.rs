//! The store over sqlx's `Any` driver: one set of queries (`$n` parameters and
//! `ON CONFLICT` work in both) for SQLite and PostgreSQL; only the migrations
//! differ, in column types.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use async_trait::async_trait;
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use super::{
    AuditRecord, Database, InstalledInfo, InstanceKey, InstanceState, LedgerEntries, Rotation,
    SecretInfo, StateStore, StoreError,
};
use crate::crypto::{Aad, Keyring, MasterKey, Sealed};
use crate::engine::envdir::Seen;
use crate::engine::ledger::{Hasher, Ledger};
use crate::engine::secrets::SecretValue;
use crate::engine::section::Section;
use crate::time::Timestamp;

use super::stored;

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The SQL store.
pub struct SqlStore {
    pool: AnyPool,
    keys: Keyring,
    hasher: Hasher,
    writes: mpsc::UnboundedSender<Write>,
}

type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

fn q(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| StoreError::Query(what, e)
}

/// Characters escaped in a SQLite path inside a URL (`?` and `#` would start
/// the query or fragment; `%` the escapes themselves).
const PATH_ESCAPES: &AsciiSet = &CONTROLS.add(b'%').add(b'?').add(b'#').add(b' ');

impl SqlStore {
    /// Opens (creating if needed) the database and migrates it.
    pub async fn open(db: &Database, keys: Keyring) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let (url, pool) = match db {
            Database::Sqlite(path) => {
                create_parent(path)?;
                let path = path.to_str().ok_or_else(|| StoreError::Url(db.display()))?;
                let url = format!(
                    "sqlite:{}?mode=rwc",
                    utf8_percent_encode(path, PATH_ESCAPES)
                );
                (url, sqlite_pool(4, Checkpoints::OwnTask))
            }
            Database::Postgres(url) => (url.clone(), AnyPoolOptions::new().max_connections(8)),
        };
        let pool = pool
            .connect(&url)
            .await
            .map_err(|source| StoreError::Open {
                url: db.display(),
                source,
            })?;
        let migrator = match db {
            Database::Sqlite(_) => &SQLITE,
            Database::Postgres(_) => &POSTGRES,
        };
        migrator.run(&pool).await.map_err(StoreError::Migrate)?;
        let dialect = match db {
            Database::Sqlite(_) => Dialect::Sqlite,
            Database::Postgres(_) => Dialect::Postgres,
        };
        let checkpoints = match db {
            Database::Sqlite(_) => Checkpoints::OwnTask,
            Database::Postgres(_) => Checkpoints::Automatic,
        };
        let store = SqlStore::ready(pool, keys, dialect, checkpoints).await?;
        if matches!(db, Database::Sqlite(_)) {
            store.seal_plaintext_installed().await?;
        }
        Ok(store)
    }

    /// A throwaway in-memory SQLite store, for dry runs on a host with no state yet.
    pub async fn open_memory(keys: Keyring) -> Result<SqlStore, StoreError> {
        sqlx::any::install_default_drivers();
        let url = "sqlite::memory:";
        // Every connection would get its own memory database: keep exactly one, forever.
        let pool = sqlite_pool(1, Checkpoints::Automatic)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect(url)
            .await
            .map_err(|source| StoreError::Open {
                url: url.into(),
                source,
            })?;
        SQLITE.run(&pool).await.map_err(StoreError::Migrate)?;
        SqlStore::ready(pool, keys, Dialect::Sqlite, Checkpoints::Automatic).await
    }

    async fn ready(
        pool: AnyPool,
        keys: Keyring,
        dialect: Dialect,
        checkpoints: Checkpoints,
    ) -> Result<SqlStore, StoreError> {
        let salt = ledger_salt(&pool, &keys).await?;
        let (writes, queue) = mpsc::unbounded_channel();
        let committed = (checkpoints == Checkpoints::OwnTask).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(checkpoint_task(pool.clone(), rx));
            tx
        });
        tokio::spawn(group_commit(
            pool.clone(),
            keys.clone(),
            dialect,
            queue,
            committed,
        ));
        Ok(SqlStore {
            pool,
            keys,
            hasher: Hasher::new(salt.to_vec()),
            writes,
        })
    }

    /// Queues a write for the group commit and waits for its transaction.
    async fn queue(&self, op: WriteOp) -> Result<(), StoreError> {
        let (done, result) = oneshot::channel();
        self.writes
            .send(Write { op, done })
            .map_err(|_| StoreError::WriterGone)?;
        result.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Seals rows an older version stored in plain text (SQLite only: the
    /// PostgreSQL schema never had them).
    async fn seal_plaintext_installed(&self) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("starting a transaction"))?;
        let rows = sqlx::query("SELECT * FROM installed_plaintext")
            .fetch_all(&mut *tx)
            .await
            .map_err(q("reading plain-text installed entries"))?;
        if rows.is_empty() {
            return Ok(());
        }
        for row in &rows {
            let key = row_key(row)?;
            let section: String = col(row, "section")?;
            let entry: String = col(row, "entry")?;
            let value = Zeroizing::new(col::<String>(row, "value")?);
            let sealed = self.keys.seal(
                &Aad::installed(&key.namespace, &key.name, &section, &entry),
                value.as_bytes(),
            );
            insert_installed(
                &mut tx,
                &key,
                &section,
                &entry,
                &sealed,
                &col::<String>(row, "adopted_at")?,
            )
            .await?;
        }
        sqlx::query("DELETE FROM installed_plaintext")
            .execute(&mut *tx)
            .await
            .map_err(q("removing plain-text installed entries"))?;
        tx.commit().await.map_err(q("committing"))?;
        // Old page images with the plain text may sit in the WAL file: fold
        // it into the (zeroed) database and cut it to nothing. Best effort:
        // another process reading right now only delays this.
        let _ = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await;
        tracing::info!(
            entries = rows.len(),
            "sealed installed entries stored in plain text by an older version"
        );
        Ok(())
    }
}

fn open_installed(
    keys: &Keyring,
    key: &InstanceKey,
    section: &str,
    entry: &str,
    sealed: &Sealed,
) -> Result<Value, StoreError> {
    let plain = keys
        .open(
            &Aad::installed(&key.namespace, &key.name, section, entry),
            sealed,
        )
        .map_err(|source| StoreError::Sealed {
            what: format!("installed entry {section}.{entry} of {key}"),
            source,
        })?;
    crate::engine::merge::parse_value(&plain).map_err(corrupt("installed entry", key))
}

fn open_secret(
    keys: &Keyring,
    namespace: &str,
    name: &str,
    sealed: &Sealed,
) -> Result<SecretValue, StoreError> {
    let plain = keys
        .open(&Aad::secret(namespace, name), sealed)
        .map_err(|source| StoreError::Sealed {
            what: format!("secret {name} in namespace {namespace}"),
            source,
        })?;
    let value: String = serde_json::from_slice(&plain)
        .map_err(corrupt("secret", &InstanceKey::new(namespace, name)))?;
    Ok(SecretValue::new(value))
}

impl SqlStore {
    /// The states of the rows `filter` (a `WHERE` clause over `namespace`
    /// and `name`, with `binds` for its `$n`) selects, read row by row: the
    /// rows and the parsed states are never held together.
    async fn load_where(
        &self,
        out: &mut HashMap<InstanceKey, InstanceState>,
        filter: &str,
        binds: &[&str],
    ) -> Result<(), StoreError> {
        use futures::TryStreamExt as _;
        let query = |table: &str| {
            // Safe to build: the table is one of two literals and the filter
            // holds only placeholders; every value is bound.
            let sql = format!("SELECT * FROM {table}{filter}");
            (binds.iter()).fold(sqlx::query(sqlx::AssertSqlSafe(sql)), |q, b| q.bind(*b))
        };
        let mut rows = query("ledger").fetch(&self.pool);
        while let Some(row) = rows.try_next().await.map_err(q("loading ledgers"))? {
            let key = row_key(&row)?;
            let ledger = parse_ledger(&key, &row)?;
            let pending = parse_pending(&key, &row)?;
            let state = out.entry(key).or_default();
            state.ledger = Some(ledger);
            state.pending = pending;
        }
        drop(rows);
        let mut rows = query("installed").fetch(&self.pool);
        while let Some(row) = (rows.try_next().await).map_err(q("loading installed entries"))? {
            let key = row_key(&row)?;
            let state = out.entry(key.clone()).or_default();
            self.put_installed(state, &key, &row)?;
        }
        Ok(())
    }

    fn put_installed(
        &self,
        state: &mut InstanceState,
        key: &InstanceKey,
        row: &AnyRow,
    ) -> Result<(), StoreError> {
        let section: String = col(row, "section")?;
        let entry: String = col(row, "entry")?;
        let Some(s) = Section::from_key(&section) else {
            return Ok(());
        };
        let value = open_installed(&self.keys, key, &section, &entry, &sealed(row)?)?;
        state.installed[s].insert(entry, value);
        Ok(())
    }
}

/// Who moves a SQLite database's write-ahead log into the database file.
#[derive(Clone, Copy, PartialEq)]
enum Checkpoints {
    /// The database's own: SQLite's inside whichever commit grows the log
    /// past 1,000 pages (an in-memory database has no log), PostgreSQL's
    /// checkpointer.
    Automatic,
    /// The store's checkpoint task ([`checkpoint_task`]).
    OwnTask,
}

fn sqlite_pool(connections: u32, checkpoints: Checkpoints) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(connections)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                // WAL: readers never block the writer; NORMAL is durable in WAL mode
                // except for the last transactions on power loss, which the next pass
                // redoes. secure_delete: deleted rows are zeroed, not left in free pages.
                // temp_store: a statement's undo pages stay in memory instead of
                // spilling to a temporary file past 64 KiB (an audit batch of a
                // pass updates hundreds of rows in one statement).
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; PRAGMA secure_delete = ON; PRAGMA temp_store = MEMORY;",
                )
                .await?;
                if checkpoints == Checkpoints::OwnTask {
                    conn.execute(OWN_CHECKPOINTS).await?;
                }
                Ok(())
            })
        })
}

/// The checkpoint task waits for the writer to pause this long...
const CHECKPOINT_QUIET: std::time::Duration = std::time::Duration::from_millis(500);
/// ...or for writes of this many rows, whichever comes first (an
/// instance's save is about ten log pages on the fleet benchmark, an audit
/// or stamp row of a batch about one: a log of 4 to 40 MB, copied in tens
/// of milliseconds). Counted in rows, not writes: a pass's batches are a
/// few writes of hundreds of rows each, and a log grown to hundreds of
/// megabytes slows every read (each looks a page up in the log first).
const CHECKPOINT_ROWS: usize = 1000;
/// SQLite's own checkpoints off; a log a burst of writes made larger than
/// 64 MiB is cut back to that when it starts over.
const OWN_CHECKPOINTS: &str =
    "PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;";

/// Moves the write-ahead log into the database file when the writer
/// pauses, beside it instead of in its way. A checkpoint SQLite runs by
/// itself runs inside the commit that crosses its threshold: it copies the
/// log and syncs the database file while that commit's instance (and every
/// write queued behind it) waits, tens of milliseconds on a busy disk. A
/// passive checkpoint never blocks the writer or a reader; the log starts
/// over once one has copied all of it. Ends when the writer does.
///
/// With `synchronous = NORMAL` the log is synced at checkpoints, so what a
/// power loss can take is what was committed since the last one: at most
/// writes of [`CHECKPOINT_ROWS`] rows, and none once writes have paused (SQLite's
/// own left up to 1,000 pages unsynced however long the pause).
async fn checkpoint_task(pool: AnyPool, mut committed: mpsc::UnboundedReceiver<usize>) {
    while checkpoint_due(&mut committed).await {
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&pool)
            .await
        {
            Ok(row) => tracing::debug!(
                log_pages = row.try_get::<i64, _>(1).unwrap_or_default(),
                copied = row.try_get::<i64, _>(2).unwrap_or_default(),
                "checkpointed the state database's log"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "cannot checkpoint the state database's log; retrying after the next write"
            ),
        }
    }
}

/// Waits for the next checkpoint: after a commit, until writes pause for
/// [`CHECKPOINT_QUIET`] or writes of [`CHECKPOINT_ROWS`] rows have been
/// committed. False
/// once the writer is gone with nothing committed since the last one.
async fn checkpoint_due(committed: &mut mpsc::UnboundedReceiver<usize>) -> bool {
    let Some(mut rows) = committed.recv().await else {
        return false;
    };
    while rows < CHECKPOINT_ROWS {
        match tokio::time::timeout(CHECKPOINT_QUIET, committed.recv()).await {
            Ok(Some(n)) => rows += n,
            Ok(None) | Err(_) => break,
        }
    }
    true
}

fn create_parent(path: &Path) -> Result<(), StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// The ledger hash salt, kept sealed so the database alone cannot be used to
/// test guesses of a hashed value. A salt an older version kept in plain text
/// is sealed in place (same salt, so every stored hash stays valid).
async fn ledger_salt(pool: &AnyPool, keys: &Keyring) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    const SEALED: &str = "ledger_salt_sealed";
    let read = |what| async move {
        sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(what)
            .fetch_optional(pool)
            .await
            .map_err(q("reading the ledger salt"))?
            .map(|r| col::<String>(&r, "value"))
            .transpose()
    };
    if read(SEALED).await?.is_none() {
        let plain = match read("ledger_salt").await? {
            Some(legacy) => legacy,
            None => hex::encode(rand_bytes()),
        };
        let sealed = keys.seal(&Aad::meta(SEALED), plain.as_bytes());
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(SEALED)
            .bind(meta_text(&sealed))
            .execute(pool)
            .await
            .map_err(q("storing the ledger salt"))?;
        sqlx::query("DELETE FROM meta WHERE key = 'ledger_salt'")
            .execute(pool)
            .await
            .map_err(q("removing the plain-text ledger salt"))?;
    }
    // Read back: another replica may have stored its salt first.
    let text = read(SEALED).await?.unwrap_or_default();
    let sealed = parse_meta_text(&text).ok_or_else(|| StoreError::Sealed {
        what: "the ledger salt".into(),
        source: crate::crypto::CryptoError::Truncated {
            what: "meta value",
            len: text.len(),
        },
    })?;
    keys.open(&Aad::meta(SEALED), &sealed)
        .map_err(|source| StoreError::Sealed {
            what: "the ledger salt".into(),
            source,
        })
}

/// A sealed value as one text column: `key_id:nonce:ciphertext` (hex).
fn meta_text(s: &Sealed) -> String {
    format!(
        "{}:{}:{}",
        s.key_id,
        hex::encode(&s.nonce),
        hex::encode(&s.ciphertext)
    )
}

fn parse_meta_text(text: &str) -> Option<Sealed> {
    let mut parts = text.splitn(3, ':');
    Some(Sealed {
        key_id: parts.next()?.to_owned(),
        nonce: hex::decode(parts.next()?).ok()?,
        ciphertext: hex::decode(parts.next()?).ok()?,
    })
}

fn rand_bytes() -> [u8; 16] {
    use chacha20poly1305::aead::rand_core::RngCore;
    let mut b = [0u8; 16];
    chacha20poly1305::aead::OsRng.fill_bytes(&mut b);
    b
}

fn col<T>(row: &AnyRow, name: &str) -> Result<T, StoreError>
where
    T: for<'r> sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(name).map_err(q("reading a row"))
}

/// [`col`] for a value that borrows from the row (a text read in place).
fn col_in<'r, T>(row: &'r AnyRow, name: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>,
{
    row.try_get(name).map_err(q("reading a row"))
}

fn sealed(row: &AnyRow) -> Result<Sealed, StoreError> {
    Ok(Sealed {
        key_id: col(row, "key_id")?,
        nonce: col(row, "nonce")?,
        ciphertext: col(row, "ciphertext")?,
    })
}

fn timestamp(row: &AnyRow, name: &str, key: &InstanceKey) -> Result<Timestamp, StoreError> {
    col::<String>(row, name)?
        .parse()
        .map_err(|e: k8s_openapi::jiff::Error| StoreError::Corrupt {
            what: "timestamp",
            instance: key.to_string(),
            source: Box::new(e),
        })
}

fn corrupt(what: &'static str, key: &InstanceKey) -> impl FnOnce(serde_json::Error) -> StoreError {
    let instance = key.to_string();
    move |source| StoreError::Corrupt {
        what,
        instance,
        source: Box::new(source),
    }
}

fn row_key(row: &AnyRow) -> Result<InstanceKey, StoreError> {
    Ok(InstanceKey::new(
        col::<String>(row, "namespace")?,
        col::<String>(row, "name")?,
    ))
}

fn parse_ledger(key: &InstanceKey, row: &AnyRow) -> Result<Ledger, StoreError> {
    // Read in place: the row holds the text already (kilobytes per instance).
    let entries: &str = col_in(row, "entries")?;
    Ok(Ledger {
        entries: stored::from_text(entries).map_err(corrupt("ledger", key))?,
        content_hash: col(row, "content_hash")?,
        written_at: timestamp(row, "written_at", key)?,
        // Only ever a reason to skip a read: unreadable stamps (a column
        // edited by hand) mean the files are read, never that a pass fails.
        seen: col_in::<Option<&str>>(row, "seen")?.and_then(|s| serde_json::from_str(s).ok()),
    })
}

fn parse_pending(key: &InstanceKey, row: &AnyRow) -> Result<Option<LedgerEntries>, StoreError> {
    col_in::<Option<&str>>(row, "pending")?
        .map(stored::from_text)
        .transpose()
        .map_err(corrupt("pending ledger", key))
}

/// A secret's value sealed for its place (as a JSON string, which
/// [`open_secret`] reads back).
fn seal_secret(keys: &Keyring, namespace: &str, name: &str, value: &SecretValue) -> Sealed {
    let plain = Zeroizing::new(serde_json::to_vec(value.expose()).expect("strings serialize"));
    keys.seal(&Aad::secret(namespace, name), &plain)
}

/// An installed entry sealed for its place.
fn seal_installed(
    keys: &Keyring,
    key: &InstanceKey,
    section: &str,
    entry: &str,
    value: &Value,
) -> Sealed {
    let plain = Zeroizing::new(serde_json::to_vec(value).expect("JSON values serialize"));
    keys.seal(
        &Aad::installed(&key.namespace, &key.name, section, entry),
        &plain,
    )
}

async fn insert_installed(
    tx: &mut Tx<'_>,
    key: &InstanceKey,
    section: &str,
    entry: &str,
    sealed: &Sealed,
    adopted_at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO installed (namespace, name, section, entry, key_id, nonce, ciphertext, adopted_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (namespace, name, section, entry) DO UPDATE SET key_id = excluded.key_id,
         nonce = excluded.nonce, ciphertext = excluded.ciphertext",
    )
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(section)
    .bind(entry)
    .bind(&sealed.key_id)
    .bind(sealed.nonce.clone())
    .bind(sealed.ciphertext.clone())
    .bind(adopted_at)
    .execute(&mut **tx)
    .await
    .map_err(q("saving an installed entry"))?;
    Ok(())
}

/// Which SQL a statement that the two databases spell apart is written in.
#[derive(Clone, Copy, Debug)]
enum Dialect {
    Sqlite,
    Postgres,
}

/// A statement `$head <rows> $tail` where `<rows>` is a table `j` of the
/// JSON array bound to `$1`, one row per element, the element in `j.value`
/// (its fields read with `j.value ->> N`): a batch of rows in one
/// statement instead of a statement per row. The databases spell only the
/// table function apart.
macro_rules! over_rows {
    ($dialect:expr, $head:literal, $tail:literal) => {
        match $dialect {
            Dialect::Sqlite => concat!($head, " json_each($1) AS j ", $tail),
            Dialect::Postgres => {
                concat!(
                    $head,
                    " jsonb_array_elements($1::jsonb) AS j(value) ",
                    $tail
                )
            }
        }
    };
}

/// Appends a batch of audit records. A record repeating the last one of
/// its instance (a pass that changed nothing, ending as the one before)
/// is counted on that row; the counting is one statement for the batch,
/// not one per record (a no-op pass over a fleet is a batch of them).
async fn append_audit_in(
    tx: &mut Tx<'_>,
    dialect: Dialect,
    records: &[(InstanceKey, AuditRecord)],
) -> Result<(), StoreError> {
    let fingerprints: Vec<Option<String>> = records
        .iter()
        .map(|(_, audit)| audit.fingerprint())
        .collect();
    let rows: Vec<[String; 4]> = (records.iter().zip(&fingerprints))
        .filter_map(|((key, audit), fp)| {
            Some([
                key.namespace.clone(),
                key.name.clone(),
                fp.clone()?,
                audit.at.to_string(),
            ])
        })
        .collect();
    let unique = {
        let mut keys = std::collections::HashSet::new();
        records.iter().all(|(k, _)| keys.insert(k))
    };
    // An instance twice in one batch: its second record must see its first.
    if !unique || rows.len() < 2 {
        for ((key, audit), fp) in records.iter().zip(&fingerprints) {
            insert_audit(tx, key, audit, fp.as_deref()).await?;
        }
        return Ok(());
    }
    let sql = over_rows!(
        dialect,
        "UPDATE audit SET repeats = repeats + 1, last_at = j.value ->> 3 FROM",
        "WHERE audit.id = (SELECT MAX(a.id) FROM audit a
                           WHERE a.namespace = j.value ->> 0 AND a.name = j.value ->> 1)
         AND audit.fingerprint = j.value ->> 2
         RETURNING audit.namespace, audit.name"
    );
    let bumped: std::collections::HashSet<(String, String)> = sqlx::query(sql)
        .bind(serde_json::to_string(&rows).expect("rows serialize"))
        .fetch_all(&mut **tx)
        .await
        .map_err(q("counting repeated passes in the audit trail"))?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect::<Result<_, sqlx::Error>>()
        .map_err(q("counting repeated passes in the audit trail"))?;
    for ((key, audit), fp) in records.iter().zip(&fingerprints) {
        if !bumped.contains(&(key.namespace.clone(), key.name.clone())) {
            append_new_audit(tx, key, audit, fp.as_deref()).await?;
        }
    }
    Ok(())
}

/// Appends one audit record, counted on the last row of its instance when
/// it repeats it (`fingerprint`, [`AuditRecord::fingerprint`]).
async fn insert_audit(
    tx: &mut Tx<'_>,
    key: &InstanceKey,
    audit: &AuditRecord,
    fingerprint: Option<&str>,
) -> Result<(), StoreError> {
    if let Some(fp) = fingerprint {
        let bumped = sqlx::query(
            "UPDATE audit SET repeats = repeats + 1, last_at = $1
             WHERE id = (SELECT MAX(id) FROM audit WHERE namespace = $2 AND name = $3)
             AND fingerprint = $4",
        )
        .bind(audit.at.to_string())
        .bind(&key.namespace)
        .bind(&key.name)
        .bind(fp)
        .execute(&mut **tx)
        .await
        .map_err(q("counting a repeated pass in the audit trail"))?;
        if bumped.rows_affected() > 0 {
            return Ok(());
        }
    }
    append_new_audit(tx, key, audit, fingerprint).await
}

/// Appends an audit record as a row of its own.
async fn append_new_audit(
    tx: &mut Tx<'_>,
    key: &InstanceKey,
    audit: &AuditRecord,
    fingerprint: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (namespace, name, at, outcome, content_hash, details, fingerprint, repeats)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 1)",
    )
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(audit.at.to_string())
    .bind(&audit.outcome)
    .bind(&audit.content_hash)
    .bind(serde_json::to_string(audit).expect("audit records serialize"))
    .bind(fingerprint)
    .execute(&mut **tx)
    .await
    .map_err(q("appending to the audit trail"))?;
    Ok(())
}

async fn save_in(
    tx: &mut Tx<'_>,
    keys: &Keyring,
    key: &InstanceKey,
    state: &InstanceState,
    audit: &AuditRecord,
) -> Result<(), StoreError> {
    match &state.ledger {
        Some(l) => {
            let entries = stored::to_text(&l.entries);
            sqlx::query(
                    "INSERT INTO ledger (namespace, name, entries, content_hash, written_at, seen) VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (namespace, name) DO UPDATE SET entries = excluded.entries,
                     content_hash = excluded.content_hash, written_at = excluded.written_at,
                     seen = excluded.seen, pending = NULL",
                )
                .bind(&key.namespace)
                .bind(&key.name)
                .bind(entries)
                .bind(&l.content_hash)
                .bind(l.written_at.to_string())
                .bind(l.seen.as_ref().map(|s| serde_json::to_string(s).expect("stamps serialize")))
                .execute(&mut **tx)
                .await
                .map_err(q("saving a ledger"))?;
        }
        None => {
            sqlx::query("DELETE FROM ledger WHERE namespace = $1 AND name = $2")
                .bind(&key.namespace)
                .bind(&key.name)
                .execute(&mut **tx)
                .await
                .map_err(q("deleting a ledger"))?;
        }
    }
    // Rewrite only rows whose value changed, so `adopted_at` keeps the
    // first adoption and unchanged rows keep their nonce.
    let existing = sqlx::query("SELECT * FROM installed WHERE namespace = $1 AND name = $2")
        .bind(&key.namespace)
        .bind(&key.name)
        .fetch_all(&mut **tx)
        .await
        .map_err(q("loading installed entries"))?;
    let mut kept: Vec<(Section, String)> = Vec::new();
    for row in &existing {
        let (section, entry): (String, String) = (col(row, "section")?, col(row, "entry")?);
        let wanted = Section::from_key(&section).and_then(|s| state.installed[s].get(&entry));
        match wanted {
            None => {
                sqlx::query(
                        "DELETE FROM installed WHERE namespace = $1 AND name = $2 AND section = $3 AND entry = $4",
                    )
                    .bind(&key.namespace)
                    .bind(&key.name)
                    .bind(&section)
                    .bind(&entry)
                    .execute(&mut **tx)
                    .await
                    .map_err(q("forgetting an installed entry"))?;
            }
            Some(v) if open_installed(keys, key, &section, &entry, &sealed(row)?)? == *v => {
                let s = Section::from_key(&section).expect("matched above");
                kept.push((s, entry));
            }
            Some(_) => {}
        }
    }
    let now = audit.at.to_string();
    for (section, entries) in state.installed.iter() {
        for (entry, value) in entries {
            if kept.iter().any(|(s, e)| *s == section && e == entry) {
                continue;
            }
            let sealed = seal_installed(keys, key, section.key(), entry, value);
            insert_installed(tx, key, section.key(), entry, &sealed, &now).await?;
        }
    }
    insert_audit(tx, key, audit, audit.fingerprint().as_deref()).await?;
    Ok(())
}

async fn save_pending_in(
    tx: &mut Tx<'_>,
    key: &InstanceKey,
    pending: &LedgerEntries,
) -> Result<(), StoreError> {
    // A first render has no ledger row yet: an empty one carries the pending entries.
    sqlx::query(
        "INSERT INTO ledger (namespace, name, entries, content_hash, written_at, pending)
             VALUES ($1, $2, $3, '', $4, $5)
             ON CONFLICT (namespace, name) DO UPDATE SET pending = excluded.pending",
    )
    .bind(&key.namespace)
    .bind(&key.name)
    .bind(stored::to_text(&LedgerEntries::default()))
    .bind(crate::time::now().to_string())
    .bind(stored::to_text(pending))
    .execute(&mut **tx)
    .await
    .map_err(q("recording what is about to be written"))?;
    Ok(())
}

/// Writes queued by concurrent instance passes, committed together.
struct Write {
    op: WriteOp,
    done: oneshot::Sender<Result<(), StoreError>>,
}

enum WriteOp {
    Save {
        key: InstanceKey,
        state: Box<InstanceState>,
        audit: Box<AuditRecord>,
    },
    Pending {
        key: InstanceKey,
        entries: LedgerEntries,
    },
    Audit(Vec<(InstanceKey, AuditRecord)>),
    Seen(Vec<(InstanceKey, String, Seen)>),
}

impl WriteOp {
    /// Rows it writes, about (what a checkpoint will have to copy).
    fn rows(&self) -> usize {
        match self {
            WriteOp::Save { .. } | WriteOp::Pending { .. } => 1,
            WriteOp::Audit(records) => records.len(),
            WriteOp::Seen(seen) => seen.len(),
        }
    }
}

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 512;

/// The one writer of the database (group commit): every write waiting when
/// a transaction starts goes into it. One transaction for many instances
/// instead of one each, and no two connections of this process contending
/// for SQLite's write lock (whose busy handler sleeps).
async fn group_commit(
    pool: AnyPool,
    keys: Keyring,
    dialect: Dialect,
    mut queue: mpsc::UnboundedReceiver<Write>,
    committed: Option<mpsc::UnboundedSender<usize>>,
) {
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        while group.len() < MAX_GROUP
            && let Ok(w) = queue.try_recv()
        {
            group.push(w);
        }
        let rows = group.iter().map(|w| w.op.rows()).sum();
        let ops: Vec<&WriteOp> = group.iter().map(|w| &w.op).collect();
        let together = group.len() > 1
            && match commit(&pool, &keys, dialect, &ops).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        writes = group.len(),
                        error = %crate::error_chain(&e),
                        "a group of state writes failed; committing each alone"
                    );
                    false
                }
            };
        if !together {
            // One failing write fails the whole group: each alone, so only it fails.
            for w in group {
                let result = commit(&pool, &keys, dialect, &[&w.op]).await;
                let _ = w.done.send(result);
            }
        } else {
            for w in group {
                let _ = w.done.send(Ok(()));
            }
        }
        if let Some(c) = &committed {
            let _ = c.send(rows);
        }
    }
}

async fn commit(
    pool: &AnyPool,
    keys: &Keyring,
    dialect: Dialect,
    ops: &[&WriteOp],
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await.map_err(q("starting a transaction"))?;
    for op in ops {
        match op {
            WriteOp::Save { key, state, audit } => {
                save_in(&mut tx, keys, key, state, audit).await?
            }
            WriteOp::Pending { key, entries } => save_pending_in(&mut tx, key, entries).await?,
            WriteOp::Audit(records) => append_audit_in(&mut tx, dialect, records).await?,
            WriteOp::Seen(seen) => {
                let rows: Vec<[String; 4]> = (seen.iter())
                    .map(|(key, content_hash, seen)| {
                        [
                            key.namespace.clone(),
                            key.name.clone(),
                            content_hash.clone(),
                            serde_json::to_string(seen).expect("stamps serialize"),
                        ]
                    })
                    .collect();
                let sql = over_rows!(
                    dialect,
                    "UPDATE ledger SET seen = j.value ->> 3 FROM",
                    "WHERE ledger.namespace = j.value ->> 0 AND ledger.name = j.value ->> 1
                     AND ledger.content_hash = j.value ->> 2 AND ledger.pending IS NULL"
                );
                sqlx::query(sql)
                    .bind(serde_json::to_string(&rows).expect("rows serialize"))
                    .execute(&mut *tx)
                    .await
                    .map_err(q("keeping the stamps of unchanged files"))?;
            }
        }
    }
    tx.commit().await.map_err(q("committing"))
}

#[async_trait]
impl StateStore for SqlStore {
    fn hasher(&self) -> &Hasher {
        &self.hasher
    }

    async fn load(&self, key: &InstanceKey) -> Result<InstanceState, StoreError> {
        let mut state = InstanceState::default();
        let row = sqlx::query("SELECT * FROM ledger WHERE namespace = $1 AND name = $2")
            .bind(&key.namespace)
            .bind(&key.name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("loading a ledger"))?;
        if let Some(row) = row {
            state.ledger = Some(parse_ledger(key, &row)?);
            state.pending = parse_pending(key, &row)?;
        }
        let rows = sqlx::query("SELECT * FROM installed WHERE namespace = $1 AND name = $2")
            .bind(&key.namespace)
            .bind(&key.name)
            .fetch_all(&self.pool)
            .await
            .map_err(q("loading installed entries"))?;
        for row in &rows {
            self.put_installed(&mut state, key, row)?;
        }
        Ok(state)
    }

    async fn load_many(
        &self,
        keys: &[InstanceKey],
    ) -> Result<HashMap<InstanceKey, InstanceState>, StoreError> {
        /// Names per query: well under SQLite's oldest limit of 999 parameters.
        const NAMES: usize = 500;
        let mut by_namespace: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for k in keys {
            by_namespace.entry(&k.namespace).or_default().push(&k.name);
        }
        let mut out = HashMap::new();
        for (namespace, names) in by_namespace {
            for names in names.chunks(NAMES) {
                let list: Vec<String> = (2..names.len() + 2).map(|i| format!("${i}")).collect();
                let filter = format!(" WHERE namespace = $1 AND name IN ({})", list.join(", "));
                let mut binds = vec![namespace];
                binds.extend(names);
                self.load_where(&mut out, &filter, &binds).await?;
            }
        }
        Ok(out)
    }

    async fn save(
        &self,
        key: &InstanceKey,
        state: &InstanceState,
        audit: &AuditRecord,
    ) -> Result<(), StoreError> {
        self.queue(WriteOp::Save {
            key: key.clone(),
            state: Box::new(state.clone()),
            audit: Box::new(audit.clone()),
        })
        .await
    }

    async fn save_pending(
        &self,
        key: &InstanceKey,
        pending: &LedgerEntries,
    ) -> Result<(), StoreError> {
        self.queue(WriteOp::Pending {
            key: key.clone(),
            entries: pending.clone(),
        })
        .await
    }

    async fn save_seen(&self, seen: &[(InstanceKey, String, Seen)]) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.queue(WriteOp::Seen(seen.to_vec())).await
    }

    async fn audit(&self, records: &[(InstanceKey, AuditRecord)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.queue(WriteOp::Audit(records.to_vec())).await
    }

    async fn history(&self, key: &InstanceKey) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT details, repeats, last_at FROM audit WHERE namespace = $1 AND name = $2 ORDER BY id",
        )
        .bind(&key.namespace)
        .bind(&key.name)
        .fetch_all(&self.pool)
        .await
        .map_err(q("reading the audit trail"))?;
        rows.iter()
            .map(|r| {
                let details: String = col(r, "details")?;
                let mut record: AuditRecord =
                    serde_json::from_str(&details).map_err(corrupt("audit record", key))?;
                record.repeats = col::<i64>(r, "repeats")?.max(1) as u64;
                record.last_at = match col::<Option<String>>(r, "last_at")? {
                    Some(_) => Some(timestamp(r, "last_at", key)?),
                    None => None,
                };
                Ok(record)
            })
            .collect()
    }

    async fn put_secret(
        &self,
        namespace: &str,
        name: &str,
        value: &SecretValue,
    ) -> Result<(), StoreError> {
        let sealed = seal_secret(&self.keys, namespace, name, value);
        let now = crate::time::now().to_string();
        sqlx::query(
            "INSERT INTO secrets (namespace, name, key_id, nonce, ciphertext, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (namespace, name) DO UPDATE SET key_id = excluded.key_id, nonce = excluded.nonce,
             ciphertext = excluded.ciphertext, updated_at = excluded.updated_at",
        )
        .bind(namespace)
        .bind(name)
        .bind(&sealed.key_id)
        .bind(sealed.nonce)
        .bind(sealed.ciphertext)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(q("storing a secret"))?;
        Ok(())
    }

    async fn secret(&self, namespace: &str, name: &str) -> Result<Option<SecretValue>, StoreError> {
        let row = sqlx::query("SELECT * FROM secrets WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(q("reading a secret"))?;
        row.map(|r| open_secret(&self.keys, namespace, name, &sealed(&r)?))
            .transpose()
    }

    async fn namespace_secrets(
        &self,
        namespace: &str,
    ) -> Result<BTreeMap<String, SecretValue>, StoreError> {
        let rows = sqlx::query("SELECT * FROM secrets WHERE namespace = $1")
            .bind(namespace)
            .fetch_all(&self.pool)
            .await
            .map_err(q("reading secrets"))?;
        rows.iter()
            .map(|r| {
                let name: String = col(r, "name")?;
                let value = open_secret(&self.keys, namespace, &name, &sealed(r)?)?;
                Ok((name, value))
            })
            .collect()
    }

    async fn list_secrets(&self, namespace: Option<&str>) -> Result<Vec<SecretInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT namespace, name, key_id, created_at, updated_at FROM secrets
             WHERE $1 IS NULL OR namespace = $1 ORDER BY namespace, name",
        )
        .bind(namespace)
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing secrets"))?;
        rows.iter()
            .map(|r| {
                let key = row_key(r)?;
                Ok(SecretInfo {
                    key_id: col(r, "key_id")?,
                    created_at: timestamp(r, "created_at", &key)?,
                    updated_at: timestamp(r, "updated_at", &key)?,
                    namespace: key.namespace,
                    name: key.name,
                })
            })
            .collect()
    }

    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM secrets WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(q("deleting a secret"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn rotate_key(&self, new: &MasterKey) -> Result<Rotation, StoreError> {
        // Opens with every key known, the new one included: rows a replica
        // already running with the new key sealed are simply re-sealed.
        let opener = self.keys.clone().also_opening(new);
        let sealer = Keyring::new(new.clone(), None);
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("starting a transaction"))?;

        let rows = sqlx::query("SELECT * FROM secrets")
            .fetch_all(&mut *tx)
            .await
            .map_err(q("reading secrets"))?;
        for r in &rows {
            let key = row_key(r)?;
            let value = open_secret(&opener, &key.namespace, &key.name, &sealed(r)?)?;
            let s = seal_secret(&sealer, &key.namespace, &key.name, &value);
            sqlx::query(
                "UPDATE secrets SET key_id = $1, nonce = $2, ciphertext = $3 WHERE namespace = $4 AND name = $5",
            )
            .bind(s.key_id)
            .bind(s.nonce)
            .bind(s.ciphertext)
            .bind(&key.namespace)
            .bind(&key.name)
            .execute(&mut *tx)
            .await
            .map_err(q("re-sealing a secret"))?;
        }
        let secrets = rows.len();

        let rows = sqlx::query("SELECT * FROM installed")
            .fetch_all(&mut *tx)
            .await
            .map_err(q("reading installed entries"))?;
        for r in &rows {
            let key = row_key(r)?;
            let (section, entry): (String, String) = (col(r, "section")?, col(r, "entry")?);
            let value = open_installed(&opener, &key, &section, &entry, &sealed(r)?)?;
            let s = seal_installed(&sealer, &key, &section, &entry, &value);
            insert_installed(
                &mut tx,
                &key,
                &section,
                &entry,
                &s,
                &col::<String>(r, "adopted_at")?,
            )
            .await?;
        }
        let installed = rows.len();

        let sealed_salt = sealer.seal(&Aad::meta("ledger_salt_sealed"), self.hasher.salt());
        sqlx::query("UPDATE meta SET value = $1 WHERE key = 'ledger_salt_sealed'")
            .bind(meta_text(&sealed_salt))
            .execute(&mut *tx)
            .await
            .map_err(q("re-sealing the ledger salt"))?;
        tx.commit().await.map_err(q("committing the rotation"))?;
        Ok(Rotation {
            secrets,
            installed,
            key_id: new.id().to_owned(),
        })
    }

    async fn list_installed(
        &self,
        instance: Option<&InstanceKey>,
    ) -> Result<Vec<InstalledInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT namespace, name, section, entry, adopted_at FROM installed
             WHERE $1 IS NULL OR (namespace = $1 AND name = $2)
             ORDER BY namespace, name, section, entry",
        )
        .bind(instance.map(|k| k.namespace.as_str()))
        .bind(instance.map(|k| k.name.as_str()))
        .fetch_all(&self.pool)
        .await
        .map_err(q("listing installed entries"))?;
        let mut out = Vec::new();
        for r in &rows {
            let key = row_key(r)?;
            let Some(section) = Section::from_key(&col::<String>(r, "section")?) else {
                continue;
            };
            out.push(InstalledInfo {
                section,
                entry: col(r, "entry")?,
                adopted_at: timestamp(r, "adopted_at", &key)?,
                namespace: key.namespace,
                name: key.name,
            });
        }
        Ok(out)
    }

    async fn forget_instance(&self, instance: &InstanceKey) -> Result<(), StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("starting a transaction"))?;
        for statement in [
            "DELETE FROM ledger WHERE namespace = $1 AND name = $2",
            "DELETE FROM installed WHERE namespace = $1 AND name = $2",
        ] {
            sqlx::query(statement)
                .bind(&instance.namespace)
                .bind(&instance.name)
                .execute(&mut *tx)
                .await
                .map_err(q("forgetting an instance"))?;
        }
        tx.commit().await.map_err(q("forgetting an instance"))?;
        Ok(())
    }

    async fn forget_installed(
        &self,
        instance: &InstanceKey,
        section: Section,
        entry: &str,
    ) -> Result<bool, StoreError> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(q("starting a transaction"))?;
        let done = sqlx::query(
            "DELETE FROM installed WHERE namespace = $1 AND name = $2 AND section = $3 AND entry = $4",
        )
        .bind(&instance.namespace)
        .bind(&instance.name)
        .bind(section.key())
        .bind(entry)
        .execute(&mut *tx)
        .await
        .map_err(q("forgetting an installed entry"))?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        let row = sqlx::query("SELECT * FROM ledger WHERE namespace = $1 AND name = $2")
            .bind(&instance.namespace)
            .bind(&instance.name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(q("loading a ledger"))?;
        if let Some(row) = row {
            let mut ledger = parse_ledger(instance, &row)?;
            ledger.entries[section].remove(entry);
            sqlx::query("UPDATE ledger SET entries = $1 WHERE namespace = $2 AND name = $3")
                .bind(stored::to_text(&ledger.entries))
                .bind(&instance.namespace)
                .bind(&instance.name)
                .execute(&mut *tx)
                .await
                .map_err(q("updating a ledger"))?;
        }
        tx.commit().await.map_err(q("committing"))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_is_due_when_writes_pause_or_pile_up() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Writes that never pause for long: due once they add up.
        let batches = CHECKPOINT_ROWS / 10;
        let trickle = tokio::spawn(async move {
            for _ in 0..batches {
                tx.send(10).unwrap();
                tokio::time::sleep(CHECKPOINT_QUIET / 2).await;
            }
            tx
        });
        let started = Instant::now();
        assert!(checkpoint_due(&mut rx).await);
        assert_eq!(
            started.elapsed(),
            CHECKPOINT_QUIET / 2 * (batches as u32 - 1)
        );
        let tx = trickle.await.unwrap();

        // A few writes, then a pause: due after the pause.
        tx.send(3).unwrap();
        let started = Instant::now();
        assert!(checkpoint_due(&mut rx).await);
        assert_eq!(started.elapsed(), CHECKPOINT_QUIET);

        // The writer gone with its last writes copied: no more checkpoints;
        // with writes not yet copied, one more.
        tx.send(1).unwrap();
        drop(tx);
        assert!(checkpoint_due(&mut rx).await);
        assert!(!checkpoint_due(&mut rx).await);
    }
}
