//! One named test per bug found from outside: the outside review of main b9992ca (issues 13,
//! 15 and 18), the independent client written from specs/ alone (issue 15) and the outside
//! auditor's verifier (issue 16). Each was shown on b9992ca and is fixed on main.
//!
//! Most have their regression test beside the feature they test; this table names it. The
//! tests in this file are the ones that had none.
//!
//! | issue, item | bug, as found on b9992ca | test |
//! | --- | --- | --- |
//! | 13.1 | a query-string key relayed in a redirect's `Location` | `tests/tests/canary.rs::an_upstream_that_echoes_the_key_never_gets_it_to_the_caller` |
//! | 13.2 | the key relayed when an upstream echoes it (header, JSON error, split body, gzip, SSE, base64) | `tests/tests/canary.rs::an_upstream_that_echoes_the_key_never_gets_it_to_the_caller` |
//! | 13.3 | core dumps of key-holding processes | `tests/tests/hardening.rs::key_holding_processes_dump_no_core_and_are_not_dumpable` |
//! | 13.4 | a fully relayed call recorded "abandoned by a gateway stop" when the store failed before `executed` | `tests/tests/diskfull.rs::a_closing_entry_that_cannot_be_written_withholds_the_end_and_the_record_says_so` (needs root for its tmpfs) |
//! | 13.5 | secret add, rotate, disable, delete... left no entry in the chain | `tests/tests/secrets.rs::lifecycle_through_the_control_socket_never_prints_a_value`, `tests/tests/upgrade.rs::a_previous_release_store_and_chains_upgrade_in_place` (the snapshot) |
//! | 13.6 | a full disk sent `FjallError: Io(Os { code: 28 ...})` to the caller | `tests/tests/diskfull.rs::full_disk_fails_closed_and_the_store_reopens_in_process` (needs root for its tmpfs) |
//! | 13.7 | world-readable store journal, gateway.toml and policy; long secret display forms | `tests/tests/hardening.rs::data_directories_are_private_and_tightened_or_refused`, `tests/tests/operator_cli.rs::secret_output_shows_no_more_than_the_display_form` |
//! | 13.8 | `keygen --seed-hex` put the seed on argv | `tests/tests/cli.rs::keygen_whoami_call_and_refusal` (`--seed-hex` exits 2) |
//! | 15.1 | a stranger's replays of a known user's request written as entries naming that user | `tests/tests/adversarial.rs::replays_of_a_known_users_request_are_never_recorded_in_their_name`, `tests/tests/adversarial.rs::a_stranger_replaying_another_dids_request_is_refused_peer_mismatch` |
//! | 15.2 | a known principal filling the disk with one padded stale request | `tests/tests/adversarial.rs::a_known_principal_cannot_fill_the_log_with_refused_requests` |
//! | 15.3 | the aggregate entry said "principals policy does not know" whatever it counted | `tests/tests/regression.rs::the_aggregate_refusals_entry_names_everything_it_counts` |
//! | 15.4 | catalog requests neither limited nor audited | `tests/tests/limits.rs::catalog_requests_are_rate_limited_and_their_refusals_counted` |
//! | 15.5 | a key the document does not list squatting a did:web's connection slots | `tests/tests/didweb.rs::a_key_the_document_does_not_list_cannot_squat_the_did_webs_connection_slots` |
//! | 15.6 | documents fetched on any path of a named host | `tests/tests/didweb.rs::unknown_domains_and_untrusted_certificates_cost_no_call` |
//! | 15.6 | documents fetched on any port of a named host (TLS spoken to a plain-HTTP port) | `tests/tests/regression.rs::a_did_web_on_another_port_of_a_named_host_is_never_fetched` |
//! | 15.6 | 100 concurrent streams of one fresh did:web made 41 fetches | `tests/tests/didweb.rs::concurrent_first_calls_of_a_did_web_fetch_its_document_once` |
//! | 15.6 | no per-host fetch rate | `tests/tests/didweb.rs::document_fetches_of_one_host_are_rate_limited_over_all_its_dids` |
//! | 15.6 | an unknown caller told the document server's HTTP status | `tests/tests/didweb.rs::unresolvable_documents_are_refused_typed` |
//! | 15.6 | a new HTTP client per fetch | none: a construction change (one client in the resolver), not visible on the wire |
//! | 15.7 | handshake floods: no Retry, no per-address limits | `tests/tests/limits.rs::new_connections_over_the_per_address_limits_are_refused_and_counted` |
//! | 16.1 | a duplicated item in an export switched the checkpoint checks off | `tests/tests/tamper.rs::duplicated_item_first`, `duplicated_item_middle`, `duplicated_item_last`, `duplicated_key_with_an_edited_copy_before_the_original`, `duplicated_key_with_an_edited_copy_after_the_original`, `keys_out_of_order` |
//! | 16.1 | the export reader took duplicated or unordered keys and a second head item | `tests/tests/tamper.rs::export_reader_refuses_duplicated_and_unordered_items_and_a_second_head` |
//! | 16.2 | the verifier decoded indefinite lengths and bytes given as arrays | `tests/tests/tamper.rs::an_indefinite_length_entry_does_not_decode`, `tests/tests/tamper.rs::a_byte_string_field_given_as_an_array_does_not_decode` |
//! | 16.3 | a receipt naming another client passed `verify` | `tests/tests/tamper.rs::a_receipt_naming_another_client_is_a_mismatch` |
//! | 16.4 | `check-evidence --json` printed plain text on an unreadable bundle | `tests/tests/audit_json.rs::check_evidence_json_errors` |
//! | 16 | an unsealed tail could be truncated or edited with no key | `tests/tests/tamper.rs::stripped_checkpoints_leave_an_unsealed_tail`, `tests/tests/seal.rs::daemon_export_is_sealed_while_calls_go_on` |
//!
//! The last part of the outside review (issue 18), fixed with their tests:
//!
//! | issue, item | bug, as found on b9992ca | test |
//! | --- | --- | --- |
//! | 18.1 | forbid rules bypassed by `/v1/secret/`, `/v1/secret;`, `;jsessionid=x`, `..%3B`, `/v1/Secret`, `_method=DELETE` | `tests/tests/strict.rs::forbid_rules_hold_against_path_forms_routed_to_the_same_handler`, `tests/tests/strict.rs::method_override_headers_need_the_upstreams_opt_in` |
//! | 18.2 | a byte string sent as an array of integers accepted and executed | `tests/tests/strict.rs::a_byte_string_sent_as_an_array_of_integers_is_refused_malformed` |
//! | 18.2 | a 50 kB header value forwarded | `tests/tests/strict.rs::a_header_value_over_its_limit_is_refused_not_canonical` |
//! | 18.3 | egress allowed 64:ff9b:1::/48 and ::ffff:0:0:0/96 | `gateway/src/egress.rs::embedded_and_translated_ranges` (unit test) |
//! | 18.4 | the metrics endpoint answered any `Host` (DNS rebinding) | `tests/tests/strict.rs::the_metrics_endpoint_refuses_a_rebound_host_name` |
//!
//! Issue 18, item 5 (replay keys pruned at run time) gets its test with its fix.
//!
//! An outside developer's first hour (issue 17) found these, fixed with their tests:
//!
//! | issue, item | bug | test |
//! | --- | --- | --- |
//! | 17.1 | every other tool of a home failed (`Locked`) while a proxy ran | `tests/tests/home.rs::every_tool_of_one_home_works_while_a_proxy_runs` |
//! | 17.3 | `--json` printed nothing on exit 4 | `tests/tests/cli_errors.rs::every_exit_path_prints_one_json_object` |
//! | 17.4 | a wrong pin reported as an unreachable gateway | `tests/tests/cli_errors.rs::a_wrong_pin_names_both_dids_and_has_its_own_exit` |
//! | 17.5 | a gateway that is down: a fixed 5 s timeout, nothing logged | `tests/tests/cli_errors.rs::a_gateway_that_is_down_is_unreachable_named_and_bounded` |
//! | 17.6 | `policy check` passed unknown groups and upstreams | `tests/tests/operator_cli.rs::policy_check_names_what_gateway_toml_lacks` |
//! | 17.7 | colour codes in log files | `tests/tests/operator_cli.rs::daemon_log_to_a_file_has_no_colour_codes` |
//! | 17.9 | `outcome_unknown` retried by SDKs (a call that may have run, signed again) | `tests/tests/sdk_openai.rs::the_sdk_never_retries_an_unknown_outcome` |

