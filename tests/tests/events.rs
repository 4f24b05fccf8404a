//! Live events through the real control socket (and `didgated events --follow` as a process),
//! and Prometheus metrics over a real HTTP socket, against a real gateway and upstream.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use didgate_client::{Answer, CallSpec, IssuedGrant};
use didgate_gateway::config::{ConfigError, RawConfig};
use didgate_gateway::control::{self, EventStream};
use didgate_gateway::events::{Event, EventKind};
use didgate_gateway::gateway::Revoke;
use didgate_gateway::secrets::SecretValue;
use didgate_protocol::message::RefusalCode;
use didgate_tests::{CANARY, Harness, alice, bin, bob, refusal_code};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// Bounded wait for anything a test waits on.
const WAIT: Duration = Duration::from_secs(20);

/// The control socket of the harness's gateway, served as `didgated serve` serves it.
struct Socket {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Socket {
    async fn start(h: &Harness) -> anyhow::Result<Self> {
        let gw = h.gateway.clone().context("the gateway runs")?;
        let (stop, rx) = tokio::sync::watch::channel(false);
        let dir = h.gw_dir();
        let task = tokio::spawn(async move { control::server::serve(gw, &dir, rx).await });
        // the socket answers once it is bound: poll for it, bounded
        tokio::time::timeout(WAIT, async {
            while control::call(&h.gw_dir(), &control::Request::Status)
                .await
                .is_none()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .context("the control socket did not answer")?;
        Ok(Self { stop, task })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.task.await??;
        Ok(())
    }
}

/// Reads event lines until `n` arrived (bounded); returns them raw and parsed.
async fn read_events(stream: &mut EventStream, n: usize) -> anyhow::Result<Vec<(String, Event)>> {
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        while got.len() < n {
            let line = stream
                .next_line()
                .await?
                .context("the stream ended early")?;
            let event: Event = serde_json::from_str(&line).with_context(|| line.clone())?;
            got.push((line, event));
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("only {} of {n} events arrived: {got:?}", got.len()))??;
    Ok(got)
}

async fn control_ok(h: &Harness, req: control::Request) -> anyhow::Result<control::Reply> {
    let reply = control::call(&h.gw_dir(), &req)
        .await
        .context("no daemon")??;
    anyhow::ensure!(reply.ok, "{reply:?}");
    Ok(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_event_streams_in_order_without_secrets() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let gw = h.gateway.clone().context("gateway")?;
    let socket = Socket::start(&h).await?;
    let mut stream = control::subscribe(&h.gw_dir())
        .await
        .context("no daemon")??;
    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;

    // 1. access
    let answer = a
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(answer.status, 200);
    // 2. refusal: bob may only GET /v1/balance
    let refused = b
        .call(CallSpec::new("payments", "POST", "/v1/charges").body(b"{}".to_vec()))
        .await;
    assert_eq!(refusal_code(&refused), Some(RefusalCode::Policy));
    // 3. grant, 4. its revocation
    let grant = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    gw.revoke(&Revoke::Grant(grant.grant.id), "not needed")
        .await?;
    // 5. secret disabled, 6. a call failing on it after its grant was consumed
    control_ok(
        &h,
        control::Request::SecretDisable {
            name: "payments-key".into(),
        },
    )
    .await?;
    let failed = a
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    assert_eq!(refusal_code(&failed), Some(RefusalCode::SecretUnavailable));
    // 7. policy reload, 8. a rotation whose new value must not show
    let hash = gw.reload_policy()?;
    let rotated = format!("{CANARY}-rotated");
    control_ok(
        &h,
        control::Request::SecretRotate {
            name: "payments-key".into(),
            value: SecretValue::new(zeroize::Zeroizing::new(rotated.clone())),
        },
    )
    .await?;

    let events = read_events(&mut stream, 8).await?;
    let kinds: Vec<_> = events.iter().map(|(_, e)| e.name()).collect();
    assert_eq!(
        kinds,
        [
            "access",
            "refusal",
            "grant",
            "revocation",
            "secret",
            "failed",
            "policy_reload",
            "secret"
        ]
    );
    each_event_says_what_happened(&events, &answer, &grant, hash)?;

    // a second subscriber: the daemon stopping ends its stream
    let mut second = control::subscribe(&h.gw_dir())
        .await
        .context("no daemon")??;
    drop(stream);
    a.close().await;
    b.close().await;
    socket.stop().await?;
    let end = tokio::time::timeout(WAIT, second.next_line()).await??;
    assert_eq!(end, None, "the stream ends when the daemon stops");
    drop(gw);
    h.stop().await;
    Ok(())
}

/// The eight events of [`every_kind_of_event_streams_in_order_without_secrets`], each with
/// its call, DID, grant, code or policy hash, as JSON lines with a time and no secret or
/// display form of one.
fn each_event_says_what_happened(
    events: &[(String, Event)],
    answer: &Answer,
    grant: &IssuedGrant,
    hash: [u8; 32],
) -> anyhow::Result<()> {
    let alice_did = alice().did().to_string();
    let bob_did = bob().did().to_string();
    match &events[0].1.kind {
        EventKind::Access {
            did,
            upstream,
            method,
            path,
            status,
            call,
            grant,
            resp_len,
            ..
        } => {
            assert_eq!(
                (did, upstream.as_str(), method.as_str(), path.as_str()),
                (&alice_did, "payments", "GET", "/v1/balance")
            );
            assert_eq!(*status, 200);
            assert_eq!(call, &hex::encode(answer.receipt.call));
            assert_eq!(grant, &hex::encode(answer.receipt.grant));
            assert_eq!(*resp_len, answer.receipt.resp_len);
        }
        other => panic!("{other:?}"),
    }
    match &events[1].1.kind {
        EventKind::Refusal {
            did,
            code,
            call,
            method,
            path,
            ..
        } => {
            assert_eq!(did.as_ref(), Some(&bob_did));
            assert_eq!(*code, RefusalCode::Policy);
            assert_eq!(call.as_ref().map(String::len), Some(64));
            assert_eq!(
                (method.as_deref(), path.as_deref()),
                (Some("POST"), Some("/v1/charges"))
            );
        }
        other => panic!("{other:?}"),
    }
    match &events[2].1.kind {
        EventKind::Grant {
            did,
            grant: id,
            call,
            expires_ms,
            ..
        } => {
            assert_eq!(did, &alice_did);
            assert_eq!(id, &hex::encode(grant.grant.id));
            assert_eq!(call, &hex::encode(grant.call));
            assert_eq!(*expires_ms, grant.grant.expires_ms);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        events[3].1.kind,
        EventKind::Revocation {
            did: None,
            grant: Some(hex::encode(grant.grant.id)),
            reason: "not needed".into(),
        }
    );
    assert_eq!(
        events[4].1.kind,
        EventKind::Secret {
            name: "payments-key".into(),
            action: "disabled".into(),
            version: 1,
            status: "disabled".into(),
        }
    );
    match &events[5].1.kind {
        EventKind::Failed { did, code, .. } => {
            assert_eq!(did.as_ref(), Some(&alice_did));
            assert_eq!(*code, RefusalCode::SecretUnavailable);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        events[6].1.kind,
        EventKind::PolicyReload {
            policy: hex::encode(hash)
        }
    );
    assert!(matches!(
        &events[7].1.kind,
        EventKind::Secret { action, version: 2, .. } if action == "rotated"
    ));
    for (line, event) in events {
        let v: serde_json::Value = serde_json::from_str(line)?;
        assert_eq!(v["kind"], event.name(), "{line}");
        assert!(v["time_ms"].is_u64(), "{line}");
        for text in [line.as_str(), event.human().as_str()] {
            assert!(!text.contains(CANARY), "a secret in an event: {text}");
            assert!(
                !text.contains("sk-live"),
                "a display form in an event: {text}"
            );
            assert!(!text.contains('\n'));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn didgated_events_follow_prints_json_and_human_lines() -> anyhow::Result<()> {
    let didgated = bin("didgated")?;
    let mut h = Harness::start().await?;

    // no daemon: exit 2; without --follow: exit 2 with a clear message
    let out = tokio::process::Command::new(&didgated)
        .args(["events", "--follow", "--data"])
        .arg(h.gw_dir())
        .env_remove("DIDGATE_DATA")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no daemon answers"));
    let out = tokio::process::Command::new(&didgated)
        .args(["events", "--data"])
        .arg(h.gw_dir())
        .env_remove("DIDGATE_DATA")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("only --follow"));

    let socket = Socket::start(&h).await?;
    let follow = |json: bool| -> anyhow::Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(&didgated);
        cmd.args(["events", "--follow", "--data"])
            .arg(h.gw_dir())
            .env_remove("DIDGATE_DATA")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if json {
            cmd.arg("--json");
        }
        Ok(cmd.spawn()?)
    };
    let mut children = Vec::new();
    for json in [true, false] {
        let mut child = follow(json)?;
        // subscribed once it says so on stderr
        let mut err = BufReader::new(child.stderr.take().context("stderr")?);
        let mut line = String::new();
        tokio::time::timeout(WAIT, err.read_line(&mut line)).await??;
        assert!(line.contains("following events"), "{line}");
        children.push((child, err));
    }

    let a = h.client("alice", alice()).await?;
    a.call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    let b = h.client("bob", bob()).await?;
    let refused = b
        .call(CallSpec::new("payments", "POST", "/v1/charges").body(b"{}".to_vec()))
        .await;
    assert_eq!(refusal_code(&refused), Some(RefusalCode::Policy));
    a.close().await;
    b.close().await;

    // the daemon stopping ends both followers with exit 0
    socket.stop().await?;
    let mut outputs = Vec::new();
    for (mut child, mut err) in children {
        let mut stdout = String::new();
        child
            .stdout
            .take()
            .context("stdout")?
            .read_to_string(&mut stdout)
            .await?;
        let mut rest = String::new();
        err.read_to_string(&mut rest).await?;
        let status = tokio::time::timeout(WAIT, child.wait()).await??;
        assert!(status.success(), "{status:?}: {rest}");
        assert!(rest.contains("closed the event stream"), "{rest}");
        outputs.push(stdout);
    }
    let json: Vec<serde_json::Value> = outputs[0]
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let kinds: Vec<_> = json.iter().map(|v| v["kind"].clone()).collect();
    assert_eq!(kinds, ["access", "refusal"], "{}", outputs[0]);
    assert_eq!(json[0]["status"], 200);
    assert_eq!(json[1]["code"], "policy");
    let human: Vec<_> = outputs[1].lines().collect();
    assert_eq!(human.len(), 2, "{}", outputs[1]);
    assert!(
        human[0].contains(" access ") && human[0].contains("GET /v1/balance -> 200"),
        "{}",
        human[0]
    );
    assert!(
        human[1].contains(" refusal ")
            && human[1].contains("policy")
            && human[1].contains(&bob().did().to_string()),
        "{}",
        human[1]
    );
    for out in &outputs {
        assert!(!out.contains(CANARY));
    }
    h.stop().await;
    Ok(())
}

/// `GET path` over a raw HTTP/1.1 connection: (status, body).
async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut raw)).await??;
    let (head, body) = raw.split_once("\r\n\r\n").context("no header end")?;
    let status = head
        .split(' ')
        .nth(1)
        .context("no status")?
        .parse::<u16>()?;
    Ok((status, body.to_string()))
}

/// The value of the sample named exactly `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_refusals_grants_and_latency() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let gw = h.gateway.clone().context("gateway")?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let (addr, server) =
        didgate_gateway::metrics::start(gw.metrics().clone(), "127.0.0.1:0".parse()?, rx).await?;
    assert!(addr.ip().is_loopback() && addr.port() != 0);

    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;
    for _ in 0..2 {
        assert_eq!(
            a.call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await?
                .status,
            200
        );
    }
    let grant = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(a.execute(&grant).await?.status, 200);
    let unused = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    gw.revoke(&Revoke::Grant(unused.grant.id), "unused").await?;
    assert_eq!(
        refusal_code(
            &b.call(CallSpec::new("payments", "POST", "/v1/charges").body(b"{}".to_vec()))
                .await
        ),
        Some(RefusalCode::Policy)
    );
    assert_eq!(
        refusal_code(&a.execute(&unused).await),
        Some(RefusalCode::Revoked)
    );

    let (status, text) = http_get(addr, "/metrics").await?;
    assert_eq!(status, 200, "{text}");
    let expect = [
        (
            "didgate_calls_total{upstream=\"payments\",status_class=\"2xx\"}",
            3.0,
        ),
        (
            "didgate_calls_total{upstream=\"payments\",status_class=\"5xx\"}",
            0.0,
        ),
        ("didgate_refusals_total{code=\"policy\"}", 1.0),
        ("didgate_refusals_total{code=\"revoked\"}", 1.0),
        ("didgate_refusals_total{code=\"replay\"}", 0.0),
        ("didgate_grants_issued_total", 2.0),
        ("didgate_grants_consumed_total{flow=\"pipelined\"}", 2.0),
        ("didgate_grants_consumed_total{flow=\"two_step\"}", 1.0),
        ("didgate_revocations_total{target=\"grant\"}", 1.0),
        ("didgate_revocations_total{target=\"did\"}", 0.0),
        ("didgate_call_latency_seconds_count", 3.0),
        ("didgate_call_latency_seconds_bucket{le=\"+Inf\"}", 3.0),
    ];
    for (series, want) in expect {
        assert_eq!(sample(&text, series), Some(want), "{series}\n{text}");
    }
    assert!(sample(&text, "didgate_call_latency_seconds_sum").is_some_and(|s| s > 0.0));
    assert!(text.contains("# TYPE didgate_call_latency_seconds histogram"));
    assert!(!text.contains(CANARY));
    assert!(!text.contains("did:key"), "no DID is a label");

    let (status, _) = http_get(addr, "/other").await?;
    assert_eq!(status, 404);

    a.close().await;
    b.close().await;
    let _ = stop.send(true);
    tokio::time::timeout(WAIT, server).await??;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped with its stop signal"
    );
    drop(gw);
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_listen_must_be_loopback_unless_allowed() -> anyhow::Result<()> {
    let template = didgate_gateway::config::template("127.0.0.1:7443".parse()?);
    let with = |extra: &str| -> anyhow::Result<RawConfig> {
        Ok(toml::from_str(&template.replacen(
            "[gateway]\n",
            &format!("[gateway]\n{extra}\n"),
            1,
        ))?)
    };
    for ok in [
        "metrics_listen = \"127.0.0.1:9464\"",
        "metrics_listen = \"[::1]:9464\"",
        "metrics_listen = \"0.0.0.0:9464\"\nmetrics_allow_remote = true",
    ] {
        with(ok)?.validate().with_context(|| ok.to_string())?;
    }
    for bad in [
        "metrics_listen = \"0.0.0.0:9464\"",
        "metrics_listen = \"192.0.2.1:9464\"",
    ] {
        let e = with(bad)?.validate().expect_err(bad);
        assert!(
            matches!(&e, ConfigError::MetricsNotLoopback { .. })
                && e.to_string().contains("metrics_allow_remote"),
            "{e}"
        );
    }
    // and a gateway with such a configuration does not start
    let started = Harness::start_with(|c| {
        c.gateway.metrics_listen = Some("0.0.0.0:9464".parse().expect("addr"));
    })
    .await;
    assert!(started.is_err());
    Ok(())
}
