//! The publisher's decisions: pure functions of a product's state (folded from its
//! stream), a command and a clock, returning the events to append or the reason not to.
//! No file is touched and nothing is appended here; `Publisher` does that around them.

use std::path::{Path, PathBuf};

use super::{PublishError, Trigger, type_dir};
use crate::config::Backoff;
use crate::events::catalogue::{
    ProductFinalized, ProductRegistered, PublishFailed, PublishStarted, PublishSucceeded,
    RetryRequested,
};
use crate::events::record::{format_time, micros_to_datetime};
use crate::pipeline::moves::MoveError;
use crate::projections::product::{ProductEvent, ProductState, ProductStatus, truncate_error};

/// What the decisions need to know of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    pub products_root: &'a Path,
    pub max_attempts: u32,
    pub backoff: &'a Backoff,
}

impl Policy<'static> {
    /// For decisions that need no configuration (registration).
    pub fn unused() -> Self {
        static NONE: Backoff = Backoff::none();
        Policy {
            products_root: Path::new(""),
            max_attempts: 0,
            backoff: &NONE,
        }
    }
}

/// A command for one product.
// One command per request, moved once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Command {
    /// Record a staged product; `existing` is the stream's registration when it has one.
    Register {
        event: ProductRegistered,
        existing: Option<ProductRegistered>,
    },
    /// Set QA and validation verdicts.
    Finalize {
        qa_status: Option<String>,
        validation_status: Option<String>,
    },
    /// Take the publish lock (`Trigger::Retry` records an operator retry first).
    Publish { trigger: Trigger },
    /// Record how the move of `attempt` ended.
    Finish {
        attempt: u32,
        outcome: Result<PathBuf, MoveError>,
        duration_ms: u64,
    },
    /// Settle a publish a crash cut short, from what recovery found on disk.
    Settle {
        complete: Option<PathBuf>,
        source_intact: bool,
    },
}

fn at(micros: i64) -> String {
    format_time(micros_to_datetime(micros))
}

