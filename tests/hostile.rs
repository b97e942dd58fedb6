//! Env dirs are writable by the agents they configure, so the operator meets
//! whatever an agent (or a full disk) leaves there: symlinks swapped in
//! mid-pass, a file where the env dir should be, permissions it cannot get
//! past, no space, huge or deeply nested files, hard links and FIFOs. Each
//! test runs the real binary and checks that nothing outside the env root
//! changes, the failure names the file and why, nothing else is disturbed,
//! and the instance recovers once the cause is gone. Also the documented
//! limits on manifests.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// Runs `cmd`, failing the test if it takes longer than `limit` (the child
/// is killed then): every hostile input must be dealt with in bounded time.
fn timed(mut cmd: Command, limit: Duration) -> (Run, Duration) {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn().expect("the command starts");
    let pid = child.id();
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => (Run::from(out.unwrap()), started.elapsed()),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("still running after {limit:?}: killed");
        }
    }
}

/// `cmd` run through `wrapper` (a program and its arguments, ending where
/// the wrapped command's program goes), with the same environment.
fn wrapped(wrapper: &[String], inner: &Command) -> Command {
    let (program, args) = wrapper.split_first().expect("a wrapper program");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

/// Every file under `dir` with its bytes.
fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    files_under(dir)
        .into_iter()
        .map(|p| {
            let b = read(&p);
            (p, b)
        })
        .collect()
}

fn mcp_server(name: &str) -> String {
    mcp(
        "dev",
        name,
        "agentType: coder",
        &format!("stdio:\n  command: {name}-mcp\n"),
    )
}

/// alice and bob, one plugin, and the MCP servers named.
fn fleet(h: &Host, servers: &[&str]) {
    let mut parts = vec![
        instance("dev", "alice", "coder"),
        instance("dev", "bob", "coder"),
        binding("dev", "base", "agentType: coder", &[("lint@tools", true)]),
    ];
    parts.extend(servers.iter().map(|s| mcp_server(s)));
    h.manifest("fleet", &docs(&parts));
}

fn row_of(run: &Run, name: &str) -> Value {
    run.row("dev", name)
}

/// The instance is not ready for `reason` and its message says `says`.
fn refused(run: &Run, name: &str, reason: &str, says: &str) {
    let row = row_of(run, name);
    assert_eq!(row["ready"], false, "{row}\n{}", run.stderr);
    assert_eq!(row["reason"], reason, "{row}");
    let msg = row["message"].as_str().unwrap();
    assert!(msg.contains(says), "expected {says:?} in: {msg}");
}

// ---------------------------------------------------------------------------
// Symlinks

/// One `renameat2(RENAME_EXCHANGE)`: both names stay, their targets trade
/// places in one step, as an attacker racing the operator would do it.
fn exchange(dir: &std::fs::File, a: &str, b: &str) -> bool {
    rustix::fs::renameat_with(dir, a, dir, b, rustix::fs::RenameFlags::EXCHANGE).is_ok()
}

