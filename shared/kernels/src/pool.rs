//! The threads the kernels run on: the caller and one worker fewer than
//! `candle_core::utils::get_num_threads()` (`RAYON_NUM_THREADS`, which the engine sets).
//!
//! Unlike candle's barrier pool, which this replaces, a job does not wait for every worker to
//! check in: the job's closure must finish all the work from any one thread (each of its calls
//! runs items until none are left to take), so the caller returns once its own call has and no
//! worker is still inside one. A worker that the scheduler holds off the CPU (another process
//! on its core; more threads than CPUs) then costs what it has taken, not a scheduler's time
//! slice at every product. And a thread that waits spins only briefly, then gives its CPU to
//! whatever else may run there, then sleeps.
//!
//! Zen 5 (2 vCPUs), whole model (`llm bench`, candle's pool and this one in turn), decode tok/s:
//! - two threads, another process busy on one vCPU: TinyLlama-shape Q4_0 19.7–31.1 → 47.4–49.1
//!   (one thread: 49.0–49.6), Llama 3.2 1B-shape Q8_0 16.7–20.0 → 27.5–28.2 (26.1–27.5), Q4_K_M
//!   24.2–38.7 → 45.0–45.8 (41.4–42.1);
//! - more threads than vCPUs: three, Q4_0 3.8 → 78.7, Q8_0 4.9 → 31.4; four, 2.6 → 57.8 and
//!   3.3 → 45.0;
//! - one or two threads with the vCPUs to themselves: no different (three rounds of three models).

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The threads [`run`] runs its jobs on, the caller's included.
pub fn threads() -> usize {
    pool().workers.len() + 1
}

/// `f(thread)` on every thread of the pool free to take it (`thread` in `0..threads()`, the
/// caller's 0), until the caller's call has returned and no other is running. So any one call
/// of `f` must leave no work undone when it returns, whichever others ran. From inside a job, `f`
/// runs on the calling thread alone.
pub(crate) fn run(f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    if pool.workers.is_empty() || IN_JOB.get() {
        return f(0);
    }
    let _one_job_at_a_time = pool.caller.lock().unwrap_or_else(PoisonError::into_inner);
    let shared = pool.shared;
    // SAFETY: the last job is closed and has no worker inside ([`Close`]), so no worker reads the
    // job until the store below opens the next; the borrow of `f` ends before `run` returns, as
    // no worker is inside the job by then.
    unsafe { *shared.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)) };
    let epoch = epoch_of(shared.state.load(Ordering::Relaxed)) + 1;
    shared.state.store(epoch << EPOCH_SHIFT | OPEN, Ordering::Release);
    for worker in &pool.workers {
        worker.unpark();
    }
    IN_JOB.set(true);
    let close = Close(shared);
    f(0);
    drop(close);
}

/// `f(items)` for runs of `0..items`, each taken from a shared counter on [`run`]'s threads
/// (about eight runs a thread), for work whose items cost alike and stream no weights.
pub(crate) fn in_runs(items: usize, f: impl Fn(Range<usize>) + Sync) {
    let run_items = items.div_ceil(8 * threads()).max(1);
    let next = AtomicUsize::new(0);
    run(&|_| loop {
        let start = next.fetch_add(run_items, Ordering::Relaxed);
        if start >= items {
            break;
        }
        f(start..items.min(start + run_items));
    });
}

thread_local! {
    /// Whether this thread runs a job's `f`: always, for a worker of the pool.
    static IN_JOB: Cell<bool> = const { Cell::new(false) };
}

/// `state`'s bits: the workers inside the job, whether it is open to more, and its number.
const INSIDE: u64 = (1 << 16) - 1;
const OPEN: u64 = 1 << 16;
const EPOCH_SHIFT: u32 = 17;

fn epoch_of(state: u64) -> u64 {
    state >> EPOCH_SHIFT
}

/// How long a waiting thread spins before it yields its CPU, and how long it yields before it
/// sleeps (a worker; the caller never does). Spinning holds a CPU that a thread held off it may
/// need, sleeping costs a wake-up (a system call on both sides): between a decode step's products
/// a worker waits microseconds, between requests seconds.
const SPIN: Duration = Duration::from_micros(20);
const YIELD: Duration = Duration::from_millis(2);

struct Pool {
    shared: &'static Shared,
    workers: Vec<Thread>,
    caller: Mutex<()>,
}

