//! Fixtures shared by the criterion benches and `examples/instruction_counts.rs`, so both
//! measure the same thing.

use krux_relay::event::{EventType, FilterKeys};
use krux_relay::filter::{Filter, SubscriberIndex};

/// `n` subscribers, a quarter each: unfiltered, by one type, by one of 300 agents, by one
/// of 3,000 sessions (fixed seed).
pub fn mixed_index(n: usize) -> SubscriberIndex {
    let mut idx = SubscriberIndex::default();
    let mut rng = fastrand::Rng::with_seed(3);
    for id in 0..n {
        let f = match id % 4 {
            0 => Filter::default(),
            1 => Filter {
                types: Some(EventType::ALL[rng.usize(..11)].bit()),
                ..Filter::default()
            },
            2 => Filter {
                agents: Some(vec![format!("agent-{}", rng.usize(..300)).into()]),
                ..Filter::default()
            },
            _ => Filter {
                sessions: Some(vec![format!("sess-{}", rng.usize(..3000)).into()]),
                ..Filter::default()
            },
        };
        idx.insert(id, f);
    }
    idx
}

/// The keys of a `capability_invoked` event that `mixed_index` has matches for.
pub fn sample_keys() -> FilterKeys {
    FilterKeys {
        etype: EventType::CapabilityInvoked,
        agent: Some("agent-7".into()),
        session: Some("sess-70".into()),
        data_session: None,
    }
}

/// The relay's TLS server config (a fresh self-signed certificate written into `dir`) and
/// a client config trusting it.
pub fn tls_configs(
    dir: &std::path::Path,
) -> (
    std::sync::Arc<rustls::ServerConfig>,
    std::sync::Arc<rustls::ClientConfig>,
) {
    use krux_relay::io::certs;
    let pem = dir.join("cert.pem");
    let (cert, _) = certs::self_signed(&pem).expect("certificate");
    let server = certs::ServerTls::new(cert, false).expect("config").config;
    (server, certs::client_config_trusting(&pem).expect("trust"))
}

/// CPU time of one handshake, each side's alone.
#[allow(dead_code)] // read by the benches; the example only needs the handshake
pub struct HandshakeTimes {
    pub server: std::time::Duration,
    pub client: std::time::Duration,
}

/// A handshake between the relay's server side and an in-memory rustls client (which
/// resumes when `client` holds a ticket from an earlier one). Returns the completed
/// server handshake and the time each side spent in its own steps.
pub fn tls_handshake(
    server: &std::sync::Arc<rustls::ServerConfig>,
    client: &std::sync::Arc<rustls::ClientConfig>,
) -> (krux_relay::io::tls::Handshake, HandshakeTimes) {
    use std::time::{Duration, Instant};
    let name = "localhost".try_into().expect("name");
    let t = Instant::now();
    let mut c = rustls::ClientConnection::new(client.clone(), name).expect("client");
    let mut client_time = t.elapsed();
    let t = Instant::now();
    let mut s = krux_relay::io::tls::Handshake::new(server.clone()).expect("server");
    let mut server_time = t.elapsed();
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    let (mut plain, mut closed) = (Vec::new(), false);
    loop {
        let t = Instant::now();
        while c.wants_write() {
            c.write_tls(&mut to_server).expect("client flight");
        }
        client_time += t.elapsed();
        let t = Instant::now();
        let done = s
            .step(&mut to_server, &mut to_client, &mut plain, &mut closed)
            .expect("handshake");
        server_time += t.elapsed();
        let t = Instant::now();
        let mut flight = &to_client[..];
        while !flight.is_empty() {
            c.read_tls(&mut flight).expect("server flight");
            c.process_new_packets().expect("server flight");
        }
        client_time += t.elapsed();
        to_client.clear();
        if done {
            let times = HandshakeTimes {
                server: server_time.max(Duration::from_nanos(1)),
                client: client_time.max(Duration::from_nanos(1)),
            };
            return (s, times);
        }
    }
}
