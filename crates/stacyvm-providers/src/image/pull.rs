//! Getting images into the native image store without a tarball at hand:
//! pulling from an OCI registry (`oci-client`) and exporting from the local
//! Docker engine (Engine API `GET /images/{name}/get`, a `docker save`
//! stream).
//!
//! Both end in the same unpack step as `stacyvm image import`, so an image
//! has the same id (the sha256 of its config) however it arrived.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use stacyvm_core::{Error, ErrorKind, Result};
use tokio::io::AsyncWrite;

use super::import::{self, ImageRecord, Progress};
use super::store::ImageStore;

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Plain HTTP (loopback registries always use it, as Docker does).
    pub insecure: bool,
    /// Basic auth; anonymous when `None`.
    pub credentials: Option<(String, String)>,
    /// Extra local name for the image.
    pub name: Option<String>,
}

/// A scratch dir under the image store, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(store: &ImageStore, what: &str) -> Result<Scratch> {
        let dir =
            store
                .rootfs_dir()
                .join(format!(".{what}-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::internal("creating a download dir").with_source(e))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{n:08x}")
}

/// Counts bytes written through it and reports them.
struct Counting<'p, W> {
    inner: W,
    done: u64,
    base: u64,
    total: u64,
    what: String,
    progress: Progress<'p>,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Counting<'_, W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.done += n as u64;
            (this.progress)(this.base + this.done, this.total, &this.what);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Whether a registry host is on loopback (HTTP like Docker allows).
pub(crate) fn is_loopback_registry(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            registry
        }
    });
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

fn registry_error(reference: &str, e: oci_client::errors::OciDistributionError) -> Error {
    use oci_client::errors::OciDistributionError as E;
    let msg = e.to_string();
    let kind = match &e {
        E::ImageManifestNotFoundError(_) => ErrorKind::NotFound,
        E::AuthenticationFailure(_) | E::UnauthorizedError { .. } => ErrorKind::Forbidden,
        E::RequestError(_) => ErrorKind::ProviderUnavailable,
        _ if [
            "404",
            "manifest unknown",
            "name unknown",
            "manifest_unknown",
        ]
        .iter()
        .any(|m| msg.to_ascii_lowercase().contains(m)) =>
        {
            ErrorKind::NotFound
        }
        _ => ErrorKind::ProviderUnavailable,
    };
    Error::new(kind, format!("{reference}: {msg}"))
}

/// Pulls `reference` (e.g. `localhost:5000/tools/busybox:1`) for
/// linux/amd64 into the store. Layers are downloaded (digests verified)
/// into a scratch dir, then unpacked; progress counts downloaded bytes
/// first, then unpacked bytes.
pub async fn pull_registry(
    store: &ImageStore,
    reference: &str,
    opts: &PullOptions,
    progress: Progress<'_>,
) -> Result<ImageRecord> {
    let name = import::normalize_name(reference)?;
    let r: Reference = name
        .parse()
        .map_err(|e| Error::invalid(format!("invalid image reference {reference:?}: {e}")))?;
    // The distribution spec allows only lowercase repository names.
    if r.repository().bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(Error::invalid(format!(
            "invalid image reference {reference:?}: repository names must be lowercase"
        )));
    }
    let registry = r.resolve_registry().to_string();
    let protocol = if opts.insecure || is_loopback_registry(&registry) {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });
    let auth = match &opts.credentials {
        Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
        None => RegistryAuth::Anonymous,
    };
    progress(0, 0, "manifest");
    let (manifest, _digest, config) = client
        .pull_manifest_and_config(&r, &auth)
        .await
        .map_err(|e| registry_error(reference, e))?;
    let config = config.into_bytes();
    for l in &manifest.layers {
        let ok = [
            manifest::IMAGE_LAYER_MEDIA_TYPE,
            manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE,
            manifest::IMAGE_DOCKER_LAYER_TAR_MEDIA_TYPE,
            manifest::IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE,
        ]
        .contains(&l.media_type.as_str());
        if !ok {
            return Err(Error::unsupported(format!(
                "{reference}: layer media type {} is not supported (tar and tar+gzip are)",
                l.media_type
            )));
        }
    }
    let scratch = Scratch::new(store, "pull")?;
    let total: u64 = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
    let mut files = Vec::new();
    let mut base = 0;
    for (i, layer) in manifest.layers.iter().enumerate() {
        let path = scratch.0.join(format!("layer-{i}"));
        let f = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::internal("creating a layer file").with_source(e))?;
        let mut w = Counting {
            inner: f,
            done: 0,
            base,
            total,
            what: format!("pull {}/{}", i + 1, manifest.layers.len()),
            progress: &mut *progress,
        };
        client
            .pull_blob(&r, layer, &mut w)
            .await
            .map_err(|e| registry_error(reference, e))?;
        tokio::io::AsyncWriteExt::flush(&mut w.inner)
            .await
            .map_err(|e| Error::internal("writing a layer").with_source(e))?;
        base += w.done;
        files.push(path);
    }
    let mut names = vec![name.clone()];
    if let Some(extra) = &opts.name {
        names.push(import::normalize_name(extra)?);
    }
    unpack_files(store, &config, &files, names, reference, progress)
}

