//! A local HTTPS server for did:web documents, under a test CA that only the gateway's
//! resolver is told to trust (`[did_web] test_roots`). It serves what a test publishes, counts
//! every request, and can answer with a redirect or an oversized body.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use didgate_protocol::WebDid;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// What the server answers for a path.
#[derive(Debug, Clone)]
pub enum Served {
    /// 200 with these bytes.
    Document(Vec<u8>),
    /// 302 to this location.
    Redirect(String),
}

type Table = Arc<Mutex<HashMap<String, Served>>>;

/// A running document server on 127.0.0.1, named `localhost` in its certificate.
pub struct DocServer {
    addr: SocketAddr,
    ca_pem: String,
    table: Table,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DocServer {
    /// Starts the server with a fresh test CA.
    pub async fn start() -> anyhow::Result<Self> {
        didgate_client::low_level::tls::install_provider();
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "didgate test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])?
            .signed_by(&leaf_key, &ca)?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), CertificateDer::from(ca.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let table: Table = Arc::default();
        let requests = Arc::new(AtomicU64::new(0));
        let (t, r) = (table.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (t, r) = (t.clone(), r.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req: Request<_>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let found = t
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(req.uri().path())
                            .cloned();
                        async move { Ok::<_, std::convert::Infallible>(answer(found)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            ca_pem: ca.pem(),
            table,
            requests,
            task,
        })
    }

    /// The test CA's certificate, PEM (for `[did_web] test_roots`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A did:web on this server: `did:web:localhost%3APORT:seg:...`.
    pub fn did(&self, path: &[&str]) -> WebDid {
        let mut s = format!("did:web:localhost%3A{}", self.addr.port());
        for seg in path {
            s.push(':');
            s.push_str(seg);
        }
        WebDid::parse(&s).unwrap_or_else(|e| panic!("test did:web {s}: {e}"))
    }

    /// Serves `answer` at `did`'s document path.
    pub fn publish(&self, did: &WebDid, answer: Served) {
        let url = did.document_url();
        let path = url
            .splitn(4, '/')
            .nth(3)
            .map(|p| format!("/{p}"))
            .unwrap_or_default();
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path, answer);
    }

    /// How many HTTP requests the server has received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for DocServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(found: Option<Served>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    match found {
        Some(Served::Document(b)) => {
            *resp.body_mut() = Full::new(Bytes::from(b));
            resp.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("application/did+json"),
            );
        }
        Some(Served::Redirect(to)) => {
            *resp.status_mut() = StatusCode::FOUND;
            if let Ok(v) = hyper::header::HeaderValue::from_str(&to) {
                resp.headers_mut().insert("location", v);
            }
        }
        None => *resp.status_mut() = StatusCode::NOT_FOUND,
    }
    resp
}
