//! Subscriptions and the per-reactor index that finds the subscribers of one event without
//! scanning all of them. No I/O.
//!
//! Each subscription is filed under its most selective constraint: its sessions if it
//! filters on session, else its agents, else its types, else the "everything" list. An
//! event then looks at only four places — everything, its type, its agent, its session(s)
//! — and checks the rest of each candidate's filter there.

use std::collections::HashMap;

use crate::event::{EventType, FilterKeys};

/// One subscription's filter. Dimensions are AND-ed; values inside one are OR-ed.
/// `None` means "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Bit mask over `EventType::bit()`.
    pub types: Option<u16>,
    pub agents: Option<Vec<Box<str>>>,
    pub sessions: Option<Vec<Box<str>>>,
}

impl Filter {
    pub fn matches(&self, keys: &FilterKeys) -> bool {
        if let Some(mask) = self.types {
            if mask & keys.etype.bit() == 0 {
                return false;
            }
        }
        if let Some(agents) = &self.agents {
            // An agent filter never matches `health_alert` with `agent: null`.
            match keys.agent.as_deref() {
                Some(a) if agents.iter().any(|x| &**x == a) => {}
                _ => return false,
            }
        }
        if let Some(sessions) = &self.sessions {
            if !keys.sessions().any(|s| sessions.iter().any(|x| &**x == s)) {
                return false;
            }
        }
        true
    }
}

/// Subscriber id within one reactor (its slab key).
pub type SubId = usize;

#[derive(Debug, Default)]
pub struct SubscriberIndex {
    filters: Vec<Option<Filter>>,
    everything: IdList,
    by_type: [IdList; 11],
    by_agent: HashMap<Box<str>, IdList>,
    by_session: HashMap<Box<str>, IdList>,
    len: usize,
}

/// Ids in a dense list (fan-out iterates it per event) plus each one's position, so that
/// removal is O(1): one list can hold every subscriber of a reactor, and a reconnect storm
/// removes them all.
#[derive(Debug, Default)]
struct IdList {
    ids: Vec<SubId>,
    pos: HashMap<SubId, usize>,
}

impl IdList {
    fn push(&mut self, id: SubId) {
        self.pos.insert(id, self.ids.len());
        self.ids.push(id);
    }

    fn remove(&mut self, id: SubId) {
        if let Some(p) = self.pos.remove(&id) {
            self.ids.swap_remove(p);
            if let Some(&moved) = self.ids.get(p) {
                self.pos.insert(moved, p);
            }
        }
    }
}

enum Bucket<'a> {
    Everything,
    Types(u16),
    Agents(&'a [Box<str>]),
    Sessions(&'a [Box<str>]),
}

fn bucket_of(f: &Filter) -> Bucket<'_> {
    if let Some(s) = &f.sessions {
        Bucket::Sessions(s)
    } else if let Some(a) = &f.agents {
        Bucket::Agents(a)
    } else if let Some(t) = f.types {
        Bucket::Types(t)
    } else {
        Bucket::Everything
    }
}

