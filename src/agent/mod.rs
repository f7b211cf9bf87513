//! `flotilla agent`: the daemon that keeps a device's apps at the fleet's desired releases.
//!
//! One loop owns the state. Each app has an update state ([`crate::update::State`]) in SQLite; every event goes
//! through the pure [`crate::update::step`], and the new state is written, durably, before its actions run, so a
//! crash or power cut at any point resumes with [`crate::update::resume`]'s idempotent actions. Pulls run as tasks
//! (they take minutes on a slow link; the loop keeps polling, reporting and pinging the watchdog meanwhile) and
//! come back as events. Reports go through the outbox: kept across reboots and days offline, sent in order, taken
//! once by the server by their ids.

pub mod apps;
pub mod db;
pub mod link;
pub mod metrics;
pub mod shutdown;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::config::FleetConfig;
use crate::fleet::{AppStatus, DesiredOrders, EnrollRequest, Event, EventBody, PlatformReport};
use crate::supervise::container::{State as CState, Status};
use crate::update::{self, Action, Release, State};
use apps::Apps;
use db::{AppRelease, Db, DbError};
use link::{Fetched, Link, LinkError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(
        "cannot read the enrollment token from {path}: {source}; put the token `flotilla-server token create` printed there, or set [fleet] token_file"
    )]
    Token {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// What the agent reports about the device when it enrolls and whenever its platform changes.
pub struct Identity {
    pub name: String,
    pub platform: PlatformReport,
}

pub struct Agent {
    db: Db,
    apps: Apps,
    fleet: FleetConfig,
    identity: Identity,
    link: Option<Link>,
    sampler: Box<dyn metrics::Sampler>,
    /// Pulls in flight, per app: their outcome becomes `Prepared` or `PrepareFailed`.
    preparing: HashMap<String, tokio::task::JoinHandle<Result<String, apps::AppsError>>>,
    /// The last status reported per app, so only changes are sent.
    reported: HashMap<String, AppStatus>,
    /// Apps whose release could not be started, with when to try again and the wait after that: a device
    /// without its server must still bring its committed release back once what stood in the way is gone.
    rerun: HashMap<String, (Instant, Duration)>,
    /// The fleet's last desire per app. The server answers a long poll only when the desire changed, so one that
    /// an app in mid-update could not take is kept here and offered again once the app is steady.
    wanted: BTreeMap<String, Option<Release>>,
    /// A test hook: stop (and wait to be killed) right after this update state is written.
    halt_at: Option<String>,
    seq: u64,
    /// Event times, probation, and every backoff and deadline of the loop.
    clock: Arc<dyn Clock>,
}

/// The event a container's status means for the app's update, if any: the pure part of watching an update.
pub fn observe(state: &State, status: Option<&Status>) -> Option<update::Event> {
    let failed = |reason: String, s: Option<&Status>| update::Event::Failed {
        reason,
        wrong_variant: s.is_some_and(|s| s.wrong_architecture.is_some()),
    };
    let why = |s: &Status| {
        if let Some(w) = &s.wrong_architecture {
            format!("wrong architecture variant: {}", w.evidence)
        } else {
            s.message
                .clone()
                .unwrap_or_else(|| s.state.as_str().to_string())
        }
    };
    match state {
        State::Switching { .. } => match status {
            Some(s) if s.state == CState::Running => Some(update::Event::Started),
            Some(s) if s.state.is_final() || s.state == CState::Restarting => {
                Some(failed(why(s), Some(s)))
            }
            None => Some(failed("the container is gone".into(), None)),
            _ => None,
        },
        State::Probation { healthy, .. } => match status {
            None => Some(failed("the container is gone".into(), None)),
            Some(s) if s.restarts > 0 || s.state != CState::Running => {
                Some(failed(format!("{} during probation", why(s)), Some(s)))
            }
            Some(s) if s.health.as_deref() == Some("unhealthy") => {
                Some(failed("unhealthy during probation".into(), Some(s)))
            }
            Some(s) if !healthy && matches!(s.health.as_deref(), None | Some("healthy")) => {
                Some(update::Event::Healthy)
            }
            _ => None,
        },
        _ => None,
    }
}

impl Agent {
    /// Wall-clock seconds since the epoch, as events and probation count them.
    fn now(&self) -> u64 {
        self.clock.unix_seconds()
    }

    /// Up to 50% more, so a fleet that lost its server does not come back in lockstep.
    fn jitter(&self, d: Duration) -> Duration {
        d + d.mul_f64(self.clock.random() * 0.5)
    }

    pub fn new(
        db: Db,
        apps: Apps,
        fleet: FleetConfig,
        identity: Identity,
        sampler: Box<dyn metrics::Sampler>,
        clock: Arc<dyn Clock>,
    ) -> Result<Agent, AgentError> {
        let link = match &fleet.server {
            Some(url) => Some(Link::new(
                url,
                apps.deploy.config.ca_bundle.as_deref(),
                fleet.poll_interval,
                fleet.insecure,
            )?),
            None => None,
        };
        Ok(Agent {
            db,
            apps,
            fleet,
            identity,
            link,
            sampler,
            preparing: HashMap::new(),
            reported: HashMap::new(),
            rerun: HashMap::new(),
            wanted: BTreeMap::new(),
            halt_at: std::env::var("FLOTILLA_TEST_HALT_AT").ok(),
            seq: 0,
            clock,
        })
    }

    /// Starts what the local state says should run, without the server: the offline boot.
    pub async fn boot(&mut self) -> Result<(), AgentError> {
        for app in self.db.apps()? {
            let state = self.db.app_state(&app)?;
            tracing::info!(app, state = state.name(), "resuming");
            for action in update::resume(&state) {
                self.execute(&app, &state, action).await?;
            }
        }
        Ok(())
    }

    fn event(&mut self, body: EventBody) -> Result<(), AgentError> {
        let event = self.new_event(body);
        self.db.push(&event)?;
        Ok(())
    }

    fn new_event(&mut self, body: EventBody) -> Event {
        self.seq += 1;
        let at = self.now();
        // Unique across restarts without a counter on disk: the time, this run's sequence and random bits.
        let id = format!("{at:x}-{:x}-{:08x}", self.seq, rand::random::<u32>());
        Event {
            id,
            at,
            seq: None,
            body,
        }
    }

    /// Feeds one event to an app's state machine: persist, then act.
    async fn apply(&mut self, app: &str, event: update::Event) -> Result<(), AgentError> {
        let state = self.db.app_state(app)?;
        match &event {
            update::Event::Failed { reason, .. } | update::Event::PrepareFailed { reason, .. } => {
                tracing::warn!(app, state = state.name(), "the update failed: {reason}");
            }
            _ => {}
        }
        let (next, actions) = update::step(state.clone(), event, self.fleet.probation);
        if next == state && actions.is_empty() {
            return Ok(());
        }
        // The reports the change owes are queued in the same transaction as the state: never one without the other.
        let (reports, actions): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::Report(_)));
        let reports: Vec<Event> = reports
            .into_iter()
            .filter_map(|a| match a {
                Action::Report(report) => Some(self.new_event(EventBody::Update {
                    app: app.to_string(),
                    report,
                })),
                _ => None,
            })
            .collect();
        self.db.transition(app, &next, &reports)?;
        if next.name() != state.name() {
            tracing::info!(app, from = state.name(), to = next.name(), "update state");
        }
        if self.halt_at.as_deref() == Some(next.name()) {
            tracing::warn!(
                app,
                "FLOTILLA_TEST_HALT_AT: halted after writing {}",
                next.name()
            );
            std::future::pending::<()>().await;
        }
        for action in actions {
            self.execute(app, &next, action).await?;
        }
        Ok(())
    }

    async fn execute(
        &mut self,
        app: &str,
        state: &State,
        action: Action,
    ) -> Result<(), AgentError> {
        match action {
            Action::Prepare(r) => {
                let Some(release) = self.db.release(&r.id)? else {
                    return Box::pin(self.apply(
                        app,
                        update::Event::PrepareFailed {
                            reason: format!("the release {} is unknown here", r.id),
                            cause: None,
                        },
                    ))
                    .await;
                };
                if !self.preparing.contains_key(app) {
                    let apps = self.apps.clone();
                    // On the blocking pool with the runtime's handle: the pull's future is not Send (its layer
                    // tasks borrow descriptors), so it cannot be a task of its own.
                    let handle = tokio::runtime::Handle::current();
                    self.preparing.insert(
                        app.to_string(),
                        tokio::task::spawn_blocking(move || {
                            handle.block_on(apps.prepare(&release))
                        }),
                    );
                }
            }
            Action::Run(target) => {
                let release = match &target {
                    Some(r) => self.db.release(&r.id)?,
                    None => None,
                };
                let result = match (&target, &release) {
                    (Some(r), None) => Err(apps::AppsError::UnknownRelease(r.id.clone())),
                    _ => tokio::task::block_in_place(|| self.apps.run(app, release.as_ref())),
                }
                // The state machine and the report carry the reason as text.
                .map_err(|e| crate::error_chain(&e));
                if result.is_ok() {
                    self.rerun.remove(app);
                }
                match (state, result) {
                    (State::RollingBack { .. }, Ok(())) => {
                        Box::pin(self.apply(app, update::Event::RolledBack)).await?;
                    }
                    (State::Switching { .. }, Err(reason)) => {
                        Box::pin(self.apply(
                            app,
                            update::Event::Failed {
                                reason,
                                wrong_variant: false,
                            },
                        ))
                        .await?;
                    }
                    (_, Err(reason)) => {
                        // Tried again with backoff (and on the next desire); the report says why meanwhile.
                        let wait = self
                            .rerun
                            .get(app)
                            .map_or(RERUN_FIRST, |(_, last)| (*last * 2).min(RERUN_MAX));
                        tracing::error!(
                            app,
                            "cannot run the release: {reason}; trying again in {wait:?}"
                        );
                        self.rerun.insert(
                            app.to_string(),
                            (self.clock.instant() + self.jitter(wait), wait),
                        );
                    }
                    _ => {}
                }
            }
            Action::Commit(r) => tracing::info!(app, release = r.id, "committed"),
            Action::Discard(r) => {
                tracing::info!(app, release = r.id, "rejected; it is not tried again")
            }
            Action::Report(report) => {
                self.event(EventBody::Update {
                    app: app.to_string(),
                    report,
                })?;
            }
        }
        Ok(())
    }

    /// A new desired state from the server: remember the releases, then tell every app, those no longer
    /// wanted included.
    async fn desire(&mut self, desired: &DesiredOrders) -> Result<(), AgentError> {
        // An order that does not read leaves its app as it is: refused and reported, never taken for "no app".
        for u in &desired.unreadable {
            tracing::warn!(
                app = u.name,
                release = u.release,
                "the fleet server's order does not read; the app stays as it is: {}",
                u.error
            );
            self.event(EventBody::Update {
                app: u.name.clone(),
                report: update::Report::PrepareFailed {
                    release: u.release.clone(),
                    reason: format!("the device cannot read the order: {}", u.error),
                    cause: Some(update::FailureCause::Invalid),
                },
            })?;
        }
        let mut wanted: BTreeMap<String, Option<Release>> = BTreeMap::new();
        for a in &desired.apps {
            let known = self.db.release(&a.release)?;
            let release = AppRelease {
                id: a.release.clone(),
                app: a.name.clone(),
                image: a.image.clone(),
                manifests: a.manifests.clone(),
                settings: a.settings.clone(),
                stored: known.and_then(|k| k.stored),
            };
            self.db.put_release(&release)?;
            wanted.insert(
                a.name.clone(),
                Some(Release {
                    id: a.release.clone(),
                    image: a.image.clone(),
                    attempt: a.attempt,
                }),
            );
        }
        let local: BTreeSet<String> = self.db.apps()?.into_iter().collect();
        for app in local {
            if !desired.unreadable.iter().any(|u| u.name == app) {
                wanted.entry(app).or_insert(None);
            }
        }
        self.wanted = wanted.clone();
        for (app, release) in wanted {
            self.apply(&app, update::Event::Desired(release)).await?;
        }
        Ok(())
    }

    /// Pulls that finished, container changes during updates, and the probation clock.
    async fn progress(&mut self) -> Result<(), AgentError> {
        let finished: Vec<String> = self
            .preparing
            .iter()
            .filter(|(_, h)| h.is_finished())
            .map(|(a, _)| a.clone())
            .collect();
        for app in finished {
            let Some(handle) = self.preparing.remove(&app) else {
                continue;
            };
            let outcome = handle.await.unwrap_or_else(|e| Err(e.into()));
            let event = match outcome {
                Ok(stored) => {
                    if let State::Preparing { target, .. } = self.db.app_state(&app)? {
                        if let Some(mut r) = self.db.release(&target.id)? {
                            r.stored = Some(stored);
                            self.db.put_release(&r)?;
                        }
                    }
                    update::Event::Prepared
                }
                Err(e) => update::Event::PrepareFailed {
                    cause: e.cause(),
                    reason: crate::error_chain(&e),
                },
            };
            self.apply(&app, event).await?;
        }
        let due: Vec<String> = self
            .rerun
            .iter()
            .filter(|(_, (at, _))| self.clock.instant() >= *at)
            .map(|(app, _)| app.clone())
            .collect();
        for app in due {
            let state = self.db.app_state(&app)?;
            // Only the run: a pull that failed has its own retry, through the next desired state.
            for action in update::resume(&state) {
                if matches!(action, Action::Run(_)) {
                    self.execute(&app, &state, action).await?;
                }
            }
        }
        for app in self.db.apps()? {
            let state = self.db.app_state(&app)?;
            let status = self.apps.status(&app).map(|(s, _, _)| s);
            if let Some(e) = observe(&state, status.as_ref()) {
                self.apply(&app, e).await?;
            }
            if matches!(self.db.app_state(&app)?, State::Probation { .. }) {
                let now = self.now();
                self.apply(&app, update::Event::Tick { now }).await?;
            }
        }
        for (app, desired) in self.wanted.clone() {
            if let Some(event) = update::pending_desire(&self.db.app_state(&app)?, &desired) {
                tracing::info!(
                    app,
                    "taking the desired state that arrived during the last update"
                );
                self.apply(&app, event).await?;
            }
        }
        Ok(())
    }

    fn busy(&self) -> Result<bool, AgentError> {
        Ok(!self.preparing.is_empty()
            || self
                .db
                .apps()?
                .iter()
                .map(|a| self.db.app_state(a))
                .collect::<Result<Vec<_>, _>>()?
                .iter()
                .any(|s| !matches!(s, State::Steady { .. } | State::Preparing { .. })))
    }

    /// App statuses that changed since they were last reported.
    fn report_apps(&mut self) -> Result<(), AgentError> {
        for app in self.db.apps()? {
            let state = self.db.app_state(&app)?;
            let release = match &state {
                State::Steady { committed, .. }
                | State::Preparing { committed, .. }
                | State::RollingBack { committed, .. } => committed.as_ref().map(|r| r.id.clone()),
                State::Switching { target, .. } | State::Probation { target, .. } => {
                    Some(target.id.clone())
                }
            };
            let observed = self.apps.status(&app);
            let status = AppStatus {
                app: app.clone(),
                release,
                manifest: observed.as_ref().map(|(_, d, _)| d.clone()),
                platform: observed.as_ref().map(|(_, _, p)| p.clone()),
                state: observed
                    .as_ref()
                    .map(|(s, _, _)| s.state.as_str().to_string())
                    .unwrap_or_else(|| "absent".into()),
                restarts: observed.as_ref().map(|(s, _, _)| s.restarts).unwrap_or(0),
                health: observed.as_ref().and_then(|(s, _, _)| s.health.clone()),
                wrong_variant: observed
                    .as_ref()
                    .and_then(|(s, _, _)| s.wrong_architecture.as_ref())
                    .map(|w| w.evidence.clone()),
            };
            if self.reported.get(&app) != Some(&status) {
                self.event(EventBody::App(status.clone()))?;
                self.reported.insert(app, status);
            }
        }
        Ok(())
    }

    async fn credential(&mut self) -> Result<Option<String>, AgentError> {
        let Some(link) = &self.link else {
            return Ok(None);
        };
        if let Some(c) = self.db.identity("credential")? {
            return Ok(Some(c));
        }
        let token = std::fs::read_to_string(&self.fleet.token_file).map_err(|source| {
            AgentError::Token {
                path: self.fleet.token_file.clone(),
                source,
            }
        })?;
        // Drawn and stored before the first try: every retry, across restarts too, sends the same id, so a reply
        // lost on the way gets this device's credential back instead of a refusal.
        let enrollment_id = match self.db.identity("enrollment_id")? {
            Some(id) => id,
            None => {
                let id = EnrollRequest::new_enrollment_id();
                self.db.set_identity("enrollment_id", &id)?;
                id
            }
        };
        let enrolled = link
            .enroll(
                token.trim(),
                &EnrollRequest {
                    name: self.identity.name.clone(),
                    tags: self.fleet.tags.clone(),
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    platform: self.identity.platform.clone(),
                    enrollment_id: Some(enrollment_id),
                },
            )
            .await?;
        self.db.set_identities(&[
            ("device_id", &enrolled.device_id),
            ("credential", &enrolled.credential),
        ])?;
        tracing::info!(
            device = enrolled.device_id,
            name = self.identity.name,
            "enrolled"
        );
        self.forget_token();
        Ok(Some(enrolled.credential))
    }

    /// Deletes the enrollment token once the credential is stored (`set_identities` is durable): a token left on
    /// the device could enroll another one while it lasts. Failing to delete it costs nothing here, so it is a
    /// warning. An agent cut off between the two steps finds the file at its next start and deletes it then.
    fn forget_token(&self) {
        let path = &self.fleet.token_file;
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(
                path = %path.display(),
                "deleted the enrollment token file: this device has its own credential now"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(
                path = %path.display(),
                "cannot delete the enrollment token file, which is not needed any more: {e}; delete it by hand"
            ),
        }
    }

    /// Sends the outbox, oldest first; what the server took leaves it.
    async fn flush(&mut self, credential: &str) -> Result<(), AgentError> {
        let Some(link) = self.link.clone() else {
            return Ok(());
        };
        for _ in 0..20 {
            let events = self.db.pending(500)?;
            if events.is_empty() {
                break;
            }
            let db = &self.db;
            deliver(
                events,
                |batch| link.report(credential, batch),
                |accepted| db.acknowledge(accepted),
                |id, reason| {
                    tracing::warn!(event = id, "the fleet server refused this report on its own, so it is kept aside in the dead_letter table: {reason}");
                    db.dead_letter(id, reason)
                },
            )
            .await?;
        }
        Ok(())
    }

    /// The loop; returns only on an error that retrying cannot fix.
    pub async fn run(mut self) -> Result<(), AgentError> {
        if self.link.is_some() && self.db.identity("credential")?.is_some() {
            self.forget_token();
        }
        let platform_json = serde_json::to_string(&self.identity.platform).unwrap_or_default();
        if self.db.identity("platform")?.as_deref() != Some(platform_json.as_str()) {
            self.event(EventBody::Platform(self.identity.platform.clone()))?;
            self.db.set_identity("platform", &platform_json)?;
        }
        let mut etag: Option<String> = None;
        let mut poll: Option<tokio::task::JoinHandle<Result<Fetched, LinkError>>> = None;
        let clock = self.clock.clone();
        let mut next_heartbeat = clock.instant();
        let mut backoff = Duration::from_secs(1);
        let mut retry_at = clock.instant();
        loop {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            if clock.instant() >= next_heartbeat {
                let mut m = self.sampler.sample();
                m.dead_letters = Some(self.db.dead_letters()?).filter(|n| *n > 0);
                let (pending, age) = outbox_lag(self.db.outbox_backlog()?, self.now());
                m.outbox_pending = Some(pending);
                m.outbox_oldest_age_secs = Some(age);
                self.event(EventBody::Heartbeat(m))?;
                next_heartbeat =
                    crate::clock::after(clock.instant(), self.fleet.heartbeat_interval);
            }
            let busy = self.busy()?;
            let credential = if clock.instant() >= retry_at {
                match self.credential().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("{}", crate::error_chain(&e));
                        retry_at = clock.instant() + self.jitter(backoff);
                        backoff =
                            (backoff * 2).min(self.fleet.poll_interval.max(Duration::from_secs(1)));
                        None
                    }
                }
            } else {
                None
            };
            if let (Some(link), Some(cred)) = (self.link.clone(), credential.clone()) {
                if poll.is_none() {
                    // While an update is under way the loop ticks every second: no long poll then.
                    // Jittered, so devices that came up together do not keep polling in step.
                    let wait = if busy {
                        Duration::ZERO
                    } else {
                        self.fleet.poll_interval.mul_f64(0.8 + 0.2 * clock.random())
                    };
                    let tag = etag.clone();
                    poll = Some(tokio::spawn(async move {
                        link.desired(&cred, tag.as_deref(), wait).await
                    }));
                }
            }
            let tick = if busy || !self.preparing.is_empty() {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(5)
            };
            let fetched = match poll.as_mut() {
                Some(p) => tokio::select! {
                    r = p => { poll = None; Some(r) }
                    _ = clock.sleep(tick) => None,
                },
                None => {
                    clock.sleep(tick).await;
                    None
                }
            };
            match fetched {
                Some(Ok(Ok(Fetched::Changed { desired, etag: tag }))) => {
                    backoff = Duration::from_secs(1);
                    self.desire(&desired).await?;
                    etag = tag;
                }
                Some(Ok(Ok(Fetched::Unchanged))) => backoff = Duration::from_secs(1),
                Some(Ok(Err(e))) => {
                    if e.is_unauthorized() {
                        tracing::error!(
                            "the fleet server refused this device's credential (revoked?): {e}"
                        );
                    } else {
                        tracing::warn!("{}", crate::error_chain(&e));
                    }
                    // A server that asked for a pause gets at least that.
                    retry_at = clock.instant()
                        + self
                            .jitter(backoff)
                            .max(e.retry_after().unwrap_or_default());
                    backoff =
                        (backoff * 2).min(self.fleet.poll_interval.max(Duration::from_secs(1)));
                }
                Some(Err(e)) => tracing::warn!("the poll task failed: {e}"),
                None => {}
            }
            self.progress().await?;
            self.report_apps()?;
            if let Some(cred) = &credential {
                if let Err(e) = self.flush(cred).await {
                    tracing::warn!("reports stay queued: {}", crate::error_chain(&e));
                    if let AgentError::Link(l) = &e {
                        if let Some(wait) = l.retry_after() {
                            retry_at = retry_at.max(clock.instant() + wait);
                        }
                    }
                }
            }
        }
    }
}

