//! `contimg validate`: pre-deployment checks of a machine against a configuration. Every
//! check yields findings (ok, warning or error, each with a hint); nothing is changed
//! except a temporary file created and removed in each folder to prove it writable.
//!
//! Exit codes: 0 when no check found an error (warnings allowed), 1 with any error, 2 for
//! arguments clap refused.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chrono::Datelike;
use serde::Serialize;

use crate::config::Config;
use crate::events::Store;
use crate::events::error::StoreError;

/// The units `tools/deploy.sh` installs.
pub const UNITS: [&str; 2] = ["contimg-api.service", "contimg-stream.service"];

#[derive(clap::Args, Debug)]
pub struct ValidateArgs {
    /// The configuration file and folders `serve` will run with (the same flags).
    #[command(flatten)]
    pub layout: super::Layout,
    /// Where the systemd units are installed.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub units_dir: PathBuf,
    /// The binary the units' ExecStart must run (default: this binary). `deploy.sh
    /// --prefix` passes the final path when the files are installed under a prefix.
    #[arg(long)]
    pub expect_exec: Option<PathBuf>,
    /// One JSON document on standard output instead of the list.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warning,
    Error,
}

/// One result of one check.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    pub check: String,
    pub message: String,
    /// What to do about it; `null` for ok findings.
    pub hint: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    findings: &'a [Finding],
    errors: usize,
    warnings: usize,
}

#[derive(Default)]
struct Findings(Vec<Finding>);

impl Findings {
    fn push(&mut self, level: Level, check: &str, message: String, hint: Option<String>) {
        self.0.push(Finding {
            level,
            check: check.to_string(),
            message,
            hint,
        });
    }
    fn ok(&mut self, check: &str, message: String) {
        self.push(Level::Ok, check, message, None);
    }
    fn warn(&mut self, check: &str, message: String, hint: String) {
        self.push(Level::Warning, check, message, Some(hint));
    }
    fn error(&mut self, check: &str, message: String, hint: String) {
        self.push(Level::Error, check, message, Some(hint));
    }
}

pub fn run(args: ValidateArgs) -> ExitCode {
    let findings = check_all(&args);
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    let warnings = findings
        .iter()
        .filter(|f| f.level == Level::Warning)
        .count();
    let printed = if args.json {
        let report = Report {
            findings: &findings,
            errors,
            warnings,
        };
        serde_json::to_string(&report)
            .map_err(std::io::Error::other)
            .and_then(|s| writeln!(std::io::stdout(), "{s}"))
    } else {
        print_table(&findings, errors, warnings)
    };
    if let Err(e) = printed
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("contimg: writing the findings: {e}");
        return ExitCode::from(1);
    }
    ExitCode::from(if errors > 0 { 1 } else { 0 })
}

fn print_table(findings: &[Finding], errors: usize, warnings: usize) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    let width = findings.iter().map(|f| f.check.len()).max().unwrap_or(5);
    for f in findings {
        let level = match f.level {
            Level::Ok => "ok",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
        };
        writeln!(out, "{level:<8} {:<width$}  {}", f.check, f.message)?;
        if let Some(h) = &f.hint {
            writeln!(out, "{:<8} {:<width$}  hint: {h}", "", "")?;
        }
    }
    writeln!(out, "{errors} error(s), {warnings} warning(s)")
}

