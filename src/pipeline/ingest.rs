//! Ingest: watch the incoming folder for `YYYY-MM-DDTHH:MM:SS_sbNN.hdf5`, read each file's
//! UVH5 header, gather subbands into observations by the header's start time (the name's
//! time is a cross-check), form a group when all subbands are in, and give up an
//! observation that stays incomplete past the timeout. The subbands of one observation
//! must agree on their times and declination and cover distinct frequencies. Every decision is an event:
//! `SubbandFileAccepted` / `SubbandFileRejected` / `IngestGroupTimedOut` in
//! `ingest-<date>`, `GroupFormed` in `group-<id>`.
//!
//! A file is examined only once its size and modification time have held still for
//! `stable_s` (a file still being written is never taken). A bad file is refused with its
//! reason and blocks nothing. Files whose names do not end in `.hdf5`, and hidden files,
//! are not ours and are left alone.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, NaiveDateTime, Utc};

use super::state::{PendingObs, PipelineState, file_name};
use super::uvh5;
use crate::config::IngestConfig;
use crate::events::catalogue::{
    GroupFormed, IngestGroupTimedOut, StreamName, SubbandFileAccepted, SubbandFileRejected,
    SubbandHeader,
};
use crate::events::record::format_time;

/// The HDF5 format signature; the superblock sits at 0, 512, 1024, 2048... bytes.
pub const HDF5_SIGNATURE: [u8; 8] = [0x89, b'H', b'D', b'F', b'\r', b'\n', 0x1a, b'\n'];

/// The name time format, `2026-11-30T10:05:00`.
pub const NAME_TIME: &str = "%Y-%m-%dT%H:%M:%S";

/// A well-formed subband file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubbandName {
    pub obs_time: NaiveDateTime,
    pub subband: u8,
}

impl SubbandName {
    pub fn time_text(&self) -> String {
        self.obs_time.format(NAME_TIME).to_string()
    }
}

/// Every class [`reason_class`] gives.
pub const REASON_CLASSES: &[&str] = &[
    "late",
    "duplicate",
    "not_hdf5",
    "truncated",
    "not_uvh5",
    "name_mismatch",
    "inconsistent",
    "empty",
    "not_a_file",
    "unreadable",
    "bad_name",
    "other",
];

