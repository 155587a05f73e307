//! The pipeline on a real ledger folder: ingest (half-written, corrupt, duplicate and late
//! files, timeouts, out-of-order arrival, restarts), the stage runners with real child
//! processes, and the demo end to end.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use contimg::config::{Config, RunnerKind, StageCommand};
use contimg::events::catalogue::{
    GroupFormed, IngestGroupTimedOut, StageFailed, SubbandFileAccepted, SubbandFileRejected,
};
use contimg::events::{Direction, Ledger, RecordedEvent, Store};
use contimg::pipeline::ingest::{Ingest, group_id};
use contimg::pipeline::stages::{GroupPaths, run_stage};
use contimg::pipeline::state::{GroupState, Stage, StageProgress};
use contimg::pipeline::{Pipeline, PipelineConfig, sim};

const T0: &str = "2026-11-30T10:00:00";
const T1: &str = "2026-11-30T10:05:00";
const T2: &str = "2026-11-30T10:10:00";

fn config(root: &Path) -> Config {
    let mut c = Config::under_root(root);
    c.ingest.poll_interval_s = 0.05;
    c.ingest.stable_s = 0.2;
    c.ingest.group_timeout_s = 600.0;
    c.stages.backoff_s = vec![0.05];
    c.stages.runner = Some(contimg::config::RunnerKind::Simulate);
    c.stages.simulate.tile_size = 32;
    c
}

struct Rig {
    store: Store,
    pipeline: Pipeline,
    ingest: Ingest,
    incoming: PathBuf,
}

async fn rig(root: &Path, c: &Config) -> Rig {
    let store = Store::open(c.ledger_dir()).unwrap();
    let pipeline = Pipeline::open(Ledger::Local(store.clone()), PipelineConfig::from_config(c))
        .await
        .unwrap();
    let ingest = Ingest::new(c.incoming(), c.ingest.clone());
    let _ = root;
    Rig {
        store,
        pipeline,
        ingest,
        incoming: c.incoming(),
    }
}

impl Rig {
    /// Scans until the folder has been quiet for longer than the stability window.
    async fn settle(&mut self) {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            self.pipeline.ingest_once(&mut self.ingest).await.unwrap();
        }
    }

    fn events(&self) -> Vec<RecordedEvent> {
        self.store
            .read_all(Some(0), Direction::Forward, 100_000)
            .unwrap()
    }

    fn of<T: contimg::events::catalogue::DomainEvent>(&self) -> Vec<T> {
        self.events()
            .iter()
            .filter(|e| e.event_type == T::TYPE)
            .map(|e| serde_json::from_slice(&e.data).unwrap())
            .collect()
    }

    async fn close(self) {
        drop(self.pipeline);
        let store = self.store;
        tokio::task::spawn_blocking(move || store.close())
            .await
            .unwrap();
    }
}

fn subband(dir: &Path, t: &str, sb: u8) -> PathBuf {
    let p = dir.join(format!("{t}_sb{sb:02}.hdf5"));
    sim::write_subband(&p, 71.6, 2048, None).unwrap();
    p
}

fn observation(dir: &Path, t: &str, skip: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    for sb in 0..16u8 {
        if !skip.contains(&sb) {
            subband(dir, t, sb);
        }
    }
}