/// Every check, in the order an operator would fix them.
pub fn check_all(args: &ValidateArgs) -> Vec<Finding> {
    let mut f = Findings::default();
    let mut config = match &args.layout.config {
        Some(path) => match Config::load(path) {
            Ok(c) => {
                f.ok(
                    "config",
                    format!("{} parses and its values are sane", path.display()),
                );
                c
            }
            Err(e) => {
                f.error(
                    "config",
                    format!("{e:#}"),
                    "fix the file (tools/contimg.toml.example documents every key)".into(),
                );
                // Every other check would look at the wrong folders and port.
                return f.0;
            }
        },
        None => {
            f.ok(
                "config",
                "no --config given: the embedded defaults (with the flags given)".into(),
            );
            Config::default()
        }
    };
    args.layout.apply(&mut config);
    match config.check_roots() {
        Ok(()) => f.ok(
            "roots",
            "the ledger, stage, products, incoming and work folders do not overlap".into(),
        ),
        Err(e) => f.error(
            "roots",
            format!("{e:#}"),
            "give each root a folder of its own ([paths] in the file, or the flags)".into(),
        ),
    }

    let v = &config.validate;
    let folders = [
        ("state", config.ledger_dir(), Some(v.state_min_free_gb)),
        ("stage", config.stage_root(), Some(v.stage_min_free_gb)),
        (
            "products",
            config.products_root(),
            Some(v.products_min_free_gb),
        ),
        ("incoming", config.incoming(), None),
    ];
    for (name, path, _) in &folders {
        check_folder(&mut f, name, path);
    }
    for (name, path, min_gb) in &folders {
        if let Some(min_gb) = min_gb {
            check_space(&mut f, name, path, *min_gb);
        }
    }
    let last_event = match &config.ledger.url {
        Some(url) => {
            check_pg_ledger(&mut f, url);
            None
        }
        None => check_ledger(&mut f, &config.ledger_dir()),
    };
    check_port(&mut f, config.listen);
    check_stages(&mut f, &config.stages);
    let exec = match &args.expect_exec {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe(),
    };
    for unit in UNITS {
        check_unit(&mut f, &args.units_dir, unit, &exec);
    }
    check_clock(&mut f, chrono::Utc::now(), last_event);
    f.0
}

/// Exists, is a folder, and a file can really be created in it (root ignores mode bits).
fn check_folder(f: &mut Findings, name: &str, path: &Path) {
    let check = format!("folder:{name}");
    let shown = path.display();
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => f.warn(
            &check,
            format!("{name} folder {shown} does not exist"),
            format!("mkdir -p {shown} (owned by the service's user)"),
        ),
        Err(e) => f.error(
            &check,
            format!("cannot read {shown}: {e}"),
            "check the path and the permissions of its parents".into(),
        ),
        Ok(m) if !m.is_dir() => f.error(
            &check,
            format!("{name} path {shown} exists but is not a folder"),
            "move the file away or point the configuration at a folder".into(),
        ),
        Ok(_) => {
            let probe = path.join(format!(".contimg-validate-{}", std::process::id()));
            let written = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&probe)
                .and_then(|mut file| file.write_all(b"probe"));
            let removed = std::fs::remove_file(&probe);
            match written.and(removed) {
                Ok(()) => f.ok(&check, format!("{shown} exists and is writable")),
                Err(e) => f.error(
                    &check,
                    format!("{shown} is not writable: {e}"),
                    format!(
                        "chown/chmod {shown} for the service's user, or check the mount (read-only?)"
                    ),
                ),
            }
        }
    }
}

/// Free space of the file system holding `path` (or its nearest existing parent).
fn check_space(f: &mut Findings, name: &str, path: &Path, min_gb: f64) {
    let check = format!("disk:{name}");
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    let Some((free, total)) = crate::disk::space(existing) else {
        f.warn(
            &check,
            format!("cannot read the free space under {}", existing.display()),
            "check the mount".into(),
        );
        return;
    };
    let free_gb = free as f64 / 1e9;
    let total_gb = total as f64 / 1e9;
    let message = format!(
        "{free_gb:.1} GB free of {total_gb:.1} GB under {} (threshold {min_gb} GB)",
        existing.display()
    );
    if free_gb < min_gb {
        f.warn(
            &check,
            message,
            format!("free space there, or lower validate.{name}_min_free_gb if this is expected"),
        );
    } else {
        f.ok(&check, message);
    }
}

