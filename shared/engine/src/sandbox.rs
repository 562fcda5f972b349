//! A forked child process for work on untrusted input whose memory cannot be bounded from
//! inside: chat templates, which minijinja lets materialize some values (a list concatenated
//! with itself dozens of times, a huge lazy list turned into a string) before it charges fuel
//! for them. The child's address space may grow by a fixed amount, and the parent stops waiting
//! when the child has not answered a request in a while, so the worst such work can do is fail
//! with an error: it can neither take the serving process's memory nor hang it.
//!
//! The child ([`Worker`]) is forked once and serves request after request until one fails:
//! forking copies the page tables of the process's private memory (measured ~30 ms per GB), and
//! every page the parent writes afterwards faults once. Forked for each chat request, that was
//! a quarter of `llm serve`'s time under the demo model's load. Big buffers that the child never
//! reads are left out of it ([`exclude_from_children`]).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::time::Duration;

/// What a child may use.
#[derive(Clone, Copy)]
pub struct Limits {
    /// Bytes by which the child's address space may grow beyond the parent's.
    pub memory: u64,
    /// How long the parent waits for the child's answer to a request before killing it.
    pub silence: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("could not start a child process: {0}")]
    Start(io::Error),
    #[error("stopped after {0:?} without an answer")]
    Silent(Duration),
    #[error("aborted by signal {signal}: most likely it needed more than {mib} MiB of memory")]
    Aborted { signal: i32, mib: u64 },
    #[error("failed with exit status {0}")]
    Failed(i32),
}

/// A child process that runs requests of bounded work, one at a time, forked when the first
/// comes and again after one fails (the failed child is killed).
pub struct Worker {
    limits: Limits,
    child: Mutex<Option<Child>>,
}

/// A running worker child and this process's end of the socket to it.
struct Child {
    pid: libc::pid_t,
    socket: File,
}

impl Worker {
    pub const fn new(limits: Limits) -> Self {
        Self { limits, child: Mutex::new(None) }
    }

    /// Hands `request` to the child and returns what it wrote for it. The child, when this call
    /// forks it, answers this and later requests with `serve`: it must not need locks that other
    /// threads of this process may hold (only the forking thread lives on in the child);
    /// allocating is fine (glibc's malloc is made consistent across fork). A child that fails
    /// (an error or panic in `serve`, a limit) is gone, and the next call forks a fresh one; so
    /// does this call when the child it finds died while idle (killed from outside).
    pub fn call(&self, request: &[u8], serve: impl Fn(&[u8], &mut dyn Write) -> io::Result<()>) -> Result<Vec<u8>, SandboxError> {
        let length = u32::try_from(request.len()).map_err(|_| SandboxError::Start(io::Error::other("a request of 4 GiB or more")))?;
        let mut slot = self.child.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            let forked = slot.is_none();
            if forked {
                *slot = Some(Child::fork(&self.limits, &serve)?);
            }
            let child = slot.as_mut().expect("forked above");
            if let Err(e) = child.send(length, request) {
                slot.take().expect("a child took the request").stop();
                match forked {
                    true => return Err(SandboxError::Start(e)),
                    false => continue,
                }
            }
            let silent = match child.receive(self.limits.silence) {
                Ok(reply) => return Ok(reply),
                Err(silent) => silent,
            };
            let status = slot.take().expect("a child ran the request").stop();
            return Err(match (silent, libc::WIFSIGNALED(status)) {
                (true, _) => SandboxError::Silent(self.limits.silence),
                (false, true) => SandboxError::Aborted { signal: libc::WTERMSIG(status), mib: self.limits.memory >> 20 },
                (false, false) => SandboxError::Failed(libc::WEXITSTATUS(status)),
            });
        }
    }
}

/// A copy forks a child of its own.
impl Clone for Worker {
    fn clone(&self) -> Self {
        Self::new(self.limits)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(child) = self.child.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()).take() {
            child.stop();
        }
    }
}

impl Child {
    fn fork(limits: &Limits, serve: &impl Fn(&[u8], &mut dyn Write) -> io::Result<()>) -> Result<Self, SandboxError> {
        let (ours, theirs) = socket_pair().map_err(SandboxError::Start)?;
        // SAFETY: the child serves requests and leaves with `_exit`: it never returns into the
        // frames it shares with this thread.
        match unsafe { libc::fork() } {
            -1 => Err(SandboxError::Start(io::Error::last_os_error())),
            0 => child(limits.memory, theirs.into_raw_fd(), serve),
            pid => Ok(Self { pid, socket: File::from(ours) }),
        }
    }

    /// Sends a request of `length` bytes. With `MSG_NOSIGNAL`: a child that died makes this an
    /// error, not a SIGPIPE, which would end a process that does not ignore it (a fuzzer's).
    fn send(&mut self, length: u32, request: &[u8]) -> io::Result<()> {
        for mut bytes in [&length.to_le_bytes()[..], request] {
            while !bytes.is_empty() {
                // SAFETY: `bytes` is valid for its length; the socket is ours.
                match unsafe { libc::send(self.socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) } {
                    -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
                    -1 => return Err(io::Error::last_os_error()),
                    sent => bytes = &bytes[sent as usize..],
                }
            }
        }
        Ok(())
    }

