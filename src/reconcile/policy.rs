//! How changes, drift and pruning are handled: the part of the agent's configuration
//! (`[policy]`) the planner reads.

use crate::desired::values::DEFAULT_SHUTDOWN_TIMEOUT;

/// How changes, drift and pruning are handled (`[policy]`, see docs/configuration.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePolicy {
    /// `[policy] self_heal` / `--self-heal`: put drifted domains back to the commit
    /// (definition, autostart flag, power state); false only reports. Default true.
    pub self_heal: bool,
    /// `[policy] prune` / `--prune`: shut down and undefine (keeping NVRAM and TPM state,
    /// never disks) tagged domains no longer in the manifest for this host. Default false.
    pub prune: bool,
    /// `[policy] max_prune` / `--max-prune`: more prunes than this in one commit are
    /// refused without `--allow-mass-prune`. Default 5.
    pub max_prune: usize,
    /// `[policy] shutdown_timeout` / `--shutdown-timeout`: default graceful-shutdown
    /// timeout before a destroy (VMs override it with `shutdown_timeout`). Default "120s".
    pub shutdown_timeout: std::time::Duration,
    /// `--allow-mass-prune` (with `--once` only): lift the prune guards for this run.
    pub allow_mass_prune: bool,
}

impl Default for ChangePolicy {
    fn default() -> Self {
        Self {
            self_heal: true,
            prune: false,
            max_prune: 5,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            allow_mass_prune: false,
        }
    }
}
