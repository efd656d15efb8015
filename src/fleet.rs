//! A synthetic fleet of agents producing the seed's 11 event types in a realistic mix:
//! every capability call is an `invoked` followed by a `result` (or an `error`), sessions
//! start and end, approvals are requested then resolved; violations, rate limits,
//! buffered writes and health alerts are rare. Used by `demo`, the tests and load tests.

use serde_json::{json, Value};

const CAPABILITIES: &[(&str, &str)] = &[
    ("filesystem.read", "autonomous"),
    ("filesystem.write", "supervised"),
    ("network.http_get", "autonomous"),
    ("process.run", "approval"),
    ("email.send", "supervised"),
    ("database.query", "autonomous"),
];
const ROLES: &[&str] = &[
    "research",
    "deploy",
    "scraper",
    "assistant",
    "billing",
    "triage",
];

struct Agent {
    name: String,
    session: String,
    calls: u64,
}

pub struct Fleet {
    rng: fastrand::Rng,
    agents: Vec<Agent>,
    /// Capability calls started and not yet finished: (agent index, capability index).
    in_flight: Vec<(usize, usize)>,
    /// Approvals requested and not yet resolved: (agent index, approval id).
    approvals: Vec<(usize, String)>,
    counter: u64,
}

impl Fleet {
    pub fn new(agents: usize, seed: u64) -> Fleet {
        let mut rng = fastrand::Rng::with_seed(seed);
        let agents = (0..agents.max(1))
            .map(|i| Agent {
                name: format!("{}-agent-{i:03}", ROLES[i % ROLES.len()]),
                session: format!("sess-{:08x}", rng.u32(..)),
                calls: 0,
            })
            .collect();
        Fleet {
            rng,
            agents,
            in_flight: Vec::new(),
            approvals: Vec::new(),
            counter: 0,
        }
    }

    pub fn agent_names(&self) -> impl Iterator<Item = &str> {
        self.agents.iter().map(|a| a.name.as_str())
    }

    /// The next event, as one NDJSON line (without the newline). No `timestamp`: the relay
    /// stamps its receive time, as a gateway on the same host may rely on.
    pub fn next_line(&mut self) -> String {
        self.next_event().to_string()
    }

    pub fn next_event(&mut self) -> Value {
        self.counter += 1;
        let roll = self.rng.u32(..1000);
        // Finish a call in flight about as often as one starts, so invoked ≈ result.
        if !self.in_flight.is_empty() && roll < 470 {
            let (a, c) = self
                .in_flight
                .swap_remove(self.rng.usize(..self.in_flight.len()));
            return if self.rng.u32(..100) < 92 {
                self.result(a, c)
            } else {
                self.error(a, c)
            };
        }
        let a = self.rng.usize(..self.agents.len());
        match roll {
            0..=939 => {
                let c = self.rng.usize(..CAPABILITIES.len());
                self.in_flight.push((a, c));
                self.invoked(a, c)
            }
            940..=954 => self.session_roll(a),
            955..=966 => self.violation(a),
            967..=978 => self.approval(a),
            979..=987 => self.rate_limit(a),
            988..=997 => self.write_buffered(a),
            _ => self.health_alert(),
        }
    }

    fn envelope(&self, etype: &str, a: usize, with_session: bool, data: Value) -> Value {
        let agent = &self.agents[a];
        let mut v = json!({"type": etype, "agent": agent.name, "data": data});
        if with_session {
            v["session_id"] = json!(agent.session);
        }
        v
    }

    fn invoked(&mut self, a: usize, c: usize) -> Value {
        let (cap, tier) = CAPABILITIES[c];
        self.agents[a].calls += 1;
        let path = format!("/workspace/data-{}.csv", self.rng.u32(..500));
        self.envelope("capability_invoked", a, true, json!({
            "capability": cap, "arguments": {"path": path}, "permission_tier": tier, "duration_ms": 0
        }))
    }

    fn result(&mut self, a: usize, c: usize) -> Value {
        let ms = self.rng.u32(1..400);
        self.envelope(
            "capability_result",
            a,
            true,
            json!({
                "capability": CAPABILITIES[c].0, "success": true, "duration_ms": ms
            }),
        )
    }