/// Sends `events` in order. A batch whose content the server refuses is split in halves, down to the single event,
/// so one event the server cannot take (a newer agent's, say) is set aside with `dead_letter` and the others flow
/// around it; before, the whole batch was sent again for ever and the outbox never moved. At most 2n requests for
/// n events. Any other failure stops the delivery: it is retried later as it is.
async fn deliver<F, Fut>(
    events: Vec<Event>,
    mut send: F,
    mut acknowledge: impl FnMut(&[String]) -> Result<(), DbError>,
    mut dead_letter: impl FnMut(&str, &str) -> Result<(), DbError>,
) -> Result<(), AgentError>
where
    F: FnMut(Vec<Event>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, LinkError>>,
{
    // Batches still to send, the next one last.
    let mut pending = vec![events];
    while let Some(batch) = pending.pop() {
        let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
        match send(batch.clone()).await {
            Ok(accepted) => acknowledge(&accepted)?,
            Err(e) if e.is_refused_content() && batch.len() == 1 => {
                dead_letter(&ids[0], &e.to_string())?;
            }
            Err(e) if e.is_refused_content() => {
                let mut first = batch;
                let second = first.split_off(first.len() / 2);
                pending.push(second);
                pending.push(first);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The first wait before a release that could not be started is tried again, and the longest.
const RERUN_FIRST: Duration = Duration::from_secs(2);
const RERUN_MAX: Duration = Duration::from_secs(300);

/// What a heartbeat says of the outbox it joins, from [`db::Db::outbox_backlog`]: the reports waiting, itself
/// included, and how long the oldest has waited (none waiting: no lag; a clock stepped back: none either).
fn outbox_lag((pending, oldest): (u64, Option<u64>), now: u64) -> (u64, u64) {
    (
        pending.saturating_add(1),
        oldest.map_or(0, |at| now.saturating_sub(at)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervise::container::ArchFailure;

    #[test]
    fn a_heartbeat_counts_itself_and_dates_the_oldest_waiting_report() {
        assert_eq!(outbox_lag((0, None), 1_000), (1, 0));
        assert_eq!(outbox_lag((5, Some(940)), 1_000), (6, 60));
        // NTP stepped the clock back past the oldest report.
        assert_eq!(outbox_lag((2, Some(2_000)), 1_000), (3, 0));
    }

    fn r(id: &str) -> Release {
        Release {
            id: id.into(),
            image: format!("reg/app@{id}"),
            attempt: 0,
        }
    }

    fn status(state: CState, restarts: u32, health: Option<&str>) -> Status {
        Status {
            state,
            restarts,
            health: health.map(str::to_string),
            ..Status::default()
        }
    }

    #[tokio::test]
    async fn a_refused_event_is_set_aside_and_the_others_are_delivered_around_it() {
        use std::cell::RefCell;
        let event = |id: &str| Event {
            id: id.into(),
            at: 0,
            seq: None,
            body: EventBody::Heartbeat(Default::default()),
        };
        let ids = ["e1", "e2", "e3", "bad", "e5", "e6", "e7"];
        let requests = RefCell::new(0);
        let acknowledged = RefCell::new(Vec::new());
        let dead = RefCell::new(Vec::new());
        deliver(
            ids.iter().map(|i| event(i)).collect(),
            |batch: Vec<Event>| {
                *requests.borrow_mut() += 1;
                let refused = batch.iter().any(|e| e.id == "bad");
                async move {
                    if refused {
                        Err(LinkError::Refused {
                            what: "the reports",
                            status: 422,
                            message: "unknown variant".into(),
                        })
                    } else {
                        Ok(batch.into_iter().map(|e| e.id).collect())
                    }
                }
            },
            |ids| {
                acknowledged.borrow_mut().extend_from_slice(ids);
                Ok(())
            },
            |id, reason| {
                dead.borrow_mut().push((id.to_string(), reason.to_string()));
                Ok(())
            },
        )
        .await
        .unwrap();
        assert_eq!(
            *acknowledged.borrow(),
            ["e1", "e2", "e3", "e5", "e6", "e7"],
            "every other event, in order"
        );
        assert_eq!(dead.borrow().len(), 1);
        assert_eq!(dead.borrow()[0].0, "bad");
        assert!(dead.borrow()[0].1.contains("unknown variant"));
        assert!(*requests.borrow() <= 2 * ids.len(), "{}", requests.borrow());

        // A failure that is not about the content (the server is down, or its database is) stops the delivery
        // with nothing set aside and nothing taken from the outbox.
        let down = || LinkError::Unreachable {
            url: "https://fleet".into(),
            message: "refused".into(),
        };
        let database_away = || LinkError::Unavailable {
            what: "the reports",
            message: "the fleet database is unreachable just now".into(),
            retry_after: Duration::from_secs(5),
        };
        for failure in [&down as &dyn Fn() -> LinkError, &database_away] {
            let dead = RefCell::new(0);
            let acknowledged = RefCell::new(0);
            let result = deliver(
                vec![event("e1"), event("e2")],
                |_| async { Err(failure()) },
                |_| {
                    *acknowledged.borrow_mut() += 1;
                    Ok(())
                },
                |_, _| {
                    *dead.borrow_mut() += 1;
                    Ok(())
                },
            )
            .await;
            assert!(result.is_err());
            assert_eq!((*dead.borrow(), *acknowledged.borrow()), (0, 0));
        }
    }

    #[test]
    fn container_changes_become_update_events() {
        let switching = State::Switching {
            committed: None,
            target: r("b"),
        };
        let probation = |healthy| State::Probation {
            committed: Some(r("a")),
            target: r("b"),
            until: 10,
            healthy,
        };
        let running = status(CState::Running, 0, None);
        assert_eq!(
            observe(&switching, Some(&running)),
            Some(update::Event::Started)
        );
        assert_eq!(
            observe(&switching, Some(&status(CState::Created, 0, None))),
            None
        );
        assert!(matches!(
            observe(&switching, Some(&status(CState::Failed, 0, None))),
            Some(update::Event::Failed { .. })
        ));
        assert_eq!(
            observe(&probation(false), Some(&running)),
            Some(update::Event::Healthy)
        );
        assert_eq!(observe(&probation(true), Some(&running)), None);
        assert_eq!(
            observe(
                &probation(false),
                Some(&status(CState::Running, 0, Some("starting")))
            ),
            None
        );
        assert_eq!(
            observe(
                &probation(false),
                Some(&status(CState::Running, 0, Some("healthy")))
            ),
            Some(update::Event::Healthy)
        );
        assert!(matches!(
            observe(
                &probation(true),
                Some(&status(CState::Running, 0, Some("unhealthy")))
            ),
            Some(update::Event::Failed { .. })
        ));
        assert!(matches!(
            observe(&probation(true), Some(&status(CState::Running, 1, None))),
            Some(update::Event::Failed { .. })
        ));
        let mut sigill = status(CState::Restarting, 1, None);
        sigill.wrong_architecture = Some(ArchFailure {
            evidence: "SIGILL".into(),
            host: "linux/arm/v6".into(),
        });
        assert_eq!(
            observe(&probation(true), Some(&sigill)),
            Some(update::Event::Failed {
                reason: "wrong architecture variant: SIGILL during probation".into(),
                wrong_variant: true
            })
        );
        assert!(matches!(
            observe(&probation(true), None),
            Some(update::Event::Failed { .. })
        ));
        assert_eq!(observe(&State::initial(), None), None);
    }
}
