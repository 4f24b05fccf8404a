//! Protocol versions on the wire (specs/protocol.md, "Format evolution"): a version 1 client
//! gets version 1 answers from this gateway until the operator raises `min_client_version`,
//! then a clear version 1 refusal; a version 2 client gets a typed error from a gateway that
//! serves only version 1; a refusal code this release does not know reaches the caller typed,
//! with its text.

use didgate_client::{CallError, CallSpec, Client};
use didgate_gateway::config::RawConfig;
use didgate_protocol::frame::{FrameDecoder, FrameType};
use didgate_protocol::message::{self, Message, Receipt, Refusal, RefusalCode, ResponseHead};
use didgate_protocol::{Identity, Version};
use didgate_tests::{Harness, alice, bob, frames};

/// What came back on one stream: the response head (if any) and the signed terminal frame.
struct Answer {
    head: Option<ResponseHead>,
    receipt: Option<Receipt>,
    refusal: Option<Refusal>,
    /// The signed grant's bytes (two-step flow).
    grant: Option<Vec<u8>>,
}

/// Sends a signed request (no body) on a new stream and reads the whole answer.
async fn exchange(h: &Harness, conn: &quinn::Connection, request: &[u8]) -> anyhow::Result<Answer> {
    exchange_as(h, conn, FrameType::Request, request).await
}

