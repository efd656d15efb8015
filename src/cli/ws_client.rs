//! `tail`'s WebSocket client: the upgrade, offering permessage-deflate, and the relay's
//! frames read, inflated when compressed. tungstenite's client cannot read a compressed
//! frame; a subscriber only reads, so what it needs is small: answer pings, echo a close,
//! and assemble text messages.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest message `tail` accepts, compressed or inflated.
const MAX_MESSAGE: usize = 64 << 20;

/// The largest upgrade answer head.
const MAX_HEAD: usize = 16 << 10;

#[derive(Debug)]
pub enum Error {
    /// The server answered the upgrade with this status (and reason) and body.
    Http(u16, String, String),
    /// The socket (or TLS, whose errors rustls reports through it).
    Io(std::io::Error),
    Url(String),
    /// Not a WebSocket answer, or frames that break the protocol.
    Protocol(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Http(code, reason, body) => write!(f, "{code} {reason} {body}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Url(e) | Error::Protocol(e) => f.write_str(e),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}

fn protocol(what: impl Into<String>) -> Error {
    Error::Protocol(what.into())
}

/// What the relay sent.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    /// Its close frame: the code (1005 if none) and reason. The close was echoed.
    Close(u16, String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open subscription.
pub struct Socket {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    /// permessage-deflate was accepted: the inflater for compressed messages.
    inflater: Option<flate2::Decompress>,
    /// The server said `server_no_context_takeover` (krux-relay always does): each
    /// message inflates on its own; otherwise the inflater keeps its history.
    fresh_each: bool,
    /// The message being assembled from fragments, and whether it came compressed.
    message: Vec<u8>,
    compressed: bool,
    fragmented: bool,
}

/// Where `url` (`ws://` or `wss://`) points.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    /// Path and query.
    resource: String,
}

fn parse_url(url: &str) -> Result<Target, Error> {
    let bad = |why: &str| Error::Url(format!("{why} in {url}"));
    let (tls, rest) = match url.split_once("://") {
        Some(("ws", r)) => (false, r),
        Some(("wss", r)) => (true, r),
        _ => return Err(bad("no ws:// or wss:// scheme")),
    };
    let (authority, resource) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_string()),
    };
    let default = if tls { 443 } else { 80 };
    let (host, port) = match authority.strip_prefix('[') {
        // [IPv6]:port
        Some(v6) => {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("an unclosed ["))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("a bad port"))?,
                None if after.is_empty() => default,
                None => return Err(bad("a bad host")),
            };
            (h.to_string(), port)
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("a bad port"))?),
            None => (authority.to_string(), default),
        },
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(Target {
        tls,
        host,
        port,
        resource,
    })
}

/// The CAs a `wss://` URL is checked against when no `--ca-cert` is given: the public ones.
fn public_roots() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Arc::new(cfg)
}

/// Connects and upgrades, offering permessage-deflate; `headers` are extra request
/// headers (`Authorization`). Returns the socket and the answer's `Krux-Seq`.
pub async fn connect(
    url: &str,
    headers: &[(&str, &str)],
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(Socket, Option<u64>), Error> {
    let t = parse_url(url)?;
    let host = t.host.as_str();
    let tcp = TcpStream::connect((host, t.port)).await?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Stream> = if t.tls {
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| Error::Url(format!("{host}: {e}")))?;
        let config = tls.unwrap_or_else(public_roots);
        Box::new(
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?,
        )
    } else {
        Box::new(tcp)
    };
    let key = tungstenite::handshake::client::generate_key();
    let host_header = match (t.host.contains(':'), t.port) {
        (true, p) => format!("[{host}]:{p}"),
        (false, p) => format!("{host}:{p}"),
    };
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {host_header}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        t.resource
    );
    for (name, value) in headers {
        req += &format!("{name}: {value}\r\n");
    }
    req += "\r\n";
    stream.write_all(req.as_bytes()).await?;

    let mut buf = Vec::with_capacity(4096);
    let head_len = loop {
        if let Some(i) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(protocol("an answer head over 16 KiB"));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(protocol(match buf.is_empty() {
                true => "the server closed the connection without answering the upgrade",
                false => "the server closed the connection in the middle of its answer",
            }));
        }
    };
    let mut names = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut names);
    if !matches!(
        resp.parse(&buf[..head_len]),
        Ok(httparse::Status::Complete(_))
    ) {
        return Err(protocol("the answer is not HTTP"));
    }
    let status = resp.code.unwrap_or(0);
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if status != 101 {
        let reason = resp.reason.unwrap_or("").to_string();
        let len: usize = header("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0)
            .min(MAX_HEAD);
        let mut body = buf[head_len..].to_vec();
        while body.len() < len && stream.read_buf(&mut body).await.unwrap_or(0) > 0 {}
        body.truncate(len);
        return Err(Error::Http(
            status,
            reason,
            String::from_utf8_lossy(&body).into_owned(),
        ));
    }
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header("sec-websocket-accept").as_deref() != Some(accept.as_str()) {
        return Err(protocol(
            "the answer's Sec-WebSocket-Accept does not match the key",
        ));
    }
    let ext = header("sec-websocket-extensions");
    let params: Vec<&str> = ext
        .as_deref()
        .map_or(Vec::new(), |e| e.split(';').map(str::trim).collect());
    let inflater = match params.first() {
        None => None,
        Some(&"permessage-deflate") => Some(flate2::Decompress::new(false)),
        Some(_) => {
            let ext = ext.as_deref().unwrap_or_default();
            return Err(protocol(format!(
                "an extension that was not offered: {ext}"
            )));
        }
    };
    let fresh_each = params.contains(&"server_no_context_takeover");
    let krux_seq = header("krux-seq").and_then(|s| s.parse().ok());
    buf.drain(..head_len);
    let socket = Socket {
        stream,
        buf,
        inflater,
        fresh_each,
        message: Vec::new(),
        compressed: false,
        fragmented: false,
    };
    Ok((socket, krux_seq))
}

