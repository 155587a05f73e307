//! The five safeguards of mosaic group formation, each passed and each refusal, on real
//! folders and real FITS files; the id collision through the pipeline on a real ledger,
//! and two workers sharing one ledger without doing anything twice.

mod common;

use std::path::Path;
use std::time::Duration;

use contimg::config::{Config, MosaicConfig};
use contimg::events::catalogue::{
    DomainEvent, EventMetadata, GroupFormed, MosaicGroupCreated, MosaicGroupRejected, StageStarted,
};
use contimg::events::{Direction, ExpectedRevision, Ledger, Store};
use contimg::pipeline::ingest::{Ingest, NAME_TIME, group_id};
use contimg::pipeline::mosaic::io::{OutputKeys, write_plane};
use contimg::pipeline::mosaic::synth::{TileSpec, write_tile};
use contimg::pipeline::safeguards::{self, check};
use contimg::pipeline::state::{GroupState, StageProgress};
use contimg::pipeline::worker::mosaic_id;
use contimg::pipeline::{Pipeline, PipelineConfig, sim};

/// A member that passes everything: MS on disk, both tables, a 32-pixel tile.
fn member(root: &Path, i: usize, minutes: i64, dec: f64, cell: f64) -> GroupState {
    let t = chrono::NaiveDateTime::parse_from_str("2026-11-30T10:00:00", NAME_TIME).unwrap()
        + chrono::Duration::minutes(minutes);
    let id = format!("g{i:02}");
    let work = root.join(&id);
    let ms = work.join(format!("{id}.ms"));
    let table = work.join(format!("{id}.G"));
    use contimg::pipeline::casa;
    casa::write_skeleton(&ms, casa::MEASUREMENT_SET, "", "test").unwrap();
    casa::write_skeleton(&table, casa::CALIBRATION, "G Jones", "test").unwrap();
    let tile = work.join(format!("{id}.pbcor.fits"));
    let spec = TileSpec {
        ra_deg: 150.0 + i as f64 * 0.3,
        dec_deg: dec,
        npix: 32,
        cell_arcsec: cell,
        seed: i as u64 + 1,
        ..TileSpec::default()
    };
    write_tile(&spec, &[], &tile, None).unwrap();
    let done = |outputs: Vec<&Path>| StageProgress {
        attempts: 1,
        completed: Some(outputs.iter().map(|p| p.display().to_string()).collect()),
        ..Default::default()
    };
    GroupState {
        id,
        obs_time: t.format(NAME_TIME).to_string(),
        files: vec![],
        dec_deg: Some(dec),
        stages: [done(vec![&ms]), done(vec![&table]), done(vec![&tile])],
        head: 3,
    }
}

fn members(root: &Path) -> Vec<GroupState> {
    (0..10)
        .map(|i| member(root, i, 5 * i as i64, 71.6, 3.0))
        .collect()
}

fn refs(m: &[GroupState]) -> Vec<&GroupState> {
    m.iter().collect()
}

#[test]
fn ten_good_tiles_pass_every_safeguard() {
    let dir = tempfile::tempdir().unwrap();
    let m = members(dir.path());
    assert_eq!(
        check(&refs(&m), &MosaicConfig::default(), dir.path()),
        Ok(())
    );
}

#[test]
fn time_span_refuses_a_long_span_a_gap_and_a_declination_off_the_mean() {
    let dir = tempfile::tempdir().unwrap();
    let m = members(dir.path());
    let short = MosaicConfig {
        max_span_min: 30.0,
        ..MosaicConfig::default()
    };
    let r = check(&refs(&m), &short, dir.path()).unwrap_err();
    assert_eq!(r.safeguard, safeguards::TIME_SPAN);
    assert_eq!(r.member.as_deref(), Some("g09"));
    assert!(r.reason.contains("45.0 min"), "{}", r.reason);

    let mut gap = members(dir.path());
    for (i, g) in gap.iter_mut().enumerate().skip(6) {
        *g = member(dir.path(), i, 5 * i as i64 + 7, 71.6, 3.0);
    }
    let r = check(&refs(&gap), &MosaicConfig::default(), dir.path()).unwrap_err();
    assert_eq!(r.safeguard, safeguards::TIME_SPAN);
    assert_eq!(r.member.as_deref(), Some("g06"));
    assert!(
        r.reason.contains("12.0 min after the previous tile g05"),
        "{}",
        r.reason
    );

    let mut dec = members(dir.path());
    dec[3] = member(dir.path(), 3, 15, 72.1, 3.0);
    let r = check(&refs(&dec), &MosaicConfig::default(), dir.path()).unwrap_err();
    assert_eq!(r.safeguard, safeguards::TIME_SPAN);
    assert_eq!(r.member.as_deref(), Some("g03"));
    assert!(r.reason.contains("declination 72.1"), "{}", r.reason);
}

