//! Staging and publishing: registering staged products, the publish lock (an append of
//! `PublishStarted` with `Exact(revision)`), the safe move into the products root,
//! automatic retries with backoff, operator retries, and crash recovery at start.
//!
//! Decide, then apply: every event comes from [`decide::decide`], a pure function of the
//! product's state, the command and the time; this module reads the stream, moves files
//! ([`crate::pipeline::moves`]) and appends around it.
//!
//! A publish, in order: decide from the product's stream as it stands (the read model only
//! nominates: the due set for `run_auto`, the failed set for `retry_all`, the publishing
//! set for `recover`); take the lock, `PublishStarted` at `Exact(revision)` (an operator
//! retry appends `RetryRequested` in the same append); move the files on a blocking
//! thread; record `PublishSucceeded` or `PublishFailed` at `Exact` on the revision after
//! `PublishStarted` (a move cut short by a shutdown waits no backoff). `recover` runs
//! before the server serves: it removes the temporary copies in `PRODUCTS/.contimg-tmp`,
//! then settles every product left `publishing`.
//!
//! Tunable numbers: the defaults of `PublishConfig::new` (and of `[publish]` in
//! `config.rs`) are 3 attempts, waits of 60, 300 and 1500 s before automatic retries (the
//! last one repeats) and 3600 s for one publish. In this module: `run_auto` takes at most
//! 64 due ids per round, then waits for the read model to change or 250 ms; a product's
//! stream is read 1,000 events a page (`LOAD_PAGE`); after an append the publisher waits
//! at most 5 s for the read model to fold it; a registration spends at most 3600 s hashing
//! the staged product (`REGISTER_HASH_LIMIT`); `data_type` and the QA and validation words
//! are at most 64 characters. In `moves.rs`: files are read 1 MiB at a time between looks
//! at the time limit and the shutdown flag (`CHUNK`), and a name taken by another product
//! gets `_1` to `_99` before its extension. An error is cut to 500 characters
//! (`MAX_ERROR_CHARS` in `projections/product.rs`).

pub mod decide;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use self::decide::{Command, Policy};
use super::moves::{
    Budget, MoveError, MoveRequest, checksum_staged, move_product, remove_temporaries,
    settle_interrupted,
};
use super::paths::{self, PathError};
use crate::config::Backoff;
use crate::events::catalogue::{DomainEvent, EventMetadata, ProductRegistered, StreamName};
use crate::events::{Direction, ExpectedRevision, Ledger, StoreError};
use crate::projections::Projections;
use crate::projections::product::ProductEvent;
use crate::projections::product::{ProductState, ProductStatus};
use crate::projections::publish::paths_overlap;

/// Where products go and how hard to try.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    pub stage_root: PathBuf,
    pub products_root: PathBuf,
    pub max_attempts: u32,
    /// Waits before automatic retries.
    pub backoff: Backoff,
    /// Longest one publish may take; a move still copying then is cut short (retryable),
    /// so one slow product cannot hold up the others.
    pub timeout: Duration,
    /// A product publishing for longer than this (minutes) is listed as stuck.
    pub stuck_publishing_min: f64,
}

impl PublishConfig {
    pub fn new(stage_root: PathBuf, products_root: PathBuf) -> Self {
        PublishConfig {
            stage_root,
            products_root,
            max_attempts: 3,
            backoff: Backoff::from_secs(&[60.0, 300.0, 1500.0]),
            timeout: Duration::from_secs(3600),
            stuck_publishing_min: crate::projections::status::DEFAULT_STUCK_PUBLISHING_MIN,
        }
    }
}

/// Products-root folder for a data type.
pub fn type_dir(data_type: &str) -> &'static str {
    match data_type {
        "ms" => "ms",
        "calib_ms" => "calib_ms",
        "caltable" | "caltables" => "caltables",
        "image" | "images" => "images",
        "mosaic" | "mosaics" => "mosaics",
        "catalog" | "catalogs" => "catalogs",
        "qa" => "qa",
        "metadata" => "metadata",
        _ => "misc",
    }
}

