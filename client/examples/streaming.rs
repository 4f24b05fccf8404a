//! A streamed answer: server-sent events printed as they arrive, then the receipt, checked
//! against the body's length and digest computed on the fly.
//!
//! ```text
//! DIDGATE_GATEWAY=127.0.0.1:7443 DIDGATE_GATEWAY_DID=did:key:z6Mk... \
//! DIDGATE_IDENTITY=agent.identity DIDGATE_CHAIN=agent-chain \
//!     cargo run -p didgate-client --example streaming -- /v1/events?n=5
//! ```

use std::error::Error;
use std::io::Write;

use didgate_client::{CallSpec, Client, identity};
use didgate_protocol::Did;

fn env(name: &str) -> Result<String, Box<dyn Error>> {
    std::env::var(name).map_err(|_| format!("set {name}").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let me = identity::load(env("DIDGATE_IDENTITY")?.as_ref())?;
    let gateway: Did = env("DIDGATE_GATEWAY_DID")?.parse()?;
    let client = Client::open(
        me,
        env("DIDGATE_CHAIN")?.as_ref(),
        env("DIDGATE_GATEWAY")?.parse()?,
        gateway,
    )
    .await?;
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/v1/events?n=5".into());
    let mut answer = client
        .call_streaming(CallSpec::new("payments", "GET", &path))
        .await?;
    eprintln!("status {}", answer.status());
    let mut out = std::io::stdout();
    // Each chunk is printed the moment the gateway relays it.
    while let Some(chunk) = answer.next_chunk().await? {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    let receipt = answer.receipt().cloned().ok_or("no receipt")?;
    drop(answer);
    client.close().await;
    eprintln!(
        "receipt: {} bytes, gateway entry {}",
        receipt.resp_len, receipt.entry.seq
    );
    Ok(())
}
