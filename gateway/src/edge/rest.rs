//! HTTP routes besides the WebSocket: REST broadcast, health, metrics.
//!
//! Every API route is served under `/api/...` and under the public `/realtime/v1/api/...`.
//! realtime-js appends the socket's query string (`apikey`, `vsn`, …) to REST URLs and
//! percent-encodes path segments; both are handled here.

use crate::auth::Claims;
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::topics::{Broadcast, BroadcastBody, Origin, TopicKey};
use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use realtime_protocol::binary::PayloadEncoding;
use realtime_protocol::payload;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use tracing::debug;
use warp::{Filter, Rejection, Reply};

type Response = warp::reply::Response;

/// Largest REST request body (a batch may carry many messages).
const MAX_BATCH_BODY: u64 = 64 * 1024 * 1024;

/// All HTTP routes that are not the WebSocket.
pub(crate) fn routes(
    shared: Arc<Shared>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_shared = warp::any().map(move || shared.clone());
    let api = warp::path("realtime")
        .and(warp::path("v1"))
        .or(warp::any())
        .unify()
        .and(warp::path("api"));
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();

    let health = warp::path!("healthcheck")
        .and(warp::get())
        .map(|| "ok".into_response());
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(with_shared.clone())
        .map(|shared: Arc<Shared>| readiness(&shared));
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_shared.clone())
        .map(|shared: Arc<Shared>| {
            let text = render_metrics(&shared);
            let mut r = text.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        });
    let ping = api
        .and(warp::path!("ping"))
        .and(warp::get())
        .map(|| json_response(StatusCode::OK, &json!({"message": "Success"})));
    let batch = api
        .and(warp::path!("broadcast"))
        .and(warp::post())
        .and(warp::body::content_length_limit(MAX_BATCH_BODY))
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .and(with_shared.clone())
        .then(
            |headers: HeaderMap, body: Bytes, shared: Arc<Shared>| async move {
                broadcast_batch(&shared, &headers, &body).await
            },
        );
    let single = api
        .and(warp::path!("broadcast" / String / "events" / String))
        .and(warp::post())
        .and(warp::body::content_length_limit(MAX_BATCH_BODY))
        .and(query)
        .and(warp::header::headers_cloned())
        .and(warp::body::bytes())
        .and(with_shared)
        .then(
            |topic: String,
             event: String,
             query: String,
             headers: HeaderMap,
             body: Bytes,
             shared: Arc<Shared>| async move {
                broadcast_single(&shared, &topic, &event, &query, &headers, body).await
            },
        );
    let cors = warp::cors()
        .allow_any_origin()
        .allow_methods(["GET", "POST", "OPTIONS"])
        .allow_headers([
            "authorization",
            "apikey",
            "x-api-key",
            "content-type",
            "x-client-info",
            "x-supabase-api-version",
            "accept",
            "prefer",
        ])
        .max_age(86_400);
    health
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(ping)
        .unify()
        .or(batch)
        .unify()
        .or(single)
        .unify()
        .with(cors)
        .map(Reply::into_response)
        .recover(rejection)
        .unify()
}

