//! One connection on port 7701: the HTTP handshake, then a subscriber's two tasks — the
//! reader (control frames in) and the writer (its outbox out, one writev per round).

use std::cell::Cell;
use std::net::{IpAddr, Shutdown};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::shard::Transmit;
use super::{Handle, Reactor, CLOSE_GRACE};
use crate::auth::Principal;
use crate::filter::SubId;
use crate::frame::Span;
use crate::io::{advance, write_all, Conn};
use crate::live::Live;
use crate::proto::handshake::{
    decide, origin_allowed, parse_request, query_pairs, redact_query, Auth, Credential, Decision,
    Gate, Parsed, Request, Response, MAX_HEAD,
};
use crate::proto::ws::InboundDecoder;

pub async fn serve<C: Conn>(reactor: Rc<Reactor>, conn: Rc<C>, peer: IpAddr) {
    // The handshake's state (timers, request, passphrase check, refusals) lives in its own
    // allocation, freed once the subscriber is upgraded: the task that stays for the
    // connection's life holds only what a subscriber needs (a few hundred bytes, not 4 KiB).
    let Some((up, leftover)) = Box::pin(handshake(&reactor, &*conn, peer)).await else {
        return;
    };
    let deflate = up.deflate.is_some();
    // Synchronous, so that the upgrade is not part of this task's state.
    let (registration, handle, response) = register(&reactor, &conn, up);
    if Box::pin(write_all(&*conn, Bytes::from(response)))
        .await
        .is_err()
    {
        return;
    }
    reactor.live.metrics.handshake(101);

    let gone = Rc::new(Cell::new(false));
    spawn_writer(&reactor, registration.id, &handle, &gone, &conn);
    read_loop(&reactor, registration.id, &*conn, leftover, deflate).await;

    // The peer is gone (or finished closing): stop the writer and forget the subscriber.
    gone.set(true);
    handle.wake.notify_one();
    conn.shutdown(Shutdown::Both);
    drop(registration);
}

/// Reads and answers the request head; returns the upgrade to perform, or `None` once a
/// refusal (or the dashboard) has been answered.
async fn handshake<C: Conn>(
    reactor: &Reactor,
    conn: &C,
    peer: IpAddr,
) -> Option<(crate::proto::handshake::Upgrade, Vec<u8>)> {
    let live = &reactor.live;
    let head = tokio::time::timeout(reactor.settings.handshake_timeout, read_head(conn)).await;
    let (req, leftover) = match head {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return None, // closed before sending a request
        Ok(Err(resp)) => return answer_and_close(conn, live, resp).await,
        Err(_) => {
            let late = Response::text(408, "The request head took too long to arrive.");
            return answer_and_close(conn, live, late).await;
        }
    };

    // The passphrase check may need Argon2: run it (off this thread) before the
    // synchronous decision, which then only reads its outcome.
    let passphrase = match query_pairs(req.query.as_deref().unwrap_or(""))
        .into_iter()
        .find(|(k, _)| k == "passphrase")
    {
        Some((_, p))
            if req.path == "/events"
                && req.upgrade_websocket
                && !p.is_empty()
                && origin_allowed(&req, &reactor.settings.allowed_origins) =>
        {
            Some(check_passphrase(live, p.into_owned(), peer).await)
        }
        _ => None,
    };
    let authenticate = |c: &Credential| match c {
        Credential::Token(t) => live
            .credentials
            .authenticate_token(t)
            .map_or(Auth::Invalid, Auth::Valid),
        Credential::Passphrase(_) => passphrase.unwrap_or(Auth::Invalid),
    };
    let gate = Gate {
        at_capacity: live.connections.load(Relaxed) >= reactor.settings.max_connections,
        authenticate: &authenticate,
        allowed_origins: &reactor.settings.allowed_origins,
        compression: reactor.settings.compression.is_some(),
    };
    let decision = decide(&req, &gate);
    tracing::debug!(
        %peer,
        path = %req.path,
        query = %redact_query(req.query.as_deref().unwrap_or("")),
        "handshake"
    );
    let up = match decision {
        Decision::Upgrade(up) => up,
        Decision::Refuse(resp) => return answer_and_close(conn, live, resp).await,
        Decision::Page(page) => return answer_and_close(conn, live, page.response()).await,
    };
    Some((up, leftover))
}

