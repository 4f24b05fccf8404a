//! `didgate-audit`: verify gateway and client audit chains against each other.
//!
//! Exit status: 0 when every check holds, 1 on any violation, 2 on a usage or I/O error.
//!
//! `evidence` and `check-evidence` build and check the evidence bundle of one call
//! (specs/audit-log.md, "Evidence bundles"): exit status 1 when the evidence does not hold,
//! 2 also for a file that is not an evidence bundle.
//!
//! With `--json` (`verify`, `check-evidence`), every exit path prints exactly one JSON object
//! on stdout, errors included (their message also goes to stderr): see each command's
//! documentation for its shapes. A usage error clap reports (an unknown flag, a missing
//! argument) is clap's text on stderr, exit status 2, even with `--json`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use didgate_audit::export::ExportError;
use didgate_audit::nodes::Revocations;
use didgate_audit::{LoadError, Report, evidence, load_records, verify};

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
    ///
    /// Exit status 0 if every check holds, 1 on any violation, 2 if a chain cannot be loaded.
    ///
    /// With --json, stdout holds one JSON object: the report, {"chains", "cross_links",
    /// "violations", "unknown_outcomes"} (exit status 0 or 1), or, when a chain cannot be
    /// loaded, {"error": KIND, "detail": "PATH: message", "exit": 2}, KIND one of not_found
    /// (PATH does not exist), not_a_chain (neither an export file nor a store), unreadable
    /// (I/O error), malformed (an export file that does not decode or is truncated, an empty
    /// one included) or store (the store cannot be opened or read, e.g. its owner holds it);
    /// or, for a --node-revocations FILE, not_found, unreadable or bad_node_revocations (not a
    /// revocation list signed by the gateway it names).
    Verify {
        /// A gateway data directory or store (repeatable).
        #[arg(long = "gateway", required = true)]
        gateways: Vec<PathBuf>,
        /// A client home, chain store or export file (repeatable); a home's fallback chains
        /// (`chains/N`) are read with its chain.
        #[arg(long = "client")]
        clients: Vec<PathBuf>,
        /// Report entries no signed checkpoint covers (`unsealed_tail`) as a violation in
        /// every chain; without it, only in exports declared sealed (a warning otherwise).
        #[arg(long)]
        strict: bool,
        #[command(flatten)]
        nodes: NodeRevocationFiles,
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
    ///
    /// With --json, stdout holds one JSON object: {"valid": true, "verdict": {...}} (exit
    /// status 0); {"valid": false, "failed": NAME, "detail": "message"} when a check fails
    /// (exit status 1, NAME the check, e.g. inclusion); or {"valid": false, "failed": KIND,
    /// "detail": "message", "exit": 2} when FILE cannot be read (KIND not_found or
    /// unreadable, a directory included) or is not a bundle this reader reads (KIND
    /// too_large, malformed, an empty file included, not_evidence or version), or a
    /// --node-revocations FILE cannot be read (not_found, unreadable) or is not a revocation
    /// list signed by the gateway it names (bad_node_revocations).
    CheckEvidence {
        /// The bundle file.
        file: PathBuf,
        #[command(flatten)]
        nodes: NodeRevocationFiles,
        /// Print the verdict as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// The node revocation lists a check applies (specs/audit-log.md, "Receipt checks").
#[derive(clap::Args)]
struct NodeRevocationFiles {
    /// A gateway's signed node revocation list (COSE, as the gateway signs it; repeatable):
    /// a node certificate it revokes fails the messages its node signed from the revocation
    /// time on. Of several lists of one gateway, the one with the greatest seq applies.
    #[arg(long = "node-revocations", value_name = "FILE")]
    files: Vec<PathBuf>,
}

/// The largest revocation list file read, in bytes (a list holds at most 1024 serials).
const MAX_REVOCATIONS_FILE: u64 = 1 << 20;

impl NodeRevocationFiles {
    /// Reads every file and takes its list: a file that cannot be read, or that is not a node
    /// revocation list signed by the gateway it names, is a usage error (exit status 2).
    fn load(&self) -> Result<Revocations, Failure> {
        let mut revocations = Revocations::new();
        for path in &self.files {
            let failure = |kind, why: String| Failure {
                kind,
                detail: format!("--node-revocations {}: {why}", path.display()),
            };
            let mut bytes = Vec::new();
            std::fs::File::open(path)
                .and_then(|f| f.take(MAX_REVOCATIONS_FILE + 1).read_to_end(&mut bytes))
                .map_err(|e| failure(io_kind(&e), e.to_string()))?;
            if bytes.len() as u64 > MAX_REVOCATIONS_FILE {
                let why = format!("larger than {MAX_REVOCATIONS_FILE} bytes");
                return Err(failure("bad_node_revocations", why));
            }
            revocations
                .add(&bytes)
                .map_err(|e| failure("bad_node_revocations", e.to_string()))?;
        }
        Ok(revocations)
    }
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
    match cli.command {
        Command::Export { db, out } => exit_status(export(&db, &out)),
        Command::Verify {
            gateways,
            clients,
            strict,
            nodes,
            json,
        } => verify_command(&gateways, &clients, strict, &nodes, json),
        Command::Evidence {
            client,
            gateway,
            call,
            out,
        } => exit_status(evidence_command(&client, &gateway, call, &out)),
        Command::CheckEvidence { file, nodes, json } => check_evidence_command(&file, &nodes, json),
    }
}

/// The exit status of a command without `--json`: 0 for `Ok(true)`, 1 for `Ok(false)`, 2 for
/// an error (printed on stderr).
fn exit_status(result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("didgate-audit: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Why a `--json` command could not reach its verdict (exit status 2): a stable snake_case
/// kind and the message.
struct Failure {
    kind: &'static str,
    detail: String,
}

impl Failure {
    /// A chain given to `verify` that cannot be loaded.
    fn load(path: &Path, e: &LoadError) -> Self {
        let kind = match e {
            LoadError::NotFound(_) => match std::fs::metadata(path) {
                Err(io) if io.kind() == std::io::ErrorKind::NotFound => "not_found",
                Err(_) => "unreadable",
                Ok(_) => "not_a_chain",
            },
            LoadError::Export(ExportError::Io(io)) => io_kind(io),
            LoadError::Export(ExportError::Malformed { .. } | ExportError::Truncated(_)) => {
                "malformed"
            }
            LoadError::Store(_) | LoadError::Export(ExportError::Store(_)) => "store",
            _ => "unreadable",
        };
        Self {
            kind,
            detail: format!("{}: {e}", path.display()),
        }
    }

    /// Reports the failure on stderr, and on stdout as `json` if given; exit status 2.
    fn report(&self, json: Option<serde_json::Value>) -> ExitCode {
        eprintln!("didgate-audit: {}", self.detail);
        if let Some(value) = json {
            println!("{value:#}");
        }
        ExitCode::from(2)
    }

    /// The `verify --json` object: `{"error": KIND, "detail": TEXT, "exit": 2}`.
    fn verify_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.kind, "detail": self.detail, "exit": 2 })
    }

    /// The `check-evidence --json` object: `{"valid": false, "failed": KIND, "detail": TEXT,
    /// "exit": 2}`, an invalid verdict's shape with the exit status.
    fn check_evidence_json(&self) -> serde_json::Value {
        serde_json::json!({
            "valid": false,
            "failed": self.kind,
            "detail": self.detail,
            "exit": 2,
        })
    }
}

/// The kind of an I/O error on a path given on the command line.
fn io_kind(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::NotFound {
        "not_found"
    } else {
        "unreadable"
    }
}

/// `export`: writes one chain (a stopped process's store) to a file.
fn export(db: &Path, out: &Path) -> anyhow::Result<bool> {
    let dir = didgate_audit::store_dir(db);
    if !dir.join("version").is_file() {
        anyhow::bail!("{} is not a store", db.display());
    }
    let store = didgate_audit::Store::open(&dir, &[])?;
    let (entries, checkpoints) = didgate_audit::export::export(&store, out)?;
    eprintln!(
        "exported {entries} entries and {checkpoints} checkpoints to {}",
        out.display()
    );
    Ok(true)
}

/// `verify`: exit status 0 when every check holds, 1 on a violation, 2 when a chain or a
/// revocation list cannot be loaded; with `json`, every outcome is one JSON object on stdout.
fn verify_command(
    gateways: &[PathBuf],
    clients: &[PathBuf],
    strict: bool,
    nodes: &NodeRevocationFiles,
    json: bool,
) -> ExitCode {
    let revocations = match nodes.load() {
        Ok(r) => r,
        Err(f) => return f.report(json.then(|| f.verify_json())),
    };
    let options = verify::Options {
        strict,
        revocations,
    };
    let report = match load_and_verify(gateways, clients, options) {
        Ok(r) => r,
        Err(f) => return f.report(json.then(|| f.verify_json())),
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                let f = Failure {
                    kind: "internal",
                    detail: format!("cannot encode the report: {e}"),
                };
                return f.report(Some(f.verify_json()));
            }
        }
    } else {
        print!("{}", render(&report));
    }
    if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Loads every chain (with a spinner on a terminal) and verifies them against each other.