struct Shared {
    state: AtomicU64,
    /// The open job's `f`: written by the caller only while no worker is inside or can enter.
    job: UnsafeCell<Option<&'static (dyn Fn(usize) + Sync)>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `job` is written only while no worker reads it (see `run`).
unsafe impl Sync for Shared {}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared { state: AtomicU64::new(0), job: UnsafeCell::new(None), panic: Mutex::new(None) }));
        // The count of workers inside a job has 16 bits.
        let workers = (1..candle_core::utils::get_num_threads().min(INSIDE as usize + 1))
            .map(|index| {
                let worker = std::thread::Builder::new().name(format!("llm-kernels-{index}")).spawn(move || work(shared, index));
                worker.expect("cannot start a compute thread").thread().clone()
            })
            .collect();
        Pool { shared, workers, caller: Mutex::new(()) }
    })
}

/// A worker's life: each job it sees open, it enters, runs and leaves.
fn work(shared: &'static Shared, index: usize) {
    IN_JOB.set(true);
    let mut seen = 0;
    loop {
        seen = epoch_of(wait(true, || Some(shared.state.load(Ordering::Acquire)).filter(|s| epoch_of(*s) != seen)));
        if !enter(shared, seen) {
            continue;
        }
        // SAFETY: the job is open and this worker inside it, so `job` is this job's `f`, whose
        // caller waits for this worker to leave.
        let f = unsafe { (*shared.job.get()).expect("an open job has its f") };
        if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(index))) {
            shared.panic.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(payload);
        }
        shared.state.fetch_sub(1, Ordering::Release);
    }
}

/// Counts this worker inside job `epoch`, if it is still open.
fn enter(shared: &Shared, epoch: u64) -> bool {
    let mut state = shared.state.load(Ordering::Acquire);
    while epoch_of(state) == epoch && state & OPEN != 0 {
        match shared.state.compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => state = now,
        }
    }
    false
}

/// Closes the job to workers not yet inside, and waits for those inside to leave: when the
/// caller's `f` has returned, or while it unwinds. A worker's panic is then the caller's.
struct Close(&'static Shared);

impl Drop for Close {
    fn drop(&mut self) {
        IN_JOB.set(false);
        self.0.state.fetch_and(!OPEN, Ordering::AcqRel);
        // Acquire: the workers' writes happen before their leaving.
        wait(false, || Some(()).filter(|_| self.0.state.load(Ordering::Acquire) & INSIDE == 0));
        // SAFETY: closed, with no worker inside: none reads `job` until the next job opens.
        unsafe { *self.0.job.get() = None };
        let panic = self.0.panic.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(payload) = panic.filter(|_| !std::thread::panicking()) {
            std::panic::resume_unwind(payload);
        }
    }
}

/// Waits for `ready` to give a value: spinning, then yielding, then (if `may_sleep`) parked
/// until unparked.
fn wait<T>(may_sleep: bool, ready: impl Fn() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        // A few checks between readings of the clock.
        for _ in 0..64 {
            if let Some(value) = ready() {
                return value;
            }
            std::hint::spin_loop();
        }
        match started.elapsed() {
            waited if waited < SPIN => {}
            waited if waited < YIELD || !may_sleep => std::thread::yield_now(),
            // An unpark between the check above and this park makes it return at once.
            _ => std::thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_every_item_once() {
        for items in [0, 1, 5, 100, 1001] {
            let done: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            in_runs(items, |run| run.for_each(|i| _ = done[i].fetch_add(1, Ordering::Relaxed)));
            assert!(done.iter().all(|d| d.load(Ordering::Relaxed) == 1), "{items} items");
        }
    }

    #[test]
    fn a_workers_panic_reaches_the_caller_and_the_pool_goes_on() {
        let entered = std::sync::atomic::AtomicBool::new(false);
        let caught = std::panic::catch_unwind(|| {
            run(&|thread| match thread {
                // The job stays open until a worker has entered it.
                0 => {
                    while threads() > 1 && !entered.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                }
                _ => {
                    entered.store(true, Ordering::Release);
                    panic!("worker {thread} fails");
                }
            })
        });
        assert_eq!(caught.is_err(), threads() > 1);
        let ran = AtomicUsize::new(0);
        in_runs(10, |run| _ = ran.fetch_add(run.len(), Ordering::Relaxed));
        assert_eq!(ran.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_job_from_inside_a_job_runs_inline() {
        let inner = AtomicUsize::new(0);
        in_runs(4, |outer| {
            for _ in outer {
                in_runs(3, |run| _ = inner.fetch_add(run.len(), Ordering::Relaxed));
            }
        });
        assert_eq!(inner.load(Ordering::Relaxed), 12);
    }
}
