//! The control API: HTTP/1.1 with JSON on the daemon's unix socket.
//!
//! | Method and path                        | What                                   |
//! |----------------------------------------|----------------------------------------|
//! | `GET /v1/volumes`                      | every volume, its state and device     |
//! | `GET /v1/volumes/NAME`                 | one volume with its tracking status    |
//! | `POST /v1/volumes/NAME/snapshots`      | close the open epoch now               |
//! | `GET /v1/volumes/NAME/snapshots`       | the snapshots stored at its destination|
//! | `GET /v1/destinations`                 | each volume's destinations and health  |
//! | `POST /v1/restores`                    | restore a snapshot to a new file       |
//! | `GET /v1/restores`, `/v1/restores/ID`  | restores and their progress            |
//!
//! A tenant scopes every request with the `X-Foresnap-Tenant` header or
//! `?tenant=`: the volumes of other tenants are then not found. Every error
//! is a 4xx or 5xx status with a body `{"error": "..."}`, one line.
//!
//! One request per connection (`Connection: close`): the clients are the
//! CLI and scripts, and a request's cost is the work behind it, not the
//! connection.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::{NAME_RULE, valid_name};

/// The longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 << 10;
/// The longest request body accepted.
pub const MAX_BODY: usize = 64 << 10;
/// The tenant header.
pub const TENANT_HEADER: &str = "X-Foresnap-Tenant";

/// A refused request: the status and the reason, sent as `{"error": ...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// Path segments after the leading `/`, without the query.
    pub segments: Vec<String>,
    pub tenant: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// Decodes one request from the start of `buf`: `Ok(None)` while more bytes
/// are needed, else the request and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Request, usize)>, ApiError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(ApiError::new(
                431,
                format!("request head over {MAX_HEAD} bytes"),
            ));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::new(431, "more than 32 headers"));
        }
        Err(e) => return Err(ApiError::bad(format!("not an HTTP request: {e}"))),
    };
    if head > MAX_HEAD {
        return Err(ApiError::new(
            431,
            format!("request head over {MAX_HEAD} bytes"),
        ));
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        Some(m) => {
            return Err(ApiError::new(
                405,
                format!("method {m} is not served: use GET or POST"),
            ));
        }
        None => return Err(ApiError::bad("no method")),
    };
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if !path.starts_with('/') {
        return Err(ApiError::bad(format!("{path:?} is not an absolute path")));
    }
    let mut tenant = None;
    let mut length = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| ApiError::bad("Content-Length is not a number"))?;
            if length.is_some_and(|l| l != n) {
                return Err(ApiError::bad("two different Content-Length headers"));
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ApiError::new(
                411,
                "chunked bodies are not accepted: send Content-Length",
            ));
        } else if h.name.eq_ignore_ascii_case(TENANT_HEADER) {
            let t = std::str::from_utf8(h.value)
                .map_err(|_| ApiError::bad(format!("{TENANT_HEADER} is not UTF-8")))?;
            tenant = Some(t.trim().to_owned());
        }
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("tenant", t)) => {
                if tenant.as_deref().is_some_and(|h| h != t) {
                    return Err(ApiError::bad(format!(
                        "?tenant={t} and {TENANT_HEADER} disagree"
                    )));
                }
                tenant = Some(t.to_owned());
            }
            _ => {
                return Err(ApiError::bad(format!(
                    "unknown query parameter {pair:?}: only tenant"
                )));
            }
        }
    }
    if let Some(t) = &tenant
        && !valid_name(t)
    {
        return Err(ApiError::bad(format!("tenant {t:?}: {NAME_RULE}")));
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY {
        return Err(ApiError::new(
            413,
            format!("body of {length} bytes: at most {MAX_BODY}"),
        ));
    }
    let Some(body) = buf.get(head..head + length) else {
        return Ok(None);
    };
    let segments = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(Some((
        Request {
            method,
            segments,
            tenant,
            body: body.to_vec(),
        },
        head + length,
    )))
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Volumes,
    Volume(String),
    Snapshot(String),
    Snapshots(String),
    Destinations,
    /// `[[replica]]`s and how far each has followed.
    Replicas,
    /// `[[tier]]`s and what each last moved.
    Tiers,
    StartRestore(RestoreRequest),
    Restores,
    Restore(u64),
}

/// The body of `POST /v1/restores`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The volume whose destination holds the snapshot.
    pub volume: String,
    /// A snapshot id; the latest if absent.
    #[serde(default)]
    pub snapshot: Option<u32>,
    /// A new file to create (never overwritten), absolute.
    pub to: String,
}

