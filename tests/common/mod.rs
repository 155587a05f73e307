//! Shared test harness: a real server on a loopback port, in this process or as a child.
#![allow(dead_code)]

pub mod pg;
pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use contimg::api::{self, AppState, ServerConfig};
use contimg::events::Store;

/// A server in this process, on 127.0.0.1:0, stopped through its own shutdown future.
pub struct TestServer {
    pub addr: SocketAddr,
    pub store: Store,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(dir: &Path, token: Option<&str>) -> TestServer {
        let mut config = ServerConfig::under(dir);
        config.token = token.map(String::from);
        Self::start_with(dir, config).await
    }

    pub async fn start_with(dir: &Path, config: ServerConfig) -> TestServer {
        let store = Store::open(dir).expect("open store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = AppState::open(store.clone(), config)
            .await
            .expect("server state");
        let task = tokio::spawn(api::run(listener, state.clone(), async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            store,
            state,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops the server and closes the store; the folder can be reopened afterwards.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

/// Appends catalogue events to a stopped ledger, as only its owner can: how a test writes
/// the history a crash (or a bug) leaves, now that the publish lifecycle takes no raw
/// appends over HTTP. Batches of at most 1,000 (the store's limit), each after the last.
pub fn append_offline<E: contimg::events::catalogue::DomainEvent>(
    ledger: &Path,
    stream: &str,
    expected: contimg::events::ExpectedRevision,
    events: &[E],
) {
    let meta = contimg::events::catalogue::EventMetadata::actor("test");
    let batches: Vec<Vec<_>> = events
        .chunks(1000)
        .map(|b| b.iter().map(|e| e.to_proposed(&meta)).collect())
        .collect();
    // A thread of its own: the store blocks, and tests call this from async code too.
    std::thread::scope(|s| {
        s.spawn(|| {
            let store = Store::open(ledger).expect("open the stopped ledger");
            let mut expected = expected;
            for batch in batches {
                let r = store
                    .append_blocking(stream, expected, batch)
                    .expect("append to the stopped ledger");
                expected = contimg::events::ExpectedRevision::Exact(r.next_expected_version);
            }
            store.close();
        })
        .join()
        .expect("offline append")
    });
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_contimg"))
}

/// `contimg serve` as a child process on a port of its choosing.
pub struct ChildServer {
    pub child: Child,
    pub base: String,
}

impl ChildServer {
    pub fn start(dir: &Path, extra: &[&str]) -> ChildServer {
        Self::start_env(dir, extra, &[])
    }

    /// [`ChildServer::start`] with variables added to the server's environment (which its
    /// stage commands inherit).
    pub fn start_env(dir: &Path, extra: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> ChildServer {
        let mut child = Command::new(bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .env("CONTIMG_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn contimg serve");
        let stdout = child.stdout.take().unwrap();
        // A child that never says where it listens fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(std::time::Duration::from_secs(120)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("contimg serve printed no address within 120 s");
            }
        };
        let base = line
            .trim()
            .strip_prefix("contimg: listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        ChildServer { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub fn sigterm(mut self) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

impl Drop for ChildServer {
    /// A test that panics must not leave a server behind (it would hold the test's pipes).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A random generator from `CONTIMG_TEST_SEED`, or from a fresh seed; the seed is printed
/// so that a failing run can be replayed.
pub fn seeded_rng() -> (u64, rand::rngs::StdRng) {
    let seed = std::env::var("CONTIMG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (replay with CONTIMG_TEST_SEED={seed})");
    (
        seed,
        <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
    )
}

/// Runs `contimg` to completion and returns what it printed. A run that takes longer than
/// 15 minutes is killed and fails the test, so a hung child never hangs the suite.
pub fn contimg(args: &[&str]) -> std::process::Output {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run contimg");
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(900)) {
        Ok(out) => out.expect("wait for contimg"),
        Err(_) => {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("contimg {args:?} did not finish within 15 minutes");
        }
    }
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: f64, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(secs);
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// GET a URL and parse its JSON body.
pub async fn get_json(c: &reqwest::Client, url: String) -> serde_json::Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}

/// One line of an export file (EventStoreDB field names), for histories written by tests.
pub fn export_line(
    stream: &str,
    revision: u64,
    position: u64,
    event_type: &str,
    data: serde_json::Value,
    created: &str,
) -> String {
    serde_json::json!({"eventId": uuid::Uuid::new_v4(), "eventType": event_type, "eventVersion": 1,
        "streamId": stream, "eventNumber": revision, "position": position, "created": created,
        "data": data, "metadata": {}})
    .to_string()
        + "\n"
}

/// Debian's Chromium, where `.ci/run` installs it.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Whether the browser tests can run: `false` (with a SKIPPED line) where Chromium is not
/// installed; under CI a missing Chromium fails the test instead.
/// The first of `paths` that is an executable file, or a panic naming what to install.
/// Tests that need a tool outside Rust are `#[ignore = "needs ..."]`: `cargo test` reports
/// them as not run, and `.ci/run` runs them (`-- --ignored`) after installing the tools,
/// so a missing tool is a failure there, never a silent pass.
pub fn require_tool(paths: &[&str], install: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| panic!("this test needs {} ({install})", paths.join(" or ")))
}

/// Headless Chromium on one URL, with every name lookup but loopback failing (no network)
/// and console messages on stderr.
pub fn browse(profile: &Path, url: &str, extra: &[&str]) -> std::process::Output {
    Command::new(require_tool(&[CHROMIUM], "apt-get install chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--enable-logging=stderr",
            "--v=0",
            // Virtual time waits for pending fetches, then runs timers up to the budget.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium")
}
