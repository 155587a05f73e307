//! The event store on PostgreSQL: the same log, on a database several servers share.
//!
//! Tables (schema version 1, in the connection's current schema):
//! - `contimg_meta (key, value)`: `format = contimg-ledger`, `schema_version = 1`;
//! - `contimg_head`: one row, the log's next position and last commit time. Every commit
//!   takes it `FOR UPDATE` first, so commits are serialised across servers: positions are
//!   gapless and committed in position order, and a reader that sees the head at N sees
//!   every event below N;
//! - `contimg_events (position, stream, revision, event_id, record)`: the log; `record` is
//!   the same encoded record as in a sled chunk (format byte, CRC-32, bincode body), so
//!   checksums, `verify` and exports are the same; unique on (stream, revision) and
//!   (stream, event_id), the durable idempotency index;
//! - `contimg_streams (stream, revision)`: stream heads;
//! - `contimg_snapshots (name, checkpoint, bytes)`: projection snapshots, not the log.
//!
//! One writer task per server takes every queued request into one transaction: lock the
//! head row, look up the heads and ids the batch names (two queries), decide with the
//! shared [`Planner`], insert the accepted records with `UNNEST` arrays, move the head,
//! `pg_notify` the new head, commit. The commit returns once PostgreSQL has made it
//! durable (`synchronous_commit = on`), and only then are the appenders answered. A
//! connection lost mid-commit answers 503 (`StoreError::Database`): the append was not
//! acknowledged, and a retry with the same event ids is idempotent.
//!
//! Each server follows the head through `LISTEN contimg_log` (and after its own commits);
//! a reconnecting listener re-reads the head row, so nothing is missed and nothing polls.
//! Leadership (the automatic publisher, crash recovery) is a session advisory lock, held
//! on a connection of its own while the server lives; PostgreSQL releases it when that
//! session ends, and another server takes it within a second or two.
//!
//! The store runs its own small Tokio runtime, so its blocking reads may be called from
//! anywhere, async code included, as the sled store's are.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

use super::super::error::StoreError;
use super::super::record::RecordedEvent;
use super::gather::Gather;
use super::plan::{Index, Plan, Planner};
use super::{
    AppendResult, Direction, MAX_COMMIT_EVENTS, RawBytes, RawRecord, Snapshot, SnapshotReader,
    WriterMsg, decode_at, now_micros,
};

/// The schema this build reads and writes.
pub const SCHEMA_VERSION: &str = "1";
const FORMAT: &str = "contimg-ledger";
/// The channel commits are announced on (payload: the new head).
const CHANNEL: &str = "contimg_log";
/// The advisory lock of leadership ("contimg" in ASCII).
const LEADER_LOCK: i64 = 0x0063_6f6e_7469_6d67;
/// The advisory lock that serialises creating the tables.
const INIT_LOCK: i64 = LEADER_LOCK + 1;
/// Longest a group commit may take before its connection is given up (503).
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// A group commit stops taking requests past this many bytes of payload.
const MAX_COMMIT_BYTES: usize = 64 * 1024 * 1024;
/// Records a streamed replay hands over at a time.
const STREAM_CHUNK: usize = 4096;

const SCHEMA: &str = "
CREATE TABLE contimg_meta (key text PRIMARY KEY, value text NOT NULL);
INSERT INTO contimg_meta VALUES ('format', 'contimg-ledger'), ('schema_version', '1');
CREATE TABLE contimg_head (
    id int PRIMARY KEY CHECK (id = 1),
    next_position bigint NOT NULL CHECK (next_position >= 0),
    last_created bigint NOT NULL,
    leader_epoch bigint NOT NULL
);
INSERT INTO contimg_head VALUES (1, 0, -9223372036854775808, 0);
CREATE TABLE contimg_events (
    position bigint PRIMARY KEY CHECK (position >= 0),
    stream text NOT NULL,
    revision bigint NOT NULL,
    event_id uuid NOT NULL,
    record bytea NOT NULL,
    UNIQUE (stream, revision),
    UNIQUE (stream, event_id)
);
CREATE TABLE contimg_streams (stream text PRIMARY KEY, revision bigint NOT NULL);
CREATE TABLE contimg_snapshots (name text PRIMARY KEY, checkpoint bigint, bytes bytea NOT NULL);
";

/// What the store's tasks share.
struct Shared {
    config: tokio_postgres::Config,
    /// Events readable here: positions `0..durable` are committed.
    durable: AtomicU64,
    syncs: AtomicU64,
    head_tx: watch::Sender<u64>,
    closed: AtomicBool,
    /// The leader epoch this server holds (0: it does not lead). Taking the lead bumps the
    /// epoch in the head row; a commit carrying a move's events is refused unless the row
    /// still holds this server's epoch, so a deposed leader cannot record a move even
    /// before it notices that it lost the lead.
    epoch: std::sync::atomic::AtomicI64,
}

