//! The store stays bounded (issue 18 item 5): replay keys and grant claims are keyed by their
//! deadline and pruned while the gateway runs (a range of each keyspace's head), not only at
//! start-up; the claims a release before this one wrote are re-keyed at start-up, so a request
//! claimed before an upgrade is still refused as a replay after it. Pruning is judged with a
//! chosen `now` (`Gateway::prune_claims`), never by waiting.

use didgate_client::low_level::{RawExchange as _, RawFinal};
use didgate_gateway::datadir::{GRANTS, REPLAY, SPACES};
use didgate_protocol::message::RefusalCode;
use didgate_tests::{Harness, alice};

/// The keys of `space` in the gateway's store (the gateway must be stopped).
fn keys(h: &Harness, space: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let store = didgate_audit::Store::open(&h.gw_dir().join("store"), SPACES)?;
    Ok(store
        .scan(space, b"")?
        .into_iter()
        .map(|(k, _)| k)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_claims_are_pruned_while_serving_and_live_ones_kept() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let (signed, _) = h.signed_request(&alice(), |_| {})?;
    assert!(matches!(
        a.send_signed(&signed, b"").await?.last,
        RawFinal::Receipt(_)
    ));
    let grant = a
        .grant(didgate_client::CallSpec::new(
            "payments",
            "GET",
            "/v1/balance",
        ))
        .await?;
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("gateway"))?;
    let skew_ms = gw.config().gateway().skew_secs * 1000;
    let now = didgate_client::low_level::now_ms();

    // within their window nothing goes, and a replay is refused
    assert_eq!(gw.prune_claims(now)?, 0);
    let again = a.send_signed(&signed, b"").await?;
    let RawFinal::Refusal(r) = again.last else {
        anyhow::bail!("a replay executed: {:?}", again.last);
    };
    assert_eq!(r.message().code, RefusalCode::Replay);

    // once every deadline passed: the call's replay key and its consumed grant, the grant
    // request's replay key, the issued grant (one replay key per request: issue 20)
    let later = now + skew_ms.max(grant.grant.expires_ms - now) + 1_000;
    assert_eq!(gw.prune_claims(later)?, 4);
    assert_eq!(gw.prune_claims(later)?, 0);
    // from then on a claim below that horizon is refused, as if its key were there: the
    // request is still in its window by the real clock, its replay keys are gone, and the
    // replay is refused all the same (by the writer; nothing executes)
    let again = a.send_signed(&signed, b"").await?;
    let RawFinal::Refusal(r) = again.last else {
        anyhow::bail!(
            "a replay executed after its keys were pruned: {:?}",
            again.last
        );
    };
    assert_eq!(r.message().code, RefusalCode::Replay);
    a.close().await;
    drop(gw);
    h.stop().await;
    assert!(keys(&h, REPLAY)?.is_empty());
    assert!(keys(&h, GRANTS)?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_claimed_under_the_old_key_layout_is_still_a_replay_after_the_upgrade()
-> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = h.client("alice", alice()).await?;
    let (signed, call) = h.signed_request(&alice(), |_| {})?;
    assert!(matches!(
        a.send_signed(&signed, b"").await?.last,
        RawFinal::Receipt(_)
    ));
    a.close().await;
    h.stop().await;

    // rewrite the call's replay key as the releases before deadline-keyed claims wrote them:
    // `c` || call ID and `n` || key || nonce -> deadline (u64be) (those releases claimed the
    // call ID too; this one claims the (key, nonce) only)
    {
        let store = didgate_audit::Store::open(&h.gw_dir().join("store"), SPACES)?;
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        for (key, _) in store.scan(REPLAY, b"")? {
            let (deadline, rest) = key.split_at(8);
            if rest[0] == b'n' {
                puts.push((REPLAY, rest.to_vec(), deadline.to_vec()));
                puts.push((REPLAY, [b"c".as_slice(), &call].concat(), deadline.to_vec()));
            }
            removes.push((REPLAY, key));
        }
        assert_eq!(
            puts.len(),
            2,
            "the call's one replay key, and its legacy call-ID key"
        );
        assert!(puts.iter().any(|(_, k, _)| k[1..] == call));
        store.write(&[], &removes)?;
        store.write(&puts, &[])?;
    }

    // the upgraded gateway re-keys them at start-up: the replay is still refused
    h.restart().await?;
    let a = h.client("alice-after", alice()).await?;
    let again = a.send_signed(&signed, b"").await?;
    let RawFinal::Refusal(r) = again.last else {
        anyhow::bail!("a replay executed after the upgrade: {:?}", again.last);
    };
    assert_eq!(r.message().code, RefusalCode::Replay);
    a.close().await;
    h.stop().await;
    let left = keys(&h, REPLAY)?;
    assert!(left.iter().all(|k| k[0] == 0), "legacy keys left: {left:?}");
    Ok(())
}
