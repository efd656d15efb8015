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
