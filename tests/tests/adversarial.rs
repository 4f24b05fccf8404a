//! The adversarial suite: what untrusted compute can send at a real gateway on loopback, each
//! case refused with its typed, signed reason, recorded in the gateway's chain (one `refused`
//! entry for a DID policy knows, else counted in the aggregate `refusals` entry), and never
//! forwarded: the demo upstream records every request it receives, and none of these arrive.
//!
//! Scale knobs (defaults keep CI fast): `DIDGATE_ADV_CONNECTIONS` (connection attempts from one
//! DID, default 2000) and `DIDGATE_ADV_FRESH_DIDS` (calls from fresh did:keys, default 2000).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use didgate_audit::entry::{Entry, EntryKind};
use didgate_audit::{load_records, verify};
use didgate_client::{CallError, CallSpec, RawAnswer, RawFinal};
use didgate_gateway::gateway::{Gateway, REPLAY, Revoke};
use didgate_protocol::Identity;
use didgate_protocol::frame::FrameType;
use didgate_protocol::message::{GrantBody, Message, RefusalCode, Request, SignedMessage};
use didgate_tests::{
    Harness, RawEnd, alice, bob, frames, raw_exchange, read_end, without_address_limits,
};

/// The code of a refusal, whichever way it came back.
trait Refused {
    fn refusal(&self) -> Option<RefusalCode>;
}

impl<T> Refused for Result<T, CallError> {
    fn refusal(&self) -> Option<RefusalCode> {
        match self {
            Err(CallError::Refused { code, .. }) => Some(*code),
            _ => None,
        }
    }
}

impl Refused for RawAnswer {
    fn refusal(&self) -> Option<RefusalCode> {
        match &self.last {
            RawFinal::Refusal(r) => Some(r.message.code),
            _ => None,
        }
    }
}

impl Refused for RawEnd {
    fn refusal(&self) -> Option<RefusalCode> {
        match self {
            RawEnd::Refusal(r) => Some(r.code),
            _ => None,
        }
    }
}

/// Runs the cases against one gateway, checking after each: the code, the audit entry, and
/// that the upstream received nothing new.
struct Suite<'h> {
    h: &'h Harness,
    gw: Arc<Gateway>,
    cases: usize,
    upstream_seen: usize,
    entries_before: usize,
}

impl<'h> Suite<'h> {
    fn new(h: &'h Harness) -> anyhow::Result<Self> {
        let gw = h
            .gateway
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
        Ok(Self {
            h,
            gw,
            cases: 0,
            upstream_seen: 0,
            entries_before: 0,
        })
    }

    /// Before a case: writes out refusals counted so far, and remembers where the chain and the
    /// upstream's record stand.
    async fn begin(&mut self) -> anyhow::Result<()> {
        self.gw.flush_refusals().await?;
        self.upstream_seen = self.h.upstream.seen().len();
        self.entries_before = self.h.live_entries()?.len();
        Ok(())
    }

    fn new_entries(&self) -> anyhow::Result<Vec<Entry>> {
        Ok(self.h.live_entries()?.split_off(self.entries_before))
    }

    fn nothing_forwarded(&self, name: &str) {
        assert_eq!(
            self.h.upstream.seen().len(),
            self.upstream_seen,
            "{name}: reached the upstream"
        );
    }

    /// A refusal to a DID policy knows: exactly one new entry, `refused`, naming the call.
    fn individual(
        &mut self,
        name: &str,
        got: Option<RefusalCode>,
        want: RefusalCode,
        call: [u8; 32],
    ) -> anyhow::Result<()> {
        assert_eq!(got, Some(want), "{name}");
        let new = self.new_entries()?;
        assert!(
            new.iter().any(|e| e.kind == EntryKind::Refused
                && e.call == Some(call)
                && e.code.as_deref() == Some(want.as_str())),
            "{name}: no refused entry with code {want} for the call in {new:?}"
        );
        self.nothing_forwarded(name);
        self.cases += 1;
        Ok(())
    }

    /// A refusal before any signature is trusted (or to an unknown DID): counted, and the
    /// aggregate entry written now says `code=n`.
    async fn aggregate(
        &mut self,
        name: &str,
        got: &[Option<RefusalCode>],
        want: RefusalCode,
    ) -> anyhow::Result<()> {
        assert!(
            got.iter().all(|g| *g == Some(want)),
            "{name}: {got:?}, want {want}"
        );
        self.gw.flush_refusals().await?;
        let new = self.new_entries()?;
        let expected = format!("{want}={}", got.len());
        assert!(
            new.iter()
                .any(|e| e.kind == EntryKind::Refusals
                    && e.code.as_deref() == Some(expected.as_str())),
            "{name}: no aggregate entry {expected} in {new:?}"
        );
        self.nothing_forwarded(name);
        self.cases += 1;
        Ok(())
    }
}

