//! The canary secret after everything a deployment goes through: the demo command, the
//! `didgate` CLI calling through a `didgated serve` process that logs at debug level, attacks
//! that the gateway refuses, a kill -9 in the middle of a call and a restart. The plaintext
//! canary is found in no file, no log line, no audit entry (decoded, so a compressed block
//! cannot hide it), no client output, and not in the client process's memory, read through
//! `/proc/PID/mem` while its call is in flight with the key injected upstream. Only its
//! ciphertext is in the gateway's store.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::load_records;
use didgate_client::low_level::RawExchange as _;
use didgate_client::{CallSpec, Client};
use didgate_protocol::Identity;
use didgate_tests::{CANARY, Daemon, Harness, alice, bin, files_containing};

/// Reads every readable mapping of process `pid` through `/proc/PID/mem` and reports, per
/// needle, whether it occurs; also the bytes read.
fn scan_memory(pid: u32, needles: &[&[u8]]) -> anyhow::Result<(u64, Vec<bool>)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let finders: Vec<memchr::memmem::Finder<'_>> =
        needles.iter().map(memchr::memmem::Finder::new).collect();
    let overlap = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let mut found = vec![false; needles.len()];
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (u64::from_str_radix(a, 16)?, u64::from_str_radix(b, 16)?);
        let mut at = start;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let Ok(n) = mem.read_at(&mut buf[..want], at) else {
                break;
            };
            if n == 0 {
                break;
            }
            total += n as u64;
            for (i, f) in finders.iter().enumerate() {
                found[i] |= f.find(&buf[..n]).is_some();
            }
            // step back so a needle across two reads is seen
            at += n.saturating_sub(overlap).max(1) as u64;
        }
    }
    Ok((total, found))
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(20), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting for {what}"))
}

fn contains(hay: &[u8], needle: &str) -> bool {
    memchr::memmem::find(hay, needle.as_bytes()).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_is_only_ever_ciphertext() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    h.stop().await;
    let root = h.dir.path().to_path_buf();
    let run = Run {
        outputs: root.join("outputs"),
        home: root.join("home"),
        gw_did: h.gw_did.to_string(),
        root,
    };
    std::fs::create_dir_all(&run.outputs)?;

    // 1. the demo, its directory kept under the scanned root
    let demo = Command::new(bin("didgated")?)
        .args(["demo", "--dir"])
        .arg(run.root.join("demo"))
        .env("RUST_LOG", "debug")
        .output()?;
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    run.save("demo", &demo)?;

    // 2. the daemon, logging at debug level into the scanned root
    let log = run.root.join("didgated.log");
    let mut daemon = Daemon::start_with_log_level(&h.gw_dir(), &log, "debug")?;
    let seed = didgate_tests::seed_file(h.dir.path(), &[0xa1u8; 32])?;
    let out = run.cli(&["keygen", "--seed-file", &seed])?;
    assert!(out.status.success());
    assert!(run.pin(daemon.addr)?.status.success());
    cli_calls(&run)?;

    // 3. attacks through the library (refused, audited, never forwarded)
    let lib = Client::open(alice(), &h.chain_dir("lib"), daemon.addr, h.gw_did.clone()).await?;
    let (signed, _) = h.signed_request(&alice(), |r| r.path = "/v1/../admin".into())?;
    let _ = lib.send_signed(&signed, b"").await?;
    let mallory = Client::open(
        Identity::from_seed(&[0x66; 32]),
        &h.chain_dir("mallory"),
        daemon.addr,
        h.gw_did.clone(),
    )
    .await?;
    let _ = mallory.send_signed(&signed, b"").await?;
    let _ = lib
        .call(CallSpec::new("payments", "GET", "/v1/echo-headers"))
        .await?;

    // 4. a CLI call in flight: the gateway injected the key upstream, the client waits for
    // the rest of the body; its memory is read meanwhile
    a_call_in_flight_leaves_no_canary_in_the_client(&run, &h).await?;

    // 5. kill -9 with a call in flight, restart, one more call
    let held = {
        let lib =
            Client::open(alice(), &h.chain_dir("held"), daemon.addr, h.gw_did.clone()).await?;
        tokio::spawn(async move {
            let r = lib
                .call(CallSpec::new("payments", "GET", "/v1/slow-head"))
                .await;
            lib.close().await;
            r
        })
    };
    until("the upstream to hold the call", || {
        h.upstream.seen().iter().any(|s| s.path == "/v1/slow-head")
    })
    .await?;
    daemon.kill()?;
    lib.disconnect().await;
    mallory.disconnect().await;
    daemon = Daemon::start_with_log_level(&h.gw_dir(), &log, "debug")?;
    h.upstream.release_slow(1);
    assert!(run.pin(daemon.addr)?.status.success());
    let out = run.cli(&["call", "payments", "GET", "/v1/balance"])?;
    assert!(out.status.success());
    run.save("cli-after-crash", &out)?;
    let export = run.root.join("gateway.export");
    let out = Command::new(bin("didgated")?)
        .args(["export", "--data"])
        .arg(h.gw_dir())
        .arg("--out")
        .arg(&export)
        .output()?;
    assert!(out.status.success());
    daemon.kill()?;
    // the in-flight call's client may wait for its idle timeout; it is not needed any more
    held.abort();
    for c in [lib, mallory] {
        c.close().await;
    }

    nothing_holds_the_plaintext(&run, &h, &log)
}

