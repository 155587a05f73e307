//! The key layout of the `ledger` tree and the chunk format of the log.

/// Key layout of the `ledger` tree.
pub(crate) mod keys {
    pub const LOG: u8 = b'L';
    /// Stream heads, one key per stream, as layout 1 kept them (layout 2 reads a head from
    /// the stream index's last entry): dropped when such a ledger is opened to write, and
    /// written only to take a ledger back to layout 1 (`sled::to_layout`).
    pub const HEAD: u8 = b'H';
    pub const INDEX: u8 = b'S';
    /// Layouts 1 and 2's id index, of every stream (`id`): dropped when such a ledger is
    /// opened to write, and written only to take a ledger back to layout 2 or 1.
    pub const ID: u8 = b'I';
    /// Layout 4's id index, of the streams marked [`INDEXED`] only: `J` stream 0x00 event
    /// id -> revision, position (`indexed_id`), as `I` keys were.
    pub const INDEXED_ID: u8 = b'J';
    /// Layout 4's mark that a stream's ids are all in its id index (`J` keys and, from
    /// layout 5, `K` runs: `X` stream -> empty), and that every commit to the stream
    /// writes its events' `J` keys.
    pub const INDEXED: u8 = b'X';
    /// Layout 5's runs of a marked stream's id index, as the writer wrote them when it
    /// dropped the stream: `K` stream 0x00 first event id -> [`super::run`].
    pub const INDEXED_RUN: u8 = b'K';

    pub fn log(position: u64) -> [u8; 9] {
        let mut k = [LOG; 9];
        k[1..].copy_from_slice(&position.to_be_bytes());
        k
    }

    /// `H` stream (layout 1's head key; `stream` as the stream index holds it).
    pub fn head(stream: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(stream.len() + 1);
        k.push(HEAD);
        k.extend_from_slice(stream);
        k
    }

    /// `kind`, stream, 0x00, `suffix`.
    pub fn in_stream(kind: u8, stream: &str, suffix: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(stream.len() + 2 + suffix.len());
        k.push(kind);
        k.extend_from_slice(stream.as_bytes());
        k.push(0);
        k.extend_from_slice(suffix);
        k
    }

    pub fn index(stream: &str, revision: u64) -> Vec<u8> {
        in_stream(INDEX, stream, &revision.to_be_bytes())
    }

    pub fn id(stream: &str, id: &uuid::Uuid) -> Vec<u8> {
        in_stream(ID, stream, id.as_bytes())
    }

    pub fn indexed_id(stream: &str, id: &uuid::Uuid) -> Vec<u8> {
        in_stream(INDEXED_ID, stream, id.as_bytes())
    }

    /// `K` stream 0x00 `first`: the run whose lowest id is `first`.
    pub fn indexed_run(stream: &str, first: &uuid::Uuid) -> Vec<u8> {
        in_stream(INDEXED_RUN, stream, first.as_bytes())
    }

    /// The stream and first id an [`indexed_run`] key names; `None` for a key not of that
    /// shape.
    pub fn indexed_run_parts(key: &[u8]) -> Option<(&[u8], uuid::Uuid)> {
        let at = key
            .len()
            .checked_sub(17)
            .filter(|&at| at >= 1 && key[at] == 0)?;
        let first = uuid::Uuid::from_slice(&key[at + 1..]).ok()?;
        Some((&key[1..at], first))
    }

    /// `X` stream.
    pub fn indexed(stream: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(stream.len() + 1);
        k.push(INDEXED);
        k.extend_from_slice(stream.as_bytes());
        k
    }

    /// An id index entry's value: revision and position, big-endian.
    pub fn id_value(revision: u64, position: u64) -> [u8; 16] {
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&revision.to_be_bytes());
        value[8..].copy_from_slice(&position.to_be_bytes());
        value
    }

    /// What [`id_value`] wrote: (revision, position).
    pub fn id_place(value: &[u8; 16]) -> (u64, u64) {
        let (revision, position) = value.split_at(8);
        let be = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
        (be(revision), be(position))
    }
}

/// A run of a stream's id index (layout 5): entries of [`run::ENTRY`] bytes, event id then
/// revision and position (big-endian, as [`keys::id_value`]), in the ids' order, keyed by
/// the first id (`K` stream 0x00 id). The runs of a stream hold ids that do not overlap,
/// so the run that may hold an id is the last one keyed at or below it. The writer writes
/// a stream's ids it holds as runs when it drops the stream, one sled key for up to
/// [`run::MAX_IDS`] ids rather than one an id.
pub(crate) mod run {
    use super::keys::{id_place, id_value};