#[tokio::test]
async fn a_growing_file_is_taken_only_once_it_holds_still() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut r = rig(dir.path(), &c).await;
    observation(&r.incoming, T0, &[15]);
    // sb15 is still being written: it grows before every scan, so no scan ever sees it
    // unchanged. The pauses only make the whole stretch (about 0.5 s) outlast the 0.2 s
    // stability window, so that what keeps the file out is its growth, not its youth.
    let growing = r.incoming.join(format!("{T0}_sb15.hdf5"));
    let bytes = std::fs::read(subband(dir.path(), T0, 15)).unwrap();
    let mut f = std::fs::File::create(&growing).unwrap();
    let chunk = bytes.len().div_ceil(9);
    for part in bytes.chunks(chunk).take(8) {
        f.write_all(part).unwrap();
        f.flush().unwrap();
        r.pipeline.ingest_once(&mut r.ingest).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let accepted = r.of::<SubbandFileAccepted>();
    assert!(
        accepted.iter().all(|a| a.subband != 15),
        "the growing file was taken: {accepted:?}"
    );
    assert!(
        r.of::<GroupFormed>().is_empty(),
        "formed before sb15 settled"
    );
    f.write_all(&bytes[(8 * chunk).min(bytes.len())..]).unwrap();
    drop(f);
    r.settle().await;
    let accepted = r.of::<SubbandFileAccepted>();
    assert_eq!(accepted.len(), 16);
    let sb15 = accepted.iter().find(|a| a.subband == 15).unwrap();
    assert_eq!(
        sb15.size_bytes,
        bytes.len() as u64,
        "taken at its final size"
    );
    // What the header said is recorded with the file.
    let h = sb15.header.as_ref().expect("the header is recorded");
    assert_eq!(h.start, "2026-11-30T10:00:00.000000Z");
    assert_eq!((h.telescope.as_str(), h.simulated), ("DSA-110", true));
    assert!((h.dec_deg.unwrap() - 71.6).abs() < 1e-9);
    let formed = r.of::<GroupFormed>();
    assert_eq!(formed.len(), 1);
    assert_eq!(formed[0].obs_time, T0);
    assert_eq!(formed[0].files.len(), 16);
    assert!((formed[0].dec_deg.unwrap() - 71.6).abs() < 1e-9);
    r.close().await;
}

#[tokio::test]
async fn bad_files_are_refused_with_their_reason_and_block_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut r = rig(dir.path(), &c).await;
    observation(&r.incoming, T0, &[]);
    // A corrupt header, an empty file, a bad name, a subband out of range, and a second
    // sb03 of the same observation (one second later in its name).
    std::fs::write(r.incoming.join(format!("{T1}_sb00.hdf5")), vec![0x42; 4096]).unwrap();
    std::fs::write(r.incoming.join(format!("{T1}_sb01.hdf5")), b"").unwrap();
    let good = std::fs::read(subband(dir.path(), T1, 2)).unwrap();
    std::fs::write(r.incoming.join("2026-11-30T10:05_sb02.hdf5"), &good).unwrap();
    std::fs::write(r.incoming.join(format!("{T1}_sb16.hdf5")), &good).unwrap();
    subband(&r.incoming, "2026-11-30T10:00:01", 3);
    // A UVH5 file cut short, an HDF5 file that is not UVH5, a name 40 s from its header's
    // start, and subbands of T0 whose headers disagree with the rest of it.
    std::fs::write(
        r.incoming.join(format!("{T1}_sb04.hdf5")),
        &good[..good.len() / 2],
    )
    .unwrap();
    std::fs::write(
        r.incoming.join(format!("{T1}_sb05.hdf5")),
        &good[..good.len() - 1],
    )
    .unwrap();
    sim::write_subband_at(
        &r.incoming.join(format!("{T1}_sb06.hdf5")),
        Some(
            chrono::NaiveDateTime::parse_from_str("2026-11-30T10:05:40", "%Y-%m-%dT%H:%M:%S")
                .unwrap(),
        ),
        71.6,
        2048,
        None,
    )
    .unwrap();
    observation(&r.incoming, T2, &[8, 9]);
    sim::write_subband(
        &r.incoming.join(format!("{T2}_sb08.hdf5")),
        65.0,
        2048,
        None,
    )
    .unwrap();
    let start = chrono::NaiveDateTime::parse_from_str(T2, "%Y-%m-%dT%H:%M:%S").unwrap();
    let sb07_band = contimg::pipeline::uvh5::sim_file_bytes(&contimg::pipeline::uvh5::SimFile {
        start_ms: start.and_utc().timestamp_millis(),
        duration_s: sim::OBS_SECONDS,
        dec_deg: 71.6,
        subband: 7,
        subbands: 16,
        size_hint: 2048,
    })
    .unwrap();
    std::fs::write(r.incoming.join(format!("{T2}_sb09.hdf5")), sb07_band).unwrap();
    let mut plain = hdf5_pure::FileBuilder::new();
    plain.create_dataset("x").with_f64_data(&[1.0]);
    std::fs::write(
        r.incoming.join(format!("{T1}_sb07.hdf5")),
        plain.finish().unwrap(),
    )
    .unwrap();
    // Not ours: left alone, never recorded.
    std::fs::write(r.incoming.join("notes.txt"), b"hello").unwrap();
    std::fs::write(r.incoming.join(".partial_sb04.hdf5"), b"x").unwrap();
    r.settle().await;

    let rejected = r.of::<SubbandFileRejected>();
    let reason = |name: &str| {
        rejected
            .iter()
            .find(|x| x.path.ends_with(name))
            .map(|x| x.reason.clone())
            .unwrap_or_else(|| panic!("{name} not refused: {rejected:?}"))
    };
    assert!(reason(&format!("{T1}_sb00.hdf5")).contains("no HDF5 signature"));
    assert!(reason(&format!("{T1}_sb01.hdf5")).contains("empty"));
    assert!(reason("2026-11-30T10:05_sb02.hdf5").contains("YYYY-MM-DDTHH:MM:SS_sbNN"));
    assert!(reason(&format!("{T1}_sb16.hdf5")).contains("out of range"));
    let dup = reason("2026-11-30T10:00:01_sb03.hdf5");
    assert!(dup.contains("duplicate subband sb03"), "{dup}");
    assert!(dup.contains(&format!("{T0}_sb03.hdf5")), "{dup}");
    assert!(reason(&format!("{T1}_sb04.hdf5")).starts_with("truncated: "));
    assert!(reason(&format!("{T1}_sb05.hdf5")).starts_with("truncated: "));
    assert!(reason(&format!("{T1}_sb07.hdf5")).starts_with("not UVH5: no Header/"));
    let off = reason(&format!("{T1}_sb06.hdf5"));
    assert!(
        off.contains(
            "name time 2026-11-30T10:05:00 disagrees with the header's start 2026-11-30T10:05:40"
        ),
        "{off}"
    );
    let dec = reason(&format!("{T2}_sb08.hdf5"));
    assert!(
        dec.starts_with(&format!(
            "disagrees with observation {T2}: declination 65.0000 deg against 71.6000 deg"
        )),
        "{dec}"
    );
    let band = reason(&format!("{T2}_sb09.hdf5"));
    assert!(
        band.contains("overlap") && band.contains("of sb07"),
        "{band}"
    );
    for r in &rejected {
        assert_ne!(
            contimg::pipeline::ingest::reason_class(&r.reason),
            "other",
            "{r:?}"
        );
    }
    assert_eq!(rejected.len(), 11, "{rejected:?}");
    // The good observation formed regardless.
    let formed = r.of::<GroupFormed>();
    assert_eq!(formed.len(), 1);
    assert_eq!(formed[0].files.len(), 16);
    // Nothing is looked at twice.
    let before = r.events().len();
    r.settle().await;
    assert_eq!(r.events().len(), before);
    r.close().await;
}

