//! Memory the process has freed, given back to the system.
//!
//! The binary's allocator is mimalloc (`src/main.rs`). By default it gives a freed page
//! back to the system a second after it was freed, and only when the process next
//! allocates. A server that goes quiet after a burst (its start's replay, the activity
//! counters' first pass over the log, a snapshot) keeps those pages as resident memory
//! until traffic comes: about 30 MB on a million-product server (`docs/benchmarks.md`).
//! Once a server has started, it gives back what the start freed ([`return_freed`]) and
//! asks for each page to go back as soon as it is freed ([`return_at_once`]); the status
//! endpoint's latency beside appends and the appends' rate measured the same with it.

use libmimalloc_sys::{mi_option_set, mi_option_t};

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`, the same number in its versions
/// 2 and 3; the sys crate names no constant for it): milliseconds before a freed page is
/// given back, 1000 by default. A test checks that this number reads that default.
const PURGE_DELAY: mi_option_t = 15;

/// From now on, pages the allocator frees go back to the system at once.
pub fn return_at_once() {
    // SAFETY: setting an option takes no pointer and may be done at any time.
    unsafe { mi_option_set(PURGE_DELAY, 0) }
}

/// Gives back to the system the pages the allocator holds that no allocation uses: the
/// calling thread's empty pages, and every free page of the process's arenas. Cheap (it
/// visits page lists and bitmaps, not memory). Under another global allocator (the test
/// binaries') it finds nothing to give.
pub fn return_freed() {
    // SAFETY: `mi_collect` takes no pointer and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(test)]
mod tests {
    fn purge_delay_ms() -> i64 {
        // SAFETY: reading an option takes no pointer.
        unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) as i64 }
    }

    /// The option number is mimalloc's purge delay: it reads mimalloc's documented default
    /// (unless the environment sets it), and setting it reads back. Run in its own process
    /// state: nothing else in the library's tests sets it.
    #[test]
    fn the_purge_delay_option_is_the_one_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay_ms(), 1000);
        }
        super::return_at_once();
        assert_eq!(purge_delay_ms(), 0);
    }
}