impl Socket {
    /// The next message; `None` once the stream has ended without a close frame. Pings
    /// are answered on the way, and a close frame is echoed before it is returned.
    pub async fn next(&mut self) -> Option<Result<Message, Error>> {
        loop {
            let frame = match self.take_frame() {
                Ok(Some(f)) => f,
                Ok(None) => match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) => return None,
                    Ok(_) => continue,
                    Err(e) => return Some(Err(e.into())),
                },
                Err(e) => return Some(Err(e)),
            };
            match self.on_frame(frame).await {
                Ok(None) => {}
                Ok(Some(m)) => return Some(Ok(m)),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// Takes one whole frame off the buffer, if it holds one.
    fn take_frame(&mut self) -> Result<Option<Frame>, Error> {
        let b = &self.buf;
        if b.len() < 2 {
            return Ok(None);
        }
        if b[1] & 0x80 != 0 {
            return Err(protocol("a masked frame from the server"));
        }
        let (head, len) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (4, u64::from(u16::from_be_bytes([b[2], b[3]]))),
            127 if b.len() >= 10 => (10, u64::from_be_bytes(b[2..10].try_into().expect("8"))),
            126 | 127 => return Ok(None),
            n => (2, u64::from(n)),
        };
        if len > MAX_MESSAGE as u64 {
            return Err(protocol("a frame over 64 MiB"));
        }
        let end = head + len as usize;
        if b.len() < end {
            return Ok(None);
        }
        let frame = Frame {
            fin: b[0] & 0x80 != 0,
            rsv: b[0] & 0x70,
            opcode: b[0] & 0x0F,
            payload: b[head..end].to_vec(),
        };
        self.buf.drain(..end);
        Ok(Some(frame))
    }

    /// Acts on a frame: a message once one is whole.
    async fn on_frame(&mut self, f: Frame) -> Result<Option<Message>, Error> {
        let compressed_start =
            f.rsv == 0x40 && self.inflater.is_some() && matches!(f.opcode, 1 | 2);
        if f.rsv != 0 && !compressed_start {
            return Err(protocol("reserved bits set that no extension allows"));
        }
        match f.opcode {
            0x9 => {
                self.send(0xA, &f.payload).await?;
                Ok(None)
            }
            0xA => Ok(None),
            0x8 => {
                let (code, reason) = match &f.payload[..] {
                    [] => (1005, String::new()),
                    [a, b, reason @ ..] => (
                        u16::from_be_bytes([*a, *b]),
                        String::from_utf8_lossy(reason).into_owned(),
                    ),
                    [_] => return Err(protocol("a close frame with a 1-byte payload")),
                };
                // Echo the code (RFC 6455 §5.5.1); the peer closes the TCP connection.
                let echo = if code == 1005 {
                    vec![]
                } else {
                    code.to_be_bytes().to_vec()
                };
                let _ = self.send(0x8, &echo).await;
                Ok(Some(Message::Close(code, reason)))
            }
            0x0..=0x2 => {
                match (f.opcode, self.fragmented) {
                    (0, false) => {
                        return Err(protocol("a continuation with no message to continue"))
                    }
                    (1 | 2, true) => return Err(protocol("a new message inside a fragmented one")),
                    (0, true) => {}
                    _ => {
                        self.message.clear();
                        self.compressed = compressed_start;
                    }
                }
                if self.message.len() + f.payload.len() > MAX_MESSAGE {
                    return Err(protocol("a message over 64 MiB"));
                }
                self.message.extend_from_slice(&f.payload);
                self.fragmented = !f.fin;
                if !f.fin {
                    return Ok(None);
                }
                let bytes = match self.compressed {
                    true => self.inflate()?,
                    false => std::mem::take(&mut self.message),
                };
                String::from_utf8(bytes)
                    .map(|t| Some(Message::Text(t)))
                    .map_err(|_| protocol("a text message that is not UTF-8"))
            }
            op => Err(protocol(format!("an unknown opcode {op:#x}"))),
        }
    }

