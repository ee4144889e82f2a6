//! The agent's HTTP endpoints: `/healthz` (the process answers), `/readyz` (the first pass over
//! every disk is done, and no pass is stuck past `--stuck-after`), `/metrics` (OpenMetrics text).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::Shared;

/// Binds `addr` and serves `/healthz`, `/readyz` and `/metrics` there in a task of its own (both
/// modes of the agent). `Err` says why the address cannot be used.
pub async fn listen(addr: std::net::SocketAddr, shared: Arc<Shared>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("failed to listen on {addr}: {e}"))?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    tokio::spawn(serve(listener, shared));
    Ok(())
}

/// Serves until the process exits.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the HTTP server stopped");
    }
}

async fn readyz(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    if let Some(ran) = s.stuck_for() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stuck: a pass over the disks has been running for {} (more than --stuck-after); see the agent's log\n",
                humantime::format_duration(std::time::Duration::from_secs(ran.as_secs()))
            ),
        )
    } else if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: the first pass over the disks is not done\n".to_string(),
        )
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
