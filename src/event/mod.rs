//! The seed's event schema: the 11 event types, what each must carry, and the filter keys
//! of one event. Pure data and validation; never touches a socket.

mod timestamp;
mod validate;

use compact_str::CompactString;

pub use timestamp::{is_rfc3339, now_rfc3339_millis};
pub use validate::{LineError, ValidEvent, Validator};

/// The 11 event types of the supervision stream, in the seed's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventType {
    CapabilityInvoked,
    CapabilityResult,
    CapabilityError,
    PolicyViolation,
    ApprovalRequested,
    ApprovalResolved,
    SessionStarted,
    SessionEnded,
    RateLimitHit,
    WriteBuffered,
    HealthAlert,
}

/// The JSON type a `data` field must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Str,
    Num,
    Bool,
    Obj,
}

impl FieldKind {
    pub fn describe(self) -> &'static str {
        match self {
            FieldKind::Str => "a string",
            FieldKind::Num => "a number",
            FieldKind::Bool => "a boolean",
            FieldKind::Obj => "an object",
        }
    }
}

use FieldKind::{Bool, Num, Obj, Str};

impl EventType {
    pub const ALL: [EventType; 11] = [
        EventType::CapabilityInvoked,
        EventType::CapabilityResult,
        EventType::CapabilityError,
        EventType::PolicyViolation,
        EventType::ApprovalRequested,
        EventType::ApprovalResolved,
        EventType::SessionStarted,
        EventType::SessionEnded,
        EventType::RateLimitHit,
        EventType::WriteBuffered,
        EventType::HealthAlert,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EventType::CapabilityInvoked => "capability_invoked",
            EventType::CapabilityResult => "capability_result",
            EventType::CapabilityError => "capability_error",
            EventType::PolicyViolation => "policy_violation",
            EventType::ApprovalRequested => "approval_requested",
            EventType::ApprovalResolved => "approval_resolved",
            EventType::SessionStarted => "session_started",
            EventType::SessionEnded => "session_ended",
            EventType::RateLimitHit => "rate_limit_hit",
            EventType::WriteBuffered => "write_buffered",
            EventType::HealthAlert => "health_alert",
        }
    }

    pub fn from_name(name: &str) -> Option<EventType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Comma-separated list of every type name, for error messages.
    pub fn all_names() -> String {
        Self::ALL.map(EventType::name).join(", ")
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Bit of this type in a type mask.
    pub fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// Whether the envelope must carry a `session_id` string.
    pub fn requires_session(self) -> bool {
        matches!(
            self,
            EventType::CapabilityInvoked
                | EventType::CapabilityResult
                | EventType::CapabilityError
                | EventType::PolicyViolation
                | EventType::ApprovalRequested
        )
    }

    /// The JSON type the seed gives a `data` field of that name in any event type (the
    /// seed never gives one name two types).
    pub fn seed_field_kind(name: &str) -> Option<FieldKind> {
        Some(match name {
            "arguments" => Obj,
            "success" | "cancellable" => Bool,
            "duration_ms"
            | "duration_seconds"
            | "capabilities_invoked"
            | "limit"
            | "retry_after_seconds" => Num,
            "capability" | "permission_tier" | "error_type" | "message" | "tier" | "rule"
            | "reason" | "approval_id" | "decision" | "decided_by" | "decided_at"
            | "session_id" | "agent_purpose" | "capability_pattern" | "window" | "write_id"
            | "service" | "operation" | "buffer_until" | "component" | "severity" | "threshold" => {
                Str
            }
            _ => return None,
        })
    }

    /// The `data` fields the seed shows for this type, with their JSON types. Each is
    /// required; any field the seed names for another type must have the seed's type
    /// (`seed_field_kind`); any other passes through untouched.
    pub fn data_fields(self) -> &'static [(&'static str, FieldKind)] {
        match self {
            EventType::CapabilityInvoked => &[
                ("capability", Str),
                ("arguments", Obj),
                ("permission_tier", Str),
                ("duration_ms", Num),
            ],
            EventType::CapabilityResult => {
                &[("capability", Str), ("success", Bool), ("duration_ms", Num)]
            }
            EventType::CapabilityError => &[
                ("capability", Str),
                ("error_type", Str),
                ("message", Str),
                ("tier", Str),
            ],
            EventType::PolicyViolation => &[
                ("capability", Str),
                ("rule", Str),
                ("reason", Str),
                ("tier", Str),
            ],
            EventType::ApprovalRequested => &[
                ("approval_id", Str),
                ("capability", Str),
                ("arguments", Obj),
                ("reason", Str),
            ],
            EventType::ApprovalResolved => &[
                ("approval_id", Str),
                ("decision", Str),
                ("decided_by", Str),
                ("decided_at", Str),
            ],
            EventType::SessionStarted => &[("session_id", Str), ("agent_purpose", Str)],
            EventType::SessionEnded => &[
                ("session_id", Str),
                ("duration_seconds", Num),
                ("capabilities_invoked", Num),
            ],
            EventType::RateLimitHit => &[
                ("capability_pattern", Str),
                ("limit", Num),
                ("window", Str),
                ("retry_after_seconds", Num),
            ],
            EventType::WriteBuffered => &[
                ("write_id", Str),
                ("service", Str),
                ("operation", Str),
                ("buffer_until", Str),
                ("cancellable", Bool),
            ],
            EventType::HealthAlert => &[
                ("component", Str),
                ("severity", Str),
                ("message", Str),
                ("threshold", Str),
            ],
        }
    }
}

/// What subscriptions are matched on, computed once per event at ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterKeys {
    pub etype: EventType,
    /// `None` for a `health_alert` with `"agent": null`.
    pub agent: Option<CompactString>,
    /// The envelope `session_id`.
    pub session: Option<CompactString>,
    /// `data.session_id`, kept only when it differs from the envelope's.
    pub data_session: Option<CompactString>,
}

impl FilterKeys {
    /// Every session id this event can be matched on (envelope first).
    pub fn sessions(&self) -> impl Iterator<Item = &str> {
        self.session
            .as_deref()
            .into_iter()
            .chain(self.data_session.as_deref())
    }
}

#[cfg(test)]
mod seed_field_tests {
    use super::*;

    #[test]
    fn every_seed_field_has_one_kind_and_seed_field_kind_knows_it() {
        for t in EventType::ALL {
            for (name, kind) in t.data_fields() {
                assert_eq!(EventType::seed_field_kind(name), Some(*kind), "{name}");
            }
        }
        assert_eq!(EventType::seed_field_kind("anything_else"), None);
    }
}
