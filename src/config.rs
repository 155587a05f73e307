//! The configuration file (TOML). Every key is optional: with no file at all, contimg runs
//! on the embedded defaults below, with every folder under `data_dir`. `serve` and
//! `validate` read the same file (`--config FILE` or `CONTIMG_CONFIG`); flags given on the
//! command line win over it. `demo` runs on an embedded configuration of its own (these
//! defaults in accelerated time, every folder under its `--dir`). The bearer token is never read from here: it comes from
//! `CONTIMG_API_TOKEN` (the service's environment file), so the file can be world-readable.
//!
//! ```toml
//! data_dir = "/var/lib/contimg"     # the ledger folder
//! listen = "127.0.0.1:8000"
//!
//! [paths]                           # each defaults to a folder under data_dir
//! incoming = "/data/incoming"       # where the correlator writes *_sbNN.hdf5
//! stage_root = "/data/stage"
//! products_root = "/data/products"
//! work_root = "/data/work"          # Measurement Sets, calibration tables, tiles
//!
//! [ingest]
//! poll_interval_s = 2.0
//! stable_s = 5.0                    # a file's size must hold this long before it is taken
//! group_tolerance_s = 30.0
//! group_timeout_s = 600.0
//! times_agree_s = 1.0               # subbands of one observation: header start and end
//! dec_agree_deg = 0.1               # ... and pointing declination
//!
//! [stages]
//! runner = "external"               # or "simulate"; without one the stages stay idle
//! timeout_s = 3600.0
//! max_attempts = 3
//! backoff_s = [60.0, 300.0, 1500.0]
//! [stages.convert]                  # the reference stages: tools/stages/dsa110.toml
//! command = 'python3 /opt/contimg/stages/convert.py --out {output} {input}'
//! [stages.calibrate]
//! command = 'python3 /opt/contimg/stages/calibrate.py --ms {input} --out {output} --sky-model /data/sky.csv'
//! [stages.image]
//! command = 'python3 /opt/contimg/stages/image.py --ms {input} --tile {tile} --beam {beam}'
//! timeout_s = 7200.0
//!
//! [mosaic]
//! tiles = 10
//! overlap = 2
//! max_span_min = 60.0
//! max_gap_min = 6.0
//! max_dec_spread_deg = 0.1
//!
//! [publish]
//! max_attempts = 3
//! backoff_s = [60.0, 300.0, 1500.0]
//!
//! [validate]
//! stage_min_free_gb = 500.0
//! products_min_free_gb = 2000.0
//! state_min_free_gb = 10.0
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The ledger folder; the other folders default to places inside it.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The API server a `--mode stream` worker appends through.
    pub url: Option<String>,
    pub paths: PathsConfig,
    pub ingest: IngestConfig,
    pub stages: StagesConfig,
    pub mosaic: MosaicConfig,
    pub publish: PublishSection,
    pub server: ServerSection,
    pub ledger: LedgerSection,
    pub validate: ValidateConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./var"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            url: None,
            paths: PathsConfig::default(),
            ingest: IngestConfig::default(),
            stages: StagesConfig::default(),
            mosaic: MosaicConfig::default(),
            publish: PublishSection::default(),
            server: ServerSection::default(),
            ledger: LedgerSection::default(),
            validate: ValidateConfig::default(),
        }
    }
}

/// Folders; each defaults to a folder of that name under `data_dir`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    pub incoming: Option<PathBuf>,
    pub stage_root: Option<PathBuf>,
    pub products_root: Option<PathBuf>,
    pub work_root: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// How often the incoming folder is scanned.
    pub poll_interval_s: f64,
    /// A file is taken only once its size and modification time held this long.
    pub stable_s: f64,
    /// Subbands whose header start times differ by at most this belong to one
    /// observation; a file whose name time differs from its header's start by more is
    /// refused.
    pub group_tolerance_s: f64,
    /// An observation still missing subbands this long after its first file is given up.
    pub group_timeout_s: f64,
    /// Subbands per observation (sb00..sb15 for DSA-110).
    pub subbands: u8,
    /// The subbands of one observation must agree on the header's start and end within
    /// this many seconds...
    pub times_agree_s: f64,
    /// ...and on the pointing declination within this many degrees.
    pub dec_agree_deg: f64,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            poll_interval_s: 2.0,
            stable_s: 5.0,
            group_tolerance_s: 30.0,
            group_timeout_s: 600.0,
            subbands: 16,
            times_agree_s: 1.0,
            dec_agree_deg: 0.1,
        }
    }
}

