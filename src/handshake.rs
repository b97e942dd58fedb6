//! The boot handshake: after the operator verified or rendered an env dir,
//! it writes a marker naming the pods it did that for; `agent-env wait`, the
//! agent pod's init container, blocks until its own pod UID is in it, so an
//! agent never boots on a config the operator has not seen.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::engine::envdir::{BOOT_MARKER, InstanceDir};

/// The marker's content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Marker {
    /// UIDs of the pods the env dir was checked for, sorted.
    pub pods: Vec<String>,
    /// Hash of the owned keys as checked.
    pub content_hash: String,
}

impl Marker {
    /// The bytes written.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = serde_json::to_vec_pretty(self).expect("markers serialize");
        b.push(b'\n');
        b
    }
}

/// Reads the marker of an env dir, as `agent-env wait` does in the agent's
/// pod; `None` when absent or unreadable (a write in progress is atomic, so
/// unreadable means not ours yet). The env dir is the agent's: something
/// other than a small regular file there (a FIFO would block the read, and
/// the wait's timeout with it) counts as no marker.
pub fn read(env_dir: &Path) -> Option<Marker> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOFOLLOW;
    let f = std::fs::File::options()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(env_dir.join(BOOT_MARKER))
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > crate::engine::envdir::MAX_FILE_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(crate::engine::envdir::MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Reads the marker through the env dir's handle, as the operator does: the
/// agent can write its env dir, so no symlink is followed and nothing but a
/// regular file within [`crate::engine::envdir::MAX_FILE_BYTES`] is read. `None`
/// when absent, refused or not a marker (the next write replaces it).
pub fn read_in(dir: &InstanceDir) -> Option<Marker> {
    let read = dir.read_file(BOOT_MARKER).ok()??;
    serde_json::from_slice(&read.bytes).ok()
}

/// `agent-env wait` gave up.
#[derive(Debug, thiserror::Error)]
#[error(
    "timed out after {} waiting for the operator to check {} for pod {pod_uid}: {}",
    humantime::format_duration(*.timeout),
    .env_dir.display(),
    .hint
)]
pub struct WaitError {
    /// The env dir.
    pub env_dir: PathBuf,
    /// This pod.
    pub pod_uid: String,
    /// How long it waited.
    pub timeout: Duration,
    /// What was found instead.
    pub hint: String,
}

/// Polls the marker until it names `pod_uid`.
pub async fn wait(env_dir: &Path, pod_uid: &str, timeout: Duration) -> Result<Marker, WaitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let marker = read(env_dir);
        if let Some(m) = &marker
            && m.pods.iter().any(|p| p == pod_uid)
        {
            return Ok(m.clone());
        }
        if tokio::time::Instant::now() >= deadline {
            let hint = match marker {
                None if !env_dir.is_dir() => "the env dir does not exist (is the volume mounted, and is there an AgentInstance for this agent?)".to_owned(),
                None => format!("no {BOOT_MARKER} in it yet (is the operator running, and does this pod carry the label agentenv.io/instance?)"),
                Some(m) => format!(
                    "{BOOT_MARKER} names {} other pod(s) but not this one (does this pod carry the label agentenv.io/instance with its AgentInstance's name?)",
                    m.pods.len()
                ),
            };
            return Err(WaitError {
                env_dir: env_dir.to_owned(),
                pod_uid: pod_uid.to_owned(),
                timeout,
                hint,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
