//! Command-line interface. Data goes to stdout, diagnostics to stderr.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use comfy_table::{presets, Table};
use stacyvm_api::{ExecRequest, SpawnRequest};
use stacyvm_client::{Client, StreamItem};

#[derive(Debug, Parser)]
#[command(name = "stacyvm", version, about = "StacyVM: disposable sandboxes for agents, code runners and CI", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// Server URL.
    #[arg(
        long,
        global = true,
        env = "STACYVM_URL",
        default_value = "http://localhost:7423",
        alias = "server"
    )]
    pub url: String,
    /// API key sent as X-API-Key.
    #[arg(long, global = true, env = "STACYVM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// An egress policy on the command line (docs/egress.md).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EgressArgs {
    /// Allow connections to an IPv4 address, CIDR block or domain
    /// (`api.example.com`, `*.example.com`); beats --deny-out (repeatable).
    #[arg(long = "allow-out", value_name = "DEST")]
    pub allow_out: Vec<String>,
    /// Deny connections to an IPv4 address or CIDR block (repeatable).
    #[arg(long = "deny-out", value_name = "CIDR")]
    pub deny_out: Vec<String>,
    /// Deny everything --allow-out does not name.
    #[arg(long)]
    pub deny_all: bool,
    /// A resolver the sandbox may query while domain rules apply
    /// (repeatable; default the host's).
    #[arg(long = "dns", value_name = "IPV4")]
    pub dns: Vec<String>,
}

