//! A party's self-signed Ed25519 certificate, whose key is its DID key (specs/protocol.md,
//! "Transport"): making one ([`self_signed`]) and reading the DID out of a peer's
//! ([`caller_from_cert`]). Below both [`crate::tls`] (the QUIC configurations) and
//! [`crate::node`] (a node's leaf and a client's trust in nodes).

use didgate_protocol::{Caller, Did, Identity, Principal};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The TLS server name clients use (identity comes from the pinned DID, not the name).
pub const SERVER_NAME: &str = "didgate";
const ED25519_OID: &str = "1.3.101.112";

/// Why TLS configuration or a peer certificate failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate does not parse or is not a self-signed Ed25519 certificate.
    #[error("peer certificate rejected: {0}")]
    Certificate(&'static str),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The self-signed certificate could not be made (rcgen refused the key or a name).
    #[error("TLS configuration: {0}")]
    SelfSigned(#[source] rcgen::Error),
    /// quinn refused the rustls configuration (it lacks the cipher suite QUIC needs).
    #[error("TLS configuration: {0}")]
    Quic(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A self-signed certificate for `identity` and its private key.
pub fn self_signed(
    identity: &Identity,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let pkcs8 = identity.pkcs8_der();
    let key_der = PrivatePkcs8KeyDer::from(pkcs8.to_vec());
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)
        .map_err(TlsError::SelfSigned)?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(TlsError::SelfSigned)?;
    let principal = identity.principal();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, principal.as_str());
    // The DID the holder acts as, as a SAN URI: its did:key, or the did:web whose document
    // lists this key (checked by the gateway after the handshake).
    let uri =
        rcgen::string::Ia5String::try_from(principal.as_str()).map_err(TlsError::SelfSigned)?;
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    let cert = params.self_signed(&key).map_err(TlsError::SelfSigned)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(key_der)))
}

/// The DID of a self-signed Ed25519 certificate: checks the key type, the signature
/// algorithm and the self-signature.
pub fn did_from_cert(der: &[u8]) -> Result<Did, TlsError> {
    caller_from_cert(der).map(|c| c.key().clone())
}

/// The caller a self-signed Ed25519 certificate presents: its key, and the DID its SAN URI
/// names (a did:web it claims to act as; a did:key SAN must be the key's own DID). The
/// did:web claim is only a claim until the gateway's resolver checks the document.
pub fn caller_from_cert(der: &[u8]) -> Result<Caller, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|_| TlsError::Certificate("not DER X.509"))?;
    if !rest.is_empty() {
        return Err(TlsError::Certificate("trailing bytes"));
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err(TlsError::Certificate("key is not Ed25519"));
    }
    if cert.signature_algorithm.algorithm.to_id_string() != ED25519_OID {
        return Err(TlsError::Certificate("signature is not Ed25519"));
    }
    let key: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| TlsError::Certificate("Ed25519 key is not 32 bytes"))?;
    let verifying = ed25519_dalek::VerifyingKey::from_bytes(&key)
        .map_err(|_| TlsError::Certificate("invalid Ed25519 key"))?;
    let sig: [u8; 64] = cert
        .signature_value
        .data
        .as_ref()
        .try_into()
        .map_err(|_| TlsError::Certificate("signature is not 64 bytes"))?;
    verifying
        .verify_strict(
            cert.tbs_certificate.as_ref(),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .map_err(|_| TlsError::Certificate("self-signature does not verify"))?;
    let key = Did::from_verifying_key(&verifying);
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    match uris.as_slice() {
        [] => Ok(Caller::key_only(key)),
        [one] => match Principal::parse(one) {
            Ok(Principal::Key(d)) if d == key => Ok(Caller::key_only(key)),
            Ok(Principal::Web(w)) => Ok(Caller::web(w, key)),
            _ => Err(TlsError::Certificate(
                "the SAN URI is neither the key's did:key nor a did:web",
            )),
        },
        _ => Err(TlsError::Certificate("more than one SAN URI")),
    }
}
