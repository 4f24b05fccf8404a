//! The catalog (specs/protocol.md, "Catalog") over a real gateway: each DID sees the configured
//! operations its policy allows, no more; a revoked DID is refused; nothing of the policy text
//! travels, and asking is not a call (no chain entry, no upstream request).

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::load_records;
use didgate_client::CallError;
use didgate_gateway::gateway::parse_revoke;
use didgate_protocol::Identity;
use didgate_protocol::message::RefusalCode;
use didgate_tests::{Harness, alice, bob};

fn names(ops: &[didgate_client::Operation]) -> Vec<String> {
    ops.iter()
        .map(|o| format!("{} {} {} {}", o.upstream, o.name, o.method, o.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_did_sees_the_operations_its_policy_allows() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let b = h.client("bob", bob()).await?;
    let stranger = h
        .client("stranger", Identity::from_seed(&[0x5e; 32]))
        .await?;

    let ops = a.catalog().await?;
    assert_eq!(
        names(&ops),
        [
            "payments get_balance GET /v1/balance",
            "payments create_charge POST /v1/charges",
            "payments get_charge GET /v1/charges/{id}",
        ],
        "alice may GET and POST /v1/**, not DELETE"
    );
    assert_eq!(ops[0].description, "The account's available balance.");
    assert_eq!(names(&a.catalog_of("payments").await?), names(&ops));
    assert!(a.catalog_of("nowhere").await?.is_empty());
    assert_eq!(
        names(&b.catalog().await?),
        ["payments get_balance GET /v1/balance"],
        "bob (group readers) may only GET /v1/balance"
    );
    assert!(
        stranger.catalog().await?.is_empty(),
        "a DID policy does not know sees nothing"
    );

    // revoked: a signed refusal, not an empty list
    let gw = h.gateway.clone().expect("running");
    let target = parse_revoke(Some(bob().did().as_str()), None).map_err(anyhow::Error::msg)?;
    gw.revoke(&target, "test").await?;
    let b = h.client("bob2", bob()).await?;
    match b.catalog().await {
        Err(CallError::Refused { code, .. }) => assert_eq!(code, RefusalCode::Revoked),
        other => panic!("expected a revoked refusal, got {other:?}"),
    }

    // asking is not a call: nothing reached the upstream and alice's chain has no call entries
    assert!(h.upstream.seen().is_empty());
    for c in [a, stranger, b] {
        c.close().await;
    }
    drop(gw);
    h.stop().await;
    let records = load_records(&h.chain_dir("alice"))?;
    for (_, bytes) in &records.entries {
        let kind = Entry::decode(bytes)?.kind;
        assert!(
            !matches!(kind, EntryKind::Request | EntryKind::Result),
            "{kind:?}"
        );
    }
    Ok(())
}
