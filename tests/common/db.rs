//! The databases store tests run against: SQLite always, PostgreSQL when a
//! server is given in `AGENT_ENV_TEST_POSTGRES` (`scripts/test-postgres` starts
//! one). Under CI a missing server fails the tests instead of skipping them.

use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::{AssertSqlSafe, Connection, Executor};

/// One backend to run a test against.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The default: a SQLite file under the test's env root.
    Sqlite,
    /// A fresh database on the test server.
    Postgres(String),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// SQLite, plus PostgreSQL when a server is reachable.
pub fn backends(test: &str) -> Vec<Backend> {
    let mut out = vec![Backend::Sqlite];
    match fresh_postgres() {
        Some(url) => out.push(Backend::Postgres(url)),
        None => {
            // Straight to stderr: the test harness captures `eprintln!` of passing tests.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test} on PostgreSQL: no server (export AGENT_ENV_TEST_POSTGRES=$(scripts/test-postgres))"
            );
        }
    }
    out
}

/// Every row of every table of a PostgreSQL database, as text (bytea shows
/// as hex), for plaintext scans.
pub fn dump_postgres(url: &str) -> Vec<u8> {
    let url = url.to_owned();
    on_own_runtime(async move {
        use sqlx::Row;
        let mut c = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut out = Vec::new();
        for table in ["meta", "ledger", "installed", "secrets", "audit"] {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT CAST(t AS TEXT) AS r FROM {table} t"
            )))
            .fetch_all(&mut c)
            .await
            .unwrap();
            for r in rows {
                out.extend(r.get::<String, _>("r").into_bytes());
                out.push(b'\n');
            }
        }
        out
    })
}

/// Runs `f` on a runtime of its own thread: callers may be sync tests or
/// async ones (which cannot block on a nested runtime).
fn on_own_runtime<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .expect("the database task finishes")
}

/// A new, empty database on the test server, as a URL.
pub fn fresh_postgres() -> Option<String> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let admin = match std::env::var("AGENT_ENV_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must run the store tests on PostgreSQL: AGENT_ENV_TEST_POSTGRES is not set")
        }
        _ => return None,
    };
    let name = format!(
        "agentenv_t_{}_{}_{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    // Its own thread and runtime: callers may be sync tests or async ones.
    let (admin2, name2) = (admin.clone(), name.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = sqlx::PgConnection::connect(&admin2)
                .await
                .unwrap_or_else(|e| {
                    panic!("AGENT_ENV_TEST_POSTGRES={admin2} is not reachable: {e}")
                });
            c.execute(AssertSqlSafe(format!("CREATE DATABASE {name2}")))
                .await
                .unwrap();
        })
    })
    .join()
    .expect("the test database is created");
    let (base, _) = admin.rsplit_once('/').expect("a URL with a database path");
    Some(format!("{base}/{name}"))
}