#[tokio::test]
async fn an_incomplete_observation_times_out_and_late_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.ingest.group_timeout_s = 0.6;
    let mut r = rig(dir.path(), &c).await;
    observation(&r.incoming, T0, &[9]);
    r.settle().await;
    assert!(
        r.of::<IngestGroupTimedOut>().is_empty(),
        "timed out too early"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    r.pipeline.ingest_once(&mut r.ingest).await.unwrap();
    let t = r.of::<IngestGroupTimedOut>();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].obs_time, T0);
    assert_eq!(t[0].missing, vec![9]);
    assert_eq!(t[0].present.len(), 15);
    assert!(t[0].waited_s >= 0.6);
    // The missing subband turns up after all: too late, and said so.
    subband(&r.incoming, T0, 9);
    r.settle().await;
    let late = r.of::<SubbandFileRejected>();
    assert_eq!(late.len(), 1);
    assert!(late[0].reason.contains("late file"), "{}", late[0].reason);
    assert!(r.of::<GroupFormed>().is_empty());
    r.close().await;
}

#[tokio::test]
async fn groups_go_on_in_observation_order_whatever_the_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut r = rig(dir.path(), &c).await;
    // The later observation arrives first, the earlier one complete in the same scan.
    observation(&r.incoming, T2, &[]);
    observation(&r.incoming, T1, &[]);
    observation(&r.incoming, T0, &[]);
    r.settle().await;
    let formed = r.of::<GroupFormed>();
    let order: Vec<&str> = formed.iter().map(|g| g.obs_time.as_str()).collect();
    assert_eq!(order, vec![T0, T1, T2]);
    // The stages run oldest group first: the first StageStarted is in T0's stream.
    for _ in 0..3 {
        r.pipeline.step().await.unwrap();
    }
    let first_stage = r
        .events()
        .into_iter()
        .find(|e| e.event_type == "StageStarted")
        .unwrap();
    assert_eq!(
        first_stage.stream_id,
        format!("group-{}", formed[0].group_id)
    );
    r.close().await;
}

