//! Child processes: running tools to completion, and emulators in their own process group under a
//! hard deadline.
//!
//! An emulator is started as the leader of a new process group, so that a timeout or Ctrl-C can
//! take down everything it started (the `bochs` wrapper script and `bochs-bin`, QEMU's helpers)
//! with one `kill(-pgid, SIGKILL)`. The group is killed while its leader is still unreaped
//! (we look at its state with `waitid(WNOWAIT)`), so the group id cannot have been recycled for
//! an unrelated process by the time we signal it.
//!
//! Ctrl-C reaches only the foreground process group, i.e. xtask and the cargo it runs, not the
//! emulators; [`install_interrupt_handler`] therefore kills every live emulator group itself.

use std::ffi::OsStr;
use std::io;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How often a waiting loop looks at the child (and calls its tick callback).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Process groups of the emulators that are running now.
static LIVE_GROUPS: Mutex<Vec<libc::pid_t>> = Mutex::new(Vec::new());

/// Makes Ctrl-C kill every running emulator group, then exit with status 130.
///
/// Call once, before starting emulators.
pub fn install_interrupt_handler() {
    let result = ctrlc::set_handler(|| {
        let groups = LIVE_GROUPS
            .lock()
            .map(|groups| groups.clone())
            .unwrap_or_default();
        for pgid in groups {
            kill_group(pgid);
        }
        eprintln!("\nxtask: interrupted; emulators stopped");
        std::process::exit(130);
    });
    if let Err(e) = result {
        // Not fatal: without the handler, Ctrl-C still ends xtask, and the emulators still stop
        // at their deadline.
        eprintln!("xtask: warning: cannot install the Ctrl-C handler: {e}");
    }
}

/// Sends SIGKILL to every process of group `pgid`.
fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill(2) has no memory-safety preconditions; a negative pid addresses the process
    // group. ESRCH (the group is already gone) is expected and harmless.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Whether process `pid` (our child) has exited, without reaping it.
fn has_exited(pid: libc::pid_t) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain data, for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call. WNOWAIT leaves the
    // child waitable, so `Child::wait` reaps it later; WNOHANG makes the call non-blocking.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (or left it zeroed when nothing has exited yet, in which case
    // si_pid reads 0, as POSIX specifies for WNOHANG).
    Ok(unsafe { info.si_pid() } != 0)
}

/// How a deadline-bounded child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The process exited by itself with this status.
    Exited(ExitStatus),
    /// The deadline passed; the process group was killed.
    TimedOut,
}

/// A child process that leads its own process group, killed with its group on drop.
#[derive(Debug)]
pub struct GroupChild {
    child: Child,
    pgid: libc::pid_t,
    reaped: bool,
}

impl GroupChild {
    /// Starts `command` as the leader of a new process group.
    pub fn spawn(command: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        let child = command.spawn().map_err(|source| Error::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let pgid = child.id() as libc::pid_t;
        if let Ok(mut groups) = LIVE_GROUPS.lock() {
            groups.push(pgid);
        }
        Ok(GroupChild {
            child,
            pgid,
            reaped: false,
        })
    }

    /// Waits until the child exits or `timeout` passes, calling `on_tick` about every 50 ms
    /// (e.g. to copy a growing log to the terminal). On timeout the whole group is killed. In
    /// both cases every process left in the group is killed before returning. A `timeout` too
    /// large to represent (e.g. [`Duration::MAX`]) means no deadline.
    pub fn wait_with_deadline(
        &mut self,
        timeout: Duration,
        mut on_tick: impl FnMut(),
    ) -> Result<Ending> {
        let deadline = Instant::now().checked_add(timeout);
        let ending = loop {
            let exited = has_exited(self.pgid).map_err(|source| Error::Io {
                context: format!("waiting for process {}", self.pgid),
                source,
            })?;
            if exited {
                break None;
            }
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                break Some(Ending::TimedOut);
            }
            on_tick();
            thread::sleep(POLL_INTERVAL);
        };
        // The leader is not reaped yet, so the group id still names this group.
        kill_group(self.pgid);
        let status = self.reap()?;
        on_tick();
        Ok(ending.unwrap_or(Ending::Exited(status)))
    }

    fn reap(&mut self) -> Result<ExitStatus> {
        let status = self.child.wait().map_err(|source| Error::Io {
            context: format!("reaping process {}", self.pgid),
            source,
        })?;
        self.reaped = true;
        if let Ok(mut groups) = LIVE_GROUPS.lock() {
            groups.retain(|&pgid| pgid != self.pgid);
        }
        Ok(status)
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        if !self.reaped {
            kill_group(self.pgid);
            let _ = self.reap();
        }
    }
}

/// A shell-like rendering of a command, for messages.
pub fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&quote(arg));
    }
    text
}

fn quote(arg: &OsStr) -> String {
    let arg = arg.to_string_lossy();
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        arg.into_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Runs `command` with inherited stdio; fails unless it exits with status 0.
pub fn run_inherited(command: &mut Command) -> Result<()> {
    let shown = describe(command);
    let status = command.status().map_err(|source| Error::Spawn {
        program: shown.clone(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::ToolFailed {
            command: shown,
            status,
            detail: String::new(),
        })
    }
}

/// Runs `command` with stdin closed and output captured; fails (with the output in the error)
/// unless it exits with status 0.
pub fn run_captured(command: &mut Command) -> Result<Output> {
    let shown = describe(command);
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: shown.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        let mut detail = String::from_utf8_lossy(&output.stdout).into_owned();
        detail.push_str(&String::from_utf8_lossy(&output.stderr));
        Err(Error::ToolFailed {
            command: shown,
            status: output.status,
            detail,
        })
    }
}

/// Whether `program` is an executable file on `PATH`.
pub fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        let mut command = Command::new("qemu");
        command.args(["-m", "256M", "a b", "it's", ""]);
        assert_eq!(describe(&command), r"qemu -m 256M 'a b' 'it'\''s' ''");
    }

    #[test]
    fn exit_is_seen_and_reported() {
        let mut child = GroupChild::spawn(Command::new("sh").args(["-c", "exit 3"])).unwrap();
        let ending = child
            .wait_with_deadline(Duration::from_secs(20), || {})
            .unwrap();
        match ending {
            Ending::Exited(status) => assert_eq!(status.code(), Some(3)),
            Ending::TimedOut => panic!("sh did not exit"),
        }
    }

    #[test]
    fn deadline_kills_the_whole_group() {
        // The shell starts a grandchild that would outlive a kill of the shell alone.
        let dir = std::env::temp_dir().join(format!("xtask-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let start = Instant::now();
        let mut child = GroupChild::spawn(Command::new("sh").args(["-c", &script])).unwrap();
        let ending = child
            .wait_with_deadline(Duration::from_millis(500), || {})
            .unwrap();
        assert_eq!(ending, Ending::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(10));
        let grandchild: libc::pid_t = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is not our child, so it may linger as a zombie for a moment until init
        // reaps it; signal 0 tells whether it still exists, /proc whether it is a zombie.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat"));
            let gone_or_zombie = match stat {
                Err(_) => true,
                Ok(stat) => stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z'),
            };
            if gone_or_zombie {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} survived the group kill"
            );
            thread::sleep(Duration::from_millis(20));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn captured_failure_carries_the_output() {
        let err =
            run_captured(Command::new("sh").args(["-c", "echo oops >&2; exit 1"])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn finds_sh_on_path() {
        assert!(on_path("sh"));
        assert!(!on_path("no-such-program-xtask-test"));
    }
}