/// Which implementation runs conversion, calibration and imaging.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunnerKind {
    /// The built-in simulator: realistic outputs, no CASA or WSClean. Its products say
    /// so (`runner = simulate` in their metadata).
    Simulate,
    /// The command templates of `[stages.convert]`, `[stages.calibrate]`, `[stages.image]`.
    External,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StagesConfig {
    /// Who runs conversion, calibration and imaging. None (the default): nobody; the
    /// stages stay idle, so that a host with an empty configuration never publishes
    /// simulated tiles as products. `contimg demo` chooses the simulator itself.
    pub runner: Option<RunnerKind>,
    /// Default timeout of one stage run.
    pub timeout_s: f64,
    /// Runs of one stage before the group is given up.
    pub max_attempts: u32,
    /// Waits before the 2nd, 3rd... run; the last repeats.
    pub backoff_s: Vec<f64>,
    pub convert: Option<StageCommand>,
    pub calibrate: Option<StageCommand>,
    pub image: Option<StageCommand>,
    pub simulate: SimulateConfig,
}

impl Default for StagesConfig {
    fn default() -> Self {
        StagesConfig {
            runner: None,
            timeout_s: 3600.0,
            max_attempts: 3,
            backoff_s: vec![60.0, 300.0, 1500.0],
            convert: None,
            calibrate: None,
            image: None,
            simulate: SimulateConfig::default(),
        }
    }
}

/// One external stage: a command template run by `/bin/sh -c`. Placeholders (each
/// replaced by a shell-quoted value): `{input}`, `{output}`, `{group}`, `{tile}`,
/// `{beam}`, `{obs_time}`, `{work}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StageCommand {
    pub command: String,
    #[serde(default)]
    pub timeout_s: Option<f64>,
}

/// What the simulator makes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SimulateConfig {
    /// Pixels per side of a tile (4800 for DSA-110's real size).
    pub tile_size: usize,
    pub cell_arcsec: f64,
    /// Noise at the beam centre, Jy/beam.
    pub noise_jy: f64,
    /// Point sources per square degree.
    pub sources_per_deg2: f64,
}