#[test]
fn symlinks_swapped_in_during_passes_never_lead_a_write_outside_the_root() {
    let h = Host::new();
    let outside = h.path("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("settings.json"), "{\"outside\": true}\n").unwrap();
    std::fs::write(outside.join("victim.json"), "{\"victim\": true}\n").unwrap();
    let before = contents(&outside);
    let declare = |i: usize| {
        h.manifest(
            "fleet",
            &docs(&[
                instance("dev", "alice", "coder"),
                binding(
                    "dev",
                    "base",
                    "agentType: coder",
                    &[(&format!("p{i}@tools"), true)],
                ),
            ]),
        );
    };
    declare(0);
    assert_eq!(h.reconcile().code, 0);

    // Beside the env dir, a symlink out of the root; beside settings.json, a
    // symlink to a file out of the root. A thread keeps exchanging each with
    // the real thing while passes run.
    let real = h.env_file("dev/alice");
    std::os::unix::fs::symlink(&outside, h.env_file("dev/alice-swap")).unwrap();
    let dev = std::fs::File::open(h.env_file("dev")).unwrap();
    // A handle on the real env dir, wherever it is renamed to.
    let real_dir = std::fs::File::open(&real).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicUsize::new(0));
    let swapper = {
        let (stop, swaps) = (stop.clone(), swaps.clone());
        let victim = outside.join("victim.json");
        let dev = dev.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            while !stop.load(Ordering::Relaxed) {
                let is_link = |name: &str| {
                    rustix::fs::statat(&real_dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|s| {
                            rustix::fs::FileType::from_raw_mode(s.st_mode)
                                == rustix::fs::FileType::Symlink
                        })
                };
                // A pass replaces a symlinked settings.json by rename: then
                // neither name is a link any more, and one is put back.
                if !is_link("settings.json") && !is_link("settings-swap") {
                    let _ = rustix::fs::unlinkat(
                        &real_dir,
                        "settings-swap",
                        rustix::fs::AtFlags::empty(),
                    );
                    rustix::fs::symlinkat(&victim, &real_dir, "settings-swap").unwrap();
                }
                // One of the two swaps at a time, at random.
                let swapped = if jitter(&mut seed, Duration::from_secs(2)) < Duration::from_secs(1)
                {
                    exchange(&real_dir, "settings.json", "settings-swap")
                } else {
                    exchange(&dev, "alice", "alice-swap")
                };
                swaps.fetch_add(usize::from(swapped), Ordering::Relaxed);
                std::thread::sleep(jitter(&mut seed, Duration::from_millis(20)));
            }
        })
    };

    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for i in 1..=40 {
        declare(i);
        let run = h.reconcile();
        assert!(
            run.code == 0 || run.code == 1,
            "exit {}: {}",
            run.code,
            run.stderr
        );
        let row = row_of(&run, "alice");
        let reason = row["reason"].as_str().unwrap().to_owned();
        match reason.as_str() {
            "Rendered" | "UpToDate" => {}
            "UnsafePath" => assert!(
                row["message"]
                    .as_str()
                    .unwrap()
                    .contains("is a symbolic link"),
                "{row}"
            ),
            // Swapped between read and rename at every try.
            "WriteFailed" => assert!(
                row["message"].as_str().unwrap().contains("kept changing"),
                "{row}"
            ),
            _ => panic!("unexpected outcome {row}"),
        }
        *reasons.entry(reason).or_default() += 1;
        assert_eq!(
            contents(&outside),
            before,
            "pass {i} changed a file outside the root"
        );
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(
        swaps.load(Ordering::Relaxed) >= 40,
        "the race was hardly run"
    );
    // Both sides of the race were seen: writes and refusals.
    assert!(reasons.contains_key("Rendered"), "{reasons:?}");
    assert!(reasons.contains_key("UnsafePath"), "{reasons:?}");

    // Put the real things back where they belong: the instance recovers.
    if std::fs::symlink_metadata(&real).unwrap().is_symlink() {
        assert!(exchange(&dev, "alice", "alice-swap"));
    }
    std::fs::remove_file(h.env_file("dev/alice-swap")).unwrap();
    let settings = h.env_file("dev/alice/settings.json");
    if std::fs::symlink_metadata(&settings).unwrap().is_symlink() {
        std::fs::remove_file(&settings).unwrap();
    }
    std::fs::remove_file(h.env_file("dev/alice/settings-swap")).unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        h.read_json("dev/alice/settings.json")["enabledPlugins"],
        json!({"p40@tools": true})
    );
    assert_eq!(
        names(&real),
        [".claude.json", "settings.json"],
        "a temp file was left"
    );
    assert_eq!(contents(&outside), before);
}

// ---------------------------------------------------------------------------
// A file where the env dir belongs