/// What the steps of the canary test share: the scanned root, where outputs are saved, the
/// CLI's home, the gateway's DID.
struct Run {
    root: PathBuf,
    outputs: PathBuf,
    home: PathBuf,
    gw_did: String,
}

impl Run {
    /// Saves a process's stdout and stderr under the scanned root.
    fn save(&self, name: &str, out: &Output) -> anyhow::Result<()> {
        std::fs::write(self.outputs.join(format!("{name}.stdout")), &out.stdout)?;
        std::fs::write(self.outputs.join(format!("{name}.stderr")), &out.stderr)?;
        Ok(())
    }

    /// `didgate --home HOME ARGS`, logging at debug level.
    fn cli(&self, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(bin("didgate")?)
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .env("RUST_LOG", "debug")
            .output()
            .map_err(anyhow::Error::from)
    }

    /// `didgate pin` to the gateway at `addr`.
    fn pin(&self, addr: std::net::SocketAddr) -> anyhow::Result<Output> {
        self.cli(&[
            "pin",
            "--gateway",
            &addr.to_string(),
            "--gateway-did",
            &self.gw_did,
        ])
    }
}

/// CLI calls through the daemon: an executed call, a charge with a body, and refused ones (a
/// non-canonical path, a header the caller may not set, a method policy does not allow).
fn cli_calls(run: &Run) -> anyhow::Result<()> {
    for (i, args) in [
        vec!["call", "payments", "GET", "/v1/echo-headers"],
        vec![
            "call",
            "payments",
            "POST",
            "/v1/charges",
            "--data",
            r#"{"amount":9,"currency":"usd"}"#,
        ],
        vec!["call", "payments", "GET", "/v1/%61dmin"],
        vec![
            "call",
            "payments",
            "GET",
            "/v1/balance",
            "--header",
            "authorization: Bearer x",
        ],
        vec!["call", "payments", "DELETE", "/v1/charges/ch_1"],
    ]
    .iter()
    .enumerate()
    {
        let out = run.cli(args)?;
        run.save(&format!("cli-{i}"), &out)?;
    }
    Ok(())
}

/// A CLI call held by the upstream after the gateway injected the key: the client process's
/// memory, read meanwhile, holds its own DID but not the canary; then the call completes.
async fn a_call_in_flight_leaves_no_canary_in_the_client(
    run: &Run,
    h: &Harness,
) -> anyhow::Result<()> {
    let outputs = &run.outputs;
    let mut child = Command::new(bin("didgate")?)
        .arg("--home")
        .arg(&run.home)
        .args(["call", "payments", "GET", "/v1/slow-events?n=3"])
        .stdout(std::fs::File::create(outputs.join("slow.stdout"))?)
        .stderr(std::fs::File::create(outputs.join("slow.stderr"))?)
        .stdin(Stdio::null())
        .spawn()?;
    let upstream = &h.upstream;
    until("the upstream to hold the slow call", || {
        upstream.seen().iter().any(|s| s.path == "/v1/slow-events")
    })
    .await?;
    let own_did = alice().did().to_string();
    let (read, found) = scan_memory(child.id(), &[CANARY.as_bytes(), own_did.as_bytes()])?;
    println!("read {read} bytes of the client's memory");
    assert!(
        found[1],
        "the scan sees the client's own DID, so it reads real memory"
    );
    assert!(!found[0], "the canary is in the client's memory");
    h.upstream.release_slow(1);
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    assert!(status.success());
    assert!(contains(
        &std::fs::read(outputs.join("slow.stdout"))?,
        "data:"
    ));
    Ok(())
}