impl Default for SimulateConfig {
    fn default() -> Self {
        SimulateConfig {
            tile_size: 512,
            cell_arcsec: 3.0,
            noise_jy: 1e-3,
            sources_per_deg2: 40.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MosaicConfig {
    /// Tiles per mosaic.
    pub tiles: usize,
    /// Tiles shared by consecutive mosaics.
    pub overlap: usize,
    /// First to last tile, at most.
    pub max_span_min: f64,
    /// Between consecutive tiles, under.
    pub max_gap_min: f64,
    /// Every tile's declination within this of the group mean.
    pub max_dec_spread_deg: f64,
}

impl Default for MosaicConfig {
    fn default() -> Self {
        MosaicConfig {
            tiles: 10,
            overlap: 2,
            max_span_min: 60.0,
            max_gap_min: 6.0,
            max_dec_spread_deg: 0.1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSection {
    pub max_attempts: u32,
    pub backoff_s: Vec<f64>,
    pub auto_publish: bool,
    /// Longest one publish may take before it is cut short (and retried).
    pub timeout_s: f64,
    /// A product publishing for longer than this is listed as stuck (and alerted on).
    pub stuck_publishing_min: f64,
}

impl Default for PublishSection {
    fn default() -> Self {
        PublishSection {
            max_attempts: 3,
            backoff_s: vec![60.0, 300.0, 1500.0],
            auto_publish: true,
            timeout_s: 3600.0,
            stuck_publishing_min: crate::projections::status::DEFAULT_STUCK_PUBLISHING_MIN,
        }
    }
}

/// The HTTP server's bounds, and the names it answers to without a token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Host names (besides IP addresses and `localhost`) answered while no token is set.
    pub allowed_hosts: Vec<String>,
    pub header_timeout_s: f64,
    pub body_timeout_s: f64,
    pub max_connections: usize,
    pub shutdown_deadline_s: f64,
    pub write_timeout_s: f64,
    pub max_as_of_replays: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            allowed_hosts: Vec::new(),
            header_timeout_s: 10.0,
            body_timeout_s: 30.0,
            max_connections: 1024,
            shutdown_deadline_s: 10.0,
            write_timeout_s: 30.0,
            max_as_of_replays: 2,
        }
    }
}

/// The ledger's own settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    /// A PostgreSQL ledger (`postgres://USER@HOST/DB`) instead of the sled folder of
    /// `data_dir`; several servers may share it. `--ledger` and `CONTIMG_LEDGER` override.
    pub url: Option<String>,
    /// Free space (MiB) commits leave on the ledger's file system: below it appends are
    /// refused (HTTP 507) until space is freed, instead of the store running out mid-write.
    /// 0 turns the check off.
    pub reserve_mb: f64,
    /// sled's page cache (MiB): what the server keeps in memory of the log and its indexes
    /// between reads. Not used on PostgreSQL.
    pub cache_mb: f64,
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            url: None,
            reserve_mb: (crate::events::store::DEFAULT_RESERVE_BYTES / (1024 * 1024)) as f64,
            cache_mb: (crate::events::store::DEFAULT_CACHE_BYTES / (1024 * 1024)) as f64,
        }
    }
}

impl LedgerSection {
    pub fn reserve_bytes(&self) -> u64 {
        (self.reserve_mb * 1024.0 * 1024.0) as u64
    }

    pub fn cache_bytes(&self) -> u64 {
        (self.cache_mb * 1024.0 * 1024.0) as u64
    }
}

/// Free-space thresholds of `contimg validate`, in GB (10^9 bytes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateConfig {
    pub stage_min_free_gb: f64,
    pub products_min_free_gb: f64,
    pub state_min_free_gb: f64,
}