impl Shared {
    /// Moves the readable head forward (never back) and wakes the readers.
    fn advance(&self, head: u64) {
        let before = self.durable.fetch_max(head, Ordering::AcqRel);
        if head > before {
            self.head_tx.send_if_modified(|h| {
                let grew = head > *h;
                *h = (*h).max(head);
                grew
            });
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    describe: String,
    dir: PathBuf,
    /// `Some` until dropped; shut down in the background, so a drop inside async code is
    /// fine.
    rt: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    sender: Mutex<Option<mpsc::UnboundedSender<WriterMsg>>>,
    writer_done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    reader: Arc<tokio::sync::Mutex<Option<Arc<Client>>>>,
    leader: Mutex<Option<watch::Receiver<bool>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.lock().ok().and_then(|mut r| r.take()) {
            rt.shutdown_background();
        }
    }
}

/// A handle to a PostgreSQL ledger. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("ledger", &self.inner.describe)
            .finish()
    }
}

fn db_error(what: &str) -> impl FnOnce(tokio_postgres::Error) -> StoreError + '_ {
    move |source| StoreError::Database {
        what: what.to_string(),
        source,
    }
}

/// `postgres://user@host:port/db`, without the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// A connection, its driver running on the current runtime.
async fn connect(
    config: &tokio_postgres::Config,
) -> Result<(Client, tokio::task::JoinHandle<()>), StoreError> {
    let (client, conn) = config
        .connect(NoTls)
        .await
        .map_err(db_error("connecting to the ledger database"))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "a ledger database connection ended");
        }
    });
    Ok((client, driver))
}

