//! Decoders under arbitrary bytes (stable Rust, property tests with a printed seed): the
//! record codec, the JSON Lines export reader, the configuration file and the FITS header
//! reader. Never a panic; always an error that says what was wrong.

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};

use contimg::config::Config as ContimgConfig;
use contimg::events::RecordedEvent;

/// A runner seeded from `common::seeded_rng` (the seed is printed), no failure files.
fn runner(cases: u32) -> TestRunner {
    let (seed, _) = common::seeded_rng();
    TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    })
}

/// Bytes made from `valid` by overwriting some of them and perhaps cutting it short, or
/// bytes of no origin at all.
fn damaged(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = valid.len().max(1);
    prop_oneof![
        (proptest::collection::vec((0..n, any::<u8>()), 1..8), 0..=n).prop_map(
            move |(edits, cut)| {
                let mut b = valid.clone();
                for (i, v) in edits {
                    if i < b.len() {
                        b[i] = v;
                    }
                }
                b.truncate(cut.max(1));
                b
            }
        ),
        proptest::collection::vec(any::<u8>(), 0..600),
    ]
}

fn sample_record() -> RecordedEvent {
    RecordedEvent {
        event_id: uuid::Uuid::from_u128(7),
        stream_id: "product-img1".into(),
        revision: 3,
        position: 42,
        event_type: "PublishStarted".into(),
        event_version: 1,
        data: br#"{"attempt":1,"destination":"/p/x","trigger":"auto"}"#.to_vec(),
        metadata: br#"{"actor":"auto"}"#.to_vec(),
        created_micros: 1_796_000_000_000_000,
        checksum: 0,
    }
}

#[test]
fn the_record_codec_refuses_damage_with_a_reason() {
    let mut r = sample_record();
    let valid = r.encode();
    assert!(RecordedEvent::decode(&valid).is_ok());
    runner(2000)
        .run(&damaged(valid.clone()), |bytes| {
            match RecordedEvent::decode(&bytes) {
                // The CRC lets nothing changed through; an untouched copy may decode.
                Ok(back) => prop_assert!(bytes == valid, "damaged bytes decoded: {back:?}"),
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_export_reader_names_the_line_of_any_bad_line() {
    let line = contimg::events::jsonl::WireEvent::from(&sample_record());
    let valid = serde_json::to_vec(&line).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.jsonl");
    runner(600)
        .run(&damaged(valid), |bytes| {
            // A good first line, then the damaged one.
            let mut file = serde_json::to_vec(&line).unwrap();
            file.push(b'\n');
            file.extend(bytes.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
            std::fs::write(&path, &file).unwrap();
            let items: Vec<_> = contimg::events::jsonl::read_export(&path)
                .unwrap()
                .collect();
            prop_assert!(items[0].is_ok());
            for item in &items[1..] {
                if let Err(e) = item {
                    let m = e.to_string();
                    prop_assert!(m.contains("line 2") || m.contains("stream"), "{m}");
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_configuration_refuses_damage_with_a_reason() {
    let valid = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/contimg.toml.example"
    ))
    .unwrap();
    runner(600)
        .run(&damaged(valid), |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            match toml::from_str::<ContimgConfig>(&text) {
                Ok(c) => {
                    if let Err(e) = c.check() {
                        let m = format!("{e:#}");
                        prop_assert!(!m.is_empty());
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn the_fits_header_reader_refuses_damage_with_a_reason() {
    use contimg::pipeline::mosaic::{io::read_header, synth};
    let dir = tempfile::tempdir().unwrap();
    let tile = dir.path().join("tile.fits");
    let spec = synth::TileSpec {
        npix: 16,
        ..synth::TileSpec::default()
    };
    synth::write_tile(&spec, &[], &tile, None).unwrap();
    let valid = std::fs::read(&tile).unwrap();
    assert!(read_header(&tile).is_ok());
    // Damage within the header blocks, where the keys live.
    let head = valid[..valid.len().min(2880 * 2)].to_vec();
    let rest = valid[head.len()..].to_vec();
    let path = dir.path().join("damaged.fits");
    runner(300)
        .run(&damaged(head), |bytes| {
            let mut file = bytes.clone();
            file.extend_from_slice(&rest);
            std::fs::write(&path, &file).unwrap();
            if let Err(e) = read_header(&path) {
                prop_assert!(!e.to_string().is_empty());
            }
            Ok(())
        })
        .unwrap();
}
