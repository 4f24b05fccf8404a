//! The didgate gateway: QUIC server with mutual DID authentication, canonical-request checks,
//! policy, single-use grants recorded atomically with their audit entry, a local KMS with
//! just-in-time decryption, and the upstream executor. `didgated` is a thin binary over it.
//!
//! Owns: the data directory ([`datadir::DataDir`]), `gateway.toml` ([`config`]), the policy
//! decision ([`policy`]), keys at rest ([`kms`]) and their lifecycle ([`secrets`]), the per-call pipeline and server
//! ([`gateway`]), the upstream executor ([`upstream`]), live events ([`events`]), Prometheus
//! metrics ([`metrics`]) and serving as one node of a gateway DID ([`node`]). It does not own the wire format (didgate-protocol), the shared I/O
//! (didgate-io: TLS binding, framing, identity files, hardening, the clock), the audit log
//! format (didgate-audit), or the daemon's command line and the demo (didgate-daemon).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::path::Path::new("/var/lib/didgate");
//! let gw = std::sync::Arc::new(didgate_gateway::gateway::Gateway::open(dir).await?);
//! let endpoint = didgate_gateway::server::endpoint(&gw, gw.config().gateway().listen)?;
//! didgate_gateway::server::serve(gw, endpoint, async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod admission;
mod call;
pub mod catalog;
pub mod config;
pub mod control;
pub mod datadir;
pub mod didweb;
pub mod echo;
pub mod egress;
pub mod events;
pub mod export;
pub mod gateway;
pub mod kms;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod pkcs11;
pub mod policy;
pub mod secrets;
pub mod server;
pub mod shared;
pub mod shares;
pub mod upstream;
pub mod upstreams;

pub use gateway::Gateway;
pub use server::{endpoint, serve};

/// Milliseconds since the Unix epoch by the system clock.
pub use didgate_io::now_ms;

pub use admin::{AdminError, add_secret, init};
pub use datadir::{KEY_FILES, private_data_dir};
