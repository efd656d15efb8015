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
    /// The measured window (default 10s; with --stages, their total).
    #[arg(long, value_parser = krux_relay::config::parse_duration)]
    #[serde(serialize_with = "ser_opt_duration")]
    pub duration: Option<Duration>,
    /// Ramps during the measured window, `DURATION:SUBSCRIBERS[:RATE]`, comma-separated or
    /// repeated: over each stage, subscribers and the rate (events/s or `max`) move
    /// linearly from where the one before left them (at first: --subscribers, --rate) to
    /// its targets; without a RATE the rate stays. Subscribers added connect live (owed
    /// what is published after their subscription), those removed leave in reverse order.
    #[arg(long, value_delimiter = ',', value_parser = Stage::parse)]
    pub stages: Vec<Stage>,
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
    /// Subscribers offer permessage-deflate (as browsers do): events the relay finds worth
    /// compressing come compressed, each compressed once for all of them.
    #[arg(long)]
    pub compression: bool,
    /// Worker processes that hold the subscriber sockets (a process may open at most
    /// 20,000 files here). Default: none up to 15,000 subscribers, then one per 15,000.
    #[arg(long)]
    pub workers: Option<usize>,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

/// Events per second, or as fast as the window allows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Max,
    PerSecond(u64),
}

/// As a plan writes it: `"max"` or a number.
impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Rate::Max => s.serialize_str("max"),
            Rate::PerSecond(r) => s.serialize_u64(*r),
        }
    }
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, String> {
        match text.trim() {
            "max" => Ok(Rate::Max),
            n => n
                .parse::<u64>()
                .map(|r| Rate::PerSecond(r.max(1)))
                .map_err(|_| format!("`{n}`: a rate is `max` or events per second")),
        }
    }
}

/// One stage of a ramp (`--stages`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Stage {
    #[serde(serialize_with = "ser_duration")]
    pub duration: Duration,
    pub subscribers: usize,
    /// `None`: the rate the stage before ended at.
    pub rate: Option<Rate>,
}

impl Stage {
    pub fn parse(text: &str) -> Result<Stage, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let usage = || format!("`{text}`: a stage is DURATION:SUBSCRIBERS[:RATE]");
        let [duration, subscribers, rest @ ..] = &parts[..] else {
            return Err(usage());
        };
        let duration = krux_relay::config::parse_duration(duration.trim())
            .map_err(|e| format!("`{text}`: {e}"))?;
        if duration.is_zero() {
            return Err(format!("`{text}`: a stage lasts longer than 0 s"));
        }
        let subscribers = subscribers
            .trim()
            .parse()
            .map_err(|_| format!("`{text}`: `{subscribers}` is not a number of subscribers"))?;
        let rate = match rest {
            [] => None,
            [r] => Some(Rate::parse(r)?),
            _ => return Err(usage()),
        };
        Ok(Stage {
            duration,
            subscribers,
            rate,
        })
    }
}

/// Where the stages put subscribers and the rate at a time into the measured window.
pub struct Ramp {
    /// Per stage: its start, the subscribers and rate it starts from, and the stage.
    stages: Vec<(Duration, usize, Rate, Stage)>,
}

impl Ramp {
    pub fn new(subscribers: usize, rate: Rate, stages: &[Stage]) -> Ramp {
        let (mut at, mut subs, mut r) = (Duration::ZERO, subscribers, rate);
        let mut out = Vec::new();
        for s in stages {
            out.push((at, subs, r, s.clone()));
            at += s.duration;
            subs = s.subscribers;
            r = s.rate.unwrap_or(r);
        }
        Ramp { stages: out }
    }

    /// The stage `t` falls in (its index), and the subscribers and rate there.
    pub fn at(&self, t: Duration) -> Option<(usize, usize, Rate)> {
        let (i, (start, subs, rate, s)) = self
            .stages
            .iter()
            .enumerate()
            .rev()
            .find(|(_, (start, ..))| *start <= t)?;
        let f = ((t - *start).as_secs_f64() / s.duration.as_secs_f64()).min(1.0);
        let lerp = |a: f64, b: f64| a + (b - a) * f;
        let n = lerp(*subs as f64, s.subscribers as f64).round() as usize;
        let r = match (rate, s.rate.unwrap_or(*rate)) {
            (Rate::PerSecond(a), Rate::PerSecond(b)) => {
                Rate::PerSecond(lerp(*a as f64, b as f64).round().max(1.0) as u64)
            }
            // From or to `max` there is nothing to interpolate: the new rate holds at once.
            (_, to) => to,
        };
        Some((i, n, r))
    }
}