/// Re-encodes a signed message with its payload changed and its signature kept.
fn tamper_payload<T: Message>(
    signed: &[u8],
    change: impl FnOnce(&mut T),
) -> anyhow::Result<Vec<u8>> {
    let mut sign1 = didgate_protocol::envelope::parse_for_tests(signed)
        .ok_or_else(|| anyhow::anyhow!("not COSE_Sign1"))?;
    let mut msg = T::decode(sign1.payload.as_deref().unwrap_or_default())?;
    change(&mut msg);
    sign1.payload = Some(msg.encode());
    Ok(didgate_protocol::envelope::reencode_for_tests(sign1))
}

fn final_grant(raw: &RawAnswer) -> anyhow::Result<(GrantBody, Vec<u8>)> {
    match &raw.last {
        RawFinal::Grant(g) => Ok((g.message.clone(), g.bytes.clone())),
        other => anyhow::bail!("expected a grant, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_replayed_and_smuggled_requests_are_refused_audited_and_never_forwarded()
-> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| c.gateway.frame_timeout_secs = 1).await?;
    let a = h.client("alice", alice()).await?;
    let mallory_id = Identity::from_seed(&[0x66; 32]);
    let mallory = h
        .client("mallory", Identity::from_seed(&[0x66; 32]))
        .await?;
    let mut s = Suite::new(&h)?;
    let max_body = h
        .gateway
        .as_ref()
        .map(|g| g.config().gateway.max_body)
        .unwrap_or_default();

    // --- replay of a captured request
    let (captured, call) = h.signed_request(&alice(), |_| {})?;
    assert!(matches!(
        a.send_signed(&captured, b"").await?.last,
        RawFinal::Receipt(_)
    ));
    s.begin().await?;
    let r = a.send_signed(&captured, b"").await?;
    s.individual("replayed request", r.refusal(), RefusalCode::Replay, call)?;

    // --- replay of a captured grant request, and of a captured grant
    let (grant_req, grant_call) = h.signed_request(&alice(), |_| {})?;
    let (grant, grant_bytes) =
        final_grant(&a.exchange(FrameType::GrantRequest, &grant_req, b"").await?)?;
    s.begin().await?;
    let r = a.exchange(FrameType::GrantRequest, &grant_req, b"").await?;
    s.individual(
        "replayed grant request",
        r.refusal(),
        RefusalCode::Replay,
        grant_call,
    )?;
    assert!(matches!(
        a.exchange(FrameType::Execute, &grant_bytes, b"")
            .await?
            .last,
        RawFinal::Receipt(_)
    ));
    s.begin().await?;
    let r = a.exchange(FrameType::Execute, &grant_bytes, b"").await?;
    // its call ID was refused a moment ago (the replayed grant request): recorded once, this
    // one is counted
    let _ = grant.call;
    s.aggregate(
        "replayed grant (a call ID already refused)",
        &[r.refusal()],
        RefusalCode::GrantInvalid,
    )
    .await?;

    // --- a fresh grant, presented by another DID, altered, forged, or with another body
    let (g_req, _) = h.signed_request(&alice(), |_| {})?;
    let (g, g_bytes) = final_grant(&a.exchange(FrameType::GrantRequest, &g_req, b"").await?)?;
    s.begin().await?;
    let r = mallory.exchange(FrameType::Execute, &g_bytes, b"").await?;
    s.aggregate(
        "grant presented by another DID",
        &[r.refusal()],
        RefusalCode::GrantInvalid,
    )
    .await?;
    let mut got = Vec::new();
    for (what, change) in [
        (
            "another upstream",
            Box::new(|g: &mut GrantBody| g.upstream = "admin".into())
                as Box<dyn FnOnce(&mut GrantBody)>,
        ),
        (
            "another method",
            Box::new(|g: &mut GrantBody| g.method = "POST".into()),
        ),
        (
            "another path",
            Box::new(|g: &mut GrantBody| g.path = "/v1/charges".into()),
        ),
    ] {
        // the gateway's signature kept over a changed scope
        let altered = tamper_payload::<GrantBody>(&g_bytes, change)?;
        let r = a.exchange(FrameType::Execute, &altered, b"").await?;
        assert_eq!(
            r.refusal(),
            Some(RefusalCode::GrantInvalid),
            "altered grant: {what}"
        );
        got.push(r.refusal());
    }
    // the same scope change signed by the caller itself
    let mut forged = g.clone();
    forged.path = "/v1/charges".into();
    forged.method = "POST".into();
    let r = a
        .exchange(FrameType::Execute, &forged.sign(&alice()), b"")
        .await?;
    got.push(r.refusal());
    s.aggregate(
        "grant altered for another upstream, method or path",
        &got,
        RefusalCode::GrantInvalid,
    )
    .await?;
    let r = a
        .exchange(FrameType::Execute, &g_bytes, b"{\"amount\":1}")
        .await?;
    s.individual(
        "grant with another body",
        r.refusal(),
        RefusalCode::BodyMismatch,
        g.call,
    )?;

    // --- a signature by another DID than the TLS peer: someone else's request replayed. The
    // log is never filled in the signer's name (issue 15: on b9992ca each replay was a full
    // `refused` entry naming alice): it is counted, whoever the peer is.
    let (alices, _) = h.signed_request(&alice(), |_| {})?;
    s.begin().await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(mallory.send_signed(&alices, b"").await?.refusal());
    }
    s.aggregate(
        "another DID's request replayed by a stranger",
        &got,
        RefusalCode::PeerMismatch,
    )
    .await?;
    let new = s.new_entries()?;
    assert!(
        new.iter()
            .all(|e| e.subject.as_deref() != Some(alice().did().as_str())),
        "an entry names alice: {new:?}"
    );
    // and mallory's own signature on alice's connection
    let (mallorys, call) = h.signed_request(&mallory_id, |_| {})?;
    let r = a.send_signed(&mallorys, b"").await?;
    assert_eq!(r.refusal(), Some(RefusalCode::PeerMismatch));
    let _ = call; // mallory is unknown to policy: counted, not an entry of its own
    s.aggregate(
        "another DID's signature on this connection",
        &[r.refusal()],
        RefusalCode::PeerMismatch,
    )
    .await?;

    // --- a valid signature over a modified payload
    let mut got = Vec::new();
    for change in [
        Box::new(|r: &mut Request| r.path = "/v1/charges".into()) as Box<dyn FnOnce(&mut Request)>,
        Box::new(|r: &mut Request| r.method = "POST".into()),
        Box::new(|r: &mut Request| r.body_len = 7),
        Box::new(|r: &mut Request| r.time_ms += 1),
    ] {
        let (signed, _) = h.signed_request(&alice(), |_| {})?;
        let altered = tamper_payload::<Request>(&signed, change)?;
        got.push(a.send_signed(&altered, b"").await?.refusal());
    }
    s.aggregate(
        "valid signature over a modified payload",
        &got,
        RefusalCode::BadSignature,
    )
    .await?;

    // --- addressed to another gateway
    let (signed, call) = h.signed_request(&alice(), |r| r.aud = mallory_id.did().to_string())?;
    let r = a.send_signed(&signed, b"").await?;
    s.individual(
        "addressed to another gateway",
        r.refusal(),
        RefusalCode::WrongAudience,
        call,
    )?;

    // --- timestamps outside the skew window (30 s), both ways
    for (name, shift) in [("too old", -31_000i64), ("too new", 31_000)] {
        let (signed, call) = h.signed_request(&alice(), |r| {
            r.time_ms = r.time_ms.saturating_add_signed(shift);
        })?;
        s.begin().await?;
        let r = a.send_signed(&signed, b"").await?;
        s.individual(name, r.refusal(), RefusalCode::ClockSkew, call)?;
    }

    // --- path tricks to escape the scope (alice may call /v1/** only)
    for path in [
        "/v1/../admin",
        "/v1/charges/..",
        "/v1/./balance",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E/admin",
        "/v1/.%2e/admin",
        "/v1%2fadmin",
        "/v1/a%2Fb",
        "/v1/a%5cb",
        "/v1/%252e%252e/admin",
        "/v1/%252fadmin",
        "/v1//admin",
        "//evil.example/v1/balance",
        "http://evil.example/v1/balance",
        "/http://evil.example/v1/balance",
        "v1/balance",
        "/v1\\..\\admin",
        "/v1/balance#frag",
        "/v1/balance?x=1",
        "/v1/\u{ff0e}\u{ff0e}/admin",
        "/v1/%00",
        // found here: encoded unreserved characters and `..;` passed the canonical checks
        "/%61dmin",
        "/v1/charges/..;/admin",
        "/v1/%",
    ] {
        let (signed, call) = h.signed_request(&alice(), |r| r.path = path.into())?;
        s.begin().await?;
        let r = a.send_signed(&signed, b"").await?;
        s.individual(
            &format!("path {path:?}"),
            r.refusal(),
            RefusalCode::NotCanonical,
            call,
        )?;
    }
    for upstream in ["evil.example", "payments@evil.example", "payments/../admin"] {
        let (signed, call) = h.signed_request(&alice(), |r| r.upstream = upstream.into())?;
        s.begin().await?;
        let r = a.send_signed(&signed, b"").await?;
        s.individual(
            &format!("upstream {upstream:?}"),
            r.refusal(),
            RefusalCode::UnknownUpstream,
            call,
        )?;
    }

    // --- header and request smuggling through CR/LF, hop-by-hop and credential headers
    type Adjust = Box<dyn FnOnce(&mut Request)>;
    let smuggling: Vec<(&str, Adjust)> = vec![
        (
            "CRLF in a header value",
            Box::new(|r: &mut Request| {
                r.headers = vec![(
                    "content-type".into(),
                    "text/plain\r\nauthorization: Bearer x".into(),
                )]
            }),
        ),
        (
            "LF in a header value",
            Box::new(|r: &mut Request| r.headers = vec![("accept".into(), "a\nx-evil: 1".into())]),
        ),
        (
            "CRLF in a header name",
            Box::new(|r: &mut Request| r.headers = vec![("accept\r\nx-evil".into(), "1".into())]),
        ),
        (
            "colon in a header name",
            Box::new(|r: &mut Request| {
                r.headers = vec![("accept: x\r\nhost".into(), "evil.example".into())]
            }),
        ),
        (
            "CRLF in a query value",
            Box::new(|r: &mut Request| {
                r.query = vec![("a".into(), "1\r\nhost: evil.example".into())]
            }),
        ),
        (
            "a query value with '&'",
            Box::new(|r: &mut Request| r.query = vec![("a".into(), "1&key=x".into())]),
        ),
        (
            "duplicate query names",
            Box::new(|r: &mut Request| {
                r.query = vec![("a".into(), "1".into()), ("a".into(), "2".into())]
            }),
        ),
        (
            "request line in the method",
            Box::new(|r: &mut Request| {
                r.method = "GET /admin HTTP/1.1\r\nHost: evil.example\r\n\r\nGET".into()
            }),
        ),
        (
            "host header",
            Box::new(|r: &mut Request| r.headers = vec![("host".into(), "evil.example".into())]),
        ),
        (
            "transfer-encoding",
            Box::new(|r: &mut Request| {
                r.headers = vec![("transfer-encoding".into(), "chunked".into())]
            }),
        ),
        (
            "content-length",
            Box::new(|r: &mut Request| r.headers = vec![("content-length".into(), "0".into())]),
        ),
        (
            "caller credential",
            Box::new(|r: &mut Request| {
                r.headers = vec![("authorization".into(), "Bearer attacker".into())]
            }),
        ),
        (
            "header outside the allowlist",
            Box::new(|r: &mut Request| {
                r.headers = vec![("x-forwarded-host".into(), "evil.example".into())]
            }),
        ),
        (
            "duplicate header",
            Box::new(|r: &mut Request| {
                r.headers = vec![("accept".into(), "a".into()), ("accept".into(), "b".into())]
            }),
        ),
    ];
    for (name, adjust) in smuggling {
        let (signed, call) = h.signed_request(&alice(), adjust)?;
        s.begin().await?;
        let r = a.send_signed(&signed, b"").await?;
        s.individual(name, r.refusal(), RefusalCode::NotCanonical, call)?;
    }

    // --- oversized frames and bodies
    let (raw_ep, conn) = h.raw_connection(&alice()).await?;
    let gw_did = h.gw_did.clone();
    s.begin().await?;
    let mut got = Vec::new();
    // a frame declaring more than the 64 KiB limit, an unknown frame type, a body frame first
    for bytes in [
        [vec![1u8, 0x00, 0x10, 0x00, 0x00], vec![0u8; 1024]].concat(),
        vec![1u8, 0xff, 0xff, 0xff, 0xff],
        vec![9u8, 0, 0, 0, 0],
        frames(FrameType::Body, b"abc"),
        frames(FrameType::Request, b"not a COSE_Sign1 envelope"),
    ] {
        got.push(raw_exchange(&conn, &gw_did, &bytes, true).await?.refusal());
    }
    s.aggregate(
        "oversized or malformed first frame",
        &got,
        RefusalCode::Malformed,
    )
    .await?;
    // a body above max_body (refused from the signed length, before any byte is read)
    let (signed, call) = h.signed_request(&alice(), |r| {
        r.method = "POST".into();
        r.path = "/v1/charges".into();
        r.body_len = max_body + 1;
    })?;
    let r = raw_exchange(&conn, &gw_did, &frames(FrameType::Request, &signed), true).await?;
    s.individual(
        "body above max_body",
        r.refusal(),
        RefusalCode::BodyMismatch,
        call,
    )?;
    // more body than signed, and an oversized body frame
    let body = b"{\"amount\":1}".to_vec();
    for (name, extra) in [
        (
            "more body than signed",
            frames(FrameType::Body, b"{\"amount\":1}00"),
        ),
        ("oversized body frame", vec![2u8, 0x7f, 0, 0, 0]),
    ] {
        let (signed, call) = h.signed_request(&alice(), |r| {
            r.method = "POST".into();
            r.path = "/v1/charges".into();
            r.body_len = body.len() as u64;
            r.body_b3 = *blake3::hash(&body).as_bytes();
        })?;
        s.begin().await?;
        let bytes = [frames(FrameType::Request, &signed), extra].concat();
        let r = raw_exchange(&conn, &gw_did, &bytes, true).await?;
        s.individual(name, r.refusal(), RefusalCode::BodyMismatch, call)?;
    }

    // --- slowloris: streams that send a few bytes and stall are refused and freed after the
    // frame timeout (1 s here), while other callers are served
    s.begin().await?;
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let (mut send, recv) = conn.open_bi().await?;
        send.write_all(&[1, 0, 0]).await?;
        stalled.push((send, recv));
    }
    let b = h.client("bob", bob()).await?;
    assert_eq!(
        b.call(CallSpec::new("payments", "GET", "/v1/balance"))
            .await?
            .status,
        200,
        "a stalled stream does not hold other callers up"
    );
    // (no new begin: the stalled streams may already be refused and counted)
    s.upstream_seen += 1;
    let mut got = Vec::new();
    for (_send, recv) in &mut stalled {
        got.push(read_end(recv, &gw_did).await?.refusal());
    }
    s.aggregate(
        "slowloris: a stalled first frame",
        &got,
        RefusalCode::Malformed,
    )
    .await?;
    // stalled in the body, after a complete request frame
    let (signed, call) = h.signed_request(&alice(), |r| {
        r.method = "POST".into();
        r.path = "/v1/charges".into();
        r.body_len = body.len() as u64;
        r.body_b3 = *blake3::hash(&body).as_bytes();
    })?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&[frames(FrameType::Request, &signed), vec![2, 0, 0]].concat())
        .await?;
    let r = read_end(&mut recv, &gw_did).await?;
    s.individual(
        "slowloris: a stalled body",
        r.refusal(),
        RefusalCode::BodyMismatch,
        call,
    )?;
    drop((send, recv, stalled));

    let cases = s.cases;
    println!("adversarial cases refused, audited and never forwarded: {cases}");
    conn.close(0u32.into(), b"bye");
    raw_ep.wait_idle().await;
    for c in [a, mallory, b] {
        c.close().await;
    }
    drop(s);
    h.stop().await;
    // only the setup calls reached the upstream: two executions of alice, one of bob
    let paths: Vec<String> = h.upstream.seen().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, ["/v1/balance"; 3], "{paths:?}");
    let report = verify::verify(&[load_records(&h.gw_dir())?], &[]);
    assert!(report.ok(), "{:?}", report.violations);
    let hits = didgate_tests::files_containing(h.dir.path(), didgate_tests::CANARY.as_bytes());
    assert!(hits.is_empty(), "canary in {hits:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_grant_is_refused_and_audited() -> anyhow::Result<()> {
    // every grant is expired when presented (no clock games)
    let mut h = Harness::start_with(|c| c.gateway.grant_ttl_secs = 0).await?;
    let a = h.client("alice", alice()).await?;
    let mut s = Suite::new(&h)?;
    let grant = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    s.begin().await?;
    let r = a.execute(&grant).await;
    s.individual(
        "expired grant",
        r.refusal(),
        RefusalCode::GrantExpired,
        grant.call,
    )?;
    drop(s);
    a.close().await;
    h.stop().await;
    assert!(h.upstream.seen().is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_did_is_refused_also_on_a_connection_opened_before() -> anyhow::Result<()> {
    // bodies up to 8 MiB, so a call can be held in its body phase (below)
    let mut h = Harness::start_with(|c| c.gateway.max_body = 8 << 20).await?;
    let gw_did = h.gw_did.clone();
    // a connection authenticated before the revocation, proven by a call on it
    let (ep, before) = h.raw_connection(&alice()).await?;
    let (signed, _) = h.signed_request(&alice(), |_| {})?;
    let r = raw_exchange(&before, &gw_did, &frames(FrameType::Request, &signed), true).await?;
    assert!(matches!(r, RawEnd::Receipt(_)), "{r:?}");
    // and a grant issued before the revocation, to be presented after it
    let a = h.client("alice", alice()).await?;
    let grant = a
        .grant(CallSpec::new("payments", "GET", "/v1/balance"))
        .await?;
    // a call in flight on it: admitted, its body half sent. QUIC flow control is the barrier:
    // writing 4 MiB (beyond the 1.25 MB stream window) returns only once the gateway has read
    // the request frame, admitted it, and consumed body bytes.
    let body = vec![0x42u8; 8 << 20];
    let (signed, in_flight) = h.signed_request(&alice(), |r| {
        r.method = "POST".into();
        r.path = "/v1/charges".into();
        r.body_len = body.len() as u64;
        r.body_b3 = *blake3::hash(&body).as_bytes();
    })?;
    let (mut send, mut recv) = before.open_bi().await?;
    send.write_all(
        &[
            frames(FrameType::Request, &signed),
            frames(FrameType::Body, &body[..4 << 20]),
        ]
        .concat(),
    )
    .await?;
    let mut s = Suite::new(&h)?;
    s.begin().await?;
    s.gw.revoke(
        &Revoke::Did(didgate_protocol::Principal::Key(alice().did().clone())),
        "key leaked",
    )
    .await?;
    // the revocation closes the connection under the call: it cannot be answered, and is
    // audited as revoked
    assert!(read_end(&mut recv, &gw_did).await.is_err());
    drop((send, recv));
    // (its audit entry is checked after the stop, which waits for calls in flight)
    s.cases += 1;
    let revocation = s.new_entries()?;
    assert!(
        revocation.iter().any(|e| e.kind == EntryKind::Revocation
            && e.subject.as_deref() == Some(alice().did().as_str()))
    );

    // the connection opened before is closed by the revocation: nothing more runs on it
    let (signed, _) = h.signed_request(&alice(), |_| {})?;
    let on_old = raw_exchange(&before, &gw_did, &frames(FrameType::Request, &signed), true).await;
    assert!(on_old.is_err(), "{on_old:?}");
    match before.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, didgate_gateway::gateway::REVOKED_CLOSE.into())
        }
        other => panic!("the old connection is not closed as revoked: {other:?}"),
    }
    // a new connection authenticates (TLS knows nothing of revocations) and every request on it
    // is refused, per request
    s.begin().await?;
    let (_ep2, after) = h.raw_connection(&alice()).await?;
    let (signed, call) = h.signed_request(&alice(), |_| {})?;
    let r = raw_exchange(&after, &gw_did, &frames(FrameType::Request, &signed), true).await?;
    s.individual(
        "revoked DID, new connection",
        r.refusal(),
        RefusalCode::Revoked,
        call,
    )?;
    // the grant issued before the revocation (the client library reconnects)
    s.begin().await?;
    let r = a.execute(&grant).await;
    s.individual(
        "grant of a revoked DID",
        r.refusal(),
        RefusalCode::Revoked,
        grant.call,
    )?;
    drop(s);
    ep.close(0u32.into(), b"bye");
    a.close().await;
    h.stop().await;
    assert_eq!(
        h.upstream.seen().len(),
        1,
        "only the call before the revocation"
    );
    let entries: Vec<Entry> = load_records(&h.gw_dir())?
        .entries
        .iter()
        .map(|(_, b)| Entry::decode(b))
        .collect::<Result<_, _>>()?;
    assert!(
        entries.iter().any(|e| e.kind == EntryKind::Refused
            && e.call == Some(in_flight)
            && e.code.as_deref() == Some("revoked")),
        "the call in flight is audited revoked"
    );
    assert!(
        entries
            .iter()
            .all(|e| !(e.kind == EntryKind::Executing && e.call == Some(in_flight))),
        "it consumed no grant"
    );

    Ok(())
}

