//! Staging: copying a built tile or mosaic into the stage root and registering it as a
//! product (through the server when the worker runs as a process of its own).

use super::*;

impl Pipeline {
    /// Who made a product's files: `runner = simulate` marks the simulator's.
    fn runner_metadata(&self) -> (String, String) {
        let runner = match self.cfg.stages.runner {
            Some(crate::config::RunnerKind::Simulate) => "simulate",
            Some(crate::config::RunnerKind::External) => "external",
            None => "none",
        };
        ("runner".to_string(), runner.to_string())
    }

    async fn register(&self, req: Registration) -> anyhow::Result<()> {
        let id = req.data_id.clone();
        match register_product(&self.ledger, &self.cfg.stage_root, req, "pipeline").await {
            Ok(_) => {
                tracing::info!(product = %id, "staged");
                self.catch_up().await
            }
            Err(e) => Err(anyhow::anyhow!("registering {id}: {e}")),
        }
    }

    pub(super) async fn register_mosaic(&self, id: &str) -> anyhow::Result<()> {
        let Some(m) = self.state.lock().await.mosaics.get(id).cloned() else {
            return Ok(());
        };
        let Some(folder) = m.build.completed.as_ref().and_then(|o| o.first()).cloned() else {
            return Ok(());
        };
        let metadata = [
            ("mosaic_id".to_string(), id.to_string()),
            ("members".to_string(), m.members.join(",")),
            self.runner_metadata(),
        ]
        .into_iter()
        .collect();
        self.register(Registration {
            data_id: mosaic_product(id),
            data_type: "mosaic".into(),
            stage_path: folder,
            qa_status: Some("passed".into()),
            validation_status: Some("validated".into()),
            auto_publish: true,
            metadata,
        })
        .await
    }

    pub(super) async fn register_image(&self, group: &str) -> anyhow::Result<()> {
        let Some(g) = self.state.lock().await.group(group).cloned() else {
            return Ok(());
        };
        let Some(tile) = g.outputs(Stage::Image).first().cloned() else {
            return Ok(());
        };
        let dir = self.cfg.stage_root.join("images");
        let name = format!("{group}.pbcor.fits");
        let staged = dir.join(&name);
        let (dst, work_root) = (staged.clone(), self.cfg.work_root.clone());
        let tile_name = tile.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if dst.exists() {
                return Ok(());
            }
            // The tile its event names is copied only from beneath the work root.
            let src = super::safeguards::beneath(&work_root, &tile_name)
                .map_err(std::io::Error::other)?;
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!(".partial-{}-{name}", uuid::Uuid::new_v4()));
            std::fs::copy(&src, &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &dst)
        })
        .await?
        .map_err(|e| anyhow::anyhow!("staging {tile}: {e}"))?;
        let metadata = [
            ("group_id".to_string(), group.to_string()),
            ("obs_time".to_string(), g.obs_time.clone()),
            self.runner_metadata(),
        ]
        .into_iter()
        .collect();
        self.register(Registration {
            data_id: image_product(group),
            data_type: "image".into(),
            stage_path: staged.display().to_string(),
            qa_status: Some("passed".into()),
            validation_status: Some("validated".into()),
            auto_publish: true,
            metadata,
        })
        .await
    }
}