fn load_and_verify(
    gateways: &[PathBuf],
    clients: &[PathBuf],
    options: verify::Options,
) -> Result<Report, Failure> {
    let progress = Progress::new();
    let load = |paths: &[PathBuf]| -> Result<Vec<_>, Failure> {
        paths
            .iter()
            .map(|p| {
                progress.message(format!("loading {}", p.display()));
                let r = load_records(p).map_err(|e| Failure::load(p, &e))?;
                progress.add(r.entries.len() as u64);
                Ok(r)
            })
            .collect()
    };
    let clients = with_fallback_chains(clients);
    let loaded = load(gateways).and_then(|g| load(&clients).map(|c| (g, c)));
    let (gateways, clients) = match loaded {
        Ok(chains) => chains,
        Err(f) => {
            progress.finish();
            return Err(f);
        }
    };
    progress.message(format!("verifying {} entries", progress.count()));
    let report = verify::verify_opts(&gateways, &clients, options);
    progress.finish();
    Ok(report)
}

/// The client chains to verify: each path given, and for a client home, its fallback chains
/// too (`chains/N`, written by a process of the home whose calls the chain's owner could not
/// make; `didgate_client::local`).
fn with_fallback_chains(clients: &[PathBuf]) -> Vec<PathBuf> {
    clients
        .iter()
        .flat_map(|path| std::iter::once(path.clone()).chain(didgate_audit::fallback_chains(path)))
        .collect()
}