impl PgStore {
    /// Connects, checks that the database is a contimg ledger of this schema version (an
    /// empty database gets the tables), and starts the writer and the head listener.
    pub fn connect(
        url: &str,
        dir: &Path,
        create: bool,
        sync_seconds: prometheus_client::metrics::histogram::Histogram,
    ) -> Result<PgStore, StoreError> {
        let config = parse_url(url)?;
        let describe = describe(&config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("contimg-pg")
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let init_config = config.clone();
        // A runtime may not be dropped inside async code (serve opens the store there).
        let head = match run_on(&handle, async move { init(&init_config, create).await }) {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => {
                rt.shutdown_background();
                return Err(StoreError::NotALedger(
                    "the database is empty: it holds no contimg ledger yet (contimg serve or \
                     contimg import makes one)"
                        .into(),
                ));
            }
            Ok(Err(e)) | Err(e) => {
                rt.shutdown_background();
                return Err(e);
            }
        };
        let (head_tx, _) = watch::channel(head);
        let shared = Arc::new(Shared {
            config,
            durable: AtomicU64::new(head),
            syncs: AtomicU64::new(0),
            head_tx,
            closed: AtomicBool::new(false),
            epoch: std::sync::atomic::AtomicI64::new(0),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        handle.spawn(write_loop(shared.clone(), rx, done_tx, sync_seconds));
        handle.spawn(listen_loop(shared.clone()));
        tracing::info!(ledger = %describe, events = head, "ledger on PostgreSQL");
        Ok(PgStore {
            inner: Arc::new(Inner {
                shared,
                describe,
                dir: dir.to_path_buf(),
                rt: Mutex::new(Some(rt)),
                handle,
                sender: Mutex::new(Some(tx)),
                writer_done: Mutex::new(Some(done_rx)),
                reader: Arc::new(tokio::sync::Mutex::new(None)),
                leader: Mutex::new(None),
            }),
        })
    }

    pub fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn event_count(&self) -> u64 {
        self.inner.shared.durable.load(Ordering::Acquire)
    }

    pub fn sync_count(&self) -> u64 {
        self.inner.shared.syncs.load(Ordering::Relaxed)
    }

    pub(super) fn send(&self, msg: WriterMsg) -> Result<(), StoreError> {
        let guard = self.inner.sender.lock().expect("sender mutex");
        let sender = guard.as_ref().ok_or(StoreError::Closed)?;
        sender.send(msg).map_err(|_| StoreError::Closed)
    }

    /// Stops taking appends and waits until the writer has answered what it holds.
    pub fn close(&self) {
        drop(self.inner.sender.lock().expect("sender mutex").take());
        if let Some(done) = self.inner.writer_done.lock().expect("writer mutex").take() {
            let _ = done.recv();
        }
        self.inner.shared.closed.store(true, Ordering::Release);
        self.inner.shared.head_tx.send_modify(|_| {});
    }

    pub fn is_closed(&self) -> bool {
        self.inner.shared.closed.load(Ordering::Acquire)
    }

    pub fn head_watch(&self) -> watch::Receiver<u64> {
        self.inner.shared.head_tx.subscribe()
    }

    /// Runs a query on the read connection (reconnecting when it was lost) on the store's
    /// runtime, and waits for it.
    fn query<T: Send + 'static, F>(&self, what: &'static str, f: F) -> Result<T, StoreError>
    where
        F: for<'c> FnOnce(
                &'c Client,
            )
                -> futures::future::BoxFuture<'c, Result<T, tokio_postgres::Error>>
            + Send
            + 'static,
    {
        let shared = self.inner.shared.clone();
        let reader = self.inner.reader.clone();
        run_on(&self.inner.handle, async move {
            // The lock covers only (re)connecting: queries on one connection pipeline.
            let client = {
                let mut guard = reader.lock().await;
                match guard.as_ref() {
                    Some(c) if !c.is_closed() => c.clone(),
                    _ => {
                        let c = Arc::new(connect(&shared.config).await?.0);
                        *guard = Some(c.clone());
                        c
                    }
                }
            };
            f(&client).await.map_err(db_error(what))
        })?
    }

    pub fn stream_head(&self, stream: &str) -> Result<Option<u64>, StoreError> {
        let stream = stream.to_string();
        let durable = self.event_count() as i64;
        self.query("reading a stream head", move |c| {
            Box::pin(async move {
                let row = c
                    .query_one(
                        "SELECT max(revision) FROM contimg_events WHERE stream = $1 AND position < $2",
                        &[&stream, &durable],
                    )
                    .await?;
                Ok(row.get::<_, Option<i64>>(0).map(|r| r as u64))
            })
        })
    }

    pub fn read_stream(
        &self,
        stream: &str,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let durable = self.event_count() as i64;
        let limit = limit.min(i64::MAX as usize) as i64;
        let name = stream.to_string();
        let rows: Vec<(i64, Vec<u8>)> = self.query("reading a stream", move |c| {
            Box::pin(async move {
                let rows = match direction {
                    Direction::Forward => {
                        let from = from.unwrap_or(0).min(i64::MAX as u64) as i64;
                        c.query(
                            "SELECT position, record FROM contimg_events WHERE stream = $1 \
                             AND revision >= $2 AND position < $3 ORDER BY revision LIMIT $4",
                            &[&name, &from, &durable, &limit],
                        )
                        .await?
                    }
                    Direction::Backward => {
                        let from = from.unwrap_or(u64::MAX).min(i64::MAX as u64) as i64;
                        c.query(
                            "SELECT position, record FROM contimg_events WHERE stream = $1 \
                             AND revision <= $2 AND position < $3 ORDER BY revision DESC LIMIT $4",
                            &[&name, &from, &durable, &limit],
                        )
                        .await?
                    }
                };
                let mut out: Vec<(i64, Vec<u8>)> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                if out.is_empty() {
                    let exists = c
                        .query_opt(
                            "SELECT 1 FROM contimg_events WHERE stream = $1 AND position < $2 LIMIT 1",
                            &[&name, &durable],
                        )
                        .await?;
                    if exists.is_none() {
                        out.push((-1, Vec::new()));
                    }
                }
                Ok(out)
            })
        })?;
        if rows.first().is_some_and(|(p, _)| *p < 0) {
            return Err(StoreError::StreamNotFound(stream.to_string()));
        }
        rows.into_iter()
            .map(|(p, bytes)| decode_at(p as u64, &bytes))
            .collect()
    }

    pub fn read_all(
        &self,
        from: Option<u64>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let durable = self.event_count();
        let limit = limit.min(i64::MAX as usize) as i64;
        let (low, high, sql) = match direction {
            Direction::Forward => {
                let start = from.unwrap_or(0);
                if start >= durable {
                    return Ok(Vec::new());
                }
                (
                    start as i64,
                    durable as i64,
                    "SELECT position, record FROM contimg_events WHERE position >= $1 \
                     AND position < $2 ORDER BY position LIMIT $3",
                )
            }
            Direction::Backward => {
                let Some(last) = durable.checked_sub(1) else {
                    return Ok(Vec::new());
                };
                let start = from.unwrap_or(last).min(last);
                (
                    0,
                    start as i64 + 1,
                    "SELECT position, record FROM contimg_events WHERE position >= $1 \
                     AND position < $2 ORDER BY position DESC LIMIT $3",
                )
            }
        };
        let rows: Vec<(i64, Vec<u8>)> = self.query("reading the log", move |c| {
            Box::pin(async move {
                let rows = c.query(sql, &[&low, &high, &limit]).await?;
                Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
            })
        })?;
        rows.into_iter()
            .map(|(p, bytes)| decode_at(p as u64, &bytes))
            .collect()
    }

    /// Every durable record from `from` on (up to the head when called), streamed by one
    /// `COPY ... TO STDOUT (FORMAT binary)` on a connection of its own: one plan and one
    /// pass over the range, read ahead while the caller folds.
    pub fn raw_from(&self, from: u64) -> RawIter {
        RawIter {
            store: self.clone(),
            rx: None,
            next: from,
            end: self.event_count().max(from),
            buf: VecDeque::new(),
            failed: false,
        }
    }

    /// Starts streaming `[from, end)` into a channel of chunks.
    fn stream_range(
        &self,
        from: u64,
        end: u64,
    ) -> mpsc::Receiver<Result<Vec<RawRecord>, StoreError>> {
        let (tx, rx) = mpsc::channel(8);
        let shared = self.inner.shared.clone();
        self.inner.handle.spawn(async move {
            let result = async {
                let (client, _driver) = connect(&shared.config).await?;
                let copy = client
                    .copy_out(&format!(
                        "COPY (SELECT position, record FROM contimg_events \
                         WHERE position >= {from} AND position < {end} ORDER BY position) \
                         TO STDOUT (FORMAT binary)"
                    ))
                    .await
                    .map_err(db_error("reading the log"))?;
                let rows = tokio_postgres::binary_copy::BinaryCopyOutStream::new(
                    copy,
                    &[
                        tokio_postgres::types::Type::INT8,
                        tokio_postgres::types::Type::BYTEA,
                    ],
                );
                send_chunks(rows, &tx, "reading the log", |row| {
                    let bytes: Vec<u8> = row.try_get(1)?;
                    Ok(RawRecord {
                        position: row.try_get::<i64>(0)? as u64,
                        range: 0..bytes.len(),
                        bytes: RawBytes::Owned(bytes),
                    })
                })
                .await?;
                Ok::<(), StoreError>(())
            }
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    pub fn save_snapshot(
        &self,
        name: &str,
        checkpoint: Option<u64>,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        let (name, bytes) = (name.to_string(), bytes.to_vec());
        let checkpoint = checkpoint.map(|c| c as i64);
        self.query("saving a snapshot", move |c| {
            Box::pin(async move {
                c.execute(
                    "INSERT INTO contimg_snapshots (name, checkpoint, bytes) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET checkpoint = EXCLUDED.checkpoint, bytes = EXCLUDED.bytes",
                    &[&name, &checkpoint, &bytes],
                )
                .await
                .map(|_| ())
            })
        })
    }

    pub fn open_snapshot(&self, name: &str) -> Result<Option<SnapshotReader>, StoreError> {
        Ok(self.load_row(name)?.map(|(checkpoint, bytes)| {
            let len = bytes.len() as u64;
            SnapshotReader::new(checkpoint, len, Box::new(std::io::Cursor::new(bytes)))
        }))
    }

    fn load_row(&self, name: &str) -> Result<Option<Snapshot>, StoreError> {
        let name = name.to_string();
        self.query("loading a snapshot", move |c| {
            Box::pin(async move {
                let row = c
                    .query_opt(
                        "SELECT checkpoint, bytes FROM contimg_snapshots WHERE name = $1",
                        &[&name],
                    )
                    .await?;
                Ok(row.map(|r| {
                    (
                        r.get::<_, Option<i64>>(0).map(|c| c as u64),
                        r.get::<_, Vec<u8>>(1),
                    )
                }))
            })
        })
    }

    pub fn size_on_disk(&self) -> u64 {
        self.query("measuring the log", |c| {
            Box::pin(async move {
                let row = c
                    .query_one("SELECT pg_total_relation_size('contimg_events')", &[])
                    .await?;
                Ok(row.get::<_, i64>(0) as u64)
            })
        })
        .unwrap_or(0)
    }

    /// Everything `verify` reads, from one consistent snapshot of the database (one
    /// `REPEATABLE READ` transaction): the head row, the stream heads, then every row in
    /// position order, streamed. Servers may keep appending meanwhile.
    pub fn scan_snapshot(&self) -> Result<ScanSnapshot, StoreError> {
        let (first_tx, first_rx) = std::sync::mpsc::sync_channel(1);
        let (tx, rx) = mpsc::channel(8);
        let shared = self.inner.shared.clone();
        self.inner.handle.spawn(async move {
            let what = "reading the log for verify";
            let scan = async {
                let (client, _driver) = connect(&shared.config).await?;
                client
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await
                    .map_err(db_error(what))?;
                let head = client
                    .query_one("SELECT next_position FROM contimg_head WHERE id = 1", &[])
                    .await
                    .and_then(|r| r.try_get::<_, i64>(0))
                    .map_err(db_error(what))?;
                let heads = client
                    .query("SELECT stream, revision FROM contimg_streams", &[])
                    .await
                    .map_err(db_error(what))?
                    .iter()
                    .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)? as u64)))
                    .collect::<Result<HashMap<_, _>, tokio_postgres::Error>>()
                    .map_err(db_error(what))?;
                let _ = first_tx.send(Ok((head.max(0) as u64, heads)));
                use tokio_postgres::types::Type;
                let copy = client
                    .copy_out(
                        "COPY (SELECT position, stream, revision, event_id, record \
                         FROM contimg_events ORDER BY position) TO STDOUT (FORMAT binary)",
                    )
                    .await
                    .map_err(db_error(what))?;
                let rows = tokio_postgres::binary_copy::BinaryCopyOutStream::new(
                    copy,
                    &[Type::INT8, Type::TEXT, Type::INT8, Type::UUID, Type::BYTEA],
                );
                if !send_chunks(rows, &tx, what, |row| {
                    Ok(ScannedRow {
                        position: row.try_get::<i64>(0)? as u64,
                        stream: row.try_get(1)?,
                        revision: row.try_get::<i64>(2)? as u64,
                        event_id: row.try_get(3)?,
                        record: row.try_get(4)?,
                    })
                })
                .await?
                {
                    return Ok(());
                }
                let _ = client.batch_execute("COMMIT").await;
                Ok::<(), StoreError>(())
            }
            .await;
            if let Err(e) = scan {
                let msg = crate::events::error::chain(&e);
                let _ = first_tx.send(Err(StoreError::Unavailable(msg.clone())));
                let _ = tx.send(Err(StoreError::Unavailable(msg))).await;
            }
        });
        let (head, heads) = first_rx.recv().map_err(|_| StoreError::Closed)??;
        Ok(ScanSnapshot {
            head,
            heads,
            rows: rx,
            buf: VecDeque::new(),
            done: false,
        })
    }