impl Scenario {
    pub fn rate(&self) -> anyhow::Result<Rate> {
        Rate::parse(&self.rate).map_err(|e| anyhow::anyhow!("--rate: {e}"))
    }

    /// The measured window: the stages' total, or --duration (default 10 s).
    pub fn window_len(&self) -> anyhow::Result<Duration> {
        match (self.stages.is_empty(), self.duration) {
            (true, d) => Ok(d.unwrap_or(Duration::from_secs(10))),
            (false, None) => Ok(self.stages.iter().map(|s| s.duration).sum()),
            (false, Some(_)) => {
                anyhow::bail!("--duration and --stages: the stages' durations make the window")
            }
        }
    }

    /// The most subscribers the run has at once.
    pub fn peak_subscribers(&self) -> usize {
        self.stages
            .iter()
            .map(|s| s.subscribers)
            .fold(self.subscribers, usize::max)
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
/// `{"lt":<send time>,"li":<its index in the pool>,`), and its filter keys.
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
            let base = v.to_string().len()
                + r#","pad":"""#.len()
                + r#"{"lt":1764115200000000000,"li":4095,"#.len();
            v["pad"] =
                serde_json::Value::String(pad_text(sc.event_size.saturating_sub(base), tries));
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
        let mut out = Vec::with_capacity(sc.peak_subscribers());
        for i in 0..sc.peak_subscribers() {
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

/// `len` bytes of text that compresses about as log text does (words from a small
/// vocabulary, numbers), not to nothing as a run of one letter would: compression
/// figures measured with padded events stay honest.
fn pad_text(len: usize, seed: usize) -> String {
    const WORDS: [&str; 16] = [
        "capability",
        "invoked",
        "session",
        "agent",
        "policy",
        "read",
        "write",
        "denied",
        "approved",
        "path",
        "/var/lib",
        "request",
        "result",
        "error",
        "retry",
        "timeout",
    ];
    let mut state = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = String::with_capacity(len + 16);
    while out.len() < len {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (state >> 33) as usize;
        out += WORDS[r % WORDS.len()];
        out += if r.is_multiple_of(5) { "-" } else { " " };
        if r.is_multiple_of(7) {
            out += &(r % 100_000).to_string();
            out.push(' ');
        }
    }
    out.truncate(len);
    out
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
        filters.iter().for_each(|s| f.add(s, 1));
        f
    }

    /// A subscriber with filter `s` joins (`n` = 1) or leaves (`n` = -1).
    pub fn add(&mut self, s: &SubFilter, n: i64) {
        let slot = match s {
            SubFilter::All => &mut self.all,
            SubFilter::Type(t) => &mut self.by_type[t.index()],
            SubFilter::Agent(a) => self.by_agent.entry(a.clone()).or_default(),
            SubFilter::Session(x) => self.by_session.entry(x.clone()).or_default(),
        };
        *slot = slot.saturating_add_signed(n);
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

/// The events the observer saw, by seq, indexed by the keys filters use: how many events
/// matching a filter carry a seq in a range, for subscribers that joined or left during
/// the window.
pub struct SeqIndex {
    seqs: Vec<u64>,
    by_type: [Vec<u64>; 11],
    by_agent: HashMap<Box<str>, Vec<u64>>,
    by_session: HashMap<Box<str>, Vec<u64>>,
}

impl SeqIndex {
    /// `events`: (seq, index in `pool`) in seq order.
    pub fn new(events: &[(u64, u32)], pool: &Pool) -> SeqIndex {
        let mut ix = SeqIndex {
            seqs: Vec::with_capacity(events.len()),
            by_type: Default::default(),
            by_agent: HashMap::new(),
            by_session: HashMap::new(),
        };
        for &(seq, at) in events {
            let Some(e) = pool.events.get(at as usize) else {
                continue;
            };
            let k = &e.keys;
            ix.seqs.push(seq);
            ix.by_type[k.etype.index()].push(seq);
            if let Some(a) = &k.agent {
                ix.by_agent.entry(a.as_str().into()).or_default().push(seq);
            }
            for s in k.sessions() {
                ix.by_session.entry(s.into()).or_default().push(seq);
            }
        }
        ix
    }

    /// Events matching `f` with `after < seq <= until`.
    pub fn count(&self, f: &SubFilter, after: u64, until: u64) -> u64 {
        let seqs: &[u64] = match f {
            SubFilter::All => &self.seqs,
            SubFilter::Type(t) => &self.by_type[t.index()],
            SubFilter::Agent(a) => self.by_agent.get(a.as_str()).map_or(&[], |v| v),
            SubFilter::Session(s) => self.by_session.get(s.as_str()).map_or(&[], |v| v),
        };
        let lo = seqs.partition_point(|&s| s <= after);
        let hi = seqs.partition_point(|&s| s <= until);
        hi.saturating_sub(lo) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(args: &[&str]) -> Scenario {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            s: Scenario,
        }
        let argv = std::iter::once("x").chain(args.iter().copied());
        <P as clap::Parser>::try_parse_from(argv).unwrap().s
    }

    #[test]
    fn stages_ramp_subscribers_and_rate_from_where_the_last_left_off() {
        let sc = scenario(&[
            "--subscribers",
            "10",
            "--rate",
            "100",
            "--stages",
            "2s:50:300,1s:50,2s:20:max",
        ]);
        assert_eq!(sc.window_len().unwrap(), Duration::from_secs(5));
        assert_eq!(sc.peak_subscribers(), 50);
        let ramp = Ramp::new(sc.subscribers, sc.rate().unwrap(), &sc.stages);
        let at = |ms| ramp.at(Duration::from_millis(ms)).unwrap();
        assert_eq!(at(0), (0, 10, Rate::PerSecond(100)));
        assert_eq!(at(1000), (0, 30, Rate::PerSecond(200)));
        assert_eq!(at(2500), (1, 50, Rate::PerSecond(300)), "no rate: it stays");
        assert_eq!(at(4000), (2, 35, Rate::Max), "to max: at once");
        assert_eq!(
            at(9000),
            (2, 20, Rate::Max),
            "past the end: the last targets"
        );
        for bad in ["2s", "2s:x", "0s:10", "2s:10:fast", "1s:2:3:4"] {
            assert!(Stage::parse(bad).is_err(), "{bad}");
        }
        let both = scenario(&["--duration", "3s", "--stages", "1s:5"]);
        assert!(both.window_len().is_err());
    }

    #[test]
    fn a_seq_index_counts_what_a_filter_was_owed_in_a_range() {
        let sc = scenario(&["--events", "fleet"]);
        let pool = Pool::generate(&sc, 64).unwrap();
        // Seqs 1..=64 carry the pool's events in order, then seqs 101..=164 again.
        let events: Vec<(u64, u32)> = (0..64u32)
            .map(|i| (u64::from(i) + 1, i))
            .chain((0..64u32).map(|i| (u64::from(i) + 101, i)))
            .collect();
        let ix = SeqIndex::new(&events, &pool);
        let mut published = Published::default();
        pool.events[10..64]
            .iter()
            .for_each(|e| published.add(&e.keys));
        pool.events[..20]
            .iter()
            .for_each(|e| published.add(&e.keys));
        for f in pool
            .filters(&scenario(&[
                "--subscribers",
                "40",
                "--filters",
                "all=1,type=1,agent=1,session=1",
            ]))
            .unwrap()
        {
            // (10, 120]: the first pass from its 11th event, the second's first 20.
            assert_eq!(ix.count(&f, 10, 120), published.expected(&f), "{f:?}");
        }
        assert_eq!(ix.count(&SubFilter::All, 0, u64::MAX), 128);
        assert_eq!(ix.count(&SubFilter::All, 64, 100), 0);
    }
}
