//! Ingest throughput: subband files checked (name, HDF5 signature, size) and grouped per
//! second, each decision appended durably to a real ledger.
//!
//! ```sh
//! cargo run --release --example bench_ingest -- [OBSERVATIONS] [BYTES_PER_FILE]
//! ```
//! Defaults: 288 observations (one DSA-110 day: 4,608 files) of 64 KiB files. The files
//! are all written first; the clock runs from the first scan until every group is formed.

use std::time::Instant;

use contimg::config::Config;
use contimg::events::{Ledger, Store};
use contimg::pipeline::ingest::{Ingest, NAME_TIME};
use contimg::pipeline::{Pipeline, PipelineConfig, sim};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let observations: usize = args.get(1).map_or(Ok(288), |s| s.parse())?;
    let bytes: usize = args.get(2).map_or(Ok(64 * 1024), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let mut c = Config::under_root(dir.path());
    c.ingest.stable_s = 0.0;
    std::fs::create_dir_all(c.incoming())?;
    let start = chrono::NaiveDateTime::parse_from_str("2026-11-30T00:00:00", NAME_TIME)?;
    for i in 0..observations {
        let t = (start + chrono::Duration::minutes(5 * i as i64)).format(NAME_TIME);
        for sb in 0..16u8 {
            let p = c.incoming().join(format!("{t}_sb{sb:02}.hdf5"));
            sim::write_subband(&p, 71.6, bytes, None)?;
        }
    }
    let files = observations * 16;
    let store = Store::open(c.ledger_dir())?;
    let pipeline = Pipeline::open(
        Ledger::Local(store.clone()),
        PipelineConfig::from_config(&c),
    )
    .await?;
    let mut ingest = Ingest::new(c.incoming(), c.ingest.clone());
    let t0 = Instant::now();
    let mut scans = 0;
    loop {
        pipeline.ingest_once(&mut ingest).await?;
        scans += 1;
        let s = pipeline.snapshot().await;
        if s.groups.len() >= observations {
            break;
        }
        anyhow::ensure!(
            scans < 1000,
            "ingest did not finish: {} groups",
            s.groups.len()
        );
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "ingest: {files} files ({bytes} B each) checked and grouped into {observations} groups in {secs:.3} s \
         = {:.0} files/s ({scans} scans, {} events)",
        files as f64 / secs,
        store.event_count()
    );
    drop(pipeline);
    tokio::task::spawn_blocking(move || store.close()).await?;
    Ok(())
}