    /// Whether this server holds the ledger's leadership, followed as it changes. The
    /// first call starts the task that tries for the advisory lock every second.
    pub fn leadership(&self) -> watch::Receiver<bool> {
        let mut slot = self.inner.leader.lock().expect("leader mutex");
        if let Some(rx) = slot.as_ref() {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(false);
        self.inner
            .handle
            .spawn(lead_loop(self.inner.shared.clone(), tx));
        *slot = Some(rx.clone());
        rx
    }
}

/// One snapshot of the ledger for `verify`: its head, its stream heads, and its rows.
pub struct ScanSnapshot {
    pub head: u64,
    pub heads: HashMap<String, u64>,
    rows: mpsc::Receiver<Result<Vec<ScannedRow>, StoreError>>,
    buf: VecDeque<ScannedRow>,
    done: bool,
}

impl Iterator for ScanSnapshot {
    type Item = Result<ScannedRow, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(r) = self.buf.pop_front() {
            return Some(Ok(r));
        }
        if self.done {
            return None;
        }
        match futures::executor::block_on(tokio::task::unconstrained(self.rows.recv())) {
            Some(Ok(chunk)) => {
                self.buf.extend(chunk);
                self.buf.pop_front().map(Ok)
            }
            Some(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
            None => {
                self.done = true;
                None
            }
        }
    }
}

/// A row of the events table, as `verify` reads it.
pub struct ScannedRow {
    pub position: u64,
    pub stream: String,
    pub revision: u64,
    pub event_id: Uuid,
    pub record: Vec<u8>,
}

/// Reads a binary `COPY` stream to its end, turning each row into `T` with `convert` and
/// sending them in chunks of [`STREAM_CHUNK`]. `Ok(false)` when the receiver went away
/// (the reader stopped early).
async fn send_chunks<T>(
    rows: tokio_postgres::binary_copy::BinaryCopyOutStream,
    tx: &mpsc::Sender<Result<Vec<T>, StoreError>>,
    what: &'static str,
    convert: impl Fn(&tokio_postgres::binary_copy::BinaryCopyOutRow) -> Result<T, tokio_postgres::Error>,
) -> Result<bool, StoreError> {
    futures::pin_mut!(rows);
    let mut chunk = Vec::with_capacity(STREAM_CHUNK);
    while let Some(row) = rows.next().await {
        let row = row.map_err(db_error(what))?;
        chunk.push(convert(&row).map_err(db_error(what))?);
        if chunk.len() == STREAM_CHUNK {
            let full = std::mem::replace(&mut chunk, Vec::with_capacity(STREAM_CHUNK));
            if tx.send(Ok(full)).await.is_err() {
                return Ok(false);
            }
        }
    }
    if !chunk.is_empty() {
        return Ok(tx.send(Ok(chunk)).await.is_ok());
    }
    Ok(true)
}

/// Runs `fut` on `handle` and waits for it from any thread (async code included).
fn run_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv().map_err(|_| StoreError::Closed)
}

