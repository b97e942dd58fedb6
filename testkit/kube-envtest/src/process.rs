//! Starting the servers so that none outlives the test process.
//!
//! Each server is started with `PR_SET_PDEATHSIG = SIGKILL`, which the
//! kernel delivers when the *thread* that forked it ends. Test threads end
//! with their test, and a control plane shared by a whole test binary must
//! outlive any one of them, so every server is forked by one thread that
//! lives as long as the process: when the process ends, by a panic, an
//! `exit` or a SIGKILL, the servers are killed with it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{LazyLock, Mutex};

type Job = (Command, mpsc::Sender<io::Result<Child>>);

static SPAWNER: LazyLock<Mutex<mpsc::Sender<Job>>> = LazyLock::new(|| {
    let (tx, rx) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("kube-envtest-spawner".into())
        .spawn(move || {
            for (mut command, reply) in rx {
                let _ = reply.send(spawn_here(&mut command));
            }
            // The sender is a static: this loop ends only with the process.
        })
        .expect("the spawner thread starts");
    Mutex::new(tx)
});

fn spawn_here(command: &mut Command) -> io::Result<Child> {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes
    // only two system calls (prctl, getppid), both async-signal-safe; it
    // allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The parent may have died before the signal was armed.
            if rustix::process::getppid() != Some(parent) {
                return Err(io::Error::other("the test process is gone"));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Spawns `command` from the long-lived spawner thread.
pub fn spawn(command: Command) -> io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    SPAWNER
        .lock()
        .expect("spawner lock")
        .send((command, tx))
        .map_err(|_| io::Error::other("the spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("the spawner thread is gone"))?
}

/// SIGTERM, then SIGKILL if the process is still there after `grace`.
pub fn stop(child: &mut Child, grace: std::time::Duration) {
    if let Ok(pid) = i32::try_from(child.id())
        && let Some(pid) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether a process with this pid is alive (for cleaning up data dirs
/// left by test processes that were killed).
pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
