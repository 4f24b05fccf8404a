//! The verifier: a pure function over the records of one or more gateway chains and any
//! number of client chains (specs/audit-log.md, "Verification").
//!
//! It checks each chain (decoding, contiguous seq, previous-hash links, the recorded head,
//! genesis, every embedded signature, call IDs, closure of executing entries) and every
//! cross-link between chains, and names each violation with its chain, seq and kind.
//!
//! A run is a sequence of phases (`run`), each in its own module:
//!
//! - `chain`: per chain, each entry hashed and decoded, then the chain's structure (order,
//!   links, head, genesis, versions) and its Merkle tree;
//! - `signatures`, `batch` and `keys`: every distinct signed message opened once, its
//!   signature checked in batches, and handed back to the checks from a cache;
//! - `checkpoints`: each chain's signed checkpoints and the roots its owner signed;
//! - `witness`: the peers' checkpoints each chain's witness entries hold, against the chains
//!   they name;
//! - `gateway` and `client` (with `secrets`): the calls each chain records;
//! - `links`: the cross-links between gateway and client chains;
//! - `findings` (what the checks found so far) and `summary` (the report at the end);
//! - `report`: the public types, below every other module.
//!
//! The parallel steps (`parallel`: hashing and decoding entries, Merkle levels, opening each
//! distinct signed message once) only precompute what the sequential checks would compute
//! themselves; the checks and the order of the violations are those of one thread.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use didgate_protocol::Did;

mod batch;
mod chain;
mod checkpoints;
mod client;
mod findings;
mod gateway;
mod keys;
mod links;
mod parallel;
mod report;
mod secrets;
mod signatures;
mod summary;
#[cfg(test)]
mod tests;
mod witness;

pub use report::{
    ChainRecords, ChainSummary, Options, Phases, Report, Skipped, UnknownOutcome, Violation,
    ViolationKind,
};

use crate::nodes::SignerRule;
use chain::{Chains, Checked};
use findings::Ctx;
use links::Gateways;
use signatures::Sigs;

/// Verifies gateway and client chains and their cross-links, on every core.
pub fn verify(gateways: &[ChainRecords], clients: &[ChainRecords]) -> Report {
    verify_with(gateways, clients, default_threads())
}

/// Like [`verify`], on up to `threads` threads (at least one). The report is the same for any
/// number of threads.
pub fn verify_with(gateways: &[ChainRecords], clients: &[ChainRecords], threads: usize) -> Report {
    run(gateways, clients, threads, Options::default()).0
}

/// Like [`verify`], with `options` (e.g. `strict`, the node revocation lists).
pub fn verify_opts(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    options: Options,
) -> Report {
    run(gateways, clients, default_threads(), options).0
}

/// Like [`verify_with`], also telling where the time went (for benchmarks).
#[doc(hidden)]
pub fn verify_phases(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    threads: usize,
) -> (Report, Phases) {
    run(gateways, clients, threads, Options::default())
}

/// The number of threads [`verify`] uses.
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The verifier: the phases in order, each timed into [`Phases`].
fn run(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    threads: usize,
    options: Options,
) -> (Report, Phases) {
    let threads = threads.max(1);
    let started = Instant::now();
    let mut ph = Phases::default();
    let mut cx = Ctx::default();
    let decoded = timed(&mut ph.decode_hash, || {
        chain::decode_all(gateways, clients, threads)
    });
    let (mut chains, leaves) = timed(&mut ph.chain_checks, || {
        chain::check_all(gateways, clients, decoded, threads, &mut cx)
    });
    timed(&mut ph.merkle, || {
        chain::build_trees(&mut chains, leaves, threads);
    });
    let mut sigs = timed(&mut ph.dedupe, || Sigs::collect(gateways, clients, &chains));
    open_signatures(&mut sigs, threads, &mut ph);
    let dids = gateway_dids(&chains.0);
    timed(&mut ph.receipt_roots, || {
        sigs.receipt_roots(&chains.0, &dids, threads);
    });
    let rule = SignerRule::new(&options.revocations);
    let (summaries, cross_links) = timed(&mut ph.cross_links, || {
        let given = Given {
            gateways,
            clients,
            chains: &chains,
            dids: &dids,
            sigs: &sigs,
        };
        check_sequentially(&given, options.strict, &rule, &mut cx)
    });
    let unknown_outcomes = summary::unknown_outcomes(&chains.0, &chains.1);
    ph.total = started.elapsed();
    let report = summary::finish(cx, summaries, cross_links, unknown_outcomes);
    (report, ph)
}

/// Runs `step`, adding the time it took to `slot`.
fn timed<T>(slot: &mut Duration, step: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = step();
    *slot += t.elapsed();
    out
}

/// Opens every distinct signed message ([`Sigs::open_all`]) and records where the time went.
fn open_signatures(sigs: &mut Sigs<'_>, threads: usize, ph: &mut Phases) {
    let busy = timed(&mut ph.open, || sigs.open_all(threads));
    ph.open_parse_cpu += busy.parse;
    ph.open_sig_cpu += busy.sig;
    ph.open_exact_cpu += busy.exact;
    ph.signatures = sigs.opened.iter().filter(|o| o.is_some()).count() as u64;
    ph.signed_refs = sigs.refs;
}

/// Index of each gateway chain by its owner's DID.
fn gateway_dids(gws: &[Checked]) -> HashMap<Did, usize> {
    gws.iter()
        .enumerate()
        .filter_map(|(i, g)| g.owner.clone().map(|d| (d, i)))
        .collect()
}

/// What the sequential checks read: the records, the checked chains, the gateway chains by
/// owner and the opened signed messages.
struct Given<'g, 's> {
    gateways: &'g [ChainRecords],
    clients: &'g [ChainRecords],
    chains: &'g Chains,
    dids: &'g HashMap<Did, usize>,
    sigs: &'g Sigs<'s>,
}

/// The sequential checks, on one thread: every chain's checkpoints and witness entries, the
/// gateway chains' calls, the client chains' calls with their receipts, refusals and grants,
/// then the gateway entries against the client chains; node certificates under `rule`.
/// Returns the chains' summaries and the cross-links checked.
fn check_sequentially(
    given: &Given<'_, '_>,
    strict: bool,
    rule: &SignerRule<'_>,
    cx: &mut Ctx,
) -> (Vec<ChainSummary>, u64) {
    let (chains, sigs) = (given.chains, given.sigs);
    checkpoints::check_all(
        given.gateways,
        given.clients,
        chains,
        sigs,
        strict,
        rule,
        cx,
    );
    witness::check_all(chains, sigs, rule, cx);
    let (gws, cls) = chains;
    let gw = gateway::check_all(gws, sigs, cx);
    let gateways = Gateways {
        chains: gws,
        dids: given.dids,
        executing: &gw.executing,
        rule,
    };
    let cl = client::check_all(cls, &gateways, sigs, cx);
    let links = links::check_gateway_to_client(gws, cls, &gw.executing, &cl.requests, sigs, cx);
    let summaries = summary::summaries(gws, &gw.calls, cls, &cl.calls);
    (summaries, cl.cross_links + links)
}