/// Checks the database (or, when `create`, makes the tables in an empty one) and reads
/// the head; `None` for an empty database left as it is.
async fn init(config: &tokio_postgres::Config, create: bool) -> Result<Option<u64>, StoreError> {
    let (mut client, _driver) = connect(config).await?;
    let tx = client
        .transaction()
        .await
        .map_err(db_error("starting the schema check"))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INIT_LOCK])
        .await
        .map_err(db_error("locking the schema check"))?;
    let has_meta = tx
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'contimg_meta'",
            &[],
        )
        .await
        .map_err(db_error("reading the catalog"))?
        .is_some();
    if has_meta {
        let rows = tx
            .query("SELECT key, value FROM contimg_meta", &[])
            .await
            .map_err(db_error("reading contimg_meta"))?;
        let meta: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(StoreError::NotALedger(
                "its contimg_meta table does not name a contimg ledger".into(),
            ));
        }
        let version = meta.get("schema_version").cloned().unwrap_or_default();
        if version != SCHEMA_VERSION {
            return Err(StoreError::NotALedger(format!(
                "its schema version is {version:?}; this contimg reads version {SCHEMA_VERSION}"
            )));
        }
    } else {
        let others = tx
            .query(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY tablename LIMIT 5",
                &[],
            )
            .await
            .map_err(db_error("reading the catalog"))?;
        if !others.is_empty() {
            let names: Vec<String> = others.iter().map(|r| r.get(0)).collect();
            return Err(StoreError::NotALedger(format!(
                "it holds other tables ({}) and no contimg ledger; give contimg an empty database",
                names.join(", ")
            )));
        }
        if !create {
            return Ok(None);
        }
        tx.batch_execute(SCHEMA)
            .await
            .map_err(db_error("creating the ledger's tables"))?;
        tracing::info!("created a new ledger's tables");
    }
    let head = tx
        .query_one("SELECT next_position FROM contimg_head WHERE id = 1", &[])
        .await
        .map_err(db_error("reading the log's head"))?
        .get::<_, i64>(0) as u64;
    tx.commit()
        .await
        .map_err(db_error("finishing the schema check"))?;
    Ok(Some(head))
}