impl EgressArgs {
    /// The policy the flags describe (`None`: no flag given).
    pub fn policy(&self) -> Option<stacyvm_api::NetworkPolicy> {
        let p = stacyvm_api::NetworkPolicy {
            deny_all: self.deny_all,
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
            dns_servers: (!self.dns.is_empty()).then(|| self.dns.clone()),
        };
        (p != stacyvm_api::NetworkPolicy::default()).then_some(p)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the API server.
    Serve {
        /// Config file (default: ./stacyvm.yaml, then ~/.stacyvm/config.yaml).
        #[arg(long, short = 'c', env = "STACYVM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create a sandbox and print its id.
    Spawn {
        #[command(flatten)]
        conn: Conn,
        /// Image (provider specific; native: `host`).
        #[arg(long)]
        image: Option<String>,
        /// Provider name (default: the server's default provider).
        #[arg(long)]
        provider: Option<String>,
        /// Lifetime as a duration, e.g. 30m or 2h.
        #[arg(long)]
        ttl: Option<String>,
        /// Memory limit in MiB.
        #[arg(long)]
        memory: Option<i64>,
        /// Virtual CPUs.
        #[arg(long)]
        vcpus: Option<i64>,
        /// Template to start from.
        #[arg(long)]
        template: Option<String>,
        /// Metadata as KEY=VALUE (repeatable).
        #[arg(long = "meta", value_parser = parse_kv)]
        metadata: Vec<(String, String)>,
        /// Network mode: none (loopback only) or bridge (NAT to the outside).
        #[arg(long)]
        network: Option<String>,
        #[command(flatten)]
        egress: EgressArgs,
        /// Mount a volume: NAME:/PATH, or NAME:/PATH:ro (repeatable).
        #[arg(long = "volume", short = 'v', value_parser = parse_volume)]
        volumes: Vec<stacyvm_api::VolumeMount>,
        /// Start from a snapshot (`stacyvm snapshot create`): its files
        /// (and, on qemu, memory and processes); image, size and network
        /// are the snapshot's.
        #[arg(long, conflicts_with_all = ["image", "provider", "template", "memory", "vcpus", "network"])]
        snapshot: Option<String>,
    },
    /// Show a sandbox's egress policy and the connections it refused, or
    /// replace the policy (any of the flags; `--clear` removes it).
    /// Takes effect at once.
    Network {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        #[command(flatten)]
        egress: EgressArgs,
        /// Remove the policy (the server's defaults only).
        #[arg(long, conflicts_with_all = ["allow_out", "deny_out", "deny_all", "dns"])]
        clear: bool,
    },
    /// Serve MCP (Model Context Protocol) on stdin/stdout: tools to create,
    /// list and destroy sandboxes, run commands and read, write and list
    /// files, each a call of the server's API with this key (so its role
    /// limits what they may do). For MCP hosts that start a local
    /// command; the server itself serves the same tools at `/mcp`.
    Mcp {
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// Run through `/bin/sh -c` (the words are joined with spaces).
        #[arg(long)]
        shell: bool,
        /// Working directory inside the sandbox.
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// Run as this account of the sandbox (a name, `uid` or
        /// `uid:gid`); default root.
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Timeout, e.g. 30s.
        #[arg(long)]
        timeout: Option<String>,
        /// Wait for the whole output instead of streaming it.
        #[arg(long, conflicts_with_all = ["interactive", "tty"])]
        no_stream: bool,
        /// Keep stdin open and pipe it to the command
        /// (`echo hi | stacyvm exec -i ID -- cat`).
        #[arg(long, short = 'i')]
        interactive: bool,
        /// Run on a pseudo-terminal: this terminal goes raw, follows
        /// window resizes, and the remote exit code is ours.
        #[arg(long, short = 't')]
        tty: bool,
        /// The command and its arguments (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Open an interactive login shell in a sandbox (bash if it has one,
    /// else sh) on a pseudo-terminal.
    Shell {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox id.
        id: String,
        /// Working directory inside the sandbox.
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// Log in as this account of the sandbox; default root.
        #[arg(long, short = 'u')]
        user: Option<String>,
    },
    /// Copy files or directories between this machine and a sandbox
    /// (`stacyvm cp ./src sb-1a2b3c4d:/workspace/src`, or the other way).
    /// A directory's contents go into the destination directory (created);
    /// a file goes to the destination path, or into it when it is a
    /// directory (ends with `/` on the sandbox side). Symlinks are copied
    /// as links; a progress bar shows on a terminal.
    Cp {
        #[command(flatten)]
        conn: Conn,
        /// Source: a local path or ID:/absolute/path.
        src: String,
        /// Destination: a local path or ID:/absolute/path.
        dest: String,
    },
    /// List live sandboxes.
    #[command(alias = "ls")]
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Upgrade this install from a release (directory or URL): verify its
    /// signature and checksum, run the new binary's `upgrade rehearse`,
    /// then swap the binaries (the old ones kept as *.bak) and restart the
    /// service if it ran.
    #[command(
        after_help = "Example:\n  stacyvm update --from https://releases.example/stacyvm/0.2.0 --pubkey /etc/stacyvm/release.pub --require-signature"
    )]
    Update(crate::install::UpdateArgs),
    /// Remove what install.sh installed (binaries, systemd unit); the
    /// config and data stay unless --purge --yes.
    Uninstall(crate::install::UninstallArgs),
    /// Pool mode's state: pool hosts and the sandboxes in them
    /// (docs/pool-mode.md).
    Pool {
        #[command(flatten)]
        conn: Conn,
    },
    /// Destroy sandboxes.
    #[command(alias = "destroy", alias = "rm")]
    Kill {
        #[command(flatten)]
        conn: Conn,
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print a sandbox's console log.
    Logs {
        #[command(flatten)]
        conn: Conn,
        id: String,
        /// Number of lines.
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
    },
    /// Environment specs, builds and registry connections.
    Env {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: crate::env::EnvCommand,
    },
    /// Snapshots of sandboxes and forks: create, fork, list, delete.
    Snapshot {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: crate::snapshot::SnapshotCommand,
    },
    /// Named persistent volumes: create, list, delete, export, import.
    Volume {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        command: crate::volume::VolumeCommand,
    },
    /// Manage images of the native provider (local to this machine).
    Image {
        /// Config file (for server.data_dir).
        #[arg(long, short = 'c', global = true, env = "STACYVM_CONFIG")]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run sandboxes for a control plane (a cluster worker), or make and
    /// read worker tokens (`worker token …`).
    Worker(Box<crate::worker::WorkerArgs>),
    /// Print the version.
    Version,
    /// A terminal view of the sandboxes: live state, exec console, log
    /// tail, destroy and extend (`?` lists the keys).
    Tui {
        #[command(flatten)]
        conn: Conn,
        /// How often the list is fetched again, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        refresh_ms: u64,
    },
    /// The web dashboard of a (remote) server on this machine: serves the
    /// dashboard's files on 127.0.0.1 and relays the API, sign-in and
    /// WebSockets to --server. `stacyvm serve` itself serves the same
    /// dashboard at its own `/ui/`.
    #[command(visible_alias = "ui")]
    WebUi {
        /// The server's URL.
        #[arg(
            long,
            env = "STACYVM_URL",
            default_value = "http://localhost:7423",
            alias = "url"
        )]
        server: String,
        /// The local port (127.0.0.1 only; 0 picks a free one).
        #[arg(long, short, default_value_t = 5749)]
        port: u16,
        /// Do not try to open a browser.
        #[arg(long)]
        no_open: bool,
    },
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  stacyvm completion bash | sudo tee /etc/bash_completion.d/stacyvm\n  stacyvm completion zsh > \"${fpath[1]}/_stacyvm\"\n  stacyvm completion fish > ~/.config/fish/completions/stacyvm.fish"
    )]
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (stacyvm.1 and one per subcommand) into a directory.
    #[command(after_help = "Example:\n  stacyvm man --out /usr/local/share/man/man1 && mandb")]
    Man {
        #[arg(long, default_value = "man")]
        out: PathBuf,
    },
    /// Operator tooling: config lint, doctor, db, upgrade, support.
    #[command(flatten)]
    Ops(crate::ops::OpsCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Import a `docker save` tarball or an OCI image layout archive, or
    /// (with --docker) an image of the local Docker engine.
    #[command(
        after_help = "Examples:\n  docker save python:3.12 -o py.tar && stacyvm image import py.tar\n  stacyvm image import --docker python:3.12"
    )]
    Import {
        /// The archive (e.g. from `docker save IMAGE -o image.tar`).
        #[arg(required_unless_present = "docker", conflicts_with = "docker")]
        file: Option<PathBuf>,
        /// Export this image from the local Docker engine (DOCKER_HOST or
        /// /var/run/docker.sock) instead of reading a file.
        #[arg(long, value_name = "IMAGE")]
        docker: Option<String>,
        /// Extra name for the image (e.g. python:3.12).
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull an image from an OCI registry (linux/amd64) into the native
    /// image store, or with --docker into the Docker engine.
    ///
    /// Loopback registries (localhost, 127.0.0.1) are reached over plain
    /// HTTP like Docker does; others over HTTPS unless --insecure.
    /// Credentials come from STACYVM_REGISTRY_USERNAME and
    /// STACYVM_REGISTRY_PASSWORD (anonymous otherwise).
    #[command(after_help = "Example:\n  stacyvm image pull localhost:5000/tools/busybox:1.36")]
    Pull {
        /// Image reference, e.g. registry.example.com/team/image:tag.
        reference: String,
        /// Extra local name for the image.
        #[arg(long)]
        name: Option<String>,
        /// Use plain HTTP for this registry.
        #[arg(long)]
        insecure: bool,
        /// Pull into the Docker engine (for the docker provider) instead of
        /// the native image store.
        #[arg(long, conflicts_with_all = ["insecure", "name"])]
        docker: bool,
    },
    /// List imported images.
    #[command(alias = "list")]
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image by name or id prefix.
    Rm {
        /// Image name or id.
        image: String,
    },
    /// Install the microVM guest kernel (Debian's package, downloaded with
    /// apt into the cache; nothing touches the host's /boot) and build the
    /// initramfs for this agent, ahead of the first qemu spawn.
    #[command(
        after_help = "Example:\n  stacyvm image kernel\n  STACYVM_AGENT_PATH=/opt/stacyvm/stacyvm-agent stacyvm image kernel"
    )]
    Kernel,
}

