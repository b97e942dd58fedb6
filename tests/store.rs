//! The state store on every backend: sealed secrets and installs, what
//! happens to altered rows, key rotation, forgetting installs, the audit trail.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use agent_env_operator::crypto::{CryptoError, MasterKey};
use agent_env_operator::engine::ledger::{Ledger, LedgerEntry};
use agent_env_operator::engine::secrets::SecretValue;
use agent_env_operator::engine::section::Section;
use agent_env_operator::state::{
    self, AuditRecord, InstanceKey, InstanceState, KeySource, LedgerEntries, StateStore, StoreError,
};
use common::db::{Backend, backends};
use serde_json::json;
use sqlx::{AnyPool, Row};
use tempfile::TempDir;

const TOKEN: &str = "ghp_installed-token-93ac1";

/// One database and two keys for it.
struct Db {
    dir: TempDir,
    url: String,
    backend: Backend,
}

impl Db {
    fn new(backend: &Backend) -> Db {
        let dir = tempfile::tempdir().unwrap();
        let url = match backend {
            Backend::Sqlite => format!("sqlite:{}", dir.path().join("state.db").display()),
            Backend::Postgres(url) => url.clone(),
        };
        for k in ["old.key", "new.key"] {
            state::create_key_file(&dir.path().join(k)).unwrap();
        }
        Db {
            dir,
            url,
            backend: backend.clone(),
        }
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }

    async fn open_with(
        &self,
        key: &str,
        previous: Option<&str>,
    ) -> Result<Arc<dyn StateStore>, StoreError> {
        state::open(
            &self.url,
            &KeySource {
                master: Some(self.key(key)),
                previous: previous.map(|p| self.key(p)),
            },
        )
        .await
    }

    async fn open(&self) -> Arc<dyn StateStore> {
        self.open_with("old", None).await.unwrap()
    }

    async fn raw(&self) -> AnyPool {
        sqlx::any::install_default_drivers();
        AnyPool::connect(&self.url).await.unwrap()
    }