fn parse_url(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        StoreError::InvalidInput(format!(
            "the ledger URL is not a PostgreSQL connection string ({e}); \
             write postgres://USER@HOST[:PORT]/DATABASE"
        ))
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.application_name("contimg");
    // A peer that vanishes without closing (a dead host, a cut network) is noticed within
    // seconds, not the system's two hours: commits fail (503) instead of hanging, and a
    // leader cut off loses its lead.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(10));
    config.keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_secs(30));
    // Every connection must reach a primary: a standby takes no commits, and its reads lag.
    if matches!(
        config.get_target_session_attrs(),
        tokio_postgres::config::TargetSessionAttrs::Any
    ) {
        config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
    }
    Ok(config)
}

/// What `contimg validate` says of a PostgreSQL ledger, changing nothing: its events, or
/// that the database is empty (serve makes the tables), or why it cannot be used.
pub fn probe(url: &str) -> Result<(String, Option<u64>), StoreError> {
    let config = parse_url(url)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let head = rt.block_on(init(&config, false))?;
    Ok((describe(&config), head))
}

/// What a commit found committed: the heads and ids its requests name.
struct Fetched {
    heads: HashMap<String, u64>,
    ids: HashMap<(String, Uuid), (u64, u64)>,
}

impl Index for Fetched {
    fn head(&mut self, stream: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.heads.get(stream).copied())
    }
    fn find_id(&mut self, stream: &str, id: Uuid) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(self.ids.get(&(stream.to_string(), id)).copied())
    }
}

enum Outcome {
    Append(Result<AppendResult, StoreError>),
    Import(Result<(), StoreError>),
}

/// One group commit: decide every request under the head row's lock, write the accepted
/// records, move and announce the head, commit.
async fn commit(
    client: &mut Client,
    batch: &[WriterMsg],
    epoch: i64,
) -> Result<(Vec<Outcome>, u64), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let row = tx
        .query_one(
            "SELECT next_position, last_created, leader_epoch FROM contimg_head WHERE id = 1 FOR UPDATE",
            &[],
        )
        .await?;
    let current_epoch: i64 = row.try_get(2)?;
    let leads = epoch != 0 && epoch == current_epoch;
    let mut planner = Planner {
        next_position: row.try_get::<_, i64>(0)? as u64,
        last_created: row.try_get(1)?,
    };
    let mut streams: Vec<&str> = Vec::new();
    let mut id_streams: Vec<&str> = Vec::new();
    let mut id_ids: Vec<Uuid> = Vec::new();
    for m in batch {
        match m {
            WriterMsg::Append(r) => {
                streams.push(&r.stream);
                for e in &r.events {
                    id_streams.push(&r.stream);
                    id_ids.push(e.event_id);
                }
            }
            WriterMsg::Import(r) => {
                for rec in &r.records {
                    streams.push(&rec.stream_id);
                    id_streams.push(&rec.stream_id);
                    id_ids.push(rec.event_id);
                }
            }
        }
    }
    streams.sort_unstable();
    streams.dedup();
    let heads = tx
        .query(
            "SELECT stream, revision FROM contimg_streams WHERE stream = ANY($1)",
            &[&streams],
        )
        .await?
        .iter()
        .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)? as u64)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let ids = tx
        .query(
            "SELECT e.stream, e.event_id, e.revision, e.position FROM contimg_events e \
             JOIN UNNEST($1::text[], $2::uuid[]) AS k(stream, event_id) USING (stream, event_id)",
            &[&id_streams, &id_ids],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                (r.try_get::<_, String>(0)?, r.try_get::<_, Uuid>(1)?),
                (
                    r.try_get::<_, i64>(2)? as u64,
                    r.try_get::<_, i64>(3)? as u64,
                ),
            ))
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    let mut index = Fetched { heads, ids };
    let mut plan = Plan::default();
    let now = now_micros();
    let outcomes = batch
        .iter()
        .map(|m| match m {
            WriterMsg::Append(r)
                if !leads
                    && r.events
                        .iter()
                        .any(|e| crate::events::catalogue::leader_only(&e.event_type)) =>
            {
                Outcome::Append(Err(StoreError::Unavailable(format!(
                    "{} records a move of files, which only the ledger's leader may do; \
                     this server does not lead it (now)",
                    r.stream
                ))))
            }
            WriterMsg::Append(r) => Outcome::Append(
                planner.append(&r.stream, r.expected, &r.events, &mut plan, &mut index, now),
            ),
            WriterMsg::Import(r) => {
                Outcome::Import(planner.import(&r.records, &mut plan, &mut index))
            }
        })
        .collect();
    if !plan.records.is_empty() {
        let n = plan.records.len();
        let mut positions = Vec::with_capacity(n);
        let mut rec_streams = Vec::with_capacity(n);
        let mut revisions = Vec::with_capacity(n);
        let mut event_ids = Vec::with_capacity(n);
        let mut bytes: Vec<&[u8]> = Vec::with_capacity(n);
        for (r, encoded) in &plan.records {
            positions.push(r.position as i64);
            rec_streams.push(r.stream_id.as_str());
            revisions.push(r.revision as i64);
            event_ids.push(r.event_id);
            bytes.push(encoded);
        }
        tx.execute(
            "INSERT INTO contimg_events (position, stream, revision, event_id, record) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::bigint[], $4::uuid[], $5::bytea[])",
            &[&positions, &rec_streams, &revisions, &event_ids, &bytes],
        )
        .await?;
        let (head_streams, head_revisions): (Vec<&str>, Vec<i64>) = plan
            .heads
            .iter()
            .map(|(s, r)| (s.as_str(), *r as i64))
            .unzip();
        tx.execute(
            "INSERT INTO contimg_streams (stream, revision) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[]) \
             ON CONFLICT (stream) DO UPDATE SET revision = EXCLUDED.revision",
            &[&head_streams, &head_revisions],
        )
        .await?;
        tx.execute(
            "UPDATE contimg_head SET next_position = $1, last_created = $2 WHERE id = 1",
            &[&(planner.next_position as i64), &planner.last_created],
        )
        .await?;
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&CHANNEL, &planner.next_position.to_string()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok((outcomes, planner.next_position))
}