/// Errors of the publishing boundary; each names the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// 404.
    #[error("product {0} not found")]
    NotFound(String),
    /// 400.
    #[error("product {0} is already published")]
    AlreadyPublished(String),
    /// 409.
    #[error("a publish of {0} is in progress")]
    InProgress(String),
    /// 409: same id, other content.
    #[error("{0}")]
    Conflict(String),
    /// 400: bad id, path or field.
    #[error("{0}")]
    Invalid(String),
    /// 500: the attempt ran and failed; recorded as `PublishFailed`.
    #[error("publish of {id} failed: {error}")]
    Failed { id: String, error: String },
    /// 500 (or 503 when shutting down).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<PathError> for PublishError {
    fn from(e: PathError) -> Self {
        PublishError::Invalid(e.to_string())
    }
}

/// The register command: a staged product as the core takes it. The API maps its JSON
/// body onto this; the pipeline builds it directly. Serialized with the body's field
/// names, so a stream worker can send it to `POST /api/products` as it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Registration {
    pub data_id: String,
    pub data_type: String,
    /// Relative to the stage root, or absolute; resolved inside it before anything else.
    pub stage_path: String,
    pub qa_status: Option<String>,
    pub validation_status: Option<String>,
    pub auto_publish: bool,
    pub metadata: std::collections::BTreeMap<String, String>,
}

/// What a publish did.
#[derive(Debug, Clone)]
pub struct PublishOutcome {
    pub data_id: String,
    pub published_path: String,
}

/// One product's result in a retry-all.
#[derive(Debug, Clone)]
pub struct RetryResult {
    pub data_id: String,
    pub success: bool,
    pub error: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Auto,
    Manual,
    Retry,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Auto => "auto",
            Trigger::Manual => "manual",
            Trigger::Retry => "retry",
        }
    }
}

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    ledger: Ledger,
    projections: Projections,
    config: PublishConfig,
    /// Counts real file moves, for tests and metrics.
    moves: std::sync::atomic::AtomicU64,
    /// Set at shutdown: a move in progress stops at its next chunk.
    cancel: Arc<std::sync::atomic::AtomicBool>,
    /// Folder fsyncs the moves in flight share.
    syncs: super::dirsync::DirSyncs,
    /// The staged paths of registrations between their overlap check and the read model's
    /// folding of their append: registrations run side by side (their appends share group
    /// commits), and each checks the others' claims with the read model.
    registering: std::sync::Mutex<Claims>,
}

/// Staged paths claimed by registrations: in flight, or ended without seeing their
/// product folded.
#[derive(Default)]
struct Claims {
    next: u64,
    held: Vec<Claim>,
}

struct Claim {
    ticket: u64,
    id: String,
    path: String,
    until: Until,
}

/// How long a claim outlives its registration.
#[derive(Clone, Copy)]
enum Until {
    /// The registration is still running.
    Running,
    /// Its append is at this position, not yet folded when the registration stopped
    /// waiting: held until the read model has it.
    Folded(u64),
    /// The registration was dropped mid-way (a client gone, a shutdown): its append may
    /// or may not land, so the path stays taken a while.
    Deadline(Instant),
}

/// How long a registration dropped mid-way keeps its path: far longer than any append
/// takes to be folded.
const ABANDONED_CLAIM: Duration = Duration::from_secs(60);

impl Claims {
    /// Forgets the claims whose products the read model now has (or whose time is up).
    fn prune(&mut self, folded: Option<u64>, now: Instant) {
        self.held.retain(|c| match c.until {
            Until::Running => true,
            Until::Folded(p) => folded.is_none_or(|f| f < p),
            Until::Deadline(t) => now < t,
        });
    }
}

/// A registration's ticket. Its claim, if it made one, goes with the ticket when the
/// registration saw its product folded or its append refused; otherwise it stays until
/// the read model has the position, or for [`ABANDONED_CLAIM`] when none is known.
struct Ticket<'a> {
    claims: &'a std::sync::Mutex<Claims>,
    id: u64,
    position: Option<u64>,
    finished: bool,
}