    /// Every byte the database holds, as text a plaintext search can scan.
    async fn dump(&self) -> Vec<u8> {
        match self.backend {
            Backend::Sqlite => {
                let mut out = Vec::new();
                for f in std::fs::read_dir(self.dir.path()).unwrap() {
                    let f = f.unwrap().path();
                    if f.file_name()
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .starts_with("state.db")
                    {
                        out.extend(std::fs::read(f).unwrap());
                    }
                }
                out
            }
            Backend::Postgres(_) => common::db::dump_postgres(&self.url),
        }
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    let hex = hex_of(needle);
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
        || hay.windows(hex.len()).any(|w| w == hex.as_bytes())
}

fn hex_of(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// What the code under test logs on this thread (warnings and errors), as text.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> CapturedLogs {
        self.clone()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn key() -> InstanceKey {
    InstanceKey::new("dev", "alice")
}

fn record(outcome: &str, changed: &[&str]) -> AuditRecord {
    AuditRecord {
        at: agent_env_operator::time::now(),
        outcome: outcome.into(),
        content_hash: Some("c0ffee".into()),
        changed: changed.iter().map(|s| s.to_string()).collect(),
        drift: vec![],
        adopted: vec![],
        message: format!("{outcome} message"),
        repeats: 1,
        last_at: None,
    }
}

fn sample_state() -> InstanceState {
    let mut s = InstanceState::default();
    s.installed[Section::Plugins].insert("fmt@tools".into(), json!(true));
    s.installed[Section::McpServers].insert(
        "github".into(),
        json!({"type": "http", "url": "https://api.example/mcp", "headers": {"Authorization": format!("Bearer {TOKEN}")}}),
    );
    let mut entries =
        agent_env_operator::engine::section::PerSection::<BTreeMap<String, LedgerEntry>>::default();
    entries[Section::McpServers].insert(
        "github".into(),
        LedgerEntry {
            installed: true,
            hash: "h1".into(),
        },
    );
    s.ledger = Some(Ledger {
        entries,
        content_hash: "c0ffee".into(),
        written_at: agent_env_operator::time::now(),
        // Kept as they were taken: they decide whether a pass reads the files.
        seen: Some(
            serde_json::from_value(json!({
                "at": "2026-12-04T10:00:00.123456789Z",
                "files": [
                    {"dev": 2049, "ino": 131, "size": 412, "mtime": 1796378390, "mtime_nsec": 5,
                     "ctime": 1796378390, "ctime_nsec": 7},
                    {"dev": 2049, "ino": 132, "size": 9000, "mtime": 1796378391, "mtime_nsec": 0,
                     "ctime": 1796378392, "ctime_nsec": 999999999}
                ]
            }))
            .unwrap(),
        ),
    });
    s
}

fn sealed_error(e: StoreError) -> CryptoError {
    match e {
        StoreError::Sealed { source, .. } => source,
        other => panic!("expected a sealed-row error, got {other:?}"),
    }
}

/// A chunk's states in a few queries are each instance's own: across
/// namespaces, past one query's worth of names, with keys that have no state.
#[tokio::test]
async fn states_load_many_at_once_as_one_by_one() {
    for b in backends("load many") {
        let db = Db::new(&b);
        let store = db.open().await;
        let mut keys = Vec::new();
        for i in 0..1200 {
            let k = InstanceKey::new(if i % 3 == 0 { "ops" } else { "dev" }, format!("a{i:04}"));
            if i % 7 != 0 {
                let mut s = sample_state();
                s.ledger.as_mut().unwrap().content_hash = format!("h{i}");
                store
                    .save(&k, &s, &record("Rendered", &["x"]))
                    .await
                    .unwrap();
            }
            keys.push(k);
        }
        let many = store.load_many(&keys).await.unwrap();
        assert_eq!(many.len(), 1200 - 1200usize.div_ceil(7), "{}", b.name());
        for k in &keys {
            let one = store.load(k).await.unwrap();
            match many.get(k) {
                Some(s) => assert_eq!(*s, one, "{}: {k}", b.name()),
                None => assert_eq!(one, InstanceState::default(), "{}: {k}", b.name()),
            }
        }
        assert!(store.load_many(&[]).await.unwrap().is_empty());
    }
}

/// Ledger rows an older operator wrote (each entry an object with its hash
/// in hex) read as they were written; a save writes the compact form, the
/// pending entries too, and reads back the same.
#[tokio::test]
async fn ledger_rows_of_either_form_read_the_same() {
    for b in backends("ledger forms") {
        let db = Db::new(&b);
        let store = db.open().await;
        let mut state = sample_state();
        let digest = "5e".repeat(32);
        let entries = &mut state.ledger.as_mut().unwrap().entries;
        entries[Section::Plugins].insert(
            "fmt@tools".into(),
            LedgerEntry {
                installed: false,
                hash: digest.clone(),
            },
        );
        let entries = entries.clone();
        let (k, other) = (key(), InstanceKey::new("dev", "bob"));
        store
            .save(&k, &state, &record("Rendered", &["x"]))
            .await
            .unwrap();
        store.save_pending(&other, &entries).await.unwrap();
        let pool = db.raw().await;
        let stored = |name: &'static str| {
            let pool = pool.clone();
            async move {
                let row = sqlx::query("SELECT entries, pending FROM ledger WHERE name = $1")
                    .bind(name)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                let text = |c: &str| row.try_get::<Option<String>, _>(c).unwrap();
                (text("entries"), text("pending"))
            }
        };
        let compact = |text: &str| {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            let plugin = v["enabledPlugins"]["fmt@tools"].as_str().map(str::to_owned);
            // A hash that is no digest keeps the object form.
            assert_eq!(v["mcpServers"]["github"]["hash"], "h1", "{}", b.name());
            plugin.is_some_and(|p| p.starts_with('d') && p.len() == 44)
        };
        let (text, _) = stored("alice").await;
        assert!(compact(&text.unwrap()), "{}", b.name());
        let (_, pending) = stored("bob").await;
        assert!(compact(&pending.unwrap()), "{}", b.name());
        assert_eq!(store.load(&k).await.unwrap(), state, "{}", b.name());

        // As an older operator wrote them.
        let old_form = serde_json::to_string(&entries).unwrap();
        assert!(old_form.contains(&digest));
        sqlx::query("UPDATE ledger SET entries = $1, pending = $1")
            .bind(&old_form)
            .execute(&pool)
            .await
            .unwrap();
        let mut expected = state.clone();
        expected.pending = Some(entries.clone());
        assert_eq!(store.load(&k).await.unwrap(), expected, "{}", b.name());
        assert_eq!(
            store.load(&other).await.unwrap().pending,
            Some(entries),
            "{}",
            b.name()
        );
    }
}

/// Stamps stored apart from a save land on the ledger they were taken for,
/// and only there: a ledger whose content changed meanwhile keeps its own.
#[tokio::test]
async fn stamps_are_kept_for_the_ledger_they_were_taken_for() {
    for b in backends("stamps") {
        let db = Db::new(&b);
        let store = db.open().await;
        let mut state = sample_state();
        let seen = state.ledger.as_mut().unwrap().seen.take().unwrap();
        store
            .save(&key(), &state, &record("Rendered", &["x"]))
            .await
            .unwrap();
        let other = InstanceKey::new("dev", "bob");
        store
            .save(&other, &state, &record("Rendered", &["x"]))
            .await
            .unwrap();
        store
            .save_seen(&[
                (key(), "c0ffee".into(), seen.clone()),
                (other.clone(), "an older render".into(), seen.clone()),
            ])
            .await
            .unwrap();
        let loaded = store.load(&key()).await.unwrap();
        assert_eq!(loaded.ledger.unwrap().seen, Some(seen), "{}", b.name());
        assert_eq!(store.load(&other).await.unwrap(), state, "{}", b.name());
    }
}

/// Writes of many instances waiting at once are committed together, in one
/// transaction: saves with and without installs, pending entries,
/// quiet-pass audits and stamps all land as written one by one would have
/// them, and the group is never split up for a failed statement.
#[tokio::test]
async fn writes_of_many_instances_at_once_are_each_instances_own() {
    use futures::future::join_all;
    for b in backends("group commit") {
        let db = Db::new(&b);
        let store = db.open().await;
        let logs = CapturedLogs::default();
        let _guard = tracing::subscriber::set_default(logs.subscriber());
        let keys: Vec<InstanceKey> = (0..40usize)
            .map(|i| {
                InstanceKey::new(
                    if i.is_multiple_of(2) { "dev" } else { "prod" },
                    format!("a{i}"),
                )
            })
            .collect();
        let state_of = |i: usize, installs: bool| {
            let mut s = sample_state();
            let l = s.ledger.as_mut().unwrap();
            l.content_hash = format!("render-{i}");
            if i.is_multiple_of(3) {
                l.seen = None;
            }
            if !(installs && i.is_multiple_of(4)) {
                s.installed = Default::default();
            }
            s
        };
        let mut stamps = sample_state().ledger.unwrap().seen.unwrap();
        // Round one: 30 renders (some with installs), 5 pending, 5 quiet audits.
        let pending: LedgerEntries = sample_state().ledger.unwrap().entries;
        let saves = (0..30).map(|i| {
            let (store, key, state) = (&store, &keys[i], state_of(i, true));
            async move { store.save(key, &state, &record("Rendered", &["x"])).await }
        });
        let pendings = (30..35).map(|i| store.save_pending(&keys[i], &pending));
        let audits = (35..40).map(|i| {
            let (store, key) = (&store, keys[i].clone());
            async move { store.audit(&[(key, record("MissingSecret", &[]))]).await }
        });
        let (a, b2, c) = futures::join!(join_all(saves), join_all(pendings), join_all(audits));
        assert!(a.into_iter().chain(b2).chain(c).all(|r| r.is_ok()));
        // Round two and three: every render again, quiet and without installs,
        // and stamps for the first ten.
        for _ in 0..2 {
            let saves = (0..30).map(|i| {
                let (store, key, state) = (&store, &keys[i], state_of(i, false));
                async move { store.save(key, &state, &record("UpToDate", &[])).await }
            });
            let seen = (0..10).map(|i| {
                let (store, key) = (&store, keys[i].clone());
                let stamps = stamps.clone();
                async move {
                    store
                        .save_seen(&[(key, format!("render-{i}"), stamps)])
                        .await
                }
            });
            let (a, c) = futures::join!(join_all(saves), join_all(seen));
            assert!(a.into_iter().chain(c).all(|r| r.is_ok()));
        }
        stamps.at = agent_env_operator::time::now();
        let loaded = store.load_many(&keys).await.unwrap();
        for (i, key) in keys.iter().enumerate() {
            let got = loaded.get(key).cloned().unwrap_or_default();
            let history: Vec<(String, u64)> = (store.history(key).await.unwrap().iter())
                .map(|r| (r.outcome.clone(), r.repeats))
                .collect();
            match i {
                0..30 => {
                    let mut want = state_of(i, false);
                    // Each round's state is made anew; its time is the last round's.
                    want.ledger.as_mut().unwrap().written_at =
                        got.ledger.as_ref().unwrap().written_at;
                    if i < 10 {
                        want.ledger.as_mut().unwrap().seen =
                            got.ledger.as_ref().unwrap().seen.clone();
                        assert!(
                            want.ledger.as_ref().unwrap().seen.is_some(),
                            "{key} {}",
                            b.name()
                        );
                    }
                    assert_eq!(got, want, "{key} {}", b.name());
                    let want = [("Rendered".to_owned(), 1), ("UpToDate".to_owned(), 2)];
                    assert_eq!(history, want, "{key} {}", b.name());
                }
                30..35 => {
                    assert_eq!(got.pending.as_ref(), Some(&pending), "{key} {}", b.name());
                    assert_eq!(got.ledger.as_ref().unwrap().content_hash, "", "{key}");
                    assert!(history.is_empty(), "{key} {}", b.name());
                }
                _ => {
                    assert_eq!(got, InstanceState::default(), "{key} {}", b.name());
                    assert_eq!(
                        history,
                        [("MissingSecret".to_owned(), 1)],
                        "{key} {}",
                        b.name()
                    );
                }
            }
        }
        let logs = logs.text();
        assert!(
            !logs.contains("committing each alone"),
            "{}: {logs}",
            b.name()
        );
    }
}

#[tokio::test]
async fn state_round_trips_and_installs_are_never_stored_in_plain_text() {
    for b in backends("state round trip") {
        let db = Db::new(&b);
        let store = db.open().await;
        let state = sample_state();
        store
            .save(&key(), &state, &record("Rendered", &["x"]))
            .await
            .unwrap();
        assert_eq!(store.load(&key()).await.unwrap(), state, "{}", b.name());
        assert_eq!(store.load_many(&[key()]).await.unwrap()[&key()], state);
        // A second save with the same values keeps rows (and adoption times).
        let before = store.list_installed(Some(&key())).await.unwrap();
        store
            .save(&key(), &state, &record("Rendered", &["y"]))
            .await
            .unwrap();
        assert_eq!(store.list_installed(Some(&key())).await.unwrap(), before);
        drop(store);
        assert!(
            !contains(&db.dump().await, TOKEN),
            "{}: an installed token is stored in plain text",
            b.name()
        );
    }
}

#[tokio::test]
async fn secrets_round_trip_by_namespace_and_name() {
    for b in backends("secret round trip") {
        let db = Db::new(&b);
        let store = db.open().await;
        let v = SecretValue::new("s3cr3t-value".into());
        store.put_secret("dev", "TOKEN", &v).await.unwrap();
        store
            .put_secret("prod", "TOKEN", &SecretValue::new("prod-value".into()))
            .await
            .unwrap();
        assert_eq!(
            store
                .secret("dev", "TOKEN")
                .await
                .unwrap()
                .unwrap()
                .expose(),
            "s3cr3t-value"
        );
        assert!(store.secret("dev", "OTHER").await.unwrap().is_none());
        let dev = store.namespace_secrets("dev").await.unwrap();
        assert_eq!(dev.len(), 1);
        assert_eq!(dev["TOKEN"].expose(), "s3cr3t-value");
        let all = store.list_secrets(None).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(store.list_secrets(Some("prod")).await.unwrap().len(), 1);
        // Replacing keeps the creation time and moves the update time.
        store
            .put_secret("dev", "TOKEN", &SecretValue::new("rotated".into()))
            .await
            .unwrap();
        let dev_info = &store.list_secrets(Some("dev")).await.unwrap()[0];
        assert_eq!(dev_info.created_at, all[0].created_at);
        assert!(dev_info.updated_at >= all[0].updated_at);
        assert!(store.delete_secret("dev", "TOKEN").await.unwrap());
        assert!(!store.delete_secret("dev", "TOKEN").await.unwrap());
        assert!(store.secret("dev", "TOKEN").await.unwrap().is_none());
        drop(store);
        assert!(!contains(&db.dump().await, "prod-value"), "{}", b.name());
    }
}

async fn ciphertext(pool: &AnyPool, ns: &str, name: &str) -> (Vec<u8>, Vec<u8>) {
    let row =
        sqlx::query("SELECT nonce, ciphertext FROM secrets WHERE namespace = $1 AND name = $2")
            .bind(ns.to_owned())
            .bind(name.to_owned())
            .fetch_one(pool)
            .await
            .unwrap();
    (row.get("nonce"), row.get("ciphertext"))
}

async fn set_sealed(pool: &AnyPool, ns: &str, name: &str, nonce: Vec<u8>, ct: Vec<u8>) {
    sqlx::query(
        "UPDATE secrets SET nonce = $1, ciphertext = $2 WHERE namespace = $3 AND name = $4",
    )
    .bind(nonce)
    .bind(ct)
    .bind(ns.to_owned())
    .bind(name.to_owned())
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn altered_moved_and_cut_rows_are_clear_errors_never_garbage() {
    for b in backends("altered rows") {
        let db = Db::new(&b);
        let store = db.open().await;
        store
            .put_secret("dev", "TOKEN", &SecretValue::new("s3cr3t".into()))
            .await
            .unwrap();
        let pool = db.raw().await;
        let (nonce, ct) = ciphertext(&pool, "dev", "TOKEN").await;

        // One flipped bit.
        let mut flipped = ct.clone();
        flipped[3] ^= 0x01;
        set_sealed(&pool, "dev", "TOKEN", nonce.clone(), flipped).await;
        let e = store.secret("dev", "TOKEN").await.unwrap_err();
        let text = agent_env_operator::error_chain(&e);
        assert!(text.contains("secret TOKEN in namespace dev"), "{text}");
        assert_eq!(sealed_error(e), CryptoError::Tampered);

        // Cut short.
        set_sealed(&pool, "dev", "TOKEN", nonce.clone(), ct[..10].to_vec()).await;
        assert!(matches!(
            sealed_error(store.secret("dev", "TOKEN").await.unwrap_err()),
            CryptoError::Truncated { .. }
        ));
        set_sealed(&pool, "dev", "TOKEN", nonce[..12].to_vec(), ct.clone()).await;
        assert!(matches!(
            sealed_error(store.secret("dev", "TOKEN").await.unwrap_err()),
            CryptoError::Truncated { what: "nonce", .. }
        ));
        set_sealed(&pool, "dev", "TOKEN", nonce.clone(), ct.clone()).await;
        assert_eq!(
            store
                .secret("dev", "TOKEN")
                .await
                .unwrap()
                .unwrap()
                .expose(),
            "s3cr3t"
        );

        // Copied under another name, and moved to another namespace.
        sqlx::query(
            "INSERT INTO secrets (namespace, name, key_id, nonce, ciphertext, created_at, updated_at)
             SELECT namespace, 'OTHER', key_id, nonce, ciphertext, created_at, updated_at FROM secrets",
        )
        .execute(&pool)
        .await
        .unwrap();
        assert_eq!(
            sealed_error(store.secret("dev", "OTHER").await.unwrap_err()),
            CryptoError::Tampered
        );
        sqlx::query("UPDATE secrets SET namespace = 'prod' WHERE name = 'TOKEN'")
            .execute(&pool)
            .await
            .unwrap();
        assert_eq!(
            sealed_error(store.secret("prod", "TOKEN").await.unwrap_err()),
            CryptoError::Tampered
        );
        // A namespace's bad row fails the namespace read too: never a partial map.
        assert!(store.namespace_secrets("prod").await.is_err());
    }
}

#[tokio::test]
async fn a_wrong_key_is_refused_naming_both_key_ids() {
    for b in backends("wrong key") {
        let db = Db::new(&b);
        db.open()
            .await
            .put_secret("dev", "TOKEN", &SecretValue::new("s3cr3t".into()))
            .await
            .unwrap();
        let err = match db.open_with("new", None).await {
            Ok(_) => panic!("{}: opened with the wrong key", b.name()),
            Err(e) => agent_env_operator::error_chain(&e),
        };
        let old = MasterKey::read(&db.key("old")).unwrap();
        let new = MasterKey::read(&db.key("new")).unwrap();
        assert!(
            err.contains(old.id()) && err.contains(new.id()),
            "{}: {err}",
            b.name()
        );
        assert!(!err.contains("s3cr3t"));
    }
}

#[tokio::test]
async fn rotation_reseals_every_row_and_only_the_new_key_opens_them() {
    for b in backends("rotation") {
        let db = Db::new(&b);
        let store = db.open().await;
        for i in 0..40 {
            store
                .put_secret(
                    "dev",
                    &format!("S{i}"),
                    &SecretValue::new(format!("value-{i}")),
                )
                .await
                .unwrap();
        }
        store
            .save(&key(), &sample_state(), &record("Rendered", &["x"]))
            .await
            .unwrap();
        let new = MasterKey::read(&db.key("new")).unwrap();
        let r = store.rotate_key(&new).await.unwrap();
        assert_eq!((r.secrets, r.installed), (40, 2), "{}", b.name());
        drop(store);

        assert!(db.open_with("old", None).await.is_err(), "{}", b.name());
        let store = db.open_with("new", None).await.unwrap();
        for s in store.list_secrets(None).await.unwrap() {
            assert_eq!(s.key_id, new.id());
        }
        for i in 0..40 {
            assert_eq!(
                store
                    .secret("dev", &format!("S{i}"))
                    .await
                    .unwrap()
                    .unwrap()
                    .expose(),
                format!("value-{i}")
            );
        }
        assert_eq!(
            store.load(&key()).await.unwrap().installed,
            sample_state().installed
        );
        // The ledger hashes are unchanged: the salt moved keys, not values.
        let before = db.open_with("new", Some("old")).await.unwrap();
        assert_eq!(
            before.hasher().entry(&json!(1)),
            store.hasher().entry(&json!(1))
        );
    }
}

#[tokio::test]
async fn forgetting_an_install_drops_it_from_the_ledger_too() {
    for b in backends("forget install") {
        let db = Db::new(&b);
        let store = db.open().await;
        store
            .save(&key(), &sample_state(), &record("Rendered", &["x"]))
            .await
            .unwrap();
        let listed = store.list_installed(None).await.unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|i| format!("{}.{}", i.section, i.entry))
                .collect::<Vec<_>>(),
            ["enabledPlugins.fmt@tools", "mcpServers.github"]
        );
        assert!(
            store
                .forget_installed(&key(), Section::McpServers, "github")
                .await
                .unwrap()
        );
        assert!(
            !store
                .forget_installed(&key(), Section::McpServers, "github")
                .await
                .unwrap()
        );
        let state = store.load(&key()).await.unwrap();
        assert!(state.installed[Section::McpServers].is_empty());
        assert!(state.installed[Section::Plugins].contains_key("fmt@tools"));
        assert!(
            state.ledger.unwrap().entries[Section::McpServers].is_empty(),
            "{}",
            b.name()
        );
    }
}