fn scale(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_from_one_did_are_limited_and_others_unaffected()
-> anyhow::Result<()> {
    const LIMIT: u64 = 8;
    let attempts = scale("DIDGATE_ADV_CONNECTIONS", 2000);
    // the attempts stand for many addresses: per-address admission would refuse them first
    let mut h = Harness::start_with(|c| {
        without_address_limits(c);
        c.gateway.max_connections_per_did = LIMIT;
    })
    .await?;
    let gw_did = h.gw_did.clone();
    let mut s = Suite::new(&h)?;
    // alice holds her quota of connections open, each proven by a call
    let mut held = Vec::new();
    for _ in 0..LIMIT {
        let (ep, conn) = h.raw_connection(&alice()).await?;
        let (signed, _) = h.signed_request(&alice(), |_| {})?;
        let r = raw_exchange(&conn, &gw_did, &frames(FrameType::Request, &signed), true).await?;
        assert!(matches!(r, RawEnd::Receipt(_)), "{r:?}");
        held.push((ep, conn));
    }
    s.begin().await?;
    let started = std::time::Instant::now();
    let endpoint = held[0].0.clone();
    let cfg = didgate_client::tls::client_config(&alice(), &gw_did)?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (endpoint, cfg, next, h_addr, gw_did) = (
            endpoint.clone(),
            cfg.clone(),
            next.clone(),
            h.addr,
            gw_did.clone(),
        );
        let signed = h.signed_request(&alice(), |_| {})?.0;
        workers.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < attempts {
                let conn = endpoint
                    .connect_with(cfg.clone(), h_addr, didgate_client::tls::SERVER_NAME)?
                    .await?;
                let r = raw_exchange(&conn, &gw_did, &frames(FrameType::Request, &signed), true)
                    .await?;
                codes.push(r.refusal());
            }
            anyhow::Ok(codes)
        }));
    }
    // another DID is served while the flood goes on
    let b = h.client("bob", bob()).await?;
    for _ in 0..5 {
        assert_eq!(
            b.call(CallSpec::new("payments", "GET", "/v1/balance"))
                .await?
                .status,
            200
        );
    }
    let mut got = Vec::new();
    for w in workers {
        got.extend(w.await??);
    }
    let elapsed = started.elapsed();
    assert_eq!(got.len(), attempts);
    s.upstream_seen += 5; // bob's calls
    s.aggregate(
        "connections beyond the per-DID limit",
        &got,
        RefusalCode::RateLimited,
    )
    .await?;
    println!("{attempts} connection attempts from one DID refused in {elapsed:?}");
    // the held connections still work
    let (signed, _) = h.signed_request(&alice(), |_| {})?;
    let r = raw_exchange(
        &held[0].1,
        &gw_did,
        &frames(FrameType::Request, &signed),
        true,
    )
    .await?;
    assert!(matches!(r, RawEnd::Receipt(_)), "{r:?}");
    drop(s);
    for (ep, conn) in held {
        conn.close(0u32.into(), b"bye");
        ep.close(0u32.into(), b"bye");
    }
    b.close().await;
    h.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_fresh_did_keys_is_counted_in_one_entry() -> anyhow::Result<()> {
    let dids = scale("DIDGATE_ADV_FRESH_DIDS", 2000);
    // the flood stands for many addresses: per-address admission would refuse it first
    let mut h = Harness::start_with(without_address_limits).await?;
    let gw_did = h.gw_did.clone();
    let mut s = Suite::new(&h)?;
    s.begin().await?;
    let replay_keys = |gw: &Gateway| gw.chain().store().scan(REPLAY, b"").map(|v| v.len());
    let keys_before = replay_keys(&s.gw)?;
    let started = std::time::Instant::now();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (endpoint, next, addr, gw_did) =
            (endpoint.clone(), next.clone(), h.addr, gw_did.clone());
        let h_did = gw_did.clone();
        workers.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < dids {
                let who = Identity::generate();
                let cfg = didgate_client::tls::client_config(&who, &h_did)?;
                let conn = endpoint
                    .connect_with(cfg, addr, didgate_client::tls::SERVER_NAME)?
                    .await?;
                let req = fresh_request(&who, &gw_did);
                let r =
                    raw_exchange(&conn, &gw_did, &frames(FrameType::Request, &req), true).await?;
                conn.close(0u32.into(), b"bye");
                codes.push(r.refusal());
            }
            anyhow::Ok(codes)
        }));
    }
    let mut got = Vec::new();
    for w in workers {
        got.extend(w.await??);
    }
    let elapsed = started.elapsed();
    assert_eq!(got.len(), dids);
    s.aggregate("calls from fresh did:keys", &got, RefusalCode::Policy)
        .await?;
    let grown = s.new_entries()?.len();
    assert!(
        grown <= 2,
        "{dids} refusals grew the chain by {grown} entries"
    );
    assert_eq!(
        replay_keys(&s.gw)?,
        keys_before,
        "a refusal stores no replay key"
    );
    println!("{dids} calls from fresh did:keys: one aggregate entry, {elapsed:?}");
    drop(s);
    endpoint.close(0u32.into(), b"bye");
    h.stop().await;
    Ok(())
}