impl SubscriberIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn insert(&mut self, id: SubId, filter: Filter) {
        if self.filters.len() <= id {
            self.filters.resize(id + 1, None);
        }
        assert!(
            self.filters[id].is_none(),
            "subscriber {id} is indexed once"
        );
        match bucket_of(&filter) {
            Bucket::Everything => self.everything.push(id),
            Bucket::Types(mask) => {
                for t in EventType::ALL.iter().filter(|t| mask & t.bit() != 0) {
                    self.by_type[t.index()].push(id);
                }
            }
            Bucket::Agents(agents) => {
                for a in dedup(agents) {
                    self.by_agent.entry(a.clone()).or_default().push(id);
                }
            }
            Bucket::Sessions(sessions) => {
                for s in dedup(sessions) {
                    self.by_session.entry(s.clone()).or_default().push(id);
                }
            }
        }
        self.filters[id] = Some(filter);
        self.len += 1;
    }

    pub fn remove(&mut self, id: SubId) -> Option<Filter> {
        let filter = self.filters.get_mut(id)?.take()?;
        match bucket_of(&filter) {
            Bucket::Everything => self.everything.remove(id),
            Bucket::Types(mask) => {
                for t in EventType::ALL.iter().filter(|t| mask & t.bit() != 0) {
                    self.by_type[t.index()].remove(id);
                }
            }
            Bucket::Agents(agents) => remove_keyed(&mut self.by_agent, agents, id),
            Bucket::Sessions(sessions) => remove_keyed(&mut self.by_session, sessions, id),
        }
        self.len -= 1;
        Some(filter)
    }

    /// Calls `f` once for every subscriber whose filter matches `keys`.
    pub fn for_each_match(&self, keys: &FilterKeys, mut f: impl FnMut(SubId)) {
        self.everything.ids.iter().copied().for_each(&mut f);
        self.for_each_filtered_match(keys, f);
    }

    /// The subscribers without a filter: they get every event (the fan-out serves them a
    /// whole round of events at a time).
    pub fn unfiltered(&self) -> &[SubId] {
        &self.everything.ids
    }

    /// Like `for_each_match`, for the subscribers with a filter only.
    pub fn for_each_filtered_match(&self, keys: &FilterKeys, mut f: impl FnMut(SubId)) {
        let mut check = |id: SubId| {
            if self.filters[id]
                .as_ref()
                .is_some_and(|flt| flt.matches(keys))
            {
                f(id);
            }
        };
        self.by_type[keys.etype.index()]
            .ids
            .iter()
            .copied()
            .for_each(&mut check);
        if let Some(a) = keys.agent.as_deref() {
            if let Some(list) = self.by_agent.get(a) {
                list.ids.iter().copied().for_each(&mut check);
            }
        }
        if let Some(s) = keys.session.as_deref() {
            if let Some(list) = self.by_session.get(s) {
                list.ids.iter().copied().for_each(&mut check);
            }
        }
        if let Some(d) = keys.data_session.as_deref() {
            if let Some(list) = self.by_session.get(d) {
                // A subscriber filed under both session keys was already called above.
                let first = keys.session.as_deref();
                for &id in &list.ids {
                    let seen = first.is_some_and(|s| {
                        self.filters[id]
                            .as_ref()
                            .and_then(|f| f.sessions.as_ref())
                            .is_some_and(|ss| ss.iter().any(|x| &**x == s))
                    });
                    if !seen {
                        check(id);
                    }
                }
            }
        }
    }
}

fn dedup(values: &[Box<str>]) -> impl Iterator<Item = &Box<str>> {
    values
        .iter()
        .enumerate()
        .filter(move |(i, v)| !values[..*i].contains(v))
        .map(|(_, v)| v)
}

