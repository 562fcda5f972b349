//! A forked child process for work on untrusted input whose memory cannot be bounded from
//! inside: chat templates, which minijinja lets materialize some values (a list concatenated
//! with itself dozens of times, a huge lazy list turned into a string) before it charges fuel
//! for them. The child's address space may grow by a fixed amount, and the parent stops waiting
//! when the child has written nothing for a while, so the worst such work can do is fail with an
//! error: it can neither take the serving process's memory nor hang it.
//!
//! Forking copies the page tables of the process's private memory (measured ~30 ms per GB), so
//! big buffers that children never read are left out of them ([`exclude_from_children`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;

/// What a child may use.
pub struct Limits {
    /// Bytes by which the child's address space may grow beyond the parent's.
    pub memory: u64,
    /// How long the parent waits for the child's next bytes before killing it.
    pub silence: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("could not start a child process: {0}")]
    Start(io::Error),
    #[error("stopped after {0:?} without output")]
    Silent(Duration),
    #[error("aborted by signal {signal}: most likely it needed more than {mib} MiB of memory")]
    Aborted { signal: i32, mib: u64 },
    #[error("failed with exit status {0}")]
    Failed(i32),
}

/// Children are forked one at a time: a child forked while another's pipe is open in this
/// process would hold that pipe's write end too, and its reader would not see the end of the
/// output until both children had exited.
static FORKING: Mutex<()> = Mutex::new(());

/// Runs `work` in a child process and returns what it wrote. `work` must not need locks that
/// other threads of this process may hold (only the forking thread lives on in the child);
/// allocating is fine (glibc's malloc is made consistent across fork).
pub fn run(limits: &Limits, work: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<Vec<u8>, SandboxError> {
    let (reader, pid) = {
        let _forking = FORKING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (reader, writer) = pipe().map_err(SandboxError::Start)?;
        // SAFETY: the child runs `work`, writes to its pipe and leaves with `_exit`: it never
        // returns into the frames it shares with this thread.
        match unsafe { libc::fork() } {
            -1 => return Err(SandboxError::Start(io::Error::last_os_error())),
            0 => {
                drop(reader);
                child(limits.memory, writer, work)
            }
            pid => (reader, pid),
        }
    };
    let mut output = Vec::new();
    let finished = read_to_end_or_silence(reader, &mut output, limits.silence);
    if !finished {
        // SAFETY: `pid` is our child and has not been waited for, so it is not reused yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let status = wait(pid);
    if !finished {
        return Err(SandboxError::Silent(limits.silence));
    }
    if libc::WIFSIGNALED(status) {
        return Err(SandboxError::Aborted { signal: libc::WTERMSIG(status), mib: limits.memory >> 20 });
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(output),
        code => Err(SandboxError::Failed(code)),
    }
}

/// Leaves `bytes` out of every child forked from now on (Linux's `MADV_DONTFORK`), for buffers
/// that only this process reads, like a model's weights. Only buffers of their own mapping are
/// marked (glibc maps every allocation over 32 MiB by itself): a mark on part of the heap would
/// stay there after the buffer is freed, and a child's malloc could then touch an unmapped page.
pub fn exclude_from_children(bytes: &[u8]) {
    const OWN_MAPPING: usize = 64 << 20;
    if bytes.len() < OWN_MAPPING {
        return;
    }
    let page = page_size() as usize;
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    // SAFETY: the range lies inside `bytes`, whole pages of this process's memory; the advice
    // changes only what children inherit. Failing is harmless (forks just cost more).
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTFORK) };
}

fn child(memory: u64, writer: OwnedFd, work: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> ! {
    // Rust reports a failed allocation on stderr before aborting; the parent reports it instead.
    // SAFETY: plain system calls on this process's own descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, libc::STDERR_FILENO);
        }
    }
    let code = match limit_address_space(memory) {
        Err(_) => 3,
        Ok(()) => {
            let mut out = io::BufWriter::new(File::from(writer));
            match std::panic::catch_unwind(AssertUnwindSafe(|| work(&mut out).and_then(|()| out.flush()))) {
                Ok(Ok(())) => 0,
                Ok(Err(_)) => 1,
                Err(_) => 2,
            }
        }
    };
    // SAFETY: ends the child without running anything of the parent's (no atexit, no unwinding).
    unsafe { libc::_exit(code) }
}

/// Caps the address space at its present size plus `memory`, or keeps a lower limit the process
/// already has: an allocation past it fails, and Rust aborts the child.
fn limit_address_space(memory: u64) -> io::Result<()> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm.split_whitespace().next().and_then(|s| s.parse().ok()).ok_or_else(|| io::Error::other("unreadable /proc/self/statm"))?;
    let bytes = pages * page_size() + memory;
    let mut current = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `current` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut current) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // Only lowered: raising a hard limit needs privileges.
    let limit = libc::rlimit { rlim_cur: bytes.min(current.rlim_cur), rlim_max: bytes.min(current.rlim_max) };
    // SAFETY: `limit` is a valid rlimit, its soft limit no higher than its hard one.
    match unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) } {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads until the child closes its end (true) or stays silent for `silence` (false).
fn read_to_end_or_silence(reader: OwnedFd, output: &mut Vec<u8>, silence: Duration) -> bool {
    let mut file = File::from(reader);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut poll, 1, silence.as_millis().min(i32::MAX as u128) as i32) } {
            0 => return false,
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            -1 => return false,
            _ => {}
        }
        match file.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => output.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out-pointer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } == -1 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {}
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { memory: 64 << 20, silence: Duration::from_secs(2) };

    #[test]
    fn returns_everything_the_child_writes() {
        let big = vec![7u8; 3 << 20];
        let output = run(&LIMITS, |out| out.write_all(&big)).unwrap();
        assert_eq!(output, big);
    }

    #[test]
    fn a_child_that_allocates_past_its_limit_is_an_error_not_this_processs_problem() {
        let error = run(&LIMITS, |out| {
            let hoard = vec![1u8; 256 << 20];
            out.write_all(&hoard[..1])
        })
        .unwrap_err();
        assert!(matches!(error, SandboxError::Aborted { mib: 64, .. }), "{error}");
    }

    #[test]
    fn a_silent_child_is_killed() {
        let error = run(&LIMITS, |_| {
            std::thread::sleep(Duration::from_secs(60));
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(error, SandboxError::Silent(_)), "{error}");
    }

    #[test]
    fn a_child_that_panics_or_fails_to_write_fails() {
        assert!(matches!(run(&LIMITS, |_| panic!("inside the child")), Err(SandboxError::Failed(2))));
        assert!(matches!(run(&LIMITS, |_| Err(io::Error::other("no"))), Err(SandboxError::Failed(1))));
    }

    #[test]
    fn excluded_buffers_are_not_in_children() {
        let weights = vec![3u8; 80 << 20];
        exclude_from_children(&weights);
        // The middle of the buffer is unmapped in the child: reading it there faults.
        let middle = weights.as_ptr() as usize + (40 << 20);
        let error = run(&LIMITS, |out| {
            // SAFETY: in the parent this is inside `weights`; the child is meant to fault here.
            let byte = unsafe { std::ptr::read_volatile(middle as *const u8) };
            out.write_all(&[byte])
        })
        .unwrap_err();
        assert!(matches!(error, SandboxError::Aborted { signal: libc::SIGSEGV, .. }), "{error}");
        assert_eq!(weights[40 << 20], 3);
    }
}