impl<'a> Ticket<'a> {
    fn take(claims: &'a std::sync::Mutex<Claims>) -> Self {
        let mut c = claims.lock().unwrap_or_else(|e| e.into_inner());
        c.next += 1;
        Ticket {
            claims,
            id: c.next,
            position: None,
            finished: false,
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut c = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        let until = match (self.finished, self.position) {
            (true, _) => None,
            (false, Some(p)) => Some(Until::Folded(p)),
            (false, None) => Some(Until::Deadline(Instant::now() + ABANDONED_CLAIM)),
        };
        match until {
            None => c.held.retain(|claim| claim.ticket != self.id),
            Some(until) => {
                for claim in c.held.iter_mut().filter(|claim| claim.ticket == self.id) {
                    claim.until = until;
                }
            }
        }
    }
}

/// Checks a staged product (id, type, verdict words, a path inside the stage root),
/// checksums it and appends its `ProductRegistered` with `NoStream`. Returns whether it
/// was new (an identical repeat is not) and the position written. Other content under an
/// existing id is a conflict. The publisher and the pipeline (in any process) register
/// through here.
pub async fn register_product(
    ledger: &Ledger,
    stage_root: &Path,
    req: Registration,
    actor: &str,
) -> Result<(bool, Option<u64>), PublishError> {
    register_checked(ledger, stage_root, req, actor, Arc::default(), |_| None).await
}

/// [`register_product`], with `overlap` asked, once the staged path is resolved, for an
/// unpublished product it would share files with (refused: 409).
async fn register_checked(
    ledger: &Ledger,
    stage_root: &Path,
    req: Registration,
    actor: &str,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    overlap: impl Fn(&str) -> Option<String>,
) -> Result<(bool, Option<u64>), PublishError> {
    paths::validate_data_id(&req.data_id)?;
    // Over HTTP the server registers: product streams take no raw appends, and the
    // server checks the path against its own stage root.
    let ledger = match ledger {
        Ledger::Remote(r) => {
            let (status, detail) = r.post_command(&["products"], &req).await?;
            return match status {
                201 => Ok((true, None)),
                200 => Ok((false, None)),
                409 => Err(PublishError::Conflict(detail)),
                400 | 403 | 415 | 422 => Err(PublishError::Invalid(detail)),
                503 => Err(PublishError::Store(StoreError::Closed)),
                _ => Err(PublishError::Store(StoreError::Server { status, detail })),
            };
        }
        Ledger::Local(_) => ledger,
    };
    check_data_type(&req.data_type)?;
    check_status_words(&req.qa_status, &req.validation_status)?;
    let stage_root = stage_root.to_path_buf();
    let stage_path = req.stage_path.clone();
    let (real, checksum, size) = tokio::task::spawn_blocking(move || {
        let budget = Budget {
            deadline: Instant::now() + REGISTER_HASH_LIMIT,
            cancel: &cancel,
        };
        checksum_staged(&stage_root, &stage_path, &budget).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PublishError::Invalid(format!("{stage_path}: {e}")),
            _ => PublishError::Invalid(format!("reading {stage_path}: {e}")),
        })
    })
    .await
    .map_err(task_failed)??;
    if let Some(other) = overlap(&real.display().to_string()) {
        return Err(PublishError::Conflict(format!(
            "{} shares files with product {other}, not yet published; stage it in a place of its own",
            real.display()
        )));
    }
    let event = ProductRegistered {
        data_id: req.data_id.clone(),
        data_type: req.data_type,
        stage_path: real.display().to_string(),
        checksum: Some(checksum),
        size_bytes: Some(size),
        qa_status: req.qa_status,
        validation_status: req.validation_status,
        auto_publish: req.auto_publish,
        metadata: req.metadata,
    };
    let stream = stream_of(&req.data_id)?;
    // The decision for a new stream; a lost race is decided again against the winner.
    let mut events = decide::decide(
        None,
        Command::Register {
            event: event.clone(),
            existing: None,
        },
        now_micros(),
        &Policy::unused(),
    )?;
    let proposed = events.drain(..).map(|e| proposed(e, actor)).collect();
    match ledger
        .append(&stream, ExpectedRevision::NoStream, proposed)
        .await
    {
        Ok(r) => Ok((true, Some(r.position))),
        Err(StoreError::WrongExpectedVersion { .. }) => {
            let first = ledger
                .read_stream(&stream, Some(0), Direction::Forward, 1)
                .await?;
            let existing: Option<ProductRegistered> = first
                .first()
                .and_then(|e| serde_json::from_slice(&e.data).ok());
            let state = ProductState::from_events(&first).ok().flatten();
            decide::decide(
                state.as_ref(),
                Command::Register { event, existing },
                now_micros(),
                &Policy::unused(),
            )?;
            Ok((false, None))
        }
        Err(e) => Err(e.into()),
    }
}

/// Longest a registration may spend reading a staged product to checksum it.
const REGISTER_HASH_LIMIT: Duration = Duration::from_secs(3600);

