//! Issue 22 (amendment 2.7): gateway nodes. One gateway DID, several node keys each owning its
//! own gateway chain; receipts, refusals, grants and checkpoints signed by a node carry its
//! certificate, which the verifier judges (`bad_node_certificate`).

use didgate_protocol::message::{GrantBody, Message, Refusal, RefusalCode};
use didgate_protocol::node::{NodeCertificate, NodeRevocations, Revoked};

use super::*;
use crate::nodes::Revocations;

/// The node certificates' window: from 1 s to 1 h + 1 s.
const NOT_BEFORE: u64 = 1_000;
const NOT_AFTER: u64 = 3_601_000;

/// A certificate by `by` naming `gateway`, for `node`, with `serial` and a window.
fn certificate(
    by: &Identity,
    gateway: &Identity,
    node: &Identity,
    serial: u64,
    window: (u64, u64),
) -> Vec<u8> {
    NodeCertificate {
        v: 2,
        gateway: gateway.did().to_string(),
        node: node.did().to_string(),
        serial,
        not_before_ms: window.0,
        not_after_ms: window.1,
        addr: None,
    }
    .sign(by)
}

/// One gateway DID and two nodes it certified (serials 1 and 2).
struct Cluster {
    gateway: Identity,
    nodes: [Identity; 2],
    certs: [Vec<u8>; 2],
    client: Identity,
}

impl Cluster {
    fn new() -> Self {
        let gateway = Identity::from_seed(&[0x70; 32]);
        let nodes = [
            Identity::from_seed(&[0x71; 32]),
            Identity::from_seed(&[0x72; 32]),
        ];
        let certs = [1, 2].map(|serial| {
            let node = &nodes[serial as usize - 1];
            certificate(&gateway, &gateway, node, serial, (NOT_BEFORE, NOT_AFTER))
        });
        Self {
            gateway,
            nodes,
            certs,
            client: Identity::from_seed(&[0x73; 32]),
        }
    }

    /// The revocation list of the gateway revoking `serial` from `from_ms`.
    fn revoking(&self, serial: u64, from_ms: u64) -> Revocations {
        let list = NodeRevocations {
            v: 2,
            gateway: self.gateway.did().to_string(),
            seq: 1,
            time_ms: from_ms,
            revoked: vec![Revoked {
                serial,
                time_ms: from_ms,
            }],
        };
        let mut revocations = Revocations::new();
        revocations
            .add(&list.sign(&self.gateway))
            .expect("the gateway's list");
        revocations
    }
}

/// How a call is answered.
enum Answer {
    /// Executed by the node, which signs a receipt at this time.
    Receipt(u64),
    /// Refused by the node at this time.
    Refusal(u64),
    /// A grant the node signs, expiring at this time (not executed yet).
    Grant(u64),
}

/// One call: the node that answers it, how, and the node certificate its answer carries
/// (`None`: the node's own).
struct Call {
    node: usize,
    answer: Answer,
    cert: Option<Vec<u8>>,
    /// The `home_rev` of its executing entry and the time its request is stamped (amendment
    /// 2.12), if any.
    home: Option<(u64, u64)>,
}

impl Call {
    fn receipt(node: usize, time_ms: u64) -> Self {
        Self {
            node,
            answer: Answer::Receipt(time_ms),
            cert: None,
            home: None,
        }
    }

    /// Executed as the caller's home as of revision `rev`, its request stamped `time_ms`.
    fn at_home(mut self, rev: u64, time_ms: u64) -> Self {
        self.home = Some((rev, time_ms));
        self
    }

    fn carrying(mut self, cert: Vec<u8>) -> Self {
        self.cert = Some(cert);
        self
    }
}

/// The chains of a cluster after `calls`: each node's gateway chain (its own key owns it; its
/// checkpoints carry its certificate), and the client's chain, every chain sealed by a final
/// checkpoint. Returns them and, per call, the client chain's seq of its answer.
struct Run {
    gateways: Vec<ChainRecords>,
    clients: Vec<ChainRecords>,
    answers: Vec<u64>,
}

