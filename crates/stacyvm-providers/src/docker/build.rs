//! Images built in docker sandboxes (environment builds).
//!
//! The steps run in a sandbox container of this provider — its runtime
//! (runc or gVisor), seccomp profile, dropped capabilities, resource
//! limits and egress filter — and the engine commits the container as the
//! image. (The Engine's own build API would run `RUN` steps in containers
//! of the engine's default runtime on its default bridge, outside all of
//! that: a hostile pip package would reach the metadata and private
//! ranges the sandbox network refuses.) The commit gets the base image's
//! command, entrypoint and environment back (not the agent's), and labels
//! naming the base image's id and the steps' cache key, so a second build
//! of the same steps on the same base finds the image and reuses it.

use std::collections::HashMap;

use bollard::auth::DockerCredentials;
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, ListImagesOptionsBuilder, PushImageOptionsBuilder,
    RemoveImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures::StreamExt;
use stacyvm_core::provider::{BuildLog, BuiltImage, ImageBuild, RegistryAuth};
use stacyvm_core::{Error, Result};
use tracing::info;

use super::{engine_err, is_status, spec, DockerProvider};

/// Labels of a built image.
pub const LABEL_BUILD: &str = "stacyvm.build";
pub const LABEL_BUILD_KEY: &str = "stacyvm.build.key";
pub const LABEL_BUILD_BASE: &str = "stacyvm.build.base";

/// `repo:tag` of a name (the tag after the last `:` past the last `/`).
fn split_ref(name: &str) -> (String, String) {
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    match name[slash..].rfind(':') {
        Some(i) => (
            name[..slash + i].to_string(),
            name[slash + i + 1..].to_string(),
        ),
        None => (name.to_string(), "latest".to_string()),
    }
}

impl DockerProvider {
    fn check_buildable(&self) -> Result<()> {
        if self.opts.config.read_only_rootfs {
            return Err(Error::unsupported(
                "docker sandboxes with read_only_rootfs keep their writes on tmpfs mounts; a build cannot commit them",
            ));
        }
        Ok(())
    }

    /// The engine's id of the base image.
    async fn base_id(&self, base: &str) -> Result<String> {
        let image = spec::parse_image(base)?;
        if super::snapshot::is_reserved(&image) {
            return Err(Error::invalid(format!(
                "base image {base:?} is a snapshot's; build on an image"
            )));
        }
        let d = self.engine().await?;
        match d.inspect_image(&image.full()).await {
            Ok(i) => {
                i.id.ok_or_else(|| Error::unavailable("the engine gave no image id"))
            }
            Err(e) if is_status(&e, 404) => Err(Error::invalid(format!(
                "base image {base:?} is not in the Docker engine (docker images lists what it has)"
            ))),
            Err(e) => Err(engine_err("inspecting the base image", e)),
        }
    }

    async fn tag(&self, image: &str, name: &str) -> Result<()> {
        let (repo, tag) = split_ref(name);
        let opts = TagImageOptionsBuilder::default()
            .repo(&repo)
            .tag(&tag)
            .build();
        self.engine()
            .await?
            .tag_image(image, Some(opts))
            .await
            .map_err(|e| engine_err("tagging the built image", e))
    }