#[tokio::test]
async fn a_restart_resumes_from_the_ledger_without_taking_a_file_twice() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut r = rig(dir.path(), &c).await;
    observation(&r.incoming, T0, &[]);
    observation(&r.incoming, T1, &(8..16).collect::<Vec<_>>());
    r.settle().await;
    assert_eq!(r.of::<SubbandFileAccepted>().len(), 24);
    assert_eq!(r.of::<GroupFormed>().len(), 1);
    r.close().await;

    // The rest of T1 arrives while nothing runs.
    for sb in 8..16 {
        subband(&c.incoming(), T1, sb);
    }
    let mut r = rig(dir.path(), &c).await;
    r.settle().await;
    let accepted = r.of::<SubbandFileAccepted>();
    assert_eq!(accepted.len(), 32, "each file exactly once");
    let mut names: Vec<&str> = accepted.iter().map(|a| a.path.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 32);
    let formed = r.of::<GroupFormed>();
    assert_eq!(formed.len(), 2);
    assert_eq!(formed[1].obs_time, T1);
    // Its members are the 8 files from before the restart and the 8 after.
    assert_eq!(formed[1].files.len(), 16);
    r.close().await;
}

/// Safeguard 1 at group formation: an id held by other members is refused and recorded
/// (the held group untouched); the same members under it are an idempotent repeat.
#[tokio::test]
async fn a_group_id_held_by_other_members_is_refused_and_the_same_members_are_idempotent() {
    use contimg::events::ExpectedRevision;
    use contimg::events::catalogue::{DomainEvent, EventMetadata, GroupRejected};
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let r = rig(dir.path(), &c).await;
    let files = |t: &str| -> Vec<String> {
        (0..16u8)
            .map(|sb| {
                c.incoming()
                    .join(format!("{t}_sb{sb:02}.hdf5"))
                    .display()
                    .to_string()
            })
            .collect()
    };
    let meta = EventMetadata::actor("another-writer");
    // T0's id is squatted by a group of other files; T1's is held by its own members.
    let squatter = GroupFormed {
        group_id: group_id(T0, &files(T0)),
        obs_time: "2026-11-29T23:55:00".into(),
        files: files("2026-11-29T23:55:00"),
        dec_deg: None,
    };
    let same = GroupFormed {
        group_id: group_id(T1, &files(T1)),
        obs_time: T1.into(),
        files: files(T1),
        dec_deg: None,
    };
    for g in [&squatter, &same] {
        r.store
            .append(
                &format!("group-{}", g.group_id),
                ExpectedRevision::NoStream,
                vec![g.to_proposed(&meta)],
            )
            .await
            .unwrap();
    }
    let mut r = rig_again(r, dir.path(), &c).await;
    observation(&r.incoming, T0, &[]);
    observation(&r.incoming, T1, &[]);
    r.settle().await;
    let refused = r.of::<GroupRejected>();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].obs_time, T0);
    assert_eq!(refused[0].group_id, squatter.group_id);
    assert!(
        refused[0].reason.contains("2026-11-29T23:55:00"),
        "{}",
        refused[0].reason
    );
    let held = r
        .store
        .read_stream(
            &format!("group-{}", squatter.group_id),
            Some(0),
            Direction::Forward,
            10,
        )
        .unwrap();
    assert_eq!(held.len(), 1, "the held group is not touched");
    let same_stream = r
        .store
        .read_stream(
            &format!("group-{}", same.group_id),
            Some(0),
            Direction::Forward,
            10,
        )
        .unwrap();
    assert_eq!(same_stream.len(), 1, "the same members again write nothing");
    assert_eq!(r.of::<GroupFormed>().len(), 2);
    assert!(
        r.of::<SubbandFileRejected>().is_empty(),
        "the held group's own files are taken, not late"
    );
    // Nothing is refused or formed again on later scans.
    let before = r.events().len();
    r.settle().await;
    assert_eq!(r.events().len(), before);
    r.close().await;
}

