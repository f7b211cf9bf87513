//! One storage conformance suite: the same scenarios on SQLite and on PostgreSQL, asserting the same outcomes, and
//! the dashboard's and /metrics' reads compared between the two engines on the fleet the scenarios built.
//!
//! PostgreSQL is a throwaway cluster per test (tests/common/postgres.rs) with a database of its own per engine
//! store. Every scenario runs on the test's own thread, which is no async worker: a pool's `conn()` blocks.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use flotilla::fleet::{
    AppStatus, EnrollRequest, Enrolled, Event, EventBody, Metrics, PlatformReport,
};
use flotilla::server::api::Server;
use flotilla::server::dashboard::cause::DeviceState;
use flotilla::server::dashboard::devices::{DeviceList, Filter, Seen};
use flotilla::server::dashboard::releases::Coverage;
use flotilla::server::resolve::{ResolveError, Resolved, Resolver};
use flotilla::server::store::sqlite::SqliteConn;
use flotilla::server::store::{Conn, DbUrl, PgPool, ServerDb, ServerDbError};
use flotilla::server::views::{
    AppRequest, Control, OPERATOR_PAUSE, RolloutRequest, RolloutView, StateView,
};
use flotilla::update::Report;

mod common;

use common::postgres::Cluster;

/// Every scenario's clock: seconds since the epoch, passed as `now`.
const NOW: u64 = 1_800_000_000;

/// Where a store's data lives; dropped after every `ServerDb` on it.
enum Place {
    Sqlite(tempfile::TempDir),
    Postgres {
        pool: PgPool,
        url: String,
        // Dropped after the pool: the cluster stops last.
        _cluster: Arc<Cluster>,
    },
}

/// One engine's fleet database, and a runtime for what is async (the pool's connect, the server's flush).
struct Store {
    place: Place,
    rt: tokio::runtime::Runtime,
}