    /// The compressed message assembled, inflated (RFC 7692 §7.2.2: the sync flush's
    /// `00 00 ff ff`, which the sender drops, is appended back).
    fn inflate(&mut self) -> Result<Vec<u8>, Error> {
        let z = self.inflater.as_mut().expect("only with the extension");
        if self.fresh_each {
            z.reset(false);
        }
        self.message.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let input = std::mem::take(&mut self.message);
        let mut out = Vec::with_capacity(input.len() * 4);
        // `total_in` counts from the inflater's last reset, not from this message's start
        // when the history is kept.
        let start = z.total_in();
        loop {
            let at = (z.total_in() - start) as usize;
            let status = z
                .decompress_vec(&input[at..], &mut out, flate2::FlushDecompress::Sync)
                .map_err(|e| {
                    protocol(format!("a compressed message that does not inflate: {e}"))
                })?;
            let done = (z.total_in() - start) as usize == input.len() && out.len() < out.capacity();
            if done || status == flate2::Status::StreamEnd {
                return Ok(out);
            }
            if out.len() >= MAX_MESSAGE {
                return Err(protocol("a message over 64 MiB once inflated"));
            }
            out.reserve(out.capacity().max(4096));
        }
    }

    /// A masked frame to the server (clients mask everything they send, RFC 6455 §5.3).
    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result<(), Error> {
        debug_assert!(payload.len() <= 125, "control frames only");
        let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
        let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&f).await?;
        Ok(())
    }
}

struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server frame: FIN, `rsv1` if compressed, unmasked.
    fn frame(opcode: u8, rsv1: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | if rsv1 { 0x40 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Messages compressed with one compressor (`keep`: history kept between them, as a
    /// server without `server_no_context_takeover` does), then read by a socket that
    /// knows which it is; a ping in between is answered.
    #[tokio::test]
    async fn compressed_messages_inflate_with_or_without_the_history() {
        for keep in [false, true] {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let mut socket = Socket {
                stream: Box::new(client),
                buf: Vec::new(),
                inflater: Some(flate2::Decompress::new(false)),
                fresh_each: !keep,
                message: Vec::new(),
                compressed: false,
                fragmented: false,
            };
            let texts = [
                "{\"type\":\"health_alert\",\"seq\":1}",
                "{\"type\":\"health_alert\",\"seq\":2}",
            ];
            let mut z = flate2::Compress::new(flate2::Compression::fast(), false);
            for (i, t) in texts.iter().enumerate() {
                if !keep {
                    z.reset();
                }
                let mut out = Vec::with_capacity(256);
                z.compress_vec(t.as_bytes(), &mut out, flate2::FlushCompress::Sync)
                    .unwrap();
                out.truncate(out.len() - 4);
                server.write_all(&frame(1, true, &out)).await.unwrap();
                if i == 0 {
                    server.write_all(&frame(9, false, b"hi")).await.unwrap();
                }
            }
            server
                .write_all(&frame(8, false, &[0x03, 0xe8]))
                .await
                .unwrap();
            for t in texts {
                assert_eq!(
                    socket.next().await.unwrap().unwrap(),
                    Message::Text(t.into()),
                    "keep {keep}"
                );
            }
            assert_eq!(
                socket.next().await.unwrap().unwrap(),
                Message::Close(1000, String::new())
            );
            // The pong (masked, "hi") and the close echoed.
            let mut back = [0u8; 14];
            server.read_exact(&mut back).await.unwrap();
            assert_eq!((back[0], back[1]), (0x8A, 0x82));
            let unmasked: Vec<u8> = back[6..8]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ back[2 + i])
                .collect();
            assert_eq!(unmasked, b"hi");
            assert_eq!((back[8], back[9]), (0x88, 0x82));
        }
    }

    #[test]
    fn urls() {
        let t = parse_url("wss://relay.example/events?type=a,b").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.resource.as_str()),
            (true, "relay.example", 443, "/events?type=a,b")
        );
        let t = parse_url("ws://127.0.0.1:7701").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.resource.as_str()),
            (false, "127.0.0.1", 7701, "/")
        );
        let t = parse_url("ws://[::1]:9/events").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        for bad in ["http://x", "ws://", "ws://h:port", "ws://[::1", "x"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
