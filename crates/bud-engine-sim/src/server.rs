//! The HTTP/1.1 accept loop. It is not `axum::serve` because a crash must look like one: the
//! crash-after fault stops accepting at once, gives connections a moment to flush the answer
//! that triggered it, then drops every connection (pooled keep-alive ones included), as a dead
//! process would. A plain shutdown is graceful: answers in flight finish.

use std::io;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::engine::SimEngine;
use crate::error::SimError;

/// How long a crashing engine lets connections flush what they were writing.
const CRASH_GRACE: Duration = Duration::from_millis(50);

/// Serves `engine` on `listener` until `shutdown` is cancelled (then `Ok`) or the crash-after
/// fault fires (then `Err`).
pub(crate) async fn serve(
    listener: TcpListener,
    engine: SimEngine,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let app = api::router(engine.clone());
    let crashed = engine.crashed().clone();
    // Tells every connection to finish its current answer and close.
    let drain = CancellationToken::new();
    let mut connections = JoinSet::new();

    let crash = loop {
        tokio::select! {
            () = shutdown.cancelled() => break false,
            () = crashed.cancelled() => break true,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    connections.spawn(connection(tcp, app.clone(), drain.clone()));
                }
                Err(error) => accept_failed(error).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    };

    drop(listener);
    drain.cancel();
    if crash {
        let _flushed = tokio::time::timeout(CRASH_GRACE, join_all(&mut connections)).await;
        connections.abort_all();
        join_all(&mut connections).await;
        return Err(SimError::Crashed { completed: engine.completed() }.into_io());
    }
    // Hung requests would hold a graceful shutdown forever; let them go with a 503.
    engine.stop();
    join_all(&mut connections).await;
    tracing::info!("engine-sim stopped");
    Ok(())
}

async fn connection(tcp: TcpStream, app: Router, drain: CancellationToken) {
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app));
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = drain.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        // Clients hanging up mid-answer is ordinary here (disconnect tests, cut streams).
        tracing::debug!(%error, "connection ended with an error");
    }
}

async fn join_all(connections: &mut JoinSet<()>) {
    while connections.join_next().await.is_some() {}
}

/// A failed accept: a connection reset before we took it is nothing; anything else (out of
/// file descriptors) gets a pause so the loop does not spin.
async fn accept_failed(error: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::warn!(%error, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
