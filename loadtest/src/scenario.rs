//! What a run does: subscribers and their filter mix, publishers, the event mix and size,
//! the rate, and how long. Also the pre-generated event pool and expected-delivery
//! accounting (which subscriber should get which event).

use std::collections::HashMap;
use std::time::Duration;

use clap::Args;
use krux_relay::event::{EventType, FilterKeys, Validator};
use krux_relay::fleet::Fleet;

#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct Scenario {
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Filter mix in proportions: all, type, agent, session (e.g. `all=70,type=10,agent=10,session=10`).
    #[arg(long, default_value = "all=100")]
    pub filters: String,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// `fleet` (the realistic mix) or one event type.
    #[arg(long, default_value = "fleet")]
    pub events: String,
    /// Approximate size of each published event in bytes.
    #[arg(long, default_value_t = 300)]
    pub event_size: usize,
    /// Events per second, or `max` (as fast as subscribers keep up, bounded by --window).
    #[arg(long, default_value = "max")]
    pub rate: String,
    /// At max rate: events in flight (published minus delivered to the average subscriber).
    #[arg(long, default_value_t = 1000)]
    pub window: u64,
    /// Load before measuring (connections settle, windows fill); not in the figures.
    #[arg(long, default_value = "2s", value_parser = krux_relay::config::parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub warmup: Duration,
    /// The measured window.
    #[arg(long, default_value = "10s", value_parser = krux_relay::config::parse_duration)]
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Parse one frame in this many, per subscriber, for latency.
    #[arg(long, default_value_t = 32)]
    pub sample_every: u64,
    /// Only connect the subscribers and measure the server's RSS per idle connection.
    #[arg(long)]
    pub idle: bool,
    /// Subscribers per second that drop their connection and resume with `since`.
    #[arg(long, default_value_t = 0)]
    pub churn: usize,
    /// Extra subscribers that never read (isolation: the others must not notice them).
    #[arg(long, default_value_t = 0)]
    pub stalled: usize,
    /// Halfway through, every subscriber reconnects at once with `since` (reconnect storm).
    #[arg(long)]
    pub storm: bool,
    /// Client runtime threads (1 keeps the client to one core; the rest is the server's).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Worker processes that hold the subscriber sockets (a process may open at most
    /// 20,000 files here). Default: none up to 15,000 subscribers, then one per 15,000.
    #[arg(long)]
    pub workers: Option<usize>,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Scenario {
    pub fn rate(&self) -> anyhow::Result<Option<u64>> {
        if self.rate == "max" {
            return Ok(None);
        }
        let r: u64 = self
            .rate
            .parse()
            .map_err(|_| anyhow::anyhow!("--rate is `max` or events per second"))?;
        Ok(Some(r.max(1)))
    }

    fn mix(&self) -> anyhow::Result<[u32; 4]> {
        let mut w = [0u32; 4];
        for part in self.filters.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--filters: `{part}` is not kind=weight"))?;
            let i = ["all", "type", "agent", "session"]
                .iter()
                .position(|x| *x == k.trim())
                .ok_or_else(|| {
                    anyhow::anyhow!("--filters: unknown kind `{k}` (all, type, agent, session)")
                })?;
            w[i] = v.trim().parse()?;
        }
        anyhow::ensure!(w.iter().sum::<u32>() > 0, "--filters: weights sum to zero");
        Ok(w)
    }
}

/// One subscriber's filter, as a query string and as a class for expected counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SubFilter {
    All,
    Type(EventType),
    Agent(String),
    Session(String),
}

impl SubFilter {
    /// The filter's class, for the report's split.
    pub fn class(&self) -> &'static str {
        match self {
            SubFilter::All => "all",
            SubFilter::Type(_) => "type",
            SubFilter::Agent(_) => "agent",
            SubFilter::Session(_) => "session",
        }
    }

    pub fn query(&self) -> String {
        match self {
            SubFilter::All => String::new(),
            SubFilter::Type(t) => format!("type={}", t.name()),
            SubFilter::Agent(a) => format!("agent={a}"),
            SubFilter::Session(s) => format!("session={s}"),
        }
    }
}

/// A pre-generated event: the line after its opening `{` (the publisher prepends
/// `{"lt":<send time>,`), and its filter keys.
pub struct PoolEvent {
    pub rest: Vec<u8>,
    pub keys: FilterKeys,
}

pub struct Pool {
    pub events: Vec<PoolEvent>,
}

