//! The agent: one sync stage after stage, the daemon around it (and its push webhook),
//! and what it keeps between runs (the record, the lock) and reports (status, metrics).

pub mod daemon;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod state;
pub mod status;
pub mod suspend;
pub mod sync;
pub mod watchdog;
pub mod webhook;
