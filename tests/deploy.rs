//! `tools/deploy.sh` run by bash into a temporary prefix with the debug binary: a dry run
//! changes nothing, an install puts every file in place, a second run changes nothing, a
//! new binary keeps the previous one as `contimg.prev`, and existing config is kept.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use common::bin;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/deploy.sh")
}

/// A prefix and the folders `validate` should look at instead of /var/lib and /data.
struct Target {
    dir: tempfile::TempDir,
}

impl Target {
    /// The same program with different bytes: a deploy sees a new binary.
    fn new_binary(&self) -> PathBuf {
        let other = self.dir.path().join("contimg-new");
        std::fs::copy(bin(), &other).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&other)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"\0"))
            .unwrap();
        other
    }

    fn new() -> Target {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        Target { dir }
    }
    fn prefix(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn deploy(&self, binary: &Path, extra: &[&str]) -> Output {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        self.deploy_on(binary, extra, port)
    }
    /// The ledger folder `validate` (and a rollback) opens.
    fn ledger(&self) -> PathBuf {
        self.dir.path().join("data").join("var")
    }
    fn deploy_on(&self, binary: &Path, extra: &[&str], port: std::net::SocketAddr) -> Output {
        let data = self.dir.path().join("data");
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .args(["--mode", "both", "--prefix"])
            .arg(self.prefix())
            .arg("--binary")
            .arg(binary)
            .args(extra);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CONTIMG_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CONTIMG_DATA_DIR", data.join("var"))
            .env("CONTIMG_STAGE_ROOT", data.join("stage"))
            .env("CONTIMG_PRODUCTS_ROOT", data.join("products"))
            .env("CONTIMG_INCOMING", data.join("incoming"))
            .env("CONTIMG_LISTEN", port.to_string())
            .output()
            .expect("run bash tools/deploy.sh")
    }
    /// Every file under the prefix with its size and modification time.
    fn files(&self) -> BTreeMap<PathBuf, (u64, SystemTime)> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, (u64, SystemTime)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    walk(&e.path(), out);
                }
                out.insert(e.path(), (m.len(), m.modified().unwrap()));
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.prefix(), &mut out);
        out
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn dry_run_prints_every_action_and_changes_nothing() {
    let t = Target::new();
    let out = t.deploy(&bin(), &["--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(t.files().is_empty(), "{:?}", t.files());
    let said = text(&out);
    for action in [
        "+ install -m 0755",
        "contimg-api.service",
        "contimg-stream.service",
        "contimg.toml",
        "contimg.env",
        " validate --config ",
    ] {
        assert!(said.contains(action), "{action} not printed:\n{said}");
    }
    assert!(said.contains("skipping systemctl"), "{said}");
}

#[test]
fn install_into_a_prefix_then_again_is_idempotent() {
    let t = Target::new();
    let p = t.prefix();
    let first = t.deploy(&bin(), &[]);
    assert!(first.status.success(), "{}", text(&first));
    let installed = p.join("usr/local/bin/contimg");
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(bin()).unwrap()
    );
    for f in [
        "etc/systemd/system/contimg-api.service",
        "etc/systemd/system/contimg-stream.service",
        "etc/contimg/contimg.toml",
        "etc/contimg/contimg.env",
    ] {
        assert!(p.join(f).is_file(), "{f} missing:\n{}", text(&first));
    }
    use std::os::unix::fs::PermissionsExt;
    let env_mode = std::fs::metadata(p.join("etc/contimg/contimg.env"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(env_mode & 0o777, 0o600, "the env file holds the token");
    assert!(!p.join("usr/local/bin/contimg.prev").exists());
    // validate ran with the installed binary and found no error: its summary line says 0.
    let errors = text(&first).lines().find_map(|l| {
        let (n, _) = l.trim().split_once(" error(s),")?;
        n.rsplit(' ').next()?.parse::<u32>().ok()
    });
    assert_eq!(errors, Some(0), "{}", text(&first));

    // Same binary again: nothing changes.
    let before = t.files();
    let second = t.deploy(&bin(), &[]);
    assert!(second.status.success(), "{}", text(&second));
    assert_eq!(t.files(), before, "{}", text(&second));
    assert!(
        text(&second).contains("binary unchanged"),
        "{}",
        text(&second)
    );
    assert!(!text(&second).contains("+ install"), "{}", text(&second));

    // An operator's edits to config survive; a new binary keeps the old one as .prev.
    std::fs::write(p.join("etc/contimg/contimg.toml"), "# edited\n").unwrap();
    let other = t.new_binary();
    let third = t.deploy(&other, &[]);
    assert!(third.status.success(), "{}", text(&third));
    assert_eq!(
        std::fs::read_to_string(p.join("etc/contimg/contimg.toml")).unwrap(),
        "# edited\n"
    );
    assert_eq!(
        std::fs::read(p.join("usr/local/bin/contimg.prev")).unwrap(),
        std::fs::read(bin()).unwrap()
    );
    assert_eq!(
        std::fs::read(&installed).unwrap(),
        std::fs::read(&other).unwrap()
    );
}

#[test]
fn a_failing_validate_rolls_the_binary_back() {
    let t = Target::new();
    let p = t.prefix();
    let first = t.deploy(&bin(), &[]);
    assert!(first.status.success(), "{}", text(&first));
    // A config validate refuses; the next deploy must not leave the new binary in place.
    std::fs::write(
        p.join("etc/contimg/contimg.toml"),
        "[mosaic]\ntiles = 2\noverlap = 5\n",
    )
    .unwrap();
    let other = t.new_binary();
    let out = t.deploy(&other, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("rolling back"), "{}", text(&out));
    assert!(
        text(&out).contains(&format!(
            "reads ledger layout {}, as the new one does",
            contimg::events::store::sled::LAYOUT
        )),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(p.join("usr/local/bin/contimg")).unwrap(),
        std::fs::read(bin()).unwrap()
    );
}

/// A rollback to a binary from before layout 2 (here a wrapper that, like one, knows no
/// `ledger-layout`) puts the sled ledger back in layout 1 with the new binary first, since
/// the ledger is in this build's layout (written by it, as a server of it would leave it)
/// and the old one would refuse it.
#[test]
fn a_rollback_puts_the_ledger_back_in_the_previous_binarys_layout() {
    rollback_to(
        "case \"$1\" in ledger-layout) echo \"error: unrecognized subcommand\" >&2; exit 2;; esac",
        1,
        "layout 5 -> 1 (2 id index keys, 2 stream head keys written)",
    );
}

/// The same to a binary of layout 2 (a wrapper that says so, as `ledger-layout --writes`
/// of one does): the id index is written back from the log, and no head keys.
#[test]
fn a_rollback_to_a_layout_2_binary_writes_the_id_index_back() {
    rollback_to(
        "case \"$1 $2\" in \"ledger-layout --writes\") echo 2; exit 0;; esac",
        2,
        "layout 5 -> 2 (2 id index keys written)",
    );
}

/// The same to a binary of layout 3: nothing to write back, and a ledger this build wrote
/// without long streams has no id index to drop.
#[test]
fn a_rollback_to_a_layout_3_binary_changes_the_marker() {
    rollback_to(
        "case \"$1 $2\" in \"ledger-layout --writes\") echo 3; exit 0;; esac",
        3,
        "layout 5 -> 3",
    );
}

/// The same to a binary of layout 4, which reads no id runs: a ledger this build wrote
/// without long streams has none to drop, and only the marker changes.
#[test]
fn a_rollback_to_a_layout_4_binary_changes_the_marker() {
    rollback_to(
        "case \"$1 $2\" in \"ledger-layout --writes\") echo 4; exit 0;; esac",
        4,
        "layout 5 -> 4",
    );
}

/// Deploys a wrapper of this binary that runs `prelude` first as the previous binary, puts
/// two events in its ledger, then fails a deploy of this binary: the rollback must say
/// `said` and leave the ledger in `layout`.
fn rollback_to(prelude: &str, layout: u32, said: &str) {
    use contimg::events::store::sled::{LAYOUT, to_layout};
    use contimg::events::{ExpectedRevision, ProposedEvent, Store};
    assert_eq!(LAYOUT, 5);
    let t = Target::new();
    let p = t.prefix();
    let old = t.dir.path().join("contimg-old");
    std::fs::write(
        &old,
        format!("#!/bin/sh\n{prelude}\nexec {} \"$@\"\n", bin().display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let first = t.deploy(&old, &[]);
    assert!(first.status.success(), "{}", text(&first));
    let store = Store::open(t.ledger()).unwrap();
    for stream in ["product-a", "product-b"] {
        let event = ProposedEvent::new("Noted", 1, b"{}".to_vec());
        store
            .append_blocking(stream, ExpectedRevision::NoStream, vec![event])
            .unwrap();
    }
    store.close();
    drop(store);
    // Something else holds the port: the new binary's validate fails, after opening the
    // ledger.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = t.deploy_on(&bin(), &[], held.local_addr().unwrap());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let text = text(&out);
    assert!(text.contains("rolling back"), "{text}");
    assert!(text.contains(said), "{text}");
    assert_eq!(
        std::fs::read(p.join("usr/local/bin/contimg")).unwrap(),
        std::fs::read(&old).unwrap()
    );
    let shown = to_layout(&t.ledger(), None).unwrap().unwrap();
    assert_eq!(shown.from, layout);
}

#[test]
fn bad_arguments_exit_2() {
    let out = Command::new("bash")
        .arg(script())
        .args(["--mode", "sideways"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let out = Command::new("bash").arg(script()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}
