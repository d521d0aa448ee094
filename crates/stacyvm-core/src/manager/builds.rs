//! Environment builds (`/environments/builds`): a spec (base image, apt
//! and pip packages) made into an image of a provider's, and pushed to
//! registries.
//!
//! One queue per server (128 builds) and one worker: builds are heavy and
//! run one at a time. A build asks its provider first for an image an
//! earlier build made from the same steps on the same base (the cache
//! key), then for its own builder (docker: the Engine build API); a
//! provider without one (native) gets the steps run in a sandbox spawned
//! from the base image for the spec's owner (bridged, under the tenant's
//! egress rules, counted in the owner's quota), and commits what they
//! changed as a layer over the base.
//!
//! The log is kept in memory while the build runs (followers of
//! `logs?follow=1` get each chunk as it comes), saved to the store every
//! few seconds and at every step, and kept with the record after the end,
//! failed builds included. Cancelling stops the build: the sandbox is
//! destroyed (killing its commands) or the engine's build stream closed.
//! A server that stops mid-build marks the build failed at its next start
//! and removes the build's sandbox; queued builds run again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use stacyvm_api::{
    Build, BuildArtifact, BuildEntry, BuildSpawnConfig, CreateBuild, EnvironmentSpec, SpawnRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Caller, Manager, Scope};
use crate::dockerfile::sh_quote;
use crate::error::{Error, ErrorKind, Result};
use crate::provider::{
    capability, BuildLog, BuildStep, BuiltImage, ExecSpec, ImageBuild, OutputChunk, Provider,
    RegistryAuth,
};
use crate::store::{ArtifactRecord, BuildRecord, EnvironmentSpecRecord};

/// Builds waiting at most.
const QUEUE_CAPACITY: usize = 128;
/// Unfinished builds one owner may have.
const MAX_OWNER_BUILDS: usize = 8;
/// The most log one build keeps; past it the rest is counted, not kept.
const MAX_LOG_BYTES: usize = 4 << 20;
/// How often a running build's log is saved.
const SAVE_EVERY: Duration = Duration::from_secs(2);
/// The longest one build step may run.
const STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Metadata key marking a build's sandbox (reserved: callers cannot set it).
pub(crate) const BUILD_KEY: &str = crate::provider::IMAGE_BUILD_METADATA;
/// Registry targets a build may name (besides connection ids).
const TARGET_KINDS: [&str; 4] = ["local", "ghcr", "dockerhub", "registry"];

/// The builds of a server: the queue and the running build.
#[derive(Default)]
pub(crate) struct Builds {
    queue: Mutex<Option<mpsc::Sender<String>>>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Serialises a build's start with its cancellation.
    gate: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Builds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builds")
            .field("live", &self.live.lock().len())
            .finish()
    }
}

/// A running build's log and controls.
struct Live {
    log: Mutex<Vec<u8>>,
    /// Bytes past [`MAX_LOG_BYTES`] not kept.
    dropped: Mutex<u64>,
    /// Bumped at every append; followers wait on it.
    version: watch::Sender<u64>,
    cancel: CancellationToken,
    /// True once the record holds the final state.
    finished: watch::Sender<bool>,
}

impl Live {
    fn new() -> Arc<Live> {
        Arc::new(Live {
            log: Mutex::new(Vec::new()),
            dropped: Mutex::new(0),
            version: watch::channel(0).0,
            cancel: CancellationToken::new(),
            finished: watch::channel(false).0,
        })
    }

    /// Appends output (made valid UTF-8, so the saved text has the same
    /// bytes and offsets stay meaningful).
    fn append(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        {
            let mut log = self.log.lock();
            if log.len() + text.len() > MAX_LOG_BYTES {
                *self.dropped.lock() += text.len() as u64;
                return;
            }
            log.extend_from_slice(text.as_bytes());
        }
        self.version.send_modify(|v| *v += 1);
    }

    fn line(&self, line: &str) {
        self.append(format!("{line}\n").as_bytes());
    }

    fn text(&self) -> String {
        let mut t = String::from_utf8_lossy(&self.log.lock()).to_string();
        let dropped = *self.dropped.lock();
        if dropped > 0 {
            t.push_str(&format!(
                "[{dropped} more bytes of output not kept: a build keeps {} MiB of log]\n",
                MAX_LOG_BYTES >> 20
            ));
        }
        t
    }

    fn sink(self: &Arc<Self>) -> BuildLog {
        let me = self.clone();
        Arc::new(move |s: &str| me.append(s.as_bytes()))
    }
}

fn artifact_view(a: &ArtifactRecord) -> BuildArtifact {
    BuildArtifact {
        target: a.target.clone(),
        connection_id: a.connection_id.clone(),
        image_ref: a.image_ref.clone(),
        digest: a.digest.clone(),
        status: a.status.clone(),
        error: a.error.clone(),
        created_at: a.created_at,
        updated_at: a.updated_at,
    }
}

fn view(r: &BuildRecord) -> Build {
    Build {
        id: r.id.clone(),
        spec_id: r.spec_id.clone(),
        owner_id: r.owner_id.clone(),
        provider: r.provider.clone(),
        status: r.status.clone(),
        current_step: r.current_step.clone(),
        log: r.log.clone(),
        image_size_bytes: r.image_size_bytes,
        digest_local: r.digest_local.clone(),
        error: r.error.clone(),
        created_at: r.created_at,
        finished_at: r.finished_at,
        updated_at: r.updated_at,
        artifacts: r.artifacts.iter().map(artifact_view).collect(),
    }
}

fn is_final(status: &str) -> bool {
    matches!(status, "ready" | "failed" | "canceled")
}