use didgate_audit::entry::EntryKind;
use didgate_client::CallSpec;
use didgate_gateway::config::{DidWeb, RateLimit, Rule};
use didgate_protocol::frame::FrameType;
use didgate_protocol::message::RefusalCode;
use didgate_protocol::{Identity, WebDid};
use didgate_tests::docserver::{DocServer, Served};
use didgate_tests::{Harness, RawEnd, alice, answered, bob, frames, raw_exchange, refusal_code};

/// A connection as `who` from the loopback address `from`, with the handshake's own result.
async fn connect_from(
    h: &Harness,
    from: &str,
    who: &Identity,
) -> anyhow::Result<(
    quinn::Endpoint,
    Result<quinn::Connection, quinn::ConnectionError>,
)> {
    didgate_client::low_level::tls::install_provider();
    let mut endpoint = quinn::Endpoint::client(format!("{from}:0").parse()?)?;
    endpoint.set_default_client_config(didgate_client::low_level::tls::client_config(
        who, &h.gw_did,
    )?);
    let connecting = endpoint.connect(h.addr, didgate_client::low_level::tls::SERVER_NAME)?;
    Ok((endpoint, connecting.await))
}

fn code(end: &RawEnd) -> Option<RefusalCode> {
    match end {
        RawEnd::Refusal(r) => Some(r.code),
        _ => None,
    }
}

