//! Wake-ups between replicas: a replica that changed some device's desired state says so with `NOTIFY`, and every
//! replica `LISTEN`s, so a device long-polling on replica A hears of an order written through replica B at once.
//!
//! A notification is only a hint: it carries nothing, and whoever is woken reads the database again. Notifications
//! sent while a listener is away are lost, so the long polls keep their timeout, and a listener that comes back
//! wakes everyone once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_postgres::AsyncMessage;

use super::dburl::PgUrl;
use super::pg_tls::tls_config;
use super::postgres::PgError;
use super::{Conn, Dialect, StoreError};

/// The channel on which a change of desired state is announced.
pub const DESIRED_CHANNEL: &str = "flotilla_desired";

/// The first wait before a lost listener connects again, doubled at each failure up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Without keepalives, a database behind a network that dropped the connection silently would leave the
/// listener deaf for the kernel's two hours; this bounds it to about a minute.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// Tells the other replicas that some desired state changed; `from` is the sending replica's own name, which its
/// listener skips (it woke its own long polls already). Inside a transaction, PostgreSQL delivers it at the commit,
/// so nobody reads before the change is there. On SQLite there is no other replica to tell.
pub fn notify(conn: &dyn Conn, from: &str) -> Result<(), StoreError> {
    match conn.dialect() {
        Dialect::Sqlite => Ok(()),
        Dialect::Postgres => conn
            .execute(
                "SELECT pg_notify(?1, ?2)",
                crate::args![DESIRED_CHANNEL, from],
            )
            .map(drop),
    }
}

/// Listens on [`DESIRED_CHANNEL`] on a connection of its own, for ever, and calls `on_wake` for each notification,
/// and once each time it starts listening (again): what was announced while it was away is lost. A lost connection
/// is logged once, then tried again with backoff.
/// Notifications from the replica named `me` (its own) wake nobody.
pub async fn listen(url: PgUrl, me: String, on_wake: impl Fn() + Send + Sync + 'static) {
    let on_wake: Arc<dyn Fn() + Send + Sync> = Arc::new(on_wake);
    let mut wait = RETRY_FIRST;
    // Whether the last failure was logged at warn already: an outage is told once, not at every retry.
    let mut told = false;
    loop {
        let mut listening = false;
        let ended = session(&url, &me, &on_wake, || listening = true).await;
        if listening {
            wait = RETRY_FIRST;
            told = false;
        }
        if told {
            tracing::debug!(
                "the fleet database's LISTEN connection is still down: {ended}; trying again in {} s",
                wait.as_secs()
            );
        } else {
            tracing::warn!(
                "no LISTEN connection to the fleet database: {ended}; long polls wake only at their timeout \
                 until it is back, and it is tried again with backoff (first in {} s)",
                wait.as_secs()
            );
            told = true;
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_MAX);
    }
}

/// One connection: connects, listens, and wakes on every notification until the connection ends; says why it
/// ended. `listening` is called once the LISTEN took.
async fn session(
    url: &PgUrl,
    me: &str,
    on_wake: &Arc<dyn Fn() + Send + Sync>,
    listening: impl FnOnce(),
) -> String {
    let failed = |source: tokio_postgres::Error| {
        PgError::Statement {
            url: url.redacted.clone(),
            source,
        }
        .to_string()
    };
    let tls = match tls_config(url) {
        Ok(tls) => tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        Err(e) => return e.to_string(),
    };
    let mut config = url.config();
    config.keepalives_idle(KEEPALIVE_IDLE);
    let (client, mut connection) = match config.connect(tls).await {
        Ok(c) => c,
        Err(e) => return failed(e),
    };
    // The LISTEN's own answer comes through the connection, so the connection is driven before it is sent. The
    // task ends with the connection, which ends when `client` is dropped, on every way out of this function.
    let wake = on_wake.clone();
    let me = me.to_string();
    let mut driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.payload() != me => wake(),
                // Notices (a warning from the server) wake nobody.
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    });
    let listen = format!("LISTEN {DESIRED_CHANNEL}");
    tokio::select! {
        listened = client.batch_execute(&listen) => {
            if let Err(e) = listened {
                return failed(e);
            }
        }
        // The connection died before the LISTEN was answered.
        ended = &mut driver => return why(ended, url, failed),
    }
    listening();
    tracing::info!(
        "listening for changes of desired state on the fleet database {}",
        url.redacted
    );
    on_wake();
    let ended = driver.await;
    drop(client);
    why(ended, url, failed)
}

/// Why the connection's driver stopped.
fn why(
    ended: Result<Result<(), tokio_postgres::Error>, tokio::task::JoinError>,
    url: &PgUrl,
    failed: impl Fn(tokio_postgres::Error) -> String,
) -> String {
    match ended {
        Ok(Err(e)) => failed(e),
        Ok(Ok(())) => format!("the fleet database {} closed the connection", url.redacted),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => "the runtime is shutting down".to_string(),
    }
}