fn parse_volume(s: &str) -> Result<stacyvm_api::VolumeMount, String> {
    let (name, rest) = s
        .split_once(':')
        .ok_or_else(|| format!("expected NAME:/PATH[:ro], got {s:?}"))?;
    let (path, read_only) = match rest.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (rest.strip_suffix(":rw").unwrap_or(rest), false),
    };
    if name.is_empty() || !path.starts_with('/') {
        return Err(format!("expected NAME:/PATH[:ro], got {s:?}"));
    }
    Ok(stacyvm_api::VolumeMount {
        volume: name.to_string(),
        path: path.to_string(),
        read_only,
    })
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

fn client(c: &Conn) -> Result<Client> {
    Ok(Client::new(&c.url, c.api_key.clone())?)
}

pub(crate) fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { config } => crate::serve::run(config).await.map(|()| ExitCode::SUCCESS),
        Command::Worker(args) => crate::worker::run(*args).await.map(|()| ExitCode::SUCCESS),
        Command::Image { config, command } => crate::image::run(config, command)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Ops(command) => crate::ops::run(command).await,
        Command::Volume { conn, command } => crate::volume::run(&conn, command).await,
        Command::Snapshot { conn, command } => crate::snapshot::run(&conn, command).await,
        Command::Env { conn, command } => crate::env::run(&conn, command).await,
        Command::Completion { shell } => crate::docs::completion(shell),
        Command::Tui { conn, refresh_ms } => {
            crate::tui::run(&conn, std::time::Duration::from_millis(refresh_ms.max(100))).await
        }
        Command::Man { out } => crate::docs::man(&out),
        Command::WebUi {
            server,
            port,
            no_open,
        } => crate::webui::run(&server, port, !no_open).await,
        Command::Version => {
            println!(
                "stacyvm {} ({}/{})",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                std::env::consts::ARCH
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Spawn {
            conn,
            image,
            provider,
            ttl,
            memory,
            vcpus,
            template,
            metadata,
            network,
            egress,
            volumes,
            snapshot,
        } => {
            let c = client(&conn)?;
            let req = SpawnRequest {
                network: egress.policy(),
                volumes,
                snapshot: snapshot.unwrap_or_default(),
                image: image.unwrap_or_default(),
                provider: provider.unwrap_or_default(),
                ttl: ttl.unwrap_or_default(),
                memory_mb: memory.unwrap_or(0),
                vcpus: vcpus.unwrap_or(0),
                template: template.unwrap_or_default(),
                metadata: if metadata.is_empty() {
                    None
                } else {
                    Some(metadata.into_iter().collect::<BTreeMap<_, _>>())
                },
                network_mode: network.unwrap_or_default(),
                ..SpawnRequest::default()
            };
            let sb = c.spawn(&req).await?;
            if conn.json {
                print_json(&sb)?;
            } else {
                println!("{}", sb.id);
                eprintln!(
                    "Sandbox {} spawned (provider: {}, image: {})",
                    sb.id, sb.provider, sb.image
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Exec {
            conn,
            id,
            shell,
            workdir,
            env,
            user,
            timeout,
            no_stream,
            interactive,
            tty,
            command,
        } => {
            let (mode, cmd, args) = if shell {
                ("shell".to_string(), command.join(" "), Vec::new())
            } else {
                let mut it = command.into_iter();
                let Some(first) = it.next() else {
                    bail!("missing command: use `stacyvm exec ID -- COMMAND [ARGS…]`")
                };
                ("argv".to_string(), first, it.collect())
            };
            let req = ExecRequest {
                command: cmd,
                args,
                mode,
                env: env.into_iter().collect(),
                workdir: workdir.unwrap_or_default(),
                timeout: timeout.unwrap_or_default(),
                user,
                ..ExecRequest::default()
            };
            if interactive || tty {
                return crate::interactive::run(&conn, &id, req, tty).await;
            }
            let c = client(&conn)?;
            if no_stream || conn.json {
                let r = c.exec(&id, &req).await?;
                if conn.json {
                    print_json(&r)?;
                } else {
                    std::io::stdout().write_all(r.stdout.as_bytes())?;
                    std::io::stderr().write_all(r.stderr.as_bytes())?;
                }
                return Ok(exit_code(r.exit_code));
            }
            let mut out = std::io::stdout();
            let mut err = std::io::stderr();
            let code = c
                .exec_stream(&id, &req, |item| match item {
                    StreamItem::Stdout(s) => {
                        let _ = out.write_all(s.as_bytes());
                        let _ = out.flush();
                    }
                    StreamItem::Stderr(s) => {
                        let _ = err.write_all(s.as_bytes());
                    }
                    StreamItem::Exit(_) => {}
                })
                .await?;
            Ok(exit_code(code.unwrap_or(1)))
        }
        Command::Shell {
            conn,
            id,
            workdir,
            env,
            user,
        } => {
            let req = ExecRequest {
                command:
                    "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi"
                        .into(),
                mode: "shell".into(),
                env: env.into_iter().collect(),
                workdir: workdir.unwrap_or_default(),
                user,
                ..ExecRequest::default()
            };
            crate::interactive::run(&conn, &id, req, true).await
        }
        Command::Cp { conn, src, dest } => crate::transfer::run(&conn, &src, &dest).await,
        Command::Mcp { conn } => {
            let api = stacyvm_server::mcp::Remote::new(&conn.url, conn.api_key.clone());
            stacyvm_server::mcp::serve_stdio(std::sync::Arc::new(api))
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Update(args) => crate::install::update(&args).await,
        Command::Uninstall(args) => crate::install::uninstall(&args),
        Command::Pool { conn } => {
            let c = client(&conn)?;
            let st: stacyvm_api::PoolStatus = c.get_json("/pool/status").await?;
            if conn.json {
                print_json(&st)?;
            } else if !st.enabled {
                println!("pool mode is off (pool.enabled: false)");
            } else {
                println!(
                    "pool hosts {}/{}, sandboxes {} (at most {} per host)",
                    st.vms.unwrap_or(0),
                    st.max_vms.unwrap_or(0),
                    st.total_users.unwrap_or(0),
                    st.max_users_per_vm.unwrap_or(0)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::List { conn } => {
            let c = client(&conn)?;
            let list = c.list().await?;
            if conn.json {
                print_json(&list)?;
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                eprintln!("No active sandboxes");
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new();
            t.load_preset(presets::NOTHING);
            t.set_header([
                "ID", "STATE", "PROVIDER", "IMAGE", "OWNER", "CREATED", "EXPIRES",
            ]);
            for s in list {
                t.add_row([
                    s.id,
                    s.state,
                    s.provider,
                    s.image,
                    s.owner_id,
                    s.created_at
                        .with_timezone(&chrono::Local)
                        .format("%H:%M:%S")
                        .to_string(),
                    s.expires_at
                        .with_timezone(&chrono::Local)
                        .format("%H:%M:%S")
                        .to_string(),
                ]);
            }
            println!("{t}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Network {
            conn,
            id,
            egress,
            clear,
        } => {
            let c = client(&conn)?;
            let status = match (egress.policy(), clear) {
                (Some(p), _) => c.set_network(&id, &p).await?,
                (None, true) => {
                    c.set_network(&id, &stacyvm_api::NetworkPolicy::default())
                        .await?
                }
                (None, false) => c.network(&id).await?,
            };
            if conn.json {
                print_json(&status)?;
                return Ok(ExitCode::SUCCESS);
            }
            let list = |l: &[String]| {
                if l.is_empty() {
                    "-".to_string()
                } else {
                    l.join(", ")
                }
            };
            println!("network mode: {}", status.network_mode);
            match &status.effective {
                None => println!("policy:       none (the server's defaults)"),
                Some(e) => {
                    println!("allow out:    {}", list(&e.allow_out));
                    println!("deny out:     {}", list(&e.deny_out));
                    if let Some(d) = &e.dns_servers {
                        println!("dns servers:  {}", list(d));
                    }
                }
            }
            if !status.enforced_deny.is_empty() {
                println!("tenant deny:  {}", status.enforced_deny.join(", "));
            }
            if status.denied.is_empty() {
                println!("denied:       none lately");
            } else {
                println!("denied (newest first):");
                for d in &status.denied {
                    let what = if d.host.is_empty() {
                        d.address.clone()
                    } else {
                        d.host.clone()
                    };
                    println!(
                        "  {what}:{} {} {} x{}",
                        d.port, d.protocol, d.reason, d.count
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Kill { conn, ids } => {
            let c = client(&conn)?;
            let mut failed = 0;
            for id in ids {
                match c.destroy(&id).await {
                    Ok(()) => eprintln!("Sandbox {id} destroyed"),
                    Err(e) => {
                        eprintln!("error: destroying {id}: {e}");
                        failed += 1;
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Logs { conn, id, lines } => {
            let c = client(&conn)?;
            let logs = c
                .logs(&id, lines)
                .await
                .with_context(|| format!("reading logs of {id}"))?;
            if conn.json {
                print_json(&logs)?;
            } else {
                for l in logs {
                    println!("{l}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}