    pub const ENTRY: usize = 32;
    /// Ids a run holds at most: 7 KiB, the size of a log chunk ([`super::chunk::MAX_BYTES`],
    /// which says why). Under test 16, so that a stream's ids take several runs.
    pub const MAX_IDS: usize = if cfg!(test) {
        16
    } else {
        super::chunk::MAX_BYTES / ENTRY
    };

    /// A run of `entries`, which are in the ids' order.
    pub fn encode<'a>(entries: impl Iterator<Item = (&'a uuid::Uuid, (u64, u64))>) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_IDS * ENTRY);
        for (id, (revision, position)) in entries {
            out.extend_from_slice(id.as_bytes());
            out.extend_from_slice(&id_value(revision, position));
        }
        out
    }

    /// Where the run places `id`: (revision, position), `None` when it does not hold it.
    /// An error when the run is not whole entries; their order is taken as written
    /// (`contimg verify` checks it: [`entries`]).
    pub fn find(bytes: &[u8], id: &uuid::Uuid) -> Result<Option<(u64, u64)>, String> {
        let entries: Vec<&[u8]> = whole(bytes)?.collect();
        let Ok(i) = entries.binary_search_by(|e| e[..16].cmp(id.as_bytes())) else {
            return Ok(None);
        };
        Ok(Some(id_place(
            entries[i][16..].try_into().expect("an entry"),
        )))
    }

    /// The entries of a run, checked to be whole and in the ids' order.
    pub fn entries(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
        let entries: Vec<&[u8]> = whole(bytes)?.collect();
        if entries.windows(2).any(|w| w[0][..16] >= w[1][..16]) {
            return Err("a run's ids are not in order".into());
        }
        Ok(entries)
    }

    /// A run's entries, once its length is checked to be whole entries, one or more.
    fn whole(bytes: &[u8]) -> Result<std::slice::ChunksExact<'_, u8>, String> {
        if bytes.is_empty() || !bytes.len().is_multiple_of(ENTRY) {
            return Err(format!(
                "a run of {} bytes is not whole entries of {ENTRY}",
                bytes.len()
            ));
        }
        Ok(bytes.chunks_exact(ENTRY))
    }

    /// The id of an entry.
    pub fn id(entry: &[u8]) -> uuid::Uuid {
        uuid::Uuid::from_bytes(entry[..16].try_into().expect("an entry"))
    }
}

/// A log value holds consecutive records, up to [`chunk::MAX_BYTES`], keyed by the first
/// one's position: the records of one commit or several (a commit's records join the
/// last chunk while that is under [`chunk::JOIN_BYTES`], and it is written again), so a
/// replay takes one sled step per chunk, and a log of single-event commits has chunks
/// of a few dozen records.
/// Layout: `[TAG]` then, per record, `[length: u32 LE][record]`.
pub(crate) mod chunk {
    use std::ops::Range;

    pub const TAG: u8 = 0xC1;
    /// Records are added to a chunk while it stays under this size (a single larger
    /// record gets a chunk of its own). Small enough that a sled leaf of 16 chunks (sled
    /// splits leaves by count, not size) stays under sled's blob threshold (a quarter of
    /// its 512 KiB segment): sled counts a blob page in its cache by its pointer's size,
    /// so with 64 KiB chunks every log leaf a replay read stayed in memory (1.1 GB after
    /// a replay of a million products), whatever the cache capacity.
    pub const MAX_BYTES: usize = 7 * 1024;
    /// A commit joins the log's last chunk only while that chunk is under this size, as
    /// joining writes the chunk's records again: a log of single commits gets chunks of
    /// about this size, and a commit rewrites at most this much.
    pub const JOIN_BYTES: usize = 2 * 1024;

    pub fn encode<R: AsRef<[u8]>>(records: &[R]) -> Vec<u8> {
        let len = 1 + records.iter().map(|r| r.as_ref().len() + 4).sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.push(TAG);
        for r in records {
            let r = r.as_ref();
            out.extend_from_slice(&(r.len() as u32).to_le_bytes());
            out.extend_from_slice(r);
        }
        out
    }

    /// Byte ranges of the records in a chunk.
    pub fn entries(bytes: &[u8]) -> Result<Vec<Range<usize>>, String> {
        if bytes.first() != Some(&TAG) {
            return Err("log value is not a chunk".into());
        }
        let mut out = Vec::new();
        let mut at = 1;
        while at < bytes.len() {
            let Some(len) = bytes.get(at..at + 4) else {
                return Err(format!("chunk truncated at byte {at}"));
            };
            let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
            let start = at + 4;
            if start + len > bytes.len() {
                return Err(format!("chunk truncated at byte {at}"));
            }
            out.push(start..start + len);
            at = start + len;
        }
        if out.is_empty() {
            return Err("empty chunk".into());
        }
        Ok(out)
    }
}