#[test]
fn an_env_dir_replaced_by_a_file_is_named_left_alone_and_recovers() {
    let h = Host::new();
    fleet(&h, &["a"]);
    assert_eq!(h.reconcile().code, 0);
    let bob = contents(&h.env_file("dev/bob"));
    std::fs::remove_dir_all(h.env_file("dev/alice")).unwrap();
    std::fs::write(h.env_file("dev/alice"), "not a directory\n").unwrap();

    let run = h.reconcile();
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        &run,
        "alice",
        "WriteFailed",
        "dev/alice is a regular file, not a directory; left as it is",
    );
    assert!(
        run.stderr.contains("dev/alice is a regular file"),
        "{}",
        run.stderr
    );
    assert_eq!(read(&h.env_file("dev/alice")), b"not a directory\n");
    assert_eq!(row_of(&run, "bob")["reason"], "UpToDate");
    assert_eq!(contents(&h.env_file("dev/bob")), bob);

    std::fs::remove_file(h.env_file("dev/alice")).unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(row_of(&run, "alice")["reason"], "Rendered");
    assert_eq!(
        h.read_json("dev/alice/settings.json")["enabledPlugins"],
        json!({"lint@tools": true})
    );
    assert!(h.read_json("dev/alice/.claude.json")["mcpServers"]["a"].is_object());
}

// ---------------------------------------------------------------------------
// Permissions

/// How to run the binary so permission bits apply to it: tests run as root,
/// which passes them by (CAP_DAC_OVERRIDE, CAP_FOWNER), so root drops every
/// capability first. Checked on `probe_dir` (mode 0555): if a file can still
/// be created in it, the test would not test a refusal and fails.
fn unprivileged(probe_dir: &Path) -> Vec<String> {
    let wrapper: Vec<String> = if rustix::process::geteuid().is_root() {
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
            .map(String::from)
            .to_vec()
    } else {
        Vec::new()
    };
    let mut sh = Command::new("sh");
    sh.args(["-c", "touch \"$1/probe\"", "sh"]).arg(probe_dir);
    let probe = if wrapper.is_empty() {
        sh.output()
    } else {
        wrapped(&wrapper, &sh).output()
    }
    .expect("setpriv (util-linux) runs");
    assert!(
        !probe.status.success(),
        "a file could still be created in a 0555 directory through {wrapper:?}: the refusal would not be tested"
    );
    wrapper
}

fn reconcile_as(h: &Host, wrapper: &[String]) -> Run {
    let cmd = h.reconcile_command(&[]);
    let cmd = if wrapper.is_empty() {
        cmd
    } else {
        wrapped(wrapper, &cmd)
    };
    timed(cmd, Duration::from_secs(60)).0
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn unwritable_env_dirs_and_unreadable_files_are_refused_by_name_and_recover() {
    let h = Host::new();
    fleet(&h, &[]);
    assert_eq!(h.reconcile().code, 0);
    let alice = h.env_file("dev/alice");

    // An env dir the operator may not write: a new entry cannot go in.
    chmod(&alice, 0o555);
    let wrapper = unprivileged(&alice);
    let before = contents(&alice);
    fleet(&h, &["a"]);
    let run = reconcile_as(&h, &wrapper);
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        &run,
        "alice",
        "WriteFailed",
        "cannot create a temp file beside dev/alice/.claude.json: Permission denied",
    );
    assert!(
        run.stderr.contains("dev/alice/.claude.json"),
        "{}",
        run.stderr
    );
    assert_eq!(contents(&alice), before);
    assert_eq!(names(&alice), [".claude.json", "settings.json"]);
    assert_eq!(row_of(&run, "bob")["reason"], "Rendered");
    chmod(&alice, 0o755);
    let run = reconcile_as(&h, &wrapper);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(h.read_json("dev/alice/.claude.json")["mcpServers"]["a"].is_object());

    // A file the operator may not read.
    let settings = h.env_file("dev/alice/settings.json");
    chmod(&settings, 0o000);
    let before = read(&settings);
    fleet(&h, &["a", "b"]);
    let run = reconcile_as(&h, &wrapper);
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        &run,
        "alice",
        "WriteFailed",
        "cannot open dev/alice/settings.json: Permission denied",
    );
    assert_eq!(read(&settings), before);
    assert_eq!(std::fs::metadata(&settings).unwrap().mode() & 0o777, 0o000);
    chmod(&settings, 0o644);
    assert_eq!(reconcile_as(&h, &wrapper).code, 0);

    // A read-only file in a writable env dir is replaced like any other (a
    // rename needs only the directory) and keeps its mode.
    let mut s = h.read_json("dev/alice/settings.json");
    s["theme"] = json!("dark");
    h.write_json("dev/alice/settings.json", &s);
    chmod(&settings, 0o444);
    h.manifest(
        "more",
        &binding("dev", "more", "instance: alice", &[("fmt@tools", true)]),
    );
    let run = reconcile_as(&h, &wrapper);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let s = h.read_json("dev/alice/settings.json");
    assert_eq!(s["enabledPlugins"]["fmt@tools"], true);
    assert_eq!(s["theme"], "dark");
    assert_eq!(std::fs::metadata(&settings).unwrap().mode() & 0o777, 0o444);
}

