//! `didgate`: the didgate command-line client, a thin binary over the `didgate_client` library.
//!
//! Files live under the home directory (`--home`, env `DIDGATE_HOME`, default
//! `$HOME/.didgate`), laid out as `didgate_client::home` describes: `identity` (created by
//! `didgate keygen`), `config.toml` (the pinned gateway, written by `didgate pin`), `chain/`,
//! `chain.sock`, `chains/N`, `proxy-token` and `proxy-url` (for `didgate env`).
//!
//! Commands: `keygen [--seed-file PATH|-] [--encrypt]`, `whoami`, `pin --gateway ADDR
//! --gateway-did DID`, `call UPSTREAM METHOD PATH [--data @FILE|-|LITERAL] [--header 'K: V']...`,
//! `catalog [--upstream NAME]`, `export --out FILE`, `proxy [--listen ADDR]`,
//! `env UPSTREAM[/PREFIX]...` and `mcp`. With `--json`, results are printed as one JSON value on
//! stdout (an object; for `catalog`, `{"operations": [...]}`), and so is every failure, on every
//! exit path, as an object `{"error", "exit", ...}` (`proxy` prints one when it is ready; `mcp`
//! speaks JSON-RPC on stdout anyway). `--connect-timeout SECS` bounds each connection attempt to
//! the gateway (default 2 s), for `call`, `catalog`, `proxy` and `mcp`. A sealed identity's
//! passphrase comes from `DIDGATE_PASSPHRASE` or the terminal, never from argv.
//!
//! Exit status:
//!
//! - 0: success (for `call`, the upstream answered with an HTTP status below 400);
//! - 1: the upstream answered with an HTTP status of 400 or more (the body is still printed);
//! - 2: usage, configuration, identity or local I/O error;
//! - 3: the gateway refused the call (signed refusal, recorded in the chain);
//! - 4: any other call failure (gateway unreachable, connection lost, invalid answer);
//! - 5: the gateway at the address presented another DID than the pinned one (nothing sent).

mod mcp;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Parser, Subcommand};
use didgate_client::home::{Home, HomeError, Pin};
use didgate_client::identity::{self, IdentityError};
use didgate_client::local::{self, Caller, Link};
use didgate_client::proxy::{self, Proxy, ProxyConfig, ProxyToken};
use didgate_client::{Answer, CallError, CallSpec};
use didgate_protocol::{Did, Identity};
use zeroize::Zeroizing;

/// mimalloc instead of glibc's malloc: allocation and free were about 12% of the gateway's CPU
/// per call in `perf` (docs/performance.md, "Calls").
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status: the upstream answered with an HTTP status of 400 or more.
const EXIT_HTTP_ERROR: u8 = 1;
/// Exit status: usage, configuration, identity or local I/O error.
const EXIT_USAGE: u8 = 2;
/// Exit status: the gateway refused the call.
const EXIT_REFUSED: u8 = 3;
/// Exit status: any other call failure.
const EXIT_CALL_FAILED: u8 = 4;
/// Exit status: the gateway presented another DID than the pinned one.
const EXIT_WRONG_GATEWAY: u8 = 5;

const EXIT_HELP: &str = "\
Exit status:
  0  success (for `call`: HTTP status below 400)
  1  the upstream answered with HTTP status 400 or more (the body is still printed)
  2  usage, configuration, identity or local I/O error
  3  the gateway refused the call
  4  other call failure (gateway unreachable, connection lost, invalid answer)
  5  the gateway at the address presented another DID than the pinned one (nothing sent)
