//! The env root on disk. Every access goes through a directory handle of the
//! root (cap-std), so no path or symlink can lead a read or write outside it.
//!
//! Agents write into their env dirs too, so nothing found there is trusted:
//! env dirs are opened without following a symlink or leaving the root (in
//! one `openat2` where the kernel has it, else one component at a time),
//! files are looked at before they are opened (a FIFO would block, a device
//! could react to being opened) and again through the open handle, a file
//! with a second hard link is not read (it may be a file outside the root),
//! and no file larger than [`MAX_FILE_BYTES`] is read into memory.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_fs_ext::DirExt;
use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{
    Dir, DirBuilder, DirBuilderExt, FileType, FileTypeExt, Metadata, MetadataExt, OpenOptions,
    OpenOptionsExt,
};

use crate::engine::section::EnvFile;

/// The directory under the env root holding the operator's own state.
pub const STATE_DIR: &str = ".agent-env";
/// In an env dir: the pods the operator checked the env dir for, read by
/// `agent-env wait` in the pod's init container.
pub const BOOT_MARKER: &str = ".agent-env-ready";
/// Largest file in an env dir the operator reads (16 MiB). A pass holds a
/// few copies of a file in memory while it merges, per instance in flight;
/// larger files are refused and left as they are, never read.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// An env dir operation failed. Paths are shown relative to the env root.
#[derive(Debug, thiserror::Error)]
pub enum EnvDirError {
    /// The env root itself cannot be opened or created.
    #[error("cannot open env root {}", .path.display())]
    Root {
        /// The root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An operation on a path under the root failed; cap-std reports a path
    /// that leads outside the root (through `..` or a symlink) this way too.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path, relative to the env root.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file did not parse and was left alone (see `defer_corrupt`).
    #[error("{path} does not parse ({reason}); left alone for now")]
    Unparsable {
        /// The path, relative to the env root.
        path: String,
        /// Why.
        reason: String,
    },
    /// A path in an env dir the operator will not read or write through.
    #[error("{path} {why}; left as it is")]
    Refused {
        /// The path, relative to the env root.
        path: String,
        /// Why.
        why: Refusal,
    },
    /// A file kept changing under us while we tried to write it.
    #[error("{path} kept changing while it was being written; gave up after {attempts} attempts")]
    Contended {
        /// The path, relative to the env root.
        path: String,
        /// How often we tried.
        attempts: u32,
    },
}

impl EnvDirError {
    fn io(op: &'static str, path: impl Into<String>, source: io::Error) -> Self {
        EnvDirError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    fn refused(path: impl Into<String>, why: Refusal) -> Self {
        EnvDirError::Refused {
            path: path.into(),
            why,
        }
    }

    /// Whether the error comes from a path that leads, or may lead, outside
    /// the env root.
    pub fn is_escape(&self) -> bool {
        match self {
            EnvDirError::Io { source, .. } => {
                source.kind() == io::ErrorKind::PermissionDenied
                    && source.to_string().contains("outside")
            }
            EnvDirError::Refused { why, .. } => {
                matches!(why, Refusal::Symlink | Refusal::HardLinked { .. })
            }
            _ => false,
        }
    }
}

/// Why a path in an env dir is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A symlink where a directory or file of an env dir belongs.
    #[error(
        "is a symbolic link; env dirs, the directories above them and their files must not be links"
    )]
    Symlink,
    /// A file that also has a name elsewhere, perhaps outside the env root:
    /// what is read from it would end up in a file the agent can read.
    #[error(
        "has {links} hard links, so it may be a file outside the env root; it is not read (copy it to break the link)"
    )]
    HardLinked {
        /// Its link count.
        links: u64,
    },
    /// Something other than a regular file where a file belongs.
    #[error("is a {kind}, not a regular file")]
    NotAFile {
        /// What it is.
        kind: &'static str,
    },
    /// Something other than a directory where a directory belongs.
    #[error("is a {kind}, not a directory")]
    NotADirectory {
        /// What it is.
        kind: &'static str,
    },
    /// A file over [`MAX_FILE_BYTES`].
    #[error(
        "is {size} bytes, over the limit of {limit} bytes ({} MiB) for a file in an env dir",
        limit / (1024 * 1024)
    )]
    TooLarge {
        /// Its size (at least), in bytes.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// An owned key nested deeper than [`crate::engine::merge::MAX_OWNED_DEPTH`].
    #[error("nests {key} deeper than {limit} levels, the limit for an owned key")]
    TooDeep {
        /// The owned key.
        key: &'static str,
        /// The limit.
        limit: usize,
    },
}

