//! Settling, at start, the stages a stop cut short: only this host's, and only those of
//! workers whose process is gone.

use super::*;

impl Pipeline {
    /// Settles stages and mosaic builds this host left running when it stopped: each gets
    /// a `StageFailed` marked as interrupted, and is retried like any failure.
    pub async fn recover(&self) -> anyhow::Result<usize> {
        self.catch_up().await?;
        let host = self.meta.host.clone();
        let me = self.worker.clone();
        let (groups, mosaics) = {
            let s = self.state.lock().await;
            let settle = |p: &StageProgress| {
                p.running
                    .as_ref()
                    .filter(|(_, _, who)| interrupted(who.as_deref(), host.as_deref(), &me))
                    .map(|(a, _, _)| *a)
            };
            let groups: Vec<(String, Stage, u32, u64)> = s
                .groups
                .values()
                .flat_map(|g| {
                    Stage::GROUP
                        .into_iter()
                        .filter_map(|st| settle(g.stage(st)).map(|a| (g.id.clone(), st, a, g.head)))
                        .collect::<Vec<_>>()
                })
                .collect();
            let mosaics: Vec<(String, u32, u64)> = s
                .mosaics
                .values()
                .filter_map(|m| settle(&m.build).map(|a| (m.id.clone(), a, m.head)))
                .collect();
            (groups, mosaics)
        };
        let n = groups.len() + mosaics.len();
        let streams = groups
            .into_iter()
            .map(|(id, stage, a, head)| (StreamName::group(&id), stage, a, head))
            .chain(
                mosaics
                    .into_iter()
                    .map(|(id, a, head)| (StreamName::mosaic(&id), Stage::Mosaic, a, head)),
            );
        for (stream, stage, attempt, head) in streams {
            let f = self.failure(stage, attempt, &RunResult::interrupted(), &self.cfg.stages);
            // Exact: if anything was appended meanwhile, the stage was not abandoned.
            match self
                .append(&stream, ExpectedRevision::Exact(head), vec![self.event(&f)])
                .await
            {
                Ok(()) | Err(StoreError::WrongExpectedVersion { .. }) => {}
                Err(e) => return Err(store_err(e)),
            }
        }
        if n > 0 {
            tracing::warn!(interrupted = n, "settled stages a stop cut short");
        }
        Ok(n)
    }
}

/// Whether a stage left running by `who` (the `worker` of its `StageStarted`, or a host
/// name from older events) was cut short, as seen by worker `me` on `host`: a worker of
/// this host whose process is gone. Stages of other hosts, or of live workers here, are
/// not this worker's to settle.
pub(super) fn interrupted(who: Option<&str>, host: Option<&str>, me: &str) -> bool {
    let Some(who) = who else {
        return true;
    };
    if who == me {
        return true;
    }
    let mut parts = who.rsplitn(3, ':');
    let (Some(_instance), Some(pid), Some(on)) = (parts.next(), parts.next(), parts.next()) else {
        // A bare host name (events written before workers were named).
        return Some(who) == host;
    };
    let Ok(pid) = pid.parse::<i32>() else {
        return false;
    };
    Some(on) == host && !process_alive(pid)
}

pub(super) fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