/// Starts the subscriber's writer task (from a plain function, so that the writer's
/// future is never part of the reader's state).
fn spawn_writer<C: Conn>(
    reactor: &Rc<Reactor>,
    id: SubId,
    handle: &Rc<Handle>,
    gone: &Rc<Cell<bool>>,
    conn: &Rc<C>,
) {
    tokio::task::spawn_local(write_loop(
        reactor.clone(),
        id,
        handle.clone(),
        gone.clone(),
        conn.clone(),
    ));
}

/// Registers the subscriber with the shard between two fan-out rounds (this is the
/// reactor's only thread), before the 101 goes out: once the client sees the upgrade,
/// nothing published after it can be missed. Returns its registration, its handle and the
/// 101 to write.
fn register<'r, C: Conn>(
    reactor: &'r Reactor,
    conn: &Rc<C>,
    mut up: crate::proto::handshake::Upgrade,
) -> (Registration<'r>, Rc<Handle>, Vec<u8>) {
    let weak = Rc::downgrade(conn);
    let handle = Rc::new(Handle {
        wake: Notify::new(),
        kill: Box::new(move || {
            if let Some(c) = weak.upgrade() {
                c.shutdown(Shutdown::Both);
            }
        }),
    });
    let filter = std::mem::take(&mut up.filter);
    let (id, position) = reactor.with_shard(|s| {
        s.register(
            up.principal,
            filter,
            up.since,
            up.deflate,
            handle.clone(),
            super::now(),
        )
    });
    reactor.live.connections.fetch_add(1, Relaxed);
    let response = up.response(position);
    (Registration { reactor, id }, handle, response)
}

/// A subscriber's place in its reactor (shard and counters), released on drop.
struct Registration<'a> {
    reactor: &'a Reactor,
    id: SubId,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.reactor.shard.borrow_mut().remove(self.id);
        self.reactor.live.connections.fetch_sub(1, Relaxed);
    }
}

/// Checks an operator passphrase: refused outright while the address is over its failure
/// limit; cheap after the first success; otherwise Argon2 on the blocking pool, so the
/// reactor keeps serving its subscribers meanwhile.
async fn check_passphrase(live: &Live, candidate: String, peer: IpAddr) -> Auth {
    let creds = &live.credentials;
    let now = Instant::now();
    if let Some(secs) = creds.failures.blocked_for(peer, now) {
        return Auth::RateLimited(secs);
    }
    let Some(verifier) = creds.passphrase() else {
        creds.failures.record_failure(peer, now);
        return Auth::Invalid;
    };
    let ok = match verifier.check_fast(&candidate) {
        Some(ok) => ok,
        None => {
            let v = verifier.clone();
            tokio::task::spawn_blocking(move || v.check_slow(&candidate))
                .await
                .unwrap_or(false)
        }
    };
    if ok {
        Auth::Valid(Principal::Operator(crate::auth::passphrase_id(
            verifier.phc(),
        )))
    } else {
        creds.failures.record_failure(peer, now);
        Auth::Invalid
    }
}

/// Reads until a complete request head, bounded by `MAX_HEAD`. `Ok(None)`: the peer left.
async fn read_head<C: Conn>(conn: &C) -> Result<Option<(Request, Vec<u8>)>, Response> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let (res, b) = conn.read(buf).await;
        buf = b;
        if !matches!(res, Ok(n) if n > 0) {
            return Ok(None);
        }
        match parse_request(&buf)? {
            Parsed::Partial => {
                if buf.len() == buf.capacity() {
                    buf.reserve(buf.len().min(MAX_HEAD));
                }
            }
            Parsed::Complete(req, len) => return Ok(Some((req, buf.split_off(len)))),
        }
    }
}