fn kind_of(t: FileType) -> &'static str {
    if t.is_symlink() {
        "symbolic link"
    } else if t.is_dir() {
        "directory"
    } else if t.is_file() {
        "regular file"
    } else if t.is_fifo() {
        "named pipe"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

/// Whether `m` is a file the operator may read: a regular file with one
/// name, within [`MAX_FILE_BYTES`].
fn check_file(m: &Metadata, shown: &str) -> Result<(), EnvDirError> {
    let t = m.file_type();
    let why = if t.is_symlink() {
        Refusal::Symlink
    } else if !t.is_file() {
        Refusal::NotAFile { kind: kind_of(t) }
    } else if m.nlink() > 1 {
        Refusal::HardLinked { links: m.nlink() }
    } else if m.len() > MAX_FILE_BYTES {
        Refusal::TooLarge {
            size: m.len(),
            limit: MAX_FILE_BYTES,
        }
    } else {
        return Ok(());
    };
    Err(EnvDirError::refused(shown, why))
}

/// Opens the directory `name` in `dir` without following a symlink;
/// `Ok(None)` when it does not exist. `shown` names it in errors.
fn open_dir_nofollow(dir: &Dir, name: &str, shown: &str) -> Result<Option<Dir>, EnvDirError> {
    match dir.open_dir_nofollow(name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => {
            let t = dir.symlink_metadata(name).map(|m| m.file_type());
            Err(match t {
                Ok(t) if t.is_symlink() => EnvDirError::refused(shown, Refusal::Symlink),
                Ok(t) if !t.is_dir() => {
                    EnvDirError::refused(shown, Refusal::NotADirectory { kind: kind_of(t) })
                }
                _ => EnvDirError::io("cannot open env dir", shown, e),
            })
        }
    }
}

/// What identifies one version of a file, to notice a write by someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Stamp {
    fn of(m: &cap_std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }

    /// The later of its modification and change times, in ns since the epoch.
    fn changed_ns(&self) -> i128 {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        ns(self.mtime, self.mtime_nsec).max(ns(self.ctime, self.ctime_nsec))
    }
}

/// The stamps of an env dir's files as a pass read them and found nothing
/// to write. While both files still show these stamps, a later pass has
/// nothing to learn from them and leaves them unread.
///
/// A file's times come from a clock that ticks (a few ms on a local
/// filesystem, 2 s on FAT, the server's clock on NFS): a write in the tick
/// the stamp was taken in could leave the stamp as it was. Stamps are
/// therefore kept only once both files are [`Seen::SETTLE`] older than the
/// moment they were looked at, as git treats "racily clean" index entries;
/// the clocks of the host and a file server must agree within that.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    /// When the files were looked at (taken before they were read).
    pub at: crate::time::Timestamp,
    /// One stamp per file, in [`EnvFile::ALL`] order.
    pub files: Vec<Stamp>,
}

impl Seen {
    /// How much older than the look a file's times must be.
    pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

    /// Stamps taken at `at`, if every file had settled by then.
    pub fn settled(at: crate::time::Timestamp, files: Vec<Stamp>) -> Option<Seen> {
        let limit = at.as_nanosecond() - Self::SETTLE.as_nanos() as i128;
        (files.len() == EnvFile::ALL.len() && files.iter().all(|f| f.changed_ns() <= limit))
            .then_some(Seen { at, files })
    }
}

/// A file as read.
#[derive(Debug)]
pub struct FileRead {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its identity when read.
    pub stamp: Stamp,
    /// Its permission bits.
    pub mode: u32,
}

/// Owner to give written files and created dirs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// uid, if set.
    pub uid: Option<u32>,
    /// gid, if set.
    pub gid: Option<u32>,
}

/// How a write ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The new content is in place.
    Written,
    /// The file changed since it was read; nothing was written.
    Raced,
}

/// Suffix of the lock Claude Code (through `proper-lockfile`) takes on a config file.
pub const LOCK_SUFFIX: &str = ".lock";
/// A lock older than this is abandoned (`proper-lockfile`'s default).
pub const LOCK_STALE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a write waits for a lock before it reads and merges again.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Releases a lock when dropped.
struct LockGuard<'a> {
    dir: &'a Dir,
    name: String,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.dir.remove_dir(&self.name);
    }
}