impl Store {
    fn name(&self) -> &'static str {
        match self.place {
            Place::Sqlite(_) => "sqlite",
            Place::Postgres { .. } => "postgres",
        }
    }

    /// A bare connection, for writing rows directly (what a flush would write, at chosen times).
    fn conn(&self) -> Box<dyn Conn> {
        match &self.place {
            Place::Sqlite(dir) => Box::new(SqliteConn::open(&dir.path().join("fleet.db")).unwrap()),
            Place::Postgres { pool, .. } => Box::new(pool.conn().unwrap()),
        }
    }

    /// A new `ServerDb` on this store: a connection of its own, as each replica or reader has.
    fn db(&self) -> ServerDb {
        match &self.place {
            Place::Sqlite(dir) => {
                ServerDb::open(&dir.path().join("fleet.db")).expect("open SQLite")
            }
            Place::Postgres { pool, url, .. } => {
                let conn = pool
                    .conn()
                    .unwrap_or_else(|e| panic!("a connection to {url}: {e}"));
                ServerDb::on(Box::new(conn), url.clone(), Default::default())
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn sqlite() -> Store {
    let dir = tempfile::tempdir().unwrap();
    ServerDb::open(&dir.path().join("fleet.db")).expect("a SQLite fleet database");
    Store {
        place: Place::Sqlite(dir),
        rt: runtime(),
    }
}

/// A database of its own in `cluster`, migrated by the pool's connect.
fn postgres(cluster: &Arc<Cluster>, database: &str) -> Store {
    cluster.psql(
        "postgres",
        &format!(
            "CREATE DATABASE {database} OWNER {} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' \
             LOCALE 'C.UTF-8'",
            common::postgres::USER
        ),
    );
    let url = cluster.url().replace(
        &format!("/{}?", common::postgres::DATABASE),
        &format!("/{database}?"),
    );
    let DbUrl::Postgres(pg) = url.parse::<DbUrl>().expect("a PostgreSQL URL") else {
        panic!("{url} is no PostgreSQL URL");
    };
    let rt = runtime();
    let pool = rt
        .block_on(PgPool::connect(&pg, 4))
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    Store {
        place: Place::Postgres {
            url: pool.url().to_string(),
            pool,
            _cluster: cluster.clone(),
        },
        rt,
    }
}

/// SQLite, and PostgreSQL unless it is not installed (which `FLOTILLA_REQUIRE_ALL=1` makes a failure).
fn engines() -> Vec<Store> {
    let mut stores = vec![sqlite()];
    if let Some(cluster) = Cluster::start() {
        stores.push(postgres(&Arc::new(cluster), "conformance"));
    }
    stores
}

/// Runs `scenario` on every engine, naming the engine in a failure.
fn on_each(scenario: fn(&Store)) {
    for store in engines() {
        let name = store.name();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(&store)));
        if let Err(e) = outcome {
            eprintln!("the scenario failed on {name}");
            std::panic::resume_unwind(e);
        }
    }
}

fn request(name: &str, candidates: &[&str], enrollment_id: Option<&str>) -> EnrollRequest {
    EnrollRequest {
        name: name.to_string(),
        tags: [("site".to_string(), "north".to_string())].into(),
        agent_version: "0.1.0".into(),
        platform: PlatformReport {
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
            page_size: Some(4096),
            description: format!("{name}'s board"),
        },
        enrollment_id: enrollment_id.map(str::to_string),
    }
}

fn token(db: &ServerDb, expires: Option<u64>, uses: Option<u32>, tags: &[(&str, &str)]) -> String {
    let tags = tags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    db.create_token(expires, uses, &tags, true, NOW)
        .unwrap()
        .token
}

/// Enrolls `name` in the fleet its name starts with (`w-a` in `w`), which rollouts select.
fn enroll(db: &ServerDb, name: &str, candidates: &[&str]) -> Enrolled {
    let fleet = name.split('-').next().unwrap_or(name);
    let t = token(db, None, Some(1), &[("fleet", fleet)]);
    db.enroll(&t, &request(name, candidates, None), NOW)
        .unwrap_or_else(|e| panic!("enroll {name}: {e}"))
}

fn event(id: &str, seq: u64, body: EventBody) -> Event {
    Event {
        id: id.to_string(),
        at: NOW + seq,
        seq: Some(seq),
        body,
    }
}

fn update(app: &str, report: Report) -> EventBody {
    EventBody::Update {
        app: app.to_string(),
        report,
    }
}

fn app_status(app: &str, release: &str, state: &str) -> EventBody {
    EventBody::App(AppStatus {
        app: app.to_string(),
        release: Some(release.to_string()),
        manifest: None,
        platform: None,
        state: state.to_string(),
        restarts: 0,
        health: None,
        wrong_variant: None,
    })
}

fn device_row(db: &ServerDb, name: &str) -> flotilla::server::views::DeviceView {
    db.devices()
        .unwrap()
        .into_iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no device {name}"))
}

// --- 1. enrollment ---

fn enrollment(store: &Store) {
    let db = store.db();
    // Uses are counted, and a used-up token is refused.
    let two = token(&db, Some(NOW + 3600), Some(2), &[("site", "south")]);
    db.enroll(&two, &request("e-a", &["linux/arm64"], None), NOW)
        .unwrap();
    let listed = db.tokens().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].uses_left, listed[0].enrolled), (Some(1), 1));
    db.enroll(&two, &request("e-b", &["linux/arm64"], None), NOW)
        .unwrap();
    let err = db
        .enroll(&two, &request("e-c", &["linux/arm64"], None), NOW)
        .unwrap_err();
    assert!(matches!(err, ServerDbError::TokenUsedUp(_)), "{err}");
    assert_eq!(db.tokens().unwrap()[0].uses_left, Some(0));
    // The token's tags win over the device's; the device's own are kept beside them.
    let a = device_row(&db, "e-a");
    assert_eq!(a.tags.get("site").map(String::as_str), Some("south"));

    // Expiry: at the instant it expires the token is refused.
    let expiring = token(&db, Some(NOW + 10), None, &[]);
    db.enroll(&expiring, &request("e-d", &["linux/arm64"], None), NOW + 9)
        .unwrap();
    let err = db
        .enroll(&expiring, &request("e-e", &["linux/arm64"], None), NOW + 10)
        .unwrap_err();
    assert!(matches!(err, ServerDbError::TokenExpired { .. }), "{err}");

    // An unknown token.
    let err = db
        .enroll(
            "no-such-token",
            &request("e-f", &["linux/arm64"], None),
            NOW,
        )
        .unwrap_err();
    assert!(matches!(err, ServerDbError::BadToken), "{err}");

    // Idempotent enrollment: the same token and id get the same device and credential, even once used up.
    let once = token(&db, None, Some(1), &[]);
    let req = request("e-idem", &["linux/arm/v6"], Some("enrollment-id-of-e-idem"));
    let first = db.enroll(&once, &req, NOW).unwrap();
    let again = db.enroll(&once, &req, NOW + 5).unwrap();
    assert_eq!(first, again);
    // Another token with that id is refused, and learns nothing.
    let other = token(&db, None, None, &[]);
    let err = db.enroll(&other, &req, NOW).unwrap_err();
    assert!(matches!(err, ServerDbError::BadToken), "{err}");
    // Another name with that id is no retry.
    let renamed = request(
        "e-idem-2",
        &["linux/arm/v6"],
        Some("enrollment-id-of-e-idem"),
    );
    let err = db.enroll(&once, &renamed, NOW).unwrap_err();
    assert!(matches!(err, ServerDbError::EnrolledAlready(_)), "{err}");
    // Once the credential is used, the retry is over.
    assert_eq!(
        db.authenticate(&first.credential, NOW + 6).unwrap(),
        Some(first.device_id.clone())
    );
    let err = db.enroll(&once, &req, NOW + 7).unwrap_err();
    assert!(matches!(err, ServerDbError::EnrolledAlready(_)), "{err}");

    // A name taken by a live device is refused.
    let err = db
        .enroll(&other, &request("e-a", &["linux/arm64"], None), NOW)
        .unwrap_err();
    assert!(matches!(err, ServerDbError::NameTaken(_)), "{err}");
    // A revoked device's name is free, and the old row keeps its history under another name.
    assert!(db.revoke(&a.id).unwrap());
    let reused = db
        .enroll(&other, &request("e-a", &["linux/arm/v7"], None), NOW + 20)
        .unwrap();
    assert_ne!(reused.device_id, a.id);
    let devices = db.devices().unwrap();
    let named: Vec<(&str, bool)> = devices
        .iter()
        .filter(|d| d.name.starts_with("e-a"))
        .map(|d| (d.name.as_str(), d.revoked))
        .collect();
    let old_name = format!("e-a~revoked~{}", a.id);
    assert_eq!(named, vec![("e-a", false), (old_name.as_str(), true)]);
    assert_eq!(db.live_device("e-a").unwrap(), reused.device_id);
}

#[test]
fn enrollment_counts_uses_expires_is_idempotent_and_frees_revoked_names() {
    on_each(enrollment);
}

// --- 2. authentication and the news ---

/// Never asked: the scenarios make releases with their manifests given.
struct NoResolver;

impl Resolver for NoResolver {
    fn resolve<'a>(
        &'a self,
        _image: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Resolved, ResolveError>> + Send + 'a>> {
        Box::pin(async { Err(ResolveError::NoPlatform) })
    }
}

