//! Stage runners: conversion, calibration and imaging of one group, by an external
//! command from the configuration or by the built-in simulator.
//!
//! An external command is a template run with `/bin/sh -c` in its own process group;
//! placeholders are replaced by shell-quoted values. It runs under a timeout (the whole
//! process group is killed with SIGKILL when it passes), its standard output goes to a log
//! file beside the group's outputs, and the tail of its standard error is kept for the
//! event. A run that exits 0 but leaves its expected output missing is a failure too.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::casa;
use super::sim;
use super::state::{GroupState, Stage};
use crate::config::{RunnerKind, StageCommand, StagesConfig};

/// Characters of standard error kept in a `StageFailed` event.
pub const STDERR_TAIL_CHARS: usize = 2000;

/// Where one group's stage inputs and outputs live.
#[derive(Debug, Clone)]
pub struct GroupPaths {
    pub work: PathBuf,
    pub ms: PathBuf,
    pub cal_dir: PathBuf,
    pub caltables_root: PathBuf,
    pub tile: PathBuf,
    pub beam: PathBuf,
}

impl GroupPaths {
    pub fn new(work_root: &Path, group_id: &str) -> Self {
        let work = work_root.join(group_id);
        GroupPaths {
            ms: work.join(format!("{group_id}.ms")),
            cal_dir: work.join("cal"),
            caltables_root: work_root.join("caltables"),
            tile: work.join(format!("{group_id}.pbcor.fits")),
            beam: work.join(format!("{group_id}.pb.fits")),
            work,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub duration: Duration,
    pub exit_status: Option<i32>,
    pub outcome: Result<Vec<String>, RunFailure>,
    /// The command as run (external runs only).
    pub command: Option<String>,
}

#[derive(Debug, Clone)]
pub struct RunFailure {
    pub error: String,
    pub timed_out: bool,
    pub stderr_tail: String,
}

impl RunFailure {
    pub fn new(error: impl Into<String>) -> Self {
        RunFailure {
            error: error.into(),
            timed_out: false,
            stderr_tail: String::new(),
        }
    }
}

impl RunResult {
    /// A run the worker's stop cut short (found at the next start).
    pub fn interrupted() -> Self {
        RunResult {
            duration: Duration::ZERO,
            exit_status: None,
            outcome: Err(RunFailure::new(
                "interrupted: the worker stopped while this stage ran",
            )),
            command: None,
        }
    }
}

/// Runs one of `group`'s stages.
pub async fn run_stage(
    cfg: &StagesConfig,
    stage: Stage,
    group: &GroupState,
    paths: &GroupPaths,
    default_dec: f64,
) -> RunResult {
    let start = Instant::now();
    if let Err(e) = std::fs::create_dir_all(&paths.work)
        .and_then(|_| std::fs::create_dir_all(&paths.cal_dir))
        .and_then(|_| std::fs::create_dir_all(&paths.caltables_root))
    {
        return RunResult {
            duration: start.elapsed(),
            exit_status: None,
            outcome: Err(RunFailure::new(format!(
                "creating {}: {e}",
                paths.work.display()
            ))),
            command: None,
        };
    }
    match cfg.runner {
        None => RunResult {
            duration: start.elapsed(),
            exit_status: None,
            outcome: Err(RunFailure::new(
                "no stage runner configured ([stages] runner is unset)",
            )),
            command: None,
        },
        Some(RunnerKind::Simulate) => {
            let (group, paths, sim_cfg) = (group.clone(), paths.clone(), cfg.simulate.clone());
            let outcome = tokio::task::spawn_blocking(move || {
                simulate(stage, &group, &paths, &sim_cfg, default_dec)
            })
            .await
            .unwrap_or_else(|e| Err(format!("simulator task failed: {e}")))
            .map_err(RunFailure::new);
            RunResult {
                duration: start.elapsed(),
                exit_status: None,
                outcome,
                command: None,
            }
        }
        Some(RunnerKind::External) => {
            let cmd = match stage {
                Stage::Convert => cfg.convert.as_ref(),
                Stage::Calibrate => cfg.calibrate.as_ref(),
                Stage::Image | Stage::Mosaic => cfg.image.as_ref(),
            };
            let Some(cmd) = cmd else {
                return RunResult {
                    duration: start.elapsed(),
                    exit_status: None,
                    outcome: Err(RunFailure::new("no command configured for this stage")),
                    command: None,
                };
            };
            run_external(cmd, cfg.timeout_s, stage, group, paths).await
        }
    }
}

fn simulate(
    stage: Stage,
    group: &GroupState,
    paths: &GroupPaths,
    cfg: &crate::config::SimulateConfig,
    default_dec: f64,
) -> Result<Vec<String>, String> {
    let show = |p: &Path| p.display().to_string();
    match stage {
        Stage::Convert => {
            sim::convert(
                &group.id,
                &group.obs_time,
                &group.files,
                &paths.ms,
                default_dec,
            )?;
            Ok(vec![show(&paths.ms)])
        }
        Stage::Calibrate => Ok(
            sim::calibrate(&paths.ms, &paths.cal_dir, &paths.caltables_root)?
                .iter()
                .map(|p| show(p))
                .collect(),
        ),
        Stage::Image | Stage::Mosaic => {
            sim::image(&paths.ms, &paths.tile, &paths.beam, cfg)?;
            Ok(vec![show(&paths.tile), show(&paths.beam)])
        }
    }
}

/// Quotes a value for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=+,@%".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Fills a command template.
pub fn render(template: &str, stage: Stage, group: &GroupState, paths: &GroupPaths) -> String {
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let input = match stage {
        Stage::Convert => group
            .files
            .iter()
            .map(|f| shell_quote(f))
            .collect::<Vec<_>>()
            .join(" "),
        _ => q(&paths.ms),
    };
    let output = match stage {
        Stage::Convert => q(&paths.ms),
        Stage::Calibrate => q(&paths.cal_dir),
        Stage::Image | Stage::Mosaic => q(&paths.tile),
    };
    template
        .replace("{input}", &input)
        .replace("{output}", &output)
        .replace("{group}", &shell_quote(&group.id))
        .replace("{tile}", &q(&paths.tile))
        .replace("{beam}", &q(&paths.beam))
        .replace("{obs_time}", &shell_quote(&group.obs_time))
        .replace("{work}", &q(&paths.work))
}

async fn run_external(
    cmd: &StageCommand,
    default_timeout: f64,
    stage: Stage,
    group: &GroupState,
    paths: &GroupPaths,
) -> RunResult {
    let start = Instant::now();
    let rendered = render(&cmd.command, stage, group, paths);
    let timeout = Duration::from_secs_f64(cmd.timeout_s.unwrap_or(default_timeout));
    let log = paths.work.join(format!("{stage}.stdout.log"));
    let fail = |error: String, exit_status, timed_out, stderr_tail| RunResult {
        duration: start.elapsed(),
        exit_status,
        outcome: Err(RunFailure {
            error,
            timed_out,
            stderr_tail,
        }),
        command: Some(rendered.clone()),
    };
    let stdout = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
    {
        Ok(f) => f,
        Err(e) => {
            return fail(
                format!("opening {}: {e}", log.display()),
                None,
                false,
                String::new(),
            );
        }
    };
    let mut child = match tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&rendered)
        .current_dir(&paths.work)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return fail(format!("starting /bin/sh: {e}"), None, false, String::new()),
    };
    let pid = child.id();
    // Whatever ends this run (a timeout, a shutdown dropping the future), the command and
    // everything it started go with it.
    let _group = pid.map(ProcessGroup);
    let mut stderr = child.stderr.take().expect("piped");
    let reader = tokio::spawn(async move {
        // Keep the last bytes only, whatever the command prints.
        let mut tail: VecDeque<u8> = VecDeque::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            tail.extend(&buf[..n]);
            let excess = tail.len().saturating_sub(STDERR_TAIL_CHARS * 4);
            tail.drain(..excess);
        }
        tail.into_iter().collect::<Vec<u8>>()
    });
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let timed_out = waited.is_err();
    if timed_out {
        if let Some(pid) = pid {
            // The shell and everything it started.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGKILL);
            }
        }
        let _ = child.wait().await;
    }
    let tail_bytes = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let stderr_tail = tail_text(&tail_bytes);
    if timed_out {
        return fail(
            format!("timed out after {:.0} s: killed", timeout.as_secs_f64()),
            None,
            true,
            stderr_tail,
        );
    }
    let status = match waited {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return fail(
                format!("waiting for the command: {e}"),
                None,
                false,
                stderr_tail,
            );
        }
        Err(_) => unreachable!("handled above"),
    };
    let code = status.code();
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        let what = match (code, status.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "failed".to_string(),
        };
        let last = stderr_tail.lines().last().unwrap_or("").trim();
        let error = if last.is_empty() {
            format!("{stage} {what}")
        } else {
            format!("{stage} {what}: {last}")
        };
        return fail(error, code, false, stderr_tail);
    }
    match expected_outputs(stage, paths) {
        Ok(outputs) => RunResult {
            duration: start.elapsed(),
            exit_status: code,
            outcome: Ok(outputs),
            command: Some(rendered),
        },
        Err(e) => fail(e, code, false, stderr_tail),
    }
}