/// Issue 15, item 3: the aggregate `refusals` entry says what it counts. One refusal of each
/// kind that is counted rather than recorded: input refused before a signature was checked
/// (alice's malformed frame), a request not signed by the connection's peer (bob's, on alice's
/// connection), a principal policy does not know, a connection over the per-DID limit, and a
/// new connection over the per-address limits. The entry counts the five and its detail names
/// each kind. On b9992ca it read "refusals to principals policy does not know" whatever it
/// counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregate_refusals_entry_names_everything_it_counts() -> anyhow::Result<()> {
    let mut h = Harness::start_with(|c| {
        c.gateway.max_connections_per_did = 1;
        // every new connection validated (a Retry first), two new connections per address
        c.gateway.handshakes.retry_above_per_sec = 0;
        c.gateway.handshakes.rate_per_address = RateLimit {
            burst: 2,
            per_sec: 0.0,
        };
    })
    .await?;
    let gw = h
        .gateway
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?;
    let (e1, c1) = connect_from(&h, "127.0.0.1", &alice()).await?;
    let c1 = c1?;
    // the client's handshake ends before the gateway's: the gateway counts c1 open once it
    // answers on it, and only then is a second connection of alice over the limit
    answered(&c1).await?;
    gw.flush_refusals().await?;
    let before = h.live_entries()?.len();

    // a second connection of alice: over the per-DID limit, refused on its first stream
    let (e2, c2) = connect_from(&h, "127.0.0.1", &alice()).await?;
    let c2 = c2?;
    let (signed, _) = h.signed_request(&alice(), |_| {})?;
    let r = raw_exchange(&c2, &h.gw_did, &frames(FrameType::Request, &signed), true).await?;
    assert_eq!(code(&r), Some(RefusalCode::RateLimited), "{r:?}");
    // a third new connection of 127.0.0.1: refused before any handshake work
    let (_e3, c3) = connect_from(&h, "127.0.0.1", &alice()).await?;
    assert!(
        matches!(&c3, Err(e) if didgate_client::low_level::tls::is_connection_refused(e)),
        "{c3:?}"
    );
    // a stranger, from another address (accepted after the refusal above, so that refusal is
    // counted: the gateway admits new connections one after another)
    let (e4, c4) = connect_from(&h, "127.0.0.2", &Identity::from_seed(&[0x77; 32])).await?;
    let c4 = c4?;
    let (strangers, _) = h.signed_request(&Identity::from_seed(&[0x77; 32]), |_| {})?;
    let r = raw_exchange(
        &c4,
        &h.gw_did,
        &frames(FrameType::Request, &strangers),
        true,
    )
    .await?;
    assert_eq!(code(&r), Some(RefusalCode::Policy), "{r:?}");
    // on alice's connection: an unknown frame type, and bob's signature
    let r = raw_exchange(&c1, &h.gw_did, &[9u8, 0, 0, 0, 0], true).await?;
    assert_eq!(code(&r), Some(RefusalCode::Malformed), "{r:?}");
    let (bobs, _) = h.signed_request(&bob(), |_| {})?;
    let r = raw_exchange(&c1, &h.gw_did, &frames(FrameType::Request, &bobs), true).await?;
    assert_eq!(code(&r), Some(RefusalCode::PeerMismatch), "{r:?}");

    gw.flush_refusals().await?;
    let new = h.live_entries()?.split_off(before);
    let [aggregate] = new.as_slice() else {
        anyhow::bail!("one aggregate entry and nothing else: {new:?}");
    };
    assert_eq!(aggregate.kind, EntryKind::Refusals);
    assert_eq!(
        (aggregate.count, aggregate.code.as_deref()),
        (
            Some(5),
            Some("malformed=1,peer_mismatch=1,policy=1,rate_limited=2")
        )
    );
    let detail = aggregate.detail.as_deref().unwrap_or_default();
    for counted in [
        "principals policy does not know",
        "not signed by the connection's peer",
        "before a signature was checked",
        "over the per-DID limit",
        "over the per-address limits",
    ] {
        assert!(detail.contains(counted), "{counted:?} not in {detail:?}");
    }
    assert!(h.upstream.seen().is_empty());
    for (e, c) in [(e1, c1), (e2, c2), (e4, c4)] {
        c.close(0u32.into(), b"bye");
        e.wait_idle().await;
    }
    drop(gw);
    h.stop().await;
    Ok(())
}