/// Nothing on disk under the scanned root holds the plaintext (stores, logs, outputs, chains,
/// exports, the demo), nor any audit entry, decoded; the gateway's store holds the secret
/// sealed.
fn nothing_holds_the_plaintext(run: &Run, h: &Harness, log: &Path) -> anyhow::Result<()> {
    let (root, home) = (&run.root, &run.home);
    let hits = files_containing(root, CANARY.as_bytes());
    assert!(hits.is_empty(), "canary in {hits:?}");
    assert!(
        std::fs::metadata(log)?.len() > 0 && contains(&std::fs::read(log)?, "listening"),
        "the daemon's log was captured"
    );
    // every audit entry, decoded (a compressed block cannot hide it)
    for chain in [
        h.gw_dir(),
        home.join("chain"),
        h.chain_dir("lib"),
        root.join("demo/gateway"),
    ] {
        if !chain.exists() {
            continue;
        }
        let mut lifecycle = 0;
        for (_, bytes) in load_records(&chain)?.entries {
            let e = Entry::decode(&bytes)?;
            assert!(!format!("{e:?}").contains(CANARY), "{}", chain.display());
            assert!(!contains(&bytes, CANARY));
            lifecycle += usize::from(e.kind == EntryKind::Secret);
        }
        // the gateway chains record the secret's lifecycle (the snapshot, its addition)
        if chain == h.gw_dir() || chain == root.join("demo/gateway") {
            assert!(
                lifecycle >= 2,
                "{}: {lifecycle} secret entries",
                chain.display()
            );
        }
    }
    // the store holds the secret, sealed: its record opens only with the master key
    let opened = didgate_gateway::admin::open_dir(&h.gw_dir())?;
    let secrets = opened.secrets.list()?;
    drop(opened);
    let listed = format!("{secrets:?}");
    assert!(
        listed.contains("payments-key") && !listed.contains(CANARY),
        "{listed}"
    );
    assert_store_holds_ciphertext(&h.gw_dir())?;
    Ok(())
}

/// The secret's record is in the store, and its bytes are not the plaintext.
fn assert_store_holds_ciphertext(gw: &Path) -> anyhow::Result<()> {
    let store =
        didgate_audit::store::Store::open(&gw.join("store"), didgate_gateway::gateway::SPACES)?;
    let records = store.scan(didgate_gateway::gateway::SECRETS, b"")?;
    assert!(!records.is_empty(), "no sealed secret in the store");
    for (_, v) in records {
        assert!(!contains(&v, CANARY));
        assert!(
            v.len() > CANARY.len(),
            "a sealed record carries the ciphertext"
        );
    }
    Ok(())
}