/// Kills a process group when dropped.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: a signal to the process group this run created; ESRCH when it is gone.
        unsafe {
            libc::kill(-(self.0 as i32), libc::SIGKILL);
        }
    }
}

/// What a stage must leave behind, checked after an external command exits 0.
fn expected_outputs(stage: Stage, paths: &GroupPaths) -> Result<Vec<String>, String> {
    let show = |p: &Path| p.display().to_string();
    match stage {
        Stage::Convert if !paths.ms.is_dir() => Err(format!(
            "convert exited 0 but wrote no Measurement Set at {}",
            paths.ms.display()
        )),
        Stage::Convert => casa::check_table(&paths.ms, casa::MEASUREMENT_SET)
            .map(|_| vec![show(&paths.ms)])
            .map_err(|e| format!("convert exited 0 but the Measurement Set {e}")),
        Stage::Calibrate => {
            // The calibration tables it left (other tables, a component list say, are
            // not the group's calibration), each checked whole now rather than at the
            // mosaic.
            let mut tables = Vec::new();
            for e in std::fs::read_dir(&paths.cal_dir)
                .map_err(|e| format!("reading {}: {e}", paths.cal_dir.display()))?
                .flatten()
            {
                let dir = e.path();
                if casa::table_type(&dir).as_deref() == Some(casa::CALIBRATION) {
                    casa::check_table(&dir, casa::CALIBRATION)
                        .map_err(|e| format!("calibrate exited 0 but table {e}"))?;
                    tables.push(show(&dir));
                }
            }
            tables.sort();
            if tables.is_empty() {
                Err(format!(
                    "calibrate exited 0 but wrote no calibration table (a CASA table of type \
                     Calibration) in {}",
                    paths.cal_dir.display()
                ))
            } else {
                Ok(tables)
            }
        }
        _ if paths.tile.is_file() => {
            let mut out = vec![show(&paths.tile)];
            if paths.beam.is_file() {
                out.push(show(&paths.beam));
            }
            Ok(out)
        }
        _ => Err(format!(
            "image exited 0 but wrote no tile at {}",
            paths.tile.display()
        )),
    }
}

/// The last [`STDERR_TAIL_CHARS`] characters, cut at a line start when one is near.
pub fn tail_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let chars: Vec<char> = text.chars().collect();
    let start = chars.len().saturating_sub(STDERR_TAIL_CHARS);
    let mut tail: String = chars[start..].iter().collect();
    if start > 0
        && let Some(i) = tail.find('\n')
        && i < 200
    {
        tail = tail[i + 1..].to_string();
    }
    tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a/b.ms"), "/a/b.ms");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
    }

    #[test]
    fn tails_keep_the_end() {
        let long: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        let t = tail_text(long.as_bytes());
        assert!(t.chars().count() <= STDERR_TAIL_CHARS);
        assert!(t.ends_with("line 999\n"));
        assert!(t.starts_with("line "));
    }
}
