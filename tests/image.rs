//! The two ways the image is built agree: the Containerfile (for a
//! container engine) and scripts/build-image (without one, in CI) build the
//! same binary the same way and give it the same path, user, entrypoint,
//! command and labels. scripts/check-image then checks the built image
//! itself (run by .ci/run).

use std::collections::BTreeSet;
use std::path::PathBuf;

fn read(rel: &str) -> String {
    std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The Containerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<(String, String)> {
    let text = read("Containerfile").replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (op, rest) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_uppercase(), rest.trim().to_owned())
        })
        .collect()
}

fn one(op: &str) -> String {
    let found: Vec<String> = instructions()
        .into_iter()
        .filter(|(o, _)| o == op)
        .map(|(_, r)| r)
        .collect();
    assert_eq!(found.len(), 1, "one {op} expected: {found:?}");
    found[0].clone()
}

#[test]
fn both_builds_make_the_same_binary() {
    let build = "cargo build --release --locked --bin agent-env";
    let run = one("RUN");
    assert!(run.contains(build), "Containerfile RUN: {run}");
    assert!(
        read("scripts/build-image").contains(build),
        "scripts/build-image must run `{build}`"
    );
    // The toolchain of the build stage can build this crate.
    let from: Vec<String> = instructions()
        .into_iter()
        .filter(|(o, _)| o == "FROM")
        .map(|(_, r)| r)
        .collect();
    assert_eq!(from.len(), 2, "a build stage and a runtime stage");
    let rust = from[0]
        .split(':')
        .nth(1)
        .and_then(|t| t.split('-').next())
        .expect("a rust:<version> build image");
    let minimum = read("Cargo.toml")
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .map(|v| v.trim_end_matches('"').to_owned())
        .expect("rust-version in Cargo.toml");
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    assert!(
        parse(rust) >= parse(&minimum),
        "rust:{rust} is older than rust-version {minimum}"
    );
    // glibc of the build matches the runtime's: both Debian 12.
    assert!(from[0].ends_with("-bookworm AS build"), "{}", from[0]);
    assert!(
        from[1].starts_with("gcr.io/distroless/cc-debian12"),
        "{}",
        from[1]
    );
}

#[test]
fn both_builds_give_the_same_path_user_entrypoint_and_labels() {
    let script = read("scripts/build-image");
    let binary = "/usr/local/bin/agent-env";
    let copies: Vec<String> = instructions()
        .into_iter()
        .filter(|(o, r)| o == "COPY" && r.starts_with("--from=build"))
        .map(|(_, r)| r)
        .collect();
    assert_eq!(copies.len(), 1, "{copies:?}");
    assert!(copies[0].ends_with(binary), "{}", copies[0]);
    assert!(script.contains(&format!("binary={binary}")));
    assert_eq!(one("USER"), "65532:65532");
    assert!(script.contains("--config.user 65532:65532"));
    assert_eq!(one("ENTRYPOINT"), format!("[\"{binary}\"]"));
    assert!(script.contains("--config.entrypoint \"$binary\""));
    assert_eq!(one("CMD"), "[\"run\"]");
    assert!(script.contains("--config.cmd run"));

    let label_keys = |text: &str| -> BTreeSet<String> {
        text.split(|c: char| c.is_whitespace() || c == '=')
            .filter(|w| w.starts_with("org.opencontainers.image."))
            .map(str::to_owned)
            .collect()
    };
    let ours = label_keys(&one("LABEL"));
    assert_eq!(ours.len(), 6, "{ours:?}");
    assert_eq!(ours, label_keys(&script));
}

#[test]
fn the_deployments_run_the_image_as_its_user() {
    // deploy/ runs the operator as the image's user, so files it writes on
    // shared volumes belong to 65532 whichever way the image was built.
    let deployment = read("deploy/base/deployment.yaml");
    assert!(deployment.contains("runAsUser: 65532"));
    assert!(deployment.contains("readOnlyRootFilesystem: true"));
}
