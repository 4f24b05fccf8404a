//! `didgated`: the didgate gateway daemon and its admin commands.
//!
//! Exit status: 0 on success, 1 when the demo's expectations fail or `secret test` finds a key
//! its upstream refuses, 2 on a usage, configuration or I/O error.

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use didgate_gateway::control::Request as ControlRequest;
use didgate_gateway::gateway::{self, Gateway};
use zeroize::Zeroizing;

/// mimalloc instead of glibc's malloc: allocation and free were about 12% of the gateway's CPU
/// per call in `perf` (docs/performance.md, "Calls").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "didgated", version, about = "didgate gateway daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Revoke a DID or a grant: durable, audited, effective for the next request and for calls
    /// in flight that have not reached the upstream.
    Revoke {
        /// `did` or `grant`.
        #[arg(value_parser = ["did", "grant"])]
        what: String,
        /// The DID, or the grant id (32 hex digits).
        target: String,
        /// Why (recorded in the audit entry).
        #[arg(long, default_value = "revoked by the operator")]
        reason: String,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Create a gateway: identity, master key, store and a commented gateway.toml.
    Init {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
    },
    /// Manage upstream secrets (stored encrypted): through the running daemon's control socket,
    /// or on the store when no daemon runs.
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Manage the KMS master key (a file, or a key in a PKCS#11 token).
    Kms {
        #[command(subcommand)]
        command: KmsCommand,
    },
    /// Serve calls over QUIC until SIGINT or SIGTERM.
    Serve {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Check or reload the Cedar policy (specs/operation.md, "Policy").
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The upstreams (`[[upstream]]` of gateway.toml).
    Upstreams {
        #[command(subcommand)]
        command: UpstreamsCommand,
    },
    /// Export the gateway's audit chain (through the running daemon, or from the store when no
    /// daemon runs) as a CBOR sequence file for `didgate-audit`, sealed first: it ends with a
    /// checkpoint signed by the gateway covering its last entry.
    /// With `--cluster`: every node's chain of this node's cluster, as `OUT/NODE.export` (this
    /// node's through its daemon, every other member's fetched from it as this node's key; a
    /// node of the registry that is not a member now is reported missing, exit status 1).
    Export {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// The file to write (with `--cluster`, the directory).
        #[arg(long)]
        out: PathBuf,
        /// Every node's chain of the cluster in `[cluster]`.
        #[arg(long)]
        cluster: bool,
    },
    /// A consistent copy of the store (chain, claims, sealed secrets) in a new directory, made
    /// while the daemon serves (or from the store when none runs). Not the identity or the
    /// master key: back those up on their own.
    Backup {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// The directory to create.
        #[arg(long)]
        out: PathBuf,
    },
    /// Put a backup in place of the store of a stopped gateway (the replaced store is kept as
    /// `store.replaced-MS`). A cluster node restored from a backup older than what the cluster
    /// saw of its chain then refuses to start.
    Restore {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// The backup directory (`didgated backup --out`).
        #[arg(long)]
        from: PathBuf,
    },
    /// Seal the gateway's audit chain: sign a checkpoint covering its last entry unless one does
    /// already (then nothing is written). Through the running daemon, or on the store when no
    /// daemon runs (with the gateway's identity; nothing but the checkpoint is written).
    Seal {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Watch the running daemon's live events: accesses, grants, refusals, failed calls,
    /// revocations, secret lifecycle, master-key rotation, policy reloads (specs/operation.md,
    /// "Events and metrics"). Needs a running daemon (exit 2 when none answers).
    Events {
        /// Stream events as they happen until interrupted or the daemon stops (required: there
        /// is no event history to print).
        #[arg(long)]
        follow: bool,
        /// One JSON object per line instead of human-readable lines.
        #[arg(long)]
        json: bool,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Node certificates: one gateway DID served by several nodes, each with its own key
    /// (specs/operation.md, "Nodes").
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Run the whole path on loopback with no configuration, and verify both audit chains.
    Demo {
        /// Keep everything in DIR instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Sign a node certificate with this data directory's gateway key (run where the gateway
    /// key is; nothing needs to be running): NODE may serve as this gateway for the window.
    /// The certificate is written to OUT and kept in DATA/node-certs/SERIAL.cose.
    CertifyNode {
        /// The node's did:key (printed by `didgated init` on the node).
        #[arg(long)]
        node: String,
        /// Hours the certificate is valid (1 to 720), from 5 minutes ago (clock skew).
        #[arg(long, default_value_t = 24)]
        valid_hours: u64,
        /// The serial (default: one more than any issued from DATA).
        #[arg(long)]
        serial: Option<u64>,
        /// The only UDP address the node may serve on.
        #[arg(long)]
        addr: Option<SocketAddr>,
        /// The file to write the certificate to (give it to the node's `[node] certificate`).
        #[arg(long)]
        out: PathBuf,
        /// The gateway's data directory (its key signs).
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Revoke a node certificate by serial: signs the next revocation list into
    /// DATA/node-revocations.cose. Give that file to every node's `[node] revocations`: nodes
    /// staple it in their TLS certificate, and clients refuse the serial from then on.
    RevokeNode {
        /// The serial to revoke.
        serial: u64,
        /// The gateway's data directory (its key signs).
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Show this data directory's key, the gateway DID it serves and its node certificate.
    Show {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum UpstreamsCommand {
    /// Re-read the `[[upstream]]` tables of the running daemon's gateway.toml, validate them
    /// with the rest of its configuration and swap them in (calls under way keep theirs); in a
    /// cluster, every node takes them. On an error the upstreams in force stay (exit 2).
    Reload {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a Cedar policy file against the schema (exit 0 valid, 2 invalid); with
    /// `--data`, also warn of every group, upstream, action and operation the policies name
    /// that the data directory's gateway.toml does not know.
    Check {
        /// The policy file.
        file: PathBuf,
        /// Data directory whose gateway.toml (groups, entities file, upstreams, operations)
        /// the names in the policies are checked against (not taken from DIDGATE_DATA: only
        /// an explicit `--data` checks names).
        #[arg(long)]
        data: Option<PathBuf>,
        /// With `--data`: an unknown name is an error (exit 2), not a warning.
        #[arg(long)]
        strict: bool,
    },
    /// Make the running daemon re-read its policy and swap it in atomically (same as SIGHUP);
    /// an invalid policy is refused and the one in force stays.
    Reload {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Add a secret; its value is read from stdin, never from the command line.
    Add {
        /// Secret name (referenced by upstreams in gateway.toml).
        name: String,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Rotate a secret: the new value (stdin) becomes the current version; the previous one
    /// stays usable for `secret_grace_secs`, then is sealed off.
    Rotate {
        /// Secret name.
        name: String,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Disable a secret: calls using it are refused (secret_unavailable).
    Disable {
        /// Secret name.
        name: String,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Enable a disabled secret, or restore a deleted one (within 90 days).
    #[command(visible_alias = "restore")]
    Enable {
        /// Secret name.
        name: String,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Delete a secret: refused at once, recoverable with `enable` for 90 days, then purged.
    Delete {
        /// Secret name.
        name: String,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// List secrets: name, version, prefix, status, last use (never a value).
    List {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a secret against each upstream using it: a GET of the upstream's `test_path`
    /// with the secret injected; 2xx = ok (exit 1 otherwise). Prints the status, never the value.
    Test {
        /// Secret name.
        name: String,
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// A version still held (default: the current one).
        #[arg(long)]
        version: Option<u64>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KmsCommand {
    /// Rotate the master key: every data key is rewrapped under a new key (no secret is
    /// decrypted); calls keep working throughout.
    Rotate {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Generate the master key inside the PKCS#11 token of `[pkcs11]` (gateway.toml has
    /// `[gateway] kms = "pkcs11"`) on a store without secrets; `master.key` is removed.
    InitPkcs11 {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Move a store's secrets from the file master key into the PKCS#11 token: every data key
    /// is rewrapped under a key generated in the token (crash-safe), then `master.key` is
    /// removed.
    Migrate {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// The KMS to move to (only `pkcs11`).
        #[arg(long, value_parser = ["pkcs11"])]
        to: String,
    },
}

/// Reads a secret value from stdin (never argv), without its trailing newline.
fn read_secret() -> anyhow::Result<didgate_gateway::secrets::SecretValue> {
    // sized once, so no reallocation leaves a copy behind
    let mut value = Zeroizing::new(String::with_capacity(64 * 1024));
    std::io::stdin()
        .read_to_string(&mut value)
        .context("reading the secret from stdin")?;
    let trimmed = Zeroizing::new(value.trim_end_matches(['\r', '\n']).to_string());
    Ok(didgate_gateway::secrets::SecretValue::new(trimmed))
}

/// `secret ...` and `kms rotate`: through the daemon when one runs, else on the store.
async fn secret_command(
    data: PathBuf,
    request: ControlRequest,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reply = didgate_gateway::admin::admin(&data, &request).await?;
    if !reply.ok {
        anyhow::bail!("{}", reply.error.unwrap_or_default());
    }
    let (text, ok) = didgate_gateway::admin::describe(&request, &reply, json);
    print!("{text}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // colours only on a terminal, and not under NO_COLOR (which `with_ansi` would override):
    // a log file or a pipe gets plain text
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DIDGATE_LOG")
                // secret lifecycle events are logged by default (they are not in the chain yet)
                .unwrap_or_else(|_| "warn,didgate_gateway::secrets=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("didgated: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("didgated: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // before any key is read: no core dumps, private files (the data directory is checked
    // and tightened where it is opened: `init`, `Gateway::open`, `secrets::open_dir`)
    didgate_io::hardening::harden_process()?;
    match cli.command {
        Command::Init { data, listen } => {
            let did = didgate_gateway::init(&data, listen)?;
            println!("{did}");
            eprintln!(
                "gateway created in {}; edit {} then run `didgated serve --data {}`",
                data.display(),
                data.join("gateway.toml").display(),
                data.display()
            );
        }
        Command::Secret { command } => {
            let (data, request, json) = match command {
                SecretCommand::Add { name, data } => {
                    let value = read_secret()?;
                    (data, ControlRequest::SecretAdd { name, value }, false)
                }
                SecretCommand::Rotate { name, data } => {
                    let value = read_secret()?;
                    (data, ControlRequest::SecretRotate { name, value }, false)
                }
                SecretCommand::Disable { name, data } => {
                    (data, ControlRequest::SecretDisable { name }, false)
                }
                SecretCommand::Enable { name, data } => {
                    (data, ControlRequest::SecretEnable { name }, false)
                }
                SecretCommand::Delete { name, data } => {
                    (data, ControlRequest::SecretDelete { name }, false)
                }
                SecretCommand::List { data, json } => (data, ControlRequest::SecretList, json),
                SecretCommand::Test {
                    name,
                    data,
                    version,
                    json,
                } => (data, ControlRequest::SecretTest { name, version }, json),
            };
            return secret_command(data, request, json).await;
        }
        Command::Kms {
            command: KmsCommand::Rotate { data },
        } => return secret_command(data, ControlRequest::KmsRotate, false).await,
        Command::Kms {
            command: KmsCommand::InitPkcs11 { data },
        } => return secret_command(data, ControlRequest::KmsToToken { init: true }, false).await,
        Command::Kms {
            command: KmsCommand::Migrate { data, to: _ },
        } => {
            return secret_command(data, ControlRequest::KmsToToken { init: false }, false).await;
        }
        Command::Serve { data } => serve(&data).await?,
        Command::Policy {
            command: PolicyCommand::Check { file, data, strict },
        } => return policy_check(&file, data.as_deref(), strict),
        Command::Policy {
            command: PolicyCommand::Reload { data },
        } => {
            let request = didgate_gateway::control::Request::PolicyReload;
            reload(&data, request, ("policy", "is", "stays")).await?;
        }
        Command::Revoke {
            what,
            target,
            reason,
            data,
        } => revoke(&what, &target, &reason, &data).await?,
        Command::Upstreams {
            command: UpstreamsCommand::Reload { data },
        } => {
            let request = didgate_gateway::control::Request::UpstreamsReload;
            reload(&data, request, ("upstreams", "are", "stay")).await?;
        }
        Command::Export {
            data,
            out,
            cluster: false,
        } => export(&data, &out).await?,
        Command::Export {
            data,
            out,
            cluster: true,
        } => return export_cluster(&data, &out).await,
        Command::Seal { data } => seal(&data).await?,
        Command::Backup { data, out } => {
            let copied = didgate_gateway::control::backup(&data, &out).await?;
            eprintln!(
                "backed up the store to {} ({copied} items; the identity and master key are not in it)",
                out.display()
            );
        }
        Command::Restore { data, from } => {
            let aside = didgate_gateway::control::restore(&data, &from).await?;
            eprintln!(
                "restored the store from {}; the replaced store is kept at {}",
                from.display(),
                aside.display()
            );
        }
        Command::Events { follow, json, data } => return events(follow, json, &data).await,
        Command::Demo { dir } => return demo(dir).await,
        Command::Cluster { command } => cluster(command)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `didgated cluster ...`: node certificates, issued and revoked offline with the gateway key.
fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    use didgate_gateway::datadir::DataDir;
    use didgate_gateway::node;
    const SKEW_MS: u64 = 5 * 60 * 1000;
    let now = didgate_gateway::now_ms();
    match command {
        ClusterCommand::CertifyNode {
            node: did,
            valid_hours,
            serial,
            addr,
            out,
            data,
        } => {
            if !(1..=720).contains(&valid_hours) {
                anyhow::bail!("--valid-hours is 1 to 720 (30 days)");
            }
            let did = didgate_protocol::Did::parse(&did)
                .with_context(|| format!("--node {did:?} is not a did:key"))?;
            let d = DataDir::new(&data);
            let identity = didgate_io::identity::load(&d.identity())?;
            let req = node::Certify {
                node: did,
                not_before_ms: now.saturating_sub(SKEW_MS),
                valid_for_ms: valid_hours * 3_600_000,
                serial,
                addr,
            };
            let (bytes, cert) = node::certify(&d, &identity, &req)?;
            std::fs::write(&out, bytes).with_context(|| format!("{}", out.display()))?;
            println!(
                "node certificate serial {} for {} as {}, valid {} to {}: {}",
                cert.serial,
                cert.node,
                cert.gateway,
                didgate_io::fmt_utc(cert.not_before_ms),
                didgate_io::fmt_utc(cert.not_after_ms),
                out.display()
            );
        }
        ClusterCommand::RevokeNode { serial, data } => {
            let d = DataDir::new(&data);
            let identity = didgate_io::identity::load(&d.identity())?;
            let (_, list) = node::revoke(&d, &identity, serial, now, now)?;
            println!(
                "serial {serial} revoked; revocation list {} ({} serials): {}",
                list.seq,
                list.revoked.len(),
                node::revocations_path(&d).display()
            );
        }
        ClusterCommand::Show { data } => {
            let d = DataDir::new(&data);
            let identity = didgate_io::identity::load(&d.identity())?;
            println!("key      {}", identity.did());
            let config = didgate_gateway::config::Config::load(&d.config())?;
            match config.node() {
                None => println!("serves   {} (a single node: no [node])", identity.did()),
                Some(settings) => {
                    let n =
                        node::Node::load(&data, settings, &identity, config.gateway().listen, now)?;
                    let c = n.certificate();
                    println!("serves   {}", n.gateway());
                    println!(
                        "serial   {} valid {} to {}",
                        c.serial,
                        didgate_io::fmt_utc(c.not_before_ms),
                        didgate_io::fmt_utc(c.not_after_ms)
                    );
                }
            }
        }
    }
    Ok(())
}

/// `didgated policy check FILE [--data DIR [--strict]]`: exit 0 valid, 2 invalid (or, with
/// `--strict`, naming something DIR's gateway.toml does not know).
fn policy_check(
    file: &std::path::Path,
    data: Option<&std::path::Path>,
    strict: bool,
) -> anyhow::Result<ExitCode> {
    use didgate_gateway::policy::{KnownNames, PolicySet};
    if strict && data.is_none() {
        anyhow::bail!("--strict checks names against a data directory: give --data DIR");
    }
    let known = match data {
        Some(d) => Some(
            KnownNames::load(d).with_context(|| format!("reading the names of {}", d.display()))?,
        ),
        None => None,
    };
    let (summary, unknown) = match PolicySet::check_file_against(file, known.as_ref()) {
        Ok(checked) => checked,
        Err(e) => {
            eprintln!("didgated: invalid policy: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    for w in &summary.warnings {
        eprintln!("warning: {w}");
    }
    let level = if strict { "error" } else { "warning" };
    for u in &unknown {
        eprintln!("{level}: {u}");
    }
    if strict && !unknown.is_empty() {
        eprintln!(
            "didgated: policy check failed: {} names gateway.toml does not know (--strict)",
            unknown.len()
        );
        return Ok(ExitCode::from(2));
    }
    println!(
        "{}: valid: {} policies ({} permit, {} forbid); families: {}",
        file.display(),
        summary.policies,
        summary.permits,
        summary.forbids,
        if summary.families.is_empty() {
            "(none: everything is denied)".to_string()
        } else {
            summary.families.join(", ")
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Reloads the policy on each SIGHUP, reporting the outcome on stderr.
async fn reload_on_hangup(gw: Arc<Gateway>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        eprintln!("didgated: cannot watch SIGHUP; use `didgated policy reload`");
        return;
    };
    while hup.recv().await.is_some() {
        match gw.reload_policy_everywhere().await {
            Ok(hash) => eprintln!("didgated: SIGHUP: policy reloaded: {}", hex::encode(hash)),
            Err(e) => eprintln!("didgated: SIGHUP: policy reload: {e}"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM. Both are registered when it is called, not when it is first
/// polled: a signal sent as soon as the daemon says it is listening is never lost to the
/// default action (which would kill it without draining).
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = async |s: Option<tokio::signal::unix::Signal>| match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        };
        tokio::select! {
            () = wait(int) => {}
            () = wait(term) => {}
        }
    }
}

/// `didgated serve`: the daemon, its metrics endpoint and control socket, until a signal.
async fn serve(data: &std::path::Path) -> anyhow::Result<()> {
    // the signals first: a SIGTERM while the node starts (joining its cluster, say) is a planned
    // stop once it serves, never a kill that leaves its member key behind
    let shutdown = shutdown_signal();
    let gw = Arc::new(Gateway::open(data).await?);
    let endpoint = didgate_gateway::server::endpoint(&gw, gw.config().gateway().listen)?;
    // a cluster member registers with the address it serves on (no-op without [cluster])
    gw.join_cluster(endpoint.local_addr()?).await?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // bound first: a metrics address in use stops the start before anything is served
    let metrics = match gw.config().gateway().metrics_listen {
        Some(addr) => {
            let (bound, task) =
                didgate_gateway::metrics::start(gw.metrics().clone(), addr, stop_tx.subscribe())
                    .await
                    .with_context(|| format!("metrics_listen {addr}"))?;
            eprintln!("didgated metrics on http://{bound}/metrics");
            Some(task)
        }
        None => None,
    };
    let control = {
        let (gw, data) = (gw.clone(), data.to_path_buf());
        tokio::spawn(
            async move { didgate_gateway::control::server::serve(gw, &data, stop_rx).await },
        )
    };
    let hangup = tokio::spawn(reload_on_hangup(gw.clone()));
    match gw.node() {
        None => eprintln!(
            "didgated {} listening on udp {}",
            gw.did(),
            endpoint.local_addr()?
        ),
        Some(n) => eprintln!(
            "didgated {} (node {}, certificate serial {} until {}) listening on udp {}",
            gw.did(),
            gw.key(),
            n.certificate().serial,
            didgate_io::fmt_utc(n.certificate().not_after_ms),
            endpoint.local_addr()?
        ),
    }
    let drain_at = gw.node_drain_at_ms();
    didgate_gateway::server::serve(gw, endpoint, shutdown).await;
    hangup.abort();
    let _ = stop_tx.send(true);
    if let Ok(Err(e)) = control.await {
        eprintln!("didgated: control socket: {e}");
    }
    if let Some(task) = metrics {
        let _ = task.await;
    }
    if drain_at.is_some_and(|at| didgate_gateway::now_ms() >= at) {
        anyhow::bail!(
            "stopped: the node certificate ends (renew it with `didgated cluster certify-node` and restart)"
        );
    }
    eprintln!("didgated stopped");
    Ok(())
}

/// `didgated revoke`: through the daemon, or on the store directly when none runs.
async fn revoke(
    what: &str,
    target: &str,
    reason: &str,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    let (did, grant) = if what == "did" {
        (Some(target.to_string()), None)
    } else {
        (None, Some(target.to_string()))
    };
    let request = didgate_gateway::control::Request::Revoke {
        did: did.clone(),
        grant: grant.clone(),
        reason: reason.to_string(),
    };
    match didgate_gateway::control::call(data, &request).await {
        Some(reply) => {
            let reply = reply.context("control socket")?;
            if !reply.ok {
                anyhow::bail!("the daemon refused: {}", reply.error.unwrap_or_default());
            }
        }
        None => {
            // No daemon: record the revocation in the store directly.
            let revoke = gateway::parse_revoke(did.as_deref(), grant.as_deref())
                .map_err(anyhow::Error::msg)?;
            let gw = Gateway::open(data).await?;
            gw.revoke(&revoke, reason).await?;
            gw.chain().close();
        }
    }
    eprintln!("revoked {what} {target}");
    Ok(())
}

/// `didgated export`: the gateway chain, sealed, to a file, through the daemon or from the store.
async fn export(data: &std::path::Path, out: &std::path::Path) -> anyhow::Result<()> {
    let (entries, checkpoints) = didgate_gateway::control::export(data, out).await?;
    eprintln!(
        "exported {entries} entries and {checkpoints} checkpoints to {} (sealed: the last checkpoint covers the last entry)",
        out.display()
    );
    Ok(())
}

/// `didgated policy reload` and `didgated upstreams reload` (`what`): through the daemon only
/// (what they reload is read at start-up otherwise).
async fn reload(
    data: &std::path::Path,
    request: didgate_gateway::control::Request,
    (what, is, stays): (&str, &str, &str),
) -> anyhow::Result<()> {
    let Some(reply) = didgate_gateway::control::call(data, &request).await else {
        anyhow::bail!(
            "no daemon answers on {}: the {what} {is} read at start-up",
            didgate_gateway::control::socket_path(data).display()
        );
    };
    let reply = reply.context("control socket")?;
    if !reply.ok {
        let error = reply.error.unwrap_or_default();
        // in force on this node, only its publication failed
        if error.contains("not published to the cluster") {
            anyhow::bail!("{error}");
        }
        anyhow::bail!("reload refused (the {what} in force {stays}): {error}");
    }
    let hash = reply.policy.or(reply.upstreams).unwrap_or_default();
    println!("{what} reloaded: {hash}");
    Ok(())
}

/// `didgated export --cluster`: every node's chain; exit status 1 when one is missing.
async fn export_cluster(data: &std::path::Path, out: &std::path::Path) -> anyhow::Result<ExitCode> {
    use didgate_gateway::export::NodeExport;
    let outcomes = didgate_gateway::export::export_cluster(data, out).await?;
    let mut missing = 0;
    for (node, outcome) in &outcomes {
        match outcome {
            NodeExport::Written { path, bytes } => {
                eprintln!(
                    "{node}: exported to {} ({bytes} bytes, sealed)",
                    path.display()
                );
            }
            NodeExport::Missing { why, published } => {
                missing += 1;
                let seen = published.map_or(String::new(), |n| {
                    format!(" (its last published checkpoint covers {n} entries)")
                });
                eprintln!("{node}: NOT exported: {why}{seen}");
            }
        }
    }
    eprintln!(
        "{} of {} node chains exported to {}; verify them with `didgate-audit verify --gateway FILE ... --client DIR ...`",
        outcomes.len() - missing,
        outcomes.len(),
        out.display()
    );
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `didgated seal`: the gateway chain sealed, through the daemon or on the store.
async fn seal(data: &std::path::Path) -> anyhow::Result<()> {
    let outcome = didgate_gateway::control::seal(data).await?;
    let by = if outcome.by_daemon {
        "by the running daemon"
    } else {
        "on the store"
    };
    match outcome.sealed {
        Some(s) if s.written => println!(
            "sealed {by}: signed a checkpoint covering the chain's {} entries",
            s.size
        ),
        Some(s) => println!(
            "already sealed: the last checkpoint covers the chain's {} entries; nothing written",
            s.size
        ),
        None => println!(
            "sealed {by} (a daemon of an earlier release: it did not say whether a checkpoint was needed)"
        ),
    }
    Ok(())
}

/// `didgated demo`: the whole path on loopback; exit 1 if a check failed.
async fn demo(dir: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (root, _keep) = match dir {
        Some(d) => {
            if d.exists() && std::fs::read_dir(&d)?.next().is_some() {
                anyhow::bail!(
                    "{} is not empty; give a new or empty directory",
                    d.display()
                );
            }
            (d, None)
        }
        None => {
            let t = tempfile::tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let outcome = didgate_daemon::demo::run(&root).await?;
    print!("{}", outcome.account);
    if _keep.is_none() {
        println!(
            "\neverything is kept in {}: gateway/ (store, gateway.toml), clients/NAME/ (identity, chain), upstream/requests.jsonl",
            root.display()
        );
    }
    Ok(if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `didgated events --follow`: the running daemon's live events, one per line.
async fn events(follow: bool, json: bool, data: &std::path::Path) -> anyhow::Result<ExitCode> {
    if !follow {
        eprintln!(
            "didgated: events: only --follow is supported (live events from the running daemon; the audit chain is the history: `didgated export`)"
        );
        return Ok(ExitCode::from(2));
    }
    let Some(stream) = didgate_gateway::control::subscribe(data).await else {
        anyhow::bail!(
            "no daemon answers on {}: events come from a running didgated",
            didgate_gateway::control::socket_path(data).display()
        );
    };
    let mut stream = stream.context("control socket")?;
    eprintln!("didgated: following events (interrupt to stop)");
    while let Some(line) = stream.next_line().await.context("control socket")? {
        if json {
            println!("{line}");
        } else {
            match serde_json::from_str::<didgate_gateway::events::Event>(&line) {
                Ok(event) => println!("{}", event.human()),
                // a kind this binary does not know: shown as sent
                Err(_) => println!("{line}"),
            }
        }
    }
    eprintln!("didgated: the daemon closed the event stream (it stopped)");
    Ok(ExitCode::SUCCESS)
}
