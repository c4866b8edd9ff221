//! The HTTP listener: WebSocket upgrades on the socket paths, everything else to the warp routes
//! of `rest`.
//!
//! Connections are served with hyper directly so the upgrade can hand the raw connection to
//! tokio-tungstenite: warp's own `ws::Message::text` only takes a `String`, which would copy
//! every fanned-out text frame once per recipient. Here a text frame is a reference-counted
//! `Utf8Bytes` shared by all recipients.

use super::query::query_param;
use crate::auth::AuthError;
use crate::channel::SocketParams;
use crate::metrics::Metrics;
use crate::socket;
use crate::state::Shared;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use realtime_protocol::Vsn;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tower_service::Service;
use tracing::{Instrument, debug, info_span, warn};
use warp::Reply;

type WarpResponse = warp::reply::Response;

/// Accepts connections until shutdown.
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let routes = warp::service(super::rest::routes(shared.clone()));
    loop {
        let (stream, peer) = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let span = info_span!("conn", %peer);
        let task = serve_connection(shared.clone(), routes.clone(), stream).instrument(span);
        shared.tracker.spawn(task);
    }
}

async fn serve_connection<R>(shared: Arc<Shared>, routes: R, stream: TcpStream)
where
    R: Service<Request<Incoming>, Response = WarpResponse, Error = Infallible>
        + Clone
        + Send
        + 'static,
    R::Future: Send,
{
    let shutdown = shared.shutdown.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let mut routes = routes.clone();
        async move {
            if is_websocket_path(req.uri().path()) {
                Ok::<_, Infallible>(upgrade(shared, req).await)
            } else {
                routes.call(req).await
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    // On shutdown an idle keep-alive connection closes at once, a busy one after its response.
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "http connection ended with an error");
    }
}

/// `/socket/websocket` and `/realtime/v1/websocket`, tolerating repeated slashes.
fn is_websocket_path(path: &str) -> bool {
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some("socket"), Some("websocket"), None, None)
            | (Some("realtime"), Some("v1"), Some("websocket"), None)
    )
}

/// Checks the connect request and, when it passes, upgrades it to a WebSocket served by
/// [`socket::serve`].
async fn upgrade(shared: Arc<Shared>, mut req: Request<Incoming>) -> WarpResponse {
    let query = req.uri().query();
    let Some(vsn) = Vsn::from_query(query_param(query, "vsn").as_deref()) else {
        Metrics::add(&shared.metrics.connections_refused, 1);
        return empty(StatusCode::FORBIDDEN);
    };
    let Some(key) = websocket_key(req.headers()) else {
        return text(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade request",
        );
    };
    let token = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| query_param(query, "apikey"));
    let verified = match &token {
        None => Err(AuthError::Missing),
        Some(token) => shared.verifier.verify(token),
    };
    if let Err(e) = verified {
        Metrics::add(&shared.metrics.connections_refused, 1);
        // The refusal waits, as the reference does, but never holds up shutdown.
        tokio::select! {
            () = tokio::time::sleep(shared.config.connect_error_backoff()) => {}
            () = shared.shutdown.cancelled() => {}
        }
        let (status, message) = e.connect_response();
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
        return json(status, &serde_json::json!({ "error": message }).to_string());
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-"))
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.into())))
        .collect();
    let params = SocketParams {
        vsn,
        connect_token: token.unwrap_or_default(),
        headers: Arc::from(serde_json::Value::Object(headers).to_string()),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(8192)
        .max_message_size(Some(shared.config.max_frame_size))
        .max_frame_size(Some(shared.config.max_frame_size));
    let task_shared = shared.clone();
    shared.tracker.spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(config),
                    )
                    .await;
                    socket::serve(task_shared, ws, params).await;
                }
                Err(e) => debug!(error = %e, "websocket upgrade failed"),
            }
        }
        .instrument(info_span!("socket", ?vsn)),
    );
    let mut response = empty(StatusCode::SWITCHING_PROTOCOLS);
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

fn websocket_key(headers: &HeaderMap) -> Option<String> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(header::CONNECTION, "upgrade") || !has_token(header::UPGRADE, "websocket") {
        return None;
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)?
        .to_str()
        .ok()
        .map(str::to_owned)
}

fn empty(status: StatusCode) -> WarpResponse {
    warp::reply::with_status(warp::reply(), status).into_response()
}

fn text(status: StatusCode, body: &'static str) -> WarpResponse {
    warp::reply::with_status(body, status).into_response()
}

fn json(status: StatusCode, body: &str) -> WarpResponse {
    let mut response = warp::reply::with_status(body.to_owned(), status).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_paths() {
        for ok in [
            "/socket/websocket",
            "/realtime/v1/websocket",
            "/realtime/v1//websocket",
            "//socket/websocket/",
        ] {
            assert!(is_websocket_path(ok), "{ok}");
        }
        for bad in [
            "/",
            "/socket",
            "/realtime/v1/api/broadcast",
            "/socket/websocket/x",
        ] {
            assert!(!is_websocket_path(bad), "{bad}");
        }
    }
}
