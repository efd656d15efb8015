//! Validation of one published NDJSON line against the seed's schema, with simd-json.
//!
//! The line itself is what subscribers receive (plus `seq`, and a `timestamp` when the
//! publisher left it out), so validation only needs to *read* it: it parses a scratch copy
//! into a reused simd-json tape and computes the event's filter keys.

use compact_str::CompactString;
use simd_json::prelude::*;
use simd_json::tape::{Tape, Value};
use simd_json::{Buffers, ValueType};

use super::{is_rfc3339, EventType, FieldKind, FilterKeys};

/// Why a line was rejected; the `Display` text is what the publisher reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("an event must be a JSON object")]
    NotAnObject,
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("duplicate field `{0}`")]
    DuplicateField(&'static str),
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("unknown event type `{0}`; expected one of: {all}", all = EventType::all_names())]
    UnknownType(String),
    #[error("field `timestamp` must be an RFC 3339 date-time such as 2026-03-15T10:30:00.123Z")]
    BadTimestamp,
    #[error("field `agent` may be null only for health_alert")]
    NullAgent,
    #[error("field `seq` is assigned by the relay and must not be published")]
    ReservedSeq,
    #[error("nested deeper than {MAX_DEPTH} levels (I-JSON: common clients cannot parse it)")]
    TooDeep,
    #[error("lone UTF-16 surrogate escape `{0}` (I-JSON: common clients cannot parse it)")]
    LoneSurrogate(String),
    #[error("line is {len} bytes, longer than the maximum frame of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("not accepted: {0}")]
    Unavailable(String),
}

/// Deepest nesting of arrays and objects accepted (the envelope object is level 1): well
/// under the 128 at which common parsers (serde_json among them) give up.
pub const MAX_DEPTH: usize = 64;

/// What validation learned about an accepted line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidEvent {
    pub keys: FilterKeys,
    /// The publisher left out `timestamp`: the relay stamps its receive time.
    pub needs_stamp: bool,
}

/// Reusable validation state: simd-json's buffers, a scratch copy of the line (simd-json
/// parses in place) and a tape, so that validating a line allocates only its filter keys.
pub struct Validator {
    scratch: Vec<u8>,
    buffers: Buffers,
    tape: Option<Tape<'static>>,
}

impl Default for Validator {
    fn default() -> Self {
        Self::new()
    }
}

/// Envelope fields, collected in one pass over the object.
#[derive(Default)]
struct Envelope<'t, 'i> {
    etype: Option<Value<'t, 'i>>,
    timestamp: Option<Value<'t, 'i>>,
    agent: Option<Value<'t, 'i>>,
    session_id: Option<Value<'t, 'i>>,
    data: Option<Value<'t, 'i>>,
}

fn set_once<'t, 'i>(
    slot: &mut Option<Value<'t, 'i>>,
    name: &'static str,
    v: Value<'t, 'i>,
) -> Result<(), LineError> {
    if slot.replace(v).is_some() {
        return Err(LineError::DuplicateField(name));
    }
    Ok(())
}

fn kind_matches(kind: FieldKind, v: &Value<'_, '_>) -> bool {
    match kind {
        FieldKind::Str => v.value_type() == ValueType::String,
        FieldKind::Bool => v.value_type() == ValueType::Bool,
        FieldKind::Obj => v.value_type() == ValueType::Object,
        FieldKind::Num => matches!(
            v.value_type(),
            ValueType::I64 | ValueType::U64 | ValueType::F64
        ),
    }
}

impl Validator {
    pub fn new() -> Self {
        Validator {
            scratch: Vec::with_capacity(4096),
            buffers: Buffers::default(),
            tape: Some(Tape::null().reset()),
        }
    }