impl Pool {
    pub fn generate(sc: &Scenario, size: usize) -> anyhow::Result<Pool> {
        let only = match sc.events.as_str() {
            "fleet" => None,
            name => Some(
                EventType::from_name(name)
                    .ok_or_else(|| anyhow::anyhow!("--events: unknown type `{name}`"))?,
            ),
        };
        let mut fleet = Fleet::new(300, 0x10ad);
        let mut validator = Validator::new();
        let mut events = Vec::with_capacity(size);
        let mut tries = 0;
        while events.len() < size {
            tries += 1;
            anyhow::ensure!(
                tries < size * 1000,
                "could not generate enough `{}` events",
                sc.events
            );
            let mut v = fleet.next_event();
            if only.is_some_and(|t| v["type"] != t.name()) {
                continue;
            }
            v["timestamp"] = serde_json::Value::String("2026-03-15T10:30:00.123Z".into());
            let base =
                v.to_string().len() + r#","pad":"""#.len() + r#"{"lt":1764115200000000000,"#.len();
            v["pad"] = serde_json::Value::String("x".repeat(sc.event_size.saturating_sub(base)));
            let line = v.to_string();
            let keys = validator
                .validate(line.as_bytes())
                .map_err(|e| anyhow::anyhow!("generated event invalid: {e}"))?
                .keys;
            events.push(PoolEvent {
                rest: line.as_bytes()[1..].to_vec(),
                keys,
            });
        }
        Ok(Pool { events })
    }

    /// Assigns each subscriber a filter following the mix, drawing values from the pool so
    /// that every filtered subscriber has traffic.
    pub fn filters(&self, sc: &Scenario) -> anyhow::Result<Vec<SubFilter>> {
        let w = sc.mix()?;
        let total: u32 = w.iter().sum();
        let mut rng_state = 0x5eed_u64;
        let mut rnd = |n: usize| {
            rng_state = rng_state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng_state >> 33) as usize) % n.max(1)
        };
        let mut out = Vec::with_capacity(sc.subscribers);
        for i in 0..sc.subscribers {
            // Deterministic proportions: subscriber i falls in the bucket of (i mod total).
            let mut slot = (i as u32 * 7919) % total;
            let kind = w
                .iter()
                .position(|&x| {
                    if slot < x {
                        true
                    } else {
                        slot -= x;
                        false
                    }
                })
                .expect("weights cover the slot");
            let e = &self.events[rnd(self.events.len())].keys;
            out.push(match kind {
                0 => SubFilter::All,
                1 => SubFilter::Type(e.etype),
                2 => match &e.agent {
                    Some(a) => SubFilter::Agent(a.to_string()),
                    None => SubFilter::All,
                },
                _ => match e.sessions().next() {
                    Some(s) => SubFilter::Session(s.to_string()),
                    None => SubFilter::Type(e.etype),
                },
            });
        }
        Ok(out)
    }
}

/// Counts of published events by the keys filters use, to compute what each subscriber
/// should have received.
#[derive(Default, Debug, Clone)]
pub struct Published {
    pub total: u64,
    by_type: [u64; 11],
    by_agent: HashMap<Box<str>, u64>,
    by_session: HashMap<Box<str>, u64>,
}

impl Published {
    pub fn add(&mut self, k: &FilterKeys) {
        self.total += 1;
        self.by_type[k.etype.index()] += 1;
        if let Some(a) = &k.agent {
            *self.by_agent.entry(a.as_str().into()).or_default() += 1;
        }
        for s in k.sessions() {
            *self.by_session.entry(s.into()).or_default() += 1;
        }
    }

    pub fn expected(&self, f: &SubFilter) -> u64 {
        match f {
            SubFilter::All => self.total,
            SubFilter::Type(t) => self.by_type[t.index()],
            SubFilter::Agent(a) => self.by_agent.get(a.as_str()).copied().unwrap_or(0),
            SubFilter::Session(s) => self.by_session.get(s.as_str()).copied().unwrap_or(0),
        }
    }
}

/// How many subscribers one event reaches, for window accounting.
pub struct Fanout {
    all: u64,
    by_type: [u64; 11],
    by_agent: HashMap<String, u64>,
    by_session: HashMap<String, u64>,
}

impl Fanout {
    pub fn new(filters: &[SubFilter]) -> Fanout {
        let mut f = Fanout {
            all: 0,
            by_type: [0; 11],
            by_agent: HashMap::new(),
            by_session: HashMap::new(),
        };
        for s in filters {
            match s {
                SubFilter::All => f.all += 1,
                SubFilter::Type(t) => f.by_type[t.index()] += 1,
                SubFilter::Agent(a) => *f.by_agent.entry(a.clone()).or_default() += 1,
                SubFilter::Session(x) => *f.by_session.entry(x.clone()).or_default() += 1,
            }
        }
        f
    }

    pub fn of(&self, k: &FilterKeys) -> u64 {
        let mut n = self.all + self.by_type[k.etype.index()];
        if let Some(a) = &k.agent {
            n += self.by_agent.get(&**a).copied().unwrap_or(0);
        }
        for s in k.sessions() {
            n += self.by_session.get(s).copied().unwrap_or(0);
        }
        n
    }
}