#[test]
fn ms_stage_refuses_an_unfinished_stage_and_a_missing_measurement_set() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = members(dir.path());
    m[4].stages[2] = StageProgress {
        attempts: 3,
        last_error: Some("wsclean exited with status 1".into()),
        given_up: true,
        ..Default::default()
    };
    let r = check(&refs(&m), &MosaicConfig::default(), dir.path()).unwrap_err();
    assert_eq!(r.safeguard, safeguards::MS_STAGE);
    assert_eq!(r.member.as_deref(), Some("g04"));
    assert!(
        r.reason.contains("image failed after 3 attempts"),
        "{}",
        r.reason
    );

    let m = members(dir.path());
    std::fs::remove_dir_all(&m[7].stages[0].completed.as_ref().unwrap()[0]).unwrap();
    let r = check(&refs(&m), &MosaicConfig::default(), dir.path()).unwrap_err();
    assert_eq!(r.safeguard, safeguards::MS_STAGE);
    assert_eq!(r.member.as_deref(), Some("g07"));
    assert!(r.reason.contains("not on disk"), "{}", r.reason);
}

/// A path an event names is looked at only beneath the work root: a Measurement Set
/// recorded elsewhere, or reached through a symbolic link out of it, is refused unread.
#[test]
fn outputs_outside_the_work_root_are_refused() {
    use contimg::pipeline::casa;
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let outside = elsewhere.path().join("x.ms");
    casa::write_skeleton(&outside, casa::MEASUREMENT_SET, "", "not ours").unwrap();
    let mut m = members(dir.path());
    m[5].stages[0].completed = Some(vec![outside.display().to_string()]);
    let r = check(&refs(&m), &MosaicConfig::default(), dir.path()).unwrap_err();
    assert_eq!(
        (r.safeguard, r.member.as_deref()),
        (safeguards::MS_STAGE, Some("g05"))
    );
    assert!(
        r.reason.contains("not a stage output beneath"),
        "{}",
        r.reason
    );
    let link = dir.path().join("g05/link.ms");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    m[5].stages[0].completed = Some(vec![link.display().to_string()]);
    let r = check(&refs(&m), &MosaicConfig::default(), dir.path()).unwrap_err();
    assert_eq!(r.safeguard, safeguards::MS_STAGE);
    assert!(
        r.reason.contains("not a stage output beneath"),
        "{}",
        r.reason
    );
}

#[test]
fn calibration_tables_refuses_a_table_that_is_not_a_whole_casa_calibration_table() {
    let dir = tempfile::tempdir().unwrap();
    let table_of =
        |m: &GroupState| Path::new(&m.stages[1].completed.as_ref().unwrap()[0]).to_path_buf();
    let expect = |m: &[GroupState], what: &str| {
        let r = check(&refs(m), &MosaicConfig::default(), dir.path()).unwrap_err();
        assert_eq!(r.safeguard, safeguards::CALIBRATION_TABLES);
        assert_eq!(r.member.as_deref(), Some("g02"));
        assert!(r.reason.contains(what), "{}", r.reason);
    };
    let m = members(dir.path());
    std::fs::remove_file(table_of(&m[2]).join("table.dat")).unwrap();
    expect(&m, "no table.dat");
    // A bare table.dat (what the simulator used to write) is not a CASA table.
    let m = members(dir.path());
    std::fs::write(table_of(&m[2]).join("table.dat"), b"t").unwrap();
    expect(&m, "not a CASA table description");
    let m = members(dir.path());
    std::fs::remove_file(table_of(&m[2]).join("table.f0")).unwrap();
    expect(&m, "no table.f0");
    // The Measurement Set named as a calibration table.
    let mut m = members(dir.path());
    m[2].stages[1].completed = m[2].stages[0].completed.clone();
    expect(&m, "Type = \"Measurement Set\", not \"Calibration\"");
}