/// The env root.
#[derive(Debug)]
pub struct EnvRoot {
    /// `None`: the root does not exist (a dry run over a fresh host).
    dir: Option<Dir>,
    path: PathBuf,
    fsync: bool,
    /// The root is on a filesystem whose `stat` answers come from the local
    /// kernel's own inodes, never from an attribute cache that another
    /// host's writes may not have reached yet.
    attrs_authoritative: bool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl EnvRoot {
    /// Opens the env root, creating it when `create` is set. Without
    /// `create`, a missing root is a root with nothing in it.
    pub fn open(path: &Path, create: bool) -> Result<EnvRoot, EnvDirError> {
        let root_err = |source| EnvDirError::Root {
            path: path.to_owned(),
            source,
        };
        if create {
            std::fs::create_dir_all(path).map_err(root_err)?;
        }
        let dir = match Dir::open_ambient_dir(path, ambient_authority()) {
            Ok(dir) => Some(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => None,
            Err(e) => return Err(root_err(e)),
        };
        let attrs_authoritative = dir.as_ref().is_some_and(local_filesystem);
        Ok(EnvRoot {
            dir,
            path: path.to_owned(),
            fsync: true,
            attrs_authoritative,
        })
    }

    /// Whether a `stat` here is final (see [`InstanceDir::still`]).
    pub fn attrs_authoritative(&self) -> bool {
        self.attrs_authoritative
    }

    /// Turns fsync of written files off (for throwaway roots and benchmarks).
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The root's path on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens an instance's env dir at `rel` (already validated as relative).
    /// `Ok(None)` when it does not exist and `create` is off. Every component
    /// is opened through its parent's handle without following a symlink:
    /// the handle returned stays on the directory it opened whatever is
    /// renamed or swapped in at `rel` afterwards, so a write through it can
    /// only land there.
    pub fn instance(
        &self,
        rel: &str,
        create: bool,
        owner: Owner,
    ) -> Result<Option<InstanceDir>, EnvDirError> {
        let Some(root) = &self.dir else {
            return Ok(None);
        };
        if let Some(dir) = open_beneath(root, rel) {
            return Ok(Some(InstanceDir {
                dir,
                rel: rel.to_owned(),
                fsync: self.fsync,
                created: false,
                attrs_authoritative: self.attrs_authoritative,
            }));
        }
        let segments: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
        let mut dir = root
            .try_clone()
            .map_err(|e| EnvDirError::io("cannot open env dir", rel, e))?;
        let mut walked = String::new();
        let mut created = false;
        for (i, seg) in segments.iter().enumerate() {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(seg);
            dir = match open_dir_nofollow(&dir, seg, &walked)? {
                Some(d) => d,
                None if !create => return Ok(None),
                None => {
                    let mut b = DirBuilder::new();
                    b.mode(0o755);
                    match dir.create_dir_with(seg, &b) {
                        Ok(()) => {
                            let leaf = i + 1 == segments.len();
                            created = leaf;
                            if leaf && (owner.uid.is_some() || owner.gid.is_some()) {
                                chown_at(&dir, seg, owner).map_err(|e| {
                                    EnvDirError::io("cannot chown env dir", walked.as_str(), e)
                                })?;
                            }
                        }
                        // Made by someone else meanwhile: opened below like any other.
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            return Err(EnvDirError::io("cannot create env dir", walked, e));
                        }
                    }
                    open_dir_nofollow(&dir, seg, &walked)?.ok_or_else(|| {
                        EnvDirError::io(
                            "cannot open env dir",
                            walked.as_str(),
                            io::Error::from(io::ErrorKind::NotFound),
                        )
                    })?
                }
            };
        }
        Ok(Some(InstanceDir {
            dir,
            rel: rel.to_owned(),
            fsync: self.fsync,
            created,
            attrs_authoritative: self.attrs_authoritative,
        }))
    }
}

/// Whether `dir` is on a filesystem of this kernel's own (ext4, XFS, Btrfs,
/// tmpfs, overlayfs, ZFS, F2FS), as opposed to a network or FUSE one.
fn local_filesystem(dir: &Dir) -> bool {
    const LOCAL: [i64; 7] = [
        0xEF53,      // ext2/3/4
        0x5846_5342, // XFS
        0x9123_683E, // Btrfs
        0x0102_1994, // tmpfs
        0x794C_7630, // overlayfs
        0x2FC1_2FC1, // ZFS
        0xF2F5_2010, // F2FS
    ];
    // `f_type`'s width differs between platforms.
    #[allow(clippy::unnecessary_cast)]
    rustix::fs::fstatfs(dir).is_ok_and(|s| LOCAL.contains(&(s.f_type as i64)))
}

/// The process's umask, read once (`None` where the kernel does not show
/// it): a file created with a mode it does not narrow needs no `fchmod`.
fn umask() -> Option<u32> {
    static UMASK: std::sync::LazyLock<Option<u32>> = std::sync::LazyLock::new(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    });
    *UMASK
}