/// The class of a refusal's reason, for metrics labels (a bounded set): the reasons
/// this module writes, by their wording.
pub fn reason_class(reason: &str) -> &'static str {
    if reason.starts_with("late file") {
        "late"
    } else if reason.starts_with("duplicate subband") {
        "duplicate"
    } else if reason.starts_with("no HDF5 signature") || reason.starts_with("not readable as HDF5")
    {
        "not_hdf5"
    } else if reason.starts_with("truncated") {
        "truncated"
    } else if reason.starts_with("not UVH5") || reason.starts_with("bad UVH5") {
        "not_uvh5"
    } else if reason.starts_with("name time") {
        "name_mismatch"
    } else if reason.starts_with("disagrees with observation") {
        "inconsistent"
    } else if reason == "empty file" {
        "empty"
    } else if reason == "not a regular file" {
        "not_a_file"
    } else if reason.starts_with("cannot ") {
        "unreadable"
    } else if reason.contains(".hdf5") || reason.contains("subband") || reason.contains("time") {
        "bad_name"
    } else {
        "other"
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS_sbNN.hdf5` (NN below `subbands`).
pub fn parse_name(name: &str, subbands: u8) -> Result<SubbandName, String> {
    let stem = name
        .strip_suffix(".hdf5")
        .ok_or_else(|| format!("{name:?} does not end in .hdf5"))?;
    let (time, sb) = stem
        .rsplit_once("_sb")
        .ok_or_else(|| format!("{name:?} is not YYYY-MM-DDTHH:MM:SS_sbNN.hdf5"))?;
    if time.len() != 19 || sb.len() != 2 || !sb.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{name:?} is not YYYY-MM-DDTHH:MM:SS_sbNN.hdf5"));
    }
    let obs_time = NaiveDateTime::parse_from_str(time, NAME_TIME)
        .map_err(|e| format!("{name:?}: bad observation time {time:?} ({e})"))?;
    let subband: u8 = sb.parse().map_err(|_| format!("{name:?}: bad subband"))?;
    if subband >= subbands {
        return Err(format!(
            "{name:?}: subband sb{subband:02} is out of range (sb00..sb{:02})",
            subbands - 1
        ));
    }
    Ok(SubbandName { obs_time, subband })
}

/// Checks a stable file's content: not empty, an HDF5 superblock signature, and a UVH5
/// header that holds together ([`uvh5::read_header`]). Its size and header.
pub fn check_file(path: &Path) -> Result<(u64, uvh5::Header), String> {
    let size = check_signature(path)?;
    uvh5::read_header(path).map(|h| (size, h))
}

/// The cheap first check: not empty, and the HDF5 signature at 0, 512, 1024... bytes.
pub fn check_signature(path: &Path) -> Result<u64, String> {
    // A symbolic link is not followed: what the incoming folder names is what is read.
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let size = meta.len();
    if size == 0 {
        return Err("empty file".into());
    }
    let mut f = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut offset = 0u64;
    let mut buf = [0u8; 8];
    let mut first = Vec::new();
    while offset + 8 <= size {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| format!("cannot read: {e}"))?;
        if buf == HDF5_SIGNATURE {
            return Ok(size);
        }
        if offset == 0 {
            first = buf.to_vec();
        }
        offset = if offset == 0 { 512 } else { offset * 2 };
    }
    if size < 8 {
        use std::io::Seek;
        first = vec![0; size as usize];
        f.seek(std::io::SeekFrom::Start(0))
            .and_then(|_| f.read_exact(&mut first))
            .map_err(|e| format!("cannot read: {e}"))?;
    }
    Err(format!(
        "no HDF5 signature (first bytes {first:02x?}): corrupt or not HDF5"
    ))
}

/// A ready file as [`Ingest::examine`] read it: its parsed name, size and header, or why
/// it is refused.
#[derive(Debug)]
pub struct Examined {
    pub name: String,
    pub path: PathBuf,
    pub read: Result<(SubbandName, u64, uvh5::Header), String>,
}

/// A file seen in the incoming folder, waiting for its size to hold still.
#[derive(Debug, Clone)]
struct Watched {
    size: u64,
    modified: Option<SystemTime>,
    since: Instant,
}

/// What one scan decided, in the order to append it.
#[derive(Debug, Default)]
pub struct ScanOutcome {
    /// `ingest-<date>` stream to its events (accepted and rejected files, timeouts).
    pub ingest: BTreeMap<String, Vec<IngestFact>>,
    /// Groups to form, in observation order.
    pub formed: Vec<GroupFormed>,
    /// Files still settling.
    pub settling: usize,
}

impl ScanOutcome {
    pub fn is_empty(&self) -> bool {
        self.ingest.is_empty() && self.formed.is_empty()
    }
}

#[derive(Debug, Clone)]
pub enum IngestFact {
    Accepted(SubbandFileAccepted),
    Rejected(SubbandFileRejected),
    TimedOut(IngestGroupTimedOut),
}

/// The stateful half of ingest: what is settling in the folder.
pub struct Ingest {
    pub dir: PathBuf,
    pub config: IngestConfig,
    watching: HashMap<String, Watched>,
}

impl Ingest {
    pub fn new(dir: PathBuf, config: IngestConfig) -> Self {
        Ingest {
            dir,
            config,
            watching: HashMap::new(),
        }
    }

    /// Looks at the folder once and decides, against what the ledger already knows:
    /// [`Ingest::ready`], [`Ingest::examine`] and [`Ingest::decide`] in a row. Nothing is
    /// appended here; the caller appends the outcome and folds it back.
    pub fn scan(
        &mut self,
        state: &PipelineState,
        now: DateTime<Utc>,
    ) -> std::io::Result<ScanOutcome> {
        let (ready, settling) = self.ready(|name| state.files.contains_key(name))?;
        let examined = Self::examine(ready, self.config.subbands);
        Ok(self.decide(state, examined, settling, now))
    }

    /// Lists the folder: the files not yet `known` whose size and modification time held
    /// still for `stable_s` (in name order), and how many are still settling. Reads no
    /// file's content.
    pub fn ready(
        &mut self,
        known: impl Fn(&str) -> bool,
    ) -> std::io::Result<(Vec<(String, PathBuf)>, usize)> {
        let stable = Duration::from_secs_f64(self.config.stable_s);
        let mut ready: Vec<(String, PathBuf)> = Vec::new();
        let mut settling = 0;
        let mut present = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".hdf5") || known(&name) {
                continue;
            }
            present.insert(name.clone());
            let Ok(meta) = entry.metadata() else { continue };
            let (size, modified) = (meta.len(), meta.modified().ok());
            let w = self.watching.entry(name.clone()).or_insert(Watched {
                size,
                modified,
                since: Instant::now(),
            });
            if w.size != size || w.modified != modified {
                *w = Watched {
                    size,
                    modified,
                    since: Instant::now(),
                };
            }
            if w.since.elapsed() >= stable {
                ready.push((name, entry.path()));
            } else {
                settling += 1;
            }
        }
        self.watching.retain(|n, _| present.contains(n));
        ready.sort();
        Ok((ready, settling))
    }

    /// Reads each ready file's name and header: blocking IO, no state, so the worker runs
    /// it outside its lock. A backlog is read on as many threads as there are cores (at
    /// most 8); the result keeps the files' order.
    pub fn examine(ready: Vec<(String, PathBuf)>, subbands: u8) -> Vec<Examined> {
        let one = |(name, path): (String, PathBuf)| {
            let read = parse_name(&name, subbands)
                .and_then(|p| check_file(&path).map(|(size, h)| (p, size, h)));
            Examined { name, path, read }
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        if threads == 1 || ready.len() < 32 {
            return ready.into_iter().map(one).collect();
        }
        let per = ready.len().div_ceil(threads);
        let mut chunks: Vec<Vec<(String, PathBuf)>> = Vec::new();
        let mut rest = ready.into_iter();
        loop {
            let chunk: Vec<_> = rest.by_ref().take(per).collect();
            if chunk.is_empty() {
                break;
            }
            chunks.push(chunk);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .into_iter()
                .map(|c| s.spawn(move || c.into_iter().map(one).collect::<Vec<_>>()))
                .collect();
            // `check_file` catches a decoder's panic itself; were a thread to panic all
            // the same, its files stay unrecorded and ready, read again next scan.
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    /// Decides what the examined files and the open observations lead to. Pure but for
    /// forgetting the examined files' settle times.
    pub fn decide(
        &mut self,
        state: &PipelineState,
        examined: Vec<Examined>,
        settling: usize,
        now: DateTime<Utc>,
    ) -> ScanOutcome {
        let mut out = ScanOutcome {
            settling,
            ..ScanOutcome::default()
        };
        // Decide against a scratch copy of the open observations, so that files of one
        // scan group together exactly as the fold will group them.
        let mut pending: BTreeMap<String, PendingObs> = state.pending.clone();
        for Examined { name, path, read } in examined {
            self.watching.remove(&name);
            // Another worker recorded it while this one read it.
            if state.files.contains_key(&name) {
                continue;
            }
            let path_text = path.display().to_string();
            let obs = parse_name(&name, self.config.subbands)
                .ok()
                .map(|p| p.obs_time);
            let stream = ingest_stream(obs, now);
            let fact = match read {
                Err(reason) => Err(reason),
                Ok((p, size, h)) => {
                    admit(&mut pending, state, &self.config, &p, &h, now).map(|key| {
                        SubbandFileAccepted {
                            path: path_text.clone(),
                            obs_time: p.time_text(),
                            subband: p.subband,
                            size_bytes: size,
                            group_obs_time: Some(key),
                            header: Some(header_event(&h)),
                        }
                    })
                }
            };
            let fact = match fact {
                Ok(accepted) => {
                    if let Some(set) = accepted
                        .group_obs_time
                        .as_ref()
                        .and_then(|k| pending.get_mut(k))
                    {
                        set.subbands.insert(accepted.subband, path_text);
                        if let Some(h) = &accepted.header {
                            set.headers.insert(accepted.subband, h.clone());
                        }
                    }
                    IngestFact::Accepted(accepted)
                }
                Err(reason) => IngestFact::Rejected(SubbandFileRejected {
                    path: path_text,
                    reason,
                }),
            };
            out.ingest.entry(stream).or_default().push(fact);
        }

        // Complete observations form groups, oldest first; stale ones time out.
        let timeout = chrono::Duration::milliseconds((self.config.group_timeout_s * 1e3) as i64);
        for (key, set) in &pending {
            if set.subbands.len() >= self.config.subbands as usize {
                let files: Vec<String> = set.subbands.values().cloned().collect();
                let decs: Vec<f64> = set.headers.values().filter_map(|h| h.dec_deg).collect();
                out.formed.push(GroupFormed {
                    group_id: group_id(key, &files),
                    obs_time: key.clone(),
                    files,
                    dec_deg: (!decs.is_empty())
                        .then(|| decs.iter().sum::<f64>() / decs.len() as f64),
                });
            } else if let Some(p) = state.pending.get(key)
                && now - p.first_seen >= timeout
            {
                let present: Vec<u8> = set.subbands.keys().copied().collect();
                let missing = (0..self.config.subbands)
                    .filter(|s| !set.subbands.contains_key(s))
                    .collect();
                let stream = ingest_stream(NaiveDateTime::parse_from_str(key, NAME_TIME).ok(), now);
                out.ingest
                    .entry(stream)
                    .or_default()
                    .push(IngestFact::TimedOut(IngestGroupTimedOut {
                        obs_time: key.clone(),
                        present,
                        missing,
                        waited_s: (now - p.first_seen).num_milliseconds() as f64 / 1e3,
                    }));
            }
        }
        out
    }
}

/// The event's record of a header.
fn header_event(h: &uvh5::Header) -> SubbandHeader {
    SubbandHeader {
        start: format_time(h.start()),
        end: format_time(h.end()),
        freq_lo_hz: h.freq_lo_hz,
        freq_hi_hz: h.freq_hi_hz,
        dec_deg: h.dec_deg,
        nbls: h.nbls,
        ntimes: h.ntimes,
        nfreqs: h.nfreqs,
        npols: h.npols,
        telescope: h.telescope.clone(),
        simulated: h.simulated,
    }
}

/// Decides where a readable subband file belongs: the key of the observation it joins,
/// or why it is refused. Pure: `pending` is the scan's scratch copy of the open
/// observations (the caller adds the file to it once accepted).
fn admit(
    pending: &mut BTreeMap<String, PendingObs>,
    state: &PipelineState,
    cfg: &IngestConfig,
    name: &SubbandName,
    h: &uvh5::Header,
    now: DateTime<Utc>,
) -> Result<String, String> {
    let tolerance = chrono::Duration::milliseconds((cfg.group_tolerance_s * 1e3) as i64);
    // The header's start, to the second, is the observation's time.
    let start = DateTime::from_timestamp_millis((h.start_ms + 500).div_euclid(1000) * 1000)
        .unwrap_or_default()
        .naive_utc();
    let off = (name.obs_time - start).num_milliseconds().abs();
    if off > tolerance.num_milliseconds() {
        return Err(format!(
            "name time {} disagrees with the header's start {} by {:.1} s (tolerance {} s)",
            name.time_text(),
            format_time(h.start()),
            off as f64 / 1e3,
            cfg.group_tolerance_s
        ));
    }
    let key = match assign(pending, state, start, tolerance) {
        Assign::Closed(key, how) => {
            return Err(format!("late file: observation {key} already {how}"));
        }
        Assign::Into(key) => key,
    };
    let Some(set) = pending.get(&key) else {
        pending.insert(
            key.clone(),
            PendingObs {
                first_seen: now,
                subbands: BTreeMap::new(),
                headers: BTreeMap::new(),
            },
        );
        return Ok(key);
    };
    if let Some(existing) = set.subbands.get(&name.subband) {
        return Err(format!(
            "duplicate subband sb{:02} of observation {key}: {} was taken first",
            name.subband,
            file_name(existing)
        ));
    }
    for (sb, other) in &set.headers {
        if let Some(why) = disagreement(h, other, cfg) {
            return Err(format!(
                "disagrees with observation {key}: {why} of sb{sb:02} ({})",
                set.subbands
                    .get(sb)
                    .map(|p| file_name(p))
                    .unwrap_or_default()
            ));
        }
    }
    Ok(key)
}

/// How a subband's header contradicts another of its observation, if it does.
fn disagreement(h: &uvh5::Header, other: &SubbandHeader, cfg: &IngestConfig) -> Option<String> {
    let ms = |t: &str| {
        DateTime::parse_from_rfc3339(t)
            .ok()
            .map(|t| t.timestamp_millis())
    };
    let agree_ms = (cfg.times_agree_s * 1e3) as i64;
    for (what, mine, theirs) in [
        ("start", h.start_ms, ms(&other.start)),
        ("end", h.end_ms, ms(&other.end)),
    ] {
        if let Some(theirs) = theirs
            && (mine - theirs).abs() > agree_ms
        {
            let show = |v: i64| format_time(DateTime::from_timestamp_millis(v).unwrap_or_default());
            return Some(format!(
                "{what} {} against {} (more than {} s apart)",
                show(mine),
                show(theirs),
                cfg.times_agree_s
            ));
        }
    }
    if let (Some(a), Some(b)) = (h.dec_deg, other.dec_deg)
        && (a - b).abs() > cfg.dec_agree_deg
    {
        return Some(format!(
            "declination {a:.4} deg against {b:.4} deg (more than {} deg apart)",
            cfg.dec_agree_deg
        ));
    }
    if h.freq_lo_hz <= other.freq_hi_hz && other.freq_lo_hz <= h.freq_hi_hz {
        return Some(format!(
            "frequencies {:.3}-{:.3} MHz overlap {:.3}-{:.3} MHz",
            h.freq_lo_hz / 1e6,
            h.freq_hi_hz / 1e6,
            other.freq_lo_hz / 1e6,
            other.freq_hi_hz / 1e6
        ));
    }
    None
}

enum Assign {
    Into(String),
    Closed(String, &'static str),
}

/// The observation a file with header time `t` joins: the nearest open one within the
/// tolerance, else a closed one within it (a late file), else a new one keyed by `t`.
fn assign(
    pending: &BTreeMap<String, PendingObs>,
    state: &PipelineState,
    t: NaiveDateTime,
    tolerance: chrono::Duration,
) -> Assign {
    // Keys are times in one format, so string order is time order: look only within the tolerance.
    let lo = (t - tolerance).format(NAME_TIME).to_string();
    let hi = (t + tolerance).format(NAME_TIME).to_string();
    let near = |key: &String| {
        NaiveDateTime::parse_from_str(key, NAME_TIME)
            .ok()
            .map(|k| (k - t).abs())
            .filter(|d| *d <= tolerance)
    };
    if let Some((key, _)) = pending
        .range(lo.clone()..=hi.clone())
        .filter_map(|(k, _)| near(k).map(|d| (k, d)))
        .min_by_key(|(_, d)| *d)
    {
        return Assign::Into(key.clone());
    }
    if let Some((key, outcome)) = state
        .closed
        .range(lo..=hi)
        .filter_map(|(k, o)| near(k).map(|d| ((k, o), d)))
        .min_by_key(|(_, d)| *d)
        .map(|(x, _)| x)
    {
        let how = match outcome {
            super::state::ObsOutcome::Formed(_) => "formed its group",
            super::state::ObsOutcome::TimedOut => "timed out",
            super::state::ObsOutcome::Refused => "was refused (group id collision)",
        };
        return Assign::Closed(key.clone(), how);
    }
    Assign::Into(t.format(NAME_TIME).to_string())
}

/// `ingest-<date>` of an observation (today's date for names that do not parse).
pub fn ingest_stream(obs: Option<NaiveDateTime>, now: DateTime<Utc>) -> String {
    let date = obs.map_or_else(|| now.date_naive(), |t| t.date());
    StreamName::ingest(date).as_str().to_string()
}

/// A group id from its members: the compact observation time and a short hash of the
/// member file names, `20261130T100500-1a2b3c4d`.
pub fn group_id(obs_time: &str, files: &[String]) -> String {
    let compact: String = obs_time
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect();
    format!(
        "{compact}-{}",
        short_hash(files.iter().map(|f| file_name(f)))
    )
}

/// The first 8 hex digits of BLAKE3 over the items, each followed by a newline.
pub fn short_hash<S: AsRef<str>>(items: impl Iterator<Item = S>) -> String {
    let mut h = blake3::Hasher::new();
    for i in items {
        h.update(i.as_ref().as_bytes());
        h.update(b"\n");
    }
    h.finalize().to_hex()[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason this module writes falls in its class, never in `other`.
    #[test]
    fn refusal_reasons_have_their_class() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("e.hdf5");
        std::fs::write(&empty, b"").unwrap();
        let text = dir.path().join("t.hdf5");
        std::fs::write(&text, b"not hdf5 at all").unwrap();
        let cases = [
            (parse_name("x.txt", 16).unwrap_err(), "bad_name"),
            (
                parse_name("2026-11-30T10:00:00.hdf5", 16).unwrap_err(),
                "bad_name",
            ),
            (
                parse_name("2026-13-30T10:00:00_sb01.hdf5", 16).unwrap_err(),
                "bad_name",
            ),
            (
                parse_name("2026-11-30T10:00:00_sb20.hdf5", 16).unwrap_err(),
                "bad_name",
            ),
            (check_file(dir.path()).unwrap_err(), "not_a_file"),
            (check_file(&empty).unwrap_err(), "empty"),
            (check_file(&text).unwrap_err(), "not_hdf5"),
            (
                check_file(&dir.path().join("gone.hdf5")).unwrap_err(),
                "unreadable",
            ),
            (
                "late file: observation X already formed".to_string(),
                "late",
            ),
            (
                "duplicate subband sb01 of observation X: a was taken first".to_string(),
                "duplicate",
            ),
        ];
        for (reason, class) in cases {
            assert_eq!(reason_class(&reason), class, "{reason}");
        }
    }

    #[test]
    fn names() {
        let n = parse_name("2026-11-30T10:05:00_sb03.hdf5", 16).unwrap();
        assert_eq!(n.subband, 3);
        assert_eq!(n.time_text(), "2026-11-30T10:05:00");
        for bad in [
            "2026-11-30T10:05:00_sb16.hdf5",
            "2026-11-30T10:05_sb03.hdf5",
            "2026-13-30T10:05:00_sb03.hdf5",
            "2026-11-30T10:05:00_sb3.hdf5",
            "2026-11-30T10:05:00_sbxx.hdf5",
            "2026-11-30T10:05:00.hdf5",
            "notes.txt",
        ] {
            assert!(parse_name(bad, 16).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_ids_follow_members() {
        let a = group_id("2026-11-30T10:05:00", &["x/a".into(), "x/b".into()]);
        let b = group_id("2026-11-30T10:05:00", &["y/a".into(), "y/b".into()]);
        let c = group_id("2026-11-30T10:05:00", &["x/a".into(), "x/c".into()]);
        assert!(a.starts_with("20261130T100500-"), "{a}");
        assert_eq!(a, b, "the folder is not part of the identity");
        assert_ne!(a, c);
    }
}
