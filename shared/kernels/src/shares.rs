//! How a product's work items (groups of weight rows) are split over the compute pool: each
//! thread takes a contiguous share of them, front to back, and a thread whose share is done
//! takes the back half of what is left of another's as its own share.
//!
//! A decode step's product streams its weights from memory, and a stream reads fastest long and
//! in order: its tiles ask for the bytes ahead of them ([`crate::x86`]'s `prefetch_ahead`), so
//! each new start reads its first bytes cold, and two threads that take items in turn ask for
//! each other's. candle's `execute_chunked`, which this replaced for the products, handed out
//! eight chunks a thread in turn. AMD Zen 5, two threads, whole model (`llm bench`, four rounds
//! in turn), decode tok/s, `execute_chunked` → shares: TinyLlama-shape Q8_0 34.0–51.9 →
//! 40.4–58.6, Q4_0 65.8–79.4 → 72.4–90.2, Llama 3.2 1B-shape Q4_K_M 53.6–73.9 → 55.8–82.7 (the
//! VM's memory ran at two speeds in turn; in each pair the shares were faster). One share a
//! thread and no taking from others did as well here, but a thread held up (by another process,
//! or a slower core) would hold up the whole product. One item at a time from a shared counter
//! was much slower (Q4_0 42.3–53.1, Q8_0 31.8–32.9).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// `f(item)` for each of `0..items`, once, on the compute pool ([`crate::pool`]). A thread leaves
/// only when every share is empty or its owner is still at work (only an owner adds to its
/// share), so the last to leave has seen all done, whichever threads joined.
pub(crate) fn in_shares(items: usize, f: impl Fn(usize) + Sync) {
    if items == 0 {
        // No pool job: woken for nothing (a list of products with no float ones), the pool
        // cost a quantized model's every layer a job.
        return;
    }
    let threads = crate::pool::threads();
    let shares: Vec<Share> = (0..threads).map(|t| Share::new(items * t / threads..items * (t + 1) / threads)).collect();
    crate::pool::run(&|t| loop {
        while let Some(item) = shares[t].take_front() {
            f(item);
        }
        match (1..threads).find_map(|k| shares[(t + k) % threads].take_back_half()) {
            // No thread takes from an empty share, so only `t` touches this one until the store.
            Some(taken) => shares[t].0.store(pack(taken), Ordering::Release),
            None => break,
        }
    });
}

/// The items of a share not yet taken, in one word, so that its owner (at the front) and
/// another thread (at the back) never take the same one. A cache line each: an owner's updates
/// do not slow the others'.
#[repr(align(64))]
struct Share(AtomicU64);

impl Share {
    fn new(items: Range<usize>) -> Self {
        Self(AtomicU64::new(pack(items)))
    }

    fn take_front(&self) -> Option<usize> {
        self.take(|items| (items.start + 1..items.end, items.start..items.start + 1)).map(|taken| taken.start)
    }

    /// The back half of the items left (the last one, if only one is).
    fn take_back_half(&self) -> Option<Range<usize>> {
        self.take(|items| {
            let middle = items.end - items.len().div_ceil(2);
            (items.start..middle, middle..items.end)
        })
    }

    /// Splits the items left, unless there are none, into those that stay and those taken.
    fn take(&self, split: impl Fn(Range<usize>) -> (Range<usize>, Range<usize>)) -> Option<Range<usize>> {
        let mut word = self.0.load(Ordering::Acquire);
        loop {
            let items = unpack(word);
            if items.is_empty() {
                return None;
            }
            let (left, taken) = split(items);
            match self.0.compare_exchange_weak(word, pack(left), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(taken),
                Err(now) => word = now,
            }
        }
    }
}

fn pack(items: Range<usize>) -> u64 {
    let half = |n: usize| u64::from(u32::try_from(n).expect("fewer than 2³² work items"));
    half(items.start) << 32 | half(items.end)
}

fn unpack(word: u64) -> Range<usize> {
    (word >> 32) as usize..word as u32 as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_item_is_done_once() {
        for items in [0, 1, 2, 3, 7, 64, 1001] {
            let done: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            in_shares(items, |item| {
                // Items that take longer, so that threads finish apart and take from each other.
                if item % 5 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                done[item].fetch_add(1, Ordering::Relaxed);
            });
            assert!(done.iter().all(|d| d.load(Ordering::Relaxed) == 1), "{items} items");
        }
    }

    #[test]
    fn a_share_is_taken_from_both_ends_once() {
        let share = Share::new(3..10);
        assert_eq!(share.take_front(), Some(3));
        assert_eq!(share.take_back_half(), Some(7..10));
        assert_eq!(share.take_front(), Some(4));
        assert_eq!(share.take_back_half(), Some(6..7));
        assert_eq!(share.take_front(), Some(5));
        assert_eq!(share.take_back_half(), None);
        assert_eq!(share.take_front(), None);
        let last = Share::new(5..6);
        assert_eq!(last.take_back_half(), Some(5..6));
        assert_eq!(last.take_front(), None);
    }
}
