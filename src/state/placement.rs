//! Where a SQLite database may live. SQLite's locking relies on POSIX
//! advisory locks (and, in WAL mode, on shared memory) that NFS, SMB and
//! most cluster filesystems implement loosely or not at all: two writers on
//! such a mount can both believe they hold the lock and corrupt the
//! database. The default state path lies under the env root, which in a
//! cluster is a shared network volume, so the operator checks before it
//! opens the database and refuses unless told to insist.

use std::path::{Path, PathBuf};

use super::StoreError;

/// `statfs` magic numbers of filesystems whose locks SQLite cannot trust.
const NETWORK_MAGIC: &[(i64, &str)] = &[
    (0x6969, "NFS"),
    (0x517B, "SMB"),
    (0xFF53_4D42, "CIFS"),
    (0xFE53_4D42, "SMB2"),
    (0x00C3_6400, "CephFS"),
    (0x5346_414F, "AFS"),
    (0x7375_7245, "Coda"),
    (0x0BD0_0BD0, "Lustre"),
    (0x4750_4653, "GPFS"),
    (0x0116_1970, "GFS2"),
    (0x7461_636F, "OCFS2"),
    (0x1983_0326, "BeeGFS"),
];

/// FUSE filesystems (by the subtype in `/proc/self/mountinfo`, `fuse.<name>`)
/// that reach storage over the network.
const NETWORK_FUSE: &[&str] = &[
    "sshfs",
    "s3fs",
    "gcsfuse",
    "glusterfs",
    "ceph-fuse",
    "rclone",
    "juicefs",
    "goofys",
    "blobfuse",
    "blobfuse2",
    "objectivefs",
    "mount-s3",
    "efs",
];

const FUSE_MAGIC: i64 = 0x6573_5546;

/// The filesystem a path is on, when it is one SQLite cannot lock safely.
pub fn network_filesystem(path: &Path) -> std::io::Result<Option<String>> {
    let existing = nearest_existing(path);
    let fs = rustix::fs::statfs(&existing).map_err(std::io::Error::from)?;
    #[allow(clippy::unnecessary_cast)] // f_type is i64 or u32 by target
    let magic = fs.f_type as i64;
    if magic == FUSE_MAGIC {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        return Ok(fuse_subtype(&mountinfo, &existing)
            .filter(|t| NETWORK_FUSE.contains(&t.as_str()))
            .map(|t| format!("FUSE ({t})")));
    }
    Ok(network_name(magic).map(str::to_owned))
}

fn network_name(magic: i64) -> Option<&'static str> {
    // Some targets report the magic sign-extended from 32 bits.
    let magic = magic & 0xFFFF_FFFF;
    NETWORK_MAGIC
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// The path itself, or the closest ancestor that exists (the database and
/// its directory are created later, on the same mount as that ancestor).
fn nearest_existing(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    abs.ancestors()
        .find(|p| p.exists())
        .map_or_else(|| PathBuf::from("/"), Path::to_owned)
}

/// The FUSE subtype of the mount holding `path`: the longest mount point
/// that contains it, from `/proc/self/mountinfo`.
fn fuse_subtype(mountinfo: &str, path: &Path) -> Option<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = Path::new(*fields.get(4)?);
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = *fields.get(sep + 1)?;
            path.starts_with(mount_point)
                .then_some((mount_point.as_os_str().len(), fstype))
        })
        .max_by_key(|(len, _)| *len)
        .and_then(|(_, t)| t.strip_prefix("fuse.").map(str::to_owned))
}

/// Refuses a SQLite database on a network filesystem, unless `allow`; then
/// it only warns.
pub fn check_sqlite(path: &Path, allow: bool) -> Result<(), StoreError> {
    let fs = match network_filesystem(path) {
        Ok(Some(fs)) => fs,
        // Nothing to say: a local filesystem, or one statfs cannot answer
        // for (opening the database will say what is wrong).
        Ok(None) | Err(_) => return Ok(()),
    };
    if allow {
        tracing::warn!(
            path = %path.display(),
            filesystem = %fs,
            "the state database is on a network filesystem, where SQLite's locks are not safe; \
             started anyway (--allow-network-state)"
        );
        return Ok(());
    }
    Err(StoreError::NetworkFilesystem {
        path: path.to_owned(),
        filesystem: fs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_magics_are_named_and_local_ones_are_not() {
        assert_eq!(network_name(0x6969), Some("NFS"));
        assert_eq!(network_name(0xFF53_4D42), Some("CIFS"));
        // The same magic sign-extended, as some targets report it.
        assert_eq!(network_name(0xFFFF_FFFF_FF53_4D42_u64 as i64), Some("CIFS"));
        for local in [0xEF53, 0x0102_1994, 0x9123_683E, 0x5846_5342, 0x794C_7630] {
            assert_eq!(network_name(local), None, "{local:#x}");
        }
    }

    #[test]
    fn a_fuse_mount_is_named_by_the_longest_mount_point_holding_the_path() {
        let mountinfo = "\
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 22 0:50 / /mnt rw,relatime - fuse.sshfs host:/ rw
41 40 0:51 / /mnt/local rw,relatime - fuse.bindfs /srv rw
";
        let at = |p: &str| fuse_subtype(mountinfo, Path::new(p));
        assert_eq!(at("/mnt/state/state.db").as_deref(), Some("sshfs"));
        assert_eq!(at("/mnt/local/state.db").as_deref(), Some("bindfs"));
        assert_eq!(at("/var/lib/state.db"), None);
    }

    #[test]
    fn a_database_on_a_local_disk_passes_and_one_not_yet_created_is_judged_by_its_parent() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("not/yet/state.db");
        assert_eq!(nearest_existing(&db), dir.path());
        assert_eq!(network_filesystem(&db).unwrap(), None);
        check_sqlite(&db, false).unwrap();
    }
}