/// The rig again on the same ledger (the pipeline refolds what was appended meanwhile).
async fn rig_again(r: Rig, root: &Path, c: &Config) -> Rig {
    r.close().await;
    rig(root, c).await
}

fn fixture_group(root: &Path, id: &str) -> (GroupState, GroupPaths) {
    let paths = GroupPaths::new(root, id);
    std::fs::create_dir_all(&paths.work).unwrap();
    let files: Vec<String> = (0..16u8)
        .map(|sb| {
            let p = paths.work.join(format!("{T0}_sb{sb:02}.hdf5"));
            sim::write_subband(&p, 71.6, 1024, None).unwrap();
            p.display().to_string()
        })
        .collect();
    let g = GroupState {
        id: id.into(),
        obs_time: T0.into(),
        files,
        dec_deg: Some(71.6),
        stages: Default::default(),
        head: 0,
    };
    (g, paths)
}

fn external(
    convert: &str,
    calibrate: &str,
    image: &str,
    timeout: f64,
) -> contimg::config::StagesConfig {
    let mut s = Config::default().stages;
    s.runner = Some(RunnerKind::External);
    s.timeout_s = timeout;
    let cmd = |c: &str| {
        Some(StageCommand {
            command: c.into(),
            timeout_s: None,
        })
    };
    s.convert = cmd(convert);
    s.calibrate = cmd(calibrate);
    s.image = cmd(image);
    s
}

#[tokio::test]
async fn external_stages_succeed_fail_with_stderr_and_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let (g, paths) = fixture_group(dir.path(), "g1");
    // A Measurement Set as the shell can write one: an 8-byte AipsIO description, its
    // table.info and a data file.
    let ms = "mkdir -p {output} && printf '\\276\\276\\276\\276\\000\\000\\000\\010' > {output}/table.dat \
              && printf 'Type = Measurement Set\\n' > {output}/table.info && : > {output}/table.f0";
    let cfg = external(
        &format!("{ms} && echo converted {{group}} {{obs_time}}"),
        "echo 'SEVERE: calibrater::solve no valid data for field J1459+7140' >&2; exit 3",
        "sleep 30",
        0.5,
    );
    let ok = run_stage(&cfg, Stage::Convert, &g, &paths, 71.6).await;
    assert_eq!(ok.exit_status, Some(0));
    assert_eq!(
        ok.outcome.as_ref().unwrap(),
        &vec![paths.ms.display().to_string()]
    );
    assert!(paths.ms.join("table.dat").is_file());
    let log = std::fs::read_to_string(paths.work.join("convert.stdout.log")).unwrap();
    assert!(log.contains(&format!("converted g1 {T0}")), "{log}");
    // The template's {input} gave the 16 files, quoted.
    assert!(ok.command.as_ref().unwrap().contains("mkdir -p"));
    // A folder holding a bare table.dat is no Measurement Set: the stage has failed.
    let (g3, paths3) = fixture_group(dir.path(), "g3");
    let bare = external(
        "mkdir -p {output} && touch {output}/table.dat",
        "true",
        "true",
        5.0,
    );
    let f = run_stage(&bare, Stage::Convert, &g3, &paths3, 71.6)
        .await
        .outcome
        .unwrap_err();
    assert!(
        f.error.contains("the Measurement Set") && f.error.contains("not a CASA table"),
        "{}",
        f.error
    );

    let failed = run_stage(&cfg, Stage::Calibrate, &g, &paths, 71.6).await;
    assert_eq!(failed.exit_status, Some(3));
    let f = failed.outcome.unwrap_err();
    assert!(!f.timed_out);
    assert!(f.error.contains("exited with status 3"), "{}", f.error);
    assert!(
        f.stderr_tail.contains("no valid data for field J1459+7140"),
        "{}",
        f.stderr_tail
    );

    let hung = run_stage(&cfg, Stage::Image, &g, &paths, 71.6).await;
    let f = hung.outcome.unwrap_err();
    assert!(f.timed_out, "{f:?}");
    assert!(f.error.contains("timed out"), "{}", f.error);
    assert_eq!(hung.exit_status, None);

    // Exit 0 without the expected output is a failure too.
    let cfg = external("true", "true", "true", 5.0);
    let (g2, paths2) = fixture_group(dir.path(), "g2");
    let empty = run_stage(&cfg, Stage::Convert, &g2, &paths2, 71.6).await;
    let f = empty.outcome.unwrap_err();
    assert!(f.error.contains("wrote no Measurement Set"), "{}", f.error);
}