/// Connects to a PostgreSQL ledger and checks it is one this build reads; writes nothing.
fn check_pg_ledger(f: &mut Findings, url: &str) {
    let check = "ledger";
    match crate::events::store::postgres::probe(url) {
        Ok((at, Some(head))) => f.ok(check, format!("{at}: a contimg ledger of {head} events")),
        Ok((at, None)) => f.ok(
            check,
            format!("{at}: an empty database; serve creates the ledger's tables"),
        ),
        Err(e) => f.error(
            check,
            format!(
                "the PostgreSQL ledger cannot be used: {}",
                crate::events::error::chain(&e)
            ),
            "see docs/operations/postgresql.md".to_string(),
        ),
    }
}

/// Opens and closes the ledger; a server holding it is fine. Returns the last event's
/// commit time (microseconds) when the ledger could be read.
fn check_ledger(f: &mut Findings, dir: &Path) -> Option<i64> {
    let check = "ledger";
    if !dir.is_dir() {
        // check_folder already said what is wrong with the folder itself.
        f.ok(check, format!("no ledger yet at {}", dir.display()));
        return None;
    }
    if !dir.join("log").exists() {
        // Opening would create one; validate changes nothing.
        f.ok(
            check,
            format!("no ledger yet at {}; serve creates one", dir.display()),
        );
        return None;
    }
    match Store::open_to_read(dir, crate::events::store::SCAN_CACHE_BYTES) {
        Ok(store) => {
            let events = store.event_count();
            let last = store
                .last_position()
                .map(|p| store.get(p).map(|e| e.created_micros));
            store.close();
            match last {
                None => {
                    f.ok(check, format!("{} opens: empty ledger", dir.display()));
                    None
                }
                Some(Ok(micros)) => {
                    let at = chrono::DateTime::from_timestamp_micros(micros)
                        .map(crate::events::record::format_time)
                        .unwrap_or_else(|| micros.to_string());
                    f.ok(
                        check,
                        format!("{} opens: {events} events, last at {at}", dir.display()),
                    );
                    Some(micros)
                }
                Some(Err(e)) => {
                    f.error(
                        check,
                        format!("{} opens but its last event cannot be read: {e}", dir.display()),
                        format!(
                            "contimg verify --data-dir {} (see docs/operations/runbook.md, corrupt ledger)",
                            dir.display()
                        ),
                    );
                    None
                }
            }
        }
        Err(StoreError::Locked { pid, .. }) => {
            let by = pid
                .map(|p| format!("pid {p}"))
                .unwrap_or("a process".into());
            f.ok(
                check,
                format!("{} is held by the running service ({by})", dir.display()),
            );
            None
        }
        Err(e) => {
            f.error(
                check,
                format!("cannot open the ledger at {}: {e}", dir.display()),
                format!(
                    "contimg verify --data-dir {} (see docs/operations/runbook.md, corrupt ledger)",
                    dir.display()
                ),
            );
            None
        }
    }
}

/// Free, or answered by a contimg server; anything else on it is an error.
fn check_port(f: &mut Findings, addr: SocketAddr) {
    let check = "port";
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            f.ok(check, format!("{addr} is free"));
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => match contimg_status(addr) {
            Ok(version) => f.ok(
                check,
                format!("{addr} is answered by contimg {version} (the running service)"),
            ),
            Err(why) => f.error(
                check,
                format!("{addr} is bound by something other than contimg ({why})"),
                format!(
                    "find it with `ss -ltnp 'sport = :{}'`, or change listen",
                    addr.port()
                ),
            ),
        },
        Err(e) => f.error(
            check,
            format!("cannot bind {addr}: {e}"),
            "use an address of this machine (and a port >= 1024 unless running as root)".into(),
        ),
    }
}

