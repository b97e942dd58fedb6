//! Which master key a store uses, and the default key file of a SQLite store.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{Database, StoreError};
use crate::crypto::{Keyring, MasterKey};

/// Where the master key comes from (command line or environment).
#[derive(Clone, Debug, Default)]
pub struct KeySource {
    /// The key that seals (and opens).
    pub master: Option<PathBuf>,
    /// A key that only opens: the old key while a rotation is under way.
    pub previous: Option<PathBuf>,
}

/// A SQLite store's default key file: `master.key` beside the database. It
/// keeps a copy of the database (a backup, a support bundle) from carrying
/// what opens it; for anything shared, pass a key file kept elsewhere.
pub fn default_key_path(db: &Database) -> Option<PathBuf> {
    match db {
        Database::Sqlite(path) => Some(
            path.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .join("master.key"),
        ),
        Database::Postgres(_) => None,
    }
}

/// The keyring for `db`. With no key file given, a SQLite store uses its
/// default key file, creating it when `create` (otherwise a throwaway key:
/// a dry run over a database that has none yet has nothing sealed to open).
pub fn keyring(db: &Database, keys: &KeySource, create: bool) -> Result<Keyring, StoreError> {
    let previous = keys.previous.as_deref().map(MasterKey::read).transpose()?;
    let current = match (&keys.master, default_key_path(db)) {
        (Some(path), _) => MasterKey::read(path)?,
        (None, None) => return Err(StoreError::NoKey),
        (None, Some(path)) if path.exists() => MasterKey::read(&path)?,
        (None, Some(path)) if create => match create_key_file(&path) {
            // Another process created it first: use theirs.
            Err(StoreError::Dir { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                MasterKey::read(&path)?
            }
            created => created?,
        },
        (None, Some(_)) => MasterKey::generate(),
    };
    Ok(Keyring::new(current, previous))
}

/// Writes a new key to `path` (mode 0600, directory 0700), refusing to
/// replace an existing file.
pub fn create_key_file(path: &Path) -> Result<MasterKey, StoreError> {
    let key = MasterKey::generate();
    create_key_file_with(path, &key)?;
    Ok(key)
}

/// Writes `key` to a new file at `path` (mode 0600, directory 0700).
pub fn create_key_file_with(path: &Path, key: &MasterKey) -> Result<(), StoreError> {
    let dir_err = |source| StoreError::Dir {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(dir_err)?;
    file.write_all(key.encode().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(dir_err)?;
    Ok(())
}