#[tokio::test]
async fn a_failing_stage_is_retried_with_backoff_then_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.stages = external("echo 'cannot open UVH5' >&2; exit 2", "true", "true", 5.0);
    c.stages.max_attempts = 3;
    c.stages.backoff_s = vec![0.1, 0.2];
    let mut r = rig(dir.path(), &c).await;
    observation(&r.incoming, T0, &[]);
    r.settle().await;
    common::eventually(10.0, || async {
        let _ = r.pipeline.step().await.unwrap();
        let s = r.pipeline.snapshot().await;
        s.groups.values().next().filter(|g| g.failed()).map(|_| ())
    })
    .await
    .expect("the group was never given up");
    let failures = r.of::<StageFailed>();
    assert_eq!(failures.len(), 3);
    assert_eq!(
        failures.iter().map(|f| f.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(failures[0].next_retry_at.is_some());
    assert!(failures[1].next_retry_at.is_some());
    assert_eq!(failures[2].next_retry_at, None, "no attempt left");
    assert!(failures.iter().all(|f| f.exit_status == Some(2)));
    assert!(failures[2].stderr_tail.contains("cannot open UVH5"));
    // Backoff: each retry started no sooner than the retry time its failure named, which
    // lies 0.1 s (then 0.2 s) after the failure was decided.
    let events = r.events();
    let starts: Vec<i64> = events
        .iter()
        .filter(|e| e.event_type == "StageStarted")
        .map(|e| e.created_micros)
        .collect();
    for (i, f) in failures[..2].iter().enumerate() {
        let due = chrono::DateTime::parse_from_rfc3339(f.next_retry_at.as_deref().unwrap())
            .unwrap()
            .timestamp_micros();
        assert!(
            starts[i + 1] >= due,
            "attempt {} started before {due}: {starts:?}",
            i + 2
        );
    }
    let gaps: Vec<i64> = failures[..2]
        .iter()
        .zip(&starts)
        .map(|(f, s)| {
            chrono::DateTime::parse_from_rfc3339(f.next_retry_at.as_deref().unwrap())
                .unwrap()
                .timestamp_micros()
                - s
        })
        .collect();
    assert!(gaps[0] >= 100_000 && gaps[1] >= 200_000, "{gaps:?}");
    let s = r.pipeline.snapshot().await;
    let g = s.groups.values().next().unwrap();
    assert!(matches!(
        g.stages[0],
        StageProgress {
            given_up: true,
            attempts: 3,
            ..
        }
    ));
    assert_eq!(g.next_stage(), None);
    r.close().await;
}

/// Work that fails without an event of its own (here: staging an image, with a file where
/// the stage's `images` folder goes) is held back; the other groups' stages go on, and the
/// image is staged once the way is clear.
#[tokio::test]
async fn a_product_that_cannot_be_staged_holds_up_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path());
    let mut r = rig(dir.path(), &c).await;
    std::fs::create_dir_all(c.stage_root()).unwrap();
    let blocker = c.stage_root().join("images");
    std::fs::write(&blocker, b"in the way").unwrap();
    observation(&r.incoming, T0, &[]);
    observation(&r.incoming, T1, &[]);
    r.settle().await;
    let refused = std::cell::Cell::new(0);
    let imaged = common::eventually(30.0, || async {
        if r.pipeline.step().await.is_err() {
            refused.set(refused.get() + 1);
        }
        let s = r.pipeline.snapshot().await;
        (s.groups
            .values()
            .filter(|g| g.stages[2].completed.is_some())
            .count()
            == 2)
            .then_some(())
    })
    .await;
    assert!(imaged.is_some(), "the second group's stages were held up");
    assert!(refused.get() >= 1, "staging never failed");
    assert!(r.pipeline.snapshot().await.products.is_empty());
    std::fs::remove_file(&blocker).unwrap();
    let staged = common::eventually(30.0, || async {
        let _ = r.pipeline.step().await;
        (r.pipeline.snapshot().await.products.len() == 2).then_some(())
    })
    .await;
    assert!(
        staged.is_some(),
        "the images were not staged once the way was clear"
    );
    r.close().await;
}