/// `GET /api/status` and its `service`; the version when it is contimg.
fn contimg_status(addr: SocketAddr) -> Result<String, String> {
    let target = if addr.ip().is_unspecified() {
        let ip = match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    };
    let rt = super::runtime().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| e.to_string())?;
        let reply = client
            .get(format!("http://{target}/api/status"))
            .send()
            .await
            .map_err(|e| format!("GET /api/status: {e}"))?;
        let body: serde_json::Value = reply
            .json()
            .await
            .map_err(|_| "GET /api/status did not answer JSON".to_string())?;
        if body["service"] == "contimg" {
            Ok(body["version"].as_str().unwrap_or("?").to_string())
        } else {
            Err("GET /api/status did not answer contimg's status".into())
        }
    })
}

/// Who runs the stages: a warning when nobody does or the simulator does; with the
/// external runner, each stage's program is found and starts.
fn check_stages(f: &mut Findings, s: &crate::config::StagesConfig) {
    use crate::config::RunnerKind;
    match s.runner {
        None => f.warn(
            "stages",
            "no [stages] runner: the stages stay idle and formed groups wait".into(),
            "set runner = \"external\" with the stage commands (tools/stages/dsa110.toml), \
             or runner = \"simulate\" for synthetic products"
                .into(),
        ),
        Some(RunnerKind::Simulate) => f.warn(
            "stages",
            "runner = \"simulate\": the products will be synthetic (their metadata says \
             runner = simulate)"
                .into(),
            "a production host runs the external stages (tools/stages/dsa110.toml)".into(),
        ),
        Some(RunnerKind::External) => {
            for (name, cmd) in [
                ("convert", &s.convert),
                ("calibrate", &s.calibrate),
                ("image", &s.image),
            ] {
                if let Some(cmd) = cmd {
                    check_stage_program(f, name, &cmd.command);
                }
            }
        }
    }
}

/// Time a stage program gets to answer `--version` (CASA takes seconds to import).
const STAGE_VERSION_TIMEOUT: Duration = Duration::from_secs(120);

/// The stage's program is on the PATH (or where the command names it) and answers
/// `--version`: for an interpreter running a script (`python3 convert.py ...`), the script
/// answers, which proves its libraries import.
fn check_stage_program(f: &mut Findings, stage: &str, template: &str) {
    let check = format!("stage:{stage}");
    let words = command_words(template);
    let Some(program) = words.first() else {
        f.error(
            &check,
            "the command names no program".into(),
            format!("[stages.{stage}] command"),
        );
        return;
    };
    let Some(path) = find_program(program) else {
        f.error(
            &check,
            format!(
                "{program} is not found (PATH {:?})",
                std::env::var("PATH").unwrap_or_default()
            ),
            "install it, or name it by its full path in the command (docs/operations/stages.md)"
                .into(),
        );
        return;
    };
    // An interpreter runs the script that follows it. A Python script answers
    // `--version` (the reference stages import their libraries to do so); a shell or Perl
    // script would run whole, so it is only found, never run.
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let python = base.starts_with("python");
    let interpreter = python || ["sh", "bash", "dash", "perl"].contains(&base.as_str());
    let mut args: Vec<&str> = Vec::new();
    if let Some(script) = words.get(1).filter(|w| interpreter && !w.starts_with('-')) {
        let bad = if !Path::new(script).is_absolute() {
            Some("is not an absolute path (stages run in WORK/<group>, not here)")
        } else if !Path::new(script).is_file() {
            Some("is not a file")
        } else {
            None
        };
        if let Some(why) = bad {
            f.error(
                &check,
                format!("{program} would run {script}, which {why}"),
                "install the reference stages (docs/operations/stages.md) or fix the path".into(),
            );
            return;
        }
        if !python {
            f.ok(
                &check,
                format!(
                    "{} and {script} are there (a script it would run whole is not run here)",
                    path.display()
                ),
            );
            return;
        }
        args.push(script);
    }
    args.push("--version");
    let shown = format!("{} {}", path.display(), args.join(" "));
    match run_with_timeout(&path, &args, STAGE_VERSION_TIMEOUT) {
        Ok(out) => f.ok(
            &check,
            format!(
                "{shown}: {}",
                out.lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("(nothing printed)")
            ),
        ),
        Err(e) => f.error(
            &check,
            format!("{shown} failed: {e}"),
            "install what the stage needs (docs/operations/stages.md)".into(),
        ),
    }
}

