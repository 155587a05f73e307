//! How long a group commit waits for more requests once it has its first: one rule,
//! used by both backends' writers (`sled/writer.rs`, `postgres.rs`). A pure decision: the
//! writers do the waiting.

use std::time::Duration;

/// How long a round waits, once it has its first request, for more to join it.
///
/// Callers that append again as soon as they are answered (a pipeline stage, the
/// publisher's workers) come back a few dozen microseconds after their answer. A round
/// that took only those queued at that moment would carry a part of them, the next round
/// the rest, and the callers would settle into two cohorts, each paying for a sync. So a
/// round waits until it holds as many requests as the last round answered, for at most as
/// long as the last sync took (waiting longer would cost more than the sync it saves) and
/// never more than [`Gather::MAX_WAIT`]. Callers that do not come back cost one such wait,
/// once: the next round expects only as many as this one held.
///
/// The sled writer waits on its channel to the microsecond. The PostgreSQL writer task
/// waits with tokio's timer, which rounds a wait up to its next 1 ms tick: there a wait
/// can reach 2 ms, beside a `COMMIT` of a few milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gather {
    /// Requests the last round answered.
    pub expect: usize,
    /// The last sync's duration, bounded by `MAX_WAIT`.
    pub wait: Duration,
}

impl Gather {
    pub const MAX_WAIT: Duration = Duration::from_millis(1);

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
        Gather {
            expect: held,
            wait: synced.map_or(self.wait, |d| d.min(Self::MAX_WAIT)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_round_waits_for_as_many_as_the_last_answered_for_at_most_the_last_sync() {
        let g = Gather::START.after(64, Some(500 * US));
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
    fn the_first_round_and_one_after_a_lone_caller_do_not_wait() {
        assert_eq!(Gather::START.wait_for_more(1, Duration::ZERO), None);
        let g = Gather::START.after(1, Some(400 * US));
        assert_eq!(g.wait_for_more(1, Duration::ZERO), None);
    }

    #[test]
    fn a_slow_disk_bounds_the_wait_and_a_round_without_a_sync_keeps_the_last() {
        let slow = Gather::START.after(8, Some(Duration::from_millis(30)));
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
        let lone = Gather::START
            .after(64, Some(500 * US))
            .after(1, Some(500 * US));
        assert_eq!(lone.wait_for_more(1, Duration::ZERO), None);
    }
}
