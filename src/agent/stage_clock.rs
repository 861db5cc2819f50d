//! How long each stage of a sync took, and how many libvirt calls it made, for the
//! `converged` line (`stages_ms = "fetch 0.5, validate 3.1, observe 107.2, …"`).

use std::time::{Duration, Instant};

/// Laps of one sync: each [`lap`](StageClock::lap) records the time since the last.
#[derive(Debug)]
pub struct StageClock {
    lap_started: Instant,
    calls_before: u64,
    stages: Vec<(&'static str, Duration)>,
}

impl StageClock {
    /// Starts timing the first stage.
    pub fn start() -> Self {
        Self {
            lap_started: Instant::now(),
            calls_before: 0,
            stages: Vec::new(),
        }
    }

    /// Ends `stage` now and starts timing the next.
    pub fn lap(&mut self, stage: &'static str) {
        self.stages.push((stage, self.lap_started.elapsed()));
        self.lap_started = Instant::now();
    }

    /// Starts timing the next stage without recording the time since the last lap (a
    /// stage that had nothing to do is not shown).
    pub fn skip(&mut self) {
        self.lap_started = Instant::now();
    }

    /// The hypervisor's call count before the first stage that calls it.
    pub fn count_calls_from(&mut self, calls: u64) {
        self.calls_before = calls;
    }

    /// The calls made since [`count_calls_from`](StageClock::count_calls_from).
    pub fn calls_since(&self, calls_now: u64) -> u64 {
        calls_now.saturating_sub(self.calls_before)
    }

    /// The stages as the `converged` line shows them: `fetch 0.5, observe 107.2` (ms).
    pub fn summary(&self) -> String {
        self.stages
            .iter()
            .map(|(stage, took)| format!("{stage} {:.1}", took.as_secs_f64() * 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The stages recorded so far, in order.
    pub fn stages(&self) -> Vec<&'static str> {
        self.stages.iter().map(|(stage, _)| *stage).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn laps_are_recorded_in_order_and_a_skipped_stage_is_not_shown() {
        let mut clock = StageClock::start();
        clock.lap("fetch");
        clock.skip();
        clock.lap("plan");
        assert_eq!(clock.stages(), ["fetch", "plan"]);
        let summary = clock.summary();
        assert!(
            summary.starts_with("fetch ") && summary.contains(", plan "),
            "{summary}"
        );
        clock.count_calls_from(10);
        assert_eq!(clock.calls_since(17), 7);
        assert_eq!(
            clock.calls_since(3),
            0,
            "a reconnected hypervisor starts again"
        );
    }
}