    /// The child's reply; or, when it ended first, whether because it stayed silent for
    /// `silence` (`true`) rather than closed its end.
    fn receive(&mut self, silence: Duration) -> Result<Vec<u8>, bool> {
        let mut length = [0u8; 4];
        read_exact_or_silence(&mut self.socket, &mut length, silence)?;
        let mut reply = vec![0u8; u32::from_le_bytes(length) as usize];
        read_exact_or_silence(&mut self.socket, &mut reply, silence)?;
        Ok(reply)
    }

    /// Kills the child (if it has not ended) and returns its wait status.
    fn stop(self) -> i32 {
        // SAFETY: `pid` is our child and has not been waited for, so it is not reused yet.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        wait(self.pid)
    }
}

/// Leaves `bytes` out of every child forked from now on (Linux's `MADV_DONTFORK`), for buffers
/// that only this process reads, like a model's weights. Only buffers of their own mapping are
/// marked ([`crate::memory::own_pages`]): a mark on part of the heap would stay there after the
/// buffer is freed, and a child's malloc could then touch an unmapped page.
pub fn exclude_from_children(bytes: &[u8]) {
    let Some(pages) = crate::memory::own_pages(bytes, page_size() as usize) else { return };
    // SAFETY: the range is whole pages of this process's memory; the advice changes only what
    // children inherit. Failing is harmless (forks just cost more).
    unsafe { libc::madvise(pages.as_ptr() as *mut libc::c_void, pages.len(), libc::MADV_DONTFORK) };
}

/// The child's life: requests (a little-endian u32 length, then the bytes) on `socket`
/// answered in turn (the same), until the parent closes its end or one fails.
fn child(memory: u64, socket: RawFd, serve: &impl Fn(&[u8], &mut dyn Write) -> io::Result<()>) -> ! {
    /// Where the socket goes: the first descriptor after the standard ones.
    const SOCKET: RawFd = 3;
    // SAFETY: plain system calls on this process's own descriptors. Everything it inherited
    // but the standard ones and its socket is closed: a server's connection whose descriptor
    // a long-lived child held open would never be shut, and another child's socket would not
    // see that child end (so children may be forked at once, from any thread).
    let socket = unsafe {
        // Rust reports a failed allocation on stderr before aborting; the parent reports it.
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, libc::STDERR_FILENO);
        }
        if socket != SOCKET {
            libc::dup2(socket, SOCKET);
        }
        close_from(SOCKET + 1);
        File::from_raw_fd(SOCKET)
    };
    let mut requests = &socket;
    let mut replies = io::BufWriter::new(&socket);
    let code = match limit_address_space(memory) {
        Err(_) => 3,
        Ok(()) => loop {
            let mut length = [0u8; 4];
            if requests.read_exact(&mut length).is_err() {
                break 0;
            }
            let mut request = vec![0u8; u32::from_le_bytes(length) as usize];
            if requests.read_exact(&mut request).is_err() {
                break 0;
            }
            let mut reply = Vec::new();
            match std::panic::catch_unwind(AssertUnwindSafe(|| serve(&request, &mut reply))) {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break 1,
                Err(_) => break 2,
            }
            let sent = replies.write_all(&(reply.len() as u32).to_le_bytes()).and_then(|()| replies.write_all(&reply)).and_then(|()| replies.flush());
            if sent.is_err() {
                break 1;
            }
        },
    };
    // SAFETY: ends the child without running anything of the parent's (no atexit, no unwinding).
    unsafe { libc::_exit(code) }
}

/// Closes every descriptor from `first` on: the `close_range` system call (Linux 5.9), called
/// directly because glibc wraps it only from 2.34 and cargo-lambda links against an older one;
/// else each descriptor `/proc/self/fd` lists.
fn close_from(first: RawFd) {
    // SAFETY: closes descriptors of this process only; no memory is passed.
    if unsafe { libc::syscall(libc::SYS_close_range, first as libc::c_uint, libc::c_uint::MAX, 0) } == 0 {
        return;
    }
    let open: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(entries) => entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok()).filter(|&fd| fd >= first).collect(),
        Err(_) => return,
    };
    for fd in open {
        // SAFETY: as above; the directory's own descriptor is already closed, so at worst
        // this closes a number no longer open.
        unsafe { libc::close(fd) };
    }
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

