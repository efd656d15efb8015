//! Test harness: the real `krux-relay` binary on port 0, real TCP and WebSocket clients.
//! `KRUX_TEST_IO=uring|epoll|auto` picks the backend every test server runs on.
#![allow(dead_code)] // each test file uses its own subset

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
pub use krux_testkit::assert_success;
use krux_testkit::{parse_frame, ready_addr, wait_ready_file};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod browser;
pub mod nats;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub const SEED: &str = include_str!("../data/seed_events.ndjson");

/// Filters over `SEED` and the `type:agent` of what each must deliver, in order.
pub const SEED_FILTERS: [(&str, &[&str]); 8] = [
    (
        "agent=research-agent",
        &[
            "capability_invoked:research-agent",
            "capability_result:research-agent",
            "capability_error:research-agent",
            "policy_violation:research-agent",
            "session_started:research-agent",
            "session_ended:research-agent",
        ],
    ),
    (
        "type=approval_requested,health_alert",
        &["approval_requested:deploy-agent", "health_alert:null"],
    ),
    // Envelope session_id, and data.session_id for session_started/ended.
    (
        "session=sess-a1b2c3d4",
        &[
            "capability_invoked:research-agent",
            "capability_result:research-agent",
            "capability_error:research-agent",
            "policy_violation:research-agent",
            "session_started:research-agent",
            "session_ended:research-agent",
        ],
    ),
    ("session=sess-e5f6g7h8", &["approval_requested:deploy-agent"]),
    (
        "agent=deploy-agent&type=approval_requested",
        &["approval_requested:deploy-agent"],
    ),
    (
        "agent=research-agent,scraper-agent&type=session_started,rate_limit_hit,capability_invoked&session=sess-a1b2c3d4",
        &[
            "capability_invoked:research-agent",
            "session_started:research-agent",
        ],
    ),
    ("agent=nobody", &[]),
    // An agent filter never matches health_alert (agent null).
    ("agent=research-agent&type=health_alert", &[]),
];

/// Reads each of `subs` (subscribed with `SEED_FILTERS`' queries, in order, before `SEED`
/// was published) until 600 ms of silence, and checks it got exactly what its filter
/// must deliver.
pub async fn assert_seed_filters(subs: Vec<Ws>) {
    assert_eq!(subs.len(), SEED_FILTERS.len());
    for (mut ws, (q, want)) in subs.into_iter().zip(SEED_FILTERS) {
        let mut got = Vec::new();
        while let Ok(ev) = tokio::time::timeout(
            Duration::from_millis(600),
            next_event(&mut ws, Duration::from_secs(5)),
        )
        .await
        {
            got.push(format!(
                "{}:{}",
                ev["type"].as_str().unwrap(),
                ev["agent"].as_str().unwrap_or("null")
            ));
        }
        assert_eq!(got, want, "query {q}");
    }
}

/// The binary under test: this build's, or `KRUX_TEST_BIN` (to show that a test fails
/// against an older build).
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        std::env::var("KRUX_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_krux-relay").into())
    })
}

pub fn io_backend() -> String {
    std::env::var("KRUX_TEST_IO").unwrap_or_else(|_| "auto".into())
}

/// Whether an outside program a test needs is here. Outside CI a missing one skips the
/// test (with a note), so the README's test command passes on a fresh machine; in CI
/// (`CI` set), where `.ci/run` installs them, it is a failure.
pub fn have_tool(program: &str, args: &[&str], install: &str) -> bool {
    let ok = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "`{program} {}` must work in CI ({install})",
            args.join(" ")
        );
        eprintln!(
            "skipped: `{program} {}` does not work here ({install})",
            args.join(" ")
        );
    }
    ok
}