/// The Prometheus text: the counters, and the change stream's and the slot's state.
fn render_metrics(shared: &Shared) -> String {
    let mut text = shared.metrics.render();
    if let Some(cluster) = &shared.cluster {
        text.push_str(&cluster.render_metrics());
    }
    if let Some(pg) = &shared.postgres {
        let lag = pg.lag.lag();
        let streaming = u8::from(pg.lag.is_streaming());
        let halted = u8::from(pg.is_halted());
        let (gaps, _) = pg.lag.gaps();
        let (retained, status) = pg.lag.retained();
        let (memory_bytes, memory_rows) = pg.deletes.usage();
        let parked = pg.parked.load(std::sync::atomic::Ordering::Relaxed);
        let held = pg.held_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let unresumable = pg
            .resume
            .as_ref()
            .map_or(0, |s| s.full.load(std::sync::atomic::Ordering::Relaxed));
        let mut statuses = String::new();
        for s in realtime_wal_listener::listener::WAL_STATUSES {
            statuses.push_str(&format!(
                "realtime_wal_slot_status{{status=\"{s}\"}} {}\n",
                u8::from(status == Some(s))
            ));
        }
        text.push_str(&format!(
            "# HELP realtime_wal_streaming Whether the WAL stream is live.\n# TYPE realtime_wal_streaming gauge\nrealtime_wal_streaming {streaming}\n\
             # HELP realtime_wal_halted Whether the WAL stream stopped for good (see the log and /ready).\n# TYPE realtime_wal_halted gauge\nrealtime_wal_halted {halted}\n\
             # HELP realtime_wal_gaps_total Times the replication slot was lost and recreated (changes lost; subscribers were told).\n# TYPE realtime_wal_gaps_total counter\nrealtime_wal_gaps_total {gaps}\n\
             # HELP realtime_delete_memory_bytes Bytes of RLS-table rows remembered for DELETEs that carry only the key.\n# TYPE realtime_delete_memory_bytes gauge\nrealtime_delete_memory_bytes {memory_bytes}\n\
             # HELP realtime_delete_memory_rows RLS-table rows remembered for DELETEs.\n# TYPE realtime_delete_memory_rows gauge\nrealtime_delete_memory_rows {memory_rows}\n\
             # HELP realtime_resume_parked Channels parked for resume (their socket went away without leaving).\n# TYPE realtime_resume_parked gauge\nrealtime_resume_parked {parked}\n\
             # HELP realtime_resume_held_bytes WAL between the oldest position a live or parked channel needs and the newest change.\n# TYPE realtime_resume_held_bytes gauge\nrealtime_resume_held_bytes {held}\n\
             # HELP realtime_resume_unresumable_total Channels that got no resume slot (RESUME_SLOTS full).\n# TYPE realtime_resume_unresumable_total counter\nrealtime_resume_unresumable_total {unresumable}\n\
             # HELP realtime_wal_slot_retained_bytes WAL the replication slot keeps on the server.\n# TYPE realtime_wal_slot_retained_bytes gauge\nrealtime_wal_slot_retained_bytes {retained}\n\
             # HELP realtime_wal_slot_status The slot's wal_status (lost: invalidated).\n# TYPE realtime_wal_slot_status gauge\n{statuses}\
             # HELP realtime_wal_lag_bytes WAL bytes not yet confirmed to Postgres.\n# TYPE realtime_wal_lag_bytes gauge\nrealtime_wal_lag_bytes {}\n\
             # HELP realtime_wal_lag_seconds Age of the oldest unacknowledged transaction.\n# TYPE realtime_wal_lag_seconds gauge\nrealtime_wal_lag_seconds {}\n",
            lag.bytes, lag.seconds
        ));
    }
    text
}

/// How long the change stream may be down before the readiness probe fails (a reconnect takes
/// well under this).
const READINESS_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// `GET /ready`: 503 only when changes cannot progress (the stream stopped for good, or the
/// database or slot has been unreachable for [`READINESS_GRACE`]), never for lag alone.
/// `/healthcheck` stays the liveness probe.
fn readiness(shared: &Shared) -> Response {
    let Some(pg) = &shared.postgres else {
        return json_response(
            StatusCode::OK,
            &json!({"status": "ready", "postgres": "off"}),
        );
    };
    match pg.readiness(READINESS_GRACE) {
        Ok(()) => json_response(
            StatusCode::OK,
            &json!({"status": "ready", "postgres": "streaming"}),
        ),
        Err(reason) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "not_ready", "reason": reason}),
        ),
    }
}

async fn rejection(rejection: Rejection) -> Result<Response, Infallible> {
    let (status, message) = if rejection.is_not_found() {
        (StatusCode::NOT_FOUND, "Not Found")
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        (StatusCode::PAYLOAD_TOO_LARGE, "Payload Too Large")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        (StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
    } else if rejection
        .find::<warp::filters::cors::CorsForbidden>()
        .is_some()
    {
        (StatusCode::FORBIDDEN, "CORS request forbidden")
    } else {
        debug!(?rejection, "request rejected");
        (StatusCode::BAD_REQUEST, "Bad Request")
    };
    Ok(json_response(status, &json!({ "message": message })))
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    warp::reply::with_status(warp::reply::json(body), status).into_response()
}

fn accepted() -> Response {
    warp::reply::with_status(warp::reply(), StatusCode::ACCEPTED).into_response()
}

fn unauthorized() -> Response {
    json_response(
        StatusCode::UNAUTHORIZED,
        &json!({"message": "Unauthorized"}),
    )
}

/// REST callers authenticate with `Authorization: Bearer <jwt>` (preferred) or `apikey`.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Option<Claims> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let token = bearer.or_else(|| headers.get("apikey").and_then(|v| v.to_str().ok()))?;
    shared.verifier.verify(token).ok()
}

