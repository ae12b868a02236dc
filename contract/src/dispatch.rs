//! Dispatch acknowledgements: a router names itself (its dispatcher id) when it subscribes to an
//! agent's capacity stream, and stamps each request it sends with `x-kvroute-dispatch:
//! <id>:<seq>`. The agent acknowledges that dispatch on the subscriber's stream once its
//! capacity counters include the request (or it refused the request), so a router retires the
//! blocks it reserved for exactly its own requests, whatever other routers and clients send.

use std::fmt;

/// The response header an agent sets on a request it refused, before any byte, because it is
/// draining: a gateway sends the request to another agent.
pub const DRAINING_HEADER: &str = "x-kvroute-draining";

/// The request header carrying a dispatch: `<dispatcher id>:<sequence number>`.
pub const DISPATCH_HEADER: &str = "x-kvroute-dispatch";

/// Longest dispatcher id, in bytes.
pub const MAX_DISPATCHER_LEN: usize = 128;

/// A malformed dispatcher id or dispatch header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchError(pub String);

impl fmt::Display for DispatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DispatchError {}

/// Checks a dispatcher id: 1 to 128 characters of `A-Z a-z 0-9 . _ -`.
pub fn check_dispatcher(id: &str) -> Result<(), DispatchError> {
    if id.is_empty() || id.len() > MAX_DISPATCHER_LEN {
        return Err(DispatchError(format!(
            "a dispatcher id has 1 to {MAX_DISPATCHER_LEN} characters, not {}",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(DispatchError(format!(
            "a dispatcher id is made of A-Z a-z 0-9 . _ - only, not {c:?}"
        )));
    }
    Ok(())
}

/// Parses a `x-kvroute-dispatch` value into (dispatcher id, sequence number).
pub fn parse_dispatch(value: &str) -> Result<(&str, u64), DispatchError> {
    let bad = || {
        DispatchError(format!(
            "the {DISPATCH_HEADER} header is <dispatcher id>:<sequence number>, not {:?}",
            value.chars().take(64).collect::<String>()
        ))
    };
    let (id, seq) = value.trim().rsplit_once(':').ok_or_else(bad)?;
    check_dispatcher(id).map_err(|e| DispatchError(format!("{DISPATCH_HEADER}: {e}")))?;
    let seq = seq.parse::<u64>().map_err(|_| bad())?;
    Ok((id, seq))
}

/// Writes a `x-kvroute-dispatch` value.
pub fn format_dispatch(id: &str, seq: u64) -> String {
    format!("{id}:{seq}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dispatch_round_trips() {
        let v = format_dispatch("gw-7f3a.b_c", 42);
        assert_eq!(parse_dispatch(&v), Ok(("gw-7f3a.b_c", 42)));
        assert_eq!(parse_dispatch(" pod-1:0 "), Ok(("pod-1", 0)));
        assert_eq!(
            parse_dispatch(&format!("a:{}", u64::MAX)),
            Ok(("a", u64::MAX))
        );
    }

    #[test]
    fn malformed_dispatches_are_refused() {
        for v in [
            "",
            ":",
            "gw",
            "gw:",
            ":5",
            "gw:-1",
            "gw:1.5",
            "gw:18446744073709551616",
            "g w:1",
            "gw/1:2",
            "gw:1:x",
            "\u{e9}:1",
        ] {
            assert!(parse_dispatch(v).is_err(), "{v:?} accepted");
        }
        let long = format!("{}:1", "a".repeat(MAX_DISPATCHER_LEN + 1));
        assert!(parse_dispatch(&long).is_err());
        let longest = format!("{}:1", "a".repeat(MAX_DISPATCHER_LEN));
        assert!(parse_dispatch(&longest).is_ok());
    }

    #[test]
    fn dispatcher_ids() {
        assert!(check_dispatcher("kvroute-gateway-0").is_ok());
        assert!(check_dispatcher("").is_err());
        assert!(check_dispatcher("a:b").is_err());
        assert!(check_dispatcher("a\nb").is_err());
    }
}
