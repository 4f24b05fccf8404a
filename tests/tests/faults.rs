//! An upstream that misbehaves after the grant was consumed: it resets the connection, closes
//! it without an answer, answers bytes that are not HTTP, a malformed status line, a body shorter
//! than its declared length, or broken chunked encoding. Each call ends with a typed
//! `upstream_failed` refusal whose `failed` entry closes its `executing` entry with the cause, and
//! the gateway stays up for the next call. (A slow upstream is tests/tests/limits.rs,
//! `a_slow_upstream_times_out_as_upstream_failed`.)

use std::sync::{Arc, Mutex};

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::{load_records, verify};
use didgate_client::{CallError, CallSpec};
use didgate_gateway::config::{Auth, RawUpstream, Rule};
use didgate_protocol::message::RefusalCode;
use didgate_tests::{Harness, alice};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw TCP server on 127.0.0.1 whose answer depends on the request path; records each path.
async fn bad_upstream() -> anyhow::Result<(String, Arc<Mutex<Vec<String>>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&got).into_owned();
                let path = text.split(' ').nth(1).unwrap_or_default().to_string();
                record
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(path.clone());
                let answer: &[u8] = match path.as_str() {
                    "/reset" => {
                        // RST instead of FIN
                        let _ = sock.set_zero_linger();
                        return;
                    }
                    "/close" => return,
                    "/garbage" => b"\x00\x01\x02 this is not HTTP \xff\xfe\r\n\r\n",
                    "/bad-status" => b"HTTP/1.1 abc OK\r\ncontent-length: 0\r\n\r\n",
                    "/short-body" => b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
                    "/bad-chunks" => {
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nnope\r\n"
                    }
                    _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                };
                let _ = sock.write_all(answer).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((base, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_and_garbage_fail_typed_audited_and_the_gateway_stays_up()
-> anyhow::Result<()> {
    let (base, seen) = bad_upstream().await?;
    let mut h = Harness::start_with(|c| {
        let mut flaky = RawUpstream {
            name: "flaky".into(),
            base_url: base.clone(),
            secret: "payments-key".into(),
            ..c.upstreams[0].clone()
        };
        flaky.auth = Auth::Bearer;
        c.upstreams.push(flaky);
        c.rules.push(Rule {
            principals: vec![alice().did().to_string()],
            upstream: "flaky".into(),
            methods: vec!["GET".into()],
            paths: vec!["/**".into()],
        });
    })
    .await?;
    let a = h.client("alice", alice()).await?;
    let ok = a.call(CallSpec::new("flaky", "GET", "/fine")).await?;
    assert_eq!((ok.status, ok.body.as_slice()), (200, b"ok".as_slice()));
    let mut failed_calls = Vec::new();
    for path in [
        "/reset",
        "/close",
        "/garbage",
        "/bad-status",
        "/short-body",
        "/bad-chunks",
    ] {
        let spec = CallSpec::new("flaky", "GET", path);
        let (code, reason) = match a.call_streaming(spec).await {
            Err(CallError::Refused { code, reason, .. }) => (code, reason),
            // a broken body shows after the head: the refusal ends the stream
            Ok(mut streaming) => loop {
                match streaming.next_chunk().await {
                    Ok(Some(_)) => {}
                    Err(CallError::Refused { code, reason, .. }) => break (code, reason),
                    end => panic!("{path}: not refused: {end:?}"),
                }
            },
            Err(other) => panic!("{path}: {other:?}"),
        };
        assert_eq!(code, RefusalCode::UpstreamFailed, "{path}: {reason}");
        println!("{path}: {code}: {reason}");
        failed_calls.push(path);
        // the gateway stays up: the good upstream answers the next call
        assert_eq!(
            a.call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await?
                .status,
            200,
            "after {path}"
        );
    }
    let paths = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // each request reached the upstream once: one that failed is not sent again (specs/
    // operation.md, "Retries.")
    assert_eq!(paths.len(), 1 + failed_calls.len(), "{paths:?}");
    a.close().await;
    drop(a);
    h.stop().await;

    let records = load_records(&h.gw_dir())?;
    let entries: Vec<Entry> = records
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?;
    let failed = entries
        .iter()
        .filter(|e| {
            e.kind == EntryKind::Failed
                && e.code.as_deref() == Some("upstream_failed")
                && e.detail.as_deref().is_some_and(|d| !d.is_empty())
        })
        .count();
    assert_eq!(failed, failed_calls.len(), "each failure closes its call");
    let report = verify::verify(&[records], &[load_records(&h.chain_dir("alice"))?]);
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}