fn news(store: &Store) {
    let db = store.db();
    let t = token(&db, None, None, &[]);
    let dev = db
        .enroll(
            &t,
            &request("n-1", &["linux/arm64"], Some("enrollment-id-of-n-1")),
            NOW,
        )
        .unwrap();
    assert_eq!(db.authenticate("not-a-credential", NOW + 1).unwrap(), None);
    assert_eq!(
        db.authenticate(&dev.credential, NOW + 50).unwrap(),
        Some(dev.device_id.clone())
    );
    // An earlier request does not move it back.
    db.authenticate(&dev.credential, NOW + 40).unwrap();
    let metrics = Metrics {
        cpu_percent: Some(12.5),
        memory_used: Some(100),
        memory_total: Some(400),
        ..Metrics::default()
    };
    db.record(
        &dev.device_id,
        &[event("hb-1", 1, EventBody::Heartbeat(metrics.clone()))],
        NOW + 50,
    )
    .unwrap();
    // Marked seen in memory: the view has it before any flush, the database not yet.
    let seen = device_row(&db, "n-1");
    assert_eq!(
        (seen.last_seen, seen.metrics.as_ref()),
        (NOW + 50, Some(&metrics))
    );
    let unflushed = device_row(&store.db(), "n-1");
    assert_eq!((unflushed.last_seen, unflushed.metrics), (NOW, None));
    assert_eq!(
        db.event_count(&dev.device_id).unwrap(),
        0,
        "a heartbeat is no event"
    );

    // The flush, as the server runs it.
    let server = Server::new(
        db,
        Box::new(NoResolver),
        Arc::new(flotilla::clock::SystemClock),
    );
    if let Err(e) = store.rt.block_on(server.flush()) {
        panic!("flush on {}: {e:?}", store.name());
    }
    let flushed = device_row(&store.db(), "n-1");
    assert_eq!(
        (flushed.last_seen, flushed.metrics),
        (NOW + 50, Some(metrics))
    );
    // The first use of the credential is written too: the enrollment id's retries are over for good.
    let err = store
        .db()
        .enroll(
            &t,
            &request("n-1", &["linux/arm64"], Some("enrollment-id-of-n-1")),
            NOW + 60,
        )
        .unwrap_err();
    assert!(matches!(err, ServerDbError::EnrolledAlready(_)), "{err}");
}

#[test]
fn authentication_marks_seen_and_a_flush_writes_it() {
    on_each(news);
}

// --- 3. reports taken exactly once ---

const DIGEST_V6: &str = "sha256:6666666666666666666666666666666666666666666666666666666666666666";
const DIGEST_ARM64: &str =
    "sha256:6464646464646464646464646464646464646464646464646464646464646464";

/// App `app` with releases made from `images`, each with an arm/v6 and an arm64 manifest; their ids.
fn app_with_releases(db: &ServerDb, app: &str, images: &[&str]) -> Vec<String> {
    db.create_app(
        &AppRequest {
            name: app.to_string(),
            settings: Default::default(),
        },
        NOW,
    )
    .unwrap();
    let manifests: BTreeMap<String, String> = [
        ("linux/arm/v6".to_string(), DIGEST_V6.to_string()),
        ("linux/arm64".to_string(), DIGEST_ARM64.to_string()),
    ]
    .into();
    images
        .iter()
        .map(|image| {
            db.create_release(
                app,
                &format!("registry.example/{app}:{image}"),
                &format!("registry.example/{app}@{DIGEST_ARM64}"),
                &manifests,
                NOW,
            )
            .unwrap()
            .id
        })
        .collect()
}

fn reports(store: &Store) {
    let db = store.db();
    let release = app_with_releases(&db, "rep", &["1"]).remove(0);
    assert_eq!(release, "rep-1");
    let x = enroll(&db, "r-x", &["linux/arm64"]);
    let y = enroll(&db, "r-y", &["linux/arm/v6"]);
    let batch = vec![
        event("x-1", 1, app_status("rep", &release, "running")),
        event(
            "x-2",
            2,
            update(
                "rep",
                Report::Preparing {
                    release: release.clone(),
                },
            ),
        ),
        event(
            "x-3",
            5,
            update(
                "rep",
                Report::Committed {
                    release: release.clone(),
                },
            ),
        ),
        event("x-4", 6, EventBody::Heartbeat(Metrics::default())),
    ];
    let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
    assert_eq!(db.record(&x.device_id, &batch, NOW + 10).unwrap(), ids);
    // Sent again after a lost answer: every id is acknowledged, and nothing is stored twice.
    assert_eq!(db.record(&x.device_id, &batch, NOW + 20).unwrap(), ids);
    assert_eq!(db.event_count(&x.device_id).unwrap(), 3);
    // An older report (by the outbox's sequence) does not replace a newer one, though its clock says later.
    let late = Event {
        at: NOW + 1000,
        ..event(
            "x-5",
            3,
            update(
                "rep",
                Report::Probation {
                    release: release.clone(),
                },
            ),
        )
    };
    db.record(&x.device_id, &[late], NOW + 30).unwrap();
    // y's report is older by its sequence, newer by the server's clock.
    db.record(
        &y.device_id,
        &[event(
            "y-1",
            4,
            update(
                "rep",
                Report::Preparing {
                    release: release.clone(),
                },
            ),
        )],
        NOW + 40,
    )
    .unwrap();
    let rows: Vec<(String, Report, u64)> = db
        .update_reports("rep")
        .unwrap()
        .into_iter()
        .map(|r| {
            assert_eq!(r.release, release);
            (r.device, r.report, r.received)
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                y.device_id.clone(),
                Report::Preparing {
                    release: release.clone()
                },
                NOW + 40
            ),
            (
                x.device_id.clone(),
                Report::Committed {
                    release: release.clone()
                },
                NOW + 10
            ),
        ]
    );
    // The devices view has the app's status and the newest report.
    let apps = device_row(&db, "r-x").apps;
    assert_eq!(apps.len(), 1);
    assert_eq!(
        apps[0].update,
        Some(Report::Committed {
            release: release.clone()
        })
    );
    assert_eq!(
        apps[0].status.as_ref().map(|s| s.state.as_str()),
        Some("running")
    );
    // Pruning takes the old events, a slice at a time.
    assert_eq!(db.prune_events(NOW + 15, 2).unwrap(), 2);
    assert_eq!(db.prune_events(NOW + 15, 2).unwrap(), 1);
    assert_eq!(db.prune_events(NOW + 15, 2).unwrap(), 0);
    // x's late report was received after the cut.
    assert_eq!(db.event_count(&x.device_id).unwrap(), 1);
    assert_eq!(db.event_count(&y.device_id).unwrap(), 1);
}

