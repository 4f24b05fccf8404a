//! `didgated`: the didgate gateway daemon and its admin commands.
//!
//! Exit status: 0 on success, 1 when the demo's expectations fail, 2 on a usage, configuration
//! or I/O error.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use didgate_gateway::gateway::{self, Gateway};
use zeroize::Zeroizing;

#[derive(Parser)]
#[command(name = "didgated", version, about = "didgate gateway daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a gateway: identity, master key, store and a commented gateway.toml.
    Init {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
    },
    /// Manage upstream secrets (stored encrypted; the daemon must not be running).
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Serve calls over QUIC until SIGINT or SIGTERM.
    Serve {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
    },
    /// Export the gateway's audit chain (through the running daemon, or from the store when no
    /// daemon runs) as a CBOR sequence file for `didgate-audit`.
    Export {
        /// Data directory.
        #[arg(long, env = "DIDGATE_DATA")]
        data: PathBuf,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the whole path on loopback with no configuration, and verify both audit chains.
    Demo {
        /// Keep everything in DIR instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DIDGATE_LOG")
                .unwrap_or_else(|_| "warn".into()),
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
        Command::Secret {
            command: SecretCommand::Add { name, data },
        } => {
            let mut value = Zeroizing::new(String::new());
            std::io::stdin()
                .read_to_string(&mut value)
                .context("reading the secret from stdin")?;
            let trimmed = Zeroizing::new(value.trim_end_matches(['\r', '\n']).to_string());
            let record = didgate_gateway::add_secret(&data, &name, &trimmed)?;
            println!(
                "secret {} version {} stored ({})",
                record.name, record.version, record.display
            );
        }
        Command::Serve { data } => {
            let gw = Arc::new(Gateway::open(&data).await?);
            let endpoint = gateway::endpoint(&gw, gw.config().gateway.listen)?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let control = {
                let (gw, data) = (gw.clone(), data.clone());
                tokio::spawn(
                    async move { didgate_gateway::control::serve(gw, &data, stop_rx).await },
                )
            };
            eprintln!(
                "didgated {} listening on udp {}",
                gw.did(),
                endpoint.local_addr()?
            );
            gateway::serve(gw, endpoint, shutdown_signal()).await;
            let _ = stop_tx.send(true);
            if let Ok(Err(e)) = control.await {
                eprintln!("didgated: control socket: {e}");
            }
            eprintln!("didgated stopped");
        }
        Command::Export { data, out } => {
            let out = std::path::absolute(&out)?;
            let request = didgate_gateway::control::Request::Export { out: out.clone() };
            let (entries, checkpoints) = match didgate_gateway::control::call(&data, &request).await
            {
                Some(reply) => {
                    let reply = reply.context("control socket")?;
                    if !reply.ok {
                        anyhow::bail!("the daemon refused: {}", reply.error.unwrap_or_default());
                    }
                    (reply.entries.unwrap_or(0), reply.checkpoints.unwrap_or(0))
                }
                None => {
                    let dir = gateway::DataDir::new(&data).store();
                    if !dir.join("version").is_file() {
                        anyhow::bail!("{} holds no gateway store", data.display());
                    }
                    let store = didgate_audit::Store::open(&dir, &[])?;
                    didgate_audit::export::export(&store, &out)?
                }
            };
            eprintln!(
                "exported {entries} entries and {checkpoints} checkpoints to {}",
                out.display()
            );
        }
        Command::Demo { dir } => {
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
            let outcome = didgate_gateway::demo::run(&root).await?;
            print!("{}", outcome.account);
            if _keep.is_none() {
                println!(
                    "\neverything is kept in {}: gateway/ (store, gateway.toml), clients/NAME/ (identity, chain), upstream/requests.jsonl",
                    root.display()
                );
            }
            return Ok(if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
