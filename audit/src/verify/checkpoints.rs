//! Checkpoints: each chain's signed checkpoints against its entries and Merkle tree, their
//! roots recorded as signed by their log (fork detection, [`super::findings`]), the node
//! certificate a node's checkpoint carries, and the tail no checkpoint covers.

use didgate_protocol::message::Checkpoint;

use super::chain::{Chains, Checked};
use super::findings::{Ctx, Roots};
use super::report::{ChainRecords, Skipped, Violation, ViolationKind};
use super::signatures::Sigs;
use crate::entry::Role;
use crate::nodes::SignerRule;

/// Every chain's checkpoints ([`check_checkpoints`]), the gateway chains first.
pub(super) fn check_all(
    gateways: &[ChainRecords],
    clients: &[ChainRecords],
    (gws, cls): &Chains,
    sigs: &Sigs<'_>,
    strict: bool,
    rule: &SignerRule<'_>,
    cx: &mut Ctx,
) {
    let roles = gateways
        .iter()
        .zip(gws)
        .map(|p| (p, Role::Gateway))
        .chain(clients.iter().zip(cls).map(|p| (p, Role::Client)));
    for ((rec, c), role) in roles {
        let mut roots = std::mem::take(&mut cx.roots);
        check_checkpoints(rec, c, role, (sigs, rule), &mut roots, strict, cx);
        cx.roots = roots;
    }
}

/// Checks a chain's signed checkpoints against its entries and records their roots. A gateway
/// keeps one chain, so its roots are judged per DID (a second chain of the same gateway is
/// equivocation too); one client DID may keep several named chains, so a client's roots are
/// judged per (DID, chain id).
#[allow(clippy::too_many_arguments)] // the verifier's context, passed explicitly
fn check_checkpoints(
    rec: &ChainRecords,
    c: &Checked,
    role: Role,
    (sigs, rule): (&Sigs<'_>, &SignerRule<'_>),
    roots: &mut Roots,
    strict: bool,
    cx: &mut Ctx,
) {
    // entries covered by the checkpoints that check out
    let mut sealed = 0u64;
    let extent = c.extent();
    for (i, bytes) in rec.checkpoints.iter().enumerate() {
        let where_ = format!("{} checkpoint {i}", c.label);
        let cp = match (&c.owner, sigs.open::<Checkpoint>(bytes)) {
            (Some(owner), Ok(cp))
                if cp.envelope.signer() == owner && cp.message.log == owner.as_str() =>
            {
                check_node_cert((&c.label, None), &where_, owner, &cp.message, rule, cx);
                cp.message
            }
            (_, Ok(_)) => {
                cx.flag(
                    &c.label,
                    None,
                    ViolationKind::BadSignature,
                    format!("{where_} is not signed by the chain's owner"),
                );
                continue;
            }
            (_, Err(e)) => {
                cx.flag(
                    &c.label,
                    None,
                    ViolationKind::BadSignature,
                    format!("{where_}: {e}"),
                );
                continue;
            }
        };
        let log = match role {
            Role::Client => format!("{} (chain {})", cp.log, hex::encode(cp.chain)),
            _ => cp.log.clone(),
        };
        roots.record(&log, cp.size, cp.root, where_.clone(), &c.label, cx);
        if Some(cp.chain) != c.id {
            cx.flag(
                &c.label,
                None,
                ViolationKind::BadSignature,
                format!("{where_} names another chain"),
            );
            continue;
        }
        let last = cp.size.saturating_sub(1);
        if cp.size > extent {
            cx.flag(
                &c.label,
                Some(extent),
                ViolationKind::TruncatedChain,
                format!(
                    "{where_} covers {} entries but the chain has {extent}",
                    cp.size
                ),
            );
        } else if c.gaps && cp.size > 0 {
            cx.skipped.push(Skipped {
                chain: c.label.clone(),
                check: format!("{where_} (size {}): head and root", cp.size),
                reason:
                    "entries are missing or out of order, so their Merkle positions are unknown"
                        .into(),
            });
        } else if cp.size > 0 {
            let root = c.tree.root_at(cp.size);
            if c.at(last).is_none_or(|item| item.hash != cp.head) || root != Some(cp.root) {
                cx.flag(
                    &c.label,
                    Some(last),
                    ViolationKind::AlteredEntry,
                    format!(
                        "the chain's first {} entries differ from what {where_} signed",
                        cp.size
                    ),
                );
            } else {
                sealed = sealed.max(cp.size);
            }
        }
    }
    check_sealed(rec, c, extent, sealed, strict, cx);
}

/// The node certificate a checkpoint signed by `owner` carries, if any: it must hold for the
/// owner's key at the checkpoint's `time_ms` under the gateway it names itself (no request
/// names one), in that gateway's revocation list, else `bad_node_certificate`, reported in
/// `chain` at `seq` (a chain's own checkpoint: no seq; a witnessed one: its witness entry's).
pub(super) fn check_node_cert(
    (chain, seq): (&str, Option<u64>),
    where_: &str,
    owner: &didgate_protocol::Did,
    cp: &Checkpoint,
    rule: &SignerRule<'_>,
    cx: &mut Ctx,
) {
    let Some(cert) = &cp.node_cert else { return };
    if let Err(e) = rule.check_named(owner, cert, cp.time_ms) {
        cx.flag(
            chain,
            seq,
            ViolationKind::BadNodeCertificate,
            format!("{where_} carries a node certificate that does not hold: {e}"),
        );
    }
}

/// Entries after the last one a valid checkpoint of the owner covers: `unsealed_tail`, a
/// violation when the chain is declared sealed or the verifier is strict, else a warning.
fn check_sealed(
    rec: &ChainRecords,
    c: &Checked,
    extent: u64,
    sealed: u64,
    strict: bool,
    cx: &mut Ctx,
) {
    if extent <= sealed || c.gaps {
        return;
    }
    let finding = Violation {
        chain: c.label.clone(),
        seq: Some(sealed),
        kind: ViolationKind::UnsealedTail,
        detail: format!(
            "entries {sealed}..{} are covered by no checkpoint signed by the chain's owner: anyone could have truncated or edited them{}",
            extent - 1,
            if rec.sealed || strict {
                ""
            } else {
                " (a warning: the chain is not declared sealed; --strict makes it a violation)"
            }
        ),
    };
    if rec.sealed || strict {
        cx.violations.push(finding);
    } else {
        cx.warnings.push(finding);
    }
}