// ---------------------------------------------------------------------------
// A full disk

/// Unmounts when dropped, also when the test fails.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` until a write fails for want of space.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 4096];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "not ENOSPC: {e}");
            return filler;
        }
    }
}

/// Foreign content Claude Code keeps in `.claude.json`, `kb` kilobytes of it.
fn with_projects(h: &Host, kb: usize) {
    let mut c = h.read_json("dev/alice/.claude.json");
    c["projects"] = json!({"/work": {"history": "x".repeat(kb * 1024)}});
    h.write_json("dev/alice/.claude.json", &c);
}

/// The write of `.claude.json` failed for `why`: the old file is intact,
/// no partial or temp file is left, and the failure names the file.
fn write_failed_cleanly(h: &Host, run: &Run, before: &[(PathBuf, Vec<u8>)], why: &str) {
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        run,
        "alice",
        "WriteFailed",
        &format!("cannot write dev/alice/.claude.json: {why}"),
    );
    assert!(
        run.stderr.contains("dev/alice/.claude.json") && run.stderr.contains(why),
        "the log names the file: {}",
        run.stderr
    );
    assert_eq!(
        &contents(&h.env_file("dev/alice")),
        before,
        "a file changed"
    );
    assert_eq!(
        names(&h.env_file("dev/alice")),
        [".claude.json", "settings.json"],
        "a temp file was left"
    );
}

#[test]
fn a_full_disk_keeps_the_old_file_whole_and_reports_it() {
    let h = Host::new();
    std::fs::create_dir_all(h.root()).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs"])
        .arg(h.root())
        .output()
        .expect("mount (util-linux) runs");
    assert!(
        mounted.status.success(),
        "cannot mount a tmpfs to fill ({}): this test needs root, as CI runs it; \
         a_write_over_the_file_size_limit_keeps_the_old_file_whole covers the same failure without",
        String::from_utf8_lossy(&mounted.stderr).trim()
    );
    let _mount = Mount(h.root());
    // The state lives off the small filesystem: only the env files meet the full disk.
    let state = h.path("state.db").display().to_string();
    let reconcile = || h.reconcile_with(&["--state", &state]);
    fleet(&h, &["a"]);
    assert_eq!(reconcile().code, 0);
    with_projects(&h, 200);
    assert_eq!(reconcile().code, 0);
    let before = contents(&h.env_file("dev/alice"));

    let filler = fill(&h.root());
    fleet(&h, &["a", "b"]);
    let run = reconcile();
    write_failed_cleanly(&h, &run, &before, "No space left on device");

    std::fs::remove_file(filler).unwrap();
    let run = reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(row_of(&run, "alice")["reason"], "Rendered");
    let c = h.read_json("dev/alice/.claude.json");
    assert!(c["mcpServers"]["b"].is_object());
    assert_eq!(
        c["projects"]["/work"]["history"].as_str().unwrap().len(),
        200 * 1024
    );
}

