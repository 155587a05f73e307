//! Ingest through the worker: one look at the incoming folder, the facts appended with
//! the stream heads the scan decided against, and group id collisions recorded.

use std::collections::HashMap;

use super::*;

impl Pipeline {
    /// One look at the incoming folder; returns the events written.
    pub async fn ingest_once(&self, ingest: &mut Ingest) -> anyhow::Result<usize> {
        self.catch_up().await?;
        // The scan decides against the fold as it stands; its appends expect exactly the
        // stream heads it decided against, so a fact another worker wrote meanwhile makes
        // them conflict instead of slipping in beside a decision it would have changed.
        // The folder is listed under the lock, the files read outside it (a slow disk or
        // a large header holds up no one), and the decision taken under it again.
        let (ready, settling) = {
            let state = self.state.lock().await;
            ingest
                .ready(|name| state.files.contains_key(name))
                .map_err(|e| anyhow::anyhow!("scanning {}: {e}", ingest.dir.display()))?
        };
        let subbands = ingest.config.subbands;
        let examined =
            tokio::task::spawn_blocking(move || Ingest::examine(ready, subbands)).await?;
        let (outcome, mut heads) = {
            let state = self.state.lock().await;
            let outcome = ingest.decide(&state, examined, settling, self.cfg.clock.now());
            let heads: HashMap<String, Option<u64>> = outcome
                .ingest
                .keys()
                .map(|k| (k.clone(), state.ingest_heads.get(k).copied()))
                .collect();
            (outcome, heads)
        };
        if outcome.is_empty() {
            return Ok(0);
        }
        let mut written = 0;
        for (stream, facts) in outcome.ingest {
            for chunk in facts.chunks(500) {
                let head = heads.get(&stream).copied().flatten();
                let expected = head.map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact);
                let events: Vec<ProposedEvent> = chunk
                    .iter()
                    .map(|f| match f {
                        IngestFact::Accepted(a) => self.event(a),
                        IngestFact::Rejected(r) => {
                            tracing::warn!(path = %r.path, reason = %r.reason, "subband file refused");
                            self.event(r)
                        }
                        IngestFact::TimedOut(t) => {
                            tracing::warn!(obs = %t.obs_time, missing = ?t.missing, "observation timed out");
                            self.event(t)
                        }
                    })
                    .collect();
                match self.append_at(&stream, expected, events).await {
                    Ok(revision) => {
                        heads.insert(stream.clone(), Some(revision));
                        written += chunk.len();
                    }
                    // Another worker wrote first: decide again on the next scan.
                    Err(StoreError::WrongExpectedVersion { .. }) => return Ok(written),
                    Err(e) => return Err(store_err(e)),
                }
            }
        }
        for mut g in outcome.formed {
            g.dec_deg = g
                .files
                .first()
                .and_then(|f| crate::pipeline::sim::read_subband_dec(Path::new(f)));
            let stream = StreamName::group(&g.group_id);
            let key = format!("{stream}/GroupFormed");
            match self
                .append(
                    &stream,
                    ExpectedRevision::NoStream,
                    vec![self.event_with_id(&g, &key)],
                )
                .await
            {
                Ok(()) => {
                    tracing::info!(group = %g.group_id, obs = %g.obs_time, "group formed");
                    written += 1;
                }
                Err(StoreError::WrongExpectedVersion { .. }) => {
                    written += self.refuse_collision(&g).await?;
                }
                Err(e) => return Err(store_err(e)),
            }
        }
        Ok(written)
    }

    /// A `GroupFormed` met an existing `group-<id>` stream. The same members are an
    /// idempotent repeat; other members are safeguard 1: the group is refused with a
    /// `GroupRejected` in the ingest stream, and the existing group is left as it is.
    pub(super) async fn refuse_collision(&self, g: &GroupFormed) -> anyhow::Result<usize> {
        let stream = StreamName::group(&g.group_id);
        let first = self
            .ledger
            .read_stream(&stream, Some(0), Direction::Forward, 1)
            .await
            .map_err(store_err)?;
        let held: Option<GroupFormed> = first
            .first()
            .and_then(|e| serde_json::from_slice(&e.data).ok());
        if held.as_ref().map(|h| &h.files) == Some(&g.files) {
            return Ok(0);
        }
        let reason = match &held {
            Some(h) => format!(
                "group id {} already holds observation {} with {} other files; refusing rather than overwrite",
                g.group_id,
                h.obs_time,
                h.files.len()
            ),
            None => format!(
                "group id {} is already taken by a stream that is not a group",
                g.group_id
            ),
        };
        tracing::error!(group = %g.group_id, %reason, "group id collision");
        let ingest = crate::pipeline::ingest::ingest_stream(
            chrono::NaiveDateTime::parse_from_str(&g.obs_time, crate::pipeline::ingest::NAME_TIME)
                .ok(),
            self.cfg.clock.now(),
        );
        let head = self.state.lock().await.ingest_heads.get(&ingest).copied();
        let expected = head.map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact);
        let event = GroupRejected {
            obs_time: g.obs_time.clone(),
            group_id: g.group_id.clone(),
            files: g.files.clone(),
            reason,
        };
        match self
            .append(&ingest, expected, vec![self.event(&event)])
            .await
        {
            Ok(()) => Ok(1),
            // Decided again on the next scan.
            Err(StoreError::WrongExpectedVersion { .. }) => Ok(0),
            Err(e) => Err(store_err(e)),
        }
    }
}
