//! The `[vm.health]` table of the manifest, as written and checked (docs/health.md). The
//! rules that use it are in `reconcile::health_rules`; the check itself in
//! `host::health_probe`.

use std::ops::Range;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::desired::path_rule;
use crate::desired::values::parse_timeout;

/// `settle` when the table does not say.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(30);

/// `timeout` when the table does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// `[vm.health]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    settle: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    timeout: Option<Spanned<String>>,
    revert: Option<bool>,
    guest_agent: Option<bool>,
}

/// `[vm.health]`, checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    /// `settle`: how long the domain must stay running after vmsync started it
    /// (default 30s).
    pub settle: Duration,
    /// `command`: run on the host once after `settle`; exit 0 = healthy (default: none).
    pub command: Option<Vec<String>>,
    /// `timeout`: the whole check, settle included (default 5m).
    pub timeout: Duration,
    /// `revert`: put the last healthy definition back when unhealthy (default true).
    pub revert: bool,
    /// `guest_agent`: the QEMU guest agent must answer a ping (default false).
    pub guest_agent: bool,
}

impl HealthSpec {
    /// Checks and types the table. `problem(span, field, message)` reports a bad value
    /// (`field` under `health.`); `None` when one was reported.
    pub fn parse(
        raw: &RawHealth,
        mut problem: impl FnMut(Range<usize>, &str, String),
    ) -> Option<HealthSpec> {
        let mut ok = true;
        let mut duration = |value: &Option<Spanned<String>>, field: &str, default| match value {
            None => default,
            Some(v) => match parse_timeout(v.get_ref()) {
                Ok(d) => d,
                Err(msg) => {
                    problem(v.span(), field, msg);
                    ok = false;
                    default
                }
            },
        };
        let settle = duration(&raw.settle, "health.settle", DEFAULT_SETTLE);
        let timeout = duration(&raw.timeout, "health.timeout", DEFAULT_TIMEOUT);
        if ok
            && settle >= timeout
            && let Some(span) = raw
                .settle
                .as_ref()
                .or(raw.timeout.as_ref())
                .map(|s| s.span())
        {
            problem(
                span,
                "health.settle",
                format!(
                    "settle ({}) must be shorter than the whole check's timeout ({})",
                    humantime::format_duration(settle),
                    humantime::format_duration(timeout)
                ),
            );
            ok = false;
        }
        let command = match &raw.command {
            Some(c) if c.get_ref().is_empty() || c.get_ref()[0].trim().is_empty() => {
                problem(
                    c.span(),
                    "health.command",
                    "'command' must name a program: [\"/path/to/check\", \"arg\", …]".into(),
                );
                ok = false;
                None
            }
            c => c.as_ref().map(|c| c.get_ref().clone()),
        };
        ok.then_some(HealthSpec {
            settle,
            command,
            timeout,
            revert: raw.revert.unwrap_or(true),
            guest_agent: raw.guest_agent.unwrap_or(false),
        })
    }
}

impl HealthSpec {
    /// The check in one line, for `vmsync plan`: `settle 30s, command
    /// '/usr/local/lib/vmsync/checks/web' '--timeout' '5', timeout 5m, revert`
    /// (each argument quoted and escaped).
    pub fn describe(&self) -> String {
        let mut parts = vec![format!(
            "settle {}",
            humantime::format_duration(self.settle)
        )];
        if self.guest_agent {
            parts.push("guest agent ping".into());
        }
        if let Some(command) = &self.command {
            let words: Vec<String> = command
                .iter()
                .map(|w| format!("'{}'", path_rule::escape(w)))
                .collect();
            parts.push(format!("command {} (no shell)", words.join(" ")));
        }
        parts.push(format!(
            "timeout {}",
            humantime::format_duration(self.timeout)
        ));
        parts.push(if self.revert { "revert" } else { "no revert" }.into());
        parts.join(", ")
    }
}
