//! The supervisor's decisions, as plain functions over data: whether and when to restart a container whose process
//! ended ([`restart`]), what a health probe's result makes of the container's health ([`HealthState::observe`]),
//! and whether a failed run shows the image variant is wrong for this device ([`classify`]).
//!
//! No I/O and no clock: durations come in as values, so the tests are tables.

use std::time::Duration;

use crate::app::{HealthCheck, RestartPolicy};

/// How a container's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl Exit {
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

/// Restart delays: `initial`, doubling per quick failure up to `max`; a run of at least `reset_after` starts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

impl Default for Backoff {
    /// Docker's: 100 ms doubling, and a process that ran 10 s is taken to have started fine.
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(300),
            reset_after: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before restart number `streak` (1 for the first) of a run of quick exits.
    pub fn delay(&self, streak: u32) -> Duration {
        let doublings = streak.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1 << doublings)
            .map_or(self.max, |d| d.min(self.max))
    }
}

/// What the supervisor does after the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Restart {
        after: Duration,
        /// The consecutive quick exits so far, this one included; pass it back with the next exit.
        streak: u32,
    },
    Stop(StopReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The restart policy is `no`.
    NoRestart,
    /// `on-failure` and the process exited 0.
    Succeeded,
    /// `on-failure:N` and the process failed more than N times in a row.
    GaveUp { failures: u32 },
    /// Restarting would fail the same way: the image variant cannot run here.
    WrongVariant(Classification),
}

/// After the process ended with `exit` having run `ran_for`, with `streak` quick exits before it (0 at first) and
/// the failure's [`classify`] result: restart after a delay, or stop and why.
pub fn restart(
    policy: RestartPolicy,
    exit: Exit,
    ran_for: Duration,
    streak: u32,
    classification: Option<&Classification>,
    backoff: &Backoff,
) -> Decision {
    if let Some(c) = classification {
        return Decision::Stop(StopReason::WrongVariant(c.clone()));
    }
    let streak = if ran_for >= backoff.reset_after {
        0
    } else {
        streak
    };
    match policy {
        RestartPolicy::No => return Decision::Stop(StopReason::NoRestart),
        RestartPolicy::OnFailure { .. } if exit.success() => {
            return Decision::Stop(StopReason::Succeeded);
        }
        RestartPolicy::OnFailure {
            max_retries: Some(max),
        } if streak >= max => {
            return Decision::Stop(StopReason::GaveUp {
                failures: streak + 1,
            });
        }
        _ => {}
    }
    let streak = streak.saturating_add(1);
    Decision::Restart {
        after: backoff.delay(streak),
        streak,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

/// A probe's outcome; a timeout counts as a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    Passed,
    Failed,
    TimedOut,
}

/// The container's health and its run of failed probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    pub health: Health,
    pub failures: u32,
}

impl Default for HealthState {
    fn default() -> HealthState {
        HealthState {
            health: Health::Starting,
            failures: 0,
        }
    }
}

impl HealthState {
    /// Docker's rules: a pass makes it healthy; a failure while still starting within the start period does not
    /// count; otherwise `retries` failures in a row make it unhealthy.
    pub fn observe(
        self,
        check: &HealthCheck,
        since_start: Duration,
        result: ProbeResult,
    ) -> HealthState {
        if result == ProbeResult::Passed {
            return HealthState {
                health: Health::Healthy,
                failures: 0,
            };
        }
        if self.health == Health::Starting && since_start < check.start_period {
            return self;
        }
        let failures = self.failures.saturating_add(1);
        let health = if failures >= check.retries.max(1) {
            Health::Unhealthy
        } else {
            self.health
        };
        HealthState { health, failures }
    }
}

/// Why a run failed, when it is something the supervisor can name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    pub kind: FailureKind,
    /// What matched: the exit, or the line of output or of the runtime's error.
    pub evidence: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The image's binaries need an architecture, instruction set or page size this device lacks.
    WrongVariant,
}

/// What is known about a failed run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Failure<'a> {
    pub exit: Option<Exit>,
    /// The runtime's error message, when create, start or exec failed.
    pub runtime_error: Option<&'a str>,
    /// The tail of the container's output.
    pub output: &'a str,
}

const SIGILL: i32 = 4;

