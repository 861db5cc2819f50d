//! What a finished sync did: the commit, its plan and the outcome of applying it (the
//! CLI prints it, the metrics count it).

use crate::agent::suspend;
use crate::reconcile::outcome::Outcome;
use crate::reconcile::plan_types::Plan;

/// What a finished sync did.
#[derive(Debug)]
pub struct Report {
    pub commit: String,
    pub plan: Plan,
    pub outcome: Outcome,
    /// What suspensions held back (`vmsync suspend`).
    pub held: suspend::Held,
}