/// The events `command` leads to for the product in `state` at time `now` (microseconds).
pub fn decide(
    state: Option<&ProductState>,
    command: Command,
    now: i64,
    policy: &Policy,
) -> Result<Vec<ProductEvent>, PublishError> {
    let s = match (state, command) {
        (None, Command::Register { event, .. }) => {
            return Ok(vec![ProductEvent::Registered(event)]);
        }
        (Some(_), Command::Register { event, existing }) => {
            return if existing.as_ref() == Some(&event) {
                Ok(Vec::new())
            } else {
                Err(PublishError::Conflict(format!(
                    "product {} is already registered with other content",
                    event.data_id
                )))
            };
        }
        (None, _) => return Err(PublishError::NotFound("(no registration)".into())),
        (Some(s), command) => (s, command),
    };
    let (state, command) = s;
    let id = || state.data_id.to_string();
    match command {
        Command::Register { .. } => unreachable!("handled above"),
        Command::Finalize {
            qa_status,
            validation_status,
        } => {
            match state.status {
                ProductStatus::Published => return Err(PublishError::AlreadyPublished(id())),
                // Its outcome is appended at the next revision: finalizing now would strand it.
                ProductStatus::Publishing => return Err(PublishError::InProgress(id())),
                ProductStatus::Staging => {}
            }
            Ok(vec![ProductEvent::Finalized(ProductFinalized {
                qa_status,
                validation_status,
            })])
        }
        Command::Publish { trigger } => {
            match state.status {
                ProductStatus::Published => return Err(PublishError::AlreadyPublished(id())),
                ProductStatus::Publishing => return Err(PublishError::InProgress(id())),
                ProductStatus::Staging => {}
            }
            if trigger == Trigger::Auto
                && state
                    .auto_due_at(policy.max_attempts)
                    .is_none_or(|due| due > now)
            {
                return Err(PublishError::Invalid(format!(
                    "{} is not due for automatic publishing",
                    state.data_id
                )));
            }
            let attempt = if trigger == Trigger::Retry {
                1
            } else {
                state.publish_attempts + 1
            };
            let mut events = Vec::with_capacity(2);
            if trigger == Trigger::Retry {
                events.push(ProductEvent::RetryRequested(RetryRequested {
                    actor: Some("operator".into()),
                    reason: None,
                }));
            }
            events.push(ProductEvent::PublishStarted(PublishStarted {
                attempt,
                destination: destination(policy.products_root, state)
                    .display()
                    .to_string(),
                trigger: trigger.as_str().into(),
            }));
            Ok(events)
        }
        Command::Finish {
            attempt,
            outcome,
            duration_ms,
        } => Ok(vec![match outcome {
            Ok(path) => ProductEvent::PublishSucceeded(PublishSucceeded {
                published_path: path.display().to_string(),
                checksum: state.checksum_text(),
                duration_ms,
                recovered: false,
            }),
            Err(err) => {
                // An interrupted move is retried at once after the restart, as recovery does.
                let wait = if err.interrupted {
                    0
                } else {
                    policy.backoff.after(attempt).as_micros() as i64
                };
                ProductEvent::PublishFailed(PublishFailed {
                    attempt,
                    error: truncate_error(&err.message),
                    retryable: err.retryable,
                    interrupted: err.interrupted,
                    next_retry_at: (err.retryable && attempt < policy.max_attempts)
                        .then(|| at(now.saturating_add(wait))),
                })
            }
        }]),
        Command::Settle {
            complete,
            source_intact,
        } => {
            if state.status != ProductStatus::Publishing {
                return Ok(Vec::new());
            }
            Ok(vec![match complete {
                Some(path) => ProductEvent::PublishSucceeded(PublishSucceeded {
                    published_path: path.display().to_string(),
                    checksum: state.checksum_text(),
                    duration_ms: 0,
                    recovered: true,
                }),
                None => {
                    let attempt = state.publish_attempts + 1;
                    ProductEvent::PublishFailed(PublishFailed {
                        attempt,
                        error: if source_intact {
                            "publish interrupted by a crash; the staged file is intact".into()
                        } else {
                            "publish interrupted by a crash; neither a complete destination nor an intact source inside the stage root was found (nothing was removed)".into()
                        },
                        retryable: source_intact,
                        interrupted: true,
                        next_retry_at: (source_intact && attempt < policy.max_attempts)
                            .then(|| at(now)),
                    })
                }
            }])
        }
    }
}