/// Opens the existing directory `rel` under `root` in one call, refusing
/// any symlink on the way and any step out of `root` (`openat2` with
/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`). `None` on any failure: the
/// caller walks component by component, which creates what is missing and
/// names what it refuses (and is all there is on kernels before 5.6).
fn open_beneath(root: &Dir, rel: &str) -> Option<Dir> {
    use rustix::fs::{Mode, OFlags, ResolveFlags, openat2};
    let fd = openat2(
        root,
        rel,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
    .ok()?;
    Some(Dir::from_std_file(std::fs::File::from(fd)))
}

fn temp_name(name: &str) -> String {
    static PID: std::sync::LazyLock<u32> = std::sync::LazyLock::new(std::process::id);
    format!(
        ".{name}.agent-env-{}-{}.tmp",
        *PID,
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl EnvRoot {
    /// Removes an instance's env dir and everything in it (deletion policy
    /// `Delete`). Symlinks inside, and on the way to it, are never followed;
    /// one at `rel` itself is removed. False when there was nothing to remove.
    pub fn remove_instance(&self, rel: &str) -> Result<bool, EnvDirError> {
        let rel = rel.trim_end_matches('/');
        let (parent, leaf) = rel.rsplit_once('/').unwrap_or(("", rel));
        let Some(parent) = self.instance(parent, false, Owner::default())? else {
            return Ok(false);
        };
        match parent.dir.remove_dir_all(leaf) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(EnvDirError::io("cannot remove env dir", rel, e)),
        }
    }
}

/// Directory handles are `O_PATH`, which `fchown` refuses: change the entry
/// through its parent's handle instead, never following a symlink.
fn chown_at(parent: &Dir, name: &str, owner: Owner) -> io::Result<()> {
    rustix::fs::chownat(
        parent,
        name,
        owner.uid.map(rustix::fs::Uid::from_raw),
        owner.gid.map(rustix::fs::Gid::from_raw),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn chown(fd: impl rustix::fd::AsFd, owner: Owner) -> io::Result<()> {
    rustix::fs::fchown(
        fd,
        owner.uid.map(rustix::fs::Uid::from_raw),
        owner.gid.map(rustix::fs::Gid::from_raw),
    )?;
    Ok(())
}

/// One instance's env dir.
#[derive(Debug)]
pub struct InstanceDir {
    dir: Dir,
    rel: String,
    fsync: bool,
    created: bool,
    /// See [`EnvRoot::attrs_authoritative`].
    attrs_authoritative: bool,
}

impl InstanceDir {
    /// Whether opening it created it (so nothing of an earlier run is in it).
    pub fn created(&self) -> bool {
        self.created
    }

    /// The path of a file relative to the env root, for messages.
    pub fn display(&self, name: &str) -> String {
        format!("{}/{}", self.rel, name)
    }

    /// Reads a file; `Ok(None)` when it does not exist. Never follows a
    /// symlink; refuses anything but a regular file with one name of at most
    /// [`MAX_FILE_BYTES`].
    pub fn read(&self, file: EnvFile) -> Result<Option<FileRead>, EnvDirError> {
        self.read_file(file.file_name())
    }

    /// [`InstanceDir::read`] for any file name in the env dir.
    pub fn read_file(&self, name: &str) -> Result<Option<FileRead>, EnvDirError> {
        let shown = self.display(name);
        // Looked at before it is opened: opening a FIFO blocks until a writer
        // comes, opening a device can make it do something.
        match self.dir.symlink_metadata(name) {
            Ok(m) => check_file(&m, &shown)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EnvDirError::io("cannot stat", shown, e)),
        }
        let mut opts = OpenOptions::new();
        opts.read(true)
            .follow(FollowSymlinks::No)
            // In case a FIFO was swapped in since: an open that would wait
            // for a writer returns at once, and is refused below.
            .custom_flags(
                (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32,
            );
        let f = match self.dir.open_with(name, &opts) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                // Most likely swapped for a symlink since it was looked at.
                let refused = (self.dir.symlink_metadata(name).ok())
                    .and_then(|m| check_file(&m, &shown).err());
                return Err(refused.unwrap_or_else(|| EnvDirError::io("cannot open", shown, e)));
            }
        };
        // What was opened may not be what was looked at.
        let meta = f
            .metadata()
            .map_err(|e| EnvDirError::io("cannot stat", shown.as_str(), e))?;
        check_file(&meta, &shown)?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // A file growing while it is read is still cut at the limit.
        (&f).take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| EnvDirError::io("cannot read", shown.as_str(), e))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            let size = bytes.len() as u64;
            return Err(EnvDirError::refused(
                shown,
                Refusal::TooLarge {
                    size,
                    limit: MAX_FILE_BYTES,
                },
            ));
        }
        Ok(Some(FileRead {
            bytes,
            stamp: Stamp::of(&meta),
            mode: meta.mode() & 0o7777,
        }))
    }

    /// Removes temp files a killed writer of ours left behind (the rename
    /// never happened, so they hold nothing the files need). Best effort.
    pub fn sweep_temp_files(&self) -> usize {
        let Ok(entries) = self.dir.entries() else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let names = EnvFile::ALL.iter().map(|f| f.file_name());
            let ours = names.chain([BOOT_MARKER]).any(|f| {
                name.strip_prefix('.')
                    .and_then(|n| n.strip_prefix(f))
                    .is_some_and(|rest| rest.starts_with(".agent-env-") && rest.ends_with(".tmp"))
            });
            if ours && self.dir.remove_file(name).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// Whether both files are still the versions `seen` stamped. Any doubt
    /// (a file missing, replaced, unreadable) answers no, and the caller
    /// reads them, which names what is wrong. Where the kernel may answer a
    /// `stat` from cached attributes (network filesystems), each file is
    /// also opened, which makes the client ask the server, and the open
    /// handle is stamped.
    pub fn still(&self, seen: &Seen) -> bool {
        let mut opts = OpenOptions::new();
        opts.read(true).follow(FollowSymlinks::No).custom_flags(
            (rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32,
        );
        EnvFile::ALL.iter().zip(&seen.files).all(|(file, stamp)| {
            let name = file.file_name();
            // Looked at before any open, as in `read_file`: a FIFO or device
            // swapped in has another inode and is never opened here.
            let same = |m: &Metadata| m.file_type().is_file() && Stamp::of(m) == *stamp;
            (self.dir.symlink_metadata(name).is_ok_and(|m| same(&m)))
                && (self.attrs_authoritative
                    || (self.dir.open_with(name, &opts))
                        .and_then(|f| f.metadata())
                        .is_ok_and(|m| same(&m)))
        }) && seen.files.len() == EnvFile::ALL.len()
    }

    fn current_stamp(&self, name: &str) -> Result<Option<Stamp>, EnvDirError> {
        match self.dir.symlink_metadata(name) {
            Ok(m) => Ok(Some(Stamp::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EnvDirError::io("cannot stat", self.display(name), e)),
        }
    }

    /// Replaces a file atomically: temp file in the same dir, fsync, rename.
    /// `expected` is the stamp of the version the new content was computed
    /// from (`None`: the file did not exist); when the file no longer matches
    /// it, nothing is written and [`WriteOutcome::Raced`] tells the caller to
    /// read and merge again, so a concurrent writer's change is not lost.
    pub fn write(
        &self,
        file: EnvFile,
        bytes: &[u8],
        expected: Option<Stamp>,
        mode: u32,
        owner: Owner,
    ) -> Result<WriteOutcome, EnvDirError> {
        let name = file.file_name();
        let tmp = temp_name(name);
        let result = self.write_temp_and_rename(name, &tmp, bytes, expected, mode, owner);
        if !matches!(result, Ok(WriteOutcome::Written)) {
            let _ = self.dir.remove_file(&tmp);
        }
        result
    }

    /// Replaces a file the operator alone writes (the boot marker)
    /// atomically, with no lock or race check.
    pub fn put(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        owner: Owner,
    ) -> Result<(), EnvDirError> {
        let tmp = temp_name(name);
        let result = self
            .write_temp(name, &tmp, bytes, mode, owner)
            .and_then(|()| {
                self.dir
                    .rename(&tmp, &self.dir, name)
                    .map_err(|e| EnvDirError::io("cannot rename into place", self.display(name), e))
            });
        if result.is_err() {
            let _ = self.dir.remove_file(&tmp);
        }
        result
    }

    fn write_temp_and_rename(
        &self,
        name: &str,
        tmp: &str,
        bytes: &[u8],
        expected: Option<Stamp>,
        mode: u32,
        owner: Owner,
    ) -> Result<WriteOutcome, EnvDirError> {
        self.write_temp(name, tmp, bytes, mode, owner)?;
        // Where the filesystem cannot refuse to replace, a create locks as an update does.
        if expected.is_none()
            && let Some(outcome) = self.create_from(tmp, name)?
        {
            return Ok(outcome);
        }
        // Claude Code saves its config holding `<file>.lock`; holding it too
        // from the stamp check to the rename means neither side overwrites a
        // write the other has not seen.
        let Some(_lock) = self.lock(name)? else {
            return Ok(WriteOutcome::Raced);
        };
        if self.current_stamp(name)? != expected {
            return Ok(WriteOutcome::Raced);
        }
        self.dir
            .rename(tmp, &self.dir, name)
            .map_err(|e| EnvDirError::io("cannot rename into place", self.display(name), e))?;
        Ok(WriteOutcome::Written)
    }

    /// Renames `tmp` to `name` only if `name` does not exist: the create
    /// case of [`InstanceDir::write`] in one call and no lock. No lock guards
    /// a file that does not exist yet (Claude Code's lock resolves the file's
    /// path first, so it writes a missing config without one), and a rename
    /// that refuses to replace settles a race with any writer: whoever
    /// creates the file first wins, the other reads and merges again.
    /// `None` when the filesystem cannot do it (NFS, some FUSE mounts).
    fn create_from(&self, tmp: &str, name: &str) -> Result<Option<WriteOutcome>, EnvDirError> {
        use rustix::fs::{RenameFlags, renameat_with};
        use rustix::io::Errno;
        match renameat_with(&self.dir, tmp, &self.dir, name, RenameFlags::NOREPLACE) {
            Ok(()) => Ok(Some(WriteOutcome::Written)),
            Err(Errno::EXIST) => Ok(Some(WriteOutcome::Raced)),
            Err(Errno::INVAL | Errno::NOSYS | Errno::NOTSUP) => Ok(None),
            Err(e) => Err(EnvDirError::io(
                "cannot rename into place",
                self.display(name),
                e.into(),
            )),
        }
    }

    fn write_temp(
        &self,
        name: &str,
        tmp: &str,
        bytes: &[u8],
        mode: u32,
        owner: Owner,
    ) -> Result<(), EnvDirError> {
        let mut opts = OpenOptions::new();
        opts.write(true)
            .create_new(true)
            .mode(mode)
            .follow(FollowSymlinks::No);
        let mut f = self.dir.open_with(tmp, &opts).map_err(|e| {
            EnvDirError::io("cannot create a temp file beside", self.display(name), e)
        })?;
        let io_err = |op, e| EnvDirError::io(op, self.display(name), e);
        // The umask may have narrowed the mode given at creation.
        if umask().is_none_or(|umask| mode & umask != 0) {
            f.set_permissions(cap_std::fs::Permissions::from_std(
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            ))
            .map_err(|e| io_err("cannot set the mode of", e))?;
        }
        if owner.uid.is_some() || owner.gid.is_some() {
            chown(&f, owner).map_err(|e| io_err("cannot chown", e))?;
        }
        f.write_all(bytes).map_err(|e| io_err("cannot write", e))?;
        if self.fsync {
            f.sync_all().map_err(|e| io_err("cannot fsync", e))?;
        }
        Ok(())
    }

    /// Takes `<name>.lock` the way `proper-lockfile` does (an atomic mkdir; a
    /// lock not refreshed for [`LOCK_STALE`] is abandoned and taken over).
    /// `None` when another writer kept it for [`LOCK_WAIT`]: the caller
    /// retries as after a race.
    fn lock(&self, name: &str) -> Result<Option<LockGuard<'_>>, EnvDirError> {
        let lock = format!("{name}{LOCK_SUFFIX}");
        let started = std::time::Instant::now();
        loop {
            match self.dir.create_dir(&lock) {
                Ok(()) => {
                    return Ok(Some(LockGuard {
                        dir: &self.dir,
                        name: lock,
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let meta = self.dir.symlink_metadata(&lock).ok();
                    if let Some(m) = &meta
                        && !m.is_dir()
                    {
                        // No writer's lock (those are directories) and nobody
                        // would ever release it: waiting cannot help.
                        return Err(EnvDirError::refused(
                            self.display(&lock),
                            Refusal::NotADirectory {
                                kind: kind_of(m.file_type()),
                            },
                        ));
                    }
                    let stale = meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.into_std().elapsed().ok())
                        .is_some_and(|age| age > LOCK_STALE);
                    if stale {
                        match self.dir.remove_dir(&lock) {
                            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                                // A lock that cannot go would make every
                                // write wait for it again: say so instead.
                                return Err(EnvDirError::io(
                                    "cannot remove the stale lock",
                                    self.display(&lock),
                                    e,
                                ));
                            }
                            _ => continue,
                        }
                    }
                    if started.elapsed() > LOCK_WAIT {
                        return Ok(None);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(EnvDirError::io("cannot lock", self.display(&lock), e)),
            }
        }
    }

    /// Moves a file that cannot be merged into aside (never deletes it) and
    /// returns its new name.
    pub fn move_aside(&self, file: EnvFile) -> Result<String, EnvDirError> {
        let name = file.file_name();
        let aside = self.aside_name(name)?;
        self.dir
            .rename(name, &self.dir, &aside)
            .map_err(|e| EnvDirError::io("cannot move aside", self.display(name), e))?;
        Ok(self.display(&aside))
    }

    /// Keeps a copy of a file before a damaged owned key in it is replaced.
    pub fn copy_aside(&self, file: EnvFile, bytes: &[u8]) -> Result<String, EnvDirError> {
        let name = file.file_name();
        let aside = self.aside_name(name)?;
        let mut opts = OpenOptions::new();
        opts.write(true)
            .create_new(true)
            .mode(0o600)
            .follow(FollowSymlinks::No);
        let mut f = self
            .dir
            .open_with(&aside, &opts)
            .map_err(|e| EnvDirError::io("cannot create", self.display(&aside), e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| EnvDirError::io("cannot write", self.display(&aside), e))?;
        Ok(self.display(&aside))
    }

    fn aside_name(&self, name: &str) -> Result<String, EnvDirError> {
        let stamp = crate::time::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        for n in 0..1000 {
            let candidate = if n == 0 {
                format!("{name}.corrupt-{stamp}")
            } else {
                format!("{name}.corrupt-{stamp}-{n}")
            };
            if self.current_stamp(&candidate)?.is_none() {
                return Ok(candidate);
            }
        }
        Err(EnvDirError::io(
            "cannot find a free name to move aside",
            self.display(name),
            io::Error::from(io::ErrorKind::AlreadyExists),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh env root holding the env dir `ns/a`, made by opening it.
    fn env_dir() -> (tempfile::TempDir, EnvRoot, InstanceDir) {
        let tmp = tempfile::tempdir().unwrap();
        let root = EnvRoot::open(tmp.path(), true).unwrap();
        let d = root
            .instance("ns/a", true, Owner::default())
            .unwrap()
            .unwrap();
        (tmp, root, d)
    }

    /// Stamps are kept only once both files are older than the settle time
    /// at the look, and are found still only while nothing about a file
    /// changed: a write in place, a replacement, a file swapped for a link.
    #[test]
    fn stamps_are_kept_once_settled_and_hold_until_a_file_changes() {
        let (tmp, _root, d) = env_dir();
        for f in EnvFile::ALL {
            d.write(f, b"{}\n", None, 0o600, Owner::default()).unwrap();
        }
        let stamps = || {
            (EnvFile::ALL.iter())
                .map(|f| d.read(*f).unwrap().unwrap().stamp)
                .collect::<Vec<_>>()
        };
        let now = crate::time::now();
        assert_eq!(Seen::settled(now, stamps()), None, "just written");
        let later = now + std::time::Duration::from_millis(2100);
        let seen = Seen::settled(later, stamps()).expect("settled 2 s later");
        assert!(d.still(&seen));
        assert_eq!(
            Seen::settled(later, stamps()[..1].to_vec()),
            None,
            "one file"
        );

        // Same size, same inode, a clock tick later (what `settled` waits for).
        std::thread::sleep(std::time::Duration::from_millis(50));
        std::fs::write(tmp.path().join("ns/a/settings.json"), b"[]\n").unwrap();
        assert!(!d.still(&seen));
        let seen = Seen::settled(later, stamps()).unwrap();
        assert!(d.still(&seen));
        // Replaced by a symlink to a file with the same bytes.
        std::fs::write(tmp.path().join("copy.json"), b"{}\n").unwrap();
        std::fs::remove_file(tmp.path().join("ns/a/.claude.json")).unwrap();
        std::os::unix::fs::symlink("../../copy.json", tmp.path().join("ns/a/.claude.json"))
            .unwrap();
        assert!(!d.still(&seen));
    }

    #[test]
    fn write_read_and_race() {
        let (tmp, _root, d) = env_dir();
        assert!(d.read(EnvFile::ClaudeJson).unwrap().is_none());
        let w = d.write(EnvFile::ClaudeJson, b"{}\n", None, 0o600, Owner::default());
        assert_eq!(w.unwrap(), WriteOutcome::Written);
        let r = d.read(EnvFile::ClaudeJson).unwrap().unwrap();
        assert_eq!(r.bytes, b"{}\n");
        assert_eq!(r.mode, 0o600);
        // Someone else writes between our read and our rename.
        std::fs::write(tmp.path().join("ns/a/.claude.json"), b"{\"x\":1}").unwrap();
        let w = d.write(
            EnvFile::ClaudeJson,
            b"{}\n",
            Some(r.stamp),
            0o600,
            Owner::default(),
        );
        assert_eq!(w.unwrap(), WriteOutcome::Raced);
        assert_eq!(
            std::fs::read(tmp.path().join("ns/a/.claude.json")).unwrap(),
            b"{\"x\":1}"
        );
        assert_eq!(
            entries(&tmp.path().join("ns/a")),
            1,
            "no temp file is left behind"
        );
    }

    /// How many names a directory holds (a temp file left behind shows up).
    fn entries(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    fn refusal(e: &EnvDirError) -> Option<&Refusal> {
        match e {
            EnvDirError::Refused { why, .. } => Some(why),
            _ => None,
        }
    }

    #[test]
    fn a_handle_stays_on_its_directory_when_a_symlink_is_swapped_in() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = EnvRoot::open(&tmp.path().join("root"), true).unwrap();
        let d = root
            .instance("ns/a", true, Owner::default())
            .unwrap()
            .unwrap();
        // Between the check (the open) and the write, the env dir is moved
        // away and a symlink out of the root takes its place.
        std::fs::rename(
            tmp.path().join("root/ns/a"),
            tmp.path().join("root/ns/moved"),
        )
        .unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("root/ns/a")).unwrap();
        let w = d.write(EnvFile::Settings, b"{}\n", None, 0o644, Owner::default());
        assert_eq!(w.unwrap(), WriteOutcome::Written);
        assert_eq!(
            std::fs::read(tmp.path().join("root/ns/moved/settings.json")).unwrap(),
            b"{}\n",
            "the write went to the directory the handle was opened on"
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // The next open sees the symlink and refuses it.
        let err = root.instance("ns/a", true, Owner::default()).unwrap_err();
        assert_eq!(refusal(&err), Some(&Refusal::Symlink), "{err}");
        assert!(err.is_escape());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_file_swapped_for_a_symlink_is_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim.json");
        std::fs::write(&victim, b"{\"keep\": true}").unwrap();
        let root = EnvRoot::open(tmp.path(), true).unwrap();
        let d = root
            .instance("ns/a", true, Owner::default())
            .unwrap()
            .unwrap();
        let path = tmp.path().join("ns/a/settings.json");
        std::fs::write(&path, b"{}").unwrap();
        let r = d.read(EnvFile::Settings).unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        // Swapped before the check: the check sees another file.
        let w = d.write(
            EnvFile::Settings,
            b"{\"x\": 1}",
            Some(r.stamp),
            0o644,
            Owner::default(),
        );
        assert_eq!(w.unwrap(), WriteOutcome::Raced);
        // Read again: refused, not followed.
        let err = d.read(EnvFile::Settings).unwrap_err();
        assert_eq!(refusal(&err), Some(&Refusal::Symlink), "{err}");
        assert!(err.is_escape());
        // Swapped after the check: the rename replaces the link itself.
        let seen = d.current_stamp("settings.json").unwrap();
        let w = d.write(
            EnvFile::Settings,
            b"{\"x\": 1}",
            seen,
            0o644,
            Owner::default(),
        );
        assert_eq!(w.unwrap(), WriteOutcome::Written);
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"{\"keep\": true}");
    }

    #[test]
    fn no_symlink_is_followed_on_the_way_to_an_env_dir() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("other/a")).unwrap();
        // Inside the root, but leading into another namespace's env dirs.
        std::os::unix::fs::symlink("other", tmp.path().join("ns")).unwrap();
        let root = EnvRoot::open(tmp.path(), false).unwrap();
        for create in [false, true] {
            let err = root.instance("ns/a", create, Owner::default()).unwrap_err();
            assert_eq!(refusal(&err), Some(&Refusal::Symlink), "{err}");
            assert!(
                err.to_string().starts_with("ns is a symbolic link"),
                "{err}"
            );
        }
        assert!(!root.remove_instance("ns/a").is_ok_and(|r| r));
        assert!(tmp.path().join("other/a").is_dir());
        // A dangling one is refused too, not taken for a missing env dir.
        std::fs::create_dir(tmp.path().join("ns2")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", tmp.path().join("ns2/a")).unwrap();
        for create in [false, true] {
            let err = root
                .instance("ns2/a", create, Owner::default())
                .unwrap_err();
            assert_eq!(refusal(&err), Some(&Refusal::Symlink), "{err}");
        }
    }

    #[test]
    fn an_env_dir_that_is_a_file_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("ns")).unwrap();
        std::fs::write(tmp.path().join("ns/a"), b"not a dir").unwrap();
        let root = EnvRoot::open(tmp.path(), false).unwrap();
        let err = root.instance("ns/a", true, Owner::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "ns/a is a regular file, not a directory; left as it is"
        );
        assert!(!err.is_escape());
        assert_eq!(
            std::fs::read(tmp.path().join("ns/a")).unwrap(),
            b"not a dir"
        );
    }

    #[test]
    fn fifos_hard_links_and_oversized_files_are_refused_unread() {
        let (tmp, root, d) = env_dir();
        let dir = tmp.path().join("ns/a");

        // A FIFO: opening it for reading would wait for a writer forever.
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("settings.json"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let d2 = root
            .instance("ns/a", false, Owner::default())
            .unwrap()
            .unwrap();
        std::thread::spawn(move || tx.send(d2.read(EnvFile::Settings).map(|_| ())));
        let err = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("reading a FIFO must not block")
            .unwrap_err();
        assert_eq!(
            refusal(&err),
            Some(&Refusal::NotAFile { kind: "named pipe" }),
            "{err}"
        );

        // A hard link to a file elsewhere.
        let outside = tmp.path().join("outside.json");
        std::fs::write(&outside, b"{\"token\": \"t\"}").unwrap();
        std::fs::hard_link(&outside, dir.join(".claude.json")).unwrap();
        let err = d.read(EnvFile::ClaudeJson).unwrap_err();
        assert_eq!(
            refusal(&err),
            Some(&Refusal::HardLinked { links: 2 }),
            "{err}"
        );
        assert!(err.is_escape());
        // A write replaces the link by rename: the other file is not written through.
        let seen = d.current_stamp(".claude.json").unwrap();
        let w = d.write(EnvFile::ClaudeJson, b"{}\n", seen, 0o600, Owner::default());
        assert_eq!(w.unwrap(), WriteOutcome::Written);
        assert_eq!(std::fs::read(&outside).unwrap(), b"{\"token\": \"t\"}");
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(
                &std::fs::metadata(dir.join(".claude.json")).unwrap()
            ),
            1
        );

        // Over the limit: refused from its size, before a byte is read (the
        // file is sparse: reading it would mean gigabytes of zeros).
        std::fs::remove_file(dir.join(".claude.json")).unwrap();
        let f = std::fs::File::create(dir.join(".claude.json")).unwrap();
        f.set_len(8 << 30).unwrap();
        let err = d.read(EnvFile::ClaudeJson).unwrap_err();
        assert_eq!(
            refusal(&err),
            Some(&Refusal::TooLarge {
                size: 8 << 30,
                limit: MAX_FILE_BYTES
            })
        );
        assert!(err.to_string().contains("16 MiB"), "{err}");
        // At the limit is fine.
        f.set_len(MAX_FILE_BYTES).unwrap();
        assert_eq!(
            d.read(EnvFile::ClaudeJson).unwrap().unwrap().bytes.len() as u64,
            MAX_FILE_BYTES
        );
    }

    #[test]
    fn a_lock_that_is_no_lock_fails_the_write_at_once() {
        let (tmp, _root, d) = env_dir();
        // An update takes the lock (a create does not: see the test below).
        d.write(EnvFile::Settings, b"{}", None, 0o644, Owner::default())
            .unwrap();
        let stamp = d.read(EnvFile::Settings).unwrap().unwrap().stamp;
        let lock = tmp.path().join("ns/a/settings.json.lock");
        let old = std::time::SystemTime::now() - LOCK_STALE * 10;
        let d = std::sync::Arc::new(d);
        for make in ["file", "dir with a file in it"] {
            if make == "file" {
                std::fs::write(&lock, b"").unwrap();
            } else {
                std::fs::remove_file(&lock).unwrap();
                std::fs::create_dir(&lock).unwrap();
                std::fs::write(lock.join("x"), b"").unwrap();
            }
            let times = std::fs::FileTimes::new().set_modified(old);
            std::fs::File::open(&lock)
                .unwrap()
                .set_times(times)
                .unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let d2 = d.clone();
            std::thread::spawn(move || {
                tx.send(d2.write(
                    EnvFile::Settings,
                    b"{\"new\":1}",
                    Some(stamp),
                    0o644,
                    Owner::default(),
                ))
            });
            let err = rx
                .recv_timeout(LOCK_WAIT)
                .unwrap_or_else(|_| panic!("{make}: waited for a lock nobody holds"))
                .unwrap_err();
            assert!(
                err.to_string().contains("ns/a/settings.json.lock"),
                "{make}: {err}"
            );
            assert_eq!(
                std::fs::read(tmp.path().join("ns/a/settings.json")).unwrap(),
                b"{}"
            );
            assert_eq!(
                entries(&tmp.path().join("ns/a")),
                2,
                "{make}: the temp file is removed"
            );
        }
    }

    /// A file that does not exist yet is created without a lock, by a
    /// rename that never replaces: one created by someone else since it was
    /// found missing is kept, and the write reports the race.
    #[test]
    fn a_create_never_replaces_a_file_made_meanwhile() {
        let (tmp, root, d) = env_dir();
        assert!(d.created());
        assert!(d.read(EnvFile::Settings).unwrap().is_none());
        std::fs::write(tmp.path().join("ns/a/settings.json"), b"{\"theirs\":1}").unwrap();
        let w = d.write(EnvFile::Settings, b"{}", None, 0o644, Owner::default());
        assert_eq!(w.unwrap(), WriteOutcome::Raced);
        assert_eq!(
            std::fs::read(tmp.path().join("ns/a/settings.json")).unwrap(),
            b"{\"theirs\":1}"
        );
        assert_eq!(
            entries(&tmp.path().join("ns/a")),
            1,
            "the temp file is removed"
        );
        // Opened again, the env dir is one an earlier run made.
        let again = root.instance("ns/a", true, Owner::default()).unwrap();
        assert!(!again.unwrap().created());
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("root/ns")).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("root/ns/evil")).unwrap();
        let root = EnvRoot::open(&tmp.path().join("root"), false).unwrap();
        let err = root
            .instance("ns/evil", true, Owner::default())
            .unwrap_err();
        assert!(err.is_escape(), "{err:?}");
        std::fs::create_dir_all(tmp.path().join("root/ns/ok")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("x.json"),
            tmp.path().join("root/ns/ok/settings.json"),
        )
        .unwrap();
        let d = root
            .instance("ns/ok", false, Owner::default())
            .unwrap()
            .unwrap();
        assert!(d.read(EnvFile::Settings).is_err());
    }
}
