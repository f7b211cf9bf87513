//! The server at work: its listeners, served until shutdown, and beside them its timed chores (re-planning the
//! rollouts for their soak timers, writing what devices said, pruning old events).

use std::time::Duration;

use axum::Router;
use axum::routing::get;

use super::state::Shared;

/// How often old events are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Serves the API on `listener` (plain TCP, or [`super::tls::TlsListener`]) until `shutdown` resolves; re-plans the
/// rollouts every `tick` (soak timers), writes what devices said every flush interval, and prunes old events.
/// What is still in memory at the end is written before it returns.
pub async fn serve<L: axum::serve::Listener>(
    server: Shared,
    listener: L,
    tick: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let chores = tokio::spawn(chores(server.clone(), tick));
    // Orders written through another replica wake this one's long polls.
    let listener_task = server.postgres().cloned().map(|url| {
        let woken = server.clone();
        tokio::spawn(super::store::notify::listen(
            url,
            server.replica().to_string(),
            move || woken.wake_long_polls(),
        ))
    });
    let limits = super::http::ConnLimits {
        header_timeout: server.limits().header_timeout,
        idle_timeout: server.limits().idle_timeout,
        max_connections: server.limits().max_connections,
    };
    let app = super::api::router(server.clone())
        .merge(super::dashboard::router(server.clone()))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            super::metrics::time_request,
        ));
    super::http::serve_connections(listener, app, limits, shutdown).await;
    chores.abort();
    if let Some(task) = listener_task {
        task.abort();
    }
    server.flush().await.map_err(|e| {
        std::io::Error::other(format!(
            "writing last_seen and metrics failed: {}",
            e.message()
        ))
    })
}

/// Serves only `/metrics`, without a token (`serve --metrics-listen`, loopback only), until the task is aborted.
pub async fn serve_metrics(server: Shared, listener: tokio::net::TcpListener) {
    let limits = super::http::ConnLimits {
        header_timeout: server.limits().header_timeout,
        idle_timeout: server.limits().idle_timeout,
        max_connections: server.limits().max_connections,
    };
    let app = Router::new()
        .route("/metrics", get(super::metrics::scrape))
        .layer(axum::middleware::from_fn_with_state(
            server.clone(),
            super::metrics::time_request,
        ))
        .with_state(server);
    super::http::serve_connections(listener, app, limits, std::future::pending()).await;
}

/// The server's timed work, each on its own schedule; a failure is logged and tried again next time.
async fn chores(server: Shared, tick: Duration) {
    let mut plan = tokio::time::interval(tick);
    let mut flush = tokio::time::interval(server.limits().flush_interval);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    for timer in [&mut plan, &mut flush, &mut prune] {
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    loop {
        tokio::select! {
            _ = plan.tick() => {
                if let Err(e) = server.drive().await {
                    tracing::warn!("planning the rollouts failed: {}", e.message());
                }
            }
            _ = flush.tick() => {
                if let Err(e) = server.flush().await {
                    tracing::warn!("writing last_seen and metrics failed: {}", e.message());
                }
                server.forget_idle_rates();
            }
            _ = prune.tick() => match server.prune_events().await {
                Ok(0) => {}
                Ok(n) => tracing::info!("pruned {n} events older than the retention"),
                Err(e) => tracing::warn!("pruning old events failed: {}", e.message()),
            },
        }
    }
}