With --json, every failure is one JSON object on stdout: {\"error\", \"exit\", ...}.";

/// `didgate mcp`'s exit statuses: stdout is the JSON-RPC channel, so nothing else goes there.
const MCP_EXIT_HELP: &str = "\
Exit status:
  0  the MCP client ended the session (closed stdin)
  2  usage, configuration, identity or local I/O error (on stderr)
stdout carries JSON-RPC only: --json does not apply to mcp and is refused (exit 2, on stderr).
A refused or failed tool call is a tool result with isError, never an exit.";

#[derive(Parser)]
#[command(
    name = "didgate",
    version,
    about = "didgate client: sign API calls with your did:key and send them through a gateway",
    after_help = EXIT_HELP
)]
struct Cli {
    /// Home directory holding `identity`, `chain/` and `config.toml` [default: $HOME/.didgate].
    #[arg(long, global = true, env = "DIDGATE_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// Print results as one JSON object on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Act as this did:web (`did:web:example.com:agents:a1#key-1`): the DID URL of this key in
    /// the organisation's DID document, which must list it for authentication.
    #[arg(long = "as", global = true, env = "DIDGATE_AS", value_name = "DIDURL")]
    acting_as: Option<String>,
    /// Give up on a connection attempt to the gateway after SECS seconds (decimals allowed)
    /// [default: 2]; for `call`, `catalog`, `proxy` and `mcp`.
    #[arg(long, global = true, value_name = "SECS", value_parser = parse_timeout)]
    connect_timeout: Option<Duration>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create this client's identity (never overwrites an existing one) and print its DID.
    #[command(after_help = EXIT_HELP)]
    Keygen {
        /// Derive the identity from the 32-byte seed (64 hex digits) in this file, `-` for
        /// stdin, instead of a random one. Never on the command line: other users can read a
        /// process's argv.
        #[arg(long, value_name = "PATH")]
        seed_file: Option<PathBuf>,
        /// Seal the identity file under a passphrase (Argon2id + AES-256-GCM-SIV), read from
        /// DIDGATE_PASSPHRASE or asked for twice on the terminal; never from the command line.
        #[arg(long)]
        encrypt: bool,
    },
    /// Print this client's DID (`--document`: its DID document; for `--as did:web:...`, the
    /// document the organisation publishes, listing this key for authentication).
    #[command(after_help = EXIT_HELP)]
    Whoami {
        /// Print the DID document instead of the DID.
        #[arg(long)]
        document: bool,
    },
    /// Export this client's audit chain as a CBOR sequence file for `didgate-audit`, sealed
    /// first with its identity: the file ends with a checkpoint covering its last entry.
    #[command(after_help = EXIT_HELP)]
    Export {
        /// The file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Pin the gateway: write its address and DID to config.toml.
    #[command(after_help = EXIT_HELP)]
    Pin {
        /// The gateway's UDP address, e.g. 127.0.0.1:7443.
        #[arg(long, value_name = "ADDR")]
        gateway: String,
        /// The gateway's DID (did:key:z...).
        #[arg(long, value_name = "DID")]
        gateway_did: String,
    },
    /// Make one signed call through the gateway; the response body goes to stdout.
    #[command(after_help = EXIT_HELP)]
    Call {
        /// Upstream name as configured on the gateway.
        upstream: String,
        /// HTTP method (GET, POST, ...).
        method: String,
        /// Path starting with `/`, optionally with `?query`.
        path: String,
        /// Request body: `-` reads stdin, `@FILE` reads a file, anything else is sent literally.
        #[arg(long, short = 'd', value_name = "@FILE|-|LITERAL")]
        data: Option<String>,
        /// A request header `Name: value` (repeatable).
        #[arg(long = "header", short = 'H', value_name = "K: V")]
        headers: Vec<String>,
        /// Gateway address (overrides config.toml).
        #[arg(long, value_name = "ADDR")]
        gateway: Option<String>,
        /// Gateway DID (overrides config.toml).
        #[arg(long, value_name = "DID")]
        gateway_did: Option<String>,
    },
    /// List the operations this DID may call (the gateway's catalog, filtered by its policy):
    /// one line each, upstream, name, method, path template and description.
    #[command(after_help = EXIT_HELP)]
    Catalog {
        /// Only this upstream's operations.
        #[arg(long, value_name = "NAME")]
        upstream: Option<String>,
        /// Gateway address (overrides config.toml).
        #[arg(long, value_name = "ADDR")]
        gateway: Option<String>,
        /// Gateway DID (overrides config.toml).
        #[arg(long, value_name = "DID")]
        gateway_did: Option<String>,
    },
    /// Run the local HTTP proxy: `/UPSTREAM/path` becomes a signed call through the gateway.
    ///
    /// Prints the listen URL and the local token (also in HOME/proxy-token, mode 0600, kept
    /// across starts). Every call is recorded in HOME/chain, which the proxy holds while it
    /// runs. Stops on SIGINT or SIGTERM after the calls in flight.
    #[command(after_help = EXIT_HELP)]
    Proxy {
        /// Address to listen on (loopback only unless --allow-remote).
        #[arg(long, value_name = "ADDR", default_value = proxy::DEFAULT_LISTEN)]
        listen: String,
        /// Allow a listen address that is not loopback (the token still applies).
        #[arg(long)]
        allow_remote: bool,
        /// Replace the token with a new one first (clients holding the old one are refused).
        #[arg(long)]
        rotate_token: bool,
        /// A request header to pass on to the gateway besides content-type and accept
        /// (repeatable); all other request headers are dropped.
        #[arg(long = "forward-header", value_name = "NAME")]
        forward_headers: Vec<String>,
        /// Gateway address (overrides config.toml).
        #[arg(long, value_name = "ADDR")]
        gateway: Option<String>,
        /// Gateway DID (overrides config.toml).
        #[arg(long, value_name = "DID")]
        gateway_did: Option<String>,
    },
    /// Serve the Model Context Protocol over stdio: the tools are the operations this DID may
    /// call (the gateway's catalog), each tool call a signed call recorded in HOME/chain.
    #[command(after_help = MCP_EXIT_HELP)]
    Mcp {
        /// Gateway address (overrides config.toml).
        #[arg(long, value_name = "ADDR")]
        gateway: Option<String>,
        /// Gateway DID (overrides config.toml).
        #[arg(long, value_name = "DID")]
        gateway_did: Option<String>,
    },
    /// Print the environment lines an agent needs to use the proxy for these upstreams:
    /// `NAME_BASE_URL` (the proxy URL for the upstream, `UPSTREAM/PREFIX` appends a prefix)
    /// and `NAME_API_KEY` (the proxy token), plus `DIDGATE_PROXY_URL` and `DIDGATE_PROXY_TOKEN`.
    #[command(after_help = EXIT_HELP)]
    Env {
        /// Upstream names, optionally with a path prefix (`openai/v1`).
        #[arg(value_name = "UPSTREAM[/PREFIX]")]
        upstreams: Vec<String>,
        /// The proxy's address [default: the running proxy's, else 127.0.0.1:8787].
        #[arg(long, value_name = "ADDR")]
        proxy: Option<String>,
        /// Prefix each line with `export ` (for `eval "$(didgate env ... --export)"`).
        #[arg(long)]
        export: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let json = cli.json;
    if json && matches!(cli.command, Command::Mcp { .. }) {
        // stdout is the JSON-RPC channel: no JSON object of ours may go there
        eprintln!(
            "error: --json does not apply to `didgate mcp` (its stdout carries JSON-RPC only)"
        );
        return ExitCode::from(2);
    }
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow!(e).context("cannot start the async runtime"), json),
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => fail(&e, json),
    }
}

