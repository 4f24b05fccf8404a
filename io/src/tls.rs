//! QUIC/TLS configuration with mutual DID authentication (specs/protocol.md, "Transport").
//!
//! Shared by the client and the gateway (the gateway links this crate; the client never links
//! the gateway). Each side presents a self-signed Ed25519 certificate whose key is its DID key.
//! The gateway accepts any self-signed Ed25519 client certificate and derives the peer DID from
//! it; the client accepts the gateway only if its certificate key equals the pinned gateway
//! DID, or the certificate carries a node certificate the pinned DID signed ([`crate::node`]). TLS 1.3 only, ALPN `didgate/N` naming the protocol version ([`Version::alpn`]), Ed25519 the only signature scheme, one crypto
//! provider (ring). The server keeps no session tickets: a resumed connection would skip the
//! client certificate verifier.

use std::sync::Arc;
use std::time::Duration;

use didgate_protocol::{Caller, Did, Identity, Version};

pub use crate::cert::{SERVER_NAME, TlsError, caller_from_cert, did_from_cert, self_signed};
use crate::node::{GatewayTrust, LeafError, NodeCredentials, node_leaf};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Installs ring as the process's one rustls crypto provider (for quinn and reqwest alike).
/// Safe to call more than once.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The peer DID of an established quinn connection.
pub fn peer_did(conn: &quinn::Connection) -> Option<Did> {
    peer_caller(conn).map(|c| c.key().clone())
}

/// The protocol version agreed on a connection: the one its ALPN id names. `None` when the
/// handshake agreed on none this release speaks.
pub fn negotiated_version(conn: &quinn::Connection) -> Option<Version> {
    let data = conn.handshake_data()?;
    let data = data
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?;
    Version::from_alpn(data.protocol.as_deref()?)
}

/// Whether a failed connection attempt is the server refusing every ALPN id offered: a
/// gateway that does not speak the client's protocol version (TLS alert
/// `no_application_protocol`, 120).
pub fn is_version_refusal(e: &quinn::ConnectionError) -> bool {
    // QUIC carries a TLS alert as CRYPTO_ERROR 0x100 + alert (RFC 9001, 4.8)
    const NO_APPLICATION_PROTOCOL: u64 = 0x100 + 120;
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => {
            u64::from(c.error_code) == NO_APPLICATION_PROTOCOL
        }
        quinn::ConnectionError::TransportError(t) => u64::from(t.code) == NO_APPLICATION_PROTOCOL,
        _ => false,
    }
}

/// Whether a failed connection attempt is the server refusing the connection (QUIC
/// CONNECTION_REFUSED): a gateway over one of its per-address limits on new connections.
pub fn is_connection_refused(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => {
            c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED
        }
        _ => false,
    }
}

/// The peer of an established quinn connection: its key and the DID it claims.
pub fn peer_caller(conn: &quinn::Connection) -> Option<Caller> {
    let identity = conn.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    caller_from_cert(certs.first()?.as_ref()).ok()
}

fn verify13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::NoSignatureSchemesInCommon,
        ));
    }
    rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
}

fn bad_cert(_: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
}

/// Client side: accepts the server only if its certificate key is the pinned gateway DID, or a
/// node the pinned DID certified ([`GatewayTrust::check_leaf`]).
#[derive(Debug)]
struct PinnedGateway {
    trust: Arc<GatewayTrust>,
}

/// The rustls error of a refused leaf: the reason kept as its source, so that a client can
/// report why ([`LeafError`]).
pub fn leaf_refused(e: LeafError) -> rustls::Error {
    match e {
        LeafError::Certificate(_) => {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        }
        e => rustls::Error::InvalidCertificate(rustls::CertificateError::Other(
            rustls::OtherError(Arc::new(e)),
        )),
    }
}