#[tokio::test]
async fn identical_quiet_passes_are_counted_on_one_audit_row() {
    for b in backends("audit") {
        let db = Db::new(&b);
        let store = db.open().await;
        let other = InstanceKey::new("dev", "bob");
        store
            .save(&key(), &sample_state(), &record("Rendered", &["a"]))
            .await
            .unwrap();
        for _ in 0..3 {
            store
                .audit(&[
                    (key(), record("UpToDate", &[])),
                    (other.clone(), record("MissingSecret", &[])),
                ])
                .await
                .unwrap();
        }
        store
            .save(&key(), &sample_state(), &record("Rendered", &["b"]))
            .await
            .unwrap();
        store
            .audit(&[(key(), record("UpToDate", &[]))])
            .await
            .unwrap();
        let h = store.history(&key()).await.unwrap();
        let summary: Vec<(String, u64)> =
            h.iter().map(|r| (r.outcome.clone(), r.repeats)).collect();
        assert_eq!(
            summary,
            [
                ("Rendered".to_owned(), 1),
                ("UpToDate".to_owned(), 3),
                ("Rendered".to_owned(), 1),
                ("UpToDate".to_owned(), 1)
            ],
            "{}",
            b.name()
        );
        assert!(h[1].last_at.is_some());
        assert_eq!(h[0].changed, ["a"]);
        let bob = store.history(&other).await.unwrap();
        assert_eq!((bob.len(), bob[0].repeats), (1, 3));

        // In one batch: one instance repeats its last record, another ends
        // differently from its last; then one instance twice in a batch.
        let last = record("UpToDate", &[]);
        store
            .audit(&[
                (other.clone(), record("UpToDate", &[])),
                (key(), last.clone()),
            ])
            .await
            .unwrap();
        store
            .audit(&[
                (other.clone(), record("UpToDate", &[])),
                (other.clone(), record("UpToDate", &[])),
            ])
            .await
            .unwrap();
        let h = store.history(&key()).await.unwrap();
        assert_eq!((h.len(), h[3].repeats), (4, 2), "{}", b.name());
        assert_eq!(h[3].last_at, Some(last.at), "{}", b.name());
        let bob = store.history(&other).await.unwrap();
        let summary: Vec<(String, u64)> =
            bob.iter().map(|r| (r.outcome.clone(), r.repeats)).collect();
        assert_eq!(
            summary,
            [("MissingSecret".to_owned(), 3), ("UpToDate".to_owned(), 3)],
            "{}",
            b.name()
        );
    }
}

