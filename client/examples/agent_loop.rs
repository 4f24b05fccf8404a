//! An agent loop: discover the operations this DID may call, then make many calls
//! concurrently on one connection, handling each typed error.
//!
//! ```text
//! DIDGATE_GATEWAY=127.0.0.1:7443 DIDGATE_GATEWAY_DID=did:key:z6Mk... \
//! DIDGATE_IDENTITY=agent.identity DIDGATE_CHAIN=agent-chain \
//!     cargo run -p didgate-client --example agent_loop -- 16
//! ```
//!
//! Prints one line per call and a summary `calls=N receipts=R refused=F failed=X`.

use std::error::Error;
use std::sync::Arc;

use didgate_client::{CallError, CallSpec, Client, identity};
use didgate_protocol::Did;

fn env(name: &str) -> Result<String, Box<dyn Error>> {
    std::env::var(name).map_err(|_| format!("set {name}").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let me = identity::load(env("DIDGATE_IDENTITY")?.as_ref())?;
    let gateway: Did = env("DIDGATE_GATEWAY_DID")?.parse()?;
    let client = Arc::new(
        Client::open(
            me,
            env("DIDGATE_CHAIN")?.as_ref(),
            env("DIDGATE_GATEWAY")?.parse()?,
            gateway,
        )
        .await?,
    );
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(8);

    // What may this DID call? (advice from the gateway's catalog; each call is still checked)
    let ops = client.catalog().await?;
    for op in &ops {
        println!(
            "may call {}: {} {} {}",
            op.name, op.method, op.path, op.description
        );
    }

    // One intent per call, all in flight at once on the same QUIC connection.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        tasks.spawn(async move {
            let spec = if i % 2 == 0 {
                CallSpec::new("payments", "GET", "/v1/balance")
            } else {
                CallSpec::new("payments", "POST", "/v1/charges")
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"amount":{},"currency":"usd"}}"#, 100 + i))
            };
            (i, client.call(spec).await)
        });
    }
    let (mut receipts, mut refused, mut failed) = (0, 0, 0);
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = joined?;
        match result {
            Ok(answer) => {
                receipts += 1;
                println!(
                    "call {i}: status {} receipt entry {}",
                    answer.status, answer.receipt.entry.seq
                );
            }
            Err(e @ CallError::Refused { .. }) => {
                refused += 1;
                println!("call {i}: {e} ({})", e.advice());
            }
            Err(e) => {
                // Unreachable, outcome unknown, invalid answer, local audit: never re-sign
                // blindly; the chain holds what is known.
                failed += 1;
                println!("call {i}: {e} ({})", e.advice());
            }
        }
    }
    client.close().await;
    println!("calls={n} receipts={receipts} refused={refused} failed={failed}");
    Ok(())
}