#[test]
fn a_batch_sent_twice_is_taken_once_and_reports_order_by_sequence() {
    on_each(reports);
}

// --- 4. the rollout driver ---

/// A rollout of `release` to the fleet named by its app's first letter.
fn spec(release: &str, waves: &[&str], soak_secs: u64) -> RolloutRequest {
    RolloutRequest {
        release: release.to_string(),
        select: [("fleet".to_string(), release[..1].to_string())].into(),
        waves: waves.iter().map(|w| w.to_string()).collect(),
        max_failures: "0".into(),
        soak_secs,
        rollback: true,
        device_timeout_secs: 0,
        skip_timed_out: false,
    }
}

/// The device ids of wave `k` of `r`, by name through `db`.
fn wave_ids(db: &ServerDb, r: &RolloutView, k: usize) -> Vec<String> {
    r.waves[k]
        .devices
        .iter()
        .map(|name| db.live_device(name).unwrap())
        .collect()
}

fn desired_release(db: &ServerDb, device: &str, app: &str) -> Option<(String, u32)> {
    db.desired_for(device)
        .unwrap()
        .apps
        .into_iter()
        .find(|a| a.name == app)
        .map(|a| (a.release, a.attempt))
}

fn commit(db: &ServerDb, device: &str, app: &str, release: &str, seq: u64, at: u64) {
    db.record(
        device,
        &[
            event(
                &format!("{release}-c-{seq}"),
                seq,
                update(
                    app,
                    Report::Committed {
                        release: release.into(),
                    },
                ),
            ),
            event(
                &format!("{release}-s-{seq}"),
                seq + 1,
                app_status(app, release, "running"),
            ),
        ],
        at,
    )
    .unwrap();
}