    pub(super) async fn cached_build(&self, plan: &ImageBuild) -> Result<Option<BuiltImage>> {
        self.check_buildable()?;
        let base = self.base_id(&plan.base_image).await?;
        let d = self.engine().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![
                format!("{LABEL_BUILD_KEY}={}", plan.cache_key),
                format!("{LABEL_BUILD_BASE}={base}"),
            ],
        )]);
        let opts = ListImagesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let found = d
            .list_images(Some(opts))
            .await
            .map_err(|e| engine_err("listing built images", e))?;
        let Some(img) = found.into_iter().next() else {
            return Ok(None);
        };
        self.tag(&img.id, &plan.name).await?;
        Ok(Some(BuiltImage {
            image_ref: plan.name.clone(),
            digest: img.id,
            size_bytes: u64::try_from(img.size).unwrap_or(0),
            reused: true,
        }))
    }

    pub(super) async fn commit_build(&self, id: &str, plan: &ImageBuild) -> Result<BuiltImage> {
        self.check_buildable()?;
        let info = self.inspect_ours(id).await?;
        let base_ref = info
            .image
            .clone()
            .ok_or_else(|| Error::unavailable("the engine gave no image of the build sandbox"))?;
        let d = self.engine().await?;
        let base = d
            .inspect_image(&base_ref)
            .await
            .map_err(|e| engine_err("inspecting the base image", e))?;
        let base_id = base.id.clone().unwrap_or(base_ref);
        let base_cfg = base.config.unwrap_or_default();
        // What the image's users get: the base's command and environment,
        // the build's labels (the engine adds the container's own, which
        // spawns overwrite), the workspace as working directory.
        let mut labels = base_cfg.labels.clone().unwrap_or_default();
        // The build container's own labels would come along: blanked.
        for k in [
            spec::LABEL_MANAGED,
            spec::LABEL_SANDBOX,
            spec::LABEL_PROVIDER,
            spec::LABEL_IMAGE,
            spec::LABEL_METADATA,
            spec::LABEL_OWNER,
            spec::LABEL_TENANT,
            spec::LABEL_EXPIRES,
            spec::LABEL_HOST_DIR,
        ] {
            labels.entry(k.to_string()).or_default();
        }
        labels.insert(LABEL_BUILD.into(), plan.build_id.clone());
        labels.insert(LABEL_BUILD_KEY.into(), plan.cache_key.clone());
        labels.insert(LABEL_BUILD_BASE.into(), base_id);
        let cmd = match base_cfg.cmd.clone() {
            Some(c) if !c.is_empty() => c,
            _ if base_cfg.entrypoint.as_ref().is_some_and(|e| !e.is_empty()) => Vec::new(),
            _ => vec!["/bin/sh".to_string()],
        };
        let env = match base_cfg.env.clone() {
            Some(e) if !e.is_empty() => e,
            _ => vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            ],
        };
        let config = bollard::models::ContainerConfig {
            labels: Some(labels),
            cmd: Some(cmd.clone()),
            entrypoint: base_cfg.entrypoint.clone(),
            env: Some(env),
            working_dir: Some("/workspace".into()),
            user: base_cfg.user.clone(),
            ..Default::default()
        };
        let (repo, tag) = split_ref(&plan.name);
        // Not the agent's entrypoint: the base's. A base without one gets
        // `env`, which runs the command as given (the engine's commit
        // treats an empty entrypoint as "keep the container's").
        let entrypoint = match &base_cfg.entrypoint {
            Some(e) if !e.is_empty() => serde_json::to_string(e).unwrap_or_default(),
            _ => r#"["/usr/bin/env"]"#.to_string(),
        };
        let cmd_json = serde_json::to_string(&cmd).unwrap_or_default();
        let opts = CommitContainerOptionsBuilder::default()
            .container(id)
            .repo(&repo)
            .tag(&tag)
            .comment(&format!("StacyVM build {}", plan.build_id))
            .changes(&format!("ENTRYPOINT {entrypoint}\nCMD {cmd_json}"))
            .pause(true)
            .build();
        let committed = d.commit_container(opts, config).await;
        self.drop_dead_conn(id).await;
        let committed = committed.map_err(|e| engine_err("committing the build sandbox", e))?;
        let image = d
            .inspect_image(&plan.name)
            .await
            .map_err(|e| engine_err("inspecting the built image", e))?;
        let digest = image.id.unwrap_or(committed.id);
        info!(sandbox_id = %id, image = %plan.name, %digest, "docker build committed");
        Ok(BuiltImage {
            image_ref: plan.name.clone(),
            digest,
            size_bytes: u64::try_from(image.size.unwrap_or(0)).unwrap_or(0),
            reused: false,
        })
    }

    pub(super) async fn push_built(
        &self,
        image_ref: &str,
        target: &str,
        auth: &RegistryAuth,
        log: BuildLog,
    ) -> Result<String> {
        let parsed = spec::parse_image(target)?;
        let (repo, tag) = split_ref(target);
        self.tag(image_ref, target).await?;
        let d = self.engine().await?;
        let creds = DockerCredentials {
            username: Some(auth.username.clone()),
            password: Some(auth.password.clone()),
            serveraddress: Some(auth.host.clone()),
            ..Default::default()
        };
        let opts = PushImageOptionsBuilder::default().tag(&tag).build();
        let mut stream = d.push_image(&repo, Some(opts), Some(creds));
        let mut digest = String::new();
        let mut failure = None;
        let mut last = String::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|e| e.message) {
                        failure = Some(e);
                        break;
                    }
                    if let Some(status) = info.status {
                        if let Some(pos) = status.find("digest: ") {
                            digest = status[pos + 8..]
                                .split_whitespace()
                                .next()
                                .unwrap_or_default()
                                .to_string();
                        }
                        // One line per change of state, not per progress tick.
                        let line = status;
                        if line != last {
                            log(&format!("{line}\n"));
                            last = line;
                        }
                    }
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        // The push tag is not kept: the image stays under its build name.
        let opts = RemoveImageOptionsBuilder::default().noprune(true).build();
        let _ = d.remove_image(&parsed.full(), Some(opts), None).await;
        if let Some(e) = failure {
            // The engine's message, never the credentials.
            let e = e.replace(&auth.password, "<redacted>");
            return Err(
                if e.contains("unauthorized") || e.contains("authentication required") {
                    Error::forbidden(format!(
                        "the registry {} refused the credentials of {}: {e}",
                        auth.host, auth.username
                    ))
                } else {
                    Error::unavailable(format!("pushing to {target}: {e}"))
                },
            );
        }
        if digest.is_empty() {
            return Err(Error::unavailable(format!(
                "pushing to {target}: the engine reported no digest"
            )));
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::split_ref;

    #[test]
    fn refs_split_at_the_tag_not_the_port() {
        assert_eq!(
            split_ref("127.0.0.1:5000/u/stacyvm-env:web-1234"),
            ("127.0.0.1:5000/u/stacyvm-env".into(), "web-1234".into())
        );
        assert_eq!(
            split_ref("localhost:5000/x"),
            ("localhost:5000/x".into(), "latest".into())
        );
        assert_eq!(
            split_ref("local/stacyvm-env:a"),
            ("local/stacyvm-env".into(), "a".into())
        );
    }
}