#[test]
fn group_ids_are_the_observation_and_a_hash_of_the_members() {
    let files: Vec<String> = (0..16)
        .map(|sb| format!("/in/{T0}_sb{sb:02}.hdf5"))
        .collect();
    let id = group_id(T0, &files);
    assert!(id.starts_with("20261130T100000-"), "{id}");
    assert_eq!(id.len(), "20261130T100000-".len() + 8);
}

#[test]
fn the_demo_runs_end_to_end_and_its_summary_matches_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let out = common::contimg(&[
        "demo",
        "--dir",
        demo.to_str().unwrap(),
        "--tile-size",
        "48",
        "--cadence-ms",
        "120",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The injected faults, each where it shows.
    assert_eq!(s["files_rejected"].as_array().unwrap().len(), 1);
    assert!(
        s["files_rejected"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("no HDF5 signature")
    );
    assert_eq!(s["groups_timed_out"], 1);
    assert_eq!(s["groups_formed"], 23);
    assert_eq!(s["tiles_imaged"], 23);
    assert_eq!(s["mosaics_created"], 1);
    assert_eq!(s["mosaics_refused"][0]["safeguard"], "calibration_tables");
    assert_eq!(s["mosaics_published"], 1);
    assert_eq!(s["publish_failures_healed"], 1);
    assert_eq!(s["files_accepted"], 23 * 16 + 15);

    // The same figures from the ledger the demo left behind, through the audit command.
    let ledger = demo.join("ledger");
    let status = common::contimg(&[
        "audit",
        "status",
        "--data-dir",
        ledger.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let status = status.get("status").unwrap_or(&status);
    for field in [
        "total_published",
        "total_staging",
        "total_publishing",
        "failed_publishes",
        "max_attempts_exceeded",
        "success_rate_percent",
    ] {
        assert_eq!(status[field], s["status"][field], "{field}");
    }
    assert_eq!(status["total_published"], 24, "23 images and 1 mosaic");
    let events = common::contimg(&["export", "--data-dir", ledger.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&events.stdout);
    let count = |t: &str| {
        text.lines()
            .filter(|l| l.contains(&format!("\"eventType\":\"{t}\"")))
            .count()
    };
    assert_eq!(count("PublishFailed"), 1);
    assert_eq!(count("MosaicGroupRejected"), 1);
    assert_eq!(count("IngestGroupTimedOut"), 1);
    assert_eq!(
        text.lines().count() as u64,
        s["ledger_events"].as_u64().unwrap()
    );
    // The mosaic is in the products root, with its weight and noise maps.
    let mosaics: Vec<PathBuf> = std::fs::read_dir(demo.join("products/mosaics"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(mosaics.len(), 1);
    for f in ["mosaic.fits", "weights.fits", "noise.fits"] {
        assert!(mosaics[0].join(f).is_file(), "{f}");
    }
}

/// A `GroupFormed` appended by someone else naming files outside the incoming folder: the
/// convert stage refuses its inputs (a `StageFailed` saying why) and never runs.
#[tokio::test]
async fn convert_takes_no_input_from_outside_the_incoming_folder() {
    use contimg::events::ExpectedRevision;
    use contimg::events::catalogue::{DomainEvent, EventMetadata};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.stages = external("touch {work}/ran", "true", "true", 5.0);
    c.stages.max_attempts = 1;
    let r = rig(dir.path(), &c).await;
    let forged = GroupFormed {
        group_id: "20261130T100000-00000000".into(),
        obs_time: T0.into(),
        files: vec!["/etc/hostname".into()],
        dec_deg: None,
    };
    r.store
        .append(
            "group-20261130T100000-00000000",
            ExpectedRevision::NoStream,
            vec![forged.to_proposed(&EventMetadata::actor("someone"))],
        )
        .await
        .unwrap();
    let r = rig_again(r, dir.path(), &c).await;
    common::eventually(10.0, || async {
        let _ = r.pipeline.step().await.unwrap();
        (!r.of::<StageFailed>().is_empty()).then_some(())
    })
    .await
    .expect("no StageFailed");
    let failed = r.of::<StageFailed>();
    assert_eq!(failed[0].stage, "convert");
    assert!(
        failed[0].error.contains("input refused") && failed[0].error.contains("/etc/hostname"),
        "{}",
        failed[0].error
    );
    assert!(!c.work_root().join("20261130T100000-00000000/ran").exists());
    r.close().await;
}