fn fresh_request(who: &Identity, gw: &didgate_protocol::Did) -> Vec<u8> {
    Request {
        v: didgate_protocol::Version::CURRENT.as_u64(),
        aud: gw.to_string(),
        upstream: "payments".into(),
        method: "GET".into(),
        path: "/v1/balance".into(),
        query: vec![],
        headers: vec![],
        body_len: 0,
        body_b3: *blake3::hash(b"").as_bytes(),
        nonce: rand::random(),
        time_ms: didgate_client::now_ms(),
        head: didgate_protocol::message::ChainHead {
            chain: [4; 32],
            seq: 0,
            hash: [4; 32],
        },
    }
    .sign(who)
}

/// Issue 15, item 1: a signed request of a known user (alice), replayed by strangers (fresh
/// did:keys) and by another known user (bob) on their own connections, is refused
/// `peer_mismatch` and counted; no entry names alice, and the chain does not grow by the
/// request's size. On b9992ca each replay was a `refused` entry holding the 24 KiB request
/// with alice as subject (25 replays: about 600 KiB of entries blamed on her).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_of_a_known_users_request_are_never_recorded_in_their_name() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let mut s = Suite::new(&h)?;
    // a large request: 24 KiB of query that does not compress
    let mut pad = [0u8; 12 * 1024];
    blake3::Hasher::new()
        .update(b"replay pad")
        .finalize_xof()
        .fill(&mut pad);
    let (alices, _) = h.signed_request(&alice(), |r| {
        r.query = vec![("pad".into(), hex::encode(pad))];
    })?;
    s.begin().await?;
    let mut got = Vec::new();
    for i in 0..4u8 {
        let stranger = h
            .client(
                &format!("stranger-{i}"),
                Identity::from_seed(&[0x50 + i; 32]),
            )
            .await?;
        for _ in 0..5 {
            got.push(stranger.send_signed(&alices, b"").await?.refusal());
        }
        stranger.close().await;
    }
    let b = h.client("bob", bob()).await?;
    for _ in 0..5 {
        got.push(b.send_signed(&alices, b"").await?.refusal());
    }
    s.aggregate(
        "a known user's request replayed by 4 strangers and by bob",
        &got,
        RefusalCode::PeerMismatch,
    )
    .await?;
    let new = s.new_entries()?;
    let alice_did = alice().did().to_string();
    let bob_did = bob().did().to_string();
    assert!(
        new.iter().all(|e| e.kind != EntryKind::Refused),
        "a refused entry: {new:?}"
    );
    assert!(
        new.iter()
            .all(|e| e.subject.as_deref() != Some(alice_did.as_str())
                && e.subject.as_deref() != Some(bob_did.as_str())),
        "an entry names alice or bob"
    );
    let bytes: usize = new.iter().map(|e| e.encode().len()).sum();
    assert!(
        bytes < 4096,
        "{} replays of a {}-byte request grew the chain by {bytes} bytes",
        got.len(),
        alices.len()
    );
    b.close().await;
    drop(s);
    h.stop().await;
    Ok(())
}