/// Polls `cond` until it holds or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Relay {
    pub dir: tempfile::TempDir,
    pub ws: SocketAddr,
    pub ingest: SocketAddr,
    pub admin: SocketAddr,
    pub token: String,
    child: Child,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    pub async fn start() -> Relay {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> Relay {
        Self::launch(extra, false, None).await
    }

    /// Like `start_with`, logging at debug level into `<data dir>/relay.log`.
    pub async fn start_logged(extra: &[&str]) -> Relay {
        Self::launch(extra, true, None).await
    }

    /// Like `start_with`, in a process that may open at most `nofile` files.
    pub async fn start_with_open_files(nofile: u32, extra: &[&str]) -> Relay {
        Self::launch(extra, false, Some(nofile)).await
    }

    async fn launch(extra: &[&str], debug_log: bool, nofile: Option<u32>) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let token = create_token(dir.path(), "test");
        let (child, ws, ingest, admin) = spawn_relay(dir.path(), extra, debug_log, nofile).await;
        Relay {
            ws,
            ingest,
            admin,
            token,
            child,
            dir,
        }
    }

    /// Kills the relay with SIGKILL (no shutdown of any kind) and starts a new one on the
    /// same data dir, with the same extra flags.
    pub async fn crash_and_restart(&mut self, extra: &[&str]) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        let (child, ws, ingest, admin) = spawn_relay(self.dir.path(), extra, false, None).await;
        (self.child, self.ws, self.ingest, self.admin) = (child, ws, ingest, admin);
    }

    /// Kills the relay with SIGKILL and waits for it to be gone.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// `GET /readyz` on the admin port: its status.
    pub async fn readyz(&self) -> u16 {
        raw_http(self.admin, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .0
    }

    /// Sends SIGTERM and waits (at most `within`) for the exit status.
    pub async fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "relay did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the relay has logged so far (started with `start_logged`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("relay.log")).unwrap_or_default()
    }

    /// Runs a `krux-relay` command against this relay's data dir.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .env("KRUX_DATA_DIR", self.data_dir())
            .output()
            .unwrap()
    }

    /// Subscribes with the relay's token as a Bearer header; `query` is e.g. `type=a,b`.
    pub async fn subscribe(&self, query: &str) -> Ws {
        self.try_subscribe(query, Some(&self.token))
            .await
            .expect("subscription accepted")
    }

    pub async fn try_subscribe(
        &self,
        query: &str,
        bearer: Option<&str>,
    ) -> Result<Ws, (u16, String)> {
        let url = format!("ws://{}/events?{query}", self.ws);
        let mut req = url.into_client_request().unwrap();
        if let Some(t) = bearer {
            req.headers_mut()
                .insert("Authorization", format!("Bearer {t}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    /// Sends `input` on one ingest connection, half-closes, and returns every reply line.
    pub async fn publish(&self, input: &str) -> Vec<Value> {
        let mut s = TcpStream::connect(self.ingest).await.unwrap();
        s.write_all(input.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut out))
            .await
            .expect("summary in time")
            .unwrap();
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Every port of `serve` (and `demo`) on any free port of loopback.
pub const ANY_PORTS: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--ingest",
    "127.0.0.1:0",
    "--admin",
    "127.0.0.1:0",
];

/// Starts `serve` on `dir`; with `debug_log`, at debug level into `<dir>/relay.log`; with
/// `nofile`, under that open-file limit (set by a shell that then execs the relay).
async fn spawn_relay(
    dir: &Path,
    extra: &[&str],
    debug_log: bool,
    nofile: Option<u32>,
) -> (Child, SocketAddr, SocketAddr, SocketAddr) {
    let ready = dir.join("ready.json");
    let _ = std::fs::remove_file(&ready);
    let io = io_backend();
    let mut cmd = match nofile {
        None => Command::new(bin()),
        Some(n) => {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin()]);
            c
        }
    };
    // Any free ports, unless the test names them (a restart on the same ports).
    let ports: &[&str] = if extra.contains(&"--listen") {
        &[]
    } else {
        &ANY_PORTS
    };
    let mut child = cmd
        .arg("serve")
        .args(ports)
        .args(["--io", &io, "--ready-file", ready.to_str().unwrap()])
        .args(extra)
        .env("KRUX_DATA_DIR", dir)
        .env("KRUX_LOG", if debug_log { "debug" } else { "warn" })
        .stdout(Stdio::null())
        .stderr(if debug_log {
            Stdio::from(std::fs::File::create(dir.join("relay.log")).unwrap())
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap();
    let info = wait_ready_file(&mut child, &ready, "relay", Duration::from_secs(20)).unwrap();
    assert_eq!(info["pid"], child.id());
    let addr = |k: &str| ready_addr(&info, k).unwrap();
    (child, addr("ws"), addr("ingest"), addr("admin"))
}

pub fn create_token(dir: &Path, name: &str) -> String {
    let out = Command::new(bin())
        .args(["user-token", "create", "--name", name])
        .env("KRUX_DATA_DIR", dir)
        .output()
        .unwrap();
    assert_success(&out);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The next text message as JSON, failing after `within`.
pub async fn next_event(ws: &mut Ws, within: Duration) -> Value {
    loop {
        let msg = tokio::time::timeout(within, ws.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Collects events until `n` arrived.
pub async fn take_events(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        v.push(next_event(ws, Duration::from_secs(10)).await);
    }
    v
}

/// Asserts no event arrives within `quiet` (used after a marker event proves delivery).
pub async fn assert_silent(ws: &mut Ws, quiet: Duration) {
    if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(quiet, ws.next()).await {
        panic!("unexpected event: {t}");
    }
}

/// The close frame's code, waiting up to `within`.
pub async fn close_code(ws: &mut Ws, within: Duration) -> (u16, String) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next())
            .await
            .expect("a close frame in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return (f.code.into(), f.reason.to_string()),
            Some(Ok(Message::Close(None))) => return (1005, String::new()),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// A raw HTTP exchange: returns (status, head, body). Reads the head, then
/// `Content-Length` bytes of body (none for a 101).
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "connection closed before the response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        while buf.len() < head_end + len {
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed inside the body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
        (head, body)
    };
    let (head, body) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("answer in time");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.trim_end().to_string(), body)
}

/// A WebSocket upgrade request for `target` with extra header lines.
pub fn upgrade_request(target: &str, extra_headers: &str) -> String {
    krux_testkit::upgrade_request(target, "127.0.0.1", extra_headers)
}

/// Reads raw WebSocket frames from a plain TCP subscriber (after its 101 head): the seq of
/// every text frame, and the close frame's code and reason if one came before EOF. Cheap
/// enough to keep up with a fast relay: big reads, and `seq` taken from the end of the
/// payload, where the relay appends it.
pub async fn read_raw_frames(
    s: &mut TcpStream,
    max_events: usize,
) -> (Vec<u64>, Option<(u16, String)>) {
    let (mut buf, mut at, mut seqs) = (Vec::with_capacity(256 * 1024), 0, Vec::new());
    while seqs.len() < max_events {
        match parse_frame(&buf[at..]) {
            Some((frame, used)) => {
                at += used;
                if let Some(close) = frame.close() {
                    return (seqs, Some(close));
                }
                if frame.opcode == krux_testkit::frames::TEXT {
                    seqs.push(seq_at_end(frame.payload));
                }
            }
            None => {
                buf.drain(..at);
                at = 0;
                if !matches!(s.read_buf(&mut buf).await, Ok(n) if n > 0) {
                    break;
                }
            }
        }
    }
    (seqs, None)
}

/// The `seq` of a relay event: `"seq":N}` ends its payload.
fn seq_at_end(payload: &[u8]) -> u64 {
    let at = payload
        .windows(6)
        .rposition(|w| w == b"\"seq\":")
        .expect("seq in every event")
        + 6;
    std::str::from_utf8(&payload[at..payload.len() - 1])
        .unwrap()
        .parse()
        .unwrap()
}

/// A raw TCP subscriber: upgrade with the relay's token and `query`, return the socket
/// positioned after the 101 head.
pub async fn raw_subscribe(relay: &Relay, query: &str, recv_buffer: Option<u32>) -> TcpStream {
    raw_subscribe_with(relay, query, "", recv_buffer).await.0
}

/// `raw_subscribe` with extra request header lines (each ending in `\r\n`); also returns
/// the 101 head.
pub async fn raw_subscribe_with(
    relay: &Relay,
    query: &str,
    extra_headers: &str,
    recv_buffer: Option<u32>,
) -> (TcpStream, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = recv_buffer {
        sock.set_recv_buffer_size(size).unwrap();
    }
    let mut s = sock.connect(relay.ws).await.unwrap();
    let req = upgrade_request(
        &format!("/events?{query}"),
        &format!("Authorization: Bearer {}\r\n{extra_headers}", relay.token),
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// `tail` against the relay, with its token; stdout and stderr piped.
pub fn tail(relay: &Relay, extra: &[&str]) -> std::process::Child {
    Command::new(bin())
        .args(["tail", "--url", &format!("ws://{}", relay.ws)])
        .args(extra)
        .env("KRUX_TOKEN", &relay.token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit by itself within `within` (killing it and failing the test
/// otherwise: `what` says what should have stopped), and returns its output. Its pipes
/// are read meanwhile, so a child that prints a lot cannot block on a full one.
pub fn finish_within(
    child: std::process::Child,
    within: Duration,
    what: &str,
) -> std::process::Output {
    let pid = child.id().to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    rx.recv_timeout(within).unwrap_or_else(|_| {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
        // What it printed until then says why it is still waiting.
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let said = rx
            .recv_timeout(Duration::from_secs(5))
            .map_or(String::new(), |o| {
                format!(
                    "\nstdout:\n{}\nstderr:\n{}",
                    text(&o.stdout),
                    text(&o.stderr)
                )
            });
        panic!("{what} did not stop within {within:?}{said}");
    })
}

/// The relay's metrics, as the admin port serves them.
pub async fn metrics(relay: &Relay) -> String {
    raw_http(relay.admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .2
}

/// The value of one series (`name{labels}` as exposed) in a `/metrics` answer.
pub fn metric_value(scrape: &str, series: &str) -> Option<u64> {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{series} {v}: {e}")))
}

/// Waits (at most 10 s) until the relay's metrics hold `line`.
pub async fn wait_metric(relay: &Relay, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics(relay).await.contains(line) {
        assert!(
            Instant::now() < deadline,
            "the metrics never showed {line:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the relay counts `n` subscribers (so a published event cannot be missed).
pub async fn wait_subscribers(relay: &Relay, n: usize) {
    wait_metric(relay, &format!("\nkrux_subscribers {n}\n")).await
}

/// Every `krux_` family the monitoring files (docs/monitoring: alert rules, Grafana
/// dashboard) query, histogram suffixes folded into their family.
pub fn monitored_families() -> std::collections::BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/monitoring");
    let mut names = std::collections::BTreeSet::new();
    for file in ["krux-relay.rules.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for (i, _) in text.match_indices("krux_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            names.insert(family.to_string());
        }
    }
    names
}

/// The families a `/metrics` answer declares (`# TYPE name kind`).
pub fn exposed_families(scrape: &str) -> std::collections::BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Whether Python's `websockets` is installed (`.ci/run` installs it; outside CI a test
/// that needs it is skipped without it).
pub fn have_python_websockets() -> bool {
    have_tool(
        "python3",
        &["-c", "import websockets"],
        "pip install websockets",
    )
}

/// A Python interop script (`tests/interop/*.py`) that prints `ready` once subscribed,
/// then one JSON line with what it saw.
pub struct PythonClient {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl PythonClient {
    /// Runs `tests/interop/<script>` with `args` and waits for its `ready` (failing with
    /// its stderr if it did not subscribe).
    pub fn start(script: &str, args: &[&str]) -> PythonClient {
        use std::io::{BufRead, Read};
        let path = format!("{}/tests/interop/{script}", env!("CARGO_MANIFEST_DIR"));
        let mut child = Command::new("python3")
            .arg(path)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if line.trim() != "ready" {
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("{script} did not subscribe (is `websockets` installed? pip install websockets): {line}{err}");
        }
        PythonClient { child, out }
    }

    /// Its JSON line, once it has exited successfully (within `within`).
    pub async fn result(self, within: Duration) -> Value {
        use std::io::BufRead;
        let PythonClient { child, mut out } = self;
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let done = child.wait_with_output().unwrap();
            (line, done)
        });
        let (line, done) = tokio::time::timeout(within, read)
            .await
            .expect("the Python client finishes")
            .unwrap();
        assert!(
            done.status.success(),
            "{line}{}",
            String::from_utf8_lossy(&done.stderr)
        );
        serde_json::from_str(&line).unwrap()
    }
}
