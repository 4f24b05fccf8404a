//! The end of a run: the chains' summaries, the calls whose outcome a chain records as
//! unknown, and the report assembled from what the checks found.

use super::chain::Checked;
use super::findings::Ctx;
use super::report::{ChainSummary, Report, Skipped, UnknownOutcome};
use crate::entry::{EntryKind, Outcome};

/// The report of a run: what the checks found in `cx` (the receipts whose roots were not
/// recomputed counted per chain after the other skipped checks, in label order), the chains'
/// summaries, the cross-links checked and the calls of unknown outcome.
pub(super) fn finish(
    cx: Ctx,
    chains: Vec<ChainSummary>,
    cross_links: u64,
    unknown_outcomes: Vec<UnknownOutcome>,
) -> Report {
    let mut skipped = cx.skipped;
    let mut unchecked: Vec<_> = cx.receipt_roots_unchecked.into_iter().collect();
    unchecked.sort();
    for (chain, n) in unchecked {
        skipped.push(Skipped {
            check: format!("the roots of {n} receipt(s) signed for this chain"),
            chain,
            reason: "entries are missing or out of order, so their Merkle positions are unknown"
                .into(),
        });
    }
    Report {
        chains,
        cross_links,
        violations: cx.violations,
        warnings: cx.warnings,
        skipped,
        unknown_outcomes,
    }
}

/// The summaries of the gateway chains then the client chains, with the calls each recorded.
pub(super) fn summaries(
    gws: &[Checked],
    gw_calls: &[u64],
    cls: &[Checked],
    client_calls: &[u64],
) -> Vec<ChainSummary> {
    let gateways = gws.iter().zip(gw_calls);
    let clients = cls.iter().zip(client_calls);
    gateways
        .chain(clients)
        .map(|(c, calls)| summary(c, *calls))
        .collect()
}

/// The calls each chain records with an unknown outcome ([`UnknownOutcome`]).
pub(super) fn unknown_outcomes(gws: &[Checked], cls: &[Checked]) -> Vec<UnknownOutcome> {
    let gateway = gws.iter().flat_map(|g| {
        g.items
            .iter()
            .filter(|i| i.decoded && i.entry.kind == EntryKind::Abandoned)
            .map(move |i| (&g.label, i))
    });
    let client = cls.iter().flat_map(|c| {
        c.items
            .iter()
            .filter(|i| {
                i.decoded
                    && i.entry.kind == EntryKind::Result
                    && i.entry.outcome == Some(Outcome::Unknown)
            })
            .map(move |i| (&c.label, i))
    });
    gateway
        .chain(client)
        .map(|(label, i)| UnknownOutcome {
            chain: label.clone(),
            seq: i.key,
            call: i.entry.call.map(hex::encode).unwrap_or_default(),
            detail: i.entry.detail.clone().unwrap_or_default(),
        })
        .collect()
}

fn summary(c: &Checked, calls: u64) -> ChainSummary {
    ChainSummary {
        label: c.label.clone(),
        owner: c.owner.as_ref().map(|d| d.to_string()),
        id: c.id.map(hex::encode),
        entries: c.items.len() as u64,
        calls,
    }
}