/// Runs the rollout driver's scenario; returns the fleet's clock when it ends.
fn rollouts(store: &Store) -> u64 {
    let db = store.db();
    let releases = app_with_releases(&db, "web", &["1", "2"]);
    let (r1, r2) = (releases[0].clone(), releases[1].clone());
    let mut devices = BTreeMap::new();
    for (name, platform) in [
        ("w-a", "linux/arm/v6"),
        ("w-b", "linux/arm/v6"),
        ("w-c", "linux/arm64"),
        ("w-d", "linux/arm64"),
        ("w-x86", "linux/amd64"),
    ] {
        devices.insert(name, enroll(&db, name, &[platform]).device_id);
    }
    let mut now = NOW + 100;

    // The first release everywhere it can run, in one wave.
    let first = db.create_rollout(&spec(&r1, &["100%"], 0), now).unwrap();
    assert_eq!(first.waves_started, 1);
    assert_eq!(first.waves[0].devices, vec!["w-a", "w-b", "w-c", "w-d"]);
    let incompatible: Vec<&str> = first
        .incompatible
        .iter()
        .map(|i| i.device.as_str())
        .collect();
    assert_eq!(incompatible, vec!["w-x86"]);
    assert_eq!(
        desired_release(&db, &devices["w-a"], "web"),
        Some((r1.clone(), 0))
    );
    assert_eq!(desired_release(&db, &devices["w-x86"], "web"), None);
    for (seq, name) in ["w-a", "w-b", "w-c", "w-d"].into_iter().enumerate() {
        commit(
            &db,
            &devices[name],
            "web",
            &r1,
            10 + 2 * seq as u64,
            now + 5,
        );
    }
    now += 10;
    db.drive(now).unwrap();
    assert_eq!(db.rollout(first.id).unwrap().status, StateView::Done);

    // The second release in two waves, with a soak between them.
    let second = db
        .create_rollout(&spec(&r2, &["2", "100%"], 600), now)
        .unwrap();
    assert_eq!(second.previous.as_deref(), Some(r1.as_str()));
    assert_eq!(second.waves_started, 1);
    assert_eq!(second.waves[0].devices.len(), 2);
    assert_eq!(second.waves[1].devices.len(), 2);
    let wave0 = wave_ids(&db, &second, 0);
    let wave1 = wave_ids(&db, &second, 1);
    for d in &wave0 {
        assert_eq!(desired_release(&db, d, "web"), Some((r2.clone(), 0)));
    }
    for d in &wave1 {
        assert_eq!(desired_release(&db, d, "web"), Some((r1.clone(), 0)));
    }
    for (i, d) in wave0.iter().enumerate() {
        commit(&db, d, "web", &r2, 100 + 2 * i as u64, now + 5);
    }
    now += 10;
    db.drive(now).unwrap();
    let r = db.rollout(second.id).unwrap();
    assert_eq!(
        (r.waves_started, r.waves[0].healthy),
        (1, 2),
        "the soak holds the second wave"
    );
    // The soak is over.
    now += 601;
    assert!(db.drive(now).unwrap(), "the second wave is ordered");
    let r = db.rollout(second.id).unwrap();
    assert_eq!(r.waves_started, 2);
    for d in &wave1 {
        assert_eq!(desired_release(&db, d, "web"), Some((r2.clone(), 0)));
    }

    // A failure past the threshold pauses the rollout and orders the failed wave back.
    db.record(
        &wave1[0],
        &[event(
            "w-rb",
            200,
            update(
                "web",
                Report::RolledBack {
                    release: r2.clone(),
                    to: Some(r1.clone()),
                    reason: "the health check failed".into(),
                    wrong_variant: false,
                },
            ),
        )],
        now + 1,
    )
    .unwrap();
    now += 2;
    db.drive(now).unwrap();
    let r = db.rollout(second.id).unwrap();
    assert!(
        matches!(&r.status, StateView::Paused { reason } if reason != OPERATOR_PAUSE),
        "{:?}",
        r.status
    );
    assert_eq!(r.waves[1].failed, 1);
    for d in &wave1 {
        assert_eq!(
            desired_release(&db, d, "web"),
            Some((r1.clone(), 0)),
            "ordered back"
        );
    }
    for d in &wave0 {
        assert_eq!(
            desired_release(&db, d, "web"),
            Some((r2.clone(), 0)),
            "a healthy wave stays"
        );
    }

    // The operator's controls.
    let r = db.control_rollout(second.id, Control::Pause, now).unwrap();
    assert_eq!(
        r.status,
        StateView::Paused {
            reason: OPERATOR_PAUSE.into()
        }
    );
    let r = db.control_rollout(second.id, Control::Retry, now).unwrap();
    assert_eq!(
        r.status,
        StateView::Paused {
            reason: OPERATOR_PAUSE.into()
        },
        "a retry keeps the operator's pause"
    );
    let r = db.control_rollout(second.id, Control::Resume, now).unwrap();
    assert_eq!(r.status, StateView::Running);
    // The retried device gets the release again, at a new attempt.
    assert_eq!(
        desired_release(&db, &wave1[0], "web"),
        Some((r2.clone(), 1))
    );
    assert_eq!(
        desired_release(&db, &wave1[1], "web"),
        Some((r2.clone(), 0))
    );
    for (i, d) in wave1.iter().enumerate() {
        commit(&db, d, "web", &r2, 300 + 2 * i as u64, now + 5);
    }
    now += 10;
    db.drive(now).unwrap();
    let r = db.rollout(second.id).unwrap();
    assert_eq!(
        r.status,
        StateView::Running,
        "the last wave soaks too: {r:?}"
    );
    now += 601;
    db.drive(now).unwrap();
    let r = db.rollout(second.id).unwrap();
    assert_eq!(r.status, StateView::Done, "{r:?}");
    assert_eq!(
        (r.waves[0].healthy, r.waves[1].healthy, r.waves[1].failed),
        (2, 2, 0)
    );
    let err = db
        .control_rollout(second.id, Control::Abort, now)
        .unwrap_err();
    assert!(matches!(err, ServerDbError::Invalid(_)), "{err}");

    // A third rollout, aborted at once: its devices are ordered back to what they ran.
    let third = db
        .create_rollout(&spec(&r1, &["1", "100%"], 0), now)
        .unwrap();
    let back = wave_ids(&db, &third, 0);
    assert_eq!(desired_release(&db, &back[0], "web"), Some((r1.clone(), 0)));
    let r = db.control_rollout(third.id, Control::Abort, now).unwrap();
    assert_eq!(r.status, StateView::Aborted);
    assert_eq!(desired_release(&db, &back[0], "web"), Some((r2.clone(), 0)));
    now
}

#[test]
fn the_rollout_driver_orders_waves_soaks_pauses_on_failure_and_obeys_controls() {
    on_each(|store| {
        rollouts(store);
    });
}

// --- 5. revocation ---

fn revocation(store: &Store) {
    let db = store.db();
    let t = token(&db, None, Some(5), &[("fleet", "v")]);
    let dev = db
        .enroll(&t, &request("v-1", &["linux/arm64"], None), NOW)
        .unwrap();
    assert_eq!(
        db.authenticate(&dev.credential, NOW + 1).unwrap(),
        Some(dev.device_id.clone())
    );
    assert!(db.revoke(&dev.device_id).unwrap());
    assert!(!db.revoke("no-such-device").unwrap());
    assert_eq!(db.authenticate(&dev.credential, NOW + 2).unwrap(), None);
    let err = db.live_device("v-1").unwrap_err();
    assert!(matches!(err, ServerDbError::NotFound(_)), "{err}");
    let err = db
        .set_device_tags("v-1", &BTreeMap::new(), &["site".to_string()])
        .unwrap_err();
    assert!(matches!(err, ServerDbError::NotFound(_)), "{err}");
    assert!(device_row(&db, "v-1").revoked);
    // Its name is free.
    let again = db
        .enroll(&t, &request("v-1", &["linux/arm64"], None), NOW + 3)
        .unwrap();
    assert!(!device_row(&db, "v-1").revoked);
    assert_eq!(db.live_device("v-1").unwrap(), again.device_id);
    // A revoked token enrolls nobody; the devices it enrolled keep their credentials.
    let id = db
        .tokens()
        .unwrap()
        .into_iter()
        .find(|v| v.tags.get("fleet").map(String::as_str) == Some("v"))
        .expect("the token that enrolled v-1")
        .id;
    let view = db.revoke_token(&id).unwrap();
    assert!(view.revoked);
    assert_eq!(view.enrolled, 2);
    assert_eq!(view.uses_left, Some(3));
    let err = db
        .enroll(&t, &request("v-2", &["linux/arm64"], None), NOW + 4)
        .unwrap_err();
    assert!(matches!(err, ServerDbError::TokenRevoked(_)), "{err}");
    assert_eq!(
        db.authenticate(&again.credential, NOW + 5).unwrap(),
        Some(again.device_id.clone())
    );
    let err = db.revoke_token("no-such-token").unwrap_err();
    assert!(matches!(err, ServerDbError::NotFound(_)), "{err}");
}