#[test]
fn a_write_over_the_file_size_limit_keeps_the_old_file_whole() {
    // RLIMIT_FSIZE fails a write past 1 MiB with EFBIG, as a full disk fails
    // it with ENOSPC; the signal it also sends is ignored (and stays ignored
    // across exec), or it would kill the process instead.
    let h = Host::new();
    fleet(&h, &["a"]);
    assert_eq!(h.reconcile().code, 0);
    with_projects(&h, 2048);
    assert_eq!(h.reconcile().code, 0);
    let before = contents(&h.env_file("dev/alice"));
    fleet(&h, &["a", "b"]);
    let limit: Vec<String> = [
        "sh",
        "-c",
        "trap '' XFSZ; exec prlimit --fsize=1048576 -- \"$@\"",
        "sh",
    ]
    .map(String::from)
    .to_vec();
    let (run, _) = timed(
        wrapped(&limit, &h.reconcile_command(&[])),
        Duration::from_secs(60),
    );
    write_failed_cleanly(&h, &run, &before, "File too large");

    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(h.read_json("dev/alice/.claude.json")["mcpServers"]["b"].is_object());
}

// ---------------------------------------------------------------------------
// Huge and deep files

fn no_aside_copies(h: &Host) {
    let aside: Vec<String> = names(&h.env_file("dev/alice"))
        .into_iter()
        .filter(|n| n.contains(".corrupt-"))
        .collect();
    assert!(aside.is_empty(), "moved or copied aside: {aside:?}");
}

#[test]
fn an_oversized_claude_json_is_refused_unread_and_left_as_it_is() {
    let h = Host::new();
    fleet(&h, &["a"]);
    assert_eq!(h.reconcile().code, 0);
    let path = h.env_file("dev/alice/.claude.json");

    // 50 MB of valid JSON, as a long-lived Claude Code config can grow to.
    let servers = h.read_json("dev/alice/.claude.json")["mcpServers"].clone();
    let big = format!(
        "{{\"projects\": {{\"/work\": {{\"history\": \"{}\"}}}}, \"mcpServers\": {servers}}}\n",
        "x".repeat(50_000_000)
    );
    std::fs::write(&path, &big).unwrap();
    let stamp = std::fs::metadata(&path).unwrap().mtime_nsec();
    fleet(&h, &["a", "b"]);
    let (run, took) = timed(h.reconcile_command(&[]), Duration::from_secs(30));
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        &run,
        "alice",
        "WriteFailed",
        &format!(
            "dev/alice/.claude.json is {} bytes, over the limit of 16777216 bytes (16 MiB) for a file in an env dir; left as it is",
            big.len()
        ),
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(read(&path) == big.as_bytes(), "the file changed");
    assert_eq!(std::fs::metadata(&path).unwrap().mtime_nsec(), stamp);
    no_aside_copies(&h);
    assert_eq!(row_of(&run, "bob")["reason"], "Rendered");

    // 8 GiB (sparse): reading it would take 8 GiB of memory and a while.
    // Refused from its size alone, in the same bounded time.
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_len(8 << 30).unwrap();
    let (run, took) = timed(h.reconcile_command(&[]), Duration::from_secs(30));
    refused(
        &run,
        "alice",
        "WriteFailed",
        "is 8589934592 bytes, over the limit",
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 << 30);

    // Back under the limit: rendered, the foreign key kept.
    std::fs::write(&path, "{\"projects\": {\"/work\": {}}}\n").unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    let c = h.read_json("dev/alice/.claude.json");
    assert!(c["mcpServers"]["b"].is_object());
    assert_eq!(c["projects"], json!({"/work": {}}));
}