/// The words a command template starts with, as `/bin/sh` would split them: single and
/// double quotes removed, `$VAR`, `${VAR}` and `${VAR:-default}` taken from this
/// environment, `{placeholders}` left as they are. Stops at the first shell operator, so
/// nothing of the command is ever run to learn its words.
pub fn command_words(template: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = template.chars().peekable();
    let (mut single, mut double) = (false, false);
    while let Some(c) = chars.next() {
        match c {
            '\'' if !double => {
                single = !single;
                in_word = true;
            }
            '"' if !single => {
                double = !double;
                in_word = true;
            }
            '$' if !single => {
                let name: String;
                let mut default = None;
                if chars.peek() == Some(&'{') {
                    chars.next();
                    let inner: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    match inner.split_once(":-") {
                        Some((n, d)) => {
                            name = n.to_string();
                            default = Some(d.to_string());
                        }
                        None => name = inner,
                    }
                } else {
                    let mut n = String::new();
                    while let Some(c) = chars
                        .peek()
                        .filter(|c| c.is_ascii_alphanumeric() || **c == '_')
                    {
                        n.push(*c);
                        chars.next();
                    }
                    name = n;
                }
                let value = std::env::var(&name).ok().filter(|v| !v.is_empty());
                word.push_str(&value.or(default).unwrap_or_default());
                in_word = true;
            }
            c if !single && !double && c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            ';' | '|' | '&' | '>' | '<' | '(' | ')' if !single && !double => break,
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// A program named with a `/` as it is; otherwise the first executable of that name on
/// the PATH.
fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| executable(p))
}

/// Runs a program to its end or the timeout (then kills its whole process group), in a
/// scratch folder of its own with its output in files there (no pipe to fill and stall);
/// its standard output, or why it failed with the tail of its standard error.
fn run_with_timeout(program: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let scratch = std::env::temp_dir().join(format!("contimg-validate-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&scratch).map_err(|e| format!("a scratch folder: {e}"))?;
    let result = run_in(&scratch, program, args, timeout);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn run_in(
    scratch: &Path,
    program: &Path,
    args: &[&str],
    timeout: Duration,
) -> Result<String, String> {
    use std::os::unix::process::CommandExt;
    let file =
        |name: &str| std::fs::File::create(scratch.join(name)).map_err(|e| format!("{name}: {e}"));
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(file("stdout")?)
        .stderr(file("stderr")?)
        .current_dir(scratch)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(None) => {
                // SAFETY: a signal to the process group this call created.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(format!("no answer within {} s", timeout.as_secs()));
            }
            Err(e) => return Err(format!("waiting: {e}")),
        }
    };
    let read = |name: &str| std::fs::read(scratch.join(name)).unwrap_or_default();
    if status.success() {
        return Ok(String::from_utf8_lossy(&read("stdout")).into_owned());
    }
    let err = read("stderr");
    let err = String::from_utf8_lossy(&err);
    let tail: Vec<&str> = err.lines().rev().take(3).collect();
    Err(format!(
        "{status}: {}",
        tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// Installed, and its ExecStart runs the expected binary.
fn check_unit(f: &mut Findings, dir: &Path, unit: &str, exec: &std::io::Result<PathBuf>) {
    let check = format!("unit:{unit}");
    let path = dir.join(unit);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            f.warn(
                &check,
                format!("{} is not installed", path.display()),
                "tools/deploy.sh --mode api|stream|both installs it (tools/systemd/)".into(),
            );
            return;
        }
        Err(e) => {
            f.error(
                &check,
                format!("cannot read {}: {e}", path.display()),
                "check its permissions".into(),
            );
            return;
        }
    };
    let Some(runs) = exec_start(&text) else {
        f.error(
            &check,
            format!("{} has no ExecStart=", path.display()),
            "reinstall it from tools/systemd/".into(),
        );
        return;
    };
    let expected = match exec {
        Ok(p) => p.canonicalize().unwrap_or_else(|_| p.clone()),
        Err(e) => {
            f.error(
                &check,
                format!("cannot tell which binary this is: {e}"),
                "pass --expect-exec PATH".into(),
            );
            return;
        }
    };
    let actual = Path::new(&runs)
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(&runs));
    if actual == expected {
        f.ok(&check, format!("{} runs {runs}", path.display()));
    } else {
        f.error(
            &check,
            format!(
                "{} runs {runs}, not this binary ({})",
                path.display(),
                expected.display()
            ),
            "install this binary there (tools/deploy.sh), or fix ExecStart and `systemctl daemon-reload`"
                .into(),
        );
    }
}

/// The program of the last `ExecStart=` line (systemd's prefixes `@-:+!` removed).
fn exec_start(unit: &str) -> Option<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix("ExecStart="))
        .rfind(|v| !v.trim().is_empty())
        .and_then(|v| {
            v.trim()
                .trim_start_matches(['@', '-', ':', '+', '!'])
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
}

/// A clock before 2024, or behind the ledger's last event, would stamp events out of order.
fn check_clock(f: &mut Findings, now: chrono::DateTime<chrono::Utc>, last_event: Option<i64>) {
    let check = "clock";
    let shown = crate::events::record::format_time(now);
    if now.year() < 2024 {
        f.error(
            check,
            format!("the clock says {shown}, before 2024"),
            "set the time (timedatectl set-ntp true) before starting the service".into(),
        );
        return;
    }
    if let Some(last) = last_event
        && now.timestamp_micros() < last
    {
        let at = chrono::DateTime::from_timestamp_micros(last)
            .map(crate::events::record::format_time)
            .unwrap_or_default();
        f.error(
            check,
            format!("the clock says {shown}, before the ledger's last event ({at})"),
            "fix the clock (timedatectl, NTP) before starting the service".into(),
        );
        return;
    }
    f.ok(check, format!("the clock says {shown}"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_words_split_as_the_shell_would_without_running_anything() {
        // SAFETY: this test alone reads the variable.
        unsafe { std::env::set_var("CONTIMG_TEST_WORDS", "/opt/x") };
        let w = command_words(
            r#"python3 "${CONTIMG_TEST_WORDS}/convert.py" --out {output} '$NOT' ${CONTIMG_UNSET_WORDS:-/d/sky.csv}; rm -rf /"#,
        );
        assert_eq!(
            w,
            [
                "python3",
                "/opt/x/convert.py",
                "--out",
                "{output}",
                "$NOT",
                "/d/sky.csv"
            ]
        );
        assert!(command_words("  ").is_empty());
    }

    #[test]
    fn exec_start_takes_the_program_of_the_last_line() {
        let unit = "[Service]\nExecStart=\nExecStart=-/usr/local/bin/contimg serve --mode api\n";
        assert_eq!(exec_start(unit).as_deref(), Some("/usr/local/bin/contimg"));
        assert_eq!(exec_start("[Service]\nType=simple\n"), None);
    }

    #[test]
    fn a_clock_before_2024_or_behind_the_ledger_is_an_error() {
        let t = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .with_timezone(&chrono::Utc)
        };
        let mut f = Findings::default();
        check_clock(&mut f, t("2001-01-01T00:00:00Z"), None);
        let now = t("2026-11-30T00:00:00Z");
        check_clock(&mut f, now, Some(now.timestamp_micros() + 1));
        check_clock(&mut f, now, Some(now.timestamp_micros()));
        let levels: Vec<Level> = f.0.iter().map(|x| x.level).collect();
        assert_eq!(levels, [Level::Error, Level::Error, Level::Ok]);
    }
}
