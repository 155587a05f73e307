//! Staging and publishing: registering staged products, the publish lock (an append of
//! `PublishStarted` with `Exact(revision)`), the safe move into the products root,
//! automatic retries with backoff, operator retries, and crash recovery at start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::watch;

use super::paths::{self, PathError};
use crate::events::catalogue::{
    DomainEvent, EventMetadata, ProductFinalized, ProductRegistered, PublishFailed, PublishStarted,
    PublishSucceeded, RetryRequested,
};
use crate::events::record::format_time;
use crate::events::{Direction, ExpectedRevision, Ledger, StoreError};
use crate::projections::Projections;
use crate::projections::product::{ProductState, ProductStatus, truncate_error};

/// Where products go and how hard to try.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    pub stage_root: PathBuf,
    pub products_root: PathBuf,
    pub max_attempts: u32,
    /// Wait before automatic retry n (1-based); the last entry repeats.
    pub backoff: Vec<Duration>,
}

impl PublishConfig {
    pub fn new(stage_root: PathBuf, products_root: PathBuf) -> Self {
        PublishConfig {
            stage_root,
            products_root,
            max_attempts: 3,
            backoff: vec![
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(1500),
            ],
        }
    }

    fn backoff_after(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) as usize - 1).min(self.backoff.len().saturating_sub(1));
        self.backoff
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(60))
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

/// A registration request, as clients send it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterProduct {
    pub data_id: String,
    pub data_type: String,
    pub stage_path: String,
    #[serde(default)]
    pub qa_status: Option<String>,
    #[serde(default)]
    pub validation_status: Option<String>,
    #[serde(default)]
    pub auto_publish: Option<bool>,
    #[serde(default)]
    pub metadata: Option<std::collections::BTreeMap<String, serde_json::Value>>,
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

/// A failed move, and whether trying again later may help.
#[derive(Debug)]
pub struct MoveError {
    pub message: String,
    pub retryable: bool,
}

impl MoveError {
    fn retryable(message: String) -> Self {
        MoveError {
            message,
            retryable: true,
        }
    }
    fn fatal(message: String) -> Self {
        MoveError {
            message,
            retryable: false,
        }
    }
    fn io(what: &str, e: std::io::Error) -> Self {
        let retryable = !matches!(e.kind(), std::io::ErrorKind::PermissionDenied);
        MoveError {
            message: format!("{what}: {e}"),
            retryable,
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
}

/// Checks a staged product (id, type, verdict words, a path inside the stage root),
/// checksums it and appends its `ProductRegistered` with `NoStream`. Returns whether it
/// was new (an identical repeat is not) and the position written. Other content under an
/// existing id is a conflict. The publisher and the pipeline (in any process) register
/// through here.
pub async fn register_product(
    ledger: &Ledger,
    stage_root: &Path,
    req: RegisterProduct,
    actor: &str,
) -> Result<(bool, Option<u64>), PublishError> {
    paths::validate_data_id(&req.data_id)?;
    if req.data_type.is_empty()
        || req.data_type.len() > 64
        || !req
            .data_type
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_')
    {
        return Err(PublishError::Invalid(format!(
            "data_type must be lowercase letters and '_' (got {:?})",
            req.data_type
        )));
    }
    check_status_words(&req.qa_status, &req.validation_status)?;
    let stage_root = stage_root.to_path_buf();
    let stage_path = req.stage_path.clone();
    let (real, checksum, size) = tokio::task::spawn_blocking(move || {
        let real = paths::resolve_inside(&stage_root, &stage_path)?;
        let (checksum, size) = checksum_path(&real)
            .map_err(|e| PublishError::Invalid(format!("reading {}: {e}", real.display())))?;
        Ok::<_, PublishError>((real, checksum, size))
    })
    .await
    .map_err(|e| PublishError::Store(StoreError::Storage(e.to_string())))??;
    let metadata = req
        .metadata
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, s)
        })
        .collect();
    let event = ProductRegistered {
        data_id: req.data_id.clone(),
        data_type: req.data_type,
        stage_path: real.display().to_string(),
        checksum: Some(checksum),
        size_bytes: Some(size),
        qa_status: req.qa_status,
        validation_status: req.validation_status,
        auto_publish: req.auto_publish.unwrap_or(true),
        metadata,
    };
    let stream = stream_of(&req.data_id);
    match ledger
        .append(
            &stream,
            ExpectedRevision::NoStream,
            vec![event.to_proposed(&meta(actor))],
        )
        .await
    {
        Ok(r) => Ok((true, Some(r.position))),
        Err(StoreError::WrongExpectedVersion { .. }) => {
            let events = ledger
                .read_stream(&stream, Some(0), Direction::Forward, 1)
                .await?;
            let first: Option<ProductRegistered> = events
                .first()
                .and_then(|e| serde_json::from_slice(&e.data).ok());
            match first {
                Some(existing) if existing == event => Ok((false, None)),
                _ => Err(PublishError::Conflict(format!(
                    "product {} is already registered with other content",
                    req.data_id
                ))),
            }
        }
        Err(e) => Err(e.into()),
    }
}