/// The writer's connection: whatever the role's or database's defaults, a commit
/// returns only once durable, and sees other servers' commits after taking the head lock.
async fn writer_connection(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, _) = connect(config).await?;
    client
        .batch_execute(
            "SET synchronous_commit = on; \
             SET default_transaction_isolation = 'read committed'; \
             SET statement_timeout = 0",
        )
        .await
        .map_err(db_error("setting up the writer's session"))?;
    Ok(client)
}

/// The writer: group commits, one transaction each, answered once committed.
async fn write_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<WriterMsg>,
    done: std::sync::mpsc::SyncSender<()>,
    sync_seconds: prometheus_client::metrics::histogram::Histogram,
) {
    let mut client: Option<Client> = None;
    let mut gather = Gather::START;
    while let Some(first) = rx.recv().await {
        let taking = std::time::Instant::now();
        let mut batch = vec![first];
        let mut count = batch[0].len();
        let mut bytes = batch[0].bytes();
        while count < MAX_COMMIT_EVENTS && bytes < MAX_COMMIT_BYTES {
            let next = match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match gather.wait_for_more(batch.len(), taking.elapsed()) {
                        Some(left) => tokio::time::timeout(left, rx.recv()).await.ok().flatten(),
                        None => None,
                    }
                }
            };
            let Some(m) = next else { break };
            count += m.len();
            bytes += m.bytes();
            batch.push(m);
        }
        let held = batch.len();
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match writer_connection(&shared.config).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    let detail = crate::events::error::chain(&e);
                    tracing::warn!(error = %detail, "the ledger database is unreachable; appends refused");
                    batch
                        .into_iter()
                        .for_each(|m| m.refuse(|| StoreError::Unavailable(detail.clone())));
                    gather = gather.after(held, None);
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected");
        let epoch = shared.epoch.load(Ordering::Acquire);
        let started = std::time::Instant::now();
        let committed = match tokio::time::timeout(COMMIT_TIMEOUT, commit(c, &batch, epoch)).await {
            Ok(r) => r.map_err(|e| crate::events::error::chain(&e)),
            Err(_) => Err(format!(
                "no answer from the database within {} s",
                COMMIT_TIMEOUT.as_secs()
            )),
        };
        match committed {
            Ok((outcomes, end)) => {
                let took = started.elapsed();
                sync_seconds.observe(took.as_secs_f64());
                gather = gather.after(held, Some(took));
                shared.syncs.fetch_add(1, Ordering::Relaxed);
                shared.advance(end);
                for (m, o) in batch.into_iter().zip(outcomes) {
                    match (m, o) {
                        (WriterMsg::Append(r), Outcome::Append(o)) => drop(r.reply.send(o)),
                        (WriterMsg::Import(r), Outcome::Import(o)) => drop(r.reply.send(o)),
                        _ => unreachable!("outcomes follow the batch"),
                    }
                }
            }
            Err(e) => {
                let detail = format!("the commit failed: {e}");
                tracing::warn!(error = %detail, "a group commit failed; its appends were not acknowledged");
                // A new connection next time: this one may be closed, or stuck mid-commit.
                client = None;
                gather = gather.after(held, None);
                batch
                    .into_iter()
                    .for_each(|m| m.refuse(|| StoreError::Unavailable(detail.clone())));
            }
        }
    }
    let _ = done.send(());
}