fn run(cluster: &Cluster, calls: &[Call]) -> Run {
    let mut gws = cluster.nodes.each_ref().map(|n| {
        let mut b = Builder::new_at(n, Role::Gateway, NOT_BEFORE);
        b.checkpoint_ms = NOT_BEFORE + 1;
        b
    });
    for (b, cert) in gws.iter_mut().zip(&cluster.certs) {
        b.node_cert = Some(cert.clone());
    }
    let mut client = Builder::new(&cluster.client, Role::Client);
    let mut answers = Vec::new();
    for (i, call) in calls.iter().enumerate() {
        let (g, node) = (&mut gws[call.node], &cluster.nodes[call.node]);
        let cert = call
            .cert
            .clone()
            .unwrap_or_else(|| cluster.certs[call.node].clone());
        let stamped = call.home.map_or(1_500, |(_, t)| t);
        let (id, bytes) = request(cluster, &mut client, i as u8, stamped);
        let seq = match call.answer {
            Answer::Receipt(time_ms) => {
                let signed = execute(cluster, g, node, (id, bytes), time_ms, cert, call.home);
                result(&mut client, &cluster.client, id, Outcome::Receipt, signed)
            }
            Answer::Refusal(time_ms) => {
                let refusal = Refusal {
                    v: VERSION,
                    call: Some(id),
                    code: RefusalCode::Policy,
                    reason: "policy".into(),
                    time_ms,
                    entry: None,
                    node_cert: Some(cert),
                    home: None,
                };
                let signed = refusal.sign(node);
                result(&mut client, &cluster.client, id, Outcome::Refusal, signed)
            }
            Answer::Grant(expires_ms) => {
                let grant = GrantBody {
                    v: VERSION,
                    id: [i as u8; 16],
                    call: id,
                    subject: cluster.client.did().to_string(),
                    upstream: "payments".into(),
                    method: "GET".into(),
                    path: "/v1/balance".into(),
                    expires_ms,
                    node_cert: Some(cert),
                };
                let signed = grant.sign(node);
                result(&mut client, &cluster.client, id, Outcome::Grant, signed)
            }
        };
        answers.push(seq);
    }
    for (g, node) in gws.iter_mut().zip(&cluster.nodes) {
        g.checkpoint(node);
    }
    client.checkpoint(&cluster.client);
    let [g0, g1] = gws;
    Run {
        gateways: vec![g0.records("node-0"), g1.records("node-1")],
        clients: vec![client.records("client")],
        answers,
    }
}

/// The client signs and records a request to the gateway DID; returns its call ID and bytes.
fn request(cluster: &Cluster, client: &mut Builder, n: u8, time_ms: u64) -> (Digest, Vec<u8>) {
    let req = Request {
        v: VERSION,
        aud: cluster.gateway.did().to_string(),
        upstream: "payments".into(),
        method: "GET".into(),
        path: "/v1/balance".into(),
        query: Vec::new(),
        headers: Vec::new(),
        body_len: 0,
        body_b3: *blake3::hash(b"").as_bytes(),
        nonce: [n; 16],
        time_ms,
        head: client.chain_head(),
    };
    let bytes = req.sign(&cluster.client);
    let id = envelope::verify(&bytes, Kind::Request)
        .expect("own request")
        .digest();
    let mut e = Entry::new(EntryKind::Request, 1_500);
    e.call = Some(id);
    e.signed = Some(bytes.clone());
    client.push(e, &cluster.client);
    (id, bytes)
}

