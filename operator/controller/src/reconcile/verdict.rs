//! The kstatus conditions (`Ready`, `Reconciling`, `Stalled`) derived from a
//! reconciler's verdict, as a pure function.

use yukumo_api::Reason;
use yukumo_api::common::{Condition, ConditionStatus, Conditions, condition_types as ct};

/// What a reconciler concluded about an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Desired state reached.
    Ready { reason: Reason, message: String },
    /// Working towards it; nothing for the user to do.
    Progressing { reason: Reason, message: String },
    /// Cannot progress until the spec (or the fleet) changes.
    Stalled { reason: Reason, message: String },
}

impl Verdict {
    pub fn ready(reason: Reason, message: impl Into<String>) -> Self {
        Verdict::Ready {
            reason,
            message: message.into(),
        }
    }
    pub fn progressing(reason: Reason, message: impl Into<String>) -> Self {
        Verdict::Progressing {
            reason,
            message: message.into(),
        }
    }
    pub fn stalled(reason: Reason, message: impl Into<String>) -> Self {
        Verdict::Stalled {
            reason,
            message: message.into(),
        }
    }
    pub fn reason(&self) -> &Reason {
        match self {
            Verdict::Ready { reason, .. }
            | Verdict::Progressing { reason, .. }
            | Verdict::Stalled { reason, .. } => reason,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            Verdict::Ready { message, .. }
            | Verdict::Progressing { message, .. }
            | Verdict::Stalled { message, .. } => message,
        }
    }
    pub fn is_stalled(&self) -> bool {
        matches!(self, Verdict::Stalled { .. })
    }
}

/// The condition list after applying `verdict` to `existing`, keeping
/// transition times of unchanged conditions and any other condition types.
pub fn apply_verdict(
    existing: &[Condition],
    generation: Option<i64>,
    verdict: &Verdict,
) -> Vec<Condition> {
    let mut conds = existing.to_vec();
    let (ready, reconciling, stalled) = match verdict {
        Verdict::Ready { .. } => (true, false, false),
        Verdict::Progressing { .. } => (false, true, false),
        Verdict::Stalled { .. } => (false, false, true),
    };
    let (reason, message) = (verdict.reason(), verdict.message().to_string());
    let idle = if ready { &Reason::Ready } else { reason };
    conds.set_condition(Condition::new(
        ct::READY,
        ConditionStatus::from_bool(ready),
        reason.clone(),
        message.clone(),
        generation,
    ));
    conds.set_condition(Condition::new(
        ct::RECONCILING,
        ConditionStatus::from_bool(reconciling),
        if reconciling { reason } else { idle }.clone(),
        if reconciling {
            message.clone()
        } else {
            String::new()
        },
        generation,
    ));
    conds.set_condition(Condition::new(
        ct::STALLED,
        ConditionStatus::from_bool(stalled),
        if stalled { reason } else { idle }.clone(),
        if stalled { message } else { String::new() },
        generation,
    ));
    conds
}

/// Whether the `Ready` reason differs from before: the moment to publish
/// an Event (a message that only counts progress — "2/4 nodes ready" —
/// lives in the status, not in Events).
pub fn reason_changed(existing: &[Condition], verdict: &Verdict) -> bool {
    existing
        .iter()
        .find(|c| c.type_ == ct::READY)
        .is_none_or(|c| &c.reason != verdict.reason())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_sets_three_conditions() {
        let c = apply_verdict(
            &[],
            Some(3),
            &Verdict::stalled(
                Reason::NetworkGroupNotFound,
                "spec.networkGroup: x not found",
            ),
        );
        assert_eq!(c.len(), 3);
        assert!(!c.is_true("Ready"));
        assert!(c.is_true("Stalled"));
        assert!(!c.is_true("Reconciling"));
        assert_eq!(
            c.get_condition("Ready").unwrap().reason,
            Reason::NetworkGroupNotFound
        );
        assert_eq!(
            c.get_condition("Ready").unwrap().observed_generation,
            Some(3)
        );
    }

    #[test]
    fn same_verdict_is_idempotent() {
        let v = Verdict::progressing(Reason::NodesStarting, "0/4 nodes ready");
        let a = apply_verdict(&[], Some(1), &v);
        let b = apply_verdict(&a, Some(1), &v);
        assert_eq!(a, b);
        assert!(!reason_changed(&a, &v));
        // Progress counts are no news.
        assert!(!reason_changed(
            &a,
            &Verdict::progressing(Reason::NodesStarting, "3/4 nodes ready")
        ));
        assert!(reason_changed(
            &a,
            &Verdict::ready(Reason::AllNodesReady, "")
        ));
    }
}