/// A command line clap rejects: its message on stderr (help and version are not errors), and
/// with `--json` also one JSON object on stdout.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.exit_code() == 0 {
        return ExitCode::SUCCESS;
    }
    // clap could not parse the command line, so look for --json the way it would have
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if json {
        let text = e.render().to_string();
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        let message = match e.kind() {
            clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                "a command is required (see `didgate --help`)"
            }
            _ => first.trim().trim_start_matches("error: "),
        };
        println!(
            "{}",
            serde_json::json!({"error": message, "exit": EXIT_USAGE})
        );
    }
    ExitCode::from(EXIT_USAGE)
}

/// An error that ended a command: a call error keeps its own exit status; anything else is a
/// usage, configuration, identity or I/O error (exit 2). With `--json`, one object on stdout.
fn fail(e: &anyhow::Error, json: bool) -> ExitCode {
    if let Some(call_error) = e.chain().find_map(|c| c.downcast_ref::<CallError>()) {
        return report_call_error(call_error, None, json);
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"error": format!("{e:#}"), "exit": EXIT_USAGE})
        );
    }
    eprintln!("didgate: {e:#}");
    ExitCode::from(EXIT_USAGE)
}

/// `--connect-timeout SECS`: more than 0 and at most an hour, decimals allowed.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!(
            "{text:?}: the timeout must be more than 0 and at most 3600 seconds"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{text:?}: {e}"))
}

/// The exit status of a failed call.
fn call_exit(e: &CallError) -> u8 {
    match e {
        CallError::Refused { .. } => EXIT_REFUSED,
        CallError::WrongGateway { .. } => EXIT_WRONG_GATEWAY,
        _ => EXIT_CALL_FAILED,
    }
}

/// A failed call (or catalog request) as one JSON object: `error`, `exit`, `kind`, `advice`,
/// the gateway's address when known, and what the error names (a refusal's code, reason, call
/// ID and gateway time; the DIDs of a wrong gateway).
fn call_error_json(e: &CallError, gateway: Option<SocketAddr>) -> serde_json::Value {
    let exit = call_exit(e);
    let mut object = serde_json::json!({
        "error": e.to_string(),
        "exit": exit,
        "advice": e.advice(),
    });
    let kind = match e {
        CallError::Refused {
            code,
            reason,
            gateway_time_ms,
            call,
        } => {
            object["refused"] = code.as_str().into();
            object["reason"] = reason.as_str().into();
            object["gateway_time_ms"] = (*gateway_time_ms).into();
            object["call"] = call.map(hex::encode).into();
            "refused"
        }
        CallError::WrongGateway {
            addr,
            presented,
            pinned,
        } => {
            object["gateway"] = addr.to_string().into();
            object["presented"] = presented.as_str().into();
            object["pinned"] = pinned.as_str().into();
            "wrong_gateway"
        }
        CallError::Unreachable(_) => "unreachable",
        CallError::ConnectionLost(_) => "connection_lost",
        CallError::OwnerLost { pid, .. } => {
            object["owner_pid"] = (*pid).into();
            "owner_lost"
        }
        CallError::InvalidAnswer(_) => "invalid_answer",
        CallError::Audit(_) => "local_audit",
        CallError::VersionUnsupported { .. } => "version_unsupported",
        _ => "call_failed",
    };
    object["kind"] = kind.into();
    if let Some(addr) = gateway
        && object.get("gateway").is_none()
    {
        object["gateway"] = addr.to_string().into();
    }
    object
}