/// An upstream that sends the key back (tests/src/echo_upstream.rs) in a header, a redirect
/// that keeps the query string, a JSON error body, a body cut in two, a gzip body, an SSE
/// stream and base64: the caller gets every response with each occurrence redacted (same
/// lengths), never the key in any form; each `executed` entry counts what was redacted, the
/// metric and an event say so; an upstream set to `on_secret_echo = "fail"` fails the call
/// instead and relays nothing that held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_echoes_the_key_never_gets_it_to_the_caller() -> anyhow::Result<()> {
    use didgate_gateway::config::{Auth, EchoAction, RawUpstream, Rule};
    use didgate_protocol::message::RefusalCode;
    use didgate_tests::echo_upstream::{ECHO_PATHS, EchoUpstream, forms_of};

    let echo = EchoUpstream::start().await?;
    let upstream = |name: &str, auth: Auth, on_echo: EchoAction| RawUpstream {
        local: true,
        auth,
        on_secret_echo: on_echo,
        ..RawUpstream::new(name, echo.base_url(), "payments-key")
    };
    let mut h = Harness::start_with(|c| {
        c.upstreams.extend([
            upstream("echo-bearer", Auth::Bearer, EchoAction::Redact),
            upstream(
                "echo-query",
                Auth::Query {
                    name: "api_key".into(),
                },
                EchoAction::Redact,
            ),
            upstream(
                "echo-basic",
                Auth::Basic {
                    user: "acct".into(),
                },
                EchoAction::Redact,
            ),
            upstream("echo-fail", Auth::Bearer, EchoAction::Fail),
        ]);
        for name in ["echo-bearer", "echo-query", "echo-basic", "echo-fail"] {
            c.rules.push(Rule {
                principals: vec![alice().did().to_string()],
                upstream: name.into(),
                methods: vec!["GET".into()],
                paths: vec!["/v1/**".into()],
            });
        }
    })
    .await?;
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    let mut events = gw.subscribe();
    let client = h.client("alice", alice()).await?;
    let forms = forms_of(CANARY);
    let mut calls = 0;
    for up in ["echo-bearer", "echo-query", "echo-basic"] {
        for path in ECHO_PATHS {
            let answer = client.call(CallSpec::new(up, "GET", path)).await?;
            // a redirect reflects the query string, which holds the key only for query auth
            let echoed = *path != "/v1/dir" || up == "echo-query";
            calls += usize::from(echoed);
            let mut seen = answer.body.clone();
            for (k, v) in &answer.headers {
                seen.extend_from_slice(format!("\n{k}: {v}").as_bytes());
            }
            for form in &forms {
                assert!(
                    memchr::memmem::find(&seen, form).is_none(),
                    "{up} {path}: the key reached the caller as {:?}:\n{}",
                    String::from_utf8_lossy(form),
                    String::from_utf8_lossy(&seen)
                );
            }
            assert_eq!(
                seen.contains(&b'*'),
                echoed,
                "{up} {path}: the echo is redacted in place:\n{}",
                String::from_utf8_lossy(&seen)
            );
            match *path {
                "/v1/dir" => assert_eq!(answer.status, 301),
                "/v1/error" => assert_eq!(answer.status, 401),
                _ => assert_eq!(answer.status, 200, "{up} {path}"),
            }
            if *path == "/v1/gzip" {
                assert!(
                    answer.body.starts_with(b"{\"echo\": \"") && answer.body.ends_with(b"\"}"),
                    "relayed decoded: {}",
                    String::from_utf8_lossy(&answer.body)
                );
                assert!(!answer.headers.iter().any(|(k, _)| k == "content-encoding"));
            }
            if *path == "/v1/sse" {
                // the events around the echo are intact
                let text = String::from_utf8_lossy(&answer.body);
                assert!(text.starts_with("data: {\"n\": 1}\n\n"), "{text}");
                assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
            }
        }
    }
    // fail mode: a refusal, and nothing that held the key
    for path in ["/v1/header", "/v1/split", "/v1/gzip"] {
        let r = client.call(CallSpec::new("echo-fail", "GET", path)).await;
        let Err(didgate_client::CallError::Refused { code, reason, .. }) = &r else {
            anyhow::bail!("echo-fail {path}: not refused: {:?}", r.map(|a| a.status));
        };
        assert_eq!(*code, RefusalCode::UpstreamFailed);
        assert!(reason.contains("echoed the call's credential"), "{reason}");
        assert!(!reason.contains(CANARY));
    }
    let metrics = gw.metrics().render();
    for up in ["echo-bearer", "echo-query", "echo-basic", "echo-fail"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("didgate_secret_echo_total{{upstream=\"{up}\"}}")))
            .ok_or_else(|| anyhow::anyhow!("no echo metric for {up}"))?;
        let n: u64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
        assert!(n >= 3, "{line}");
    }
    let mut echo_events = 0;
    while let Ok(e) = events.try_recv() {
        if e.name() == "secret_echo" {
            echo_events += 1;
            assert!(!e.to_json().contains(CANARY));
        }
    }
    assert_eq!(echo_events, calls + 3, "one event per call that echoed");
    client.close().await;
    drop(client);
    drop(gw);
    h.stop().await;
    let entries = h.gateway_entries()?;
    let redacted: Vec<u64> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Executed)
        .filter_map(|e| e.secret_echo)
        .collect();
    assert_eq!(
        redacted.len(),
        calls,
        "every echoing call's executed entry says so"
    );
    assert!(redacted.iter().all(|n| *n >= 1));
    for e in &entries {
        assert!(!contains(&e.encode(), CANARY));
    }
    Ok(())
}