#[test]
fn images_refuses_missing_unreadable_wcs_less_mis_scaled_and_blank_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let tile_of = |m: &GroupState| m.stages[2].completed.as_ref().unwrap()[0].clone();
    let expect = |m: &[GroupState], who: &str, what: &str| {
        let r = check(&refs(m), &MosaicConfig::default(), dir.path()).unwrap_err();
        assert_eq!(r.safeguard, safeguards::IMAGES, "{r:?}");
        assert_eq!(r.member.as_deref(), Some(who));
        assert!(r.reason.contains(what), "{}", r.reason);
    };

    let m = members(dir.path());
    std::fs::remove_file(tile_of(&m[1])).unwrap();
    // The missing tile has no header for the declination check either; images names it.
    expect(&m, "g01", "no such file");

    let m = members(dir.path());
    std::fs::write(tile_of(&m[5]), b"SIMPLE  = this is not FITS").unwrap();
    expect(&m, "g05", "cannot read as FITS");

    let m = members(dir.path());
    {
        let path = tile_of(&m[6]);
        std::fs::remove_file(&path).unwrap();
        let desc = fitsio::images::ImageDescription {
            data_type: fitsio::images::ImageType::Float,
            dimensions: &[8, 8],
        };
        let mut f = fitsio::FitsFile::create(&path)
            .with_custom_primary(&desc)
            .open()
            .unwrap();
        let hdu = f.primary_hdu().unwrap();
        hdu.write_image(&mut f, &[1.0f32; 64]).unwrap();
    }
    expect(&m, "g06", "no usable celestial WCS");

    let mut m = members(dir.path());
    m[8] = member(dir.path(), 8, 40, 71.6, 3.5);
    expect(&m, "g08", "pixel scale");

    let m = members(dir.path());
    {
        let spec = TileSpec {
            npix: 32,
            dec_deg: 71.6,
            ..TileSpec::default()
        };
        write_plane(
            Path::new(&tile_of(&m[9])),
            &[f32::NAN; 32 * 32],
            32,
            32,
            &spec.wcs(),
            &OutputKeys::default(),
            false,
        )
        .unwrap();
    }
    expect(&m, "g09", "blank");
}

fn fast_config(root: &Path) -> Config {
    let mut c = Config::under_root(root);
    c.ingest.poll_interval_s = 0.05;
    c.ingest.stable_s = 0.1;
    c.stages.runner = Some(contimg::config::RunnerKind::Simulate);
    c.stages.simulate.tile_size = 32;
    c.mosaic.tiles = 2;
    c.mosaic.overlap = 1;
    c
}

const OBS: [&str; 2] = ["2026-11-30T10:00:00", "2026-11-30T10:05:00"];

fn write_observations(incoming: &Path) -> Vec<String> {
    std::fs::create_dir_all(incoming).unwrap();
    OBS.iter()
        .map(|t| {
            let files: Vec<String> = (0..16u8)
                .map(|sb| {
                    let p = incoming.join(format!("{t}_sb{sb:02}.hdf5"));
                    sim::write_subband(&p, 71.6, 2048, None).unwrap();
                    p.display().to_string()
                })
                .collect();
            group_id(t, &files)
        })
        .collect()
}

