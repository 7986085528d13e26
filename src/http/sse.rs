//! Legacy HTTP+SSE transport: `GET /NAME/sse` opens a session whose messages flow as `message`
//! events after a first `endpoint` event; `POST /NAME/message?sessionId=…` answers 202.
//! Malformed bodies get 400 with a JSON-RPC error body (not a stream event): the sender sees
//! it at once, and the session stays usable.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use super::edge::Principal;
use super::{open_error, parse_body, Parsed, Shared};
use crate::supervisor::Session;

/// Ends the session when the client's stream goes away.
pub(crate) struct StreamGuard {
    pub session: Arc<Session>,
    pub end_session: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.session.streams.fetch_sub(1, Ordering::Relaxed);
        self.session.touch();
        if self.end_session {
            self.session.close("SSE client disconnected");
        }
    }
}

pub async fn get(st: Shared, server: String, principal: Principal) -> Response {
    let (session, rx) = match st.sup.open_session(&server, principal).await {
        Ok(x) => x,
        Err(e) => return open_error(e),
    };
    session.streams.fetch_add(1, Ordering::Relaxed);
    let endpoint = format!("{}/{}/message?sessionId={}", st.prefix, server, session.id);
    let guard = StreamGuard { session, end_session: true };
    let first = futures_util::stream::once(async move { Event::default().event("endpoint").data(endpoint) });
    let rest = ReceiverStream::new(rx).map(move |o| {
        let _keep = &guard;
        Event::default().event("message").data(String::from_utf8_lossy(&o.body))
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
    // Another principal's session is as unknown as one that never existed.
    let Some(session) = srv.session(sid).filter(|s| !s.closed.is_cancelled() && s.principal == principal) else {
        return (StatusCode::NOT_FOUND, "unknown or ended session\n").into_response();
    };
    match parse_body(&body) {
        Err(e) => {
            srv.metrics.errors.fetch_add(1, Ordering::Relaxed);
            (StatusCode::BAD_REQUEST, [(axum::http::header::CONTENT_TYPE, "application/json")], e.to_string()).into_response()
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
