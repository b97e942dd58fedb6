//! `-k <dir>`: a kustomization built with `kubectl kustomize`, which runs
//! the same kustomize library Argo CD and Flux build with, so the objects
//! read here are the objects the cluster gets.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::host::manifest::{MAX_MANIFEST_FILE_BYTES, ManifestError};

/// Environment variable naming the kubectl to run (default: `kubectl` on `PATH`).
pub const KUBECTL_ENV: &str = "AGENT_ENV_KUBECTL";

/// Most bytes of kustomize's error output quoted in a message.
const MAX_MESSAGE: usize = 4096;

/// The YAML `kubectl kustomize <dir>` prints.
pub fn build(dir: &Path) -> Result<String, ManifestError> {
    let kubectl = std::env::var(KUBECTL_ENV).unwrap_or_else(|_| "kubectl".into());
    let out = Command::new(&kubectl)
        .arg("kustomize")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ManifestError::KubectlMissing {
            dir: dir.to_owned(),
            kubectl: kubectl.clone(),
            source,
        })?;
    let failed = |message: String| ManifestError::Kustomize {
        dir: dir.to_owned(),
        message,
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut message = stderr.trim().to_owned();
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" ...");
        }
        if message.is_empty() {
            message = format!("{kubectl} exited with {}", out.status);
        }
        return Err(failed(message));
    }
    if out.stdout.len() as u64 > MAX_MANIFEST_FILE_BYTES {
        return Err(ManifestError::FileTooLarge {
            file: source_name(dir),
            size: out.stdout.len() as u64,
            limit: MAX_MANIFEST_FILE_BYTES,
        });
    }
    String::from_utf8(out.stdout).map_err(|_| failed("its output is not UTF-8".into()))
}

/// How a kustomization's output is named in messages, in place of a file.
pub fn source_name(dir: &Path) -> PathBuf {
    PathBuf::from(format!("kustomize build {}", dir.display()))
}
