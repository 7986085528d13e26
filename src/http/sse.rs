//! Legacy HTTP+SSE transport, an adapter over [`crate::bridge::Session`]: `GET /NAME/sse` opens
//! a session whose messages flow as `message` events after a first `endpoint` event;
//! `POST /NAME/message?sessionId=…` answers 202. Malformed bodies get 400 with a JSON-RPC error
//! body (not a stream event): the sender sees it at once, and the session stays usable. The
//! session lives as long as its stream; a client that stops reading it fills the session's
//! budget and the session ends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::edge::Principal;
use super::{open_error, parse_body, Parsed, Shared};
use crate::bridge::Transport;

pub async fn get(st: Shared, server: String, principal: Principal) -> Response {
    let session = match st.sup.open_session(&server, principal, Transport::LegacySse).await {
        Ok(x) => x,
        Err(e) => return open_error(e),
    };
    let endpoint = format!("{}/{}/message?sessionId={}", st.prefix, server, session.id);
    let Some(events) = session.events(None) else {
        return (StatusCode::CONFLICT, "this session already has a stream\n").into_response();
    };
    let first = futures_util::stream::once(async move { Event::default().event("endpoint").data(endpoint) });
    let rest = futures_util::stream::unfold(events, |mut events| async move {
        let (_, body) = events.next().await?;
        Some((Event::default().event("message").data(String::from_utf8_lossy(&body)), events))
    });
    Sse::new(first.chain(rest).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn serde_urlencoded_query(query: &str) -> Option<HashMap<String, String>> {
    let uri: axum::http::Uri = format!("/?{query}").parse().ok()?;
    axum::extract::Query::<HashMap<String, String>>::try_from_uri(&uri).ok().map(|q| q.0)
}

pub async fn post(st: Shared, server: String, principal: Principal, query: &str, body: Bytes) -> Response {
    let Some(srv) = st.sup.server(&server) else {
        return (StatusCode::NOT_FOUND, "no such server\n").into_response();
    };
    let q: HashMap<String, String> = match serde_urlencoded_query(query) {
        Some(q) => q,
        None => return (StatusCode::BAD_REQUEST, "malformed query string\n").into_response(),
    };
    let Some(sid) = q.get("sessionId") else {
        return (StatusCode::BAD_REQUEST, "sessionId is required\n").into_response();
    };
    let Some(session) = srv.session(sid, &principal).filter(|s| s.transport == Transport::LegacySse) else {
        return (StatusCode::NOT_FOUND, "unknown or ended session\n").into_response();
    };
    match parse_body(&body) {
        Err(e) => {
            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
            (StatusCode::BAD_REQUEST, [(axum::http::header::CONTENT_TYPE, "application/json")], e.to_string())
                .into_response()
        }
        Ok(Parsed::One(v)) => {
            session.send(v);
            (StatusCode::ACCEPTED, "Accepted").into_response()
        }
        Ok(Parsed::Batch(items)) => {
            for v in items {
                session.send(v);
            }
            (StatusCode::ACCEPTED, "Accepted").into_response()
        }
    }
}