async fn work_until(
    p: &[&Pipeline],
    ingest: &mut [Ingest],
    done: impl Fn(&[contimg::events::RecordedEvent]) -> bool,
    store: &Store,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        for (p, i) in p.iter().zip(ingest.iter_mut()) {
            p.ingest_once(i).await.unwrap();
        }
        // Both workers step at once: the ledger decides who does what.
        let steps = futures::future::join_all(p.iter().map(|p| p.step())).await;
        for s in steps {
            s.unwrap();
        }
        if done(
            &store
                .read_all(Some(0), Direction::Forward, 100_000)
                .unwrap(),
        ) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pipeline never got there"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

#[tokio::test]
async fn id_collision_is_refused_and_recorded_without_overwriting() {
    let dir = tempfile::tempdir().unwrap();
    let c = fast_config(dir.path());
    let store = Store::open(c.ledger_dir()).unwrap();
    let ids = write_observations(&c.incoming());
    // Another writer already holds this mosaic id with other members.
    let fake: Vec<GroupState> = OBS
        .iter()
        .zip(&ids)
        .map(|(t, id)| GroupState {
            id: id.clone(),
            obs_time: t.to_string(),
            files: vec![],
            dec_deg: None,
            stages: Default::default(),
            head: 0,
        })
        .collect();
    let id = mosaic_id(&fake);
    let squatter = MosaicGroupCreated {
        mosaic_id: id.clone(),
        members: vec!["someone-else-1".into(), "someone-else-2".into()],
        first_obs_time: OBS[0].into(),
        last_obs_time: OBS[1].into(),
    };
    store
        .append(
            &format!("mosaic-{id}"),
            ExpectedRevision::NoStream,
            vec![squatter.to_proposed(&EventMetadata::actor("test"))],
        )
        .await
        .unwrap();
    let p = Pipeline::open(
        Ledger::Local(store.clone()),
        PipelineConfig::from_config(&c),
    )
    .await
    .unwrap();
    let mut ingest = [Ingest::new(c.incoming(), c.ingest.clone())];
    work_until(
        &[&p],
        &mut ingest,
        |e| e.iter().any(|e| e.event_type == MosaicGroupRejected::TYPE),
        &store,
    )
    .await;
    let stream = store
        .read_stream(&format!("mosaic-{id}"), Some(0), Direction::Forward, 10)
        .unwrap();
    assert_eq!(stream.len(), 2);
    let kept: MosaicGroupCreated = serde_json::from_slice(&stream[0].data).unwrap();
    assert_eq!(kept, squatter, "the existing group is not overwritten");
    let refused: MosaicGroupRejected = serde_json::from_slice(&stream[1].data).unwrap();
    assert_eq!(refused.safeguard, safeguards::ID_COLLISION);
    assert_eq!(refused.members, ids);
    assert!(
        refused.reason.contains("someone-else-1"),
        "{}",
        refused.reason
    );
    drop(p);
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
}

#[tokio::test]
async fn two_workers_on_one_ledger_do_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let c = fast_config(dir.path());
    let store = Store::open(c.ledger_dir()).unwrap();
    let ids = write_observations(&c.incoming());
    let open = || {
        Pipeline::open(
            Ledger::Local(store.clone()),
            PipelineConfig::from_config(&c),
        )
    };
    let (a, b) = (open().await.unwrap(), open().await.unwrap());
    let mut ingest = [
        Ingest::new(c.incoming(), c.ingest.clone()),
        Ingest::new(c.incoming(), c.ingest.clone()),
    ];
    work_until(
        &[&a, &b],
        &mut ingest,
        |e| {
            e.iter()
                .filter(|e| e.event_type == "ProductRegistered")
                .count()
                == 3
        },
        &store,
    )
    .await;
    let events = store
        .read_all(Some(0), Direction::Forward, 100_000)
        .unwrap();
    let count = |t: &str| events.iter().filter(|e| e.event_type == t).count();
    assert_eq!(count("SubbandFileAccepted"), 32, "each file once");
    assert_eq!(count(GroupFormed::TYPE), 2);
    assert_eq!(
        count(MosaicGroupCreated::TYPE),
        1,
        "one mosaic group, created once"
    );
    assert_eq!(count("MosaicGroupRejected"), 0);
    // Every stage ran exactly once: one StageStarted per (stream, stage).
    let mut started: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.event_type == StageStarted::TYPE)
        .map(|e| {
            let s: StageStarted = serde_json::from_slice(&e.data).unwrap();
            (e.stream_id.clone(), s.stage)
        })
        .collect();
    assert_eq!(started.len(), 2 * 3 + 1);
    started.sort();
    started.dedup();
    assert_eq!(started.len(), 7, "a stage started twice");
    let created: MosaicGroupCreated = events
        .iter()
        .find(|e| e.event_type == MosaicGroupCreated::TYPE)
        .map(|e| serde_json::from_slice(&e.data).unwrap())
        .unwrap();
    assert_eq!(created.members, ids);
    drop((a, b));
    tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap();
}
