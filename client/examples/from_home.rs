//! One signed call from the home the `didgate` CLI set up: its identity, its pinned gateway, its
//! chain, shared with the home's other processes (a running `didgate proxy` makes the call if
//! it holds the chain).
//!
//! ```text
//! didgate keygen && didgate pin --gateway 127.0.0.1:7443 --gateway-did did:key:z6Mk...
//! DIDGATE_PASSPHRASE=... cargo run -p didgate-client --example from_home -- payments GET /v1/balance
//! ```
//!
//! The home is `DIDGATE_HOME`, else `~/.didgate`. A sealed identity's passphrase comes from
//! `DIDGATE_PASSPHRASE` here (the `didgate` binary also asks on the terminal). On a failed
//! call, the error's sources are printed too.

use std::error::Error;

use didgate_client::local::Caller;
use didgate_client::{CONNECT_TIMEOUT, CallSpec, Home, HomeError};
use zeroize::Zeroizing;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(upstream), Some(method), Some(path)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: from_home UPSTREAM METHOD PATH".into());
    };
    let home = Home::from_env(None)?;
    let pin = home
        .pinned()?
        .ok_or("no gateway pinned: run `didgate pin` first")?;
    // asked for only if the identity is sealed
    let identity = home.identity_with(|path| {
        std::env::var("DIDGATE_PASSPHRASE")
            .map(Zeroizing::new)
            .map_err(|_| {
                Prompt::Passphrase(format!(
                    "{} is sealed: set DIDGATE_PASSPHRASE",
                    path.display()
                ))
            })
    });
    let identity = identity.map_err(|e| match e {
        Prompt::Home(e) => Box::new(e) as Box<dyn Error>,
        Prompt::Passphrase(why) => why.into(),
    })?;
    eprintln!(
        "calling as {} through {} at {}",
        identity.did(),
        pin.did,
        pin.addr
    );
    let caller = Caller::from_home(&home, identity, &pin, CONNECT_TIMEOUT).await?;
    let result = caller.call(CallSpec::new(&upstream, &method, &path)).await;
    caller.close().await;
    match result {
        Ok(answer) => {
            println!("{}", String::from_utf8_lossy(&answer.body));
            eprintln!(
                "{} (receipt: gateway entry {})",
                answer.status, answer.receipt.entry.seq
            );
            Ok(())
        }
        Err(e) => {
            eprintln!("{e}\n{}", e.advice());
            let mut source = e.source();
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            Err("the call failed".into())
        }
    }
}

/// Why the identity could not be loaded: the home, or no passphrase.
enum Prompt {
    Home(HomeError),
    Passphrase(String),
}

impl From<HomeError> for Prompt {
    fn from(e: HomeError) -> Self {
        Self::Home(e)
    }
}