fn remove_keyed(map: &mut HashMap<Box<str>, IdList>, keys: &[Box<str>], id: SubId) {
    for k in keys {
        if let Some(list) = map.get_mut(k) {
            list.remove(id);
            if list.ids.is_empty() {
                map.remove(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(
        t: EventType,
        agent: Option<&str>,
        session: Option<&str>,
        data_session: Option<&str>,
    ) -> FilterKeys {
        FilterKeys {
            etype: t,
            agent: agent.map(Into::into),
            session: session.map(Into::into),
            data_session: data_session.map(Into::into),
        }
    }

    fn list(v: &[&str]) -> Option<Vec<Box<str>>> {
        Some(v.iter().map(|s| (*s).into()).collect())
    }

    fn filter(types: &[EventType], agents: &[&str], sessions: &[&str]) -> Filter {
        Filter {
            types: (!types.is_empty()).then(|| types.iter().fold(0, |m, t| m | t.bit())),
            agents: (!agents.is_empty()).then(|| list(agents).unwrap()),
            sessions: (!sessions.is_empty()).then(|| list(sessions).unwrap()),
        }
    }

    use EventType::*;

    #[test]
    fn filter_semantics() {
        let inv = keys(CapabilityInvoked, Some("a1"), Some("s1"), None);
        let started = keys(SessionStarted, Some("a1"), None, Some("s9"));
        let alert = keys(HealthAlert, None, None, None);
        let table: &[(Filter, &FilterKeys, bool)] = &[
            (filter(&[], &[], &[]), &alert, true),
            (filter(&[CapabilityInvoked], &[], &[]), &inv, true),
            (
                filter(&[CapabilityResult, PolicyViolation], &[], &[]),
                &inv,
                false,
            ),
            (filter(&[], &["a2", "a1"], &[]), &inv, true),
            (filter(&[], &["a1"], &[]), &alert, false),
            (filter(&[], &[], &["s1"]), &inv, true),
            (filter(&[], &[], &["s9"]), &started, true),
            (filter(&[], &[], &["s1"]), &started, false),
            (filter(&[CapabilityInvoked], &["a1"], &["s1"]), &inv, true),
            (filter(&[CapabilityInvoked], &["a2"], &["s1"]), &inv, false),
            (filter(&[SessionStarted], &["a1"], &["s1"]), &started, false),
        ];
        for (f, k, want) in table {
            assert_eq!(f.matches(k), *want, "{f:?} vs {k:?}");
        }
    }

    fn matches(idx: &SubscriberIndex, k: &FilterKeys) -> Vec<SubId> {
        let mut v = Vec::new();
        idx.for_each_match(k, |id| v.push(id));
        v.sort();
        v
    }

    #[test]
    fn index_agrees_with_a_scan_and_calls_each_once() {
        let agents = ["a0", "a1", "a2", "a3"];
        let sessions = ["s0", "s1", "s2"];
        let mut rng = fastrand::Rng::with_seed(7);
        let mut idx = SubscriberIndex::default();
        let mut filters = Vec::new();
        for id in 0..400 {
            let pick = |rng: &mut fastrand::Rng, from: &[&'static str]| -> Vec<&'static str> {
                if rng.bool() {
                    vec![]
                } else {
                    (0..rng.usize(1..4))
                        .map(|_| from[rng.usize(..from.len())])
                        .collect()
                }
            };
            let types: Vec<EventType> = if rng.bool() {
                vec![]
            } else {
                (0..rng.usize(1..3))
                    .map(|_| EventType::ALL[rng.usize(..11)])
                    .collect()
            };
            let f = filter(&types, &pick(&mut rng, &agents), &pick(&mut rng, &sessions));
            idx.insert(id, f.clone());
            filters.push(Some(f));
        }
        // Remove some, to exercise removal from every kind of bucket.
        for id in (0..400).step_by(3) {
            assert!(idx.remove(id).is_some());
            filters[id] = None;
        }
        assert!(idx.remove(0).is_none());
        // Reuse some ids unfiltered (slab ids are reused), then remove a few of those.
        for id in (0..400).step_by(6) {
            idx.insert(id, Filter::default());
            filters[id] = Some(Filter::default());
        }
        for id in (0..400).step_by(12) {
            assert!(idx.remove(id).is_some());
            filters[id] = None;
        }
        assert_eq!(idx.len(), filters.iter().flatten().count());
        for _ in 0..2000 {
            let t = EventType::ALL[rng.usize(..11)];
            let agent = (t != HealthAlert || rng.bool()).then(|| agents[rng.usize(..4)]);
            let s = rng.bool().then(|| sessions[rng.usize(..3)]);
            let d = rng
                .bool()
                .then(|| sessions[rng.usize(..3)])
                .filter(|d| Some(*d) != s);
            let k = keys(t, agent, s, d);
            let want: Vec<SubId> = (0..filters.len())
                .filter(|&i| filters[i].as_ref().is_some_and(|f| f.matches(&k)))
                .collect();
            assert_eq!(matches(&idx, &k), want, "{k:?}");
        }
    }

    #[test]
    fn duplicate_values_in_a_list_deliver_once() {
        let mut idx = SubscriberIndex::default();
        idx.insert(0, filter(&[], &["a1", "a1"], &[]));
        idx.insert(1, filter(&[], &[], &["s1", "s2", "s1"]));
        assert_eq!(
            matches(
                &idx,
                &keys(CapabilityInvoked, Some("a1"), Some("s1"), Some("s2"))
            ),
            vec![0, 1]
        );
        idx.remove(1);
        idx.remove(0);
        assert!(idx.by_agent.is_empty() && idx.by_session.is_empty());
    }
}