/// Texts that only a binary built for another machine prints, each with why.
const WRONG_VARIANT_TEXTS: [(&str, &str); 6] = [
    // The kernel's ENOEXEC, as runc and shells spell it.
    (
        "exec format error",
        "the kernel cannot execute this architecture",
    ),
    ("enoexec", "the kernel cannot execute this architecture"),
    // Go's runtime/os_linux_arm.go checkgoarm, both messages (GOARM=6 or 7 on a CPU without VFP or VFPv3).
    (
        "this cpu has no vfpv3 floating point hardware",
        "a GOARM=7 Go binary on a CPU without VFPv3",
    ),
    (
        "this cpu has no floating point hardware",
        "a hard-float Go binary on a CPU without VFP",
    ),
    // Go's runtime/asm_amd64.s for GOAMD64=v2, v3 and v4.
    (
        "this program can only be run on amd64 processors with v",
        "a Go binary built for a higher x86-64 level than this CPU",
    ),
    // jemalloc built for 4 KiB pages on a 16 KiB-page kernel (Raspberry Pi 5).
    (
        "<jemalloc>: unsupported system page size",
        "jemalloc built for another page size",
    ),
];

/// Whether `f` shows the wrong image variant: SIGILL (or exit code 132, a shell's report of it), ENOEXEC, or one of
/// the messages runtimes print when the CPU lacks what they were built for. SIGSEGV and SIGBUS are left
/// unclassified: ordinary bugs cause them far more often than a wrong variant does.
pub fn classify(f: &Failure) -> Option<Classification> {
    let wrong = |evidence: String| {
        Some(Classification {
            kind: FailureKind::WrongVariant,
            evidence,
        })
    };
    match f.exit {
        Some(Exit::Signal(SIGILL)) => {
            return wrong("killed by SIGILL (an instruction this CPU does not have)".to_string());
        }
        Some(Exit::Code(132)) => {
            return wrong(
                "exit code 132 (128 + SIGILL: an instruction this CPU does not have)".to_string(),
            );
        }
        _ => {}
    }
    for text in f.runtime_error.into_iter().chain([f.output]) {
        for line in text.lines() {
            let lower = line.to_ascii_lowercase();
            if let Some((_, why)) = WRONG_VARIANT_TEXTS.iter().find(|(t, _)| lower.contains(t)) {
                let line: String = line.trim().chars().take(300).collect();
                return wrong(format!("{line} ({why})"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Probe;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn restart_decisions() {
        let b = Backoff::default();
        let on_failure = |n| RestartPolicy::OnFailure { max_retries: n };
        let restart_in = |ms, streak| Decision::Restart {
            after: MS(ms),
            streak,
        };
        let rows: &[(RestartPolicy, Exit, Duration, u32, Decision)] = &[
            (
                RestartPolicy::No,
                Exit::Code(1),
                S(1),
                0,
                Decision::Stop(StopReason::NoRestart),
            ),
            (
                RestartPolicy::No,
                Exit::Code(0),
                S(100),
                0,
                Decision::Stop(StopReason::NoRestart),
            ),
            (
                RestartPolicy::Always,
                Exit::Code(0),
                S(1),
                0,
                restart_in(100, 1),
            ),
            (
                RestartPolicy::Always,
                Exit::Code(1),
                S(1),
                1,
                restart_in(200, 2),
            ),
            (
                RestartPolicy::Always,
                Exit::Signal(9),
                S(1),
                4,
                restart_in(1600, 5),
            ),
            // Ran long enough: the backoff starts over.
            (
                RestartPolicy::Always,
                Exit::Code(1),
                S(10),
                9,
                restart_in(100, 1),
            ),
            // The cap: 100 ms * 2^12 > 300 s.
            (
                RestartPolicy::Always,
                Exit::Code(1),
                S(1),
                12,
                restart_in(300_000, 13),
            ),
            (
                RestartPolicy::Always,
                Exit::Code(1),
                S(1),
                u32::MAX,
                restart_in(300_000, u32::MAX),
            ),
            (
                on_failure(None),
                Exit::Code(0),
                S(1),
                3,
                Decision::Stop(StopReason::Succeeded),
            ),
            (on_failure(None), Exit::Code(2), S(1), 3, restart_in(800, 4)),
            (
                on_failure(Some(3)),
                Exit::Code(2),
                S(1),
                2,
                restart_in(400, 3),
            ),
            (
                on_failure(Some(3)),
                Exit::Code(2),
                S(1),
                3,
                Decision::Stop(StopReason::GaveUp { failures: 4 }),
            ),
            (
                on_failure(Some(3)),
                Exit::Signal(15),
                S(60),
                3,
                restart_in(100, 1),
            ),
            (
                on_failure(Some(0)),
                Exit::Code(1),
                S(1),
                0,
                Decision::Stop(StopReason::GaveUp { failures: 1 }),
            ),
        ];
        for (policy, exit, ran, streak, want) in rows {
            assert_eq!(
                restart(*policy, *exit, *ran, *streak, None, &b),
                *want,
                "{policy} {exit:?} ran {ran:?} after {streak}"
            );
        }
    }

    #[test]
    fn a_wrong_variant_is_not_restarted() {
        let c = classify(&Failure {
            exit: Some(Exit::Signal(SIGILL)),
            ..Failure::default()
        })
        .unwrap();
        let d = restart(
            RestartPolicy::Always,
            Exit::Signal(SIGILL),
            S(0),
            0,
            Some(&c),
            &Backoff::default(),
        );
        assert_eq!(d, Decision::Stop(StopReason::WrongVariant(c)));
    }

    #[test]
    fn health_transitions() {
        let mut check = HealthCheck::new(Probe::shell("true").unwrap());
        check.retries = 3;
        check.start_period = S(30);
        let st = |health, failures| HealthState { health, failures };
        use Health::*;
        use ProbeResult::*;
        let rows: &[(HealthState, Duration, ProbeResult, HealthState)] = &[
            (st(Starting, 0), S(5), Failed, st(Starting, 0)),
            (st(Starting, 0), S(5), TimedOut, st(Starting, 0)),
            (st(Starting, 0), S(5), Passed, st(Healthy, 0)),
            (st(Starting, 0), S(31), Failed, st(Starting, 1)),
            (st(Starting, 2), S(31), Failed, st(Unhealthy, 3)),
            (st(Healthy, 0), S(5), Failed, st(Healthy, 1)),
            (st(Healthy, 2), S(100), TimedOut, st(Unhealthy, 3)),
            (st(Unhealthy, 3), S(100), Failed, st(Unhealthy, 4)),
            (st(Unhealthy, 7), S(100), Passed, st(Healthy, 0)),
        ];
        for (before, since, result, after) in rows {
            assert_eq!(
                before.observe(&check, *since, *result),
                *after,
                "{before:?} {since:?} {result:?}"
            );
        }
        check.retries = 0;
        assert_eq!(
            st(Healthy, 0).observe(&check, S(100), Failed).health,
            Unhealthy
        );
        assert_eq!(HealthState::default(), st(Starting, 0));
    }

    #[test]
    fn wrong_variant_classification() {
        /// The exit, runc's error, the output, and the evidence wanted (None: not classified).
        type Row<'a> = (Option<Exit>, Option<&'a str>, &'a str, Option<&'a str>);
        let rows: &[Row] = &[
            (Some(Exit::Signal(4)), None, "", Some("SIGILL")),
            (Some(Exit::Code(132)), None, "", Some("exit code 132")),
            (
                None,
                Some(
                    "runc create failed: unable to start container process: exec: \"/app\": exec format error",
                ),
                "",
                Some("exec format error"),
            ),
            (
                Some(Exit::Code(126)),
                None,
                "/bin/sh: /app: cannot execute binary file: Exec format error",
                Some("Exec format error"),
            ),
            (
                Some(Exit::Code(1)),
                None,
                "standard_init_linux.go:228: exec user process caused: ENOEXEC",
                Some("ENOEXEC"),
            ),
            (
                Some(Exit::Code(1)),
                None,
                "starting\nruntime: this CPU has no VFPv3 floating point hardware, so it cannot run\nthis GOARM=7 binary. Recompile using GOARM=5 or GOARM=6.\n",
                Some("no VFPv3"),
            ),
            (
                Some(Exit::Code(1)),
                None,
                "runtime: this CPU has no floating point hardware, so it cannot run\n",
                Some("without VFP"),
            ),
            (
                Some(Exit::Code(1)),
                None,
                "This program can only be run on AMD64 processors with v3 microarchitecture support.\n",
                Some("x86-64 level"),
            ),
            (
                Some(Exit::Signal(6)),
                None,
                "<jemalloc>: Unsupported system page size\n",
                Some("page size"),
            ),
            // Not classified: ordinary crashes and failures.
            (Some(Exit::Signal(11)), None, "", None),
            (Some(Exit::Signal(7)), None, "", None),
            (
                Some(Exit::Code(1)),
                None,
                "error: config file not found",
                None,
            ),
            (Some(Exit::Code(139)), None, "", None),
            (
                None,
                Some("container_linux.go: no such file or directory"),
                "",
                None,
            ),
        ];
        for (exit, runtime_error, output, want) in rows {
            let got = classify(&Failure {
                exit: *exit,
                runtime_error: *runtime_error,
                output,
            });
            match (want, &got) {
                (None, None) => {}
                (Some(text), Some(c)) if c.evidence.contains(text) => {
                    assert_eq!(c.kind, FailureKind::WrongVariant);
                }
                _ => panic!("{exit:?} {runtime_error:?} {output:?}: want {want:?}, got {got:?}"),
            }
        }
    }
}
