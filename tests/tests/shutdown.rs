//! Stopping drains: a call in flight finishes with its receipt, new calls on open connections
//! are refused `shutting_down` (signed, audited), and a final checkpoint covers the whole chain.

use std::time::Duration;

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::{load_records, verify};
use didgate_client::{CallError, CallSpec};
use didgate_protocol::message::{Checkpoint, RefusalCode};
use didgate_tests::{Harness, alice, bob};

/// Waits (bounded) until `cond` holds, re-checking as other tasks make progress.
async fn until(what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_drains_in_flight_refuses_new_and_checkpoints() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let a = std::sync::Arc::new(h.client("alice", alice()).await?);
    let b = h.client("bob", bob()).await?;
    // bob's connection is open before the stop
    assert_eq!(
        b.call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?
            .status,
        200
    );

    // alice's call reaches the upstream, which holds it until released
    let in_flight = {
        let a = a.clone();
        tokio::spawn(async move {
            a.call(CallSpec::new("payments", "GET", "/v1/slow-head"))
                .await
        })
    };
    let upstream = &h.upstream;
    until("the upstream to hold alice's call", || {
        upstream.seen().iter().any(|s| s.path == "/v1/slow-head")
    })
    .await?;

    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    h.signal_stop();
    until("the gateway to drain", || gw.is_stopping()).await?;
    drop(gw);

    // a new call on an open connection: refused, typed
    let refused = b
        .call(CallSpec::new("payments", "GET", "/v1/balance"))
        .await;
    assert!(
        matches!(
            refused,
            Err(CallError::Refused {
                code: RefusalCode::ShuttingDown,
                ..
            })
        ),
        "{refused:?}"
    );

    // the call in flight finishes with a verified receipt
    h.upstream.release_slow(1);
    let answer = in_flight.await??;
    assert_eq!(answer.status, 200);

    b.close().await;
    a.close().await;
    drop((a, b));
    h.stop().await;

    let records = load_records(&h.gw_dir())?;
    let size = records.entries.len() as u64;
    let last = records
        .checkpoints
        .last()
        .ok_or_else(|| anyhow::anyhow!("no checkpoint"))?;
    let cp = didgate_protocol::message::open::<Checkpoint>(last)?;
    assert_eq!(
        cp.message().size,
        size,
        "the final checkpoint covers every entry"
    );
    let entries: Vec<Entry> = records
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?;
    assert!(
        entries.iter().any(|e| e.kind == EntryKind::Refusals
            && e.code
                .as_deref()
                .is_some_and(|c| c.contains("shutting_down"))),
        "the refusal is audited"
    );
    let report = verify::verify(
        &[records],
        &[
            load_records(&h.chain_dir("alice"))?,
            load_records(&h.chain_dir("bob"))?,
        ],
    );
    assert!(report.ok(), "{:?}", report.violations);
    Ok(())
}