#[test]
fn a_revoked_device_no_longer_authenticates_and_a_revoked_token_enrolls_nobody() {
    on_each(revocation);
}

// --- the operator's side: admin tokens, the dashboard's sessions, apps and releases, tags, a preview ---

fn operator(store: &Store) {
    let db = store.db();
    let admin = db
        .ensure_admin_token(NOW)
        .unwrap()
        .expect("the first admin token");
    assert_eq!(db.ensure_admin_token(NOW).unwrap(), None);
    assert!(db.is_admin(&admin).unwrap());
    assert!(!db.is_admin("not-an-admin-token").unwrap());
    assert!(db.sign_in("not-an-admin-token", NOW).unwrap().is_none());
    let (cookie, session) = db.sign_in(&admin, NOW).unwrap().expect("signed in");
    let found = db.session(&cookie, NOW + 1).unwrap().expect("the session");
    assert_eq!((&found.key, &found.csrf), (&session.key, &session.csrf));
    assert!(
        db.session(&cookie, session.expires).unwrap().is_none(),
        "expired"
    );
    // Signing in again drops the expired sessions.
    db.sign_in(&admin, session.expires)
        .unwrap()
        .expect("signed in");
    db.sign_out(&session.key).unwrap();
    assert!(
        db.session(&cookie, NOW + 1).unwrap().is_none(),
        "signed out"
    );

    let t = token(&db, None, None, &[]);
    assert!(db.token_known(&t).unwrap());
    assert!(!db.token_known("not-a-token").unwrap());

    assert_eq!(
        app_with_releases(&db, "ops", &["1", "2"]),
        vec!["ops-1", "ops-2"]
    );
    let again = AppRequest {
        name: "ops".into(),
        settings: Default::default(),
    };
    let err = db.create_app(&again, NOW).unwrap_err();
    assert!(matches!(err, ServerDbError::Exists(_)), "{err}");
    let err = db
        .create_release(
            "missing",
            "registry.example/missing:1",
            "p",
            &BTreeMap::new(),
            NOW,
        )
        .unwrap_err();
    assert!(matches!(err, ServerDbError::NotFound(_)), "{err}");
    let names: Vec<String> = db.apps().unwrap().into_iter().map(|a| a.name).collect();
    assert_eq!(names, vec!["ops"]);
    let ids: Vec<String> = db
        .releases(None)
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, vec!["ops-1", "ops-2"]);
    assert_eq!(db.releases(Some("ops-2")).unwrap().len(), 1);
    assert_eq!(db.release("ops-2").unwrap().manifests.len(), 2);
    let err = db.release("ops-3").unwrap_err();
    assert!(matches!(err, ServerDbError::NotFound(_)), "{err}");

    enroll(&db, "o-1", &["linux/arm64"]);
    enroll(&db, "o-2", &["linux/riscv64"]);
    db.set_device_tags(
        "o-1",
        &[
            ("site".to_string(), "east".to_string()),
            ("rack".to_string(), "4".to_string()),
        ]
        .into(),
        &["fleet".to_string()],
    )
    .unwrap();
    let tags: Vec<(String, String)> = device_row(&db, "o-1").tags.into_iter().collect();
    assert_eq!(
        tags,
        vec![
            ("rack".to_string(), "4".to_string()),
            ("site".to_string(), "east".to_string())
        ]
    );
    let err = db
        .set_device_tags("nobody", &BTreeMap::new(), &[])
        .unwrap_err();
    assert!(matches!(err, ServerDbError::NotFound(_)), "{err}");

    // A preview is the planner's first plan, stored nowhere.
    let every = RolloutRequest {
        select: BTreeMap::new(),
        ..spec("ops-2", &["1", "100%"], 0)
    };
    let plan = db.preview_rollout(&every, NOW).unwrap();
    assert_eq!(plan.waves_started, 1);
    assert_eq!(plan.waves.len(), 1, "one device: the waves are one");
    let incompatible: Vec<&str> = plan.incompatible.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(incompatible, vec!["o-2"]);
    assert!(db.rollouts(None).unwrap().is_empty());
}

#[test]
fn the_operators_sessions_apps_releases_tags_and_previews() {
    on_each(operator);
}

// --- 6. the dashboard's and /metrics' reads agree ---

/// Everything the dashboard and /metrics read, with revoked devices' renamed names (which carry their random
/// ids) cut to their old name.
#[derive(Debug, PartialEq)]
struct Reads {
    overview: flotilla::server::dashboard::overview::Overview,
    /// (the filter, the list by it).
    lists: Vec<(String, DeviceList)>,
    details: Vec<(
        String,
        Option<flotilla::server::dashboard::device::DeviceDetail>,
    )>,
    coverage: Vec<(String, Coverage)>,
    rollouts_of: Vec<(String, Vec<(u64, String)>)>,
    failures: Vec<(String, Vec<(String, Report)>)>,
    metrics: flotilla::server::metrics::FleetMetrics,
    /// The API's views: every rollout, release and app, and every device without its random id.
    rollouts: Vec<RolloutView>,
    releases: Vec<flotilla::server::views::ReleaseView>,
    apps: Vec<flotilla::server::views::AppView>,
    devices: Vec<flotilla::server::views::DeviceView>,
}

fn unrenamed(name: &str) -> String {
    match name.split_once("~revoked~") {
        Some((old, _)) => format!("{old}~revoked"),
        None => name.to_string(),
    }
}

