//! The device's update state machine, as a plain function: `step(state, event) -> (state, actions)`.
//!
//! The agent persists the returned state *before* it carries out the actions, so a crash or a power cut at any
//! point leaves a state whose [`resume`] actions finish the job: every action is idempotent (prepare what is
//! prepared, stop what is stopped, start what runs). One update runs at a time; a new desire that arrives mid-way
//! is not queued here but offered again by the agent once the machine is back to [`State::Steady`]
//! ([`pending_desire`]), which keeps the machine level-triggered: what counts is the desire at that moment, not
//! the history of desires.
//!
//! The path of an update:
//! 1. `Preparing`: download, verify and unpack the target while the committed release keeps running.
//! 2. `Switching`: stop the committed release, start the target.
//! 3. `Probation`: the target must report healthy, and must not fail, until the probation time is over.
//! 4. `Steady` with the target committed.
//!
//! Any failure after the switch goes to `RollingBack`: stop the target, start the committed release again (it is
//! kept on disk until the next commit), and report why. A release that rolled back on this device is not tried again
//! until the fleet desires something else, or the same release at a higher attempt (the operator's retry), so a bad
//! release does not loop.

use std::time::Duration;

/// Seconds since the Unix epoch, passed in.
pub type Timestamp = u64;

/// A release as the device runs it: the fleet's id and the exact image it resolved to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Release {
    pub id: String,
    /// `registry/repo@sha256:…`: pinned, so a re-pushed tag changes nothing.
    pub image: String,
    /// The fleet's retry count for this release on this device ([`crate::fleet::DesiredApp::attempt`]): a release
    /// rejected here is tried again when it comes back with a higher attempt. Absent in states written before it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Release {
    /// The same release and image, whatever the attempt: running it already is running what is desired.
    fn same(a: &Option<Release>, b: &Option<Release>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => a.id == b.id && a.image == b.image,
            (None, None) => true,
            _ => false,
        }
    }

    /// The desire is the very order that failed here: the same release at the same attempt. A later attempt of
    /// it is the operator asking again, so it is tried.
    fn rejected_by(desired: &Option<Release>, rejected: &Option<Release>) -> bool {
        desired.is_some() && desired == rejected
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum State {
    Steady {
        committed: Option<Release>,
        /// The last release that failed here; not tried again while it is the desire.
        rejected: Option<Release>,
    },
    Preparing {
        committed: Option<Release>,
        target: Release,
    },
    Switching {
        committed: Option<Release>,
        target: Release,
    },
    Probation {
        committed: Option<Release>,
        target: Release,
        until: Timestamp,
        healthy: bool,
    },
    RollingBack {
        committed: Option<Release>,
        failed: Release,
        reason: String,
        wrong_variant: bool,
    },
}

impl State {
    /// The state's name in logs and in the agent's database.
    pub fn name(&self) -> &'static str {
        match self {
            State::Steady { .. } => "steady",
            State::Preparing { .. } => "preparing",
            State::Switching { .. } => "switching",
            State::Probation { .. } => "probation",
            State::RollingBack { .. } => "rolling-back",
        }
    }
}

impl State {
    pub fn initial() -> State {
        State::Steady {
            committed: None,
            rejected: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The fleet's desire for this app (None: no app).
    Desired(Option<Release>),
    Prepared,
    PrepareFailed {
        reason: String,
        cause: Option<FailureCause>,
    },
    /// The target's process runs.
    Started,
    /// The target could not be started, or ended, restarted or turned unhealthy during probation.
    Failed {
        reason: String,
        wrong_variant: bool,
    },
    /// The target's health check passed (sent at once when it has none).
    Healthy,
    /// The committed release runs again after a roll-back.
    RolledBack,
    Tick {
        now: Timestamp,
    },
}

/// Why a device refused a release before preparing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureCause {
    /// The device owner's policy (`[policy]`, or a signature policy) does not allow it; the reason names the
    /// setting.
    Policy,
    /// Its settings break the bounds every device checks (the reason names the field): the server should have
    /// refused them.
    Invalid,
}

/// What the fleet hears about an update.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Report {
    Preparing {
        release: String,
    },
    /// Could not even be prepared (no variant for this device, registry unreachable…); the old release runs on.
    PrepareFailed {
        release: String,
        reason: String,
        /// Set when the device refused the release on principle rather than failing to get it: the operator
        /// cannot fix it by trying again.
        #[serde(default)]
        cause: Option<FailureCause>,
    },
    Probation {
        release: String,
    },
    Committed {
        release: String,
    },
    RolledBack {
        release: String,
        to: Option<String>,
        reason: String,
        wrong_variant: bool,
    },
    Removed {
        release: String,
    },
}

