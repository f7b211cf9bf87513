//! Simulated power cuts, for tests only. Built with the `crash-points` feature, an agent started with
//! `FLOTILLA_CRASH_AT=N` aborts right after its Nth durable write (an agent.db commit, a file made whole), as a power
//! cut there would leave it, and with `FLOTILLA_CRASH_AT=NAME#K` after the Kth write named NAME (as the log names
//! them: `state probation`, `file status.json`). `FLOTILLA_CRASH_AT=0` only logs each write. `tests/crash_points.rs`
//! sweeps every write of an enrollment and of updates. Without the feature every call here is empty.

#[cfg(all(feature = "crash-points", not(debug_assertions)))]
compile_error!(
    "the crash-points feature aborts the agent on purpose: never build it with optimisations (a release)"
);

#[cfg(feature = "crash-points")]
mod armed {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Mutex, OnceLock};

    /// Where to abort: the Nth write (0: nowhere, only count), or the Kth write of one name. A sweep by name is
    /// the same from run to run; a number shifts with the timing of acknowledgements.
    enum Target {
        Nth(u64),
        Named(String, u64),
    }

    static TARGET: OnceLock<Target> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    static NAMED: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

    pub fn arm() {
        let Ok(v) = std::env::var("FLOTILLA_CRASH_AT") else {
            return;
        };
        let target = match v.rsplit_once('#') {
            Some((name, k)) => k.parse().ok().map(|k| Target::Named(name.to_string(), k)),
            None => v.parse().ok().map(Target::Nth),
        };
        match target {
            Some(t) => {
                let _ = TARGET.set(t);
            }
            None => eprintln!("FLOTILLA_CRASH_AT={v:?} is neither N nor NAME#K; no crash points"),
        }
    }

    pub fn passed(what: &dyn Fn() -> String) {
        let Some(target) = TARGET.get() else {
            return;
        };
        let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
        let name = what();
        let k = {
            let mut named = NAMED.lock().unwrap_or_else(|p| p.into_inner());
            let k = named
                .get_or_insert_with(HashMap::new)
                .entry(name.clone())
                .or_insert(0);
            *k += 1;
            *k
        };
        // Straight to stderr, unbuffered: the test reads which point it hit from the log of a process that aborts.
        eprintln!("crash point {n}: {name}#{k}");
        let hit = match target {
            Target::Nth(at) => n == *at,
            Target::Named(at, at_k) => name == *at && k == *at_k,
        };
        if hit {
            eprintln!("crash point {n}: aborting");
            std::process::abort();
        }
    }
}

/// Arms the crash points for this process (the agent; never a supervisor it starts).
pub fn arm() {
    #[cfg(feature = "crash-points")]
    armed::arm();
}

/// A durable write has completed; `what` names it for the test's coverage report.
#[inline]
pub fn passed(what: impl Fn() -> String) {
    #[cfg(feature = "crash-points")]
    armed::passed(&what);
    #[cfg(not(feature = "crash-points"))]
    let _ = what;
}
