//! Child processes of a cluster: which OS user they run as, and the postmaster's owner thread.
//!
//! The postmaster is spawned from a dedicated, long-lived thread because Linux delivers the
//! parent-death signal (`PR_SET_PDEATHSIG`) when the *thread* that forked the child exits, not
//! the process: spawned from a test thread, the server would be killed as soon as that test
//! finished. The owner thread lives until the cluster is stopped, so the signal fires only when
//! the whole test process dies (panic = abort, SIGKILL, ...), which is exactly when we want it.

use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::HarnessError;

/// How long a stopping postmaster gets after SIGQUIT before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the owner thread checks whether the postmaster died on its own.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// The OS identity that `initdb` and `postgres` run as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunAs {
    /// User id of the server processes.
    pub(crate) uid: u32,
    /// Group id of the server processes.
    pub(crate) gid: u32,
    /// Whether children must switch to `uid`/`gid` (true when we run as root).
    pub(crate) switch: bool,
}

/// Chooses the server identity: the current user, or, as root (which initdb refuses), the
/// `postgres` user if it exists, else `nobody`.
pub(crate) fn server_identity() -> Result<RunAs, HarnessError> {
    // SAFETY: geteuid/getegid have no preconditions and cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid != 0 {
        return Ok(RunAs {
            uid: euid,
            gid: egid,
            switch: false,
        });
    }
    ["postgres", "nobody"]
        .iter()
        .find_map(|name| lookup_user(name))
        .map(|(uid, gid)| RunAs {
            uid,
            gid,
            switch: true,
        })
        .ok_or(HarnessError::NoUnprivilegedUser)
}

/// Looks up a user's uid and primary gid with the thread-safe `getpwnam_r`.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: an all-zero `passwd` is a valid value (null pointers, zero ids); getpwnam_r fills it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the duration of the call and `buf.len()` is its size.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// Makes `cmd` run as `run_as` and, when `die_with_parent`, receive SIGQUIT when the thread
/// that spawns it exits.
///
/// The parent-death signal is set in `pre_exec`, which std runs in the forked child *after*
/// `setgid`/`setgroups`/`setuid`; that order matters because the kernel clears the parent-death
/// signal whenever the credentials change. (The unit test `pdeathsig_survives_uid_switch`
/// checks this.) The child also gets its own process group so that a terminal's Ctrl-C reaches
/// the test process, whose death then stops the server through the parent-death signal.
pub(crate) fn configure(cmd: &mut Command, run_as: RunAs, die_with_parent: bool) {
    if run_as.switch {
        cmd.uid(run_as.uid).gid(run_as.gid);
    }
    if !die_with_parent {
        return;
    }
    cmd.process_group(0);
    let parent = std::process::id() as libc::pid_t;
    let hook = move || -> io::Result<()> {
        // SAFETY: prctl and getppid are async-signal-safe; nothing here allocates.
        unsafe {
            let quit = libc::SIGQUIT as libc::c_ulong;
            if libc::prctl(libc::PR_SET_PDEATHSIG, quit, 0 as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then the signal never comes.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe calls and does not allocate or lock.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// A running postmaster, owned by a dedicated thread (see the module docs).
pub(crate) struct Postmaster {
    pid: u32,
    stop_tx: Mutex<Option<mpsc::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    exit: Arc<Mutex<Option<ExitStatus>>>,
}

impl Postmaster {
    /// Spawns `cmd` (already passed through [`configure`]) from a new owner thread.
    pub(crate) fn spawn(mut cmd: Command, thread_name: String) -> Result<Postmaster, HarnessError> {
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<u32>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let exit = Arc::new(Mutex::new(None));
        let exit_in_thread = Arc::clone(&exit);
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let mut child = match cmd.spawn() {
                    Ok(child) => child,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(child.id()));
                let status = own_child(&mut child, &stop_rx);
                *lock(&exit_in_thread) = status;
            })
            .map_err(|e| HarnessError::io("spawn the postmaster owner thread", e))?;
        let pid = match ready_rx.recv() {
            Ok(Ok(pid)) => pid,
            Ok(Err(e)) => return Err(HarnessError::io("spawn postgres", e)),
            Err(_) => {
                return Err(HarnessError::io(
                    "spawn postgres",
                    io::Error::other("the owner thread ended without reporting"),
                ))
            }
        };
        Ok(Postmaster {
            pid,
            stop_tx: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
            exit,
        })
    }

    /// The postmaster's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status, once the postmaster has exited (by itself or through [`Self::stop`]).
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        *lock(&self.exit)
    }

    /// Stops the postmaster (immediate shutdown, SIGKILL after a grace period) and waits for
    /// its owner thread. Idempotent; bounded by about [`STOP_GRACE`].
    pub(crate) fn stop(&self) {
        if let Some(tx) = lock(&self.stop_tx).take() {
            let _ = tx.send(());
        }
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }
}

/// Body of the owner thread: wait for a stop request (or the cluster being dropped), noticing
/// meanwhile if the child exits by itself. Returns the child's exit status.
fn own_child(child: &mut Child, stop_rx: &mpsc::Receiver<()>) -> Option<ExitStatus> {
    loop {
        match stop_rx.recv_timeout(WATCH_INTERVAL) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return terminate(child),
            Err(RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Some(status);
                }
            }
        }
    }
}

/// Sends SIGQUIT (immediate shutdown: the data is thrown away, so no checkpoint is wanted),
/// waits up to [`STOP_GRACE`], then SIGKILLs.
pub(crate) fn terminate(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    // SAFETY: kill has no memory-safety preconditions; the child is unreaped, so the pid is ours.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGQUIT);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// Locks a mutex, ignoring poisoning (the protected values stay consistent on panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