/// The node executes the call in its chain and signs the receipt at `time_ms`, carrying
/// `cert`.
fn execute(
    cluster: &Cluster,
    g: &mut Builder,
    node: &Identity,
    (id, bytes): (Digest, Vec<u8>),
    time_ms: u64,
    cert: Vec<u8>,
    home: Option<(u64, u64)>,
) -> Vec<u8> {
    let head = Request::decode(
        envelope::verify(&bytes, Kind::Request)
            .expect("own request")
            .payload(),
    )
    .expect("request")
    .head;
    let mut x = Entry::new(EntryKind::Executing, 1_600);
    x.call = Some(id);
    x.signed = Some(bytes);
    x.subject = Some(cluster.client.did().to_string());
    x.grant = Some([1; 16]);
    x.peer_head = Some(head);
    if let Some((rev, at)) = home {
        x.home_rev = Some(rev);
        x.time_ms = at;
    }
    g.push(x, node);
    let mut d = Entry::new(EntryKind::Executed, 1_700);
    d.call = Some(id);
    d.status = Some(200);
    d.resp_len = Some(2);
    d.resp_b3 = Some(*blake3::hash(b"{}").as_bytes());
    let at = g.push(d, node);
    Receipt {
        v: VERSION,
        call: id,
        grant: [1; 16],
        client: cluster.client.did().to_string(),
        status: 200,
        resp_len: 2,
        resp_b3: *blake3::hash(b"{}").as_bytes(),
        entry: at,
        root: Some(g.frontier.root()),
        time_ms,
        node_cert: Some(cert),
    }
    .sign(node)
}

/// The client records the signed answer; returns the result entry's seq.
fn result(
    client: &mut Builder,
    owner: &Identity,
    id: Digest,
    outcome: Outcome,
    signed: Vec<u8>,
) -> u64 {
    let mut e = Entry::new(EntryKind::Result, 1_800);
    e.call = Some(id);
    e.outcome = Some(outcome);
    if outcome == Outcome::Receipt {
        let receipt = Receipt::decode(
            envelope::verify(&signed, Kind::Receipt)
                .expect("receipt")
                .payload(),
        )
        .expect("receipt");
        e.peer_entry = Some(receipt.entry);
    }
    e.signed = Some(signed);
    client.push(e, owner).seq
}

fn options(revocations: Revocations) -> Options {
    Options {
        strict: true,
        revocations,
    }
}

/// The (chain, seq, kind) of each violation.
fn found(report: &Report) -> Vec<(String, Option<u64>, ViolationKind)> {
    report
        .violations
        .iter()
        .map(|v| (v.chain.clone(), v.seq, v.kind))
        .collect()
}

/// `calls` verified strictly: exactly one `bad_node_certificate`, in the client chain at the
/// answer of the call `bad`.
fn assert_one_bad_certificate(cluster: &Cluster, calls: &[Call], bad: usize, given: Revocations) {
    let r = run(cluster, calls);
    let report = verify_opts(&r.gateways, &r.clients, options(given));
    assert_eq!(
        found(&report),
        vec![(
            "client".to_string(),
            Some(r.answers[bad]),
            ViolationKind::BadNodeCertificate
        )],
        "{:#?}",
        report.violations
    );
}

#[test]
fn receipts_of_two_nodes_of_one_gateway_verify_clean_in_one_run() {
    let cluster = Cluster::new();
    let calls: Vec<Call> = (0..6)
        .map(|i| Call::receipt(i % 2, 2_000 + i as u64))
        .collect();
    let r = run(&cluster, &calls);
    let report = verify_opts(&r.gateways, &r.clients, options(Revocations::new()));
    assert!(
        report.ok() && report.warnings.is_empty(),
        "{:#?}",
        report.violations
    );
    // each call: its receipt against a node's chain, the node's executing entry against the
    // client's chain
    assert_eq!(report.cross_links, 12);
    let owners: Vec<_> = report.chains.iter().map(|c| c.owner.clone()).collect();
    assert_eq!(owners[0].as_deref(), Some(cluster.nodes[0].did().as_str()));
    assert_eq!(owners[1].as_deref(), Some(cluster.nodes[1].did().as_str()));
}

