//! `didgate-audit`: verify gateway and client audit chains against each other.
//!
//! Exit status: 0 when every check holds, 1 on any violation, 2 on a usage or I/O error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use didgate_audit::{Report, load_records, verify};

#[derive(Parser)]
#[command(name = "didgate-audit", version, about = "Verify didgate audit chains")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export one chain (a stopped process's store) as a CBOR sequence file.
    Export {
        /// A gateway data directory, client chain directory, or store.
        #[arg(long)]
        db: PathBuf,
        /// The file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify one or more gateway chains against any number of client chains.
    Verify {
        /// A gateway data directory or store (repeatable).
        #[arg(long = "gateway", required = true)]
        gateways: Vec<PathBuf>,
        /// A client data directory or chain store (repeatable).
        #[arg(long = "client")]
        clients: Vec<PathBuf>,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
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
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("didgate-audit: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Export { db, out } => {
            let dir = didgate_audit::store_dir(&db);
            if !dir.join("version").is_file() {
                anyhow::bail!("{} is not a store", db.display());
            }
            let store = didgate_audit::Store::open(&dir, &[])?;
            let (entries, checkpoints) = didgate_audit::export::export(&store, &out)?;
            eprintln!(
                "exported {entries} entries and {checkpoints} checkpoints to {}",
                out.display()
            );
            Ok(true)
        }
        Command::Verify {
            gateways,
            clients,
            json,
        } => {
            let load = |paths: &[PathBuf]| -> anyhow::Result<Vec<_>> {
                paths
                    .iter()
                    .map(|p| load_records(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
                    .collect()
            };
            let report = verify::verify(&load(&gateways)?, &load(&clients)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render(&report));
            }
            Ok(report.ok())
        }
    }
}

/// The human-readable verdict.
fn render(report: &Report) -> String {
    let mut out = String::new();
    for c in &report.chains {
        out.push_str(&format!(
            "chain {} ({} entries, {} calls) owner {}\n",
            c.label,
            c.entries,
            c.calls,
            c.owner.as_deref().unwrap_or("?")
        ));
    }
    out.push_str(&format!("cross-links checked: {}\n", report.cross_links));
    for v in &report.violations {
        out.push_str(&format!("VIOLATION {v}\n"));
    }
    if report.ok() {
        out.push_str("verdict: OK, every chain and cross-link holds\n");
    } else {
        out.push_str(&format!(
            "verdict: FAILED, {} violation(s)\n",
            report.violations.len()
        ));
    }
    out
}
