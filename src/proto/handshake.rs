//! The HTTP side of port 7701, sans-IO: parse the request head, then decide — in the
//! contract's order: path (404), upgrade (426), capacity (503), credential (403/401),
//! query (400) — between a WebSocket upgrade and a one-sentence refusal.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use super::deflate::{self, Deflate};
use crate::auth::Principal;
use crate::event::EventType;
use crate::filter::Filter;

/// Upper bound on a request head; a longer one is refused (slow or hostile clients).
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 48;

/// The parts of a request head the relay looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub upgrade_websocket: bool,
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    pub authorization: Option<String>,
    /// Sent by browsers (always, on a WebSocket upgrade); CLIs and bridges send none.
    pub origin: Option<String>,
    pub host: Option<String>,
    /// Every `Sec-WebSocket-Extensions` value, in order (offers may span several headers).
    pub extensions: Vec<String>,
}

// One per connection, matched once: boxing the request would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A complete head of `len` bytes (anything after it already belongs to the socket's
    /// next protocol).
    Complete(Request, usize),
}

pub fn parse_request(buf: &[u8]) -> Result<Parsed, Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(Response::head_too_large())
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Response::head_too_large()),
        Err(_) => return Err(Response::bad_http()),
    };
    if len > MAX_HEAD {
        return Err(Response::head_too_large());
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query,
        ..Request::default()
    };
    for h in req.headers.iter() {
        let value = || String::from_utf8_lossy(h.value).trim().to_string();
        let has_token = |t: &str| {
            std::str::from_utf8(h.value)
                .map(|v| v.split(',').any(|x| x.trim().eq_ignore_ascii_case(t)))
                .unwrap_or(false)
        };
        if h.name.eq_ignore_ascii_case("upgrade") {
            out.upgrade_websocket |= has_token("websocket");
        } else if h.name.eq_ignore_ascii_case("connection") {
            out.connection_upgrade |= has_token("upgrade");
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(value());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = Some(value());
        } else if h.name.eq_ignore_ascii_case("authorization") {
            out.authorization = Some(value());
        } else if h.name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value());
        } else if h.name.eq_ignore_ascii_case("host") {
            out.host = Some(value());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-extensions") {
            out.extensions.push(value());
        }
    }
    Ok(Parsed::Complete(out, len))
}

/// A credential as presented; its text is a secret and never logged.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Token(String),
    Passphrase(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(<redacted>)"),
            Credential::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
        }
    }
}

/// What checking a credential found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Valid(Principal),
    Invalid,
    /// Too many failed attempts from this address: retry after this many seconds.
    RateLimited(u64),
}

/// 64 hexadecimal characters: the shape of an agent token (port 7700's credential).
pub fn is_agent_token(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What the relay does with a request.
#[derive(Debug)]
pub enum Decision {
    Upgrade(Upgrade),
    /// A static page of the dashboard, answered without credentials (the page asks for them).
    Page(Page),
    Refuse(Response),
}

/// The files of the dashboard (`GET /`), embedded in the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Dashboard,
    /// The dashboard's own script (`assets/dashboard.js`).
    DashboardScript,
    /// The browser client the dashboard runs on (`examples/clients/krux-client.js`).
    ClientScript,
}

static DASHBOARD: &str = include_str!("../../assets/dashboard.html");
static DASHBOARD_SCRIPT: &str = include_str!("../../assets/dashboard.js");
static CLIENT_SCRIPT: &str = include_str!("../../examples/clients/krux-client.js");

/// For an old dashboard link with `?access_token=` (a token the browser keeps in its
/// history and would send in `Referer`): where to send it instead, the same address with
/// the token in the fragment, which no browser sends to any server.
fn dashboard_link(query: Option<&str>) -> Option<String> {
    let query = query?;
    let (mut token, mut rest) = (None, Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if decode_component(k) == "access_token" => token = Some(v),
            _ => rest.push(pair),
        }
    }
    let token = token?;
    let rest = match rest.is_empty() {
        true => String::new(),
        false => format!("?{}", rest.join("&")),
    };
    Some(format!("/{rest}#access_token={token}"))
}

/// What the dashboard's pages may do, and what nothing else may do with them: run only
/// the relay's own scripts (no inline script, so markup that slipped into the page could
/// not run), connect only back to the relay, never be framed by another site, never tell
/// another site where they were (their address may have held a token).
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