impl ServerCertVerifier for PinnedGateway {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // the clock in milliseconds, as certificates and revocations state times (rustls's
        // `now` has whole seconds)
        self.trust
            .check_leaf(end_entity.as_ref(), crate::now_ms())
            .map_err(leaf_refused)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: requires a self-signed Ed25519 client certificate.
#[derive(Debug)]
struct AnyDidClient;

impl ClientCertVerifier for AnyDidClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        caller_from_cert(end_entity).map_err(bad_cert)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

fn transport() -> quinn::TransportConfig {
    transport_idle(IDLE_TIMEOUT)
}

/// The idle timeout of the reference transport (specs/protocol.md, "Transport").
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The reference transport with `idle` as its idle timeout, and keep-alives every sixth of
/// it (5 s for the 30 s default).
pub fn transport_idle(idle: Duration) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(256u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.keep_alive_interval(Some(idle / 6));
    if let Ok(idle) = idle.try_into() {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The gateway's QUIC server configuration, serving every version of [`Version::ALL`].
pub fn server_config(identity: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    server_config_for(identity, &Version::ALL)
}

/// The gateway's QUIC server configuration, serving `versions` (ALPN ids offered newest first).
pub fn server_config_for(
    identity: &Identity,
    versions: &[Version],
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with_leaf(self_signed(identity)?, versions)
}

/// A node's QUIC server configuration: its leaf carries `credentials` ([`node_leaf`]).
/// Serves `versions` (a node serves version 2 only: specs/protocol.md, "Nodes").
pub fn node_server_config(
    identity: &Identity,
    credentials: &NodeCredentials,
    versions: &[Version],
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_with_leaf(node_leaf(identity, credentials), versions)
}

fn server_config_with_leaf(
    (cert, key): (CertificateDer<'static>, PrivateKeyDer<'static>),
    versions: &[Version],
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(AnyDidClient))
        .with_single_cert(vec![cert], key)
        .map_err(TlsError::Config)?;
    // Newest first: rustls picks the first of these the client offers (a client offers the
    // one version it speaks).
    let mut versions = versions.to_vec();
    versions.sort_unstable_by(|a, b| b.cmp(a));
    tls.alpn_protocols = versions.iter().map(|v| v.alpn().to_vec()).collect();
    // No resumption: a resumed connection skips the client certificate verifier.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

/// A client's QUIC configuration, pinned to `gateway`, speaking [`Version::CURRENT`].
pub fn client_config(identity: &Identity, gateway: &Did) -> Result<quinn::ClientConfig, TlsError> {
    client_config_for(identity, gateway, Version::CURRENT)
}

/// A client's QUIC configuration, pinned to `gateway`, offering exactly `version`: a gateway
/// that does not serve it fails the handshake ([`is_version_refusal`]).
pub fn client_config_for(
    identity: &Identity,
    gateway: &Did,
    version: Version,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_trusting(
        identity,
        Arc::new(GatewayTrust::new(gateway.clone())),
        version,
    )
}

/// A client's QUIC configuration that accepts the gateway `trust` pins, or a node it
/// certified ([`GatewayTrust::check_leaf`]), offering exactly `version`.
pub fn client_config_trusting(
    identity: &Identity,
    trust: Arc<GatewayTrust>,
    version: Version,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_with_verifier(identity, version, Arc::new(PinnedGateway { trust }))
}

/// Verifies a TLS 1.3 handshake signature the way both sides of didgate do: Ed25519 only, with
/// the one crypto provider. For a [`ServerCertVerifier`] built outside this crate (a client that
/// wants to learn which DID a gateway presented, [`client_config_with_verifier`]).
pub fn verify_tls13_ed25519(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    verify13(message, cert, dss)
}

/// A client's QUIC configuration like [`client_config_for`], but with the caller's own server
/// certificate verifier (which must check the pinned gateway DID, as [`client_config_for`]'s
/// does, and may record the DID presented: [`did_from_cert`]).
pub fn client_config_with_verifier(
    identity: &Identity,
    version: Version,
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<quinn::ClientConfig, TlsError> {
    let (cert, key) = self_signed(identity)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(TlsError::Config)?;
    tls.alpn_protocols = vec![version.alpn().to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cert_carries_the_did() {
        let id = Identity::from_seed(&[5; 32]);
        let (cert, _) = self_signed(&id).expect("cert");
        assert_eq!(did_from_cert(cert.as_ref()).expect("did"), *id.did());
        let mut bad = cert.as_ref().to_vec();
        let n = bad.len();
        bad[n - 5] ^= 1; // inside the signature
        assert!(did_from_cert(&bad).is_err());
        assert!(did_from_cert(b"not a cert").is_err());
        assert_eq!(
            caller_from_cert(cert.as_ref()).expect("caller"),
            Caller::key_only(id.did().clone())
        );
    }

    #[test]
    fn cert_names_the_did_web_it_acts_as() {
        let web = didgate_protocol::WebDid::parse("did:web:example.com:agents:a1").expect("web");
        let id = Identity::from_seed(&[6; 32]).acting_as(web.clone(), "key-1");
        let (cert, _) = self_signed(&id).expect("cert");
        let caller = caller_from_cert(cert.as_ref()).expect("caller");
        assert_eq!(caller, Caller::web(web, id.did().clone()));
        assert_eq!(caller.as_str(), "did:web:example.com:agents:a1");
    }
}
