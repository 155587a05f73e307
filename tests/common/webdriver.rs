//! A small W3C WebDriver client for the browser tests: Debian's `chromium-driver` driving
//! headless Chromium, so that a test presses a button with a real click (pointer events on a
//! visible, uncovered element), waits for the DOM to change, and reads the page, its console
//! and a screenshot. It replaces query-string hooks in the page (`?autoretry=ID`), which let a
//! plain link press a button.
//!
//! Each [`Browser`] has its own chromedriver on a loopback port of its choosing, in a process
//! group of its own with the Chromium it starts, and a fresh profile; dropping it ends the
//! session and kills the whole group. Every request has a timeout and every wait a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::CHROMIUM;

/// Debian's ChromeDriver (`apt-get install chromium-driver`), the same version as Chromium.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The key of a W3C element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Why the browser tests are ignored by default (see [`super::require_tool`]).
pub const NEEDS: &str = "needs Debian's chromium and chromium-driver; .ci/run runs it";

/// Panics naming the packages when Chromium or ChromeDriver is missing.
pub fn require_webdriver() {
    super::require_tool(&[CHROMIUM], "apt-get install chromium");
    super::require_tool(&[CHROMEDRIVER], "apt-get install chromium-driver");
}

/// One headless Chromium behind its own chromedriver, with one session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: reqwest::Client,
    /// Every browser log entry read so far as (level, line): ChromeDriver hands each out once.
    log: Mutex<Vec<(String, String)>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a session whose viewport is `window` (width, height) CSS pixels.
    /// Panics with the reason when either does not come up.
    pub async fn start(window: (u32, u32)) -> Browser {
        let mut driver = Command::new(CHROMEDRIVER)
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {CHROMEDRIVER}: {e}"));
        // chromedriver prints the port it bound; the thread drains its stdout until it exits.
        let stdout = driver.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<u16, String>>();
        std::thread::spawn(move || {
            let (mut tx, mut said) = (Some(tx), String::new());
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some(t) = tx.take() else { continue };
                match line
                    .strip_prefix("ChromeDriver was started successfully on port ")
                    .and_then(|p| p.trim_end_matches('.').parse().ok())
                {
                    Some(port) => drop(t.send(Ok(port))),
                    None => {
                        said += &line;
                        said.push('\n');
                        tx = Some(t);
                    }
                }
            }
            if let Some(tx) = tx {
                let _ = tx.send(Err(said));
            }
        });
        // From here on a panic drops `b`, which kills chromedriver's process group.
        let mut b = Browser {
            driver,
            base: String::new(),
            session: String::new(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .connect_timeout(Duration::from_secs(5))
                .no_proxy()
                .build()
                .unwrap(),
            log: Mutex::new(Vec::new()),
            _profile: tempfile::tempdir().expect("browser profile folder"),
        };
        let port = match tokio::time::timeout(Duration::from_secs(20), rx).await {
            Ok(Ok(Ok(port))) => port,
            Ok(Ok(Err(said))) => panic!("chromedriver exited without listening:\n{said}"),
            _ => panic!("chromedriver did not say its port within 20 s"),
        };
        b.base = format!("http://127.0.0.1:{port}");

        let status = format!("{}/status", b.base);
        let mut ready = false;
        for _ in 0..50 {
            let r = b.client.get(&status).timeout(Duration::from_secs(2));
            if let Ok(v) = Self::send(r).await
                && v["ready"] == true
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "chromedriver at {status} never became ready");

        let (w, h) = window;
        let args = [
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            // Every name lookup but loopback fails: the page has no network.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1".into(),
            format!("--user-data-dir={}", b._profile.path().display()),
            format!("--window-size={w},{h}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
            // Below the client's 30 s, so that a slow page fails with the driver's reason.
            "timeouts": {"implicit": 0, "pageLoad": 20_000, "script": 10_000},
        }}});
        let created = Self::send(b.client.post(format!("{}/session", b.base)).json(&caps))
            .await
            .unwrap_or_else(|e| panic!("new WebDriver session: {e}"));
        b.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {created}"))
            .to_string();
        b.set_window(w, h).await;
        b
    }

    /// Loads `url` and returns once its `load` event has fired (scripts' fetches may still
    /// be running: wait for what they show). A refused connection shows Chromium's error page
    /// and is not an error here.
    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url}))
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Clicks the element that `css` selects, as a person would, after waiting up to 10 s for
    /// it to exist; panics when it never does, or is hidden or covered by another element.
    pub async fn click(&self, css: &str) {
        self.wait_for(css, Duration::from_secs(10)).await;
        if let Err(e) = self.try_click(css).await {
            panic!("click {css}: {e}");
        }
    }

    /// Clicks the element that `css` selects now, or says why WebDriver would not
    /// ("no such element", "element not interactable", "element click intercepted", ...).
    pub async fn try_click(&self, css: &str) -> Result<(), String> {
        let found = self
            .post("/element", json!({"using": "css selector", "value": css}))
            .await?;
        let id = found[ELEMENT]
            .as_str()
            .ok_or_else(|| format!("no element reference in {found}"))?;
        self.post(&format!("/element/{id}/click"), json!({}))
            .await
            .map(drop)
    }

    /// Polls every 100 ms until `cond` holds, for at most `timeout`; whether it did.
    /// `cond` is a CSS selector that must match an element (`[data-last-retry="t1:published"]`),
    /// or `js:` and a JavaScript expression that must be truthy (`js:document.title == "x"`);
    /// a script error (as during a navigation) counts as not yet.
    pub async fn wait_for(&self, cond: &str, timeout: Duration) -> bool {
        let body = match cond.strip_prefix("js:") {
            Some(expr) => json!({"script": format!("return !!({expr});"), "args": []}),
            None => {
                json!({"script": "return !!document.querySelector(arguments[0]);", "args": [cond]})
            }
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self.client.post(self.url("/execute/sync")).json(&body);
            match Self::send(r.timeout(left + Duration::from_secs(1))).await {
                Ok(Value::Bool(true)) => return true,
                Err(e) if e.contains("not a valid selector") => panic!("wait_for {cond}: {e}"),
                _ => {}
            }
            if left.is_zero() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100).min(left)).await;
        }
    }

    /// The page's DOM now, serialized.
    pub async fn source(&self) -> String {
        match self.get("/source").await {
            Ok(Value::String(s)) => s,
            other => panic!("page source: {other:?}"),
        }
    }

    /// The browser console at WARNING and SEVERE since the start, one line per entry
    /// (`SEVERE javascript: URL LINE:COL Uncaught Error: ...`): `console.warn`/`console.error`,
    /// uncaught exceptions and unhandled rejections, CSP violations, failed loads.
    pub async fn console(&self) -> Vec<String> {
        self.log_lines(|level| matches!(level, "WARNING" | "SEVERE"))
            .await
    }

    /// The browser console at every level (`INFO` for `console.log`) since the start.
    pub async fn console_all(&self) -> Vec<String> {
        self.log_lines(|_| true).await
    }

    async fn log_lines(&self, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let fresh = self
            .post("/se/log", json!({"type": "browser"}))
            .await
            .unwrap_or_else(|e| panic!("browser log: {e}"));
        let mut log = self.log.lock().unwrap();
        for e in fresh.as_array().into_iter().flatten() {
            let (level, source) = (e["level"].as_str().unwrap_or("?"), &e["source"]);
            let message = e["message"].as_str().unwrap_or_default();
            let line = format!("{level} {}: {message}", source.as_str().unwrap_or("?"));
            log.push((level.to_string(), line));
        }
        log.iter()
            .filter(|(level, _)| keep(level))
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// Writes a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        let shot = self
            .get("/screenshot")
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = shot.as_str().and_then(base64).expect("a base64 screenshot");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// Runs `script` (a function body: `return ...`, with `arguments[i]` for `args`) in the
    /// page and returns its result; panics on a script error.
    pub async fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args}))
            .await
            .unwrap_or_else(|e| panic!("execute {script}: {e}"))
    }

    /// Sizes the window so that the viewport, and so a screenshot, is `w`×`h` CSS pixels:
    /// headless Chromium's window is taller than its viewport, so the frame is measured.
    pub async fn set_window(&self, w: u32, h: u32) {
        let want = (i64::from(w), i64::from(h));
        for attempt in 0..4 {
            let inner = self.execute("return [innerWidth, innerHeight];", &[]).await;
            let got = (inner[0].as_i64().unwrap(), inner[1].as_i64().unwrap());
            if got == want {
                return;
            }
            assert!(attempt < 3, "the viewport stays {got:?}, not {want:?}");
            let rect = self
                .get("/window/rect")
                .await
                .unwrap_or_else(|e| panic!("window rect: {e}"));
            let outer = (
                rect["width"].as_i64().unwrap(),
                rect["height"].as_i64().unwrap(),
            );
            let size =
                json!({"width": outer.0 + want.0 - got.0, "height": outer.1 + want.1 - got.1});
            self.post("/window/rect", size)
                .await
                .unwrap_or_else(|e| panic!("set window rect: {e}"));
        }
    }

    fn url(&self, rel: &str) -> String {
        format!("{}/session/{}{rel}", self.base, self.session)
    }

    async fn get(&self, rel: &str) -> Result<Value, String> {
        Self::send(self.client.get(self.url(rel))).await
    }

    async fn post(&self, rel: &str, body: Value) -> Result<Value, String> {
        Self::send(self.client.post(self.url(rel)).json(&body)).await
    }

    /// A WebDriver command's `value`, or its error's message (`no such element: ...`).
    async fn send(req: reqwest::RequestBuilder) -> Result<Value, String> {
        let r = req.send().await.map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let mut v: Value = r.json().await.map_err(|e| e.to_string())?;
        let value = v["value"].take();
        if ok {
            return Ok(value);
        }
        // The message starts with the error's name and ends with "(Session info: ...)".
        let error = value["error"].as_str().unwrap_or("unknown error");
        let message = value["message"].as_str().unwrap_or(error);
        Err(message
            .split("\n  (Session info")
            .next()
            .unwrap_or(error)
            .to_string())
    }

    /// `DELETE /session/{id}` over a plain socket: `Drop` cannot await, and may run inside or
    /// outside a runtime. Best effort, bounded by socket timeouts.
    fn end_session(&self) {
        let Some(Ok(addr)) = self
            .base
            .strip_prefix("http://")
            .map(str::parse::<std::net::SocketAddr>)
        else {
            return;
        };
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return;
        };
        let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /session/{} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.session
        );
        // The reply comes once Chromium has closed.
        if s.write_all(request.as_bytes()).is_ok() {
            let _ = s.read(&mut [0; 512]);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            self.end_session();
        }
        // SAFETY: kill(2) on the process group that `process_group(0)` made for chromedriver
        // (its pid, not reused before the `wait` below); Chromium's processes are in it too.
        unsafe { libc::kill(-(self.driver.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

/// Standard base64 (as WebDriver sends screenshots) to bytes; `None` on a foreign character.
fn base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6 | u32::from(v)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}