#[test]
fn an_altered_node_certificate_in_a_receipt_the_node_signed_again_is_reported() {
    let cluster = Cluster::new();
    // the certificate's payload swapped for one with another serial, the gateway's signature
    // kept: the node signs its receipt over the altered bytes
    let mut sign1 = envelope::parse_for_tests(&cluster.certs[0]).expect("cose");
    let other = NodeCertificate {
        v: 2,
        gateway: cluster.gateway.did().to_string(),
        node: cluster.nodes[0].did().to_string(),
        serial: 99,
        not_before_ms: NOT_BEFORE,
        not_after_ms: NOT_AFTER,
        addr: None,
    };
    sign1.payload = Some(other.encode());
    let altered = envelope::reencode_for_tests(sign1);
    let calls = [
        Call::receipt(0, 2_000),
        Call::receipt(0, 2_001).carrying(altered),
    ];
    assert_one_bad_certificate(&cluster, &calls, 1, Revocations::new());
}

#[test]
fn a_node_certificate_signed_by_a_foreign_key_is_reported() {
    let cluster = Cluster::new();
    let foreign = Identity::from_seed(&[0x7f; 32]);
    let window = (NOT_BEFORE, NOT_AFTER);
    // by a stranger in the gateway's name, and by another gateway in its own name
    let forged = certificate(&foreign, &cluster.gateway, &cluster.nodes[0], 1, window);
    let elsewhere = certificate(&foreign, &foreign, &cluster.nodes[0], 1, window);
    for cert in [forged, elsewhere] {
        let calls = [
            Call::receipt(1, 2_000),
            Call::receipt(0, 2_001).carrying(cert),
        ];
        assert_one_bad_certificate(&cluster, &calls, 1, Revocations::new());
    }
}

#[test]
fn a_node_certificate_for_another_key_is_reported() {
    let cluster = Cluster::new();
    let theirs = cluster.certs[1].clone();
    let calls = [Call::receipt(0, 2_000).carrying(theirs)];
    assert_one_bad_certificate(&cluster, &calls, 0, Revocations::new());
}

#[test]
fn a_receipt_signed_after_its_nodes_revocation_is_reported_one_before_is_not() {
    let cluster = Cluster::new();
    let calls = [
        Call::receipt(0, 4_999),
        Call::receipt(1, 6_000),
        Call::receipt(0, 5_000),
    ];
    // serial 1 (node 0) revoked from 5 s: the receipt at 4.999 s stands, the one at 5 s not
    assert_one_bad_certificate(&cluster, &calls, 2, cluster.revoking(1, 5_000));
    // without the list, nothing is known to be revoked
    let r = run(&cluster, &calls);
    let report = verify_opts(&r.gateways, &r.clients, options(Revocations::new()));
    assert!(report.ok(), "{:#?}", report.violations);
    // another gateway's list does not apply
    let foreign = Identity::from_seed(&[0x7e; 32]);
    let list = NodeRevocations {
        v: 2,
        gateway: foreign.did().to_string(),
        seq: 1,
        time_ms: 0,
        revoked: vec![Revoked {
            serial: 1,
            time_ms: 0,
        }],
    };
    let mut other = Revocations::new();
    other.add(&list.sign(&foreign)).expect("list");
    let report = verify_opts(&r.gateways, &r.clients, options(other));
    assert!(report.ok(), "{:#?}", report.violations);
}

#[test]
fn a_receipt_outside_its_node_certificates_window_is_reported() {
    let cluster = Cluster::new();
    let short = certificate(
        &cluster.gateway,
        &cluster.gateway,
        &cluster.nodes[0],
        1,
        (NOT_BEFORE, 3_000),
    );
    let calls = [
        Call::receipt(0, 2_999).carrying(short.clone()),
        Call::receipt(0, 3_000).carrying(short),
    ];
    assert_one_bad_certificate(&cluster, &calls, 1, Revocations::new());
    let early = [Call::receipt(0, NOT_BEFORE - 1)];
    assert_one_bad_certificate(&cluster, &early, 0, Revocations::new());
}