/// Routes a decoded request.
pub fn route(req: &Request) -> Result<Call, ApiError> {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let name = |n: &str| {
        if valid_name(n) {
            Ok(n.to_owned())
        } else {
            Err(ApiError::new(404, format!("no volume {n:?}: {NAME_RULE}")))
        }
    };
    let no_body = |call: Call| {
        if req.body.is_empty() {
            Ok(call)
        } else {
            Err(ApiError::bad("this request takes no body"))
        }
    };
    let wrong = |allowed: &str| {
        Err(ApiError::new(
            405,
            format!("/{} accepts only {allowed}", req.segments.join("/")),
        ))
    };
    use Method::{Get, Post};
    match (req.method, segs.as_slice()) {
        (Get, ["v1", "volumes"]) => no_body(Call::Volumes),
        (Get, ["v1", "volumes", n]) => no_body(Call::Volume(name(n)?)),
        (Post, ["v1", "volumes", n, "snapshots"]) => no_body(Call::Snapshot(name(n)?)),
        (Get, ["v1", "volumes", n, "snapshots"]) => no_body(Call::Snapshots(name(n)?)),
        (Get, ["v1", "destinations"]) => no_body(Call::Destinations),
        (Get, ["v1", "replicas"]) => no_body(Call::Replicas),
        (Get, ["v1", "tiers"]) => no_body(Call::Tiers),
        (Get, ["v1", "restores"]) => no_body(Call::Restores),
        (Post, ["v1", "restores"]) => {
            let r: RestoreRequest = serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::bad(format!("restore request: {e}")))?;
            if !valid_name(&r.volume) {
                return Err(ApiError::bad(format!("volume {:?}: {NAME_RULE}", r.volume)));
            }
            if !r.to.starts_with('/') || r.to.contains('\0') {
                return Err(ApiError::bad(format!(
                    "to {:?}: give an absolute path for the new file",
                    r.to
                )));
            }
            Ok(Call::StartRestore(r))
        }
        (Get, ["v1", "restores", id]) => match id.parse() {
            Ok(id) => no_body(Call::Restore(id)),
            Err(_) => Err(ApiError::new(404, format!("no restore {id:?}"))),
        },
        (
            Post,
            ["v1", "volumes"]
            | ["v1", "volumes", _]
            | ["v1", "destinations"]
            | ["v1", "replicas"]
            | ["v1", "tiers"],
        )
        | (Post, ["v1", "restores", _]) => wrong("GET"),
        _ => Err(ApiError::new(
            404,
            format!("no resource /{}", req.segments.join("/")),
        )),
    }
}

/// The reason phrase of the statuses the daemon sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// A whole response with a JSON body.
pub fn response(status: u16, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    )
    .into_bytes()
}

/// The response of an error.
pub fn error_response(e: &ApiError) -> Vec<u8> {
    response(e.status, &json!({ "error": e.message }))
}

/// Client side: a request's bytes.
pub fn request_bytes(
    method: Method,
    path: &str,
    tenant: Option<&str>,
    body: Option<&Value>,
) -> Vec<u8> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!(
        "{} {path} HTTP/1.1\r\nHost: foresnap\r\nConnection: close\r\nContent-Length: {}\r\n",
        match method {
            Method::Get => "GET",
            Method::Post => "POST",
        },
        body.len()
    );
    if let Some(t) = tenant {
        head.push_str(&format!("{TENANT_HEADER}: {t}\r\n"));
    }
    head.push_str("\r\n");
    head.push_str(&body);
    head.into_bytes()
}

