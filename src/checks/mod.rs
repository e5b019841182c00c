//! Checks against the world, beside the plan: are the pins still what their URLs serve
//! ([`remote`]), does the chain agree with the manifest ([`drift`]), will each staged binary run
//! on this host ([`runnable`]). Each reads the plan and the world and reports; none changes the
//! plan or the tree. Their results travel with the plan in one [`PlanReport`], which render draws
//! and `cvx plan --json` prints. The pure `plan` must not import this module.

pub mod drift;
pub mod remote;
pub mod runnable;

use schemars::JsonSchema;
use serde::Serialize;

use crate::plan::Plan;

// What `cvx plan` shows: the plan, and the checks' findings beside it. The JSON document is the
// plan's fields followed by the checks' (each omitted when it did not run or found nothing); a
// plain comment, not a doc, keeps schemas/plan.schema.json as it was.
#[derive(Debug, Clone, Serialize, JsonSchema)]
#[schemars(rename = "Plan")]
pub struct PlanReport {
    #[serde(flatten)]
    pub plan: Plan,
    /// `--verify-remote`: every artifact of every platform downloaded and checked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remote: Vec<remote::RemoteCheck>,
    /// Staged, verified binaries of this host's platform that may not run here (filled by the
    /// command after the pure plan): wrong architecture, missing libraries, too new a glibc, or
    /// `version` not printing the declared version. Only binaries with findings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runnable: Vec<runnable::RunnableCheck>,
    /// `--node URL`: the manifest compared with the chain's own upgrade plans.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<drift::DriftReport>,
}

impl PlanReport {
    /// The plan alone, before any check ran.
    pub fn new(plan: Plan) -> PlanReport {
        PlanReport {
            plan,
            remote: Vec::new(),
            runnable: Vec::new(),
            drift: None,
        }
    }
}
