//! A bare reverse proxy — hyper's server and client, forwarding every request to the next
//! replica in turn with its body streamed through, nothing else — run in the gateway's place
//! with `gateway-server --bare`. Measured like the gateway, it shows what one proxy hop costs
//! in this harness on this machine (the extra sockets, wakeups and cross-core handoffs), so the
//! gateway's figures can be split into the hop and the gateway's own work.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Serves on `listener` until `shutdown`, forwarding to `upstreams` (`host:port`) in turn.
pub async fn serve(listener: TcpListener, upstreams: Vec<String>, shutdown: CancellationToken) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let upstreams = Arc::new(upstreams);
    let next = Arc::new(AtomicUsize::new(0));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).keep_alive(true);
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let (client, upstreams, next) = (client.clone(), upstreams.clone(), next.clone());
        let service = service_fn(move |request| {
            let (client, upstreams, next) = (client.clone(), upstreams.clone(), next.clone());
            async move {
                let n = next.fetch_add(1, Ordering::Relaxed) % upstreams.len().max(1);
                let upstream = upstreams.get(n).map_or("", String::as_str);
                Ok::<_, Infallible>(forward(&client, upstream, request).await)
            }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Incoming>,
    upstream: &str,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = Uri::builder().scheme("http").authority(upstream).path_and_query(path).build()
    else {
        return bad_gateway();
    };
    *request.uri_mut() = uri;
    match client.request(request).await {
        Ok(response) => response.map(BodyExt::boxed),
        Err(_) => bad_gateway(),
    }
}

fn bad_gateway() -> Response<ProxyBody> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}