#[test]
fn a_receipt_of_an_uncertified_node_stays_a_bad_signature() {
    let cluster = Cluster::new();
    let r = run(&cluster, &[Call::receipt(0, 2_000)]);
    // the same receipt without its certificate, signed by the node again
    let mut clients = r.clients.clone();
    let (key, bytes) = clients[0].entries[r.answers[0] as usize].clone();
    let mut e = Entry::decode(&bytes).expect("entry");
    let signed = e.signed.take().expect("receipt");
    let mut receipt = Receipt::decode(
        envelope::verify(&signed, Kind::Receipt)
            .expect("ok")
            .payload(),
    )
    .expect("receipt");
    receipt.node_cert = None;
    e.signed = Some(receipt.sign(&cluster.nodes[0]));
    // rebuild the client chain from that entry on (its hash changed)
    let mut b = Builder::new(&cluster.client, Role::Client);
    for (k, old) in &clients[0].entries[1..] {
        let entry = if *k == key {
            e.clone()
        } else {
            Entry::decode(old).expect("entry")
        };
        b.push(entry, &cluster.client);
    }
    b.checkpoint(&cluster.client);
    clients[0] = b.records("client");
    let report = verify_opts(&r.gateways, &clients, options(Revocations::new()));
    assert_eq!(
        found(&report),
        vec![(
            "client".to_string(),
            Some(r.answers[0]),
            ViolationKind::BadSignature
        )],
        "{:#?}",
        report.violations
    );
}

#[test]
fn refusals_and_grants_of_a_node_are_judged_by_their_certificate() {
    let cluster = Cluster::new();
    let answer = |node, answer, cert: Option<Vec<u8>>| Call {
        node,
        answer,
        cert,
        home: None,
    };
    let good = [
        answer(0, Answer::Refusal(2_000), None),
        answer(1, Answer::Grant(NOT_AFTER - 1), None),
        Call::receipt(1, 2_002),
    ];
    let r = run(&cluster, &good);
    let report = verify_opts(&r.gateways, &r.clients, options(Revocations::new()));
    assert!(report.ok(), "{:#?}", report.violations);
    let foreign = Identity::from_seed(&[0x7d; 32]);
    let forged = certificate(
        &foreign,
        &cluster.gateway,
        &cluster.nodes[0],
        1,
        (NOT_BEFORE, NOT_AFTER),
    );
    let refused = [answer(0, Answer::Refusal(2_000), Some(forged))];
    assert_one_bad_certificate(&cluster, &refused, 0, Revocations::new());
    let revoked = [answer(0, Answer::Refusal(6_000), None)];
    assert_one_bad_certificate(&cluster, &revoked, 0, cluster.revoking(1, 5_000));
    // a grant must not outlive its node's certificate
    let outliving = [answer(1, Answer::Grant(NOT_AFTER), None)];
    assert_one_bad_certificate(&cluster, &outliving, 0, Revocations::new());
}