impl Default for ValidateConfig {
    fn default() -> Self {
        ValidateConfig {
            stage_min_free_gb: 500.0,
            products_min_free_gb: 2000.0,
            state_min_free_gb: 10.0,
        }
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("parsing the configuration {}", path.display()))?;
        config
            .check()
            .with_context(|| format!("checking the configuration {}", path.display()))?;
        Ok(config)
    }

    /// The defaults with every folder under one root: the ledger in `ROOT/ledger`, and
    /// `incoming`, `work`, `stage`, `products` beside it (the demo's layout).
    pub fn under_root(root: &Path) -> Config {
        Config {
            data_dir: root.join("ledger"),
            paths: PathsConfig {
                incoming: Some(root.join("incoming")),
                stage_root: Some(root.join("stage")),
                products_root: Some(root.join("products")),
                work_root: Some(root.join("work")),
            },
            ..Config::default()
        }
    }

    /// The file when one is given, the embedded defaults otherwise.
    pub fn load_or_default(path: Option<&Path>) -> anyhow::Result<Config> {
        match path {
            Some(p) => Config::load(p),
            None => Ok(Config::default()),
        }
    }

    /// Values that parse but make no sense.
    pub fn check(&self) -> anyhow::Result<()> {
        let i = &self.ingest;
        positive("ingest.poll_interval_s", i.poll_interval_s, 3600.0)?;
        non_negative("ingest.stable_s", i.stable_s, 3600.0)?;
        non_negative("ingest.group_tolerance_s", i.group_tolerance_s, 3600.0)?;
        positive("ingest.group_timeout_s", i.group_timeout_s, 7.0 * 86_400.0)?;
        non_negative("ingest.times_agree_s", i.times_agree_s, 3600.0)?;
        non_negative("ingest.dec_agree_deg", i.dec_agree_deg, 180.0)?;
        anyhow::ensure!(
            (1..=64).contains(&i.subbands),
            "ingest.subbands must be 1..=64 (got {})",
            i.subbands
        );
        let s = &self.stages;
        positive("stages.timeout_s", s.timeout_s, 7.0 * 86_400.0)?;
        anyhow::ensure!(
            (1..=100).contains(&s.max_attempts),
            "stages.max_attempts must be 1..=100 (got {})",
            s.max_attempts
        );
        backoff("stages.backoff_s", &s.backoff_s)?;
        for (name, c) in [
            ("convert", &s.convert),
            ("calibrate", &s.calibrate),
            ("image", &s.image),
        ] {
            match c {
                Some(c) => {
                    anyhow::ensure!(
                        !c.command.trim().is_empty(),
                        "stages.{name}.command is empty"
                    );
                    if let Some(t) = c.timeout_s {
                        positive(&format!("stages.{name}.timeout_s"), t, 7.0 * 86_400.0)?;
                    }
                }
                None if s.runner == Some(RunnerKind::External) => {
                    anyhow::bail!(
                        "stages.runner is \"external\" but [stages.{name}] has no command"
                    )
                }
                None => {}
            }
        }
        let sim = &s.simulate;
        anyhow::ensure!(
            (16..=8192).contains(&sim.tile_size),
            "stages.simulate.tile_size must be 16..=8192 pixels (got {})",
            sim.tile_size
        );
        positive("stages.simulate.cell_arcsec", sim.cell_arcsec, 3600.0)?;
        positive("stages.simulate.noise_jy", sim.noise_jy, 1e3)?;
        non_negative(
            "stages.simulate.sources_per_deg2",
            sim.sources_per_deg2,
            1e5,
        )?;
        let m = &self.mosaic;
        anyhow::ensure!(
            (1..=1000).contains(&m.tiles),
            "mosaic.tiles must be 1..=1000 (got {})",
            m.tiles
        );
        anyhow::ensure!(
            m.overlap < m.tiles,
            "mosaic.overlap ({}) must be smaller than mosaic.tiles ({})",
            m.overlap,
            m.tiles
        );
        positive("mosaic.max_span_min", m.max_span_min, 100_000.0)?;
        positive("mosaic.max_gap_min", m.max_gap_min, 100_000.0)?;
        positive("mosaic.max_dec_spread_deg", m.max_dec_spread_deg, 180.0)?;
        let p = &self.publish;
        anyhow::ensure!(
            (1..=100).contains(&p.max_attempts),
            "publish.max_attempts must be 1..=100 (got {})",
            p.max_attempts
        );
        backoff("publish.backoff_s", &p.backoff_s)?;
        positive("publish.timeout_s", p.timeout_s, 7.0 * 86_400.0)?;
        positive(
            "publish.stuck_publishing_min",
            p.stuck_publishing_min,
            7.0 * 1440.0,
        )?;
        non_negative("ledger.reserve_mb", self.ledger.reserve_mb, 1024.0 * 1024.0)?;
        between(
            "ledger.cache_mb",
            self.ledger.cache_mb,
            1.0,
            1024.0 * 1024.0,
        )?;
        if let Some(url) = &self.ledger.url {
            url.parse::<tokio_postgres::Config>().map_err(|e| {
                anyhow::anyhow!(
                    "ledger.url is not a PostgreSQL connection string ({e}); \
                     write postgres://USER@HOST[:PORT]/DATABASE"
                )
            })?;
        }
        let h = &self.server;
        positive("server.header_timeout_s", h.header_timeout_s, 3600.0)?;
        positive("server.body_timeout_s", h.body_timeout_s, 3600.0)?;
        positive("server.shutdown_deadline_s", h.shutdown_deadline_s, 3600.0)?;
        positive("server.write_timeout_s", h.write_timeout_s, 3600.0)?;
        anyhow::ensure!(
            (1..=100_000).contains(&h.max_connections),
            "server.max_connections must be 1..=100000 (got {})",
            h.max_connections
        );
        anyhow::ensure!(
            (1..=64).contains(&h.max_as_of_replays),
            "server.max_as_of_replays must be 1..=64 (got {})",
            h.max_as_of_replays
        );
        for name in &h.allowed_hosts {
            anyhow::ensure!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)),
                "server.allowed_hosts: {name:?} is not a host name"
            );
        }
        self.check_roots()?;
        let v = &self.validate;
        non_negative("validate.stage_min_free_gb", v.stage_min_free_gb, 1e9)?;
        non_negative("validate.products_min_free_gb", v.products_min_free_gb, 1e9)?;
        non_negative("validate.state_min_free_gb", v.state_min_free_gb, 1e9)?;
        if let Some(u) = &self.url {
            reqwest::Url::parse(u).with_context(|| format!("url {u:?} is not a URL"))?;
        }
        Ok(())
    }

    /// The ledger, stage, products, incoming and work folders must not overlap: one
    /// inside another would let the publisher move files it did not stage (products
    /// inside the stage root), or the ingest read its own output. The four roots may sit
    /// inside the ledger folder (the default layout), but not be it, and the ledger may
    /// not lie inside any of them.
    pub fn check_roots(&self) -> anyhow::Result<()> {
        let roots = [
            ("paths.stage_root", self.stage_root()),
            ("paths.products_root", self.products_root()),
            ("paths.incoming", self.incoming()),
            ("paths.work_root", self.work_root()),
        ];
        let data = absolute(&self.data_dir);
        for (i, (a, pa)) in roots.iter().enumerate() {
            let pa = absolute(pa);
            anyhow::ensure!(
                pa != data && !data.starts_with(&pa),
                "{a} ({}) holds or is the ledger folder data_dir ({}); give it a folder of its own",
                pa.display(),
                data.display()
            );
            for entry in crate::events::store::STORE_ENTRIES {
                let store = data.join(entry);
                anyhow::ensure!(
                    !pa.starts_with(&store),
                    "{a} ({}) lies in the ledger's own {} ; give it a folder of its own",
                    pa.display(),
                    store.display()
                );
            }
            for (b, pb) in &roots[i + 1..] {
                let pb = absolute(pb);
                anyhow::ensure!(
                    !pa.starts_with(&pb) && !pb.starts_with(&pa),
                    "{a} ({}) and {b} ({}) overlap; each root needs a folder of its own",
                    pa.display(),
                    pb.display()
                );
            }
        }
        Ok(())
    }

    fn under(&self, given: &Option<PathBuf>, name: &str) -> PathBuf {
        given.clone().unwrap_or_else(|| self.data_dir.join(name))
    }

    /// The ledger folder: `data_dir` itself (what `serve --data-dir` has always owned).
    pub fn ledger_dir(&self) -> PathBuf {
        self.data_dir.clone()
    }
    pub fn incoming(&self) -> PathBuf {
        self.under(&self.paths.incoming, "incoming")
    }
    pub fn stage_root(&self) -> PathBuf {
        self.under(&self.paths.stage_root, "stage")
    }
    pub fn products_root(&self) -> PathBuf {
        self.under(&self.paths.products_root, "products")
    }
    pub fn work_root(&self) -> PathBuf {
        self.under(&self.paths.work_root, "work")
    }
}

