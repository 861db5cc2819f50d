//! Maintenance windows (`[[window]]`): when a running guest may be interrupted (a
//! restart for `on_change = "restart"`, a stop, a prune). A window opens at each tick of
//! its cron `schedule` (with seconds) in its `timezone` and stays open for `duration`;
//! `hosts` and `vms` (name patterns with `*` and `?`) limit what it applies to. Outside
//! every window that applies to a VM, its interrupting actions wait; with no window that
//! applies, they are always allowed. Pure: the time is a value.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde::Deserialize;
use toml::Spanned;

use crate::desired::values::parse_timeout;

/// Longest window: a year (a longer one is a typo, and would overflow the clock).
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A `[[window]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    schedule: Spanned<String>,
    duration: Spanned<String>,
    timezone: Option<Spanned<String>>,
    hosts: Option<Spanned<Vec<String>>>,
    vms: Option<Spanned<Vec<String>>>,
}

/// One maintenance window, checked.
#[derive(Debug, Clone)]
pub struct Window {
    /// Line of its `schedule` key in `vmsync.toml`.
    pub line: usize,
    /// The schedule as written (`0 0 2 * * Sun`).
    pub schedule_text: String,
    schedule: cron::Schedule,
    pub duration: Duration,
    /// `None`: the host's time zone.
    pub timezone: Option<chrono_tz::Tz>,
    /// `None`: every host.
    pub hosts: Option<Vec<String>>,
    /// Name patterns; `None`: every VM.
    pub vms: Option<Vec<String>>,
}

impl PartialEq for Window {
    fn eq(&self, other: &Self) -> bool {
        (
            self.line,
            &self.schedule_text,
            self.duration,
            self.timezone,
            &self.hosts,
            &self.vms,
        ) == (
            other.line,
            &other.schedule_text,
            other.duration,
            other.timezone,
            &other.hosts,
            &other.vms,
        )
    }
}
impl Eq for Window {}

/// Whether `name` matches `pattern` (`*` any run of characters, `?` one character).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Classic two-pointer glob with backtracking to the last `*`.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

impl Window {
    /// Whether the window applies to VM `vm` on host `host`.
    pub fn applies(&self, host: &str, vm: &str) -> bool {
        self.hosts
            .as_ref()
            .is_none_or(|h| h.iter().any(|x| x == host))
            && self
                .vms
                .as_ref()
                .is_none_or(|v| v.iter().any(|p| name_matches(p, vm)))
    }

    /// The first start strictly after `t`.
    fn start_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        fn first<Z: TimeZone>(s: &cron::Schedule, t: DateTime<Z>) -> Option<DateTime<Utc>> {
            s.after(&t).next().map(|d| d.with_timezone(&Utc))
        }
        match self.timezone {
            Some(tz) => first(&self.schedule, t.with_timezone(&tz)),
            None => first(&self.schedule, t.with_timezone(&chrono::Local)),
        }
    }

    /// Whether the window is open at `now`: a start at or before `now` less than
    /// `duration` ago.
    pub fn open_at(&self, now: DateTime<Utc>) -> bool {
        let Ok(len) = chrono::Duration::from_std(self.duration) else {
            return false;
        };
        self.start_after(now - len)
            .is_some_and(|start| start <= now)
    }

    /// The next time the window opens after `now`.
    pub fn next_start(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.start_after(now)
    }
}

/// Whether VM `vm` on `host` may be interrupted at `now`: `Ok` with no window that
/// applies or inside one; else `Err` with the next start of one (`None`: no window that
/// applies ever opens again).
pub fn allowed(
    windows: &[Window],
    host: &str,
    vm: &str,
    now: DateTime<Utc>,
) -> Result<(), Option<DateTime<Utc>>> {
    let mut applying = windows.iter().filter(|w| w.applies(host, vm)).peekable();
    if applying.peek().is_none() {
        return Ok(());
    }
    let mut next: Option<DateTime<Utc>> = None;
    for w in applying {
        if w.open_at(now) {
            return Ok(());
        }
        if let Some(start) = w.next_start(now) {
            next = Some(next.map_or(start, |n| n.min(start)));
        }
    }
    Err(next)
}

/// The `[[window]]` tables, checked. Each problem goes to `report` with its span and
/// its field (`window[0].duration`); `line` gives the line of a span.
pub fn parse_all(
    raw: Vec<RawWindow>,
    line: &dyn Fn(usize) -> usize,
    report: &mut dyn FnMut(std::ops::Range<usize>, String, String),
) -> Vec<Window> {
    let mut out = Vec::new();
    for (i, w) in raw.into_iter().enumerate() {
        let mut push = |span: std::ops::Range<usize>, key: &str, message: String| {
            report(span, format!("window[{i}].{key}"), message)
        };
        let schedule = cron::Schedule::from_str(w.schedule.get_ref())
            .map_err(|e| {
                // The cron crate's message repeats the text with a caret line.
                let why = e.to_string();
                let why = why.lines().last().unwrap_or_default().to_string();
                push(
                    w.schedule.span(),
                    "schedule",
                    format!(
                        "'{}' is not a cron schedule with seconds (\"0 0 2 * * Sun\"): {why}",
                        w.schedule.get_ref()
                    ),
                )
            })
            .ok();
        let duration = match parse_timeout(w.duration.get_ref()) {
            Ok(d) if d.is_zero() => {
                push(
                    w.duration.span(),
                    "duration",
                    "must be longer than 0s".into(),
                );
                None
            }
            Ok(d) if d > MAX_DURATION => {
                push(
                    w.duration.span(),
                    "duration",
                    format!("'{}' is longer than a year", w.duration.get_ref()),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                push(w.duration.span(), "duration", e);
                None
            }
        };
        let timezone = match &w.timezone {
            None => Some(None),
            Some(tz) => match chrono_tz::Tz::from_str(tz.get_ref()) {
                Ok(z) => Some(Some(z)),
                Err(_) => {
                    push(
                        tz.span(),
                        "timezone",
                        format!(
                            "'{}' is not a time zone of the IANA database (like \"Europe/Berlin\" or \"UTC\")",
                            tz.get_ref()
                        ),
                    );
                    None
                }
            },
        };
        let lists = [("hosts", &w.hosts), ("vms", &w.vms)];
        for (key, list) in lists {
            if let Some(l) = list
                && (l.get_ref().is_empty() || l.get_ref().iter().any(|x| x.is_empty()))
            {
                push(
                    l.span(),
                    key,
                    format!("'{key}' must list at least one non-empty name (omit it for all)"),
                );
            }
        }
        if let (Some(schedule), Some(duration), Some(timezone)) = (schedule, duration, timezone) {
            out.push(Window {
                line: line(w.schedule.span().start),
                schedule_text: w.schedule.get_ref().clone(),
                schedule,
                duration,
                timezone,
                hosts: w.hosts.map(Spanned::into_inner),
                vms: w.vms.map(Spanned::into_inner),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(extra: &str) -> Result<Vec<Window>, Vec<String>> {
        let text = format!("[[window]]\n{extra}");
        #[derive(Deserialize)]
        struct Doc {
            window: Vec<RawWindow>,
        }
        let doc: Doc = toml::from_str(&text).expect("toml");
        let mut problems = Vec::new();
        let w = parse_all(doc.window, &|_| 1, &mut |_, field, _| problems.push(field));
        if problems.is_empty() {
            Ok(w)
        } else {
            Err(problems)
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_window_is_open_from_its_start_for_its_duration_in_its_time_zone() {
        let w =
            window("schedule = \"0 0 2 * * Sun\"\nduration = \"2h\"\ntimezone = \"Europe/Berlin\"")
                .unwrap();
        // Sunday 2026-12-06, 02:00 in Berlin is 01:00 UTC.
        assert!(!w[0].open_at(at("2026-12-06T00:59:59Z")));
        assert!(w[0].open_at(at("2026-12-06T01:00:00Z")));
        assert!(w[0].open_at(at("2026-12-06T02:59:59Z")));
        assert!(!w[0].open_at(at("2026-12-06T03:00:00Z")));
        assert_eq!(
            w[0].next_start(at("2026-12-06T03:00:00Z")),
            Some(at("2026-12-13T01:00:00Z"))
        );
        assert_eq!(
            allowed(&w, "hv1", "web", at("2026-12-06T05:00:00Z")),
            Err(Some(at("2026-12-13T01:00:00Z")))
        );
        assert_eq!(
            allowed(&w, "hv1", "web", at("2026-12-06T01:30:00Z")),
            Ok(())
        );
        assert_eq!(
            allowed(&[], "hv1", "web", at("2026-12-06T05:00:00Z")),
            Ok(())
        );
    }

    #[test]
    fn hosts_and_vm_patterns_limit_a_window() {
        let w = window(
            "schedule = \"0 0 2 * * *\"\nduration = \"1h\"\ntimezone = \"UTC\"\nhosts = [\"hv1\"]\nvms = [\"web-*\", \"db?\"]",
        )
        .unwrap();
        assert!(w[0].applies("hv1", "web-1") && w[0].applies("hv1", "db2"));
        assert!(!w[0].applies("hv2", "web-1"));
        assert!(!w[0].applies("hv1", "db") && !w[0].applies("hv1", "app"));
        // A VM no window applies to is always allowed.
        assert_eq!(
            allowed(&w, "hv1", "app", at("2026-12-06T05:00:00Z")),
            Ok(())
        );
        assert!(name_matches("*", "") && name_matches("a*b*c", "axxbyyc"));
        assert!(!name_matches("a*b", "ac"));
    }

    #[test]
    fn bad_windows_name_the_field() {
        let fields = |r: Result<Vec<Window>, Vec<String>>| r.unwrap_err();
        assert_eq!(
            fields(window("schedule = \"every sunday\"\nduration = \"2h\"")),
            ["window[0].schedule"]
        );
        assert_eq!(
            fields(window("schedule = \"0 0 2 * * *\"\nduration = \"soon\"")),
            ["window[0].duration"]
        );
        assert_eq!(
            fields(window("schedule = \"0 0 2 * * *\"\nduration = \"0s\"")),
            ["window[0].duration"]
        );
        assert_eq!(
            fields(window(
                "schedule = \"0 0 2 * * *\"\nduration = \"1h\"\ntimezone = \"Mars/Olympus\""
            )),
            ["window[0].timezone"]
        );
        assert_eq!(
            fields(window(
                "schedule = \"0 0 2 * * *\"\nduration = \"1h\"\nvms = []"
            )),
            ["window[0].vms"]
        );
    }
}