    /// Validates one line (without its newline; surrounding whitespace allowed).
    pub fn validate(&mut self, line: &[u8]) -> Result<ValidEvent, LineError> {
        // JSON never has raw control characters (other than whitespace) anywhere, and
        // simd-json lets a NUL after a number through (found by the ingest_line fuzzer),
        // so refuse them before parsing: subscribers must only ever get valid JSON.
        if let Some(at) = first_control(line) {
            return Err(LineError::InvalidJson(format!(
                "control character 0x{:02x} at byte {}",
                line[at],
                at + 1
            )));
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(line);
        let mut tape: Tape<'_> = self
            .tape
            .take()
            .expect("validator tape is put back after each line")
            .reset();
        let result = match simd_json::fill_tape(&mut self.scratch, &mut self.buffers, &mut tape) {
            Ok(()) => check_ijson(line, &tape).and_then(|()| check_envelope(tape.as_value())),
            Err(e) => Err(LineError::InvalidJson(json_error(&e))),
        };
        self.tape = Some(tape.reset());
        result
    }
}

/// The parser's complaint in the publisher's terms, with where it was found.
fn json_error(e: &simd_json::Error) -> String {
    use simd_json::ErrorType as E;
    let what = match e.error() {
        E::Eof | E::UnterminatedString => "the line ends inside a value",
        E::TrailingData => "more than one JSON value on the line",
        E::InvalidEscape => "bad escape sequence in a string",
        E::InvalidUnicodeEscape | E::InvalidUnicodeCodepoint => "bad \\u escape in a string",
        E::InvalidUtf8 => "not UTF-8",
        E::InvalidNumber | E::InvalidExponent | E::Overflow => "bad number",
        E::ExpectedObjectColon => "expected `:` after an object key",
        E::ExpectedMapComma | E::ExpectedArrayComma => "expected `,` between values",
        E::ExpectedMapEnd => "expected `}`",
        E::KeyMustBeAString | E::ExpectedObjectKey | E::BadKeyType => "object keys must be strings",
        E::ExpectedNull | E::ExpectedTrue | E::ExpectedFalse | E::ExpectedBoolean => {
            "unknown literal (expected true, false or null)"
        }
        E::InputTooLarge => "the line is too large to parse",
        _ => "unexpected character",
    };
    match e.character() {
        Some(c) if !c.is_control() => format!("{what} (near byte {}, `{c}`)", e.index() + 1),
        _ => format!("{what} (near byte {})", e.index() + 1),
    }
}

/// I-JSON (RFC 7493) as common clients need it: nesting within `MAX_DEPTH`, and no lone
/// UTF-16 surrogate escape (a valid JSON string that decodes to no valid Unicode text).
fn check_ijson(line: &[u8], tape: &Tape<'_>) -> Result<(), LineError> {
    use simd_json::tape::Node;
    // Each level is a node of the tape: a line of fewer nodes (the usual one) cannot nest
    // past the limit, and costs nothing more here.
    if tape.0.len() > MAX_DEPTH {
        // Ends (tape index) of the containers the walk is inside.
        let mut open: Vec<usize> = Vec::with_capacity(MAX_DEPTH + 1);
        for (i, node) in tape.0.iter().enumerate() {
            while open.last().is_some_and(|&end| end <= i) {
                open.pop();
            }
            if let Node::Object { count, .. } | Node::Array { count, .. } = node {
                open.push(i + count + 1);
                if open.len() > MAX_DEPTH {
                    return Err(LineError::TooDeep);
                }
            }
        }
    }
    // Escapes appear only inside strings, and the line is valid JSON: walk them.
    let mut i = 0;
    while let Some(at) = memchr::memchr(b'\\', &line[i..]) {
        i += at;
        if line.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        let unit = |at: usize| -> Option<u16> {
            let hex = std::str::from_utf8(line.get(at + 2..at + 6)?).ok()?;
            u16::from_str_radix(hex, 16).ok()
        };
        let u = unit(i).unwrap_or(0);
        let lone = || LineError::LoneSurrogate(String::from_utf8_lossy(&line[i..i + 6]).into());
        match u {
            0xD800..=0xDBFF => {
                let low = (line.get(i + 6) == Some(&b'\\') && line.get(i + 7) == Some(&b'u'))
                    .then(|| unit(i + 6))
                    .flatten();
                if !matches!(low, Some(0xDC00..=0xDFFF)) {
                    return Err(lone());
                }
                i += 12;
            }
            0xDC00..=0xDFFF => return Err(lone()),
            _ => i += 6,
        }
    }
    Ok(())
}

/// A control character JSON does not allow raw: below 0x20 and not whitespace.
fn is_control(b: u8) -> bool {
    b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n')
}

/// The position of the first `is_control` byte, eight bytes at a time: a byte-by-byte scan
/// was a fifth of the instructions spent per event.
fn first_control(line: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut chunks = line.chunks_exact(8);
    let mut base = 0;
    for c in &mut chunks {
        let x = u64::from_ne_bytes(c.try_into().expect("8 bytes"));
        // Non-zero iff some byte is below 0x20 (bit-twiddling "hasless"); whitespace and
        // exactness are settled by the byte scan.
        if x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0 {
            if let Some(i) = c.iter().position(|&b| is_control(b)) {
                return Some(base + i);
            }
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| is_control(b))
        .map(|i| base + i)
}

fn check_envelope(root: Value<'_, '_>) -> Result<ValidEvent, LineError> {
    let obj = root.as_object().ok_or(LineError::NotAnObject)?;
    let mut env = Envelope::default();
    for (key, v) in obj.iter() {
        match key {
            "type" => set_once(&mut env.etype, "type", v)?,
            "timestamp" => set_once(&mut env.timestamp, "timestamp", v)?,
            "agent" => set_once(&mut env.agent, "agent", v)?,
            "session_id" => set_once(&mut env.session_id, "session_id", v)?,
            "data" => set_once(&mut env.data, "data", v)?,
            "seq" => return Err(LineError::ReservedSeq),
            _ => {}
        }
    }

    let etype_v = env.etype.ok_or(LineError::MissingField("type"))?;
    let name = etype_v
        .as_str()
        .ok_or_else(|| wrong("type", FieldKind::Str))?;
    let etype =
        EventType::from_name(name).ok_or_else(|| LineError::UnknownType(truncated(name)))?;

    let needs_stamp = match env.timestamp {
        None => true,
        Some(ts) => {
            let s = ts
                .as_str()
                .ok_or_else(|| wrong("timestamp", FieldKind::Str))?;
            if !is_rfc3339(s) {
                return Err(LineError::BadTimestamp);
            }
            false
        }
    };

    let agent_v = env.agent.ok_or(LineError::MissingField("agent"))?;
    let agent = if agent_v.is_null() {
        if etype != EventType::HealthAlert {
            return Err(LineError::NullAgent);
        }
        None
    } else {
        Some(CompactString::from(
            agent_v
                .as_str()
                .ok_or_else(|| wrong("agent", FieldKind::Str))?,
        ))
    };

    let session = match env.session_id {
        Some(v) => Some(CompactString::from(
            v.as_str()
                .ok_or_else(|| wrong("session_id", FieldKind::Str))?,
        )),
        None if etype.requires_session() => return Err(LineError::MissingField("session_id")),
        None => None,
    };

    let data_v = env.data.ok_or(LineError::MissingField("data"))?;
    let data = data_v
        .as_object()
        .ok_or_else(|| wrong("data", FieldKind::Obj))?;
    // One pass over `data`: mark each schema field seen (checking its type), and pick up
    // `data.session_id` whatever the type, since the session filter matches it too.
    let schema = etype.data_fields();
    let mut seen = 0u32;
    let mut data_session: Option<CompactString> = None;
    for (key, v) in data.iter() {
        if let Some(i) = schema.iter().position(|(f, _)| *f == key) {
            let (field, kind) = schema[i];
            if !kind_matches(kind, &v) {
                return Err(LineError::WrongType {
                    field: format!("data.{field}"),
                    expected: kind.describe(),
                });
            }
            seen |= 1 << i;
        } else if let Some(kind) = EventType::seed_field_kind(key) {
            // A field the seed names for another type has the seed's type here too:
            // clients read `data.session_id` and the like whatever the event's type.
            if !kind_matches(kind, &v) {
                return Err(LineError::WrongType {
                    field: format!("data.{key}"),
                    expected: kind.describe(),
                });
            }
        }
        if key == "session_id" {
            data_session = v.as_str().map(Into::into);
        }
    }
    if let Some((field, _)) = schema
        .iter()
        .enumerate()
        .find(|(i, _)| seen & (1 << i) == 0)
        .map(|(_, f)| f)
    {
        return Err(LineError::MissingField(data_field_name(field)));
    }
    let data_session = data_session.filter(|d| Some(d) != session.as_ref());

    Ok(ValidEvent {
        keys: FilterKeys {
            etype,
            agent,
            session,
            data_session,
        },
        needs_stamp,
    })
}

fn wrong(field: &str, kind: FieldKind) -> LineError {
    LineError::WrongType {
        field: field.to_string(),
        expected: kind.describe(),
    }
}

/// `MissingField` carries a `&'static str`; every data field name comes from the static
/// schema table, so build the dotted name from that table once.
fn data_field_name(field: &'static str) -> &'static str {
    macro_rules! dotted {
        ($($f:literal),* $(,)?) => {
            match field { $($f => concat!("data.", $f),)* _ => field }
        };
    }
    dotted!(
        "capability",
        "arguments",
        "permission_tier",
        "duration_ms",
        "success",
        "error_type",
        "message",
        "tier",
        "rule",
        "reason",
        "approval_id",
        "decision",
        "decided_by",
        "decided_at",
        "session_id",
        "agent_purpose",
        "duration_seconds",
        "capabilities_invoked",
        "capability_pattern",
        "limit",
        "window",
        "retry_after_seconds",
        "write_id",
        "service",
        "operation",
        "buffer_until",
        "cancellable",
        "component",
        "severity",
        "threshold",
    )
}

/// Echoing a publisher's value back is useful; echoing 10 MB of it is not.
fn truncated(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_scan_agrees_with_a_byte_scan() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..40);
            let line: Vec<u8> = (0..len)
                .map(|_| match rng.u8(0..4) {
                    0 => rng.u8(0..0x21),
                    1 => rng.u8(0x80..=0xFF),
                    _ => rng.u8(0x20..0x7F),
                })
                .collect();
            let naive = line.iter().position(|&b| is_control(b));
            assert_eq!(first_control(&line), naive, "{line:?}");
        }
    }