#[test]
fn a_checkpoint_carrying_a_bad_node_certificate_is_reported() {
    let cluster = Cluster::new();
    let foreign = Identity::from_seed(&[0x7c; 32]);
    let forged = certificate(
        &foreign,
        &cluster.gateway,
        &cluster.nodes[0],
        1,
        (NOT_BEFORE, NOT_AFTER),
    );
    let calls = [Call::receipt(0, 2_000), Call::receipt(1, 2_001)];
    let r = run(&cluster, &calls);
    let mut gateways = r.gateways.clone();
    let mut sign_last = |gi: usize, cert: Option<Vec<u8>>, time_ms: u64| {
        let node = &cluster.nodes[gi];
        let last = gateways[gi].checkpoints.pop().expect("a checkpoint");
        let mut cp = Checkpoint::decode(
            envelope::verify(&last, Kind::Checkpoint)
                .expect("checkpoint")
                .payload(),
        )
        .expect("checkpoint");
        cp.node_cert = cert;
        cp.time_ms = time_ms;
        gateways[gi].checkpoints.push(cp.sign(node));
    };
    // node 0's by a stranger, node 1's certificate past its window
    sign_last(0, Some(forged), 2_000);
    sign_last(1, Some(cluster.certs[1].clone()), NOT_AFTER);
    let report = verify_opts(&gateways, &r.clients, options(Revocations::new()));
    assert_eq!(
        found(&report),
        vec![
            (
                "node-0".to_string(),
                None,
                ViolationKind::BadNodeCertificate
            ),
            (
                "node-1".to_string(),
                None,
                ViolationKind::BadNodeCertificate
            ),
        ],
        "{:#?}",
        report.violations
    );
    // a revoked serial, with the list given (node 0's from 1.5 s: its last checkpoint, at
    // 2 s, and its receipt, at 2 s); a certificate that does not open
    let mut gateways = r.gateways.clone();
    let mut sign_last = |gi: usize, cert: Option<Vec<u8>>, time_ms: u64| {
        let node = &cluster.nodes[gi];
        let last = gateways[gi].checkpoints.pop().expect("a checkpoint");
        let mut cp = Checkpoint::decode(
            envelope::verify(&last, Kind::Checkpoint)
                .expect("checkpoint")
                .payload(),
        )
        .expect("checkpoint");
        cp.node_cert = cert;
        cp.time_ms = time_ms;
        gateways[gi].checkpoints.push(cp.sign(node));
    };
    sign_last(0, Some(cluster.certs[0].clone()), 2_000);
    sign_last(1, Some(b"not a certificate".to_vec()), 2_000);
    let report = verify_opts(&gateways, &r.clients, options(cluster.revoking(1, 1_500)));
    let kinds: Vec<_> = found(&report).into_iter().map(|(c, _, k)| (c, k)).collect();
    assert_eq!(
        kinds,
        vec![
            ("node-0".to_string(), ViolationKind::BadNodeCertificate),
            ("node-1".to_string(), ViolationKind::BadNodeCertificate),
            ("client".to_string(), ViolationKind::BadNodeCertificate),
        ],
        "{:#?}",
        report.violations
    );
}

#[test]
fn the_json_report_names_the_kind_in_snake_case() {
    assert_eq!(
        ViolationKind::BadNodeCertificate.name(),
        "bad_node_certificate"
    );
}

/// Amendment 2.12: a node that claims a caller's request on an older view of the members than
/// another node that already claimed one as its home is reported; a node that became the home
/// again under a newer view is not.
#[test]
fn two_nodes_claiming_one_caller_under_overlapping_ownership_are_reported() {
    let cluster = Cluster::new();
    // node 0 home as of revision 10; node 1 as of 20 (node 0 stopped before); node 0 again as
    // of 30
    let clean = [
        Call::receipt(0, 2_000).at_home(10, 1_600),
        Call::receipt(1, 2_100).at_home(20, 1_700),
        Call::receipt(0, 2_200).at_home(30, 1_800),
    ];
    let r = run(&cluster, &clean);
    let report = verify_opts(&r.gateways, &r.clients, options(Revocations::new()));
    assert!(report.ok(), "{:#?}", report.violations);
    // node 0 goes on claiming on its view of revision 10 after node 1 became the home
    let overlap = [
        Call::receipt(0, 2_000).at_home(10, 1_600),
        Call::receipt(1, 2_100).at_home(20, 1_700),
        Call::receipt(0, 2_200).at_home(10, 1_800),
    ];
    let r = run(&cluster, &overlap);
    let report = verify_opts(&r.gateways, &r.clients, options(Revocations::new()));
    let kinds = found(&report);
    // node 0's chain: genesis, executing and executed of the first call, then the third
    // call's executing entry (seq 3)
    assert_eq!(
        kinds,
        vec![(
            "node-0".to_string(),
            Some(3),
            ViolationKind::OverlappingOwnership
        )],
        "{:#?}",
        report.violations
    );
}
