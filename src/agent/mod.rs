//! The agent: one sync stage after stage, the daemon around it (and its push webhook),
//! and what it keeps between runs (the record, the lock) and reports (status, metrics).

pub mod daemon;
pub mod health;
pub mod healthy_file;
pub mod metrics;
pub mod render_cmd;
pub mod state;
pub mod status;
pub mod sync;
pub mod webhook;
pub mod webhook_guard;
