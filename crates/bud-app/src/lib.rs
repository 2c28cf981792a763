//! budapp: Bud's control-plane service: identity, users, projects, RBAC, models, providers,
//! API keys and the audit log, over REST.
//!
//! [`run`] takes a bound listener and a shutdown token from the caller, so the binary and the
//! tests start and stop it the same way.

pub mod api;
pub mod config;
mod convert;
pub mod error;
pub mod extract;
pub mod identity;
mod permissions_view;
pub mod secrets;
pub mod ssrf;
pub mod state;

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{AppConfig, IdentityMode, OidcSettings, ProviderPolicy};
pub use state::AppState;

/// Serves budapp on `listener` until `shutdown` is cancelled, then stops accepting and lets
/// in-flight requests finish. The caller bounds how long that may take.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = api::router(state);
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