/// Issue 15, item 6: only the did:web a policy names is resolved, on the port it names. A
/// caller claiming the named DID's path on another port of the same host (here a plain TCP
/// listener, as with `did:web:localhost%3A18080:x` against a plain-HTTP port) is refused
/// `did_unresolved` with no fetch and no connection to that port; the named DID is fetched and
/// served. On b9992ca any did:web whose host a policy named was fetched, on any path and port
/// the caller picked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_did_web_on_another_port_of_a_named_host_is_never_fetched() -> anyhow::Result<()> {
    let docs = DocServer::start().await?;
    let ca_dir = tempfile::tempdir()?;
    let ca = ca_dir.path().join("test-ca.pem");
    std::fs::write(&ca, docs.ca_pem())?;
    let org = docs.did(&["org"]);
    let key = Identity::from_seed(&[0xf1; 32]);
    docs.publish(
        &org,
        Served::Document(
            didgate_protocol::web::did_web_document(&org, "k", key.did()).into_bytes(),
        ),
    );
    let (ca_text, org_text) = (ca.display().to_string(), org.to_string());
    let mut h = Harness::start_with(move |c| {
        c.did_web = DidWeb {
            cache_ttl_secs: 0,
            timeout_secs: 5,
            test_roots: vec![ca_text],
            allow_local: true,
            ..DidWeb::default()
        };
        c.rules.push(Rule {
            principals: vec![org_text],
            upstream: "payments".into(),
            methods: vec!["GET".into()],
            paths: vec!["/v1/balance".into()],
        });
    })
    .await?;
    // another port of the same host, listening (a connection would wait in its backlog)
    let other = std::net::TcpListener::bind("127.0.0.1:0")?;
    other.set_nonblocking(true)?;
    let port = other.local_addr()?.port();
    let elsewhere = WebDid::parse(&format!("did:web:localhost%3A{port}:org"))?;
    let squatter = h
        .client(
            "squatter",
            Identity::from_seed(&[0xf3; 32]).acting_as(elsewhere, "k"),
        )
        .await?;
    let balance = || CallSpec::new("payments", "GET", "/v1/balance");
    assert_eq!(
        refusal_code(&squatter.call(balance()).await),
        Some(RefusalCode::DidUnresolved)
    );
    assert_eq!(docs.requests(), 0, "no document fetched");
    match other.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        got => panic!("the gateway connected to the other port: {got:?}"),
    }
    // the DID the policy names is fetched and admitted
    let agent = h.client("agent", key.acting_as(org.clone(), "k")).await?;
    assert_eq!(agent.call(balance()).await?.status, 200);
    assert_eq!(docs.requests(), 1);
    assert_eq!(h.upstream.seen().len(), 1);
    for c in [squatter, agent] {
        c.close().await;
    }
    h.stop().await;
    Ok(())
}