/// Whether the caller may broadcast to a private topic (RLS write check); no database, no.
async fn may_write(shared: &Shared, claims: &Claims, headers: &HeaderMap, topic: &str) -> bool {
    let Some(pg) = &shared.postgres else {
        return false;
    };
    let claims_json = Value::Object((*claims.all).clone()).to_string();
    let request_headers: serde_json::Map<String, Value> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), Value::from(v.to_str().ok()?))))
        .collect();
    let request_headers = Value::Object(request_headers).to_string();
    let ctx = crate::db::authorization::Context {
        role: &claims.role,
        claims: &claims_json,
        sub: claims.all.get("sub").and_then(Value::as_str).unwrap_or(""),
        topic,
        headers: &request_headers,
    };
    match crate::db::authorization::write(&pg.db, &ctx, "broadcast").await {
        Ok(allowed) => allowed,
        Err(e) => {
            tracing::warn!(topic, error = ?e, "REST write check failed");
            false
        }
    }
}

/// `POST /api/broadcast`: `{"messages":[{topic, event, payload, private?, id?}]}`.
async fn broadcast_batch(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(claims) = authenticate(shared, headers) else {
        return unauthorized();
    };
    let valid = match validate_batch(body, shared.config.max_payload_bytes()) {
        Ok(valid) => valid,
        Err(errors) => return json_response(StatusCode::UNPROCESSABLE_ENTITY, &errors),
    };
    // Private messages: each topic's write policy is checked once with the caller's claims;
    // topics that fail are skipped silently (the request still succeeds), as the reference does.
    let mut allowed: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    for m in valid.iter().filter(|m| m.private) {
        if !allowed.contains_key(&m.topic) {
            let ok = may_write(shared, &claims, headers, &m.topic).await;
            allowed.insert(m.topic.clone(), ok);
        }
    }
    for m in valid {
        Metrics::add(&shared.metrics.rest_broadcasts_total, 1);
        if m.private && allowed.get(&m.topic) != Some(&true) {
            debug!(topic = %m.topic, "private REST broadcast skipped: write denied");
            continue;
        }
        let meta = m.id.map(|id| json!({ "id": id }).to_string());
        let body = payload::user_broadcast_json(&m.event, m.payload, meta.as_deref());
        let delivery = shared.registry.publish(&Broadcast {
            topic: TopicKey {
                private: m.private,
                topic: Arc::from(format!("realtime:{}", m.topic)),
            },
            origin: Origin {
                node: shared.registry.node(),
                member: None,
            },
            skip_origin: false,
            body: BroadcastBody::Push {
                payload: body.into(),
            },
        });
        Metrics::add(&shared.metrics.dropped_deliveries, delivery.dropped);
    }
    accepted()
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<&'a RawValue>>,
}
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default)]
    topic: Option<Value>,
    #[serde(default)]
    event: Option<Value>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    private: Option<Value>,
    #[serde(default)]
    id: Option<Value>,
}
struct Valid<'a> {
    topic: String,
    event: String,
    payload: &'a str,
    private: bool,
    id: Option<String>,
}

/// The batch's messages, or the body of the reference's 422 answer, naming what is wrong with
/// each message.
fn validate_batch(body: &[u8], max: usize) -> Result<Vec<Valid<'_>>, Value> {
    let blank = || json!({"errors": {"messages": ["can't be blank"]}});
    let Ok(Batch {
        messages: Some(messages),
    }) = serde_json::from_slice::<Batch<'_>>(body)
    else {
        return Err(blank());
    };
    if messages.is_empty() {
        return Err(blank());
    }
    let mut valid = Vec::with_capacity(messages.len());
    let mut errors = Vec::with_capacity(messages.len());
    for raw in messages {
        match validate_message(raw, max) {
            Ok(m) => {
                valid.push(m);
                errors.push(json!({}));
            }
            Err(e) => errors.push(e),
        }
    }
    if valid.len() != errors.len() {
        return Err(json!({"errors": {"messages": errors}}));
    }
    Ok(valid)
}