/// The image tag of a build: the spec's name made a tag (at most 24
/// characters of `[a-z0-9._-]`, `env` when nothing is left), `-`, and
/// the first 8 characters of the build id.
pub fn build_tag(spec_name: &str, build_id: &str) -> String {
    let mut name: String = spec_name
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(24)
        .collect();
    name = name
        .trim_matches(|c| matches!(c, '.' | '_' | '-'))
        .to_string();
    if name.is_empty() {
        name = "env".into();
    }
    let short: String = build_id.chars().filter(|c| *c != '-').take(8).collect();
    format!("{name}-{short}")
}

/// The steps a spec builds with.
pub fn plan_steps(spec: &EnvironmentSpecRecord) -> Result<Vec<BuildStep>> {
    let mut steps = vec![
        BuildStep::Env("DEBIAN_FRONTEND".into(), "noninteractive".into()),
        // Debian's Python refuses system-wide pip installs without it
        // (PEP 668); an environment image is exactly that.
        BuildStep::Env("PIP_BREAK_SYSTEM_PACKAGES".into(), "1".into()),
        BuildStep::Env("PIP_DISABLE_PIP_VERSION_CHECK".into(), "1".into()),
    ];
    if !spec.apt_packages.is_empty() {
        let pkgs: Vec<String> = spec.apt_packages.iter().map(|p| sh_quote(p)).collect();
        steps.push(BuildStep::Run(format!(
            "apt-get update && apt-get install -y --no-install-recommends {} && apt-get clean && rm -rf /var/lib/apt/lists/*",
            pkgs.join(" ")
        )));
    }
    if !spec.python_version.is_empty() {
        // The version was checked to be digits and dots.
        let want = &spec.python_version;
        steps.push(BuildStep::Run(format!(
            "python3 -c 'import sys; have=\"%d.%d.%d\" % sys.version_info[:3]; sys.exit(0 if (have + \".\").startswith(\"{want}.\") else \"the base image has Python \" + have + \", the spec asks for {want}\")'"
        )));
    }
    if !spec.python_packages.is_empty() {
        let pkgs: Vec<String> = spec.python_packages.iter().map(|p| sh_quote(p)).collect();
        steps.push(BuildStep::Run(format!(
            "python3 -m pip install --no-cache-dir {}",
            pkgs.join(" ")
        )));
    }
    if !spec.dockerfile.is_empty() {
        steps.extend(crate::dockerfile::parse(&spec.dockerfile)?.steps);
    }
    steps.push(BuildStep::Run("mkdir -p /workspace /output /data".into()));
    steps.push(BuildStep::Workdir("/workspace".into()));
    Ok(steps)
}

/// What identifies a build's result: provider, base image, steps and the
/// build context they copy from.
pub fn cache_key(provider: &str, base: &str, steps: &[BuildStep], context: &str) -> String {
    let mut h = Sha256::new();
    h.update(context.as_bytes());
    h.update([0]);
    h.update(provider.as_bytes());
    h.update([0]);
    h.update(base.as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(steps).unwrap_or_default());
    hex::encode(h.finalize())
}

fn step_text(s: &BuildStep) -> String {
    match s {
        BuildStep::Run(c) => format!("RUN {c}"),
        BuildStep::Env(k, v) => format!("ENV {k}={v}"),
        BuildStep::Workdir(d) => format!("WORKDIR {d}"),
        BuildStep::Copy { sources, dest } => {
            let s: Vec<&str> = sources
                .iter()
                .map(|s| if s.is_empty() { "." } else { s.as_str() })
                .collect();
            format!("COPY {} {dest}", s.join(" "))
        }
    }
}

fn new_build_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// How a build ended, when it did not succeed.
enum Stop {
    Canceled,
    Failed(String),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Failed(e.to_string())
    }
}

impl Caller {
    fn sees_build(&self, r: &BuildRecord) -> bool {
        self.sees_owned(&r.tenant_id, &r.owner_id)
    }
}