/// Two connected ends of a Unix stream socket: requests and replies both ways on one.
fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors socketpair writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just opened and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Fills `buffer` from the child; or, when it closes its end first, `false`, and when it stays
/// silent for `silence`, `true`.
fn read_exact_or_silence(file: &mut File, buffer: &mut [u8], silence: Duration) -> Result<(), bool> {
    let mut filled = 0;
    while filled < buffer.len() {
        let mut poll = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut poll, 1, silence.as_millis().min(i32::MAX as u128) as i32) } {
            0 => return Err(true),
            -1 if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            -1 => return Err(false),
            _ => {}
        }
        match file.read(&mut buffer[filled..]) {
            Ok(0) => return Err(false),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(false),
        }
    }
    Ok(())
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

    /// The child's process id, as `serve` writes it.
    fn pid(reply: Vec<u8>) -> u32 {
        u32::from_le_bytes(reply[..4].try_into().unwrap())
    }

    #[test]
    fn one_child_answers_request_after_request_in_full() {
        let worker = Worker::new(LIMITS);
        let serve = |request: &[u8], out: &mut dyn Write| {
            out.write_all(&std::process::id().to_le_bytes())?;
            out.write_all(&request.repeat(3 << 20))
        };
        let (first, second) = (worker.call(b"a", serve).unwrap(), worker.call(b"b", serve).unwrap());
        assert_eq!((&first[4..], &second[4..]), (&vec![b'a'; 3 << 20][..], &vec![b'b'; 3 << 20][..]));
        assert_eq!(pid(first.clone()), pid(second));
        assert_ne!(pid(first), std::process::id());
    }

    #[test]
    fn a_child_that_allocates_past_its_limit_is_an_error_and_the_next_request_gets_a_new_one() {
        let worker = Worker::new(LIMITS);
        let serve = |request: &[u8], out: &mut dyn Write| {
            if request == b"hoard" {
                let hoard = vec![1u8; 256 << 20];
                out.write_all(&hoard[..1])?;
            }
            out.write_all(&std::process::id().to_le_bytes())
        };
        let before = pid(worker.call(b"", serve).unwrap());
        let error = worker.call(b"hoard", serve).unwrap_err();
        assert!(matches!(error, SandboxError::Aborted { mib: 64, .. }), "{error}");
        assert_ne!(pid(worker.call(b"", serve).unwrap()), before);
    }

    #[test]
    fn a_child_killed_while_idle_is_replaced_for_the_next_request() {
        let worker = Worker::new(LIMITS);
        let serve = |_: &[u8], out: &mut dyn Write| out.write_all(&std::process::id().to_le_bytes());
        let first = pid(worker.call(b"", serve).unwrap());
        // SAFETY: signals our own worker's child.
        unsafe { libc::kill(first as libc::pid_t, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(50));
        assert_ne!(pid(worker.call(b"", serve).unwrap()), first);
    }

    #[test]
    fn the_child_keeps_none_of_this_processs_descriptors_but_its_own() {
        let (socket, _other_end) = socket_pair().unwrap();
        // Numbered above 3, which the child gives its own socket: a process that starts with
        // nothing open past the standard descriptors would get 3 for `socket` itself.
        // SAFETY: duplicates a descriptor this test owns.
        let fd = unsafe { libc::fcntl(socket.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 64) };
        assert!(fd >= 64, "{}", io::Error::last_os_error());
        // SAFETY: `fd` is the open copy just made, owned by nothing else.
        let _kept = unsafe { OwnedFd::from_raw_fd(fd) };
        let open_in_child = Worker::new(LIMITS)
            .call(b"", |_, out| {
                // SAFETY: asks about a descriptor number; no memory is passed.
                let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1;
                out.write_all(&[open as u8])
            })
            .unwrap();
        assert_eq!(open_in_child, [0]);
    }

    #[test]
    fn a_silent_child_is_killed() {
        let worker = Worker::new(LIMITS);
        let error = worker
            .call(b"", |_, _| {
                std::thread::sleep(Duration::from_secs(60));
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(error, SandboxError::Silent(_)), "{error}");
    }

    #[test]
    fn a_child_that_panics_or_fails_to_write_fails() {
        let worker = Worker::new(LIMITS);
        assert!(matches!(worker.call(b"", |_, _| panic!("inside the child")), Err(SandboxError::Failed(2))));
        assert!(matches!(worker.call(b"", |_, _| Err(io::Error::other("no"))), Err(SandboxError::Failed(1))));
    }

    #[test]
    fn excluded_buffers_are_not_in_children() {
        let weights = vec![3u8; 80 << 20];
        exclude_from_children(&weights);
        // The middle of the buffer is unmapped in the child: reading it there faults.
        let middle = weights.as_ptr() as usize + (40 << 20);
        let error = Worker::new(LIMITS)
            .call(b"", |_, out| {
                // SAFETY: in the parent this is inside `weights`; the child is meant to fault here.
                let byte = unsafe { std::ptr::read_volatile(middle as *const u8) };
                out.write_all(&[byte])
            })
            .unwrap_err();
        assert!(matches!(error, SandboxError::Aborted { signal: libc::SIGSEGV, .. }), "{error}");
        assert_eq!(weights[40 << 20], 3);
    }
}
