//! How long a group commit waits for more requests once it has its first: one rule,
//! used by both backends' writers (`sled/writer.rs`, `postgres.rs`). A pure decision: the
//! writers do the waiting.

use std::time::Duration;

/// How long a round waits, once it has its first request, for more to join it.
///
/// Callers that append again as soon as they are answered (a pipeline stage, a closed
/// loop of appenders) come back a few dozen microseconds after their answer. A round
/// that took only those queued at that moment would carry a part of them, the next round
/// the rest, and the callers would settle into two cohorts, each paying for a sync. So a
/// round waits until it holds as many requests as the last round answered, for at most
/// [`Gather::wait`].
///
/// That wait is learnt from what waiting brought. A round that got as many as it expected
/// doubles it (from [`Gather::MIN_WAIT`]), up to as long as the last sync took (waiting
/// longer would cost more than the sync it saves) and never more than
/// [`Gather::MAX_WAIT`]. A round whose wait ran out short of them halves it (below
/// `MIN_WAIT`, to nothing): callers that come back only after other work (the publisher,
/// between a file's copy and its next event) are not waited for round after round, each
/// wait added to every append. (A round cut short by the commit limit with fewer requests
/// than expected counts as short too: a rare case that costs half a wait.)
///
/// The sled writer waits on its channel to the microsecond. The PostgreSQL writer task
/// waits with tokio's timer, which rounds a wait up to its next 1 ms tick: there a wait
/// can reach 2 ms, beside a `COMMIT` of a few milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gather {
    /// Requests the last round answered.
    pub expect: usize,
    /// The longest the next round waits: learnt, never above the last sync's duration
    /// or `MAX_WAIT`.
    pub wait: Duration,
}

impl Gather {
    pub const MAX_WAIT: Duration = Duration::from_millis(1);

    /// Where a wait that paid off grows from.
    pub const MIN_WAIT: Duration = Duration::from_micros(20);

    pub const START: Gather = Gather {
        expect: 0,
        wait: Duration::ZERO,
    };

    /// How much longer a round holding `held` requests, `waited` after its first, waits
    /// for another; `None` when it goes ahead.
    pub fn wait_for_more(&self, held: usize, waited: Duration) -> Option<Duration> {
        (held < self.expect && waited < self.wait).then(|| self.wait - waited)
    }

    /// After a round that answered `held` requests and whose sync took `synced` (`None`
    /// when it wrote nothing, so did not sync).
    pub fn after(self, held: usize, synced: Option<Duration>) -> Gather {
        let Some(synced) = synced else {
            return Gather {
                expect: held,
                wait: self.wait,
            };
        };
        let wait = if held < self.expect {
            // Below the least a wait grows from, not worth waiting at all.
            Some(self.wait / 2).filter(|w| *w >= Self::MIN_WAIT)
        } else {
            Some((self.wait * 2).max(Self::MIN_WAIT))
        };
        Gather {
            expect: held,
            wait: wait.map_or(Duration::ZERO, |w| w.min(synced).min(Self::MAX_WAIT)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    /// `g` after `n` rounds of `held` requests, each synced in `synced`.
    fn rounds(mut g: Gather, n: usize, held: usize, synced: Duration) -> Gather {
        for _ in 0..n {
            g = g.after(held, Some(synced));
        }
        g
    }

    #[test]
    fn a_round_waits_for_as_many_as_the_last_answered_for_at_most_the_last_sync() {
        // Waits that pay off double from 20 us up to the sync's duration.
        let waits: Vec<Duration> = (1..=7)
            .map(|n| rounds(Gather::START, n, 64, 500 * US).wait)
            .collect();
        assert_eq!(
            waits,
            [20, 40, 80, 160, 320, 500, 500].map(|us| us * US).to_vec()
        );
        let g = rounds(Gather::START, 6, 64, 500 * US);
        assert_eq!(g.wait_for_more(1, Duration::ZERO), Some(500 * US));
        assert_eq!(g.wait_for_more(63, 200 * US), Some(300 * US));
        assert_eq!(
            g.wait_for_more(64, Duration::ZERO),
            None,
            "as many as expected"
        );
        assert_eq!(g.wait_for_more(10, 500 * US), None, "waited a sync's time");
        assert_eq!(g.wait_for_more(10, 900 * US), None);
    }

    #[test]
    fn a_wait_that_runs_out_short_is_halved_and_callers_that_come_back_late_are_not_waited_for() {
        let g = rounds(Gather::START, 8, 16, 800 * US);
        assert_eq!(g.wait, 800 * US);
        // The round expected 16 and its wait ran out with 6.
        let short = g.after(6, Some(800 * US));
        assert_eq!(
            short,
            Gather {
                expect: 6,
                wait: 400 * US
            }
        );
        // Callers busy elsewhere between appends: rounds keep coming up short, and the
        // wait added to each of their appends shrinks to nothing.
        let mut g = short;
        for held in [5, 4, 3, 5, 4, 3, 2, 1] {
            g = g.after(held, Some(800 * US));
        }
        // Seven of those eight rounds came up short: under 20 us a wait is not worth it.
        assert_eq!(g.wait, Duration::ZERO);
        // A round that gets what it expected lets the wait grow again.
        let g = g.after(1, Some(800 * US)).after(4, Some(800 * US));
        assert!(g.wait >= Gather::MIN_WAIT, "{:?}", g.wait);
    }

    #[test]
    fn the_first_round_and_one_after_a_lone_caller_do_not_wait() {
        assert_eq!(Gather::START.wait_for_more(1, Duration::ZERO), None);
        let g = Gather::START.after(1, Some(400 * US));
        assert_eq!(g.wait_for_more(1, Duration::ZERO), None);
    }

    #[test]
    fn a_slow_disk_bounds_the_wait_and_a_round_without_a_sync_keeps_the_last() {
        let slow = rounds(Gather::START, 12, 8, Duration::from_millis(30));
        assert_eq!(slow.wait, Gather::MAX_WAIT);
        let refused = slow.after(3, None);
        assert_eq!(
            refused,
            Gather {
                expect: 3,
                wait: Gather::MAX_WAIT
            }
        );
        // Callers that did not come back are not waited for again: the next round expects
        // only as many as this one held.
        let lone = rounds(Gather::START, 8, 64, 500 * US).after(1, Some(500 * US));
        assert_eq!(lone.wait_for_more(1, Duration::ZERO), None);
    }
}