impl Manager {
    async fn find_build(&self, id: &str, caller: &Caller) -> Result<BuildRecord> {
        match self.store.get_build(id).await {
            Ok(r) if caller.sees_build(&r) => Ok(r),
            Ok(_) => Err(Error::not_found(format!("build {id:?}"))),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Err(Error::not_found(format!("build {id:?}")))
            }
            Err(e) => Err(e),
        }
    }

    /// The record as it is now: a running build's log is the live one.
    fn current(&self, mut r: BuildRecord) -> BuildRecord {
        if let Some(live) = self.builds.live.lock().get(&r.id).cloned() {
            if !is_final(&r.status) {
                r.log = live.text();
            }
        }
        r
    }

    /// Resolves a target to an artifact to make (a registry connection of
    /// the spec's owner for pushes).
    async fn plan_artifact(
        &self,
        target: &str,
        spec: &EnvironmentSpecRecord,
        tag: &str,
        caller: &Caller,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<ArtifactRecord> {
        let target = target.trim();
        let mut a = ArtifactRecord {
            target: "local".into(),
            connection_id: String::new(),
            image_ref: format!("local/stacyvm-env:{tag}"),
            digest: String::new(),
            status: "pending".into(),
            error: String::new(),
            created_at: now,
            updated_at: now,
        };
        if target == "local" {
            return Ok(a);
        }
        let by_id = target.starts_with("rc-");
        if !by_id && !TARGET_KINDS.contains(&target) {
            return Err(Error::invalid(format!(
                "invalid target {target:?} (allowed: local, ghcr, dockerhub, registry, or a registry connection id)"
            )));
        }
        let tenant = (!caller.sees_all_tenants()).then_some(caller.tenant_id.as_str());
        let conns: Vec<_> = self
            .store
            .list_registry_connections(tenant)
            .await?
            .into_iter()
            .filter(|c| caller.sees_owned(&c.tenant_id, &c.owner_id))
            .filter(|c| {
                if by_id {
                    c.id == target
                } else {
                    c.provider == target && c.owner_id == spec.owner_id
                }
            })
            .collect();
        let conn = match conns.as_slice() {
            [] if by_id => return Err(Error::not_found(format!("registry connection {target:?}"))),
            [] => {
                return Err(Error::invalid(format!(
                    "target {target:?}: {} has no {target} registry connection (POST /environments/registry-connections)",
                    spec.owner_id
                )))
            }
            [one] => one.clone(),
            many => match many.iter().find(|c| c.is_default) {
                Some(d) => d.clone(),
                None => {
                    return Err(Error::invalid(format!(
                        "target {target:?}: {} connections and none is the default; name one by id",
                        many.len()
                    )))
                }
            },
        };
        a.target = conn.provider.clone();
        a.connection_id = conn.id.clone();
        a.image_ref = format!("{}/{}/stacyvm-env:{tag}", conn.host, conn.username);
        Ok(a)
    }

    /// `POST /environments/builds`: queues a build of a spec.
    pub async fn create_build(
        self: &Arc<Self>,
        req: CreateBuild,
        caller: &Caller,
    ) -> Result<Build> {
        if req.spec_id.trim().is_empty() {
            return Err(Error::invalid("spec_id is required"));
        }
        let spec = self.find_spec(req.spec_id.trim(), caller).await?;
        // Building for the spec's owner is acting for them.
        caller.owner_for(&spec.owner_id)?;
        let provider_name = if req.provider.trim().is_empty() {
            self.registry.default_name().to_string()
        } else {
            req.provider.trim().to_string()
        };
        let provider = self.registry.get(&provider_name)?;
        let caps = provider.capabilities();
        if !caps.iter().any(|c| c == capability::IMAGE_BUILD) {
            return Err(Error::invalid(format!(
                "provider {provider_name} cannot build images (providers that can: native, docker, qemu, firecracker)"
            )));
        }
        let mut targets: Vec<String> = req
            .targets
            .iter()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        if targets.len() > 8 {
            return Err(Error::invalid("at most 8 targets"));
        }
        targets.retain(|t| t != "local");
        targets.insert(0, "local".into());
        targets.dedup();
        let unfinished = self
            .store
            .unfinished_builds()
            .await?
            .iter()
            .filter(|b| b.owner_id == spec.owner_id && b.tenant_id == spec.tenant_id)
            .count();
        if unfinished >= MAX_OWNER_BUILDS {
            return Err(Error::limit(format!(
                "{} has {unfinished} builds queued or running (at most {MAX_OWNER_BUILDS}); wait for one or cancel it",
                spec.owner_id
            )));
        }
        let id = new_build_id();
        let tag = build_tag(&spec.name, &id);
        let now = crate::store::record_now();
        let mut artifacts = Vec::new();
        for t in &targets {
            let a = self.plan_artifact(t, &spec, &tag, caller, now).await?;
            if !artifacts
                .iter()
                .any(|b: &ArtifactRecord| b.image_ref == a.image_ref)
            {
                artifacts.push(a);
            }
        }
        if artifacts.len() > 1 && !caps.iter().any(|c| c == capability::IMAGE_PUSH) {
            return Err(Error::invalid(format!(
                "provider {provider_name} cannot push images to registries; build with target local only"
            )));
        }
        let rec = BuildRecord {
            id: id.clone(),
            spec_id: spec.id.clone(),
            owner_id: spec.owner_id.clone(),
            tenant_id: spec.tenant_id.clone(),
            provider: provider_name.clone(),
            builder: String::new(),
            status: "queued".into(),
            current_step: "queued".into(),
            log: "build queued\n".into(),
            image_size_bytes: 0,
            digest_local: String::new(),
            error: String::new(),
            artifacts,
            created_at: now,
            finished_at: None,
            updated_at: now,
        };
        self.store.insert_build(&rec).await?;
        let queue = self.build_queue();
        if queue.try_send(id.clone()).is_err() {
            let mut failed = rec.clone();
            failed.status = "failed".into();
            failed.error = format!("the build queue is full ({QUEUE_CAPACITY} builds)");
            failed.finished_at = Some(crate::store::record_now());
            let _ = self.store.update_build(&failed).await;
            return Err(Error::limit(failed.error));
        }
        self.audit(
            caller,
            &rec.owner_id,
            "environment.build",
            "",
            &rec.id,
            &provider_name,
            true,
            format!(
                "spec={} targets={}",
                spec.id,
                rec.artifacts
                    .iter()
                    .map(|a| a.image_ref.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        );
        Ok(view(&rec))
    }

    /// `GET /environments/builds[?owner_id=&limit=]`, newest first, with
    /// their specs.
    pub async fn list_builds(
        &self,
        owner: Option<&str>,
        limit: usize,
        caller: &Caller,
    ) -> Result<Vec<BuildEntry>> {
        if !(1..=200).contains(&limit) {
            return Err(Error::invalid("limit must be between 1 and 200"));
        }
        let tenant = (!caller.sees_all_tenants()).then_some(caller.tenant_id.as_str());
        let mut specs: HashMap<String, Option<EnvironmentSpec>> = HashMap::new();
        let mut out = Vec::new();
        // Filtering after the store's limit would return fewer than asked;
        // the store's page is the most a caller can see anyway.
        for r in self.store.list_builds(tenant, 1000).await? {
            if out.len() >= limit {
                break;
            }
            if !caller.sees_build(&r) || owner.is_some_and(|o| !o.is_empty() && r.owner_id != o) {
                continue;
            }
            if !specs.contains_key(&r.spec_id) {
                let spec = self
                    .store
                    .get_environment_spec(&r.spec_id)
                    .await
                    .ok()
                    .map(|s| super::environments::view(&s));
                specs.insert(r.spec_id.clone(), spec);
            }
            if let Some(Some(spec)) = specs.get(&r.spec_id) {
                out.push(BuildEntry {
                    build: view(&self.current(r)),
                    spec: spec.clone(),
                });
            }
        }
        Ok(out)
    }

    /// `GET /environments/builds/{id}`.
    pub async fn get_build(&self, id: &str, caller: &Caller) -> Result<Build> {
        let r = self.find_build(id, caller).await?;
        Ok(view(&self.current(r)))
    }

    /// `POST /environments/builds/{id}/cancel`: stops a queued or running
    /// build (its sandbox destroyed, the engine's build closed) and
    /// returns it once it has stopped.
    pub async fn cancel_build(&self, id: &str, caller: &Caller) -> Result<Build> {
        let r = self.find_build(id, caller).await?;
        caller.owner_for(&r.owner_id)?;
        let live = {
            let _g = self.builds.gate.lock().await;
            let r = self.store.get_build(&r.id).await?;
            if is_final(&r.status) {
                return Err(Error::conflict("build already finalized"));
            }
            let live = self.builds.live.lock().get(&r.id).cloned();
            match live {
                Some(live) => live,
                None => {
                    let mut r = r;
                    r.status = "canceled".into();
                    r.current_step = "canceled".into();
                    r.error = "build canceled by user".into();
                    r.log.push_str("build canceled by user\n");
                    r.finished_at = Some(crate::store::record_now());
                    r.updated_at = crate::store::record_now();
                    for a in &mut r.artifacts {
                        a.status = "failed".into();
                        a.error = "build canceled".into();
                    }
                    self.store.update_build(&r).await?;
                    self.audit_cancel(caller, &r);
                    return Ok(view(&r));
                }
            }
        };
        live.cancel.cancel();
        let mut done = live.finished.subscribe();
        let stopped =
            tokio::time::timeout(Duration::from_secs(60), done.wait_for(|finished| *finished))
                .await
                .is_ok();
        if !stopped {
            warn!(build_id = %r.id, "a canceled build has not stopped within 60 s");
        }
        let r = self.store.get_build(&r.id).await?;
        self.audit_cancel(caller, &r);
        Ok(view(&self.current(r)))
    }

    fn audit_cancel(&self, caller: &Caller, r: &BuildRecord) {
        self.audit(
            caller,
            &r.owner_id,
            "environment.build_cancel",
            "",
            &r.id,
            &r.provider,
            true,
            format!("status={}", r.status),
        );
    }

    /// `GET /environments/builds/{id}/spawn-config`.
    pub async fn build_spawn_config(&self, id: &str, caller: &Caller) -> Result<BuildSpawnConfig> {
        let r = self.find_build(id, caller).await?;
        if r.artifacts.is_empty() {
            return Err(Error::not_found("no artifacts found for build"));
        }
        let pick = ["local", "ghcr", "dockerhub", "registry"]
            .iter()
            .find_map(|t| {
                r.artifacts
                    .iter()
                    .find(|a| a.target == *t && a.status == "ready")
            })
            .unwrap_or(&r.artifacts[0]);
        Ok(BuildSpawnConfig {
            build_id: r.id.clone(),
            build_status: r.status.clone(),
            digest: pick.digest.clone(),
            image: pick.image_ref.clone(),
            note: "use exact image value in spawn request; do not rewrite image ref".into(),
            provider: r.provider.clone(),
            ready: pick.status == "ready",
            target: pick.target.clone(),
        })
    }

    /// `GET /environments/builds/{id}/logs[?offset=N&follow=1]`: the log
    /// from byte `offset`; with `follow`, what comes until the build ends.
    pub async fn build_logs(
        self: &Arc<Self>,
        id: &str,
        offset: u64,
        follow: bool,
        caller: &Caller,
    ) -> Result<mpsc::Receiver<Result<Vec<u8>>>> {
        let r = self.find_build(id, caller).await?;
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        let id = r.id.clone();
        tokio::spawn(async move {
            let mut off = usize::try_from(offset).unwrap_or(usize::MAX);
            loop {
                let live = me.builds.live.lock().get(&id).cloned();
                let (chunk, finished, mut changes) = match &live {
                    Some(l) => {
                        let changes = l.version.subscribe();
                        let log = l.log.lock();
                        let chunk = log.get(off..).map(<[u8]>::to_vec).unwrap_or_default();
                        (chunk, false, Some(changes))
                    }
                    None => match me.store.get_build(&id).await {
                        Ok(r) => {
                            let bytes = r.log.into_bytes();
                            let chunk = bytes.get(off..).map(<[u8]>::to_vec).unwrap_or_default();
                            (chunk, is_final(&r.status), None)
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    },
                };
                off = off.saturating_add(chunk.len());
                if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                if !follow || finished {
                    return;
                }
                // Wait for more output, the end, or a client that left.
                let wait = async {
                    match &mut changes {
                        Some(c) => {
                            let _ = c.changed().await;
                        }
                        None => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                };
                tokio::select! {
                    _ = wait => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    /// The queue's sender, starting the worker (and recovering what a
    /// stopped server left) the first time.
    fn build_queue(self: &Arc<Self>) -> mpsc::Sender<String> {
        let mut q = self.builds.queue.lock();
        if let Some(tx) = q.as_ref() {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        *q = Some(tx.clone());
        let me = self.clone();
        let requeue = tx.clone();
        tokio::spawn(async move {
            me.recover_builds(&requeue).await;
            me.build_worker(rx).await;
        });
        tx
    }

    /// Starts the build worker (at server start: builds a stopped server
    /// left are settled at once).
    pub fn start_builds(self: &Arc<Self>) {
        let _ = self.build_queue();
    }

    async fn recover_builds(&self, queue: &mpsc::Sender<String>) {
        let unfinished = match self.store.unfinished_builds().await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "listing unfinished builds failed");
                return;
            }
        };
        let now = crate::store::record_now();
        for mut r in unfinished {
            if self.builds.live.lock().contains_key(&r.id) {
                continue;
            }
            // Another control plane of the cluster runs it (its log was
            // saved within the last minute); ours ran it before a restart.
            if r.status == "building"
                && r.builder != self.worker_id()
                && now - r.updated_at < chrono::Duration::seconds(60)
            {
                continue;
            }
            if r.status == "queued" {
                // Requeued unless the queue already has it (a build
                // created before the worker started).
                let _ = queue.try_send(r.id.clone());
                continue;
            }
            r.status = "failed".into();
            r.error = "the server stopped during the build; start it again".into();
            r.log
                .push_str("error: the server stopped during the build; start it again\n");
            r.finished_at = Some(crate::store::record_now());
            r.updated_at = crate::store::record_now();
            for a in &mut r.artifacts {
                if a.status == "pending" {
                    a.status = "failed".into();
                    a.error = "build interrupted".into();
                }
            }
            if let Err(e) = self.store.update_build(&r).await {
                warn!(build_id = %r.id, error = %e, "settling an interrupted build failed");
            }
        }
        // Sandboxes of builds that are over (or gone).
        let candidates: Vec<_> = self
            .cache
            .read()
            .values()
            .filter(|s| {
                s.metadata
                    .get(BUILD_KEY)
                    .is_some_and(|b| !self.builds.live.lock().contains_key(b))
            })
            .cloned()
            .collect();
        let mut leftovers = Vec::new();
        for s in candidates {
            let build = s.metadata.get(BUILD_KEY).cloned().unwrap_or_default();
            let over = match self.store.get_build(&build).await {
                Ok(b) => is_final(&b.status),
                Err(e) => e.kind() == ErrorKind::NotFound,
            };
            if over {
                leftovers.push(s);
            }
        }
        let system = Caller {
            actor: "system:build".into(),
            ..Caller::default()
        };
        for s in leftovers {
            if let Err(e) = self.destroy_record(&s, &system).await {
                warn!(sandbox_id = %s.id, error = %e, "removing an interrupted build's sandbox failed");
            }
        }
    }

    async fn build_worker(self: Arc<Self>, mut rx: mpsc::Receiver<String>) {
        while let Some(id) = rx.recv().await {
            let started = {
                let _g = self.builds.gate.lock().await;
                // The claim is atomic in the store: in a cluster, one
                // control plane runs a queued build.
                let claimed = self
                    .store
                    .claim_build(&id, self.worker_id(), crate::store::record_now())
                    .await;
                match claimed {
                    Ok(true) => match self.store.get_build(&id).await {
                        Ok(r) => {
                            let live = Live::new();
                            self.builds.live.lock().insert(id.clone(), live.clone());
                            Some((r, live))
                        }
                        Err(e) => {
                            warn!(build_id = %id, error = %e, "reading a claimed build failed");
                            None
                        }
                    },
                    Ok(false) => None,
                    Err(e) => {
                        warn!(build_id = %id, error = %e, "claiming a queued build failed");
                        None
                    }
                }
            };
            let Some((rec, live)) = started else {
                continue;
            };
            self.run_build(rec, live.clone()).await;
            self.builds.live.lock().remove(&id);
            live.finished.send_replace(true);
            // Followers of the log look again: the record is final now.
            live.version.send_modify(|v| *v += 1);
        }
    }

    /// Saves the record with the live log.
    async fn save_build(&self, r: &mut BuildRecord, live: &Live) {
        r.log = live.text();
        r.updated_at = crate::store::record_now();
        // A cancel through another control plane of the cluster is in the
        // store only: it wins over what this one was about to write.
        if let Ok(cur) = self.store.get_build(&r.id).await {
            if cur.status == "canceled" && r.status != "canceled" {
                live.cancel.cancel();
                if !is_final(&r.status) {
                    return;
                }
                r.status = "canceled".into();
                r.current_step = "canceled".into();
                r.error = "build canceled by user".into();
            }
        }
        if let Err(e) = self.store.update_build(r).await {
            warn!(build_id = %r.id, error = %e, "saving a build failed");
        }
    }

    async fn set_step(&self, r: &mut BuildRecord, live: &Live, step: &str) {
        live.line(&format!("==> {step}"));
        r.current_step = step.to_string();
        self.save_build(r, live).await;
    }

    async fn run_build(&self, mut r: BuildRecord, live: Arc<Live>) {
        live.append(r.log.as_bytes());
        r.status = "building".into();
        let outcome = {
            // The log is saved every few seconds while the build runs.
            let saver = {
                let live = live.clone();
                let store = self.store.clone();
                let id = r.id.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(SAVE_EVERY).await;
                        // A fresh time with the log: how other servers tell
                        // a running build from one whose server died.
                        match store
                            .save_build_log(&id, &live.text(), crate::store::record_now())
                            .await
                        {
                            // Canceled through another control plane of
                            // the cluster: stop here too.
                            Ok(s) if s == "canceled" => {
                                live.cancel.cancel();
                                return;
                            }
                            Ok(s) if is_final(&s) => return,
                            _ => {}
                        }
                    }
                })
            };
            let res = self.build_steps(&mut r, &live).await;
            saver.abort();
            res
        };
        let now = crate::store::record_now();
        match outcome {
            Ok(()) => {
                r.status = if r.artifacts.iter().all(|a| a.status == "ready") {
                    "ready".into()
                } else {
                    "failed".into()
                };
                if r.status == "failed" {
                    let failed: Vec<String> = r
                        .artifacts
                        .iter()
                        .filter(|a| a.status != "ready")
                        .map(|a| format!("{}: {}", a.image_ref, a.error))
                        .collect();
                    r.error = format!("pushing failed: {}", failed.join("; "));
                    live.line(&format!("error: {}", r.error));
                } else {
                    live.line("build ready");
                }
                r.current_step = "finalize".into();
            }
            Err(Stop::Canceled) => {
                r.status = "canceled".into();
                r.current_step = "canceled".into();
                r.error = "build canceled by user".into();
                live.line("build canceled by user");
            }
            Err(Stop::Failed(e)) => {
                r.status = "failed".into();
                r.error = e.clone();
                live.line(&format!("error: {e}"));
            }
        }
        for a in &mut r.artifacts {
            if a.status == "pending" {
                a.status = "failed".into();
                a.error = if r.status == "canceled" {
                    "build canceled".into()
                } else {
                    "build failed".into()
                };
                a.updated_at = now;
            }
        }
        r.finished_at = Some(now);
        self.save_build(&mut r, &live).await;
    }

    async fn build_steps(&self, r: &mut BuildRecord, live: &Arc<Live>) -> Result<(), Stop> {
        self.set_step(r, live, "validate_spec").await;
        let spec = self
            .store
            .get_environment_spec(&r.spec_id)
            .await
            .map_err(|e| Stop::Failed(format!("reading the spec: {e}")))?;
        let provider = self.registry.get(&r.provider)?;
        let steps = plan_steps(&spec)?;
        if steps.iter().any(|s| matches!(s, BuildStep::Copy { .. }))
            && !self.context_file(&spec.id).is_file()
        {
            return Err(Stop::Failed(
                "the dockerfile COPYs from the build context and none was uploaded (PUT /environments/specs/{id}/context)".into(),
            ));
        }
        let local = r
            .artifacts
            .iter()
            .find(|a| a.target == "local")
            .map(|a| a.image_ref.clone())
            .unwrap_or_default();
        let plan = ImageBuild {
            build_id: r.id.clone(),
            base_image: spec.base_image.clone(),
            cache_key: cache_key(&r.provider, &spec.base_image, &steps, &spec.context_sha256),
            steps,
            name: local,
        };
        live.line(&format!(
            "provider {}, base image {}, {} steps",
            r.provider,
            plan.base_image,
            plan.steps.len()
        ));
        let built = match provider.cached_image(&plan).await? {
            Some(img) => {
                live.line(&format!(
                    "reusing {} (built earlier from the same steps on the same base)",
                    img.digest
                ));
                img
            }
            None => self.build_image(r, live, &provider, &plan).await?,
        };
        if live.cancel.is_cancelled() {
            return Err(Stop::Canceled);
        }
        let now = crate::store::record_now();
        r.digest_local = built.digest.clone();
        r.image_size_bytes = built.size_bytes;
        for a in r.artifacts.iter_mut().filter(|a| a.target == "local") {
            a.status = "ready".into();
            a.image_ref = built.image_ref.clone();
            a.digest = built.digest.clone();
            a.updated_at = now;
        }
        live.line(&format!(
            "image {} ({}, {} MiB)",
            built.image_ref,
            built.digest,
            built.size_bytes >> 20
        ));
        self.push_artifacts(r, live, &provider, &built).await
    }

    async fn build_image(
        &self,
        r: &mut BuildRecord,
        live: &Arc<Live>,
        provider: &Arc<dyn Provider>,
        plan: &ImageBuild,
    ) -> Result<BuiltImage, Stop> {
        self.set_step(r, live, "build").await;
        if let Some(img) = provider
            .build_image(plan, live.sink(), live.cancel.clone())
            .await
            .map_err(|e| {
                if live.cancel.is_cancelled() {
                    Stop::Canceled
                } else {
                    Stop::from(e)
                }
            })?
        {
            return Ok(img);
        }
        // No builder of its own: the steps run in a sandbox.
        let caller = Caller {
            owner_id: r.owner_id.clone(),
            tenant_id: r.tenant_id.clone(),
            actor: format!("build:{}", r.id),
            request_id: String::new(),
            scope: Scope::Owner,
            names_owners: false,
        };
        let req = SpawnRequest {
            image: plan.base_image.clone(),
            provider: r.provider.clone(),
            network_mode: "bridge".into(),
            ttl: "2h".into(),
            memory_mb: 2048,
            vcpus: 2,
            metadata: Some(BTreeMap::from([(BUILD_KEY.to_string(), r.id.clone())])),
            ..SpawnRequest::default()
        };
        let sb = tokio::select! {
            res = self.spawn_as(req, &caller, None) => res.map_err(|e| Stop::Failed(format!("starting the build sandbox: {e}")))?,
            _ = live.cancel.cancelled() => return Err(Stop::Canceled),
        };
        live.line(&format!("build sandbox {} from {}", sb.id, plan.base_image));
        let res = self
            .run_steps(
                r,
                live,
                provider,
                &sb.id,
                plan,
                &self.context_file(&r.spec_id),
            )
            .await;
        let res = match res {
            Ok(()) => {
                self.set_step(r, live, "commit").await;
                let rec = self.cache.read().get(&sb.id).cloned();
                match rec {
                    Some(rec) => {
                        let target = rec.runtime_id().to_string();
                        provider
                            .commit_image(&target, plan)
                            .await
                            .map_err(Stop::from)
                    }
                    None => Err(Stop::Failed(format!("the build sandbox {} is gone", sb.id))),
                }
            }
            Err(e) => Err(e),
        };
        let system = Caller {
            actor: format!("build:{}", r.id),
            ..Caller::default()
        };
        let rec = self.cache.read().get(&sb.id).cloned();
        if let Some(rec) = rec {
            if let Err(e) = self.destroy_record(&rec, &system).await {
                warn!(sandbox_id = %sb.id, error = %e, "removing a build sandbox failed");
            }
        }
        res
    }

    async fn run_steps(
        &self,
        r: &mut BuildRecord,
        live: &Arc<Live>,
        provider: &Arc<dyn Provider>,
        sandbox: &str,
        plan: &ImageBuild,
        context: &std::path::Path,
    ) -> Result<(), Stop> {
        let rec = self
            .cache
            .read()
            .get(sandbox)
            .cloned()
            .ok_or_else(|| Stop::Failed(format!("the build sandbox {sandbox} is gone")))?;
        let target = rec.runtime_id().to_string();
        let mut env: BTreeMap<String, String> = BTreeMap::from([(
            "PATH".to_string(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        )]);
        env.insert("HOME".into(), "/root".into());
        let mut workdir = "/".to_string();
        let total = plan.steps.len();
        for (i, step) in plan.steps.iter().enumerate() {
            let name = format!("step {}/{total}: {}", i + 1, step_text(step));
            self.set_step(r, live, &name).await;
            let cmd = match step {
                BuildStep::Env(k, v) => {
                    env.insert(k.clone(), v.clone());
                    continue;
                }
                BuildStep::Workdir(d) => {
                    workdir = d.clone();
                    format!("mkdir -p {}", sh_quote(d))
                }
                BuildStep::Run(c) => c.clone(),
                BuildStep::Copy { sources, dest } => {
                    let to_dir = sources.len() > 1 || dest.ends_with('/') || dest.ends_with("/.");
                    for source in sources {
                        let (dir, entries) = tokio::select! {
                            res = self.copy_in(provider, &target, context, source, dest, to_dir, &env) => res.map_err(|e| Stop::Failed(format!("{name}: {e}")))?,
                            _ = live.cancel.cancelled() => return Err(Stop::Canceled),
                        };
                        live.line(&format!("copied {entries} entries into {dir}"));
                    }
                    continue;
                }
            };
            let spec = ExecSpec {
                argv: vec!["/bin/sh".into(), "-c".into(), cmd],
                env: env.clone(),
                workdir: if matches!(step, BuildStep::Workdir(_)) {
                    "/".into()
                } else {
                    workdir.clone()
                },
                timeout: Some(STEP_TIMEOUT),
                ..ExecSpec::default()
            };
            let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
            let pump = {
                let live = live.clone();
                tokio::spawn(async move {
                    while let Some(c) = rx.recv().await {
                        live.append(&c.data);
                    }
                })
            };
            let res = tokio::select! {
                res = provider.exec(&target, &spec, tx) => res,
                _ = live.cancel.cancelled() => {
                    pump.abort();
                    return Err(Stop::Canceled);
                }
            };
            let _ = pump.await;
            let status = res.map_err(|e| Stop::Failed(format!("{name}: {e}")))?;
            if status.code != 0 {
                return Err(Stop::Failed(format!(
                    "{name} exited with code {}",
                    status.code
                )));
            }
        }
        Ok(())
    }

    /// One `COPY` source: its entries of the context extracted in the
    /// sandbox (links kept as links, never followed).
    #[allow(clippy::too_many_arguments)]
    async fn copy_in(
        &self,
        provider: &Arc<dyn Provider>,
        target: &str,
        context: &std::path::Path,
        source: &str,
        dest: &str,
        to_dir: bool,
        env: &BTreeMap<String, String>,
    ) -> Result<(String, u64)> {
        let out = context.with_extension(format!(
            "copy-{}.tar",
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let (ctx, src, dst, o) = (
            context.to_path_buf(),
            source.to_string(),
            dest.to_string(),
            out.clone(),
        );
        let sel = tokio::task::spawn_blocking(move || {
            super::context::select(&ctx, &src, &dst, to_dir, &o)
        })
        .await
        .map_err(|e| Error::internal(format!("context selection: {e}")))?;
        let res = async {
            let sel = sel?;
            let mkdir = ExecSpec {
                argv: vec!["/bin/mkdir".into(), "-p".into(), sel.dir.clone()],
                env: env.clone(),
                workdir: "/".into(),
                timeout: Some(Duration::from_secs(60)),
                ..ExecSpec::default()
            };
            let (tx, _rx) = mpsc::channel::<OutputChunk>(8);
            let st = provider.exec(target, &mkdir, tx).await?;
            if st.code != 0 {
                return Err(Error::invalid(format!(
                    "COPY: cannot create {} in the image",
                    sel.dir
                )));
            }
            let (tx, rx) = mpsc::channel::<Vec<u8>>(4);
            let file = sel.tar.clone();
            let feeder = tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let Ok(mut f) = tokio::fs::File::open(&file).await else {
                    return;
                };
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = f.read(&mut buf).await {
                    if n == 0 || tx.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            });
            let report = provider
                .archive_write(
                    target,
                    &sel.dir,
                    rx,
                    crate::provider::ArchiveLimits {
                        max_bytes: super::context::MAX_BYTES,
                        max_entries: super::context::MAX_ENTRIES,
                    },
                )
                .await;
            feeder.abort();
            report.map(|_| (sel.dir.clone(), sel.entries))
        }
        .await;
        let _ = std::fs::remove_file(&out);
        res
    }

    async fn push_artifacts(
        &self,
        r: &mut BuildRecord,
        live: &Arc<Live>,
        provider: &Arc<dyn Provider>,
        built: &BuiltImage,
    ) -> Result<(), Stop> {
        let pushes: Vec<usize> = (0..r.artifacts.len())
            .filter(|i| r.artifacts[*i].target != "local")
            .collect();
        if pushes.is_empty() {
            return Ok(());
        }
        self.set_step(r, live, "push").await;
        let conns = self
            .store
            .list_registry_connections(Some(r.tenant_id.as_str()))
            .await?;
        for i in pushes {
            if live.cancel.is_cancelled() {
                return Err(Stop::Canceled);
            }
            let a = r.artifacts[i].clone();
            let res: Result<String> = async {
                let conn = conns
                    .iter()
                    .find(|c| c.id == a.connection_id)
                    .ok_or_else(|| {
                        Error::not_found(format!(
                            "registry connection {} was deleted",
                            a.connection_id
                        ))
                    })?;
                let password = self.secrets().resolve(&conn.secret_ref).map_err(|_| {
                    Error::invalid(format!(
                        "the secret {} of registry connection {} is not set on the server",
                        conn.secret_ref, conn.id
                    ))
                })?;
                let auth = RegistryAuth {
                    host: conn.host.clone(),
                    username: conn.username.clone(),
                    password,
                };
                live.line(&format!("pushing {} to {}", built.image_ref, a.image_ref));
                tokio::select! {
                    res = provider.push_image(&built.image_ref, &a.image_ref, &auth, live.sink()) => res,
                    _ = live.cancel.cancelled() => Err(Error::unavailable("canceled")),
                }
            }
            .await;
            if live.cancel.is_cancelled() {
                return Err(Stop::Canceled);
            }
            let now = crate::store::record_now();
            let art = &mut r.artifacts[i];
            art.updated_at = now;
            match res {
                Ok(digest) => {
                    live.line(&format!("pushed {} ({digest})", art.image_ref));
                    art.status = "ready".into();
                    art.digest = digest;
                }
                Err(e) => {
                    live.line(&format!("pushing {} failed: {e}", art.image_ref));
                    art.status = "failed".into();
                    art.error = e.to_string();
                }
            }
            self.save_build(r, live).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(apt: &[&str], pip: &[&str], py: &str) -> EnvironmentSpecRecord {
        let now = chrono::Utc::now();
        EnvironmentSpecRecord {
            id: "es-1".into(),
            owner_id: "alice".into(),
            tenant_id: String::new(),
            name: "Web App!".into(),
            base_image: "debian:bookworm".into(),
            python_packages: pip.iter().map(|s| s.to_string()).collect(),
            apt_packages: apt.iter().map(|s| s.to_string()).collect(),
            python_version: py.into(),
            dockerfile: String::new(),
            context_sha256: String::new(),
            created_at: now,
            updated_at: now,
        }
    }

    #[test]
    fn tags_are_sanitised_and_short() {
        assert_eq!(
            build_tag("Web App!", "0123abcd-ef01-2345-6789-abcdef012345"),
            "web-app-0123abcd"
        );
        assert_eq!(build_tag("///", "deadbeef-0000"), "env-deadbeef");
        assert_eq!(
            build_tag(&"x".repeat(40), "12345678"),
            format!("{}-12345678", "x".repeat(24))
        );
    }

    #[test]
    fn package_names_reach_the_shell_quoted() {
        let steps = plan_steps(&spec(&["curl"], &["requests>=2", "numpy<2"], "")).expect("steps");
        let runs: Vec<&str> = steps
            .iter()
            .filter_map(|s| match s {
                BuildStep::Run(c) => Some(c.as_str()),
                _ => None,
            })
            .collect();
        assert!(runs[0].contains("install -y --no-install-recommends 'curl'"));
        assert!(runs[1].ends_with("'requests>=2' 'numpy<2'"), "{}", runs[1]);
        assert_eq!(steps.last(), Some(&BuildStep::Workdir("/workspace".into())));
    }

    #[test]
    fn cache_keys_change_with_every_input() {
        let a = plan_steps(&spec(&["curl"], &[], "")).expect("steps");
        let b = plan_steps(&spec(&["curl", "git"], &[], "")).expect("steps");
        let k = cache_key("native", "debian:bookworm", &a, "");
        assert_eq!(k, cache_key("native", "debian:bookworm", &a, ""));
        assert_ne!(k, cache_key("native", "debian:bookworm", &a, "ctx1"));
        assert_ne!(k, cache_key("native", "debian:bookworm", &b, ""));
        assert_ne!(k, cache_key("docker", "debian:bookworm", &a, ""));
        assert_ne!(k, cache_key("native", "debian:trixie", &a, ""));
    }

    #[test]
    fn the_log_is_bounded_and_says_so() {
        let live = Live::new();
        live.line("start");
        live.append(&vec![b'x'; MAX_LOG_BYTES]);
        live.append(b"\xff tail");
        let t = live.text();
        assert!(t.starts_with("start\n"));
        assert!(t.len() < MAX_LOG_BYTES + 200);
        assert!(
            t.contains("more bytes of output not kept"),
            "{}",
            &t[t.len() - 120..]
        );
    }
}