/// Where the rule puts a product: the folder of its type under the products root, under
/// its staged name. Recorded in `PublishStarted` for people; the move and recovery derive
/// it again and check it where they use it.
pub fn destination(products_root: &Path, state: &ProductState) -> PathBuf {
    products_root.join(type_dir(&state.data_type)).join(
        Path::new(&*state.stage_path).file_name().map_or_else(
            || state.data_id.to_string(),
            |n| n.to_string_lossy().to_string(),
        ),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const T0: i64 = 1_796_000_000_000_000;
    const SEC: i64 = 1_000_000;

    fn registered() -> ProductRegistered {
        ProductRegistered {
            data_id: "img1".into(),
            data_type: "image".into(),
            stage_path: "/stage/img1.fits".into(),
            checksum: Some("abc".into()),
            size_bytes: Some(10),
            qa_status: Some("passed".into()),
            validation_status: Some("validated".into()),
            auto_publish: true,
            metadata: Default::default(),
        }
    }

    fn started(attempt: u32) -> ProductEvent {
        ProductEvent::PublishStarted(PublishStarted {
            attempt,
            destination: "/products/images/img1.fits".into(),
            trigger: "auto".into(),
        })
    }

    fn failed(attempt: u32, retryable: bool, next: Option<i64>) -> ProductEvent {
        ProductEvent::PublishFailed(PublishFailed {
            attempt,
            error: "disk full".into(),
            retryable,
            interrupted: false,
            next_retry_at: next.map(at),
        })
    }

    /// The state after `events`, the first at T0 and each a second after the last.
    fn given(events: Vec<ProductEvent>) -> ProductState {
        let mut it = events.into_iter().enumerate();
        let (_, first) = it.next().expect("a registration");
        let mut s = ProductState::start(first, T0, 0).expect("starts with a registration");
        for (i, e) in it {
            s.apply(e, T0 + i as i64 * SEC, i as u64);
        }
        s
    }

    fn when(
        state: &ProductState,
        command: Command,
        now: i64,
    ) -> Result<Vec<ProductEvent>, PublishError> {
        let backoff = Backoff::new(vec![Duration::from_secs(60), Duration::from_secs(300)]);
        let policy = Policy {
            products_root: Path::new("/products"),
            max_attempts: 3,
            backoff: &backoff,
        };
        decide(Some(state), command, now, &policy)
    }

    fn publish(trigger: Trigger) -> Command {
        Command::Publish { trigger }
    }

    #[test]
    fn registering_is_new_once_and_the_same_again_is_nothing() {
        let backoff = Backoff::default();
        let policy = Policy {
            products_root: Path::new("/products"),
            max_attempts: 3,
            backoff: &backoff,
        };
        let cmd = || Command::Register {
            event: registered(),
            existing: None,
        };
        assert_eq!(
            decide(None, cmd(), T0, &policy).unwrap(),
            vec![ProductEvent::Registered(registered())]
        );
        let s = given(vec![ProductEvent::Registered(registered())]);
        let again = Command::Register {
            event: registered(),
            existing: Some(registered()),
        };
        assert_eq!(when(&s, again, T0).unwrap(), vec![]);
        let mut other = registered();
        other.stage_path = "/stage/other.fits".into();
        let clash = Command::Register {
            event: other,
            existing: Some(registered()),
        };
        assert!(matches!(
            when(&s, clash, T0),
            Err(PublishError::Conflict(_))
        ));
        assert!(matches!(
            decide(None, publish(Trigger::Manual), T0, &policy),
            Err(PublishError::NotFound(_))
        ));
    }

    #[test]
    fn a_due_product_takes_the_lock_with_its_destination() {
        let s = given(vec![ProductEvent::Registered(registered())]);
        assert_eq!(
            when(&s, publish(Trigger::Auto), T0 + SEC).unwrap(),
            vec![ProductEvent::PublishStarted(PublishStarted {
                attempt: 1,
                destination: "/products/images/img1.fits".into(),
                trigger: "auto".into(),
            })]
        );
    }

    #[test]
    fn an_unvalidated_product_is_not_due_but_a_manual_publish_goes() {
        let mut r = registered();
        r.validation_status = None;
        let s = given(vec![ProductEvent::Registered(r)]);
        assert!(matches!(
            when(&s, publish(Trigger::Auto), T0),
            Err(PublishError::Invalid(_))
        ));
        assert_eq!(when(&s, publish(Trigger::Manual), T0).unwrap().len(), 1);
    }

    #[test]
    fn an_automatic_retry_waits_for_its_time_and_counts_on() {
        let next = T0 + 120 * SEC;
        let s = given(vec![
            ProductEvent::Registered(registered()),
            started(1),
            failed(1, true, Some(next)),
        ]);
        assert!(matches!(
            when(&s, publish(Trigger::Auto), next - 1),
            Err(PublishError::Invalid(_))
        ));
        let e = when(&s, publish(Trigger::Auto), next).unwrap();
        assert!(matches!(&e[..], [ProductEvent::PublishStarted(p)] if p.attempt == 2));
        let e = when(&s, publish(Trigger::Manual), T0).unwrap();
        assert!(matches!(&e[..], [ProductEvent::PublishStarted(p)] if p.attempt == 2));
    }

    #[test]
    fn an_operator_retry_restarts_the_count_in_one_append() {
        let s = given(vec![
            ProductEvent::Registered(registered()),
            started(1),
            failed(1, true, Some(T0)),
            started(2),
            failed(2, true, Some(T0)),
            started(3),
            failed(3, true, None),
        ]);
        assert!(s.attempts_exhausted(3));
        assert!(matches!(
            when(&s, publish(Trigger::Auto), T0 + 3600 * SEC),
            Err(PublishError::Invalid(_))
        ));
        let e = when(&s, publish(Trigger::Retry), T0).unwrap();
        assert!(matches!(
            &e[..],
            [ProductEvent::RetryRequested(_), ProductEvent::PublishStarted(p)] if p.attempt == 1 && p.trigger == "retry"
        ));
    }

    #[test]
    fn nothing_publishes_twice_or_while_publishing() {
        let publishing = given(vec![ProductEvent::Registered(registered()), started(1)]);
        for t in [Trigger::Auto, Trigger::Manual, Trigger::Retry] {
            assert!(matches!(
                when(&publishing, publish(t), T0),
                Err(PublishError::InProgress(_))
            ));
        }
        let finalize = || Command::Finalize {
            qa_status: Some("failed".into()),
            validation_status: None,
        };
        assert!(matches!(
            when(&publishing, finalize(), T0),
            Err(PublishError::InProgress(_))
        ));
        let published = given(vec![
            ProductEvent::Registered(registered()),
            started(1),
            ProductEvent::PublishSucceeded(PublishSucceeded {
                published_path: "/products/images/img1.fits".into(),
                checksum: Some("abc".into()),
                duration_ms: 5,
                recovered: false,
            }),
        ]);
        assert!(matches!(
            when(&published, publish(Trigger::Retry), T0),
            Err(PublishError::AlreadyPublished(_))
        ));
        assert!(matches!(
            when(&published, finalize(), T0),
            Err(PublishError::AlreadyPublished(_))
        ));
    }

    #[test]
    fn a_failed_move_is_retried_on_the_backoff_until_attempts_run_out() {
        let s = given(vec![ProductEvent::Registered(registered()), started(1)]);
        let fail = |attempt, retryable, interrupted| Command::Finish {
            attempt,
            outcome: Err(MoveError {
                message: "x".repeat(600),
                retryable,
                interrupted,
            }),
            duration_ms: 3,
        };
        let now = T0 + 10 * SEC;
        let one = |e: Vec<ProductEvent>| match &e[..] {
            [ProductEvent::PublishFailed(f)] => f.clone(),
            other => panic!("{other:?}"),
        };
        let f = one(when(&s, fail(1, true, false), now).unwrap());
        assert_eq!(f.next_retry_at, Some(at(now + 60 * SEC)));
        assert_eq!(f.error.chars().count(), 500);
        let f = one(when(&s, fail(2, true, false), now).unwrap());
        assert_eq!(
            f.next_retry_at,
            Some(at(now + 300 * SEC)),
            "the second wait"
        );
        let f = one(when(&s, fail(3, true, false), now).unwrap());
        assert_eq!(f.next_retry_at, None, "attempts used up");
        let f = one(when(&s, fail(1, false, false), now).unwrap());
        assert_eq!(f.next_retry_at, None, "not retryable");
        let f = one(when(&s, fail(1, true, true), now).unwrap());
        assert!(f.interrupted);
        assert_eq!(
            f.next_retry_at,
            Some(at(now)),
            "an interruption is due at once"
        );
        let ok = Command::Finish {
            attempt: 1,
            outcome: Ok(PathBuf::from("/products/images/img1.fits")),
            duration_ms: 7,
        };
        assert!(matches!(
            &when(&s, ok, now).unwrap()[..],
            [ProductEvent::PublishSucceeded(p)] if !p.recovered && p.checksum.as_deref() == Some("abc")
        ));
    }

    #[test]
    fn recovery_settles_only_a_publish_in_progress() {
        let staging = given(vec![ProductEvent::Registered(registered())]);
        let settle = |complete: Option<&str>, source_intact| Command::Settle {
            complete: complete.map(PathBuf::from),
            source_intact,
        };
        assert_eq!(when(&staging, settle(None, true), T0).unwrap(), vec![]);
        let s = given(vec![ProductEvent::Registered(registered()), started(1)]);
        assert!(matches!(
            &when(&s, settle(Some("/products/images/img1.fits"), false), T0).unwrap()[..],
            [ProductEvent::PublishSucceeded(p)] if p.recovered
        ));
        assert!(matches!(
            &when(&s, settle(None, true), T0).unwrap()[..],
            [ProductEvent::PublishFailed(f)] if f.interrupted && f.retryable && f.next_retry_at == Some(at(T0))
        ));
        assert!(matches!(
            &when(&s, settle(None, false), T0).unwrap()[..],
            [ProductEvent::PublishFailed(f)] if f.interrupted && !f.retryable && f.next_retry_at.is_none()
        ));
    }
}