impl Page {
    pub fn response(self) -> Response {
        let (content_type, body) = match self {
            Page::Dashboard => ("text/html; charset=utf-8", DASHBOARD),
            Page::DashboardScript => ("text/javascript; charset=utf-8", DASHBOARD_SCRIPT),
            Page::ClientScript => ("text/javascript; charset=utf-8", CLIENT_SCRIPT),
        };
        Response::asset(content_type, body)
            .header("Content-Security-Policy", PAGE_POLICY.into())
            .header("X-Content-Type-Options", "nosniff".into())
            .header("X-Frame-Options", "DENY".into())
            .header("Referrer-Policy", "no-referrer".into())
    }
}

#[derive(Debug)]
pub struct Upgrade {
    pub principal: Principal,
    pub filter: Filter,
    pub since: Option<u64>,
    /// The `Sec-WebSocket-Accept` value of the `101` answer.
    pub accept: String,
    /// permessage-deflate, when the client offered it and compression is on.
    pub deflate: Option<Deflate>,
}

/// What `decide` needs to know about the server's state.
pub struct Gate<'a> {
    pub at_capacity: bool,
    pub authenticate: &'a dyn Fn(&Credential) -> Auth,
    /// Origins besides the relay's own whose pages may subscribe (`--allowed-origin`).
    pub allowed_origins: &'a [String],
    /// permessage-deflate is accepted when offered (`--compression on`).
    pub compression: bool,
}

/// Whether a browser's page may open `/events`: a request without `Origin` (not a
/// browser) may; a page from the relay's own origin (its `Host`) may; so may one from an
/// origin the operator allowed. Anything else — any other site the operator visits — may
/// not, or it could try passphrases in the operator's name until their address is locked
/// out.
pub fn origin_allowed(req: &Request, allowed: &[String]) -> bool {
    let Some(origin) = req.origin.as_deref() else {
        return true;
    };
    let origin = origin.trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // `null` (a file, a sandboxed frame) and anything malformed
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let norm = |a: &str| {
        let a = a.to_ascii_lowercase();
        a.strip_suffix(default_port)
            .map(str::to_string)
            .unwrap_or(a)
    };
    req.host
        .as_deref()
        .is_some_and(|host| norm(host) == norm(authority))
}

pub fn decide(req: &Request, gate: &Gate<'_>) -> Decision {
    if req.method == "GET" {
        match req.path.as_str() {
            "/" => {
                return match dashboard_link(req.query.as_deref()) {
                    Some(to) => Decision::Refuse(
                        Response::text(303, "The token belongs in the address's fragment.")
                            .header("Location", to)
                            .header("Referrer-Policy", "no-referrer".into()),
                    ),
                    None => Decision::Page(Page::Dashboard),
                }
            }
            "/dashboard.js" => return Decision::Page(Page::DashboardScript),
            "/krux-client.js" => return Decision::Page(Page::ClientScript),
            _ => {}
        }
    }
    if req.path != "/events" {
        return Decision::Refuse(Response::text(
            404,
            "No such endpoint; supervisors subscribe at /events.",
        ));
    }
    if req.method != "GET" {
        return Decision::Refuse(
            Response::text(405, "Only GET is supported on /events.").header("Allow", "GET".into()),
        );
    }
    if !(req.upgrade_websocket && req.connection_upgrade) {
        return Decision::Refuse(
            Response::text(
                426,
                "This endpoint streams events over WebSocket; send a WebSocket upgrade request.",
            )
            .header("Upgrade", "websocket".into())
            .header("Connection", "Upgrade".into()),
        );
    }
    if req.ws_version.as_deref() != Some("13") {
        return Decision::Refuse(
            Response::text(426, "Only WebSocket version 13 is supported.")
                .header("Sec-WebSocket-Version", "13".into()),
        );
    }
    let Some(key) = req.ws_key.as_deref().filter(|k| valid_ws_key(k)) else {
        return Decision::Refuse(Response::text(
            400,
            "The Sec-WebSocket-Key header is missing or malformed.",
        ));
    };
    // Before any credential is looked at: a refused page's attempts count for nothing.
    if !origin_allowed(req, gate.allowed_origins) {
        return Decision::Refuse(Response::text(
            403,
            "A page from another site may not subscribe (its Origin is not this relay's); the dashboard at / is, and --allowed-origin adds others.",
        ));
    }
    if gate.at_capacity {
        return Decision::Refuse(
            Response::text(503, "The relay is at its connection limit; retry shortly.")
                .header("Retry-After", "1".into()),
        );
    }
    let params = query_pairs(req.query.as_deref().unwrap_or(""));

    // Credentials. Any one that looks like an agent token is refused outright.
    let bearer = req
        .authorization
        .as_deref()
        .map(|a| match a.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => {
                rest.trim().to_string()
            }
            _ => a.to_string(),
        });
    let access_token = params
        .iter()
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v.to_string());
    let passphrase = params
        .iter()
        .find(|(k, _)| k == "passphrase")
        .map(|(_, v)| v.to_string());
    if bearer
        .iter()
        .chain(access_token.iter())
        .any(|t| is_agent_token(t))
    {
        return Decision::Refuse(Response::text(
            403,
            "Agent tokens belong on port 7700; port 7701 accepts only user tokens (krx_user_…) and the operator passphrase.",
        ));
    }
    let credential = match (bearer.or(access_token), passphrase) {
        (Some(t), _) if !t.is_empty() => Credential::Token(t),
        (_, Some(p)) if !p.is_empty() => Credential::Passphrase(p),
        _ => {
            return Decision::Refuse(unauthorized(
                "A user token (Authorization: Bearer krx_user_… or ?access_token=) or the operator passphrase is required.",
            ))
        }
    };
    let principal = match (gate.authenticate)(&credential) {
        Auth::Valid(p) => p,
        Auth::Invalid => {
            return Decision::Refuse(unauthorized(
                "The credential is not valid or has been revoked.",
            ))
        }
        Auth::RateLimited(secs) => {
            return Decision::Refuse(
                Response::text(
                    429,
                    &format!("Too many failed attempts from this address; retry in {secs} s."),
                )
                .header("Retry-After", secs.to_string()),
            )
        }
    };

    let (filter, since) = match parse_subscription(&params) {
        Ok(x) => x,
        Err(msg) => return Decision::Refuse(Response::text(400, &msg)),
    };
    let deflate = gate
        .compression
        .then(|| deflate::negotiate(req.extensions.iter().map(String::as_str)))
        .flatten();
    Decision::Upgrade(Upgrade {
        principal,
        filter,
        since,
        accept: tungstenite::handshake::derive_accept_key(key.as_bytes()),
        deflate,
    })
}