/// Sends one frame of `kind` and FIN on a new stream and reads the whole answer.
async fn exchange_as(
    h: &Harness,
    conn: &quinn::Connection,
    kind: FrameType,
    payload: &[u8],
) -> anyhow::Result<Answer> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let _ = send.write_all(&frames(kind, payload)).await;
    let _ = send.finish();
    let mut dec = FrameDecoder::new();
    let mut answer = Answer {
        head: None,
        receipt: None,
        refusal: None,
        grant: None,
    };
    while let Some(f) = didgate_client::low_level::wire::next_frame(&mut recv, &mut dec).await? {
        match f.kind {
            FrameType::Head => answer.head = Some(ResponseHead::decode(&f.payload)?),
            FrameType::Receipt => {
                answer.receipt = Some(message::open_from(&f.payload, &h.gw_did)?.into_message())
            }
            FrameType::Refusal => {
                answer.refusal = Some(message::open_from(&f.payload, &h.gw_did)?.into_message())
            }
            FrameType::Grant => answer.grant = Some(f.payload.to_vec()),
            _ => {}
        }
    }
    Ok(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_1_clients_get_version_1_answers_until_the_minimum_is_raised() -> anyhow::Result<()>
{
    let mut h = Harness::start().await?;

    // A version 1 client (ALPN didgate/1, requests with v = 1): served as before, in version 1.
    let (endpoint, conn) = h.raw_connection_speaking(&alice(), Version::V1).await?;
    let (request, call) = h.signed_request(&alice(), |r| r.v = 1)?;
    let answer = exchange(&h, &conn, &request).await?;
    let receipt = answer
        .receipt
        .ok_or_else(|| anyhow::anyhow!("no receipt"))?;
    assert_eq!((receipt.v, receipt.call, receipt.status), (1, call, 200));
    assert_eq!(
        answer.head.map(|h| h.v),
        Some(1),
        "the response head is version 1"
    );
    // its refusals are version 1 too
    let (bob_conn_ep, bob_conn) = h.raw_connection_speaking(&bob(), Version::V1).await?;
    let (request, call) = h.signed_request(&bob(), |r| {
        r.v = 1;
        r.method = "POST".into();
    })?;
    let refusal = exchange(&h, &bob_conn, &request)
        .await?
        .refusal
        .ok_or_else(|| anyhow::anyhow!("no refusal"))?;
    assert_eq!(
        (refusal.v, refusal.code, refusal.call),
        (1, RefusalCode::Policy, Some(call))
    );
    // a version 2 request on a version 1 connection is not what the connection agreed
    let (request, _) = h.signed_request(&alice(), |_| {})?;
    let refusal = exchange(&h, &conn, &request)
        .await?
        .refusal
        .ok_or_else(|| anyhow::anyhow!("no refusal"))?;
    assert_eq!((refusal.v, refusal.code), (1, RefusalCode::Malformed));
    assert!(
        refusal.reason.contains("version 2 request"),
        "{}",
        refusal.reason
    );
    // a version 1 client's two-step grant, held across the operator's change below
    let (request, _) = h.signed_request(&alice(), |r| r.v = 1)?;
    let held_grant = exchange_as(&h, &conn, FrameType::GrantRequest, &request)
        .await?
        .grant
        .ok_or_else(|| anyhow::anyhow!("no grant"))?;
    let grant: message::GrantBody = message::open_from(&held_grant, &h.gw_did)?.into_message();
    assert_eq!(grant.v, 1);
    // and the other way round
    let (v2_ep, v2_conn) = h.raw_connection_speaking(&alice(), Version::V2).await?;
    let (request, _) = h.signed_request(&alice(), |r| r.v = 1)?;
    let refusal = exchange(&h, &v2_conn, &request)
        .await?
        .refusal
        .ok_or_else(|| anyhow::anyhow!("no refusal"))?;
    assert_eq!((refusal.v, refusal.code), (2, RefusalCode::Malformed));
    for (ep, c) in [(endpoint, conn), (bob_conn_ep, bob_conn), (v2_ep, v2_conn)] {
        c.close(0u32.into(), b"done");
        ep.wait_idle().await;
    }

    // The operator retires version 1.
    h.stop().await;
    let config_path = h.gw_dir().join("gateway.toml");
    let mut config = RawConfig::read(&config_path)?;
    config.gateway.min_client_version = 2;
    std::fs::write(&config_path, toml::to_string(&config)?)?;
    h.restart().await?;
    let (endpoint, conn) = h.raw_connection_speaking(&alice(), Version::V1).await?;
    let (request, _) = h.signed_request(&alice(), |r| r.v = 1)?;
    let answer = exchange(&h, &conn, &request).await?;
    assert!(answer.receipt.is_none() && answer.head.is_none());
    let refusal = answer
        .refusal
        .ok_or_else(|| anyhow::anyhow!("no refusal"))?;
    assert_eq!((refusal.v, refusal.code), (1, RefusalCode::Malformed));
    assert!(
        refusal.reason.contains("min_client_version") && refusal.reason.contains("upgrade"),
        "a version 1 client is told why: {}",
        refusal.reason
    );
    // the version 1 grant is retired with its version: not executed on a version 2 connection
    let (v2_ep, v2_conn) = h.raw_connection_speaking(&alice(), Version::V2).await?;
    let refusal = exchange_as(&h, &v2_conn, FrameType::Execute, &held_grant)
        .await?
        .refusal
        .ok_or_else(|| anyhow::anyhow!("no refusal"))?;
    assert_eq!((refusal.v, refusal.code), (2, RefusalCode::Malformed));
    assert!(
        refusal.reason.contains("version 1 grant"),
        "{}",
        refusal.reason
    );
    for (ep, c) in [(endpoint, conn), (v2_ep, v2_conn)] {
        c.close(0u32.into(), b"done");
        ep.wait_idle().await;
    }
    // version 2 clients are served as before
    let client = h.client("alice", alice()).await?;
    let answer = client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!((answer.status, answer.receipt.v), (200, 2));
    client.close().await;
    drop(client);
    h.stop().await;

    // The chain holds both kinds of calls, each request as it was signed, and verifies.
    let entries = h.gateway_entries()?;
    assert!(entries.iter().all(|e| e.v == 2), "a new chain is version 2");
    let executing: Vec<u64> = entries
        .iter()
        .filter(|e| e.kind == didgate_audit::entry::EntryKind::Executing)
        .map(|e| {
            message::open::<message::Request>(e.signed.as_deref().unwrap_or_default())
                .map(|r| r.message().v)
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(
        executing,
        vec![1, 2],
        "a version 1 call, then a version 2 call"
    );
    // (alone: the raw requests carry a made-up client head)
    let report = didgate_audit::verify::verify(&[didgate_audit::load_records(&h.gw_dir())?], &[]);
    assert!(report.ok(), "{:#?}", report.violations);
    Ok(())
}

/// A bare QUIC server with the gateway's TLS setup, serving `versions` only, that answers
/// every stream (up to `streams`) with `answer` and then stops: what a gateway of another
/// release looks like on the wire. Returns its address.
async fn other_release(
    identity: Identity,
    versions: &'static [Version],
    streams: usize,
    answer: impl Fn(&Identity) -> Vec<u8> + Send + 'static,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    didgate_client::low_level::tls::install_provider();
    let cfg = didgate_client::low_level::tls::server_config_for(&identity, versions)?;
    let endpoint = quinn::Endpoint::server(cfg, "127.0.0.1:0".parse()?)?;
    let addr = endpoint.local_addr()?;
    let task = tokio::spawn(async move {
        let mut served = 0;
        while served < streams {
            let Some(incoming) = endpoint.accept().await else {
                return;
            };
            let Ok(conn) = incoming.await else {
                // a handshake refused (no common version) counts as served
                served += 1;
                continue;
            };
            while served < streams {
                let Ok((mut send, mut recv)) = conn.accept_bi().await else {
                    break;
                };
                let mut dec = FrameDecoder::new();
                let _ = didgate_client::low_level::wire::next_frame(&mut recv, &mut dec).await;
                let _ = send
                    .write_all(&frames(FrameType::Refusal, &answer(&identity)))
                    .await;
                let _ = send.finish();
                let _ = send.stopped().await;
                served += 1;
            }
        }
        endpoint.wait_idle().await;
    });
    Ok((addr, task))
}

/// The last entry of the chain at `chain` (its writer closed).
fn last_entry(chain: &std::path::Path) -> anyhow::Result<didgate_audit::entry::Entry> {
    let records = didgate_audit::load_records(chain)?;
    let (_, bytes) = records
        .entries
        .last()
        .ok_or_else(|| anyhow::anyhow!("empty chain"))?;
    Ok(didgate_audit::entry::Entry::decode(bytes)?)
}

fn refusal(gateway: &Identity, v: Version, code: &str) -> Vec<u8> {
    let mut value: ciborium::Value = ciborium::from_reader(
        Refusal {
            v: v.as_u64(),
            call: None,
            code: RefusalCode::Policy,
            reason: "over this month's budget".into(),
            time_ms: didgate_client::low_level::now_ms(),
            entry: None,
            node_cert: None,
            home: None,
        }
        .encode()
        .as_slice(),
    )
    .unwrap_or(ciborium::Value::Null);
    if let ciborium::Value::Map(m) = &mut value {
        for (k, val) in m.iter_mut() {
            if k.as_text() == Some("code") {
                *val = ciborium::Value::Text(code.into());
            }
        }
    }
    let mut payload = Vec::new();
    let _ = ciborium::into_writer(&value, &mut payload);
    didgate_protocol::envelope::sign(gateway, didgate_protocol::envelope::Kind::Refusal, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_client_gets_a_typed_error_from_a_version_1_gateway() -> anyhow::Result<()> {
    let gateway = Identity::from_seed(&[0x61; 32]);
    let gw_did = gateway.did().clone();
    let (addr, server) = other_release(gateway, &[Version::V1], 2, |g| {
        refusal(g, Version::V1, "policy")
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let client = Client::open(alice(), &dir.path().join("v2"), addr, gw_did.clone()).await?;
    let err = client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a version 1 gateway answered a version 2 client"))?;
    assert!(
        matches!(
            err,
            CallError::VersionUnsupported {
                offered: Version::V2
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("protocol version 2"), "{err}");
    assert!(!err.is_retryable());
    client.close().await;
    // speaking version 1, the same client library is served by it
    let client = Client::open(alice(), &dir.path().join("v1"), addr, gw_did)
        .await?
        .speaking(Version::V1)?;
    let code = didgate_tests::refusal_code(
        &client
            .call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await,
    );
    assert_eq!(code, Some(RefusalCode::Policy));
    client.close().await;
    server.await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_code_this_release_does_not_know_reaches_the_caller_with_its_text()
-> anyhow::Result<()> {
    let gateway = Identity::from_seed(&[0x62; 32]);
    let gw_did = gateway.did().clone();
    let (addr, server) = other_release(gateway, &[Version::V2], 1, |g| {
        refusal(g, Version::V2, "budget_exceeded")
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let chain = dir.path().join("chain");
    let client = Client::open(alice(), &chain, addr, gw_did).await?;
    let err = client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("no refusal"))?;
    let CallError::Refused { code, reason, .. } = &err else {
        anyhow::bail!("not a refusal: {err:?}");
    };
    assert!(!code.is_known());
    assert_eq!(code.as_str(), "budget_exceeded");
    assert_eq!(reason, "over this month's budget");
    assert!(err.to_string().contains("budget_exceeded"), "{err}");
    assert_eq!(err.advice(), "the gateway refused the call: see its reason");
    client.close().await;
    drop(client);
    server.await?;
    // recorded as a signed refusal, like any other
    let last = last_entry(&chain)?;
    assert_eq!(last.outcome, Some(didgate_audit::entry::Outcome::Refusal));
    let recorded: Refusal =
        message::open::<Refusal>(last.signed.as_deref().unwrap_or_default())?.into_message();
    assert_eq!(recorded.code.as_str(), "budget_exceeded");
    Ok(())
}

/// A version 2 client refuses an answer of another version on its version 2 connection (a
/// downgraded answer), and records the outcome as unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_another_version_is_refused() -> anyhow::Result<()> {
    let gateway = Identity::from_seed(&[0x63; 32]);
    let gw_did = gateway.did().clone();
    let (addr, server) = other_release(gateway, &[Version::V2], 1, |g| {
        refusal(g, Version::V1, "policy")
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let chain = dir.path().join("chain");
    let client = Client::open(alice(), &chain, addr, gw_did).await?;
    let err = client
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("a version 1 answer was taken"))?;
    assert!(matches!(err, CallError::InvalidAnswer(_)), "{err:?}");
    client.close().await;
    drop(client);
    server.await?;
    let last = last_entry(&chain)?;
    assert_eq!(last.outcome, Some(didgate_audit::entry::Outcome::Unknown));
    Ok(())
}