/// The fleet every scenario builds, on one database, and what is read of it at `now`.
fn fleet_reads(store: &Store) -> Reads {
    enrollment(store);
    // Not `news`: it flushes through a server of its own; what a flush writes is written below.
    reports(store);
    let now = rollouts(store);
    revocation(store);
    // A failure left standing, for the rollouts' failures and the failed state.
    let db = store.db();
    let crashed = db.live_device("r-y").unwrap();
    db.record(
        &crashed,
        &[event(
            "y-2",
            9,
            update(
                "rep",
                Report::PrepareFailed {
                    release: "rep-1".into(),
                    reason: "the registry did not answer".into(),
                    cause: None,
                },
            ),
        )],
        now,
    )
    .unwrap();
    // Names whose order differs by collation: byte order (SQLite's) puts capitals and '-' first.
    for name in ["Zeta", "alpha", "a-b", "ab", "a_c", "B2"] {
        enroll(&db, name, &["linux/arm64"]);
    }
    // A platform is what the device says: one that sorts apart by collation, at a count another has too.
    enroll(&db, "p-1", &["Linux/arm64"]);
    // Enough devices for a second page, which collation would fill differently.
    for k in 0..40 {
        enroll(&db, &format!("bulk-{k:02}"), &["linux/arm64"]);
    }
    // A tag whose name SQLite's JSON path would read as a path.
    db.set_device_tags(
        "bulk-07",
        &[("rack.row".to_string(), "4".to_string())].into(),
        &[],
    )
    .unwrap();
    // Ordered and silent: updating. It runs no release of the app, as many devices as run rep-1.
    let z = enroll(&db, "r-z", &["linux/arm64"]);
    let none = EventBody::App(AppStatus {
        release: None,
        ..match app_status("rep", "rep-1", "exited") {
            EventBody::App(s) => s,
            _ => unreachable!("an app status"),
        }
    });
    db.record(&z.device_id, &[event("z-1", 1, none)], now)
        .unwrap();
    let rep = RolloutRequest {
        rollback: false,
        ..spec("rep-1", &["100%"], 0)
    };
    db.create_rollout(&rep, now).unwrap();
    // What a flush writes: news (last_seen, metrics with outbox lag) and the charts' samples.
    let conn = store.conn();
    let (mut samples, mut later) = (Vec::new(), Vec::new());
    for (k, name) in ["w-a", "w-c", "r-x", "alpha"].into_iter().enumerate() {
        let k = k as u64;
        let m = Metrics {
            cpu_percent: Some(10.5 + k as f32),
            memory_used: Some(1 << 20),
            memory_total: Some(1 << 22),
            // A device may say any u64: the largest must not fail the scrape on either engine.
            outbox_pending: Some(if k == 3 { u64::MAX } else { k * 40 }),
            outbox_oldest_age_secs: Some(k * 700),
            load: Some([0.5, 0.25, 0.125]),
            ..Metrics::default()
        };
        let json = serde_json::to_string(&m).unwrap();
        let id = db.live_device(name).unwrap();
        let id_again = id.clone();
        conn.execute(
            "UPDATE devices SET last_seen = ?2, metrics = ?3 WHERE id = ?1",
            flotilla::args![&id, NOW + 60 + k, &json],
        )
        .unwrap();
        samples.push((id, NOW + 1, json.clone()));
        later.push((id_again, NOW + 301 + k, json));
    }
    // Silent for two days: offline, and not seen in a day.
    conn.execute(
        "UPDATE devices SET last_seen = ?2 WHERE name = ?1",
        flotilla::args!["Zeta", NOW - 2 * 86_400],
    )
    .unwrap();
    // In time order, as flushes write them.
    for (id, at, json) in samples.into_iter().chain(later) {
        conn.execute(
            "INSERT INTO device_samples (device, at, metrics) VALUES (?1, ?2, ?3)",
            flotilla::args![&id, at, &json],
        )
        .unwrap();
    }
    drop(conn);
    // The oldest samples go first, a slice at a time.
    assert_eq!(
        db.prune_samples(NOW + 100, 3).unwrap(),
        3,
        "on {}",
        store.name()
    );
    assert_eq!(
        db.prune_samples(NOW + 100, 3).unwrap(),
        1,
        "on {}",
        store.name()
    );
    // Read while the devices enrolled at NOW still count as online: the fleet is then in every state.
    let now = NOW + 120;

    let mut filters: Vec<(&str, Filter)> = vec![
        ("all", Filter::default()),
        (
            "q",
            Filter {
                q: "W-".into(),
                ..Filter::default()
            },
        ),
        (
            "q literal",
            Filter {
                q: "_".into(),
                ..Filter::default()
            },
        ),
        (
            "tag",
            Filter {
                tag: Some(("site".into(), "south".into())),
                ..Filter::default()
            },
        ),
        (
            "platform",
            Filter {
                platform: "linux/arm/v6".into(),
                ..Filter::default()
            },
        ),
        (
            "app",
            Filter {
                app: "web".into(),
                ..Filter::default()
            },
        ),
        (
            "release",
            Filter {
                app: "web".into(),
                release: "web-2".into(),
                ..Filter::default()
            },
        ),
        (
            "dotted tag",
            Filter {
                tag: Some(("rack.row".into(), "4".into())),
                ..Filter::default()
            },
        ),
        (
            "page 2",
            Filter {
                page: 2,
                ..Filter::default()
            },
        ),
    ];
    for s in DeviceState::ALL {
        filters.push((
            s.slug(),
            Filter {
                state: Some(s),
                ..Filter::default()
            },
        ));
    }
    for s in [Seen::Hour, Seen::Day, Seen::Week, Seen::NotInDay] {
        filters.push((
            "seen",
            Filter {
                seen: Some(s),
                ..Filter::default()
            },
        ));
    }
    let lists = filters
        .into_iter()
        .map(|(what, mut f)| {
            f.page = f.page.max(1);
            let mut l = db
                .device_list(&f, now)
                .unwrap_or_else(|e| panic!("the list by {what}: {e}"));
            for r in &mut l.rows {
                r.name = unrenamed(&r.name);
            }
            (what.to_string(), l)
        })
        .collect();
    let details = [
        "e-a", "e-b", "e-idem", "r-x", "r-y", "w-a", "w-c", "w-x86", "v-1", "nobody",
    ]
    .into_iter()
    .map(|name| (name.to_string(), db.device_detail(name, now).unwrap()))
    .collect();
    let releases = db.releases(None).unwrap();
    let coverage = releases
        .iter()
        .map(|r| (r.id.clone(), db.coverage(&r.manifests).unwrap()))
        .collect();
    let rollouts_of = releases
        .iter()
        .map(|r| (r.id.clone(), db.rollouts_of(&r.id).unwrap()))
        .collect();
    let failures = db
        .rollouts(None)
        .unwrap()
        .into_iter()
        .map(|r| {
            let members: BTreeSet<String> =
                r.waves.iter().flat_map(|w| w.devices.clone()).collect();
            (
                r.spec.release.clone(),
                db.rollout_failures(&r.spec.release, &members).unwrap(),
            )
        })
        .collect();
    Reads {
        overview: db.overview(now).unwrap(),
        lists,
        details,
        coverage,
        rollouts_of,
        failures,
        metrics: db.fleet_metrics(now).unwrap(),
        rollouts: db.rollouts(None).unwrap(),
        apps: db.apps().unwrap(),
        devices: db
            .devices()
            .unwrap()
            .into_iter()
            .map(|d| flotilla::server::views::DeviceView {
                id: String::new(),
                name: unrenamed(&d.name),
                ..d
            })
            .collect(),
        releases,
    }
}