impl Upgrade {
    /// The `101 Switching Protocols` head to write. `position` is the seq of the last event
    /// published before the subscription began (`Krux-Seq`, absent when there is none): a
    /// client that has received nothing yet resumes from it without a hole.
    pub fn response(&self, position: Option<u64>) -> Vec<u8> {
        let seq = position.map_or(String::new(), |s| format!("Krux-Seq: {s}\r\n"));
        let ext = self.deflate.map_or(String::new(), |d| {
            format!("Sec-WebSocket-Extensions: {}\r\n", d.response())
        });
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{ext}{seq}\r\n",
            self.accept
        )
        .into_bytes()
    }
}

fn unauthorized(msg: &str) -> Response {
    Response::text(401, msg).header("WWW-Authenticate", "Bearer".into())
}

/// A base64 encoding of 16 bytes: 22 characters and `==`.
fn valid_ws_key(k: &str) -> bool {
    k.len() == 24
        && k.ends_with("==")
        && k[..22]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// A query component decoded (`+` is a space, as browsers encode it).
fn decode_component(s: &str) -> String {
    let s = s.replace('+', " ");
    percent_decode_str(&s).decode_utf8_lossy().into_owned()
}

/// Decoded `key=value` pairs of a query string.
pub fn query_pairs(query: &str) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                Cow::Owned(decode_component(k)),
                Cow::Owned(decode_component(v)),
            )
        })
        .collect()
}

/// The query string as it may be logged: the value of every parameter whose name,
/// decoded as the parser decodes it (so `%61ccess_token` too), is `access_token` or
/// `passphrase` (in any case) replaced; everything else kept.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _))
                if ["access_token", "passphrase"]
                    .iter()
                    .any(|name| decode_component(k).eq_ignore_ascii_case(name)) =>
            {
                format!("{k}=<redacted>")
            }
            _ => pair.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The filter and `since` of a subscription; the error is the 400 body.