/// Writes a complete HTTP response (a refusal, or the dashboard page) and ends the
/// connection; returns no upgrade.
async fn answer_and_close<C: Conn, T>(conn: &C, live: &Live, resp: Response) -> Option<T> {
    live.metrics.handshake(resp.status);
    tracing::debug!(status = resp.status, "answered without an upgrade");
    let _ = write_all(conn, Bytes::from(resp.to_bytes())).await;
    conn.shutdown(Shutdown::Write);
    // Let the client read the answer before the socket goes; a short, bounded wait.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut buf = Vec::with_capacity(256);
        loop {
            let (res, mut b) = conn.read(buf).await;
            if !matches!(res, Ok(n) if n > 0) {
                return;
            }
            b.clear();
            buf = b;
        }
    })
    .await;
    None
}

async fn read_loop<C: Conn>(
    reactor: &Reactor,
    id: SubId,
    conn: &C,
    leftover: Vec<u8>,
    deflate: bool,
) {
    let mut decoder = InboundDecoder::new(reactor.settings.max_frame);
    if deflate {
        decoder = decoder.with_deflate();
    }
    let mut on_bytes = |bytes: &[u8]| {
        let now = super::now();
        let mut got = Vec::new();
        let res = decoder.feed(bytes, &mut |i| got.push(i));
        reactor.with_shard(|s| {
            s.heard(id, now);
            for inbound in got {
                s.on_inbound(id, inbound, now);
            }
            if let Err(v) = res {
                s.on_violation(id, v, now);
            }
        });
    };
    if !leftover.is_empty() {
        on_bytes(&leftover);
    }
    drop(leftover);
    // The reactor's scratch buffer: an idle subscriber holds none of its own.
    loop {
        match conn.read_ready(&reactor.scratch).await {
            Ok(n) if n > 0 => on_bytes(&reactor.scratch.borrow()[..n]),
            _ => return,
        }
    }
}

/// Writes what the shard hands over: everything queued goes out in one writev per round;
/// a partial write keeps the unwritten tail (sliced, not copied) at the front of the next
/// round.
async fn write_loop<C: Conn>(
    reactor: Rc<Reactor>,
    id: SubId,
    handle: Rc<Handle>,
    gone: Rc<Cell<bool>>,
    conn: Rc<C>,
) {
    let metrics = &reactor.live.metrics;
    let mut batch: Vec<Span> = Vec::new();
    // Ingest time of the oldest event frame in `batch` (kept across a partial write).
    let mut oldest_at = None;
    loop {
        if gone.get() {
            return;
        }
        match reactor.with_shard(|s| s.poll_transmit(id, &mut batch, super::now())) {
            Transmit::Write(taken_at) => oldest_at = oldest_at.or(taken_at),
            Transmit::Finished => break,
            Transmit::Scan => {
                tokio::task::yield_now().await; // a sparse filter: keep scanning
                continue;
            }
            Transmit::Idle => {
                handle.wake.notified().await;
                continue;
            }
        }
        let (res, mut rest) = conn.writev(std::mem::take(&mut batch)).await;
        match res {
            Ok(n) if n > 0 => {
                reactor.shard.borrow_mut().on_written(id, n);
                let frames = advance(&mut rest, n);
                metrics.writevs.fetch_add(1, Relaxed);
                metrics.bytes_out.fetch_add(n as u64, Relaxed);
                metrics.frames_out.fetch_add(frames, Relaxed);
                if rest.is_empty() {
                    if let Some(at) = oldest_at.take() {
                        metrics.observe_ingest_to_write(at.elapsed());
                    }
                }
                batch = rest;
            }
            _ => {
                gone.set(true);
                conn.shutdown(Shutdown::Both);
                return;
            }
        }
    }
    // The close frame is out: half-close, give the peer a moment to answer, then drop it.
    conn.shutdown(Shutdown::Write);
    tokio::time::sleep(CLOSE_GRACE).await;
    conn.shutdown(Shutdown::Both);
}
