//! Memory the process has freed, given back to the system.
//!
//! The binary's allocator is mimalloc (`src/main.rs`). It returns freed pages to the
//! system lazily, on a later allocation once they have been free for a second. A server
//! that goes quiet after a burst (its start's replay, the activity counters' first pass,
//! a snapshot) would keep them as resident memory until traffic came. So a server gives
//! back what its start freed, and every [`RETURN_EVERY`] what it freed since: about 6 MB
//! on a million-product server. Giving each page back as soon as it is freed (mimalloc's
//! purge delay at 0) kept up to 20 MB more off, but made the status endpoint's p99 43 to
//! 55 ms, not 9 to 13, while the activity counters' first pass ran (`docs/benchmarks.md`).

use std::time::Duration;

/// How often a running server gives its freed memory back ([`return_freed`]).
pub const RETURN_EVERY: Duration = Duration::from_secs(10);

/// Gives back to the system the calling thread's empty pages and the arenas' free ranges
/// (system calls that decommit them); pages other threads still hold go back once those
/// threads release them. Run off the async runtime's threads: it may take a while. Under
/// another global allocator (the test binaries') it finds nothing to give.
pub fn return_freed() {
    // SAFETY: `mi_collect` takes no pointer and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// For a command that runs once over the whole log and exits (`audit`, `report`,
/// `export`, `verify`): freed pages stay with the process until it ends, rather than go
/// back to the system a second after they are freed. A fold frees read buffers and
/// batches all along; given back, their room came back as fresh pages the kernel had to
/// zero again (a ten-million-event audit took 4,340 to 7,348 page faults, 1,117 to 1,157
/// without; `docs/benchmarks.md`). The peak is the model's either way. Call it before any
/// other thread starts; it overrides `MIMALLOC_PURGE_DELAY`. Under another global
/// allocator it changes nothing.
pub fn keep_freed_until_exit() {
    // SAFETY: `mi_option_set` takes no pointer. It writes the option without
    // synchronisation, so it is called while this is the process's only thread; mimalloc
    // reads the option afresh each time it would purge, and -1 turns purging off.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) }
}

/// mimalloc 3's `mi_option_purge_delay` (milliseconds; -1: never), which the bindings do
/// not name. The test below holds the number to that option's default of 1000.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(test)]
mod tests {
    #[test]
    fn purge_delay_is_the_option_of_that_name() {
        // No other option of mimalloc 3 defaults to 1000 (`src/options.c` of the
        // vendored C source; mimalloc 2's purge delay defaulted to 10). Fails too if the
        // test runs with `MIMALLOC_PURGE_DELAY` set.
        // SAFETY: `mi_option_get` takes no pointer.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) },
            1000
        );
    }
}
