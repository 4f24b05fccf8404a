//! `didgate-audit`: verify gateway and client audit chains against each other.
//!
//! Exit status: 0 when every check holds, 1 on any violation, 2 on a usage or I/O error.
//!
//! `evidence` and `check-evidence` build and check the evidence bundle of one call
//! (specs/audit-log.md, "Evidence bundles"): exit status 1 when the evidence does not hold,
//! 2 also for a file that is not an evidence bundle.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use didgate_audit::{Report, evidence, load_records, verify};

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
    /// Write the evidence bundle of one call, checkable alone with `check-evidence`.
    ///
    /// The bundle holds the client's signed request, the gateway's signed receipt, the
    /// gateway's closing entry and its inclusion proof under the receipt's Merkle root.
    /// Exit status 1 if the chains hold no valid evidence for the call.
    Evidence {
        /// The client's chain: an export file, a client data directory, or a chain store.
        #[arg(long)]
        client: PathBuf,
        /// The gateway's chain: an export file, a gateway data directory, or its store.
        #[arg(long)]
        gateway: PathBuf,
        /// The call ID: 64 hex digits.
        #[arg(long, value_parser = parse_call)]
        call: [u8; 32],
        /// The bundle file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an evidence bundle alone, without either database.
    ///
    /// Exit status 0 if it holds, 1 if a check fails, 2 if the file cannot be read or is not
    /// an evidence bundle.
    CheckEvidence {
        /// The bundle file.
        file: PathBuf,
        /// Print the verdict as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// A call ID given on the command line: exactly 64 hex digits.
fn parse_call(s: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(s).map_err(|e| format!("not hex: {e}"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("{} bytes, a call ID is 32 (64 hex digits)", b.len()))
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
            let progress = Progress::new();
            let load = |paths: &[PathBuf]| -> anyhow::Result<Vec<_>> {
                paths
                    .iter()
                    .map(|p| {
                        progress.message(format!("loading {}", p.display()));
                        let r =
                            load_records(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
                        progress.add(r.entries.len() as u64);
                        Ok(r)
                    })
                    .collect()
            };
            let (gateways, clients) = (load(&gateways)?, load(&clients)?);
            progress.message(format!("verifying {} entries", progress.count()));
            let report = verify::verify(&gateways, &clients);
            progress.finish();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render(&report));
            }
            Ok(report.ok())
        }
        Command::Evidence {
            client,
            gateway,
            call,
            out,
        } => {
            let load =
                |p: &PathBuf| load_records(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
            let (client, gateway) = (load(&client)?, load(&gateway)?);
            let bundle = match evidence::build(&client, &gateway, call) {
                Ok(b) => b,
                Err(e @ evidence::EvidenceError::Store(_)) => return Err(e.into()),
                Err(e) => {
                    eprintln!(
                        "didgate-audit: no evidence for call {}: {e}",
                        hex::encode(call)
                    );
                    return Ok(false);
                }
            };
            let bytes = bundle.encode();
            std::fs::write(&out, &bytes).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
            eprintln!(
                "wrote evidence for call {} ({} bytes) to {}",
                hex::encode(call),
                bytes.len(),
                out.display()
            );
            Ok(true)
        }
        Command::CheckEvidence { file, json } => {
            let mut bytes = Vec::new();
            std::fs::File::open(&file)
                .and_then(|f| {
                    f.take(evidence::MAX_BUNDLE as u64 + 1)
                        .read_to_end(&mut bytes)
                })
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let verdict = match evidence::check(&bytes) {
                Err(e) if e.is_undecodable() => anyhow::bail!("{}: {e}", file.display()),
                other => other,
            };
            if json {
                let value = match &verdict {
                    Ok(v) => serde_json::json!({ "valid": true, "verdict": v }),
                    Err(e) => serde_json::json!({
                        "valid": false,
                        "failed": e.name(),
                        "detail": e.to_string(),
                    }),
                };
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", render_verdict(&file, &verdict));
            }
            Ok(verdict.is_ok())
        }
    }
}

/// The human-readable verdict on an evidence bundle.
fn render_verdict(
    file: &Path,
    verdict: &Result<evidence::Verdict, evidence::EvidenceError>,
) -> String {
    match verdict {
        Ok(v) => format!(
            "evidence {}\n\
             call     {}\n\
             client   {}\n\
             gateway  {}\n\
             request  {} {} {}\n\
             executed status {}, {} response bytes, BLAKE3 {}\n\
             entry    gateway seq {} under Merkle root {} (size {})\n\
             verdict: OK, the client signed this request and the gateway signed its execution\n",
            file.display(),
            hex::encode(v.call),
            v.client,
            v.gateway,
            v.method,
            v.upstream,
            v.path,
            v.status,
            v.resp_len,
            hex::encode(v.resp_b3),
            v.seq,
            hex::encode(v.root),
            v.seq.saturating_add(1),
        ),
        Err(e) => format!(
            "evidence {}\nverdict: INVALID, {}: {e}\n",
            file.display(),
            e.name()
        ),
    }
}

/// A spinner with an entry count on stderr, shown only when stderr is a terminal and the logs
/// are large enough for the wait to be noticed.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    count: std::cell::Cell<u64>,
}

impl Progress {
    /// Entries above which the spinner appears.
    const LARGE: u64 = 100_000;

    fn new() -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::hidden();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg} ({pos} entries, {elapsed})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar
        });
        Self {
            bar,
            count: std::cell::Cell::new(0),
        }
    }

    fn message(&self, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(msg);
            bar.tick();
        }
    }

    fn add(&self, n: u64) {
        self.count.set(self.count.get() + n);
        if let Some(bar) = &self.bar {
            bar.set_position(self.count.get());
            if self.count.get() >= Self::LARGE && bar.is_hidden() {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                bar.enable_steady_tick(std::time::Duration::from_millis(120));
            }
        }
    }

    fn count(&self) -> u64 {
        self.count.get()
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
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
    for u in &report.unknown_outcomes {
        out.push_str(&format!(
            "OUTCOME UNKNOWN {} seq {}: call {}: {}\n",
            u.chain, u.seq, u.call, u.detail
        ));
    }
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