fn task_failed(e: tokio::task::JoinError) -> PublishError {
    PublishError::Store(StoreError::Task(format!("a publish task failed: {e}")))
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A decided product event as an append, with who decided it.
fn proposed(e: ProductEvent, actor: &str) -> crate::events::ProposedEvent {
    let m = meta(actor);
    match e {
        ProductEvent::Registered(e) => e.to_proposed(&m),
        ProductEvent::Finalized(e) => e.to_proposed(&m),
        ProductEvent::PublishStarted(e) => e.to_proposed(&m),
        ProductEvent::PublishSucceeded(e) => e.to_proposed(&m),
        ProductEvent::PublishFailed(e) => e.to_proposed(&m),
        // The operator asked for it, whatever path carried the request.
        ProductEvent::RetryRequested(e) => e.to_proposed(&meta("operator")),
    }
}

/// Events read per page when a product's stream is loaded.
const LOAD_PAGE: usize = 1000;

/// The product's stream, from its checked id.
fn stream_of(id: &str) -> Result<StreamName, PublishError> {
    Ok(StreamName::product(&paths::data_id(id)?))
}

fn meta(actor: &str) -> EventMetadata {
    EventMetadata::actor(actor)
}

impl Publisher {
    pub fn new(
        ledger: Ledger,
        projections: Projections,
        config: PublishConfig,
    ) -> Result<Self, std::io::Error> {
        std::fs::create_dir_all(&config.stage_root)?;
        std::fs::create_dir_all(&config.products_root)?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                ledger,
                projections,
                config,
                moves: std::sync::atomic::AtomicU64::new(0),
                cancel: Arc::default(),
                syncs: Default::default(),
                registering: std::sync::Mutex::default(),
            }),
        })
    }

    pub fn config(&self) -> &PublishConfig {
        &self.inner.config
    }

    pub fn projections(&self) -> &Projections {
        &self.inner.projections
    }

    pub fn moves(&self) -> u64 {
        self.inner.moves.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops moves in progress at their next chunk (they are recorded as interrupted and
    /// retried after the restart); called at shutdown.
    pub fn interrupt(&self) {
        self.inner
            .cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Lets moves run again after [`interrupt`](Self::interrupt): a server that lost the
    /// lead of a shared ledger cut its moves short, and takes the lead again later.
    pub fn resume(&self) {
        self.inner
            .cancel
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The product's state folded from its own stream (authoritative, not the projection).
    pub async fn load(&self, id: &str) -> Result<ProductState, PublishError> {
        paths::validate_data_id(id)?;
        let stream = stream_of(id)?;
        let mut events = Vec::new();
        // Page to the end: a product retried many times outgrows one read.
        loop {
            let from = events
                .last()
                .map(|e: &crate::events::RecordedEvent| e.revision + 1);
            let page = match self
                .inner
                .ledger
                .read_stream(&stream, from, Direction::Forward, LOAD_PAGE)
                .await
            {
                Ok(e) => e,
                Err(StoreError::StreamNotFound(_)) => {
                    return Err(PublishError::NotFound(id.into()));
                }
                Err(e) => return Err(e.into()),
            };
            let full = page.len() >= LOAD_PAGE;
            events.extend(page);
            if !full {
                break;
            }
        }
        ProductState::from_events(&events)
            .map_err(|e| {
                PublishError::Store(StoreError::Corrupt {
                    position: events.last().map_or(0, |e| e.position),
                    reason: e,
                })
            })?
            .ok_or_else(|| PublishError::NotFound(id.into()))
    }

    /// Waits (briefly) until the read model has folded `position`, so that a client who
    /// reads after writing sees its write.
    async fn settle(&self, position: u64) -> bool {
        self.inner
            .projections
            .wait_for(position, Duration::from_secs(5))
            .await
    }

    /// Registers a staged product. `Ok(true)` when new, `Ok(false)` for an identical repeat.
    pub async fn register(&self, req: Registration) -> Result<(ProductState, bool), PublishError> {
        let id = req.data_id.clone();
        let mut ticket = Ticket::take(&self.inner.registering);
        let ticket_id = ticket.id;
        let projections = self.inner.projections.clone();
        let registered = register_checked(
            &self.inner.ledger,
            &self.inner.config.stage_root,
            req,
            "register",
            self.inner.cancel.clone(),
            |path| {
                // Check and claim at once: of two registrations sharing files, the second
                // to get here sees the first's claim or, once it is folded, its product.
                let mut claims = self
                    .inner
                    .registering
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                claims.prune(projections.checkpoint(), Instant::now());
                let claimed = claims
                    .held
                    .iter()
                    .find(|c| c.id != id && paths_overlap(&c.path, path))
                    .map(|c| c.id.clone());
                let other = claimed.or_else(|| {
                    projections.read(|m| {
                        m.unpublished_overlapping(path, &id)
                            .map(|p| p.data_id.to_string())
                    })
                });
                if other.is_none() {
                    claims.held.push(Claim {
                        ticket: ticket_id,
                        id: id.clone(),
                        path: path.to_string(),
                        until: Until::Running,
                    });
                }
                other
            },
        )
        .await;
        let (created, position) = match registered {
            Ok(r) => r,
            Err(e) => {
                // Refused or failed: nothing of it will land.
                ticket.finished = true;
                return Err(e);
            }
        };
        ticket.position = position;
        ticket.finished = match position {
            Some(p) => self.settle(p).await,
            None => true,
        };
        drop(ticket);
        Ok((self.load(&id).await?, created))
    }

    fn policy(&self) -> Policy<'_> {
        let c = &self.inner.config;
        Policy {
            products_root: &c.products_root,
            max_attempts: c.max_attempts,
            backoff: &c.backoff,
        }
    }

    /// Decides `command` against the product's stream as it stands and appends what it
    /// decided with `Exact(revision)`, waiting for the read model to fold it. Returns the
    /// position written (none when nothing was decided).
    async fn decide_and_append(
        &self,
        state: &ProductState,
        command: Command,
        actor: &str,
    ) -> Result<Option<crate::events::AppendResult>, PublishError> {
        let events = decide::decide(Some(state), command, now_micros(), &self.policy())?;
        if events.is_empty() {
            return Ok(None);
        }
        let proposed = events.into_iter().map(|e| proposed(e, actor)).collect();
        let r = self
            .inner
            .ledger
            .append(
                &stream_of(&state.data_id)?,
                ExpectedRevision::Exact(state.revision),
                proposed,
            )
            .await?;
        self.settle(r.position).await;
        Ok(Some(r))
    }

    /// Sets QA and validation verdicts; may make the product due for automatic publishing.
    pub async fn finalize(
        &self,
        id: &str,
        qa_status: Option<String>,
        validation_status: Option<String>,
    ) -> Result<ProductState, PublishError> {
        check_status_words(&qa_status, &validation_status)?;
        let state = self.load(id).await?;
        let command = Command::Finalize {
            qa_status,
            validation_status,
        };
        self.decide_and_append(&state, command, "finalize")
            .await
            .map_err(|e| match e {
                PublishError::Store(StoreError::WrongExpectedVersion { .. }) => {
                    PublishError::Conflict(format!("{id} changed meanwhile; try again"))
                }
                other => other,
            })?;
        self.load(id).await
    }

    /// Publishes now. With `Trigger::Retry` an operator retry is recorded first, in the
    /// same append, so the automatic count starts again and nobody slips in between.
    pub async fn publish(
        &self,
        id: &str,
        trigger: Trigger,
    ) -> Result<PublishOutcome, PublishError> {
        let state = self.load(id).await?;
        let now = now_micros();
        let decided = decide::decide(
            Some(&state),
            Command::Publish { trigger },
            now,
            &self.policy(),
        )?;
        // The state the outcome is decided from: these events folded in, as the log will
        // hold them once the append below succeeds.
        let mut after = state.clone();
        for (i, e) in decided.iter().cloned().enumerate() {
            after.apply(e, now, state.revision + 1 + i as u64);
        }
        let attempt = decided
            .iter()
            .find_map(|e| match e {
                ProductEvent::PublishStarted(s) => Some(s.attempt),
                _ => None,
            })
            .unwrap_or(1);
        let proposed_events = decided
            .into_iter()
            .map(|e| proposed(e, trigger.as_str()))
            .collect();
        // The lock: of racing publishers exactly one appends at this revision.
        let started = self
            .inner
            .ledger
            .append(
                &stream_of(id)?,
                ExpectedRevision::Exact(state.revision),
                proposed_events,
            )
            .await
            .map_err(|e| match e {
                StoreError::WrongExpectedVersion { .. } => PublishError::InProgress(id.into()),
                other => other.into(),
            })?;
        let clock = Instant::now();
        // A folder holding another unpublished product (or held by one) would carry its
        // files away: the attempt fails, and the ledger says why.
        let overlapping = self.inner.projections.read(|m| {
            m.unpublished_overlapping(&state.stage_path, id)
                .map(|p| p.data_id.to_string())
        });
        let inner = self.inner.clone();
        let (stage_path, checksum, data_type) = (
            state.stage_path.clone(),
            state.checksum_text(),
            state.data_type,
        );
        let moved = tokio::task::spawn_blocking(move || {
            if let Some(other) = overlapping {
                return Err(MoveError::fatal(format!(
                    "{stage_path} shares files with product {other}, not yet published; stage them apart"
                )));
            }
            let cfg = &inner.config;
            let r = move_product(&MoveRequest {
                stage_root: &cfg.stage_root,
                products_root: &cfg.products_root,
                stage_path: &stage_path,
                type_dir: type_dir(&data_type),
                checksum: checksum.as_deref(),
                budget: Budget {
                    deadline: clock + cfg.timeout,
                    cancel: &inner.cancel,
                },
                syncs: &inner.syncs,
            });
            if r.is_ok() {
                inner
                    .moves
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        })
        .await
        .unwrap_or_else(|e| Err(MoveError::retryable(format!("publish task failed: {e}"))));
        after.revision = started.next_expected_version;
        let failure = moved.as_ref().err().map(|e| e.message.clone());
        let published_path = moved.as_ref().ok().map(|p| p.display().to_string());
        let command = Command::Finish {
            attempt,
            outcome: moved,
            duration_ms: clock.elapsed().as_millis() as u64,
        };
        self.decide_and_append(&after, command, trigger.as_str())
            .await?;
        match (published_path, failure) {
            (Some(path), _) => Ok(PublishOutcome {
                data_id: id.into(),
                published_path: path,
            }),
            (None, error) => Err(PublishError::Failed {
                id: id.into(),
                error: error.unwrap_or_default(),
            }),
        }
    }

    /// Operator retry of many failed products.
    pub async fn retry_all(&self, max_attempts: Option<u32>, limit: usize) -> Vec<RetryResult> {
        let ids: Vec<String> = self.inner.projections.read(|m| {
            m.failed(max_attempts, limit)
                .into_iter()
                .map(|p| p.data_id.to_string())
                .collect()
        });
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let r = self.publish(&id, Trigger::Retry).await;
            out.push(RetryResult {
                data_id: id,
                success: r.is_ok(),
                error: r.err().map(|e| e.to_string()),
            });
        }
        out
    }

    /// Settles every product whose stream ends in `PublishStarted` (a crash cut it short):
    /// a complete destination is recorded as success, an intact source as an interrupted
    /// failure. Leftover temporary files are removed first. Run before serving.
    pub async fn recover(&self) -> Result<usize, PublishError> {
        let root = self.inner.config.products_root.clone();
        tokio::task::spawn_blocking(move || remove_temporaries(&root))
            .await
            .map_err(task_failed)?;
        let stuck: Vec<String> = self.inner.projections.read(|m| {
            m.publishing()
                .into_iter()
                .map(|p| p.data_id.to_string())
                .collect()
        });
        let mut settled = 0;
        for id in stuck {
            let state = self.load(&id).await?;
            if state.status != ProductStatus::Publishing {
                continue;
            }
            let inner = self.inner.clone();
            let (stage_path, checksum, data_type) = (
                state.stage_path.clone(),
                state.checksum_text(),
                state.data_type,
            );
            let found = tokio::task::spawn_blocking(move || {
                let cfg = &inner.config;
                let budget = Budget {
                    deadline: Instant::now() + cfg.timeout,
                    cancel: &inner.cancel,
                };
                let f = settle_interrupted(
                    &cfg.stage_root,
                    &cfg.products_root,
                    &stage_path,
                    type_dir(&data_type),
                    checksum.as_deref(),
                    &budget,
                );
                (f.complete, f.source_intact)
            })
            .await
            .map_err(task_failed)?;
            let (complete, source_intact) = found;
            let command = Command::Settle {
                complete,
                source_intact,
            };
            // No settle: nothing follows the log yet; the server's follower folds these.
            let events = decide::decide(Some(&state), command, now_micros(), &self.policy())?;
            if events.is_empty() {
                continue;
            }
            let proposed = events
                .into_iter()
                .map(|e| proposed(e, "recovery"))
                .collect();
            self.inner
                .ledger
                .append(
                    &stream_of(&id)?,
                    ExpectedRevision::Exact(state.revision),
                    proposed,
                )
                .await?;
            tracing::warn!(data_id = %id, "recovered a publish cut short by a crash");
            settled += 1;
        }
        Ok(settled)
    }

    /// Publishes due products (new, validated ones; retryable failures past their backoff)
    /// until `shutdown` turns true.
    pub async fn run_auto(self, mut shutdown: watch::Receiver<bool>) {
        let mut changes = self.inner.projections.watch();
        loop {
            let now = chrono::Utc::now().timestamp_micros();
            let due = self.inner.projections.read(|m| m.due(now, 64));
            for id in due {
                if *shutdown.borrow() {
                    return;
                }
                match self.publish(&id, Trigger::Auto).await {
                    Ok(o) => tracing::info!(data_id = %id, path = %o.published_path, "published"),
                    Err(PublishError::Failed { error, .. }) => {
                        tracing::warn!(data_id = %id, %error, "automatic publish failed")
                    }
                    // Someone else got there first, or the model was a moment behind.
                    Err(
                        PublishError::InProgress(_)
                        | PublishError::AlreadyPublished(_)
                        | PublishError::Invalid(_),
                    ) => {}
                    Err(e) => tracing::error!(data_id = %id, error = %e, "automatic publish"),
                }
            }
            tokio::select! {
                _ = crate::projections::stopped(&mut shutdown) => return,
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

/// `data_type`: 1 to 64 lowercase letters and `_` (it names a products folder).
fn check_data_type(t: &str) -> Result<(), PublishError> {
    if t.is_empty() || t.len() > 64 || !t.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
        return Err(PublishError::Invalid(format!(
            "data_type must be lowercase letters and '_' (got {t:?})"
        )));
    }
    Ok(())
}

fn check_status_words(
    qa: &Option<String>,
    validation: &Option<String>,
) -> Result<(), PublishError> {
    for (name, v) in [("qa_status", qa), ("validation_status", validation)] {
        if let Some(v) = v
            && (v.is_empty() || v.len() > 64 || v.chars().any(char::is_control))
        {
            return Err(PublishError::Invalid(format!(
                "{name} must be 1 to 64 printable characters"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(claims: &std::sync::Mutex<Claims>, ticket: &Ticket, path: &str) {
        claims.lock().unwrap().held.push(Claim {
            ticket: ticket.id,
            id: format!("p{}", ticket.id),
            path: path.into(),
            until: Until::Running,
        });
    }

    fn paths(claims: &std::sync::Mutex<Claims>) -> Vec<String> {
        let mut v: Vec<String> = claims
            .lock()
            .unwrap()
            .held
            .iter()
            .map(|c| c.path.clone())
            .collect();
        v.sort();
        v
    }

    /// A claim goes with its ticket only when the registration saw its product folded or
    /// its append refused. One whose product was appended but not yet folded (the wait
    /// timed out) stays until the read model reaches its position; one dropped before
    /// its outcome was known (a client gone) stays for a while.
    #[test]
    fn claims_outlive_registrations_that_did_not_see_their_outcome() {
        let claims = std::sync::Mutex::new(Claims::default());
        let now = Instant::now();
        let mut folded = Ticket::take(&claims);
        claim(&claims, &folded, "/s/folded");
        folded.position = Some(3);
        folded.finished = true;
        let mut timed_out = Ticket::take(&claims);
        claim(&claims, &timed_out, "/s/timed-out");
        timed_out.position = Some(10);
        let abandoned = Ticket::take(&claims);
        claim(&claims, &abandoned, "/s/abandoned");
        let mut refused = Ticket::take(&claims);
        claim(&claims, &refused, "/s/refused");
        refused.finished = true;
        drop((folded, timed_out, abandoned, refused));
        assert_eq!(paths(&claims), ["/s/abandoned", "/s/timed-out"]);
        claims.lock().unwrap().prune(Some(9), now);
        assert_eq!(paths(&claims), ["/s/abandoned", "/s/timed-out"]);
        claims.lock().unwrap().prune(Some(10), now);
        assert_eq!(paths(&claims), ["/s/abandoned"]);
        claims
            .lock()
            .unwrap()
            .prune(Some(10), now + ABANDONED_CLAIM / 2);
        assert_eq!(paths(&claims), ["/s/abandoned"]);
        claims
            .lock()
            .unwrap()
            .prune(Some(10), Instant::now() + ABANDONED_CLAIM);
        assert!(paths(&claims).is_empty());
    }
}