/// A path made absolute and, as far as it exists, with symlinks resolved; `..` and `.`
/// are folded lexically in the part that does not exist yet.
pub fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    // Resolve the longest existing prefix (a symlinked root counts where it points).
    let mut rest = Vec::new();
    let mut head = out.clone();
    loop {
        if let Ok(real) = head.canonicalize() {
            return rest.iter().rev().fold(real, |acc: PathBuf, c| acc.join(c));
        }
        match (head.file_name().map(|n| n.to_os_string()), head.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                head = parent.to_path_buf();
            }
            _ => return out,
        }
    }
}

/// Seconds as durations, for backoff lists.
pub fn durations(seconds: &[f64]) -> Vec<Duration> {
    seconds
        .iter()
        .map(|s| Duration::from_secs_f64(s.clamp(0.0, 1e9)))
        .collect()
}

/// A retry schedule: the wait before retry `n` (1-based) is entry `n`; the last entry
/// repeats; an empty schedule waits nothing. The one lookup both the publisher and the
/// stage runner use.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Backoff(Vec<Duration>);

impl Backoff {
    pub fn new(waits: Vec<Duration>) -> Self {
        Backoff(waits)
    }

    /// No wait at all.
    pub const fn none() -> Self {
        Backoff(Vec::new())
    }