    pub(crate) const SEED: &str = include_str!("../../tests/data/seed_events.ndjson");

    fn check(line: &str) -> Result<ValidEvent, LineError> {
        Validator::new().validate(line.as_bytes())
    }

    #[test]
    fn every_seed_example_is_valid() {
        let mut v = Validator::new();
        let mut seen = Vec::new();
        for line in SEED.lines() {
            let ev = v
                .validate(line.as_bytes())
                .unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(!ev.needs_stamp);
            seen.push(ev.keys.etype);
        }
        assert_eq!(seen, EventType::ALL.to_vec());
    }

    /// A valid health_alert whose `data` carries `extra` as an extra field.
    fn alert_with(extra: &str) -> String {
        format!(
            r#"{{"type":"health_alert","agent":null,"data":{{"component":"disk","severity":"warning","message":"m","threshold":"80%","x":{extra}}}}}"#
        )
    }

    #[test]
    fn only_i_json_passes_nesting_and_surrogates() {
        // The envelope and `data` are two levels; `x` adds the rest.
        let nested = |levels: usize| "[".repeat(levels) + &"]".repeat(levels);
        assert!(check(&alert_with(&nested(MAX_DEPTH - 2))).is_ok());
        assert_eq!(
            check(&alert_with(&nested(MAX_DEPTH - 1))),
            Err(LineError::TooDeep)
        );
        // Many openers side by side are not deep.
        assert!(check(&alert_with(&format!("[{}]", vec!["{}"; 200].join(",")))).is_ok());
        // Openers inside strings do not count either.
        assert!(check(&alert_with(&format!("\"{}\"", "[{".repeat(100)))).is_ok());

        for ok in [r#""\ud83d\ude00""#, r#""\u00e9\\ud800""#, r#""\\u""#] {
            assert!(check(&alert_with(ok)).is_ok(), "{ok}");
        }
        for (bad, shown) in [(r#""a\ud800""#, r"\ud800"), (r#""\uDBFFx""#, r"\uDBFF")] {
            assert_eq!(
                check(&alert_with(bad)),
                Err(LineError::LoneSurrogate(shown.into())),
                "{bad}"
            );
        }
        // simd-json refuses these itself.
        assert!(check(&alert_with(r#""\udc00\ud800""#)).is_err());
        assert!(check(&alert_with(r#""\ud800\u0041""#)).is_err());
    }

    #[test]
    fn parse_errors_speak_the_publishers_language() {
        for (line, says) in [
            (r#"{"type":"health_alert","agent":nul}"#, "unknown literal"),
            (r#"{"type":"health_alert"#, "invalid JSON"),
            (r#"{"type" "health_alert"}"#, "expected `:`"),
            (r#"{"a":1} {"b":2}"#, "invalid JSON"),
        ] {
            let err = check(line).unwrap_err().to_string();
            assert!(err.contains(says), "{line}: {err}");
            assert!(
                !err.contains("Internal") && !err.contains("Expected"),
                "{err}"
            );
            assert!(err.contains("byte"), "{err}");
        }
    }

    #[test]
    fn keys_are_extracted() {
        let ev = check(r#"{"type":"session_started","timestamp":"2026-03-15T10:00:00.000Z","agent":"a1","data":{"session_id":"s1","agent_purpose":"x"}}"#).unwrap();
        assert_eq!(ev.keys.etype, EventType::SessionStarted);
        assert_eq!(ev.keys.agent.as_deref(), Some("a1"));
        assert_eq!(ev.keys.session, None);
        assert_eq!(ev.keys.data_session.as_deref(), Some("s1"));

        let ev = check(r#"{"type":"health_alert","agent":null,"data":{"component":"disk","severity":"warning","message":"m","threshold":"80%"}}"#).unwrap();
        assert_eq!(ev.keys.agent, None);
        assert!(ev.needs_stamp);
    }

    #[test]
    fn rejections_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("{", "invalid JSON"),
            ("[1,2]", "must be a JSON object"),
            (r#"{"agent":"a","data":{}}"#, "missing field `type`"),
            (
                r#"{"type":7,"agent":"a","data":{}}"#,
                "field `type` must be a string",
            ),
            (
                r#"{"type":"nope","agent":"a","data":{}}"#,
                "unknown event type `nope`; expected one of: capability_invoked,",
            ),
            (
                r#"{"type":"health_alert","timestamp":"yesterday","agent":null,"data":{}}"#,
                "RFC 3339",
            ),
            (
                r#"{"type":"session_started","agent":null,"data":{"session_id":"s","agent_purpose":"p"}}"#,
                "`agent` may be null only for health_alert",
            ),
            (
                r#"{"type":"session_started","data":{"session_id":"s","agent_purpose":"p"}}"#,
                "missing field `agent`",
            ),
            (
                r#"{"type":"capability_result","agent":"a","data":{"capability":"c","success":true,"duration_ms":1}}"#,
                "missing field `session_id`",
            ),
            (
                r#"{"type":"capability_result","agent":"a","session_id":"s","data":{"capability":"c","success":"yes","duration_ms":1}}"#,
                "field `data.success` must be a boolean",
            ),
            (
                r#"{"type":"capability_result","agent":"a","session_id":"s","data":{"capability":"c","success":true}}"#,
                "missing field `data.duration_ms`",
            ),
            (
                r#"{"type":"capability_result","agent":"a","session_id":"s","data":[]}"#,
                "field `data` must be an object",
            ),
            (
                r#"{"type":"session_started","agent":"a","session_id":5,"data":{"session_id":"s","agent_purpose":"p"}}"#,
                "field `session_id` must be a string",
            ),
            (
                r#"{"type":"session_started","type":"session_ended","agent":"a","data":{}}"#,
                "duplicate field `type`",
            ),
            (
                r#"{"type":"health_alert","agent":null,"seq":4,"data":{}}"#,
                "`seq` is assigned by the relay",
            ),
            // A field the seed names for another type keeps the seed's type everywhere:
            // an object where clients expect a session id froze the dashboard.
            (
                r#"{"type":"rate_limit_hit","agent":"poison-agent","data":{"capability_pattern":"x","limit":1,"window":"1s","retry_after_seconds":1,"session_id":{"toString":1}}}"#,
                "field `data.session_id` must be a string",
            ),
            (
                r#"{"type":"health_alert","agent":null,"data":{"component":"c","severity":"s","message":"m","threshold":"t","duration_ms":"soon"}}"#,
                "field `data.duration_ms` must be a number",
            ),
        ];
        for (line, want) in cases {
            let err = check(line).expect_err(line).to_string();
            assert!(err.contains(want), "{line}\n  got:  {err}\n  want: {want}");
        }
    }

    #[test]
    fn control_characters_are_refused_wherever_they_are() {
        // A NUL after a number: simd-json alone accepts this (fuzzer finding).
        let nul = b"{\"type\":\"health_alert\",\"agent\":null,\"data\":{\"component\":\"c\",\"severity\":\"s\",\"message\":\"m\",\"threshold\":\"t\",\"n\":12\0\0}}";
        let err = Validator::new().validate(nul).unwrap_err().to_string();
        assert!(err.contains("control character 0x00"), "{err}");
        let raw_tab_in_string = b"{\"type\":\"health_alert\",\"agent\":null,\"data\":{\"component\":\"c\x01\",\"severity\":\"s\",\"message\":\"m\",\"threshold\":\"t\"}}";
        assert!(Validator::new().validate(raw_tab_in_string).is_err());
        let whitespace = b"{\"type\":\"health_alert\",\t\"agent\":null,\r\"data\":{\"component\":\"c\",\"severity\":\"s\",\"message\":\"m\",\"threshold\":\"t\"}}";
        assert!(Validator::new().validate(whitespace).is_ok());
    }

    #[test]
    fn extra_fields_and_float_numbers_pass() {
        let ev = check(
            r#"{"type":"capability_result","agent":"a","session_id":"s","trace":{"x":[1,2]},"data":{"capability":"c","success":false,"duration_ms":1.5,"extra":null}}"#,
        );
        assert!(ev.is_ok(), "{ev:?}");
    }

    #[test]
    fn validator_is_reusable_after_errors() {
        let mut v = Validator::new();
        let good = SEED.lines().next().unwrap();
        assert!(v.validate(b"{oops").is_err());
        assert!(v.validate(good.as_bytes()).is_ok());
        assert!(v.validate(b"").is_err());
        assert!(v.validate(good.as_bytes()).is_ok());
    }

    #[test]
    fn long_unknown_type_is_truncated_in_error() {
        let name = "x".repeat(10_000);
        let err = check(&format!(r#"{{"type":"{name}","agent":"a","data":{{}}}}"#))
            .unwrap_err()
            .to_string();
        assert!(err.len() < 400, "{}", err.len());
    }
}