/// Databases written before values were sealed: their plain-text installs and
/// salt are sealed when the store first opens them, nothing lost.
#[tokio::test]
async fn plain_text_state_of_an_older_version_is_sealed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let migrations = dir.path().join("migrations");
    std::fs::create_dir(&migrations).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/migrations/sqlite/0001_init.sql"
        ),
        migrations.join("0001_init.sql"),
    )
    .unwrap();
    let path = dir.path().join("state.db");
    let url = format!("sqlite:{}?mode=rwc", path.display());
    sqlx::any::install_default_drivers();
    let pool = AnyPool::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(migrations.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    let value =
        json!({"type": "http", "url": "https://x/mcp", "headers": {"Authorization": TOKEN}});
    sqlx::query("INSERT INTO meta (key, value) VALUES ('ledger_salt', 'legacy-salt')")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO installed (namespace, name, section, entry, value, adopted_at)
         VALUES ('dev', 'alice', 'mcpServers', 'gh', $1, '2026-01-02T03:04:05Z')",
    )
    .bind(value.to_string())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let store = state::open(&format!("sqlite:{}", path.display()), &KeySource::default())
        .await
        .unwrap();
    let state = store.load(&key()).await.unwrap();
    assert_eq!(state.installed[Section::McpServers]["gh"], value);
    assert_eq!(
        store.list_installed(None).await.unwrap()[0]
            .adopted_at
            .to_string(),
        "2026-01-02T03:04:05Z"
    );
    // Same salt as before, so every stored ledger hash still matches.
    assert_eq!(
        store.hasher().entry(&json!(1)),
        agent_env_operator::engine::ledger::Hasher::new(b"legacy-salt".to_vec()).entry(&json!(1))
    );
    drop(store);
    let mut bytes = Vec::new();
    for f in std::fs::read_dir(dir.path()).unwrap() {
        let f = f.unwrap().path();
        if f.to_str().unwrap().contains("state.db") {
            bytes.extend(std::fs::read(f).unwrap());
        }
    }
    assert!(
        !contains(&bytes, TOKEN),
        "plain text left in the database files"
    );
    let pool = AnyPool::connect(&url).await.unwrap();
    let left: i64 = sqlx::query("SELECT COUNT(*) AS n FROM installed_plaintext")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(left, 0);
    let salt_rows: i64 = sqlx::query("SELECT COUNT(*) AS n FROM meta WHERE key = 'ledger_salt'")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get("n");
    assert_eq!(salt_rows, 0);
}

