//! The whole-log fold: events from a store (read in place), an export or a server, with a
//! reader and two decoder threads running ahead of the one-threaded fold, batches taken
//! in turn so order holds; and `fold_as_of`, the model as it stood at a position or time.

use crate::events::{Store, StoreError};

use super::product;
use super::publish::PublishModel;

/// Products a fold of `store` from `from` may meet, to size the model's map once: a
/// product takes three events or more (registered, publish started, an outcome), so a
/// quarter of the events is a generous bound; the map's untouched room costs address
/// space, not memory.
pub(super) fn product_estimate(store: &Store, from: u64) -> usize {
    (store.event_count().saturating_sub(from) / 4) as usize
}

/// A product fact as decoded from an event, in the state's form (see
/// [`product::ProductFact`]).
pub type Decoded = Result<Option<product::ProductFact>, String>;

/// An event as the fold sees it, with its product fact decoded. The payload and metadata
/// bytes are gone; what is left is enough for [`PublishModel::apply_decoded`].
pub type FoldItem = Result<(crate::events::RecordedEvent, Decoded), StoreError>;

/// Where a fold reads its events.
pub enum FoldSource {
    /// A ledger this process holds, from a position: records are read in place.
    Store(Store, u64),
    /// Records from anywhere (an export file, a server over HTTP), in position order.
    Records(Box<dyn Iterator<Item = Result<crate::events::RecordedEvent, StoreError>> + Send>),
}

/// One record from any source, decoded for the fold (taken: its strings are kept).
fn decode_record(item: &mut Result<crate::events::RecordedEvent, StoreError>) -> FoldItem {
    std::mem::replace(item, Err(StoreError::Closed)).map(|mut e| {
        let d = product::ProductFact::decode_view(&e.view());
        e.data = Vec::new();
        e.metadata = Vec::new();
        (e, d)
    })
}

/// One stored record, decoded for the fold from its bytes in place (left in place, to be
/// freed by the thread that read them): only a product event's stream name (and a poison
/// event's type) is copied out.
fn decode_raw(item: &mut Result<crate::events::RawRecord, StoreError>) -> FoldItem {
    let raw = match item {
        Ok(raw) => raw,
        Err(e) => return Err(std::mem::replace(e, StoreError::Closed)),
    };
    let r = raw.view()?;
    let d = product::ProductFact::decode_view(&r);
    let e = crate::events::RecordedEvent {
        event_id: r.event_id,
        stream_id: if matches!(d, Ok(None)) {
            String::new()
        } else {
            r.stream_id.to_string()
        },
        revision: r.revision,
        position: r.position,
        // Only a poison event needs its type copied (the fold names it when it parks
        // it); a decoded fact knows its own (`ProductFact::type_name`).
        event_type: if d.is_err() {
            r.event_type.to_string()
        } else {
            String::new()
        },
        event_version: r.event_version,
        data: Vec::new(),
        metadata: Vec::new(),
        created_micros: r.created_micros,
        checksum: 0,
    };
    Ok((e, d))
}

/// Feeds every event of `source`, product facts decoded, to `f` in position order; `f`
/// returns `false` to stop early. The fold is one thread by nature; reading and decoding
/// (most of the work) run ahead of it on two decoder threads fed by a reader thread, batch
/// by batch in turn, so order is kept. Each batch goes back to the thread that made it to
/// be freed there, decoded ones to their decoder and read ones to the reader: the
/// allocator frees fastest on the thread that allocated, and memory freed elsewhere comes
/// back to its thread late, which then takes fresh pages the kernel must zero (a 10 M-event
/// `audit` took 5,400 to 6,200 page faults while the decoders freed what the reader read,
/// 3,500 to 3,900 since).
pub fn fold_source(
    source: FoldSource,
    f: impl FnMut(&crate::events::RecordedEvent, Decoded) -> bool,
) -> Result<(), StoreError> {
    match source {
        FoldSource::Store(store, from) => fold_parallel(store.raw_from(from), decode_raw, f),
        FoldSource::Records(records) => fold_parallel(records, decode_record, f),
    }
}

