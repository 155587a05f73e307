//! A throwaway PostgreSQL 15 cluster of a test's own: `initdb` in a temporary folder,
//! `pg_ctl` on a free loopback port (as the `postgres` user when the test runs as root),
//! stopped and removed when dropped. Nothing depends on a machine-wide service.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where Debian's `postgresql-15` puts the server programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PgCluster {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    databases: AtomicU32,
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl PgCluster {
    /// A new cluster, started. Panics naming what is missing when PostgreSQL is not here.
    pub fn start() -> PgCluster {
        let initdb =
            super::require_tool(&[&format!("{PG_BIN}/initdb")], "apt-get install postgresql");
        let bin = initdb.parent().unwrap().to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("contimg-pg-")
            .tempdir()
            .unwrap();
        if as_root() {
            let c = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
            let pw = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
            assert!(!pw.is_null(), "running as root needs the postgres user");
            // SAFETY: a valid path and the uid/gid libc just returned.
            let rc = unsafe { libc::chown(c.as_ptr(), (*pw).pw_uid, (*pw).pw_gid) };
            assert_eq!(rc, 0, "chown of the cluster folder");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = PgCluster {
            dir,
            port,
            bin,
            databases: AtomicU32::new(0),
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                cluster.data().to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        cluster.start_server();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A server program, run as `postgres` when this is root.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        }
    }

    fn run(&self, name: &str, args: &[&str]) {
        let program = self.bin.join(name);
        let out = self
            .command(name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c synchronous_commit=on",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                self.dir.path().join("server.log").to_str().unwrap(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m immediate`: the server dies without a checkpoint, as in a crash.
    pub fn stop_immediate(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// The URL of the cluster's `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A new empty database; its URL.
    pub fn create_db(&self) -> String {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("ledger{n}");
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs SQL with `psql` on database `db`.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