#[test]
fn deep_nesting_is_kept_in_foreign_keys_and_refused_in_owned_ones() {
    let h = Host::new();
    fleet(&h, &["a"]);
    assert_eq!(h.reconcile().code, 0);
    let path = h.env_file("dev/alice/.claude.json");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));

    // 10,000 levels in a key Claude Code owns: never parsed, kept byte for byte.
    let servers = h.read_json("dev/alice/.claude.json")["mcpServers"].clone();
    std::fs::write(
        &path,
        format!("{{\"projects\": {deep}, \"mcpServers\": {servers}}}\n"),
    )
    .unwrap();
    fleet(&h, &["a", "b"]);
    let (run, took) = timed(h.reconcile_command(&[]), Duration::from_secs(30));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let text = String::from_utf8(read(&path)).unwrap();
    assert!(
        text.contains(&format!("\"projects\": {deep},")),
        "the deep key changed"
    );
    assert!(text.contains("\"b\": {"), "{}", &text[text.len() - 300..]);

    // 10,000 levels in mcpServers: valid JSON, so not moved aside as damaged,
    // and not replaced either: refused, naming the key and the limit.
    let text = format!(
        "{{\"projects\": {{}}, \"mcpServers\": {{\"a\": {{\"command\": \"a-mcp\", \"x\": {deep}}}}}}}\n"
    );
    std::fs::write(&path, &text).unwrap();
    fleet(&h, &["a", "b", "c"]);
    let (run, took) = timed(h.reconcile_command(&[]), Duration::from_secs(30));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    refused(
        &run,
        "alice",
        "WriteFailed",
        "dev/alice/.claude.json nests mcpServers deeper than 64 levels, the limit for an owned key; left as it is",
    );
    assert!(read(&path) == text.as_bytes(), "the file changed");
    no_aside_copies(&h);

    std::fs::write(&path, "{\"mcpServers\": {}}\n").unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(h.read_json("dev/alice/.claude.json")["mcpServers"]["c"].is_object());
}

// ---------------------------------------------------------------------------
// Hard links, FIFOs, locks

#[test]
fn a_hard_link_to_a_file_outside_the_root_is_neither_read_nor_written() {
    let h = Host::new();
    fleet(&h, &[]);
    assert_eq!(h.reconcile().code, 0);
    let outside = h.path("outside.json");
    let secret = "{\"token\": \"outside-secret-7f3\", \"enabledPlugins\": {}}\n";
    std::fs::write(&outside, secret).unwrap();
    let settings = h.env_file("dev/alice/settings.json");
    std::fs::remove_file(&settings).unwrap();
    std::fs::hard_link(&outside, &settings).unwrap();

    fleet(&h, &["a"]);
    let run = h.reconcile();
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        &run,
        "alice",
        "UnsafePath",
        "dev/alice/settings.json has 2 hard links, so it may be a file outside the env root; it is not read",
    );
    assert_eq!(read(&outside), secret.as_bytes());
    assert_eq!(
        std::fs::metadata(&settings).unwrap().ino(),
        std::fs::metadata(&outside).unwrap().ino()
    );
    // Nothing read from it went anywhere else (the link itself is the outside file).
    for (p, bytes) in contents(&h.root()) {
        if p != settings {
            assert!(
                !String::from_utf8_lossy(&bytes).contains("outside-secret-7f3"),
                "{} holds the outside file's content",
                p.display()
            );
        }
    }
    assert!(
        !run.stdout.contains("outside-secret-7f3") && !run.stderr.contains("outside-secret-7f3")
    );

    // The link broken (a copy in its place): rendered, the outside file untouched.
    std::fs::remove_file(&settings).unwrap();
    std::fs::write(&settings, secret).unwrap();
    let run = h.reconcile();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        h.read_json("dev/alice/settings.json")["enabledPlugins"],
        json!({"lint@tools": true})
    );
    assert_eq!(read(&outside), secret.as_bytes());
}