#[test]
fn the_dashboards_and_metrics_reads_agree_on_both_engines() {
    let mut reads = Vec::new();
    for store in engines() {
        reads.push((store.name(), fleet_reads(&store)));
    }
    assert_eq!(
        reads.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
        ["sqlite", "postgres"][..reads.len()],
        "SQLite first: the reads are held to its"
    );
    let (_, sqlite) = &reads[0];
    let total = |what: &str| {
        sqlite
            .lists
            .iter()
            .filter(|(w, _)| w == what)
            .map(|(_, l)| l.total)
            .collect::<Vec<_>>()
    };
    // Every filter narrows to something, and not to everything.
    assert_eq!(total("offline"), vec![1]);
    assert_eq!(total("seen"), vec![59, 59, 60, 1]);
    assert_eq!(total("q"), vec![5]);
    assert_eq!(total("q literal"), vec![1]);
    assert_eq!(total("tag"), vec![1]);
    assert_eq!(total("dotted tag"), vec![1]);
    let page2 = &sqlite.lists.iter().find(|(w, _)| w == "page 2").unwrap().1;
    assert_eq!(page2.rows.len(), 10, "{page2:?}");
    // The reads see the fleet, not an empty one on which any two engines agree.
    assert!(sqlite.overview.total >= 10, "{:?}", sqlite.overview);
    assert!(
        sqlite
            .overview
            .by_state
            .iter()
            .filter(|(_, n)| *n > 0)
            .count()
            >= 3,
        "{:?}",
        sqlite.overview
    );
    assert!(!sqlite.overview.active_rollouts.is_empty());
    assert_eq!(
        sqlite.overview.by_release,
        vec![
            ("rep".to_string(), None, 1),
            ("rep".to_string(), Some("rep-1".to_string()), 1),
            ("web".to_string(), Some("web-2".to_string()), 4)
        ]
    );
    assert!(
        sqlite.failures.iter().any(|(_, f)| !f.is_empty()),
        "{:?}",
        sqlite.failures
    );
    assert!(sqlite.details.iter().filter(|(_, d)| d.is_some()).count() == 9);
    assert!(!sqlite.metrics.rollouts.is_empty());
    assert_eq!(sqlite.metrics.outbox.devices, 4, "{:?}", sqlite.metrics);
    assert!(
        sqlite
            .details
            .iter()
            .any(|(_, d)| d.as_ref().is_some_and(|d| d.samples.len() == 1)),
        "{:?}",
        sqlite.details
    );
    for (engine, r) in &reads[1..] {
        assert_eq!(r.overview, sqlite.overview, "the overview on {engine}");
        for (a, b) in r.lists.iter().zip(&sqlite.lists) {
            assert_eq!(a, b, "the devices list by {} on {engine}", b.0);
        }
        for (a, b) in r.details.iter().zip(&sqlite.details) {
            assert_eq!(a, b, "the device page of {} on {engine}", b.0);
        }
        assert_eq!(
            r.coverage, sqlite.coverage,
            "the releases' coverage on {engine}"
        );
        assert_eq!(
            r.rollouts_of, sqlite.rollouts_of,
            "the releases' rollouts on {engine}"
        );
        assert_eq!(
            r.failures, sqlite.failures,
            "the rollouts' failures on {engine}"
        );
        assert_eq!(r.metrics, sqlite.metrics, "the metrics on {engine}");
        assert_eq!(r.rollouts, sqlite.rollouts, "the rollouts on {engine}");
        assert_eq!(r.releases, sqlite.releases, "the releases on {engine}");
        assert_eq!(r.apps, sqlite.apps, "the apps on {engine}");
        assert_eq!(r.devices, sqlite.devices, "the devices on {engine}");
    }
}
