//! Layer 6, the agent: one sync stage after stage (`sync`), the daemon around it (and its
//! push webhook), what a sync reports (`report`), `vmsync status` and the metrics file.

pub mod daemon;
pub mod metrics;
pub mod notify;
pub mod render_cmd;
pub mod report;
pub mod shutdown;
pub mod stage_clock;
pub mod status;
pub mod suspend;
pub mod sync;
pub mod watchdog;
pub mod webhook;
pub mod webhook_guard;