impl Report {
    /// The release the report is about.
    pub fn release(&self) -> &str {
        match self {
            Report::Preparing { release }
            | Report::PrepareFailed { release, .. }
            | Report::Probation { release }
            | Report::Committed { release }
            | Report::RolledBack { release, .. }
            | Report::Removed { release } => release,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pull, verify and unpack.
    Prepare(Release),
    /// Make this release the one that runs: stop whatever else of the app runs, start it unless it already runs
    /// (adopting it), so the action can be repeated after a crash. `None` stops only.
    Run(Option<Release>),
    /// Record the release as committed, and drop what only the release before it needed.
    Commit(Release),
    /// Drop a release from disk (a rejected target).
    Discard(Release),
    Report(Report),
}

fn id(r: &Option<Release>) -> Option<String> {
    r.as_ref().map(|r| r.id.clone())
}

/// The event that a desire kept from before calls for now: a desire that arrived mid-update was dropped by
/// [`step`], and the fleet sends it only once (its long poll answers only changes), so the agent offers it again
/// whenever the app is steady. None when steady already matches it (or rejected it) or the app is mid-update.
pub fn pending_desire(state: &State, desired: &Option<Release>) -> Option<Event> {
    match state {
        State::Steady {
            committed,
            rejected,
        } if !Release::same(desired, committed) && !Release::rejected_by(desired, rejected) => {
            Some(Event::Desired(desired.clone()))
        }
        _ => None,
    }
}

/// One transition. `probation` is how long a started target must stay up and healthy before it is committed.
pub fn step(state: State, event: Event, probation: Duration) -> (State, Vec<Action>) {
    use Action as A;
    use Event as E;
    use State as S;
    match (state, event) {
        (
            S::Steady {
                committed,
                rejected,
            },
            E::Desired(desired),
        ) => {
            if Release::same(&desired, &committed) || Release::rejected_by(&desired, &rejected) {
                return (
                    S::Steady {
                        committed,
                        rejected,
                    },
                    vec![],
                );
            }
            match desired {
                None => {
                    let mut actions = vec![A::Run(None)];
                    if let Some(c) = &committed {
                        actions.push(A::Report(Report::Removed {
                            release: c.id.clone(),
                        }));
                    }
                    (
                        S::Steady {
                            committed: None,
                            rejected: None,
                        },
                        actions,
                    )
                }
                Some(target) => (
                    S::Preparing {
                        committed,
                        target: target.clone(),
                    },
                    vec![
                        A::Report(Report::Preparing {
                            release: target.id.clone(),
                        }),
                        A::Prepare(target),
                    ],
                ),
            }
        }
        (S::Preparing { committed, target }, E::Prepared) => (
            S::Switching {
                committed,
                target: target.clone(),
            },
            vec![A::Run(Some(target))],
        ),
        (S::Preparing { committed, target }, E::PrepareFailed { reason, cause }) => (
            S::Steady {
                committed,
                rejected: Some(target.clone()),
            },
            vec![
                A::Report(Report::PrepareFailed {
                    release: target.id.clone(),
                    reason,
                    cause,
                }),
                A::Discard(target),
            ],
        ),
        (S::Switching { committed, target }, E::Started) => (
            S::Probation {
                committed,
                target: target.clone(),
                // Filled by the first tick: the machine has no clock of its own.
                until: 0,
                healthy: false,
            },
            vec![A::Report(Report::Probation {
                release: target.id.clone(),
            })],
        ),
        (
            S::Probation {
                committed,
                target,
                until,
                ..
            },
            E::Healthy,
        ) => (
            S::Probation {
                committed,
                target,
                until,
                healthy: true,
            },
            vec![],
        ),
        (
            S::Probation {
                committed,
                target,
                until,
                healthy,
            },
            E::Tick { now },
        ) => {
            let until = if until == 0 {
                now.saturating_add(probation.as_secs())
            } else {
                until
            };
            if healthy && now >= until {
                (
                    S::Steady {
                        committed: Some(target.clone()),
                        rejected: None,
                    },
                    vec![
                        A::Commit(target.clone()),
                        A::Report(Report::Committed { release: target.id }),
                    ],
                )
            } else {
                (
                    S::Probation {
                        committed,
                        target,
                        until,
                        healthy,
                    },
                    vec![],
                )
            }
        }
        (
            S::Switching { committed, target }
            | S::Probation {
                committed, target, ..
            },
            E::Failed {
                reason,
                wrong_variant,
            },
        ) => (
            S::RollingBack {
                committed: committed.clone(),
                failed: target,
                reason,
                wrong_variant,
            },
            vec![A::Run(committed)],
        ),
        (
            S::RollingBack {
                committed,
                failed,
                reason,
                wrong_variant,
            },
            E::RolledBack,
        ) => (
            S::Steady {
                committed: committed.clone(),
                rejected: Some(failed.clone()),
            },
            vec![
                A::Report(Report::RolledBack {
                    release: failed.id.clone(),
                    to: id(&committed),
                    reason,
                    wrong_variant,
                }),
                A::Discard(failed),
            ],
        ),
        // Anything else changes nothing: a late report of an earlier run, a desire mid-update (seen again once
        // steady), a tick outside probation.
        (state, _) => (state, vec![]),
    }
}

/// What to do again after a restart in `state`: the actions of the step that led to it, all idempotent.
pub fn resume(state: &State) -> Vec<Action> {
    match state {
        State::Steady { committed, .. } => vec![Action::Run(committed.clone())],
        // The committed release runs while the target is prepared: after a reboot it must be started again.
        State::Preparing { committed, target } => vec![
            Action::Run(committed.clone()),
            Action::Prepare(target.clone()),
        ],
        State::Switching { target, .. } | State::Probation { target, .. } => {
            vec![Action::Run(Some(target.clone()))]
        }
        State::RollingBack { committed, .. } => vec![Action::Run(committed.clone())],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBATION: Duration = Duration::from_secs(60);

    fn r(id: &str) -> Release {
        Release {
            id: id.to_string(),
            image: format!("registry.local/app@sha256:{id}"),
            attempt: 0,
        }
    }

    fn retry(id: &str, attempt: u32) -> Release {
        Release { attempt, ..r(id) }
    }

    #[test]
    fn a_rejected_release_is_tried_again_only_at_a_higher_attempt() {
        let failed = |release: Release| {
            run(
                steady("v1"),
                vec![
                    Event::Desired(Some(release)),
                    Event::Prepared,
                    Event::Failed {
                        reason: "exit code 1".into(),
                        wrong_variant: false,
                    },
                    Event::RolledBack,
                ],
            )
            .0
        };
        let rejected = failed(r("v2"));
        assert_eq!(
            pending_desire(&rejected, &Some(r("v2"))),
            None,
            "the same order is not tried again"
        );
        let event = pending_desire(&rejected, &Some(retry("v2", 1))).expect("a retry is offered");
        let (next, actions) = step(rejected, event, PROBATION);
        assert!(
            matches!(&next, State::Preparing { target, .. } if *target == retry("v2", 1)),
            "{next:?}"
        );
        assert_eq!(actions.last(), Some(&Action::Prepare(retry("v2", 1))));
        // Failing again at attempt 1 rejects that attempt: it takes attempt 2 to try once more.
        let again = failed(retry("v2", 1));
        assert_eq!(pending_desire(&again, &Some(retry("v2", 1))), None);
        let (same, actions) = step(
            again.clone(),
            Event::Desired(Some(retry("v2", 1))),
            PROBATION,
        );
        assert_eq!((same, actions), (again.clone(), vec![]));
        assert!(pending_desire(&again, &Some(retry("v2", 2))).is_some());
        // A committed release is not updated again because its attempt changed: it runs what is desired.
        let committed = steady("v2");
        assert_eq!(pending_desire(&committed, &Some(retry("v2", 3))), None);
        let (same, actions) = step(
            committed.clone(),
            Event::Desired(Some(retry("v2", 3))),
            PROBATION,
        );
        assert_eq!((same, actions), (committed, vec![]));
        // States written before the field read as attempt 0, and attempt 0 is not written.
        let old: State = serde_json::from_str(
            r#"{"state":"steady","committed":{"id":"v1","image":"i"},"rejected":null}"#,
        )
        .unwrap();
        assert!(matches!(
            old,
            State::Steady {
                committed: Some(Release { attempt: 0, .. }),
                ..
            }
        ));
        assert!(
            !serde_json::to_string(&steady("v1"))
                .unwrap()
                .contains("attempt")
        );
    }

    #[test]
    fn a_desire_dropped_mid_update_is_offered_again_once_steady() {
        let desired = Some(r("d"));
        // Mid-update the desire is dropped by step, and not offered.
        let rolling = State::RollingBack {
            committed: Some(r("a")),
            failed: r("c"),
            reason: "crash".into(),
            wrong_variant: false,
        };
        let (after, actions) = step(rolling.clone(), Event::Desired(desired.clone()), PROBATION);
        assert_eq!((after, actions), (rolling.clone(), vec![]));
        assert_eq!(pending_desire(&rolling, &desired), None);
        // Back to steady, it is offered, and step acts on it.
        let (steady, _) = step(rolling, Event::RolledBack, PROBATION);
        let event = pending_desire(&steady, &desired).expect("offered again");
        let (next, _) = step(steady, event, PROBATION);
        assert!(matches!(next, State::Preparing { ref target, .. } if target.id == "d"));
        // Nothing to offer when steady matches the desire, or rejected it.
        assert_eq!(pending_desire(&steady_on("a"), &Some(r("a"))), None);
        let rejected = State::Steady {
            committed: Some(r("a")),
            rejected: Some(r("c")),
        };
        assert_eq!(pending_desire(&rejected, &Some(r("c"))), None);
        assert_eq!(pending_desire(&State::initial(), &None), None);
    }

    fn steady_on(c: &str) -> State {
        State::Steady {
            committed: Some(r(c)),
            rejected: None,
        }
    }

    fn run(mut state: State, events: Vec<Event>) -> (State, Vec<Action>) {
        let mut all = Vec::new();
        for e in events {
            let (s, actions) = step(state, e, PROBATION);
            state = s;
            all.extend(actions);
        }
        (state, all)
    }

    fn steady(c: &str) -> State {
        State::Steady {
            committed: Some(r(c)),
            rejected: None,
        }
    }

    #[test]
    fn an_update_prepares_switches_waits_out_probation_and_commits() {
        let (state, actions) = run(
            steady("v1"),
            vec![
                Event::Desired(Some(r("v2"))),
                Event::Prepared,
                Event::Started,
                Event::Healthy,
                Event::Tick { now: 1000 },
                Event::Tick { now: 1059 },
            ],
        );
        assert!(
            matches!(state, State::Probation { until: 1060, .. }),
            "{state:?}"
        );
        assert_eq!(
            actions,
            [
                Action::Report(Report::Preparing {
                    release: "v2".into()
                }),
                Action::Prepare(r("v2")),
                Action::Run(Some(r("v2"))),
                Action::Report(Report::Probation {
                    release: "v2".into()
                }),
            ]
        );
        let (state, actions) = step(state, Event::Tick { now: 1060 }, PROBATION);
        assert_eq!(state, steady("v2"));
        assert_eq!(
            actions,
            [
                Action::Commit(r("v2")),
                Action::Report(Report::Committed {
                    release: "v2".into()
                })
            ]
        );
    }

    #[test]
    fn probation_needs_health_not_only_time() {
        let (state, _) = run(
            steady("v1"),
            vec![
                Event::Desired(Some(r("v2"))),
                Event::Prepared,
                Event::Started,
                Event::Tick { now: 1000 },
                Event::Tick { now: 5000 },
            ],
        );
        assert!(
            matches!(state, State::Probation { healthy: false, .. }),
            "{state:?}"
        );
    }

    #[test]
    fn a_failure_after_the_switch_rolls_back_and_the_release_is_not_retried() {
        for failing_at in 0..2 {
            let mut events = vec![Event::Desired(Some(r("v2"))), Event::Prepared];
            if failing_at == 1 {
                events.extend([Event::Started, Event::Healthy, Event::Tick { now: 10 }]);
            }
            events.push(Event::Failed {
                reason: "exit code 132".into(),
                wrong_variant: true,
            });
            let (state, actions) = run(steady("v1"), events);
            assert!(matches!(state, State::RollingBack { .. }), "{state:?}");
            assert_eq!(actions.last(), Some(&Action::Run(Some(r("v1")))));
            let (state, actions) = step(state, Event::RolledBack, PROBATION);
            assert_eq!(
                state,
                State::Steady {
                    committed: Some(r("v1")),
                    rejected: Some(r("v2"))
                }
            );
            assert_eq!(
                actions[0],
                Action::Report(Report::RolledBack {
                    release: "v2".into(),
                    to: Some("v1".into()),
                    reason: "exit code 132".into(),
                    wrong_variant: true,
                })
            );
            let (again, actions) = step(state.clone(), Event::Desired(Some(r("v2"))), PROBATION);
            assert_eq!(again, state, "a rejected release is not tried again");
            assert!(actions.is_empty());
            let (next, _) = step(state, Event::Desired(Some(r("v3"))), PROBATION);
            assert!(matches!(next, State::Preparing { .. }), "a new release is");
        }
    }

    #[test]
    fn a_prepare_failure_keeps_the_old_release_running() {
        let (state, actions) = run(
            steady("v1"),
            vec![
                Event::Desired(Some(r("v2"))),
                Event::PrepareFailed {
                    reason: "no variant for linux/arm/v6".into(),
                    cause: None,
                },
            ],
        );
        assert_eq!(
            state,
            State::Steady {
                committed: Some(r("v1")),
                rejected: Some(r("v2"))
            }
        );
        assert!(
            !actions.iter().any(|a| matches!(a, Action::Run(_))),
            "{actions:?}"
        );
    }

    #[test]
    fn desires_mid_update_wait_and_late_events_change_nothing() {
        let (state, _) = run(
            steady("v1"),
            vec![Event::Desired(Some(r("v2"))), Event::Prepared],
        );
        let (same, actions) = step(state.clone(), Event::Desired(Some(r("v3"))), PROBATION);
        assert_eq!(same, state);
        assert!(actions.is_empty());
        let (same, actions) = step(steady("v1"), Event::Started, PROBATION);
        assert_eq!(same, steady("v1"));
        assert!(actions.is_empty());
        let (same, _) = step(steady("v1"), Event::Desired(Some(r("v1"))), PROBATION);
        assert_eq!(same, steady("v1"));
    }

    #[test]
    fn removing_the_app_stops_it() {
        let (state, actions) = step(steady("v1"), Event::Desired(None), PROBATION);
        assert_eq!(state, State::initial());
        assert_eq!(actions[0], Action::Run(None));
    }

    #[test]
    fn every_state_survives_a_restart_through_its_resume_actions() {
        let cases = [
            (steady("v1"), vec![Action::Run(Some(r("v1")))]),
            (
                State::Preparing {
                    committed: Some(r("v1")),
                    target: r("v2"),
                },
                vec![Action::Run(Some(r("v1"))), Action::Prepare(r("v2"))],
            ),
            (
                State::Switching {
                    committed: Some(r("v1")),
                    target: r("v2"),
                },
                vec![Action::Run(Some(r("v2")))],
            ),
            (
                State::Probation {
                    committed: Some(r("v1")),
                    target: r("v2"),
                    until: 5,
                    healthy: true,
                },
                vec![Action::Run(Some(r("v2")))],
            ),
            (
                State::RollingBack {
                    committed: Some(r("v1")),
                    failed: r("v2"),
                    reason: "x".into(),
                    wrong_variant: false,
                },
                vec![Action::Run(Some(r("v1")))],
            ),
        ];
        for (state, want) in cases {
            let json = serde_json::to_string(&state).unwrap();
            let back: State = serde_json::from_str(&json).unwrap();
            assert_eq!(back, state, "{json}");
            assert_eq!(resume(&back), want, "{json}");
        }
    }
}
