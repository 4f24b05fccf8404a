//! One signed call through a gateway, then its receipt.
//!
//! ```text
//! DIDGATE_GATEWAY=127.0.0.1:7443 DIDGATE_GATEWAY_DID=did:key:z6Mk... \
//! DIDGATE_IDENTITY=agent.identity DIDGATE_CHAIN=agent-chain \
//!     cargo run -p didgate-client --example one_shot -- payments GET /v1/balance
//! ```
//!
//! The identity file is created (mode 0600) if it does not exist yet; its DID is printed so an
//! operator can allow it. Exit status 0 when the upstream answered below 400.

use std::error::Error;
use std::path::PathBuf;

use didgate_client::{CallSpec, Client, identity};
use didgate_protocol::{Did, Identity};

fn env(name: &str) -> Result<String, Box<dyn Error>> {
    std::env::var(name).map_err(|_| format!("set {name}").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let path = PathBuf::from(env("DIDGATE_IDENTITY")?);
    // Load the identity, or create it on the first run (keygen never overwrites).
    let me = match identity::load(&path) {
        Ok(me) => me,
        Err(identity::IdentityError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            let me = Identity::generate();
            identity::create(&path, &me)?;
            me
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!("identity: {}", me.did());
    let gateway: Did = env("DIDGATE_GATEWAY_DID")?.parse()?;
    let client = Client::open(
        me,
        env("DIDGATE_CHAIN")?.as_ref(),
        env("DIDGATE_GATEWAY")?.parse()?,
        gateway,
    )
    .await?;

    let mut args = std::env::args().skip(1);
    let upstream = args.next().unwrap_or_else(|| "payments".into());
    let method = args.next().unwrap_or_else(|| "GET".into());
    let path = args.next().unwrap_or_else(|| "/v1/balance".into());
    let result = client.call(CallSpec::new(&upstream, &method, &path)).await;
    client.close().await;
    match result {
        Ok(answer) => {
            println!("status {}", answer.status);
            println!("{}", String::from_utf8_lossy(&answer.body));
            println!(
                "receipt: call {} closed by gateway entry {}",
                hex::encode(answer.call),
                answer.receipt.entry.seq
            );
            if answer.status >= 400 {
                std::process::exit(1);
            }
            Ok(())
        }
        Err(e) => {
            // Every error says what to do about it.
            eprintln!("{e}\n  what to do: {}", e.advice());
            std::process::exit(3);
        }
    }
}