fn fold_parallel<T, I>(
    items: I,
    decode: fn(&mut Result<T, StoreError>) -> FoldItem,
    mut f: impl FnMut(&crate::events::RecordedEvent, Decoded) -> bool,
) -> Result<(), StoreError>
where
    T: Send + 'static,
    I: Iterator<Item = Result<T, StoreError>> + Send + 'static,
{
    use std::sync::mpsc::{channel, sync_channel};
    const DECODERS: usize = 2;
    let spawn = |name: String, work: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name)
            .spawn(work)
            .map_err(|e| StoreError::Task(format!("starting a fold thread: {e}")))
    };
    let mut raw_txs = Vec::new();
    let mut out_rxs = Vec::new();
    let mut back_txs = Vec::new();
    let mut threads = Vec::new();
    let (read_back_tx, read_back_rx) = channel::<Vec<Result<T, StoreError>>>();
    for d in 0..DECODERS {
        let (raw_tx, raw_rx) = sync_channel::<Vec<Result<T, StoreError>>>(4);
        let (out_tx, out_rx) = sync_channel::<Vec<FoldItem>>(4);
        let (back_tx, back_rx) = channel::<Vec<FoldItem>>();
        let read_back = read_back_tx.clone();
        threads.push(spawn(
            format!("fold-decode-{d}"),
            Box::new(move || {
                for mut raw in raw_rx {
                    let decoded: Vec<FoldItem> = raw.iter_mut().map(decode).collect();
                    // Once the reader is done it no longer takes them back; then they
                    // are freed here.
                    let _ = read_back.send(raw);
                    if out_tx.send(decoded).is_err() {
                        break;
                    }
                    while let Ok(used) = back_rx.try_recv() {
                        drop(used);
                    }
                }
                drop(out_tx);
                for used in back_rx {
                    drop(used);
                }
            }),
        )?);
        raw_txs.push(raw_tx);
        out_rxs.push(out_rx);
        back_txs.push(back_tx);
    }
    // The decoders hold the only senders back to the reader.
    drop(read_back_tx);
    threads.push(spawn(
        "fold-read".into(),
        Box::new(move || crate::events::store::read_in_batches(items, &raw_txs, &read_back_rx)),
    )?);
    let mut result = Ok(());
    'batches: for turn in 0usize.. {
        let Ok(mut batch) = out_rxs[turn % DECODERS].recv() else {
            break;
        };
        for item in batch.iter_mut() {
            match item {
                Ok((e, d)) => {
                    let d = std::mem::replace(d, Ok(None));
                    if !f(e, d) {
                        break 'batches;
                    }
                }
                Err(e) => {
                    result = Err(std::mem::replace(e, StoreError::Closed));
                    break 'batches;
                }
            }
        }
        let _ = back_txs[turn % DECODERS].send(batch);
    }
    drop(out_rxs);
    drop(back_txs);
    // A thread that panicked ended its channel early: what was folded is not the whole
    // log, and must not pass for it.
    let mut panicked = false;
    for t in threads {
        panicked |= t.join().is_err();
    }
    if panicked && result.is_ok() {
        return Err(StoreError::Task(
            "a thread reading the log failed; the fold is incomplete".into(),
        ));
    }
    result
}

/// Where an as-of question stops: at a log position, or at a time (the last position whose
/// commit time is at or before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    Position(u64),
    /// Microseconds since the epoch, UTC.
    Time(i64),
    /// The whole log (a rebuild).
    End,
}

/// The read model as it stood at `as_of`, folded from `events` (any source, in position
/// order), with the position it corresponds to (`None`: before the first event) and the
/// time at which its time windows are evaluated (the as-of time, or the commit time of
/// the position asked for).
pub fn fold_as_of(
    events: FoldSource,
    as_of: AsOf,
    max_attempts: u32,
) -> Result<(PublishModel, Option<u64>, i64), StoreError> {
    let mut model = PublishModel::new(max_attempts);
    if let FoldSource::Store(store, from) = &events {
        model.reserve(product_estimate(store, *from));
    }
    // Ordered once at the end, not event by event.
    model.defer_indexes();
    let mut at = None;
    let mut now = match as_of {
        AsOf::Time(t) => t,
        AsOf::Position(_) | AsOf::End => i64::MIN,
    };
    fold_source(events, |e, decoded| {
        let past = match as_of {
            AsOf::Position(p) => e.position > p,
            AsOf::Time(t) => e.created_micros > t,
            AsOf::End => false,
        };
        if past {
            return false;
        }
        model.apply_decoded(e, decoded);
        at = Some(e.position);
        if !matches!(as_of, AsOf::Time(_)) {
            now = e.created_micros;
        }
        true
    })?;
    model.index_all();
    if let AsOf::Position(p) = as_of
        && at != Some(p)
    {
        return Err(StoreError::InvalidInput(format!(
            "position {p} is past the end of the log (last: {})",
            at.map_or("none".to_string(), |a| a.to_string())
        )));
    }
    Ok((model, at, now))
}