#[test]
fn a_fifo_or_a_lock_that_is_no_lock_is_refused_without_waiting() {
    let h = Host::new();
    fleet(&h, &[]);
    assert_eq!(h.reconcile().code, 0);
    let settings = h.env_file("dev/alice/settings.json");

    // Opening a FIFO for reading waits for a writer that never comes.
    std::fs::remove_file(&settings).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &settings,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fleet(&h, &["a"]);
    let (run, took) = timed(h.reconcile_command(&[]), Duration::from_secs(30));
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        &run,
        "alice",
        "WriteFailed",
        "dev/alice/settings.json is a named pipe, not a regular file; left as it is",
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        std::fs::symlink_metadata(&settings)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    std::fs::remove_file(&settings).unwrap();
    assert_eq!(h.reconcile().code, 0);

    // A stale `.claude.json.lock` that is a file: nobody will ever release it.
    let lock = h.env_file("dev/alice/.claude.json.lock");
    std::fs::write(&lock, "").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    std::fs::File::open(&lock)
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(old))
        .unwrap();
    fleet(&h, &["a", "b"]);
    let (run, took) = timed(h.reconcile_command(&[]), Duration::from_secs(30));
    assert_eq!(run.code, 1, "{}", run.stderr);
    refused(
        &run,
        "alice",
        "WriteFailed",
        "dev/alice/.claude.json.lock is a regular file, not a directory",
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    std::fs::remove_file(&lock).unwrap();
    assert_eq!(h.reconcile().code, 0);
}