    fn error(&mut self, a: usize, c: usize) -> Value {
        let (kind, msg) = if self.rng.bool() {
            (
                "PolicyDenied",
                format!(
                    "Agent '{}' is not permitted to write to /etc/",
                    self.agents[a].name
                ),
            )
        } else {
            ("Timeout", "Upstream did not answer within 30 s".to_string())
        };
        self.envelope("capability_error", a, true, json!({
            "capability": CAPABILITIES[c].0, "error_type": kind, "message": msg, "tier": "blocked"
        }))
    }

    fn session_roll(&mut self, a: usize) -> Value {
        let agent = &mut self.agents[a];
        if self.rng.bool() {
            let ended = json!({
                "session_id": agent.session, "duration_seconds": self.rng.u32(60..7200), "capabilities_invoked": agent.calls
            });
            let v = self.envelope("session_ended", a, false, ended);
            let agent = &mut self.agents[a];
            agent.session = format!("sess-{:08x}", self.rng.u32(..));
            agent.calls = 0;
            v
        } else {
            let purpose = format!(
                "{} agent",
                agent.name.split('-').next().unwrap_or("general")
            );
            let data = json!({"session_id": agent.session, "agent_purpose": purpose});
            self.envelope("session_started", a, false, data)
        }
    }

    fn violation(&mut self, a: usize) -> Value {
        self.envelope(
            "policy_violation",
            a,
            true,
            json!({
                "capability": "process.run", "rule": "system.deny_dangerous_commands",
                "reason": "Command 'rm -rf /' matches blocked pattern", "tier": "blocked"
            }),
        )
    }

    fn approval(&mut self, a: usize) -> Value {
        if let Some(i) =
            (!self.approvals.is_empty()).then(|| self.rng.usize(..self.approvals.len()))
        {
            if self.rng.bool() {
                let (who, id) = self.approvals.swap_remove(i);
                let decision = if self.rng.u32(..10) < 8 {
                    "approved"
                } else {
                    "rejected"
                };
                let now = crate::event::now_rfc3339_millis();
                return self.envelope("approval_resolved", who, false, json!({
                    "approval_id": id, "decision": decision, "decided_by": "admin", "decided_at": now
                }));
            }
        }
        let id = format!("appr-{:06x}", self.rng.u32(..0xFF_FFFF));
        self.approvals.push((a, id.clone()));
        let reason = format!("process.run requires approval for {}", self.agents[a].name);
        self.envelope(
            "approval_requested",
            a,
            true,
            json!({
                "approval_id": id, "capability": "process.run",
                "arguments": {"command": "kubectl apply -f deploy.yaml"}, "reason": reason
            }),
        )
    }

    fn rate_limit(&mut self, a: usize) -> Value {
        let retry = self.rng.u32(10..600);
        self.envelope("rate_limit_hit", a, false, json!({
            "capability_pattern": "network.*", "limit": 100, "window": "1h", "retry_after_seconds": retry
        }))
    }

    fn write_buffered(&mut self, a: usize) -> Value {
        let until = humantime::format_rfc3339_millis(
            std::time::SystemTime::now() + std::time::Duration::from_secs(300),
        )
        .to_string();
        let id = format!("wr-{:06x}", self.rng.u32(..0xFF_FFFF));
        self.envelope(
            "write_buffered",
            a,
            false,
            json!({
                "write_id": id, "service": "gmail",
                "operation": "email.send", "buffer_until": until, "cancellable": true
            }),
        )
    }

    fn health_alert(&mut self) -> Value {
        let pct = self.rng.u32(81..99);
        json!({"type": "health_alert", "agent": null, "data": {
            "component": "disk", "severity": "warning", "message": format!("Disk usage at {pct}%"), "threshold": "80%"
        }})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventType, Validator};

    #[test]
    fn mix_is_valid_realistic_and_covers_all_types() {
        let mut fleet = Fleet::new(300, 1);
        let mut v = Validator::new();
        let mut counts = [0u32; 11];
        for _ in 0..50_000 {
            let line = fleet.next_line();
            let ev = v
                .validate(line.as_bytes())
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            counts[ev.keys.etype.index()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 0), "{counts:?}");
        let invoked = counts[EventType::CapabilityInvoked.index()];
        let result = counts[EventType::CapabilityResult.index()];
        let rare =
            counts[EventType::HealthAlert.index()] + counts[EventType::PolicyViolation.index()];
        assert!(invoked + result > 40_000, "{counts:?}");
        assert!(rare < 1_000, "{counts:?}");
    }
}