/// Issue 15, item 2: a known principal cannot fill the disk with refused requests. 400 frames
/// of one stale request padded to the query's limit are one `refused` entry (a call ID is
/// recorded once) and 399 counted; 100 distinct padded stale requests are at most
/// `refusal_entries_per_min` (60) entries and the rest counted. On b9992ca each frame was an
/// entry holding the request (about 21 MB for 400 frames of a 52 KiB request); the query and
/// headers were not capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_principal_cannot_fill_the_log_with_refused_requests() -> anyhow::Result<()> {
    let mut h = Harness::start().await?;
    let mut s = Suite::new(&h)?;
    let a = h.client("alice", alice()).await?;
    let stale = |i: u64| {
        let mut pad = [0u8; 4000];
        blake3::Hasher::new()
            .update(&i.to_be_bytes())
            .finalize_xof()
            .fill(&mut pad);
        move |r: &mut Request| {
            r.time_ms -= 600_000;
            r.nonce = [i as u8; 16];
            r.query = vec![("pad".into(), hex::encode(pad))];
        }
    };
    // a query over the limit is refused before anything else about it is recorded
    let (over, _) = h.signed_request(&alice(), |r| {
        r.query = vec![("pad".into(), "a".repeat(8192))];
    })?;
    assert_eq!(
        a.send_signed(&over, b"").await?.refusal(),
        Some(RefusalCode::NotCanonical)
    );
    s.begin().await?;
    let (one, _) = h.signed_request(&alice(), stale(0))?;
    let mut got = Vec::new();
    for _ in 0..400 {
        got.push(a.send_signed(&one, b"").await?.refusal());
    }
    assert!(got.iter().all(|g| *g == Some(RefusalCode::ClockSkew)));
    s.gw.flush_refusals().await?;
    let new = s.new_entries()?;
    let refused = new.iter().filter(|e| e.kind == EntryKind::Refused).count();
    let counted: u64 = new
        .iter()
        .filter(|e| e.kind == EntryKind::Refusals)
        .filter_map(|e| e.count)
        .sum();
    let bytes: usize = new.iter().map(|e| e.encode().len()).sum();
    assert_eq!((refused, counted), (1, 399), "{new:?}");
    assert!(
        bytes < 16 * 1024,
        "400 frames grew the chain by {bytes} bytes"
    );
    println!(
        "400 frames of one {}-byte stale request: {bytes} bytes of entries",
        one.len()
    );

    s.begin().await?;
    for i in 1..=100 {
        let (req, _) = h.signed_request(&alice(), stale(i))?;
        assert_eq!(
            a.send_signed(&req, b"").await?.refusal(),
            Some(RefusalCode::ClockSkew)
        );
    }
    s.gw.flush_refusals().await?;
    let new = s.new_entries()?;
    let refused = new.iter().filter(|e| e.kind == EntryKind::Refused).count();
    let counted: u64 = new
        .iter()
        .filter(|e| e.kind == EntryKind::Refusals)
        .filter_map(|e| e.count)
        .sum();
    let bytes: usize = new.iter().map(|e| e.encode().len()).sum();
    assert_eq!(refused as u64 + counted, 100);
    // the minute's budget of 60, less the two entries this DID already had (the query over the
    // limit and the first stale request), plus one per second of refill while the test runs
    assert!((55..=60).contains(&refused), "{refused} refused entries");
    // each refused entry holds a request of at most ~17 KiB (8 KiB of query, 8 KiB of headers)
    assert!(bytes < 61 * 17 * 1024, "{bytes} bytes");
    println!("100 distinct stale requests: {refused} entries, {counted} counted, {bytes} bytes");
    a.close().await;
    drop(s);
    h.stop().await;
    Ok(())
}
