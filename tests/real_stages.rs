//! The real imaging path, end to end, with the programs DSA-110 uses. pyuvdata writes
//! UVH5 subband files of a DSA-110-like array seeing a known point-source sky through
//! antenna gain errors (tools/stages/make_test_data.py); `contimg serve` with
//! tools/stages/dsa110.toml reads their headers at ingest, converts them with pyuvdata,
//! calibrates with CASA, images with WSClean, passes the five safeguards on the real
//! Measurement Sets and CASA tables, co-adds the tiles and publishes the mosaic, in which
//! the injected sources come back at their positions and fluxes. A second batch then
//! carries a truncated subband file and a calibration table broken after it was made:
//! each is refused for its reason and nothing else is held up.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{ChildServer, eventually, get_json};
use serde_json::Value;

/// The Python with pyuvdata, python-casacore and casatasks: `CONTIMG_STAGES_PYTHON`, else
/// the virtual environment `.ci/run` makes, else `python3`. A Python without them fails
/// the test, naming what to install.
fn stage_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var_os("CONTIMG_STAGES_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            let venv = root.join("target/ci-venv/bin/python3");
            venv.is_file().then_some(venv)
        })
        .unwrap_or_else(|| PathBuf::from("python3"));
    // CASA imported offline, as calibrate.py imports it.
    let ok = Command::new(&python)
        .args([
            "-c",
            "import pyuvdata, casacore.tables, casatasks, astropy, scipy",
        ])
        .env(
            "CASASITECONFIG",
            root.join("tools/stages/casasiteconfig.py"),
        )
        .current_dir(std::env::temp_dir()) // CASA leaves its log where it runs
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs a Python with pyuvdata, python-casacore, casatasks, casadata, astropy \
         and scipy ({} has not; .ci/run installs them into target/ci-venv)",
        python.display()
    );
    python
}

/// Copies an observation's files into the incoming folder as a correlator delivers them:
/// written under a hidden name, then renamed.
fn deliver(files: &[PathBuf], incoming: &Path) {
    std::fs::create_dir_all(incoming).unwrap();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let tmp = incoming.join(format!(".{name}.partial"));
        std::fs::copy(f, &tmp).unwrap();
        std::fs::rename(&tmp, incoming.join(&name)).unwrap();
    }
}

fn observation_files(generated: &Path, start: &str) -> Vec<PathBuf> {
    (0..16)
        .map(|sb| generated.join(format!("{start}_sb{sb:02}.hdf5")))
        .collect()
}

async fn events(c: &reqwest::Client, server: &ChildServer) -> Vec<Value> {
    let page = get_json(c, server.url("/api/events?from=0&limit=10000")).await;
    page["events"].as_array().cloned().unwrap_or_default()
}

fn of<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["eventType"] == kind)
        .map(|e| &e["data"])
        .collect()
}