/// Follows the head. A notification only wakes the follower, which then reads the head
/// row (the payload is not trusted: any role may `NOTIFY`); so does every (re)connection
/// and, as a safety net against a connection that died without a word, every 5 s.
async fn listen_loop(shared: Arc<Shared>) {
    async fn read_head(client: &Client, shared: &Shared) -> bool {
        match client
            .query_one("SELECT next_position FROM contimg_head WHERE id = 1", &[])
            .await
            .and_then(|row| row.try_get::<_, i64>(0))
        {
            Ok(head) => {
                // A head lower than what this server has read is only a read that raced
                // its own commit; `advance` never moves back.
                let head = head.max(0) as u64;
                shared.advance(head);
                true
            }
            Err(_) => false,
        }
    }
    while !shared.closed.load(Ordering::Acquire) {
        if let Ok((client, mut conn)) = shared.config.connect(NoTls).await {
            let (ntx, mut nrx) = mpsc::unbounded_channel::<()>();
            let driver = tokio::spawn(async move {
                let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
                while let Some(m) = messages.next().await {
                    match m {
                        Ok(AsyncMessage::Notification(_)) => {
                            let _ = ntx.send(());
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            });
            if client
                .batch_execute(&format!("LISTEN {CHANNEL}"))
                .await
                .is_ok()
                && read_head(&client, &shared).await
            {
                loop {
                    let woken = tokio::time::timeout(Duration::from_secs(5), nrx.recv()).await;
                    if matches!(woken, Ok(None)) || shared.closed.load(Ordering::Acquire) {
                        break;
                    }
                    // Many notifications at once need one read.
                    while nrx.try_recv().is_ok() {}
                    if !read_head(&client, &shared).await {
                        break;
                    }
                }
            }
            driver.abort();
        }
        if !shared.closed.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Tries for the leadership lock every second; holds it on its own connection, checked
/// every second, until that connection fails.
async fn lead_loop(shared: Arc<Shared>, tx: watch::Sender<bool>) {
    while !shared.closed.load(Ordering::Acquire) {
        if let Ok((client, mut driver)) = connect(&shared.config).await {
            loop {
                match client
                    .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                    .await
                {
                    Ok(row) if row.try_get::<_, bool>(0).unwrap_or(false) => {
                        // A new epoch, under the head row's lock: from its commit on, the
                        // previous leader's moves are refused.
                        let epoch = match client
                            .query_one(
                                "UPDATE contimg_head SET leader_epoch = leader_epoch + 1 \
                                 WHERE id = 1 RETURNING leader_epoch",
                                &[],
                            )
                            .await
                            .and_then(|r| r.try_get::<_, i64>(0))
                        {
                            Ok(e) => e,
                            Err(_) => break,
                        };
                        shared.epoch.store(epoch, Ordering::Release);
                        tracing::info!(
                            epoch,
                            "this server leads the ledger (publisher and recovery)"
                        );
                        tx.send_replace(true);
                        loop {
                            tokio::select! {
                                _ = &mut driver => break,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                            let alive = tokio::time::timeout(
                                Duration::from_secs(5),
                                client.simple_query("SELECT 1"),
                            )
                            .await;
                            if !matches!(alive, Ok(Ok(_))) || shared.closed.load(Ordering::Acquire)
                            {
                                break;
                            }
                        }
                        tracing::warn!("this server lost the ledger's leadership");
                        shared.epoch.store(0, Ordering::Release);
                        tx.send_replace(false);
                        break;
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    Err(_) => break,
                }
                if shared.closed.load(Ordering::Acquire) {
                    break;
                }
            }
            driver.abort();
        }
        shared.epoch.store(0, Ordering::Release);
        tx.send_replace(false);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Records of the log from a position, streamed; a missing position is reported as
/// corrupt, never skipped.
pub struct RawIter {
    store: PgStore,
    rx: Option<mpsc::Receiver<Result<Vec<RawRecord>, StoreError>>>,
    next: u64,
    end: u64,
    buf: VecDeque<RawRecord>,
    failed: bool,
}

impl Iterator for RawIter {
    type Item = Result<RawRecord, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.next >= self.end {
            return None;
        }
        if self.buf.is_empty() {
            let rx = match &mut self.rx {
                Some(rx) => rx,
                None => self.rx.insert(self.store.stream_range(self.next, self.end)),
            };
            // Not tokio's blocking_recv, which refuses to run inside a runtime; and out of
            // tokio's cooperative budget, which a task of the caller's runtime may have
            // spent (recv would then yield forever to an executor that is not tokio's).
            match futures::executor::block_on(tokio::task::unconstrained(rx.recv())) {
                Some(Ok(chunk)) => self.buf.extend(chunk),
                Some(Err(e)) => {
                    self.failed = true;
                    return Some(Err(e));
                }
                None => {}
            }
        }
        match self.buf.pop_front() {
            Some(r) if r.position == self.next => {
                self.next += 1;
                Some(Ok(r))
            }
            _ => {
                self.failed = true;
                Some(Err(StoreError::Corrupt {
                    position: self.next,
                    reason: "missing from the log".into(),
                }))
            }
        }
    }
}
