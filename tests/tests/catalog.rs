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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_follows_a_cedar_policy_reload() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let gw = h.gateway.clone().expect("running");
    let a = h.client("alice", alice()).await?;
    assert_eq!(a.catalog().await?.len(), 3, "the [[rule]] policy");

    // a Cedar policy file: alice may GET one charge by id (one segment), and forbid wins over
    // a permit for POST
    let alice_did = alice().did().to_string();
    std::fs::write(
        h.gw_dir().join("policies.cedar"),
        format!(
            r#"
@id("charge-lookup")
permit (principal == Did::"{alice_did}", action == Action::"GET", resource in Upstream::"payments")
when {{ resource.path like "/v1/charges/*" && resource.segments == 3 }};

@id("all-writes")
permit (principal == Did::"{alice_did}", action in Action::"write", resource in Upstream::"payments");

@id("no-posts")
forbid (principal, action == Action::"POST", resource);
"#
        ),
    )?;
    let path = h.gw_dir().join("gateway.toml");
    let mut config = didgate_gateway::config::RawConfig::read(&path)?;
    config.gateway.policy_file = Some("policies.cedar".into());
    config.rules.clear();
    std::fs::write(&path, toml::to_string(&config)?)?;
    gw.reload_policy()?;

    assert_eq!(
        names(&a.catalog().await?),
        [
            "payments get_charge GET /v1/charges/{id}",
            "payments refund_charge DELETE /v1/charges/{id}",
        ],
        "GET only on one charge; writes allowed but POST forbidden"
    );
    // the listed operation works once its {id} is filled in
    let answer = a
        .call(didgate_client::CallSpec::new(
            "payments",
            "GET",
            "/v1/charges/ch_3",
        ))
        .await?;
    assert_eq!(answer.status, 200);
    a.close().await;
    drop((a, gw));
    h.stop().await;
    Ok(())
}