/// `evidence`: writes the evidence bundle of one call; `Ok(false)` when the chains hold no
/// valid evidence for it.
fn evidence_command(
    client: &Path,
    gateway: &Path,
    call: [u8; 32],
    out: &Path,
) -> anyhow::Result<bool> {
    let load = |p: &Path| load_records(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()));
    let (client, gateway) = (load(client)?, load(gateway)?);
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
    std::fs::write(out, &bytes).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    eprintln!(
        "wrote evidence for call {} ({} bytes) to {}",
        hex::encode(call),
        bytes.len(),
        out.display()
    );
    Ok(true)
}

/// `check-evidence`: exit status 0 when the bundle holds, 1 when a check fails, 2 when FILE
/// or a revocation list cannot be read or is not one; with `json`, every outcome is one JSON
/// object on stdout.
fn check_evidence_command(file: &Path, nodes: &NodeRevocationFiles, json: bool) -> ExitCode {
    let revocations = match nodes.load() {
        Ok(r) => r,
        Err(f) => return f.report(json.then(|| f.check_evidence_json())),
    };
    let failed = |f: Failure| {
        let detail = format!("{}: {}", file.display(), f.detail);
        let value = json.then(|| f.check_evidence_json());
        Failure { detail, ..f }.report(value)
    };
    let bytes = match read_bundle(file) {
        Ok(b) => b,
        Err(e) => {
            return failed(Failure {
                kind: io_kind(&e),
                detail: e.to_string(),
            });
        }
    };
    let verdict = evidence::check_with(&bytes, &revocations);
    if let Err(e) = &verdict
        && e.is_undecodable()
    {
        return failed(Failure {
            kind: e.name(),
            detail: e.to_string(),
        });
    }
    if json {
        let value = match &verdict {
            Ok(v) => match serde_json::to_value(v) {
                Ok(v) => serde_json::json!({ "valid": true, "verdict": v }),
                Err(e) => {
                    return failed(Failure {
                        kind: "internal",
                        detail: format!("cannot encode the verdict: {e}"),
                    });
                }
            },
            Err(e) => serde_json::json!({
                "valid": false,
                "failed": e.name(),
                "detail": e.to_string(),
            }),
        };
        println!("{value:#}");
    } else {
        print!("{}", render_verdict(file, &verdict));
    }
    if verdict.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The bytes of FILE, at most one more than [`evidence::MAX_BUNDLE`] (enough to refuse it as
/// too large).
fn read_bundle(file: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(file)?
        .take(evidence::MAX_BUNDLE as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
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
             {}\
             request  {} {} {}\n\
             executed status {}, {} response bytes, BLAKE3 {}\n\
             entry    gateway seq {} under Merkle root {} (size {})\n\
             verdict: OK, the client signed this request and the gateway signed its execution\n",
            file.display(),
            hex::encode(v.call),
            v.client,
            v.gateway,
            v.node
                .as_ref()
                .map_or(String::new(), |n| format!("node     {n}\n")),
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
    for w in &report.warnings {
        out.push_str(&format!("WARNING {w}\n"));
    }
    for s in &report.skipped {
        out.push_str(&format!("SKIPPED {}: {}: {}\n", s.chain, s.check, s.reason));
    }
    for v in &report.violations {
        out.push_str(&format!("VIOLATION {v}\n"));
    }
    if report.ok() && report.warnings.is_empty() {
        out.push_str("verdict: OK, every chain and cross-link holds\n");
    } else if report.ok() {
        out.push_str(&format!(
            "verdict: OK with {} warning(s): every check holds, but see the warnings\n",
            report.warnings.len()
        ));
    } else {
        out.push_str(&format!(
            "verdict: FAILED, {} violation(s), {} check(s) skipped\n",
            report.violations.len(),
            report.skipped.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use didgate_protocol::Identity;
    use didgate_protocol::message::SignedMessage;
    use didgate_protocol::node::{NodeRevocations, Revoked};

    use super::*;

    fn list(gateway: &Identity, seq: u64) -> Vec<u8> {
        NodeRevocations {
            v: 2,
            gateway: gateway.did().to_string(),
            seq,
            time_ms: 5,
            revoked: vec![Revoked {
                serial: 1,
                time_ms: 5,
            }],
        }
        .sign(gateway)
    }

    /// `--node-revocations`: each file a signed list, the newest per gateway kept; a file that
    /// cannot be read or does not open is a usage error naming the file.
    #[test]
    fn node_revocation_files_load_or_fail_as_usage_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let gateway = Identity::from_seed(&[0x50; 32]);
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            path
        };
        let files = NodeRevocationFiles {
            files: vec![
                write("two", &list(&gateway, 2)),
                write("one", &list(&gateway, 1)),
            ],
        };
        let loaded = files.load().map_err(|f| f.detail).expect("loads");
        assert_eq!(loaded.of(gateway.did()).map(|l| l.seq), Some(2));
        // signed by another key than the gateway it names
        let forged = NodeRevocations {
            v: 2,
            gateway: gateway.did().to_string(),
            seq: 3,
            time_ms: 5,
            revoked: Vec::new(),
        };
        let by_node = write("forged", &forged.sign(&Identity::from_seed(&[0x51; 32])));
        for (path, kind) in [
            (by_node, "bad_node_revocations"),
            (write("junk", b"junk"), "bad_node_revocations"),
            (dir.path().join("absent"), "not_found"),
        ] {
            let files = NodeRevocationFiles {
                files: vec![path.clone()],
            };
            let failure = files.load().expect_err("refused");
            assert_eq!(failure.kind, kind);
            assert!(
                failure.detail.starts_with("--node-revocations ")
                    && failure.detail.contains(&path.display().to_string()),
                "{}",
                failure.detail
            );
        }
    }
}