/// Unpacks downloaded layer files and records the image.
fn unpack_files(
    store: &ImageStore,
    config: &[u8],
    files: &[PathBuf],
    names: Vec<String>,
    source: &str,
    progress: Progress<'_>,
) -> Result<ImageRecord> {
    let id = import::image_id(config);
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .collect();
    let total = sizes.iter().sum();
    let dir = import::unpack(
        &store.rootfs_dir(),
        &id,
        files.len(),
        total,
        &mut |i| {
            let f = std::fs::File::open(&files[i])
                .map_err(|e| Error::internal("opening a layer").with_source(e))?;
            Ok((import::layer_reader(f)?, sizes[i]))
        },
        progress,
    )?;
    store.record(ImageRecord {
        id,
        names,
        layers: files.len(),
        size_bytes: import::dir_size_of(&dir),
        imported_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        source: source.to_string(),
        parent: None,
        build_key: None,
    })
}

/// Exports `image` from the local Docker engine (socket from `DOCKER_HOST`
/// or the default) and imports it. Progress counts exported bytes (total
/// unknown), then unpacking.
#[cfg(feature = "docker")]
pub async fn import_from_docker(
    store: &ImageStore,
    image: &str,
    name: Option<&str>,
    progress: Progress<'_>,
) -> Result<ImageRecord> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;

    let docker = bollard::Docker::connect_with_local_defaults()
        .map_err(|e| Error::unavailable(format!("connecting to the Docker engine: {e}")))?;
    docker.ping().await.map_err(|e| {
        Error::unavailable(format!(
            "the Docker engine is not reachable ({e}); start dockerd or set DOCKER_HOST"
        ))
    })?;
    let info = docker.inspect_image(image).await.map_err(|e| match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => Error::not_found(format!(
            "image {image:?} is not in the local Docker engine (docker images lists what it has)"
        )),
        e => Error::unavailable(format!("inspecting {image} in Docker: {e}")),
    })?;
    let total = info.size.unwrap_or(0).max(0) as u64;
    let scratch = Scratch::new(store, "docker")?;
    let archive = scratch.0.join("image.tar");
    let mut f = tokio::fs::File::create(&archive)
        .await
        .map_err(|e| Error::internal("creating the export file").with_source(e))?;
    let mut stream = docker.export_image(image);
    let mut done = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::unavailable(format!("exporting {image} from Docker: {e}")))?;
        f.write_all(&chunk)
            .await
            .map_err(|e| Error::internal("writing the export file").with_source(e))?;
        done += chunk.len() as u64;
        progress(done, total.max(done), "export");
    }
    f.flush()
        .await
        .map_err(|e| Error::internal("writing the export file").with_source(e))?;
    drop(f);
    let extra = match name {
        Some(n) => Some(import::normalize_name(n)?),
        None => Some(import::normalize_name(image)?),
    };
    let mut rec =
        import::import_archive(&archive, &store.rootfs_dir(), extra.as_deref(), progress)?;
    rec.source = format!("docker:{image}");
    store.record(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::import::tests::busybox_image;

    /// Debian's docker-registry on a free loopback port, with filesystem
    /// storage in a temp dir; killed on drop.
    struct Registry {
        child: std::process::Child,
        addr: String,
        _dir: tempfile::TempDir,
    }

    impl Registry {
        fn start() -> Registry {
            let bin = ["/usr/bin/docker-registry", "/usr/bin/registry"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .expect("docker-registry not installed (scripts/test installs Debian's docker-registry)");
            let dir = tempfile::tempdir().expect("tmp");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let addr = format!("127.0.0.1:{port}");
            let cfg = dir.path().join("config.yml");
            std::fs::write(
                &cfg,
                format!(
                    "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                    dir.path().join("data").display()
                ),
            )
            .expect("registry config");
            let child = std::process::Command::new(bin)
                .arg("serve")
                .arg(&cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start docker-registry");
            for _ in 0..200 {
                if std::net::TcpStream::connect(&addr).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            Registry {
                child,
                addr,
                _dir: dir,
            }
        }
    }

    impl Drop for Registry {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn push_busybox(addr: &str, repo_tag: &str) -> Vec<u8> {
        let (config, l1, l2) = busybox_image(repo_tag);
        let client = Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..Default::default()
        });
        let r: Reference = format!("{addr}/{repo_tag}").parse().expect("reference");
        let layers = [
            oci_client::client::ImageLayer::new(l1, manifest::IMAGE_LAYER_MEDIA_TYPE.into(), None),
            oci_client::client::ImageLayer::new(
                l2,
                manifest::IMAGE_LAYER_GZIP_MEDIA_TYPE.into(),
                None,
            ),
        ];
        let cfg = oci_client::client::Config::new(
            config.clone(),
            manifest::IMAGE_CONFIG_MEDIA_TYPE.into(),
            None,
        );
        client
            .push(&r, &layers, cfg, &RegistryAuth::Anonymous, None)
            .await
            .expect("push to the loopback registry");
        config
    }

    /// Push to a real registry on loopback, pull through the store: same
    /// id as the config digest, layers applied with whiteouts, names
    /// recorded, progress reported; then a native sandbox boots from it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pulls_from_a_loopback_registry_and_boots_it() {
        let reg = Registry::start();
        let config = push_busybox(&reg.addr, "tools/busybox:1").await;
        let fx = crate::native::tests::fixture();
        let p = fx.make();
        let mut calls = Vec::new();
        let reference = format!("{}/tools/busybox:1", reg.addr);
        let rec = pull_registry(
            p.images(),
            &reference,
            &PullOptions {
                name: Some("bb".into()),
                ..Default::default()
            },
            &mut |done, total, what| calls.push((done, total, what.to_string())),
        )
        .await
        .expect("pull");
        assert_eq!(rec.id, import::image_id(&config));
        assert_eq!(rec.names, vec![reference.clone(), "bb:latest".to_string()]);
        assert_eq!(rec.layers, 2);
        assert!(
            calls.iter().any(|c| c.2.starts_with("pull 2/2")),
            "{calls:?}"
        );
        assert_eq!(calls.last().map(|c| c.2.as_str()), Some("done"));
        let root = p.images().rootfs_of(&rec);
        assert!(root.join("bin/busybox").is_file());
        assert!(!root.join("gone").exists(), "whiteout applied");
        assert!(root.join("opaque/new").is_file() && !root.join("opaque/sub").exists());
        // No scratch dirs are left behind.
        let scratch: Vec<_> = std::fs::read_dir(p.images().rootfs_dir())
            .expect("rootfs dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.file_name())
            .collect();
        assert!(scratch.is_empty(), "{scratch:?}");

        let spec = stacyvm_core::provider::SpawnSpec {
            id: stacyvm_core::paths::new_sandbox_id(),
            image: "bb".into(),
            memory_mb: 128,
            vcpus: 1,
            metadata: Default::default(),
            owner_id: String::new(),
            tenant_id: String::new(),
            expires_at: chrono::Utc::now() + chrono::Duration::minutes(5),
            network_mode: String::new(),
            snapshot: None,
            egress: None,
            volumes: Vec::new(),
        };
        use stacyvm_core::provider::Provider;
        p.spawn(&spec).await.expect("spawn the pulled image");
        let r = crate::conformance::sh(&p, &spec.id, "cat /etc/os-release; ls /opaque").await;
        assert_eq!(r.stdout, "NAME=stacyvm-test-busybox\nnew\n", "{r:?}");
        p.destroy(&spec.id).await.expect("destroy");
    }

    /// Unknown repositories and tags are not-found errors; unreachable
    /// registries are unavailable; bad names are invalid input. Nothing is
    /// recorded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pull_errors_are_typed() {
        let reg = Registry::start();
        let dir = tempfile::tempdir().expect("tmp");
        let store = ImageStore::new(dir.path().join("images"), &[]).expect("store");
        let opts = PullOptions::default();
        let mut quiet = |_: u64, _: u64, _: &str| {};
        let e = pull_registry(
            &store,
            &format!("{}/none/such:1", reg.addr),
            &opts,
            &mut quiet,
        )
        .await
        .expect_err("unknown repository");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port");
        let e = pull_registry(&store, &format!("{closed}/x/y:1"), &opts, &mut quiet)
            .await
            .expect_err("closed port");
        assert_eq!(e.kind(), ErrorKind::ProviderUnavailable, "{e}");
        for bad in ["bad name", "UPPER/case:1", "x@sha256:nothex", ""] {
            let e = pull_registry(&store, bad, &opts, &mut quiet)
                .await
                .expect_err(bad);
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e}");
        }
        assert!(store.list().is_empty());
    }

    #[test]
    fn loopback_registries_are_recognised() {
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "localhost",
            "[::1]:5000",
        ] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in [
            "docker.io",
            "ghcr.io",
            "registry.local:5000",
            "localhost.evil.com",
        ] {
            assert!(!is_loopback_registry(r), "{r}");
        }
    }

    /// `stacyvm image import --docker`: an image loaded into the real
    /// Docker engine is exported through the Engine API and unpacked with
    /// the same id as the archive; unknown images are not-found errors.
    #[cfg(feature = "docker")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn imports_from_the_local_docker_engine() {
        let dir = tempfile::tempdir().expect("tmp");
        let tag = format!("stacyvm-test/native-export:{}", std::process::id());
        let archive = crate::image::import::tests::busybox_archive(dir.path(), &tag);
        let out = std::process::Command::new("docker")
            .arg("load")
            .arg("-i")
            .arg(&archive)
            .output()
            .expect("docker CLI (scripts/test installs docker.io and starts dockerd)");
        assert!(
            out.status.success(),
            "docker load: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let store = ImageStore::new(dir.path().join("images"), &[]).expect("store");
        let mut calls = 0;
        let rec = import_from_docker(&store, &tag, Some("exported"), &mut |_, _, _| calls += 1)
            .await
            .expect("import from docker");
        let _ = std::process::Command::new("docker")
            .args(["rmi", "-f", &tag])
            .output();
        let (config, _, _) = busybox_image(&tag);
        assert_eq!(rec.id, import::image_id(&config), "same id as the archive");
        assert!(
            rec.names.contains(&tag) && rec.names.contains(&"exported:latest".to_string()),
            "{rec:?}"
        );
        assert_eq!(rec.source, format!("docker:{tag}"));
        assert!(calls > 1);
        let root = store.rootfs_of(&rec);
        assert!(root.join("bin/busybox").is_file() && !root.join("gone").exists());
        let e = import_from_docker(
            &store,
            "stacyvm-test/does-not-exist:1",
            None,
            &mut |_, _, _| {},
        )
        .await
        .expect_err("unknown image");
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    }
}