/// One message of a batch, or its errors by field.
fn validate_message(raw: &RawValue, max: usize) -> Result<Valid<'_>, Value> {
    let mut e = serde_json::Map::new();
    let Ok(m) = serde_json::from_str::<Message<'_>>(raw.get())
        .map_err(|_| ())
        .and_then(|m| {
            if raw.get().trim_start().starts_with('{') {
                Ok(m)
            } else {
                Err(())
            }
        })
    else {
        return Err(json!({"message": ["is invalid"]}));
    };
    let text = |v: &Option<Value>, name: &str, e: &mut serde_json::Map<String, Value>| match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            e.insert(name.into(), json!(["can't be blank"]));
            None
        }
        Some(_) => {
            e.insert(name.into(), json!(["is invalid"]));
            None
        }
    };
    let topic = text(&m.topic, "topic", &mut e);
    let event = text(&m.event, "event", &mut e);
    let payload = match m.payload {
        None => {
            e.insert("payload".into(), json!(["can't be blank"]));
            None
        }
        Some(p) if !p.get().trim_start().starts_with('{') => {
            e.insert("payload".into(), json!(["is invalid"]));
            None
        }
        Some(p) if p.get().len() > max => {
            e.insert(
                "payload".into(),
                json!(["Payload size exceeds tenant limit"]),
            );
            None
        }
        Some(p) => Some(p.get()),
    };
    let private = match &m.private {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s))
            if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false") =>
        {
            s.eq_ignore_ascii_case("true")
        }
        Some(_) => {
            e.insert("private".into(), json!(["is invalid"]));
            false
        }
    };
    let id = match &m.id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if uuid::Uuid::parse_str(s).is_ok() => Some(s.clone()),
        Some(_) => {
            e.insert("id".into(), json!(["is invalid"]));
            None
        }
    };
    match (topic, event, payload) {
        (Some(topic), Some(event), Some(payload)) if e.is_empty() => Ok(Valid {
            topic,
            event,
            payload,
            private,
            id,
        }),
        _ => Err(Value::Object(e)),
    }
}

/// `POST /api/broadcast/:topic/events/:event[?private=true]`: the body is the user payload,
/// JSON or raw bytes, delivered as a user broadcast.
async fn broadcast_single(
    shared: &Shared,
    topic: &str,
    event: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (topic, event) = (decode(topic), decode(event));
    let private = super::query::query_param(Some(query), "private")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let encoding = match mime.as_str() {
        "application/json" | "" => PayloadEncoding::Json,
        "application/octet-stream" => PayloadEncoding::Binary,
        _ => {
            return json_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &json!({"error": "Unsupported Media Type. Use application/json or application/octet-stream"}),
            );
        }
    };
    let Some(claims) = authenticate(shared, headers) else {
        return unauthorized();
    };
    let invalid = |field: &str, message: &str| {
        json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"errors": { field: [message] }}),
        )
    };
    if topic.trim().is_empty() {
        return invalid("topic", "can't be blank");
    }
    if event.trim().is_empty() {
        return invalid("event", "can't be blank");
    }
    if body.len() > shared.config.max_payload_bytes() {
        return invalid("payload", "Payload size exceeds tenant limit");
    }
    if encoding == PayloadEncoding::Json && serde_json::from_slice::<&RawValue>(&body).is_err() {
        return invalid("payload", "is invalid");
    }
    if private && !may_write(shared, &claims, headers, &topic).await {
        return json_response(StatusCode::FORBIDDEN, &json!({"message": "Unauthorized"}));
    }
    Metrics::add(&shared.metrics.rest_broadcasts_total, 1);
    let delivery = shared.registry.publish(&Broadcast {
        topic: TopicKey {
            private,
            topic: Arc::from(format!("realtime:{topic}")),
        },
        origin: Origin {
            node: shared.registry.node(),
            member: None,
        },
        skip_origin: false,
        body: BroadcastBody::User {
            event: event.into(),
            metadata: None,
            encoding,
            payload: body,
        },
    });
    Metrics::add(&shared.metrics.dropped_deliveries, delivery.dropped);
    accepted()
}