/// Client side: the status and JSON body of a whole response.
pub fn parse_response(buf: &[u8]) -> Result<(u16, Value), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the daemon's answer is cut short".into()),
        Err(e) => return Err(format!("the daemon's answer is not HTTP: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let body = serde_json::from_slice(&buf[head..])
        .map_err(|e| format!("the daemon's answer (status {status}) is not JSON: {e}"))?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(raw: &str) -> Result<Call, ApiError> {
        let (req, n) = decode(raw.as_bytes())?.expect("complete");
        assert_eq!(n, raw.len());
        route(&req)
    }

    #[test]
    fn requests_route_to_calls() {
        let get = |p: &str| call(&format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(get("/v1/volumes"), Ok(Call::Volumes));
        assert_eq!(get("/v1/volumes/db"), Ok(Call::Volume("db".into())));
        assert_eq!(
            get("/v1/volumes/db/snapshots"),
            Ok(Call::Snapshots("db".into()))
        );
        assert_eq!(get("/v1/destinations?tenant=acme"), Ok(Call::Destinations));
        assert_eq!(get("/v1/replicas?tenant=acme"), Ok(Call::Replicas));
        assert_eq!(get("/v1/tiers"), Ok(Call::Tiers));
        assert_eq!(get("/v1/restores/7"), Ok(Call::Restore(7)));
        assert_eq!(
            call("POST /v1/volumes/db/snapshots HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(Call::Snapshot("db".into()))
        );
        let body = r#"{"volume":"db","snapshot":3,"to":"/tmp/r.img"}"#;
        assert_eq!(
            call(&format!(
                "POST /v1/restores HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )),
            Ok(Call::StartRestore(RestoreRequest {
                volume: "db".into(),
                snapshot: Some(3),
                to: "/tmp/r.img".into()
            }))
        );
    }

    #[test]
    fn the_tenant_comes_from_the_header_or_the_query() {
        let t = |raw: &str| decode(raw.as_bytes()).map(|r| r.unwrap().0.tenant);
        assert_eq!(t("GET /v1/volumes HTTP/1.1\r\n\r\n"), Ok(None));
        assert_eq!(
            t("GET /v1/volumes HTTP/1.1\r\nx-foresnap-tenant: acme\r\n\r\n"),
            Ok(Some("acme".into()))
        );
        assert_eq!(
            t("GET /v1/volumes?tenant=acme HTTP/1.1\r\n\r\n"),
            Ok(Some("acme".into()))
        );
        assert_eq!(
            t("GET /v1/volumes?tenant=a HTTP/1.1\r\nX-Foresnap-Tenant: b\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            t("GET /v1/volumes?tenant=A%20B HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn partial_requests_wait_and_bad_ones_get_a_status() {
        assert_eq!(decode(b"GET /v1/vol"), Ok(None));
        assert_eq!(
            decode(b"POST /v1/restores HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\""),
            Ok(None)
        );
        let status = |raw: &[u8]| match decode(raw) {
            Ok(Some((r, _))) => route(&r).unwrap_err().status,
            Ok(None) => 0,
            Err(e) => e.status,
        };
        assert_eq!(status(b"DELETE /v1/volumes HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"POST /v1/volumes HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(b"GET /v2/volumes HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status(b"GET /v1/volumes/No%20Such HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status(b"GET /v1/restores/x HTTP/1.1\r\n\r\n"), 404);
        assert_eq!(status(b"GET /v1/volumes?x=1 HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"\x00\x01 nonsense\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET /v1/volumes HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET /v1/volumes HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"POST /v1/restores HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(
            status(b"POST /v1/restores HTTP/1.1\r\nContent-Length: 999999\r\n\r\n"),
            413
        );
        let big = format!(
            "GET /v1/volumes HTTP/1.1\r\nX-A: {}\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(status(big.as_bytes()), 431);
        let post = |body: &str| {
            status(
                format!(
                    "POST /v1/restores HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
        };
        assert_eq!(post("{"), 400);
        assert_eq!(post(r#"{"volume":"db","to":"rel.img"}"#), 400);
        assert_eq!(post(r#"{"volume":"DB","to":"/r.img"}"#), 400);
        assert_eq!(post(r#"{"volume":"db","to":"/r.img","x":1}"#), 400);
        assert_eq!(
            status(b"GET /v1/volumes HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            400,
            "a GET with a body"
        );
    }

    #[test]
    fn responses_round_trip_through_the_client_parser() {
        let r = response(201, &json!({"snapshot": 4}));
        assert_eq!(parse_response(&r), Ok((201, json!({"snapshot": 4}))));
        let e = error_response(&ApiError::new(404, "no volume \"x\""));
        assert_eq!(
            parse_response(&e),
            Ok((404, json!({"error": "no volume \"x\""})))
        );
        let req = request_bytes(
            Method::Post,
            "/v1/restores",
            Some("acme"),
            Some(&json!({"volume":"db","to":"/r"})),
        );
        let (d, n) = decode(&req).unwrap().unwrap();
        assert_eq!(n, req.len());
        assert_eq!(d.tenant.as_deref(), Some("acme"));
        assert!(matches!(route(&d), Ok(Call::StartRestore(_))));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json").is_err());
    }
}
