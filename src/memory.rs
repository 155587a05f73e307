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