    pub fn from_secs(seconds: &[f64]) -> Self {
        Backoff(durations(seconds))
    }

    /// The wait after failed attempt `attempt` (1-based; 0 counts as 1).
    pub fn after(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) as usize - 1).min(self.0.len().saturating_sub(1));
        self.0.get(i).copied().unwrap_or_default()
    }
}

fn positive(name: &str, v: f64, max: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        v.is_finite() && v > 0.0 && v <= max,
        "{name} must be above 0 and at most {max} (got {v})"
    );
    Ok(())
}

fn non_negative(name: &str, v: f64, max: f64) -> anyhow::Result<()> {
    between(name, v, 0.0, max)
}

fn between(name: &str, v: f64, min: f64, max: f64) -> anyhow::Result<()> {
    anyhow::ensure!(
        v.is_finite() && (min..=max).contains(&v),
        "{name} must be between {min} and {max} (got {v})"
    );
    Ok(())
}

fn backoff(name: &str, v: &[f64]) -> anyhow::Result<()> {
    anyhow::ensure!(!v.is_empty(), "{name} is empty");
    for s in v {
        non_negative(name, *s, 7.0 * 86_400.0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_and_checks() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let c: Config = toml::from_str(&example).unwrap();
        c.check().unwrap();
        assert_eq!(c.stages.runner, Some(RunnerKind::External));
        assert_eq!(c.incoming(), PathBuf::from("/data/incoming"));
        assert_eq!(c.stages.image.as_ref().unwrap().timeout_s, Some(7200.0));
    }

    #[test]
    fn backoff_repeats_its_last_entry_and_an_empty_one_waits_nothing() {
        let b = Backoff::from_secs(&[60.0, 300.0, 1500.0]);
        let secs: Vec<u64> = (0..6).map(|n| b.after(n).as_secs()).collect();
        assert_eq!(secs, [60, 60, 300, 1500, 1500, 1500]);
        assert_eq!(Backoff::default().after(3), Duration::ZERO);
        assert_eq!(Backoff::from_secs(&[5.0]).after(u32::MAX).as_secs(), 5);
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c, Config::default());
        c.check().unwrap();
        assert_eq!(c.stage_root(), PathBuf::from("./var/stage"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = toml::from_str::<Config>("[ingest]\nstable = 3\n").unwrap_err();
        assert!(e.to_string().contains("stable"), "{e}");
        let c: Config = toml::from_str("[mosaic]\ntiles = 4\noverlap = 4\n").unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("mosaic.overlap"), "{e}");
        let c: Config = toml::from_str("[stages]\nrunner = \"external\"\n").unwrap();
        let e = c.check().unwrap_err().to_string();
        assert!(e.contains("[stages.convert]"), "{e}");
        // sled refuses a cache under 256 bytes with a panic: the check refuses it first.
        for bad in ["0.0001", "0", "-5", "nan"] {
            let c: Config = toml::from_str(&format!("[ledger]\ncache_mb = {bad}\n")).unwrap();
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains("ledger.cache_mb"), "{bad}: {e}");
        }
        let c: Config = toml::from_str("[ledger]\ncache_mb = 64\n").unwrap();
        c.check().unwrap();
        assert_eq!(c.ledger.cache_bytes(), 64 << 20);
    }
}