/// The published path of `data_id`, once it is published.
async fn published(c: &reqwest::Client, server: &ChildServer, data_id: &str) -> Option<String> {
    let p = get_json(c, server.url(&format!("/api/products/{data_id}"))).await;
    p["published_path"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs pyuvdata, python-casacore, casatasks and WSClean; .ci/run installs and runs them"]
async fn real_subbands_become_a_published_mosaic_with_the_injected_sources() {
    let python = stage_python();
    common::require_tool(
        &["/usr/bin/wsclean", "/usr/local/bin/wsclean"],
        "apt-get install wsclean",
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stages = root.join("tools/stages");
    let (seed, _) = common::seeded_rng();
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("generated");
    let made = Command::new(&python)
        .arg(stages.join("make_test_data.py"))
        .arg(&generated)
        .args([
            "--start",
            "2026-11-30T10:00:00",
            "--observations",
            "7",
            "--seed",
        ])
        .arg(((seed >> 32) as u32 ^ seed as u32).to_string())
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "make_test_data.py: {}",
        String::from_utf8_lossy(&made.stderr)
    );

    // The site's configuration: its own ingest and mosaic settings, and the reference
    // stages exactly as tools/stages/dsa110.toml wires them.
    let data = dir.path().join("var");
    let config = dir.path().join("contimg.toml");
    std::fs::write(
        &config,
        format!(
            "[ingest]\npoll_interval_s = 0.2\nstable_s = 0.5\ngroup_timeout_s = 40.0\n\
             [mosaic]\ntiles = 3\noverlap = 0\n\n{}",
            std::fs::read_to_string(stages.join("dsa110.toml")).unwrap()
        ),
    )
    .unwrap();
    let bin_dir = python.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let sky = generated.join("skymodel.csv");
    let env = [
        ("PATH", path.as_os_str()),
        ("CONTIMG_STAGES", stages.as_os_str()),
        ("CONTIMG_SKY_MODEL", sky.as_os_str()),
    ];
    // validate finds each stage's program and sees it start (CASA offline included).
    let checked = Command::new(common::bin())
        .args([
            "validate",
            "--json",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
        ])
        .arg(&data)
        .envs(env)
        .output()
        .unwrap();
    let doc: Value = serde_json::from_slice(&checked.stdout).unwrap();
    for stage in ["stage:convert", "stage:calibrate", "stage:image"] {
        let f = doc["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["check"] == stage)
            .unwrap_or_else(|| panic!("no {stage} finding: {doc:#}"));
        assert_eq!(f["level"], "ok", "{f}");
        println!("validate {stage}: {}", f["message"]);
    }
    let server = ChildServer::start_env(&data, &["--config", config.to_str().unwrap()], &env);
    let c = reqwest::Client::new();
    let incoming = data.join("incoming");
    let starts = [
        "2026-11-30T10:00:00",
        "2026-11-30T10:05:00",
        "2026-11-30T10:10:00",
        "2026-11-30T10:15:00",
        "2026-11-30T10:20:00",
        "2026-11-30T10:25:00",
        "2026-11-30T10:30:00",
    ];
    for s in &starts[..3] {
        deliver(&observation_files(&generated, s), &incoming);
    }

    // Three observations through every stage, one mosaic, published.
    let mosaic = eventually(600.0, || async {
        let ev = events(&c, &server).await;
        for r in of(&ev, "ProductRegistered") {
            if r["data_type"] == "mosaic" {
                let id = r["data_id"].as_str().unwrap().to_string();
                if let Some(p) = published(&c, &server, &id).await {
                    return Some((id, p));
                }
            }
        }
        // A stage that failed for good ends the wait with its reason.
        if let Some(f) = of(&ev, "StageFailed")
            .iter()
            .find(|f| f["next_retry_at"].is_null())
        {
            panic!("a stage failed for good: {f}");
        }
        None
    })
    .await;
    let ev = events(&c, &server).await;
    let Some((mosaic_id, mosaic_path)) = mosaic else {
        let failures: Vec<_> = of(&ev, "StageFailed");
        panic!("no mosaic was published within 600 s; stage failures: {failures:?}");
    };

    // Ingest read the real headers.
    let accepted = of(&ev, "SubbandFileAccepted");
    assert_eq!(accepted.len(), 48);
    for a in &accepted {
        let h = &a["header"];
        assert_eq!(h["telescope"], "DSA-110", "{a}");
        assert_eq!(h["simulated"], false);
        assert_eq!(
            (
                h["nfreqs"].as_u64(),
                h["npols"].as_u64(),
                h["ntimes"].as_u64()
            ),
            (Some(4), Some(2), Some(6))
        );
        assert!((h["dec_deg"].as_f64().unwrap() - 55.0).abs() < 1e-6, "{a}");
        assert!(
            h["start"]
                .as_str()
                .unwrap()
                .starts_with(a["obs_time"].as_str().unwrap()),
            "{a}"
        );
    }
    assert!(of(&ev, "SubbandFileRejected").is_empty());
    let formed = of(&ev, "GroupFormed");
    assert_eq!(formed.len(), 3);
    assert!(
        formed
            .iter()
            .all(|g| (g["dec_deg"].as_f64().unwrap() - 55.0).abs() < 1e-6)
    );
    // Each stage ran once per group and left what the safeguards then accepted: a real
    // Measurement Set, a CASA gain table, a corrected tile and its beam.
    let completed = of(&ev, "StageCompleted");
    for (stage, suffix) in [
        ("convert", ".ms"),
        ("calibrate", ".G"),
        ("image", ".pbcor.fits"),
    ] {
        let runs: Vec<_> = completed.iter().filter(|s| s["stage"] == stage).collect();
        assert_eq!(runs.len(), 3, "{stage}: {runs:?}");
        for r in runs {
            let out = r["outputs"][0].as_str().unwrap();
            assert!(out.ends_with(suffix), "{stage}: {out}");
        }
    }
    assert!(
        of(&ev, "StageFailed").is_empty(),
        "{:?}",
        of(&ev, "StageFailed")
    );
    assert_eq!(of(&ev, "MosaicGroupCreated").len(), 1);
    assert!(of(&ev, "MosaicGroupRejected").is_empty());
    let product = get_json(&c, server.url(&format!("/api/products/{mosaic_id}"))).await;
    assert_eq!(product["metadata"]["runner"], "external", "{product}");

    // The injected sources in the published mosaic: each one the tiles cover well (the
    // mosaic's noise there within twice its best) comes back within a pixel of its
    // position and within 10% of its flux (typically +1 to +4%).
    // tools/stages/measure_sources.py fits each with an elliptical Gaussian and a
    // background (scipy), positions through astropy's WCS: a measurement independent of
    // the code that wrote the mosaic.
    let folder = Path::new(&mosaic_path);
    let noise = contimg::pipeline::mosaic::io::read_plane(&folder.join("noise.fits")).unwrap();
    let best_noise = noise
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(f32::MAX, f32::min);
    let measured = Command::new(&python)
        .arg(stages.join("measure_sources.py"))
        .arg(folder.join("mosaic.fits"))
        .arg(&sky)
        .arg("--noise")
        .arg(folder.join("noise.fits"))
        .output()
        .unwrap();
    assert!(
        measured.status.success(),
        "measure_sources.py: {}",
        String::from_utf8_lossy(&measured.stderr)
    );
    let mut checked = 0;
    for line in String::from_utf8_lossy(&measured.stdout).lines() {
        let m: Value = serde_json::from_str(line).unwrap();
        let noise = m["noise"].as_f64().unwrap_or(f64::INFINITY);
        let well_covered = noise <= 2.0 * f64::from(best_noise);
        let (flux, fit, off) = (
            m["flux_jy"].as_f64().unwrap(),
            m["fit_jy"].as_f64().unwrap(),
            m["offset_px"].as_f64().unwrap(),
        );
        let err = (fit - flux) / flux;
        println!(
            "{}: {flux:.3} Jy injected, {fit:.3} Jy measured ({:+.1}%), {off:.2} px from its \
             position; noise {noise:.4} Jy/beam{}",
            m["name"].as_str().unwrap(),
            err * 100.0,
            if well_covered {
                ""
            } else {
                " (edge: not checked)"
            }
        );
        if !well_covered {
            continue;
        }
        assert!(off <= 1.0, "{m}: {off:.2} px from its position");
        assert!(err.abs() <= 0.10, "{m}: {:.1}% off", err * 100.0);
        checked += 1;
    }
    assert!(
        checked >= 3,
        "only {checked} sources lie well inside the mosaic"
    );

    // The second batch: a truncated subband in the first observation, and a calibration
    // table broken after calibration of the second (the disk or a person damaged it).
    let later = observation_files(&generated, starts[3]);
    let bytes = std::fs::read(&later[5]).unwrap();
    let cut = dir.path().join(later[5].file_name().unwrap());
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let mut first = later.clone();
    first[5] = cut;
    deliver(&first, &incoming);
    for s in &starts[4..] {
        deliver(&observation_files(&generated, s), &incoming);
    }
    let broken_group = eventually(300.0, || async {
        let ev = events(&c, &server).await;
        ev.iter()
            .filter(|e| e["eventType"] == "StageCompleted" && e["data"]["stage"] == "calibrate")
            .find(|e| {
                e["streamId"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("group-20261130T102000-")
            })
            .map(|e| {
                let table = e["data"]["outputs"][0].as_str().unwrap().to_string();
                let dat = Path::new(&table).join("table.dat");
                let len = std::fs::metadata(&dat).unwrap().len();
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&dat)
                    .unwrap()
                    .set_len(len / 2)
                    .unwrap();
                e["streamId"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("group-")
                    .to_string()
            })
    })
    .await
    .expect("the 10:20 observation was never calibrated");
    let settled = eventually(600.0, || async {
        let ev = events(&c, &server).await;
        let refused = of(&ev, "MosaicGroupRejected").into_iter().next().cloned()?;
        let images: Vec<String> = of(&ev, "ProductRegistered")
            .iter()
            .filter(|r| r["data_type"] == "image")
            .map(|r| r["data_id"].as_str().unwrap().to_string())
            .collect();
        let mut all_published = true;
        for id in &images {
            all_published &= published(&c, &server, id).await.is_some();
        }
        (images.len() == 6 && all_published && !of(&ev, "IngestGroupTimedOut").is_empty())
            .then_some((refused, ev))
    })
    .await;
    let (refused, ev) = settled.expect("the second batch never settled (6 images published, a mosaic refused, an observation timed out)");
    assert_eq!(refused["safeguard"], "calibration_tables", "{refused}");
    assert_eq!(
        refused["member"].as_str(),
        Some(broken_group.as_str()),
        "{refused}"
    );
    assert!(
        refused["reason"].as_str().unwrap().contains("truncated"),
        "{refused}"
    );
    let rejected = of(&ev, "SubbandFileRejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("10:15:00_sb05.hdf5")
    );
    assert!(
        rejected[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("truncated: "),
        "{}",
        rejected[0]
    );
    let timed_out = of(&ev, "IngestGroupTimedOut");
    assert_eq!(timed_out[0]["obs_time"], starts[3]);
    assert_eq!(timed_out[0]["missing"], serde_json::json!([5]));
    // Nothing else held up: every other observation formed, ran every stage and was
    // published as an image; no stage failed.
    assert_eq!(of(&ev, "GroupFormed").len(), 6);
    assert!(
        of(&ev, "StageFailed").is_empty(),
        "{:?}",
        of(&ev, "StageFailed")
    );

    let status = server.sigterm();
    assert!(status.success(), "{status:?}");
    let verify = common::contimg(&["verify", "--data-dir", data.to_str().unwrap()]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