pub fn parse_subscription(
    params: &[(Cow<'_, str>, Cow<'_, str>)],
) -> Result<(Filter, Option<u64>), String> {
    let mut filter = Filter::default();
    let mut since = None;
    for (k, v) in params {
        let k = k.as_ref();
        if !matches!(k, "type" | "agent" | "session" | "since") {
            continue; // credentials, and parameters this relay does not use (cache busters)
        }
        let items: Vec<&str> = v.split(',').map(str::trim).collect();
        if items.iter().any(|i| i.is_empty()) {
            return Err(format!("Query parameter `{k}` has an empty value."));
        }
        match k {
            "type" => {
                let mut mask = filter.types.unwrap_or(0);
                for name in items {
                    let t = EventType::from_name(name).ok_or_else(|| {
                        format!(
                            "Unknown event type `{}`; valid types are: {}.",
                            name.chars().take(64).collect::<String>(),
                            EventType::all_names()
                        )
                    })?;
                    mask |= t.bit();
                }
                filter.types = Some(mask);
            }
            "agent" => filter
                .agents
                .get_or_insert_with(Vec::new)
                .extend(items.into_iter().map(Into::into)),
            "session" => filter
                .sessions
                .get_or_insert_with(Vec::new)
                .extend(items.into_iter().map(Into::into)),
            _ => {
                let ok = v.bytes().all(|b| b.is_ascii_digit());
                since = Some(v.parse::<u64>().ok().filter(|_| ok).ok_or_else(|| {
                    "Query parameter `since` must be a decimal sequence number (u64).".to_string()
                })?);
            }
        }
    }
    Ok((filter, since))
}

