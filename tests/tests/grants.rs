//! Two-step grants and revocation, end to end through a real gateway and upstream.

use didgate_audit::entry::EntryKind;
use didgate_audit::{load_records, verify};
use didgate_client::low_level::RawExchange as _;
use didgate_client::{CallError, CallSpec};
use didgate_gateway::gateway::Revoke;
use didgate_protocol::Principal;
use didgate_protocol::message::RefusalCode;
use didgate_tests::{Harness, alice, bob, refusal_code};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_then_execute_once_by_its_subject_only() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;
    let spec = CallSpec::new("payments", "POST", "/v1/charges")
        .header("content-type", "application/json")
        .body(br#"{"amount":3,"currency":"usd"}"#.to_vec());
    let grant = a.grant(spec).await?;
    assert_eq!(grant.grant.subject, alice().did().to_string());
    assert_eq!(
        (grant.grant.method.as_str(), grant.grant.path.as_str()),
        ("POST", "/v1/charges")
    );
    assert!(h.upstream.seen().is_empty(), "a grant executes nothing");

    // another DID presenting alice's grant is refused
    let stolen = b
        .exchange(
            didgate_protocol::frame::FrameType::Execute,
            &grant.bytes,
            &grant.body,
        )
        .await?;
    assert!(
        matches!(stolen.last, didgate_client::low_level::RawFinal::Refusal(ref r) if r.message().code == RefusalCode::GrantInvalid)
    );

    let answer = a.execute(&grant).await?;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.receipt.grant, grant.grant.id);
    assert_eq!(h.upstream.seen().len(), 1);
    assert_eq!(
        h.upstream.seen()[0].idempotency_key.as_deref(),
        Some(hex::encode(grant.grant.id).as_str())
    );
    // single use
    assert_eq!(
        refusal_code(&a.execute(&grant).await),
        Some(RefusalCode::GrantInvalid)
    );
    assert_eq!(h.upstream.seen().len(), 1);

    for c in [a, b] {
        c.close().await;
    }
    h.stop().await;
    let report = verify::verify(
        &[load_records(&h.gw_dir())?],
        &[
            load_records(&h.chain_dir("alice"))?,
            load_records(&h.chain_dir("bob"))?,
        ],
    );
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_grant_is_refused() -> anyhow::Result<()> {
    // a lifetime of zero: every grant is expired when presented (no clock games)
    let mut h = Harness::start_with(|c| c.gateway.grant_ttl_secs = 0).await?;
    let a = h.client("alice", alice()).await?;
    let grant = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    assert_eq!(
        refusal_code(&a.execute(&grant).await),
        Some(RefusalCode::GrantExpired)
    );
    assert!(h.upstream.seen().is_empty());
    a.close().await;
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_did_and_grant_are_refused_durably() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    a.call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    // a grant in flight (issued, not yet executed) when the DID is revoked
    let pending = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    gw.revoke(
        &Revoke::Did(Principal::Key(alice().did().clone())),
        "key leaked",
    )
    .await?;
    // the open connection is closed by the revocation; the client reconnects, and every call
    // after that is refused as revoked
    let first = a
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    assert!(
        matches!(refusal_code(&first), Some(RefusalCode::Revoked))
            || matches!(first, Err(CallError::ConnectionLost(_))),
        "{first:?}"
    );
    assert_eq!(
        refusal_code(
            &a.call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await
        ),
        Some(RefusalCode::Revoked)
    );
    assert_eq!(
        refusal_code(&a.execute(&pending).await),
        Some(RefusalCode::Revoked)
    );
    assert_eq!(
        h.upstream.seen().len(),
        1,
        "nothing after the revocation reached the upstream"
    );

    // a single grant of bob's, revoked: that grant only
    let b = h.client("bob", bob()).await?;
    let g1 = b
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    let g2 = b
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    gw.revoke(&Revoke::Grant(g1.grant.id), "not needed").await?;
    assert_eq!(
        refusal_code(&b.execute(&g1).await),
        Some(RefusalCode::Revoked)
    );
    assert_eq!(b.execute(&g2).await?.status, 200);

    // durable: after a restart alice is still revoked
    a.close().await;
    b.close().await;
    drop((a, b, gw));
    h.restart().await?;
    let a = h.client("alice", alice()).await?;
    assert_eq!(
        refusal_code(
            &a.call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await
        ),
        Some(RefusalCode::Revoked)
    );
    a.close().await;
    drop(a);
    h.stop().await;

    let entries = h.gateway_entries()?;
    assert_eq!(
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Revocation)
            .count(),
        2,
        "each revocation is audited"
    );
    assert!(
        entries
            .iter()
            .any(|e| e.kind == EntryKind::Refused && e.code.as_deref() == Some("revoked"))
    );
    let report = verify::verify(
        &[load_records(&h.gw_dir())?],
        &[
            load_records(&h.chain_dir("alice"))?,
            load_records(&h.chain_dir("bob"))?,
        ],
    );
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}
