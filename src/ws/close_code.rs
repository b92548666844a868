//! The close codes the gateway sends (docs/protocol.md §5), by name: no other module writes
//! a close code as a number. Every one is a code RFC 6455 §7.4 lets a server send (checked
//! by the test below against [`super::frame::valid_close_code`]).

/// The client asked to close, or the gateway ends the connection normally.
pub const NORMAL: u16 = 1000;
pub const GOING_AWAY: u16 = 1001;
/// A frame broke RFC 6455 (unmasked, reserved bits, bad control frame, …).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A binary message: the protocol is JSON text.
pub const UNSUPPORTED: u16 = 1003;
/// A text message that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
pub const POLICY: u16 = 1008;
/// A message over `ws.max_message_bytes`.
pub const TOO_BIG: u16 = 1009;
/// The gateway could not greet the connection (broker unavailable): reconnect.
pub const INTERNAL: u16 = 1011;
/// This instance is restarting (drain): reconnect and resume.
pub const RESTART: u16 = 1012;
/// The credential could not be checked right now (session store unreachable): not a
/// denial; clients retry with backoff (issue 10 item 4).
pub const TRY_AGAIN_LATER: u16 = 1013;
pub const UNAUTHENTICATED: u16 = 4001;
pub const FORBIDDEN: u16 = 4003;
pub const EXPIRED: u16 = 4004;
pub const RATE_LIMITED: u16 = 4029;
/// The connection's outbound queue overflowed: resume from history.
pub const SLOW_CONSUMER: u16 = 4500;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every close code the gateway uses is one RFC 6455 §7.4 lets it send.
    #[test]
    fn every_close_code_we_use_may_be_sent() {
        for c in [
            NORMAL,
            GOING_AWAY,
            PROTOCOL_ERROR,
            UNSUPPORTED,
            INVALID_PAYLOAD,
            POLICY,
            TOO_BIG,
            INTERNAL,
            RESTART,
            TRY_AGAIN_LATER,
            UNAUTHENTICATED,
            FORBIDDEN,
            EXPIRED,
            RATE_LIMITED,
            SLOW_CONSUMER,
        ] {
            assert!(super::super::frame::valid_close_code(c), "{c}");
        }
    }
}