/// A complete HTTP response that ends the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Cow<'static, str>,
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn text(status: u16, sentence: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Cow::Owned(format!("{sentence}\n")),
            headers: Vec::new(),
        }
    }

    pub fn asset(content_type: &'static str, body: &'static str) -> Response {
        Response {
            status: 200,
            content_type,
            body: Cow::Borrowed(body),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: &'static str, value: String) -> Response {
        self.headers.push((name, value));
        self
    }

    fn bad_http() -> Response {
        Response::text(400, "The request is not valid HTTP/1.1.")
    }

    fn head_too_large() -> Response {
        Response::text(431, "The request head is too large.")
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
            self.status,
            reason_phrase(self.status),
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&self.body);
        out.into_bytes()
    }
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        303 => "See Other",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const AGENT: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn head(target: &str, extra: &str) -> String {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
    }

    fn run(raw: &str, at_capacity: bool) -> Decision {
        let Parsed::Complete(req, len) = parse_request(raw.as_bytes()).unwrap() else {
            panic!("partial")
        };
        assert_eq!(len, raw.len());
        let auth = |c: &Credential| match c {
            Credential::Token(t) if t == "krx_user_good" => Auth::Valid(Principal::User([1; 32])),
            Credential::Passphrase(p) if p == "open sesame" => {
                Auth::Valid(Principal::Operator([2; 32]))
            }
            Credential::Passphrase(p) if p == "hammering" => Auth::RateLimited(42),
            _ => Auth::Invalid,
        };
        decide(
            &req,
            &Gate {
                at_capacity,
                authenticate: &auth,
                allowed_origins: &["https://dash.example".to_string()],
                compression: true,
            },
        )
    }

    fn status(d: &Decision) -> u16 {
        match d {
            Decision::Upgrade(_) => 101,
            Decision::Page(_) => 200,
            Decision::Refuse(r) => r.status,
        }
    }

    #[test]
    fn partial_and_oversized_heads() {
        assert_eq!(
            parse_request(b"GET /events HTTP/1.1\r\nHost:").unwrap(),
            Parsed::Partial
        );
        let big = format!("GET /events HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD));
        assert_eq!(parse_request(big.as_bytes()).unwrap_err().status, 431);
        assert_eq!(
            parse_request(b"\x16\x03\x01garbage\r\n\r\n")
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn answers_in_contract_order() {
        let bearer = "Authorization: Bearer krx_user_good\r\n";
        let cases: &[(String, bool, u16, &str)] = &[
            (head("/events", bearer), false, 101, ""),
            (
                head("/events?access_token=krx_user_good", ""),
                false,
                101,
                "",
            ),
            (head("/events?passphrase=open+sesame", ""), false, 101, ""),
            (head("/nope?type=bogus", ""), true, 404, "/events"),
            (
                "GET /events HTTP/1.1\r\nHost: x\r\n\r\n".into(),
                true,
                426,
                "WebSocket",
            ),
            (
                head("/events?type=bogus", ""),
                true,
                503,
                "connection limit",
            ),
            (
                head(
                    "/events?type=bogus",
                    &format!("Authorization: Bearer {AGENT}\r\n"),
                ),
                false,
                403,
                "port 7700",
            ),
            (
                head(&format!("/events?access_token={AGENT}"), ""),
                false,
                403,
                "port 7700",
            ),
            (head("/events?type=bogus", ""), false, 401, "required"),
            (
                head("/events", "Authorization: Bearer krx_user_bad\r\n"),
                false,
                401,
                "not valid",
            ),
            (
                head("/events?passphrase=wrong", ""),
                false,
                401,
                "not valid",
            ),
            (
                head("/events?passphrase=hammering", ""),
                false,
                429,
                "retry in 42 s",
            ),
            (
                head("/events?type=bogus", bearer),
                false,
                400,
                "valid types are: capability_invoked",
            ),
            (
                head("/events?agent=", bearer),
                false,
                400,
                "`agent` has an empty value",
            ),
            (
                head("/events?type=health_alert,", bearer),
                false,
                400,
                "`type` has an empty value",
            ),
            (head("/events?since=-1", bearer), false, 400, "`since`"),
            (head("/events?since=1e3", bearer), false, 400, "`since`"),
            (head("/", ""), false, 200, ""),
        ];
        for (raw, cap, want, body) in cases {
            let d = run(raw, *cap);
            assert_eq!(status(&d), *want, "{raw}");
            if let Decision::Refuse(r) = &d {
                assert!(r.body.contains(body), "{raw}: {}", r.body);
                assert_eq!(
                    r.body.trim_end().matches(". ").count(),
                    0,
                    "one sentence: {}",
                    r.body
                );
                if r.status == 401 {
                    assert!(r.headers.contains(&("WWW-Authenticate", "Bearer".into())));
                }
                if r.status == 429 {
                    assert!(r.headers.contains(&("Retry-After", "42".into())));
                }
            }
        }
    }

    #[test]
    fn upgrade_carries_filter_since_and_accept_key() {
        let d = run(
            &head(
                "/events?type=capability_invoked,policy_violation&agent=a%2D1,a2&session=s1&since=41&agent=a3&x=1",
                "Authorization: Bearer krx_user_good\r\n",
            ),
            false,
        );
        let Decision::Upgrade(u) = d else {
            panic!("{d:?}")
        };
        assert_eq!(u.principal, Principal::User([1; 32]));
        assert_eq!(u.since, Some(41));
        assert_eq!(
            u.filter.types,
            Some(EventType::CapabilityInvoked.bit() | EventType::PolicyViolation.bit())
        );
        assert_eq!(
            u.filter.agents,
            Some(vec!["a-1".into(), "a2".into(), "a3".into()])
        );
        assert_eq!(u.filter.sessions, Some(vec!["s1".into()]));
        let resp = String::from_utf8(u.response(Some(40))).unwrap();
        // RFC 6455 §1.3's worked example.
        assert!(
            resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
            "{resp}"
        );
        assert!(resp.ends_with("\r\nKrux-Seq: 40\r\n\r\n"), "{resp}");
        assert!(!String::from_utf8(u.response(None))
            .unwrap()
            .contains("Krux-Seq"));
        assert_eq!(u.deflate, None, "no extension offered");
        assert!(!resp.contains("Sec-WebSocket-Extensions"), "{resp}");
    }

    #[test]
    fn permessage_deflate_is_answered_only_when_offered_and_on() {
        let offer = "Authorization: Bearer krx_user_good\r\nSec-WebSocket-Extensions: x-unknown, permessage-deflate; mystery\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=12; client_max_window_bits\r\n";
        let Decision::Upgrade(u) = run(&head("/events", offer), false) else {
            panic!("not upgraded")
        };
        let resp = String::from_utf8(u.response(None)).unwrap();
        assert!(
            resp.contains("\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; server_max_window_bits=12\r\n"),
            "the first valid offer of the two headers: {resp}"
        );
        assert_eq!(u.deflate.map(|d| d.window_bits), Some(12));
        // Offers it cannot accept: no extension, and the upgrade goes on without it.
        let bad = "Authorization: Bearer krx_user_good\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=7\r\n";
        let Decision::Upgrade(u) = run(&head("/events", bad), false) else {
            panic!("not upgraded")
        };
        assert_eq!(u.deflate, None);
        // `--compression off`: never accepted.
        let Parsed::Complete(req, _) = parse_request(head("/events", offer).as_bytes()).unwrap()
        else {
            panic!("partial")
        };
        let auth = |_: &Credential| Auth::Valid(Principal::User([1; 32]));
        let gate = Gate {
            at_capacity: false,
            authenticate: &auth,
            allowed_origins: &[],
            compression: false,
        };
        let Decision::Upgrade(u) = decide(&req, &gate) else {
            panic!("not upgraded")
        };
        assert_eq!(u.deflate, None);
    }

    #[test]
    fn logged_queries_hide_credentials() {
        assert_eq!(
            redact_query("type=a&access_token=krx_user_x&passphrase=p%20q&agent=b"),
            "type=a&access_token=<redacted>&passphrase=<redacted>&agent=b"
        );
        assert_eq!(redact_query(""), "");
    }

    #[test]
    fn credentials_never_show_in_debug() {
        let c = Credential::Token("krx_user_secret".into());
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn response_bytes() {
        let r = Response::text(401, "No.")
            .header("WWW-Authenticate", "Bearer".into())
            .to_bytes();
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(s.contains("Content-Length: 4\r\n"));
        assert!(s.ends_with("\r\n\r\nNo.\n"));
    }

    #[test]
    fn pages_come_with_a_policy_that_runs_only_their_own_scripts() {
        for page in [Page::Dashboard, Page::DashboardScript, Page::ClientScript] {
            let resp = page.response();
            let get = |h: &str| {
                resp.headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(h))
                    .map(|(_, v)| v.as_str())
            };
            let csp = get("Content-Security-Policy").unwrap();
            assert!(csp.contains("script-src 'self';"), "{csp}");
            assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
            assert!(csp.contains("connect-src 'self'"), "{csp}");
            assert_eq!(get("X-Content-Type-Options"), Some("nosniff"));
            assert_eq!(get("Referrer-Policy"), Some("no-referrer"));
        }
        // The page has no inline script for the policy to block.
        let html = Page::Dashboard.response().body;
        assert!(
            !html.contains("<script>") && !html.contains(" onclick="),
            "inline script"
        );
        assert!(html.contains(r#"<script src="/dashboard.js"></script>"#));
    }

    #[test]
    fn a_page_from_another_origin_is_refused_before_its_credential_is_looked_at() {
        let origin = |o: &str, host: &str| format!("Host: {host}\r\nOrigin: {o}\r\n");
        for (headers, allowed) in [
            (String::new(), true), // a CLI: no Origin
            (origin("http://127.0.0.1:7701", "127.0.0.1:7701"), true),
            (origin("HTTPS://Relay.Example", "relay.example:443"), true),
            (origin("http://relay.example:80", "relay.example"), true),
            (origin("https://dash.example/", "relay.example"), true), // --allowed-origin
            (origin("https://evil.example", "127.0.0.1:7701"), false),
            (origin("http://127.0.0.1:7702", "127.0.0.1:7701"), false), // another port
            (origin("https://127.0.0.1:7701", "127.0.0.1:7701"), true), // wss on 7701
            (origin("null", "127.0.0.1:7701"), false),
            (origin("http://127.0.0.1:7701", ""), false), // no Host to be the same as
        ] {
            // A wrong passphrase: had it been checked, the answer would be 401.
            let raw = head("/events?passphrase=wrong", &headers);
            match run(&raw, false) {
                Decision::Refuse(r) if allowed => assert_eq!(r.status, 401, "{headers}"),
                Decision::Refuse(r) => {
                    assert_eq!(r.status, 403, "{headers}");
                    assert!(r.body.contains("--allowed-origin"), "{}", r.body);
                }
                other => panic!("{headers}: {other:?}"),
            }
        }
    }

    #[test]
    fn redaction_sees_the_names_the_parser_decodes() {
        for q in [
            "access_token=SECRET",
            "access%5Ftoken=SECRET",
            "%61ccess_token=SECRET",
            "pass%70hrase=SECRET",
            "passphrase=SECRET&agent=a",
            "access+token=x&access_token=SECRET",
            "ACCESS_TOKEN=SECRET",
        ] {
            let shown = redact_query(q);
            assert!(!shown.contains("SECRET"), "{q} -> {shown}");
        }
        assert_eq!(redact_query("agent=a&since=4"), "agent=a&since=4");
    }

    #[test]
    fn an_old_dashboard_link_is_sent_to_the_fragment_form() {
        let get = |target: &str| {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
            run(&raw, false)
        };
        match get("/?since=4&access_token=krx_user_t&agent=a") {
            Decision::Refuse(r) => {
                assert_eq!(r.status, 303);
                let location = r.headers.iter().find(|(k, _)| *k == "Location").unwrap();
                assert_eq!(location.1, "/?since=4&agent=a#access_token=krx_user_t");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(get("/?agent=a"), Decision::Page(Page::Dashboard)));
        assert!(matches!(get("/"), Decision::Page(Page::Dashboard)));
    }
}