#[test]
fn agent_env_wait_is_not_held_up_by_a_fifo_as_the_marker() {
    // The init container reads the marker in the agent's own env dir: a FIFO
    // left there would block the read, and the timeout with it.
    let h = Host::new();
    let env_dir = h.env_file("dev/alice");
    std::fs::create_dir_all(&env_dir).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        env_dir.join(".agent-env-ready"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let mut cmd = agent_env();
    cmd.args(["wait", "--env-dir"])
        .arg(&env_dir)
        .args(["--pod-uid", "u-1", "--timeout", "1s"]);
    let (run, took) = timed(cmd, Duration::from_secs(30));
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("timed out after 1s"), "{}", run.stderr);
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

// ---------------------------------------------------------------------------
// The continuous loop meets the same refusals

/// A running `agent-env reconcile` loop; killed when dropped.
struct Loop {
    child: std::process::Child,
    log: PathBuf,
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Loop {
    fn start(h: &Host) -> Loop {
        let log = h.path("loop.log");
        let child = agent_env()
            .args(["reconcile", "-f"])
            .arg(h.manifests())
            .arg("--env-root")
            .arg(h.root())
            .args(["--no-fsync", "--resync-interval", "1h"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let lp = Loop { child, log };
        lp.wait_for("watching for changes", || true);
        lp
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle` and `also` holds.
    fn wait_for(&self, needle: &str, mut also: impl FnMut() -> bool) {
        let started = Instant::now();
        while !(self.log().contains(needle) && also()) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "timed out waiting for {needle:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn the_loop_refuses_the_same_things_keeps_going_and_recovers() {
    let h = Host::new();
    fleet(&h, &["a"]);
    let lp = Loop::start(&h);
    let plugins = |inst: &str| {
        std::fs::read_to_string(h.env_file(&format!("dev/{inst}/settings.json")))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .map_or(Value::Null, |v| v["enabledPlugins"].clone())
    };
    let drift = |inst: &str| {
        let mut s = h.read_json(&format!("dev/{inst}/settings.json"));
        s["enabledPlugins"] = json!({});
        h.write_json(&format!("dev/{inst}/settings.json"), &s);
    };

    // A FIFO in alice's env dir (moved into place in one step, or the loop
    // renders a fresh file first): refused without blocking the loop,
    // which still puts bob's drift back.
    let settings = h.env_file("dev/alice/settings.json");
    let fifo = h.env_file("dev/alice/fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    std::fs::rename(&fifo, &settings).unwrap();
    drift("bob");
    lp.wait_for(
        "dev/alice/settings.json is a named pipe, not a regular file",
        || plugins("bob") == json!({"lint@tools": true}),
    );

    // An oversized .claude.json for bob: refused, left as it is.
    std::fs::remove_file(&settings).unwrap();
    let claude = h.env_file("dev/bob/.claude.json");
    std::fs::File::options()
        .write(true)
        .open(&claude)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    lp.wait_for(
        "dev/bob/.claude.json is 8589934592 bytes, over the limit",
        || plugins("alice") == json!({"lint@tools": true}),
    );
    assert_eq!(std::fs::metadata(&claude).unwrap().len(), 8 << 30);
    // Fixed: rendered again.
    std::fs::write(&claude, "{}").unwrap();
    lp.wait_for("reconciled", || {
        h.read_json("dev/bob/.claude.json")["mcpServers"]["a"].is_object()
    });

    // A manifest over the size limit: logged, the last good manifests kept.
    let mut text = "# padding\n".repeat(32 * 1024 * 1024 / 10 + 1);
    text.truncate(32 * 1024 * 1024 + 1);
    std::fs::write(h.manifests().join("huge.yaml"), text).unwrap();
    lp.wait_for(
        "over the limit of 33554432 bytes (32 MiB) per manifest file",
        || true,
    );
    assert!(
        lp.log().contains("keeping the last good ones"),
        "{}",
        lp.log()
    );
    drift("alice");
    lp.wait_for("drift put back", || {
        plugins("alice") == json!({"lint@tools": true})
    });
}

// ---------------------------------------------------------------------------
// Manifest limits

#[test]
fn a_manifest_file_over_the_size_limit_is_refused_before_it_is_read() {
    let h = Host::new();
    fleet(&h, &[]);
    assert_eq!(h.reconcile().code, 0);
    let before = contents(&h.root().join("dev"));
    // Valid YAML (a comment), one byte over.
    let limit = 32 * 1024 * 1024;
    let mut text = String::with_capacity(limit + 1);
    while text.len() < limit + 1 {
        text.push_str("# padding padding padding padding padding padding padding\n");
    }
    text.truncate(limit);
    text.push('\n');
    std::fs::write(h.manifests().join("huge.yaml"), &text).unwrap();
    let (run, took) = timed(h.reconcile_command(&[]), Duration::from_secs(30));
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("huge.yaml is 33554433 bytes, over the limit of 33554432 bytes (32 MiB) per manifest file"),
        "{}",
        run.stderr
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(contents(&h.root().join("dev")), before);
}

#[test]
fn manifests_over_the_object_limit_are_refused() {
    let h = Host::new();
    fleet(&h, &[]);
    assert_eq!(h.reconcile().code, 0);
    let before = contents(&h.root().join("dev"));
    // Unlabelled Secrets are the cheapest objects to parse; they count too.
    // 100,000 here plus the fleet's three make one too many for a limit of
    // 100,000 (the default, 1,000,000, would take minutes to reach here).
    let doc = |i: usize| format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: s{i}}}\n");
    let text: Vec<String> = (0..100_000).map(doc).collect();
    std::fs::write(h.manifests().join("secrets.yaml"), text.join("---\n")).unwrap();
    let (run, _) = timed(
        h.reconcile_command(&["--max-objects", "100000"]),
        Duration::from_secs(300),
    );
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("secrets.yaml: the manifests hold more than 100000 objects, the limit for all manifest files together"),
        "{}",
        run.stderr
    );
    assert_eq!(contents(&h.root().join("dev")), before);
}