fn stream_of(id: &str) -> String {
    format!("product-{id}")
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

    /// The product's state folded from its own stream (authoritative, not the projection).
    pub async fn load(&self, id: &str) -> Result<ProductState, PublishError> {
        paths::validate_data_id(id)?;
        let events = match self
            .inner
            .ledger
            .read_stream(&stream_of(id), None, Direction::Forward, 10_000)
            .await
        {
            Ok(e) => e,
            Err(StoreError::StreamNotFound(_)) => return Err(PublishError::NotFound(id.into())),
            Err(e) => return Err(e.into()),
        };
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
    async fn settle(&self, position: u64) {
        self.inner
            .projections
            .wait_for(position, Duration::from_secs(5))
            .await;
    }

    /// Appends one event at `Exact(revision)` to the product's stream and waits for the
    /// read model to fold it.
    async fn append_settled(
        &self,
        id: &str,
        revision: u64,
        event: crate::events::ProposedEvent,
    ) -> Result<(), StoreError> {
        let r = self
            .inner
            .ledger
            .append(
                &stream_of(id),
                ExpectedRevision::Exact(revision),
                vec![event],
            )
            .await?;
        self.settle(r.position).await;
        Ok(())
    }

    /// Registers a staged product. `Ok(true)` when new, `Ok(false)` for an identical repeat.
    pub async fn register(
        &self,
        req: RegisterProduct,
    ) -> Result<(ProductState, bool), PublishError> {
        let id = req.data_id.clone();
        let (created, position) = register_product(
            &self.inner.ledger,
            &self.inner.config.stage_root,
            req,
            "register",
        )
        .await?;
        if let Some(p) = position {
            self.settle(p).await;
        }
        Ok((self.load(&id).await?, created))
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
        match state.status {
            ProductStatus::Published => return Err(PublishError::AlreadyPublished(id.into())),
            // Its outcome is appended at the next revision: finalizing now would strand it.
            ProductStatus::Publishing => return Err(PublishError::InProgress(id.into())),
            ProductStatus::Staging => {}
        }
        let e = ProductFinalized {
            qa_status,
            validation_status,
        };
        self.append_settled(id, state.revision, e.to_proposed(&meta("finalize")))
            .await
            .map_err(|e| match e {
                StoreError::WrongExpectedVersion { .. } => {
                    PublishError::Conflict(format!("{id} changed meanwhile; try again"))
                }
                other => other.into(),
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
        match state.status {
            ProductStatus::Published => return Err(PublishError::AlreadyPublished(id.into())),
            ProductStatus::Publishing => return Err(PublishError::InProgress(id.into())),
            ProductStatus::Staging => {}
        }
        let cfg = &self.inner.config;
        let now = chrono::Utc::now().timestamp_micros();
        if trigger == Trigger::Auto
            && state
                .auto_due_at(cfg.max_attempts)
                .is_none_or(|at| at > now)
        {
            return Err(PublishError::Invalid(format!(
                "{id} is not due for automatic publishing"
            )));
        }
        let attempt = if trigger == Trigger::Retry {
            1
        } else {
            state.publish_attempts + 1
        };
        let source = PathBuf::from(&state.stage_path);
        let dest_dir = cfg.products_root.join(type_dir(&state.data_type));
        let name = source
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| id.to_string());
        let destination = dest_dir.join(&name);
        let mut events = Vec::new();
        if trigger == Trigger::Retry {
            events.push(
                RetryRequested {
                    actor: Some("operator".into()),
                    reason: None,
                }
                .to_proposed(&meta("operator")),
            );
        }
        events.push(
            PublishStarted {
                attempt,
                destination: destination.display().to_string(),
                trigger: trigger.as_str().into(),
            }
            .to_proposed(&meta(trigger.as_str())),
        );
        let started = self
            .inner
            .ledger
            .append(
                &stream_of(id),
                ExpectedRevision::Exact(state.revision),
                events,
            )
            .await
            .map_err(|e| match e {
                StoreError::WrongExpectedVersion { .. } => PublishError::InProgress(id.into()),
                other => other.into(),
            })?;
        // We hold the lock: exactly one publisher gets here per attempt.
        let clock = Instant::now();
        let products_root = cfg.products_root.clone();
        let checksum = state.checksum.clone();
        let inner = self.inner.clone();
        let moved = tokio::task::spawn_blocking(move || {
            let r = move_product(
                &source,
                &products_root,
                &dest_dir,
                &name,
                checksum.as_deref(),
            );
            if r.is_ok() {
                inner
                    .moves
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            r
        })
        .await
        .unwrap_or_else(|e| Err(MoveError::retryable(format!("publish task failed: {e}"))));
        let revision = started.next_expected_version;
        match moved {
            Ok(path) => {
                let e = PublishSucceeded {
                    published_path: path.display().to_string(),
                    checksum: state.checksum.clone(),
                    duration_ms: clock.elapsed().as_millis() as u64,
                    recovered: false,
                };
                self.append_settled(id, revision, e.to_proposed(&meta(trigger.as_str())))
                    .await?;
                Ok(PublishOutcome {
                    data_id: id.into(),
                    published_path: path.display().to_string(),
                })
            }
            Err(err) => {
                let next_retry_at = (err.retryable && attempt < cfg.max_attempts).then(|| {
                    let at = chrono::Utc::now()
                        + chrono::Duration::from_std(cfg.backoff_after(attempt))
                            .unwrap_or_default();
                    format_time(at)
                });
                let e = PublishFailed {
                    attempt,
                    error: truncate_error(&err.message),
                    retryable: err.retryable,
                    interrupted: false,
                    next_retry_at,
                };
                self.append_settled(id, revision, e.to_proposed(&meta(trigger.as_str())))
                    .await?;
                Err(PublishError::Failed {
                    id: id.into(),
                    error: err.message,
                })
            }
        }
    }

    /// Operator retry of many failed products.
    pub async fn retry_all(&self, max_attempts: Option<u32>, limit: usize) -> Vec<RetryResult> {
        let ids: Vec<String> = self.inner.projections.read(|m| {
            m.failed(max_attempts, limit)
                .into_iter()
                .map(|p| p.data_id.clone())
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
            .map_err(|e| PublishError::Store(StoreError::Storage(e.to_string())))?;
        let stuck: Vec<String> = self.inner.projections.read(|m| {
            m.publishing()
                .into_iter()
                .map(|p| p.data_id.clone())
                .collect()
        });
        let mut settled = 0;
        for id in stuck {
            let state = self.load(&id).await?;
            if state.status != ProductStatus::Publishing {
                continue;
            }
            let checksum = state.checksum.clone();
            let source = PathBuf::from(&state.stage_path);
            let destination = state.destination.clone().map(PathBuf::from);
            let found = tokio::task::spawn_blocking(move || {
                let done = destination
                    .as_deref()
                    .and_then(|d| find_complete(d, checksum.as_deref()));
                let source_ok = checksum_path(&source)
                    .ok()
                    .is_some_and(|(c, _)| Some(c) == checksum);
                if done.is_some() && source.exists() {
                    let _ = remove_path(&source);
                }
                (done, source_ok)
            })
            .await
            .map_err(|e| PublishError::Store(StoreError::Storage(e.to_string())))?;
            let event = match found {
                (Some(path), _) => PublishSucceeded {
                    published_path: path.display().to_string(),
                    checksum: state.checksum.clone(),
                    duration_ms: 0,
                    recovered: true,
                }
                .to_proposed(&meta("recovery")),
                (None, source_ok) => {
                    let attempt = state.publish_attempts + 1;
                    let retryable = source_ok;
                    PublishFailed {
                        attempt,
                        error: if source_ok {
                            "publish interrupted by a crash; the staged file is intact".into()
                        } else {
                            "publish interrupted by a crash; neither a complete destination nor an intact source was found".into()
                        },
                        retryable,
                        interrupted: true,
                        next_retry_at: (retryable && attempt < self.inner.config.max_attempts)
                            .then(|| format_time(chrono::Utc::now())),
                    }
                    .to_proposed(&meta("recovery"))
                }
            };
            // No settle: nothing follows the log yet; the server's follower folds these.
            self.inner
                .ledger
                .append(
                    &stream_of(&id),
                    ExpectedRevision::Exact(state.revision),
                    vec![event],
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

/// BLAKE3 of a file, or of a folder's files (relative names and contents, in name order).
pub fn checksum_path(path: &Path) -> std::io::Result<(String, u64)> {
    let meta = std::fs::metadata(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut size = 0;
    if meta.is_dir() {
        let mut files = Vec::new();
        collect_files(path, path, &mut files)?;
        files.sort();
        for rel in files {
            hasher.update(rel.to_string_lossy().as_bytes());
            hasher.update(&[0]);
            let full = path.join(&rel);
            size += std::fs::metadata(&full)?.len();
            hasher.update_reader(std::fs::File::open(full)?)?;
        }
    } else {
        size = meta.len();
        hasher.update_reader(std::fs::File::open(path)?)?;
    }
    Ok((hasher.finalize().to_hex().to_string(), size))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            // Following it could pull in a file from outside the stage root.
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is a symbolic link inside a staged folder",
                    path.display()
                ),
            ));
        }
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    Ok(())
}

const TMP_PREFIX: &str = ".contimg-tmp-";

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

fn copy_durably(src: &Path, dst: &Path) -> std::io::Result<()> {
    if std::fs::metadata(src)?.is_dir() {
        std::fs::create_dir(dst)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            copy_durably(&entry.path(), &dst.join(entry.file_name()))?;
        }
        fsync_dir(dst)
    } else {
        std::fs::copy(src, dst)?;
        std::fs::File::open(dst)?.sync_all()
    }
}

fn remove_path(p: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(p)?.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

/// Renames without replacing: fails with `AlreadyExists` when `to` exists.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let f = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let t = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and nothing else.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn suffixed(name: &str, n: u32) -> String {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => format!("{stem}_{n}.{ext}"),
        _ => format!("{name}_{n}"),
    }
}

/// `dest` or one of its suffixed names, complete with the right checksum.
fn find_complete(dest: &Path, checksum: Option<&str>) -> Option<PathBuf> {
    let checksum = checksum?;
    let dir = dest.parent()?;
    let name = dest.file_name()?.to_string_lossy().to_string();
    std::iter::once(dest.to_path_buf())
        .chain((1..100).map(|n| dir.join(suffixed(&name, n))))
        .find(|p| checksum_path(p).is_ok_and(|(c, _)| c == checksum))
}

/// The move: copy into a temporary name in the destination folder, fsync, rename (never
/// over an existing file), fsync the folder, verify the checksum, remove the source.
/// An existing destination with the same checksum is success; another one gets a suffix.
pub fn move_product(
    source: &Path,
    products_root: &Path,
    dest_dir: &Path,
    name: &str,
    checksum: Option<&str>,
) -> Result<PathBuf, MoveError> {
    let (actual, _) = checksum_path(source)
        .map_err(|e| MoveError::io(&format!("staged file {}", source.display()), e))?;
    if let Some(expected) = checksum
        && actual != expected
    {
        return Err(MoveError::fatal(format!(
            "staged file {} changed since it was registered (checksum {actual}, expected {expected})",
            source.display()
        )));
    }
    std::fs::create_dir_all(dest_dir)
        .map_err(|e| MoveError::io("creating the products folder", e))?;
    paths::check_destination(products_root, &dest_dir.join(name))
        .map_err(|e| MoveError::fatal(e.to_string()))?;
    let tmp = dest_dir.join(format!("{TMP_PREFIX}{}-{name}", uuid::Uuid::new_v4()));
    let result = (|| {
        copy_durably(source, &tmp)
            .map_err(|e| MoveError::io("copying into the products root", e))?;
        for n in 0..100u32 {
            let candidate = if n == 0 {
                dest_dir.join(name)
            } else {
                dest_dir.join(suffixed(name, n))
            };
            match rename_noreplace(&tmp, &candidate) {
                Ok(()) => return Ok(candidate),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if checksum_path(&candidate).is_ok_and(|(c, _)| c == actual) {
                        let _ = remove_path(&tmp);
                        return Ok(candidate);
                    }
                }
                Err(e) => return Err(MoveError::io("renaming into place", e)),
            }
        }
        Err(MoveError::fatal(format!(
            "100 products named like {name} already exist"
        )))
    })();
    let dest = match result {
        Ok(d) => d,
        Err(e) => {
            let _ = remove_path(&tmp);
            return Err(e);
        }
    };
    fsync_dir(dest_dir).map_err(|e| MoveError::io("syncing the products folder", e))?;
    let (written, _) =
        checksum_path(&dest).map_err(|e| MoveError::io("verifying the published copy", e))?;
    if written != actual {
        let _ = remove_path(&dest);
        return Err(MoveError::retryable(format!(
            "published copy of {} does not match its checksum",
            source.display()
        )));
    }
    // The copy is verified: the product is published. A staged copy that will not go away
    // is worth a warning, not a failed publish (which would retry against a half-removed
    // source).
    if let Err(e) = remove_path(source) {
        tracing::warn!(path = %source.display(), error = %e, "published, but the staged copy could not be removed");
    }
    if let Some(parent) = source.parent() {
        let _ = fsync_dir(parent);
    }
    Ok(dest)
}

/// Removes temporary copies left by an interrupted move (only the owner publishes, and
/// this runs before it starts, so none is in use).
fn remove_temporaries(products_root: &Path) {
    let Ok(dirs) = std::fs::read_dir(products_root) else {
        return;
    };
    for dir in dirs.flatten() {
        let Ok(entries) = std::fs::read_dir(dir.path()) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                tracing::warn!(path = %e.path().display(), "removing a temporary file left by a crash");
                let _ = remove_path(&e.path());
            }
        }
    }
}