/// Reports a failed call: one JSON object on stdout with `--json`, else the error and what to
/// do about it on stderr. Returns its exit status.
fn report_call_error(e: &CallError, gateway: Option<SocketAddr>, json: bool) -> ExitCode {
    if json {
        println!("{}", call_error_json(e, gateway));
    } else if let CallError::Refused {
        code, reason, call, ..
    } = e
    {
        let call = call.map(|c| format!(" (call {})", hex::encode(c)));
        eprintln!(
            "didgate: refused ({}): {reason}{}",
            code.as_str(),
            call.unwrap_or_default()
        );
        eprintln!("didgate: {}", e.advice());
    } else {
        eprintln!("didgate: {e}");
        eprintln!("didgate: {}", e.advice());
    }
    ExitCode::from(call_exit(e))
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("DIDGATE_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command. An `Err` is a usage, configuration, identity or I/O error (exit 2); call
/// outcomes choose their own exit status.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // before any key is read: no core dumps, private files
    didgate_client::hardening::harden_process()?;
    let home = Home::from_env(cli.home).map_err(cli_home_error)?;
    for (path, old, new) in
        didgate_client::hardening::private_dir(home.dir(), &[didgate_client::home::IDENTITY])?
    {
        tracing::warn!(path = %path.display(), "tightened mode {old:o} -> {new:o}");
        eprintln!(
            "didgate: {} was readable by others: mode {old:o} -> {new:o}",
            path.display()
        );
    }
    let ctx = Ctx {
        home,
        json: cli.json,
        acting: cli.acting_as,
        connect_timeout: cli.connect_timeout,
    };
    let home = &ctx.home;
    match cli.command {
        Command::Keygen { seed_file, encrypt } => {
            keygen(home, seed_file.as_deref(), encrypt, ctx.json)
        }
        Command::Whoami { document } => whoami(home, ctx.acting.as_deref(), document, ctx.json),
        Command::Export { out } => export(home, &out, ctx.json).await,
        Command::Pin {
            gateway,
            gateway_did,
        } => pin(home, &gateway, &gateway_did, ctx.json),
        Command::Call {
            upstream,
            method,
            path,
            data,
            headers,
            gateway,
            gateway_did,
        } => {
            let pinned = resolve_gateway(home, gateway.as_deref(), gateway_did.as_deref())?;
            let spec = build_spec(&upstream, &method, &path, data.as_deref(), &headers)?;
            let identity = load_identity_as(home, ctx.acting.as_deref())?;
            let caller = open_caller(&ctx, identity, pinned).await?;
            call(caller, spec, ctx.json).await
        }
        Command::Catalog {
            upstream,
            gateway,
            gateway_did,
        } => {
            let pinned = resolve_gateway(home, gateway.as_deref(), gateway_did.as_deref())?;
            let identity = load_identity_as(home, ctx.acting.as_deref())?;
            let caller = open_caller(&ctx, identity, pinned).await?;
            catalog(caller, upstream.as_deref(), ctx.json).await
        }
        Command::Proxy {
            listen,
            allow_remote,
            rotate_token,
            forward_headers,
            gateway,
            gateway_did,
        } => {
            let pinned = resolve_gateway(home, gateway.as_deref(), gateway_did.as_deref())?;
            let listen = parse_addr(&listen, "--listen")?;
            let identity = load_identity_as(home, ctx.acting.as_deref())?;
            let options = ProxyOptions {
                listen,
                allow_remote,
                rotate_token,
                forward_headers,
            };
            run_proxy(&ctx, identity, pinned, options).await
        }
        Command::Mcp {
            gateway,
            gateway_did,
        } => {
            let pinned = resolve_gateway(home, gateway.as_deref(), gateway_did.as_deref())?;
            let identity = load_identity_as(home, ctx.acting.as_deref())?;
            let caller = std::sync::Arc::new(open_caller(&ctx, identity, pinned).await?);
            let served = mcp::DidgateMcp::new(caller.clone()).run().await;
            caller.close().await;
            served?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Env {
            upstreams,
            proxy,
            export,
        } => env(home, &upstreams, proxy.as_deref(), export, ctx.json),
    }
}

/// What every command shares: the home directory and the global flags.
struct Ctx {
    home: Home,
    json: bool,
    /// `--as`: the did:web to act as.
    acting: Option<String>,
    /// `--connect-timeout`.
    connect_timeout: Option<Duration>,
}

/// The caller for `identity` and the gateway `pinned` (`--connect-timeout` applied): this
/// process holds the home's chain and serves the home's other processes, or calls through the
/// process that holds it, or falls back to a chain of its own (`didgate_client::local`).
async fn open_caller(ctx: &Ctx, identity: Identity, pin: Pin) -> anyhow::Result<Caller> {
    let timeout = ctx
        .connect_timeout
        .unwrap_or(didgate_client::CONNECT_TIMEOUT);
    let caller = Caller::from_home(&ctx.home, identity, &pin, timeout).await?;
    if let Some((chain, why)) = caller.fallback() {
        eprintln!(
            "didgate: recording in {} ({why}); `didgate-audit verify --client {}` reads every chain of the home",
            chain.display(),
            ctx.home.dir().display()
        );
    }
    Ok(caller)
}

struct ProxyOptions {
    listen: SocketAddr,
    allow_remote: bool,
    rotate_token: bool,
    forward_headers: Vec<String>,
}

async fn run_proxy(
    ctx: &Ctx,
    identity: Identity,
    pinned: Pin,
    options: ProxyOptions,
) -> anyhow::Result<ExitCode> {
    let (home, json) = (&ctx.home, ctx.json);
    let tokens = home.token_path();
    let token = if options.rotate_token {
        ProxyToken::rotate(&tokens)?
    } else {
        ProxyToken::load_or_create(&tokens)?
    };
    let mut config = ProxyConfig::new(options.listen, token.clone());
    config.allow_remote = options.allow_remote;
    for name in options.forward_headers {
        let name = name.trim().to_ascii_lowercase();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            bail!("invalid --forward-header {name:?}: expected a header name such as x-request-id");
        }
        config.forward_headers.push(name);
    }
    let server = Proxy::bind(config).await?;
    let client = open_caller(ctx, identity, pinned).await?;
    let url = format!("http://{}", server.local_addr());
    std::fs::write(home.proxy_url_path(), format!("{url}\n"))
        .with_context(|| format!("cannot write {}", home.proxy_url_path().display()))?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "url": url,
                "token": token.expose(),
                "token_file": tokens.display().to_string(),
                "did": client.did().as_str(),
            })
        );
    } else {
        println!("didgate proxy listening on {url} as {}", client.did());
        println!("token: {}", token.expose());
        println!(
            "use {url}/UPSTREAM/path with `Authorization: Bearer TOKEN` (`didgate env UPSTREAM` prints the variables)"
        );
    }
    std::io::stdout().flush().ok();
    let client = std::sync::Arc::new(client);
    server.serve(client.clone(), stop_signal()).await;
    let _ = std::fs::remove_file(home.proxy_url_path());
    client.close().await;
    if !json {
        eprintln!("didgate proxy stopped");
    }
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The variable name stem for an upstream: upper case, anything but letters and digits as `_`.
fn env_stem(upstream: &str) -> String {
    upstream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn env(
    home: &Home,
    upstreams: &[String],
    proxy: Option<&str>,
    export: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let url = match proxy {
        Some(a) => format!("http://{}", parse_addr(a, "--proxy")?),
        None => match std::fs::read_to_string(home.proxy_url_path()) {
            Ok(text) if text.trim().starts_with("http://") => text.trim().to_string(),
            _ => format!("http://{}", proxy::DEFAULT_LISTEN),
        },
    };
    let token = ProxyToken::load_or_create(&home.token_path())?;
    let mut vars: Vec<(String, String)> = vec![
        ("DIDGATE_PROXY_URL".into(), url.clone()),
        ("DIDGATE_PROXY_TOKEN".into(), token.expose().to_string()),
    ];
    for target in upstreams {
        let target = target.trim_matches('/');
        let upstream = target.split('/').next().unwrap_or_default();
        if upstream.is_empty()
            || !target
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        {
            bail!("invalid upstream {target:?}: expected NAME or NAME/PREFIX, e.g. openai/v1");
        }
        let stem = env_stem(upstream);
        vars.push((format!("{stem}_BASE_URL"), format!("{url}/{target}")));
        vars.push((format!("{stem}_API_KEY"), token.expose().to_string()));
    }
    let mut out = std::io::stdout().lock();
    if json {
        let object: serde_json::Map<String, serde_json::Value> = vars
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        writeln!(out, "{}", serde_json::Value::Object(object))?;
    } else {
        let prefix = if export { "export " } else { "" };
        for (k, v) in vars {
            writeln!(out, "{prefix}{k}={v}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A [`HomeError`] as this binary words it: naming its flags and commands.
fn cli_home_error(e: HomeError) -> anyhow::Error {
    match e {
        HomeError::NoHome => anyhow!("HOME is not set; pass --home DIR or set DIDGATE_HOME"),
        HomeError::NoGatewayAddr { path } => anyhow!(
            "no gateway address: pass --gateway ADDR or pin one with `didgate pin` (no `gateway` in {})",
            path.display()
        ),
        HomeError::NoGatewayDid { path } => anyhow!(
            "no gateway DID: pass --gateway-did DID or pin one with `didgate pin` (no `gateway_did` in {})",
            path.display()
        ),
        HomeError::NoIdentity { path } => anyhow!(
            "no identity at {}; run `didgate keygen` first",
            path.display()
        ),
        HomeError::Identity(IdentityError::Exists(p)) => anyhow!(
            "identity {p} already exists; refusing to overwrite it (use another --home to create a new one)"
        ),
        HomeError::Identity(e) => anyhow!(e),
        // the message names its cause: one line, as before
        other => anyhow!("{other}"),
    }
}

fn print_did(did: &Did, json: bool) {
    if json {
        println!("{}", serde_json::json!({ "did": did.as_str() }));
    } else {
        println!("{did}");
    }
}

fn keygen(
    home: &Home,
    seed_file: Option<&Path>,
    encrypt: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let identity = match seed_file {
        None => Identity::generate(),
        Some(path) => Identity::from_seed(&*read_seed(path)?),
    };
    let path = home.identity_path();
    if path.exists() {
        bail!(
            "identity {} already exists; refusing to overwrite it (use another --home to create a new one)",
            path.display()
        );
    }
    let created = if encrypt {
        let pass = passphrase(&path, true)?;
        identity::create_sealed(&path, &identity, &pass)
    } else {
        identity::create(&path, &identity)
    };
    created.map_err(|e| cli_home_error(HomeError::Identity(e)))?;
    print_did(identity.did(), json);
    Ok(ExitCode::SUCCESS)
}

/// The 32-byte seed written as 64 hex digits (surrounding whitespace allowed) in `path`, or on
/// stdin for `-`. Zeroized after use; never echoed in an error.
fn read_seed(path: &Path) -> anyhow::Result<Zeroizing<[u8; 32]>> {
    let mut text = Zeroizing::new(String::new());
    let from = if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(4096)
            .read_to_string(&mut text)
            .context("cannot read the seed from stdin")?;
        "stdin".to_string()
    } else {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open the seed file {}", path.display()))?;
        file.take(4096)
            .read_to_string(&mut text)
            .with_context(|| format!("cannot read the seed file {}", path.display()))?;
        path.display().to_string()
    };
    let hex_text = text.trim();
    if hex_text.len() != 64 {
        bail!(
            "the seed in {from} must be exactly 64 hex digits (32 bytes); got {} characters",
            hex_text.len()
        );
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(hex_text, seed.as_mut())
        .map_err(|_| anyhow!("the seed in {from} must be exactly 64 hex digits (0-9, a-f)"))?;
    Ok(seed)
}

/// Loads the identity, acting as the did:web of `acting` (a DID URL) if given.
fn load_identity_as(home: &Home, acting: Option<&str>) -> anyhow::Result<Identity> {
    let identity = load_identity(home)?;
    let Some(url) = acting else {
        return Ok(identity);
    };
    let (did, fragment) = url
        .split_once('#')
        .ok_or_else(|| anyhow!("--as {url:?}: expected did:web:...#fragment"))?;
    let did = didgate_protocol::WebDid::parse(did).map_err(|e| anyhow!("--as {url:?}: {e}"))?;
    let ok = !fragment.is_empty()
        && fragment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b));
    if !ok {
        anyhow::bail!("--as {url:?}: the fragment must be [A-Za-z0-9._~-]+");
    }
    Ok(identity.acting_as(did, fragment))
}

/// The home's identity, asking for the passphrase of a sealed one ([`passphrase`]).
fn load_identity(home: &Home) -> anyhow::Result<Identity> {
    home.identity_with(|path| passphrase(path, false).map_err(LoadError::Prompt))
        .map_err(|e| match e {
            LoadError::Prompt(e) => e,
            LoadError::Home(e) => cli_home_error(e),
        })
}

/// Why [`load_identity`] failed: the passphrase prompt, or the home.
enum LoadError {
    Prompt(anyhow::Error),
    Home(HomeError),
}

impl From<HomeError> for LoadError {
    fn from(e: HomeError) -> Self {
        Self::Home(e)
    }
}

/// The passphrase of a sealed identity: DIDGATE_PASSPHRASE, else asked on the terminal
/// (twice when `confirm`). Never taken from the command line.
fn passphrase(path: &Path, confirm: bool) -> anyhow::Result<Zeroizing<String>> {
    use std::io::IsTerminal;
    if let Some(p) = std::env::var_os("DIDGATE_PASSPHRASE") {
        let p = p
            .into_string()
            .map_err(|_| anyhow!("DIDGATE_PASSPHRASE is not valid UTF-8"))?;
        return Ok(Zeroizing::new(p));
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "identity {} needs a passphrase: set DIDGATE_PASSPHRASE (no terminal to ask on)",
            path.display()
        );
    }
    let first = Zeroizing::new(
        rpassword::prompt_password(format!("passphrase for {}: ", path.display()))
            .context("cannot read the passphrase")?,
    );
    if confirm {
        let again = Zeroizing::new(
            rpassword::prompt_password("the same passphrase again: ")
                .context("cannot read the passphrase")?,
        );
        if *again != *first {
            bail!("the two passphrases differ; nothing was written");
        }
    }
    Ok(first)
}

fn whoami(
    home: &Home,
    acting: Option<&str>,
    document: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let identity = load_identity_as(home, acting)?;
    let principal = identity.principal();
    if !document {
        if json {
            println!(
                "{}",
                serde_json::json!({"did": principal.as_str(), "key": identity.did().as_str()})
            );
        } else {
            println!("{principal}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let text = match &principal {
        didgate_protocol::Principal::Key(did) => didgate_protocol::web::did_key_document(did)?,
        didgate_protocol::Principal::Web(web) => {
            let kid = identity.key_id();
            let fragment = kid.rsplit_once('#').map(|(_, f)| f).unwrap_or_default();
            didgate_protocol::web::did_web_document(web, fragment, identity.did())
        }
    };
    if json {
        let doc: serde_json::Value = serde_json::from_str(&text)?;
        println!(
            "{}",
            serde_json::json!({"did": principal.as_str(), "document": doc})
        );
    } else {
        println!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `didgate export`: seals the client chain with this client's identity (a checkpoint of its
/// head unless one covers it; nothing else is written), then exports it: the file ends with a
/// checkpoint covering its last entry.
async fn export(home: &Home, out: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let dir = home.chain_dir();
    if !dir.join("version").is_file() {
        anyhow::bail!(
            "no chain at {} yet (it is created by the first call)",
            dir.display()
        );
    }
    // the key DID owns the chain (never a did:web it acts as)
    let identity = std::sync::Arc::new(load_identity(home)?);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let closing_deadline = std::time::Instant::now() + Duration::from_secs(65);
    let exported = loop {
        match didgate_audit::Store::open(&dir, &[didgate_client::PENDING]) {
            Ok(store) => break export_store(store, &identity, out)?,
            Err(e) if e.is_locked() => {}
            Err(e) => anyhow::bail!("{}: {e}", dir.display()),
        }
        // held by another process of this home: it exports for us
        match Link::new(home, identity.clone(), None).export(out).await {
            Ok(done) => break done,
            Err(local::ExportThroughError::Link(local::LinkError::NoOwner { .. }))
                if std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(local::ExportThroughError::Link(local::LinkError::Closing { .. }))
                if std::time::Instant::now() < closing_deadline =>
            {
                // the owner releases the chain once its calls in flight end
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            Err(e) => anyhow::bail!(
                "{}: held by another didgate process, which could not export it: {e}",
                dir.display()
            ),
        }
    };
    let fallbacks = didgate_audit::fallback_chains(home.dir());
    if json {
        println!(
            "{}",
            serde_json::json!({
                "entries": exported.entries,
                "checkpoints": exported.checkpoints,
                "sealed": true,
                "sealed_now": exported.sealed_now,
                "out": out.display().to_string(),
                "other_chains": fallbacks.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            })
        );
    } else {
        eprintln!(
            "exported {} entries and {} checkpoints to {} (sealed: the last checkpoint covers the last entry)",
            exported.entries,
            exported.checkpoints,
            out.display()
        );
        for chain in fallbacks {
            eprintln!(
                "didgate: this home also has the fallback chain {} (`didgate-audit verify --client {}` reads it)",
                chain.display(),
                home.dir().display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Seals and exports the chain in `store` (held by this process), after closing the calls a
/// process that ended mid-call left pending (as any process opening the chain does).
fn export_store(
    store: didgate_audit::Store,
    identity: &std::sync::Arc<Identity>,
    out: &Path,
) -> anyhow::Result<local::Exported> {
    let chain = didgate_audit::store::Chain::open(
        store,
        identity.clone(),
        didgate_audit::entry::Role::Client,
        didgate_client::low_level::now_ms(),
        didgate_audit::store::CheckpointPolicy::default(),
    )
    .context("cannot open the chain")?;
    let exported = didgate_client::close_pending(&chain)
        .context("cannot close the calls left pending")
        .and_then(|_| {
            let out = out.to_path_buf();
            chain
                .seal_then(move |store, sealed| {
                    didgate_audit::export::export_sealed(store, &out).map(|n| (n, sealed.written))
                })
                .context("cannot seal the chain")
        });
    chain.close();
    let ((entries, checkpoints), sealed_now) = exported??;
    Ok(local::Exported {
        entries,
        checkpoints,
        sealed_now,
    })
}

fn parse_addr(text: &str, what: &str) -> anyhow::Result<SocketAddr> {
    text.trim().parse().map_err(|e| {
        anyhow!("invalid {what} {text:?}: {e} (expected IP:PORT, e.g. 127.0.0.1:7443)")
    })
}

fn parse_did(text: &str, what: &str) -> anyhow::Result<Did> {
    Did::parse(text.trim()).map_err(|e| anyhow!("invalid {what} {text:?}: {e}"))
}

fn pin(home: &Home, gateway: &str, gateway_did: &str, json: bool) -> anyhow::Result<ExitCode> {
    let addr = parse_addr(gateway, "--gateway")?;
    let did = parse_did(gateway_did, "--gateway-did")?;
    let path = home.pin(addr, &did).map_err(cli_home_error)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"gateway": addr.to_string(), "gateway_did": did.as_str(), "config": path.display().to_string()})
        );
    } else {
        eprintln!("pinned gateway {did} at {addr} in {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The gateway address and DID: each from its flag, else from config.toml.
fn resolve_gateway(
    home: &Home,
    gateway: Option<&str>,
    gateway_did: Option<&str>,
) -> anyhow::Result<Pin> {
    let addr = gateway
        .map(|flag| parse_addr(flag, "--gateway"))
        .transpose()?;
    let did = gateway_did
        .map(|flag| parse_did(flag, "--gateway-did"))
        .transpose()?;
    home.resolve(addr, did).map_err(cli_home_error)
}

fn read_body(data: Option<&str>) -> anyhow::Result<Vec<u8>> {
    match data {
        None => Ok(Vec::new()),
        Some("-") => {
            let mut body = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut body)
                .context("cannot read the body from stdin")?;
            Ok(body)
        }
        Some(d) => match d.strip_prefix('@') {
            Some(file) => std::fs::read(file).with_context(|| format!("cannot read {file}")),
            None => Ok(d.as_bytes().to_vec()),
        },
    }
}

fn parse_header(text: &str) -> anyhow::Result<(String, String)> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| anyhow!("invalid --header {text:?}: expected 'Name: value'"))?;
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("invalid --header {text:?}: the name is empty or contains spaces");
    }
    Ok((name, value.trim().to_string()))
}

fn build_spec(
    upstream: &str,
    method: &str,
    path: &str,
    data: Option<&str>,
    headers: &[String],
) -> anyhow::Result<CallSpec> {
    if upstream.is_empty() {
        bail!("the upstream name is empty");
    }
    if method.is_empty() || !method.chars().all(|c| c.is_ascii_alphabetic()) {
        bail!("invalid method {method:?} (expected e.g. GET or POST)");
    }
    if !path.starts_with('/') {
        bail!("invalid path {path:?}: it must start with '/'");
    }
    let mut spec = CallSpec::new(upstream, method, path).body(read_body(data)?);
    for h in headers {
        let (name, value) = parse_header(h)?;
        spec = spec.header(&name, &value);
    }
    Ok(spec)
}

async fn call(client: Caller, spec: CallSpec, json: bool) -> anyhow::Result<ExitCode> {
    let gateway = client.gateway_addr();
    let result = client.call(spec).await;
    client.close().await;
    match result {
        Ok(answer) => print_answer(&answer, json),
        Err(e) => Ok(report_call_error(&e, Some(gateway), json)),
    }
}

/// `didgate call --json`: the answer as one object. `body` is the response body parsed as JSON
/// when it is JSON; otherwise it is the body as text (lossy UTF-8), also given as `body_text`
/// (whose presence says the body is not JSON).
fn answer_json(answer: &Answer, exit: u8) -> serde_json::Value {
    let mut object = serde_json::json!({
        "status": answer.status,
        "call": hex::encode(answer.call),
        "receipt_entry": answer.receipt.entry.seq,
        "exit": exit,
    });
    match serde_json::from_slice::<serde_json::Value>(&answer.body) {
        Ok(value) => object["body"] = value,
        Err(_) => {
            let text = String::from_utf8_lossy(&answer.body);
            object["body"] = text.as_ref().into();
            object["body_text"] = text.as_ref().into();
        }
    }
    if exit != 0 {
        object["error"] = format!("the upstream answered HTTP status {}", answer.status).into();
    }
    object
}

fn print_answer(answer: &Answer, json: bool) -> anyhow::Result<ExitCode> {
    let call = hex::encode(answer.call);
    let seq = answer.receipt.entry.seq;
    let exit = if answer.status >= 400 {
        EXIT_HTTP_ERROR
    } else {
        0
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", answer_json(answer, exit)).context("cannot write to stdout")?;
    } else {
        out.write_all(&answer.body)
            .context("cannot write the response body to stdout")?;
    }
    out.flush().context("cannot write to stdout")?;
    if !json {
        eprintln!(
            "{} (receipt: gateway entry {seq}, call {call})",
            answer.status
        );
    }
    Ok(ExitCode::from(exit))
}

/// `didgate catalog`: the operations this DID may call, one line each (upstream, name,
/// method, path template, description; columns aligned), or with `--json` an array of objects
/// with those fields.
async fn catalog(client: Caller, upstream: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let gateway = client.gateway_addr();
    let result = client.catalog(upstream).await;
    let did = client.did().clone();
    client.close().await;
    let ops = match result {
        Ok(ops) => ops,
        Err(e) => return Ok(report_call_error(&e, Some(gateway), json)),
    };
    let mut out = std::io::stdout().lock();
    if json {
        // one object, as every --json output: {"operations": [...]}
        let list = serde_json::to_value(&ops).context("cannot encode the catalog")?;
        let doc = serde_json::json!({ "operations": list });
        writeln!(out, "{doc}").context("cannot write to stdout")?;
        return Ok(ExitCode::SUCCESS);
    }
    let width = |f: fn(&didgate_client::Operation) -> &str| {
        ops.iter().map(|o| f(o).chars().count()).max().unwrap_or(0)
    };
    let widths = [
        width(|o| &o.upstream),
        width(|o| &o.name),
        width(|o| &o.method),
        width(|o| &o.path),
    ];
    for o in &ops {
        let line = format!(
            "{:w0$}  {:w1$}  {:w2$}  {:w3$}  {}",
            o.upstream,
            o.name,
            o.method,
            o.path,
            o.description,
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
        );
        writeln!(out, "{}", line.trim_end()).context("cannot write to stdout")?;
    }
    out.flush().context("cannot write to stdout")?;
    if ops.is_empty() {
        eprintln!(
            "didgate: no operations{}: the gateway's policy lets {did} call none of its catalog (ask the operator)",
            upstream.map(|u| format!(" of {u}")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