/// SQLite's own checkpoints are off (each ran inside the commit that crossed
/// its threshold, with that instance and every write queued behind it
/// waiting): the store's own task copies the log into the database file
/// once writes pause. Seen from a copy of the database file alone, without
/// its log, while the store is still open.
#[tokio::test]
async fn sqlite_state_reaches_the_database_file_once_writes_pause() {
    let db = Db::new(&Backend::Sqlite);
    let store = db.open().await;
    let keys: Vec<InstanceKey> = (0..20)
        .map(|i| InstanceKey::new("dev", format!("a{i}")))
        .collect();
    for k in &keys {
        store
            .save(k, &sample_state(), &record("Rendered", &["settings.json"]))
            .await
            .unwrap();
    }
    let copy = db.dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    let rows_in_file = || async {
        std::fs::copy(db.dir.path().join("state.db"), copy.join("state.db")).unwrap();
        let url = format!("sqlite:{}?mode=ro", copy.join("state.db").display());
        let pool = AnyPool::connect(&url).await.unwrap();
        let n: i64 = sqlx::query("SELECT count(*) AS n FROM ledger")
            .fetch_one(&pool)
            .await
            .map_or(0, |r| r.get("n"));
        pool.close().await;
        let _ = std::fs::remove_file(copy.join("state.db-wal"));
        let _ = std::fs::remove_file(copy.join("state.db-shm"));
        n
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut n = rows_in_file().await;
    while n < keys.len() as i64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        n = rows_in_file().await;
    }
    assert_eq!(n, keys.len() as i64, "rows in the database file itself");
    drop(store);
}
