//! Client-to-server WebSocket frames, parsed from bytes the connection task already read.
//!
//! fastwebsockets does the upgrade; after it we own the raw socket and parse client frames
//! here, because fastwebsockets' reader keeps an 8 KiB buffer per connection forever and our
//! idle connections must cost almost nothing. The connection keeps only the bytes of an
//! incomplete frame (none at all while idle). Client frames must be masked (RFC 6455 §5.1);
//! reserved bits must be zero (we negotiate no extension, so `permessage-deflate` is never on).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

#[derive(Debug)]
pub struct ClientFrame {
    pub fin: bool,
    pub opcode: Opcode,
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame larger than the limit")]
    TooBig,
    #[error("protocol error: {0}")]
    Protocol(&'static str),
}

/// Parses one frame from the front of `buf`. Ok(None) means "need more bytes"; on success
/// returns the frame and how many bytes it used. `max` bounds a single frame's payload.
pub fn parse(buf: &[u8], max: usize) -> Result<Option<(ClientFrame, usize)>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(WireError::Protocol("reserved bits set"));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = match b0 & 0x0f {
        0x0 => Opcode::Continuation,
        0x1 => Opcode::Text,
        0x2 => Opcode::Binary,
        0x8 => Opcode::Close,
        0x9 => Opcode::Ping,
        0xA => Opcode::Pong,
        _ => return Err(WireError::Protocol("unknown opcode")),
    };
    if b1 & 0x80 == 0 {
        return Err(WireError::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        n => (n as u64, 2),
    };
    let control = matches!(opcode, Opcode::Close | Opcode::Ping | Opcode::Pong);
    if control && (!fin || len > 125) {
        return Err(WireError::Protocol("bad control frame"));
    }
    if len > max as u64 {
        return Err(WireError::TooBig);
    }
    let len = len as usize;
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    at += 4;
    let mut payload = buf[at..at + len].to_vec();
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
    Ok(Some((
        ClientFrame {
            fin,
            opcode,
            payload,
        },
        at + len,
    )))
}

/// The header of the frame at the front of `buf`, once its length field is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peek {
    /// The raw opcode (low 4 bits of the first byte).
    pub opcode: u8,
    /// The declared payload length.
    pub len: u64,
    /// Header (with the client's 4-byte mask) plus payload: what the whole frame occupies.
    pub total: u64,
}

/// Opcode of a continuation frame, for [`Peek::opcode`].
pub const OP_CONTINUATION: u8 = 0x0;
/// Opcode of a text frame, for [`Peek::opcode`].
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a binary frame, for [`Peek::opcode`].
pub const OP_BINARY: u8 = 0x2;

/// Longest frame header a client sends: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_HEADER: usize = 14;

/// Reads the header of the frame starting at `buf` without parsing it, so the reader can
/// refuse an oversized frame (or one that would make the message oversized) before
/// buffering it, and size its buffer for exactly this frame.
pub fn peek(buf: &[u8]) -> Option<Peek> {
    let (&b0, rest) = buf.split_first()?;
    let (&b1, rest) = rest.split_first()?;
    let (len, header) = match b1 & 0x7f {
        126 => {
            let n = rest.get(..2)?;
            (u16::from_be_bytes([n[0], n[1]]) as u64, 4)
        }
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(rest.get(..8)?);
            (u64::from_be_bytes(n), 10)
        }
        n => (n as u64, 2),
    };
    Some(Peek {
        opcode: b0 & 0x0f,
        len,
        total: len.saturating_add(header + 4),
    })
}

/// What a client's Close frame asks for (RFC 6455 §5.5.1, §7.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRequest {
    /// No body: answered with an empty close.
    Empty,
    /// A valid code with a UTF-8 reason (or none): answered with the same code.
    Code(u16),
    /// An invalid Close frame: the connection fails with this code and reason (1002 for a
    /// 1-byte body or a code that may not be sent, 1007 for a reason that is not UTF-8).
    Invalid(u16, &'static str),
}

/// Checks a client's Close body. Never echo what fails here: an invalid code sent back
/// would make the gateway itself violate §7.4.
pub fn close_request(payload: &[u8]) -> CloseRequest {
    let (code, reason) = match payload {
        [] => return CloseRequest::Empty,
        [_] => return CloseRequest::Invalid(1002, "close frame with a 1-byte body"),
        [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), reason),
    };
    if !crate::ws::frame::valid_close_code(code) {
        return CloseRequest::Invalid(1002, "invalid close code");
    }
    if std::str::from_utf8(reason).is_err() {
        return CloseRequest::Invalid(1007, "close reason is not UTF-8");
    }
    CloseRequest::Code(code)
}

/// A masked client frame, for unit tests here and in the connection's reader.
#[cfg(test)]
pub fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masked_text_of_every_length_encoding() {
        for n in [0usize, 5, 125, 126, 300, 70_000] {
            let payload = vec![b'x'; n];
            let bytes = masked(0x1, true, &payload);
            let (f, used) = parse(&bytes, 1 << 20).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(f.opcode, Opcode::Text);
            assert_eq!(f.payload, payload);
            // Any prefix is "need more".
            assert!(parse(&bytes[..bytes.len() - 1], 1 << 20).unwrap().is_none());
        }
    }

    #[test]
    fn refuses_what_the_protocol_forbids() {
        let mut unmasked = masked(0x1, true, b"hi");
        unmasked[1] &= 0x7f;
        assert!(matches!(parse(&unmasked, 100), Err(WireError::Protocol(_))));
        let mut rsv = masked(0x1, true, b"hi");
        rsv[0] |= 0x40;
        assert!(matches!(parse(&rsv, 100), Err(WireError::Protocol(_))));
        assert!(matches!(
            parse(&masked(0x9, false, b""), 100),
            Err(WireError::Protocol(_))
        ));
        assert_eq!(
            parse(&masked(0x1, true, &[b'a'; 200]), 100).unwrap_err(),
            WireError::TooBig
        );
        assert!(matches!(
            parse(&masked(0x3, true, b""), 100),
            Err(WireError::Protocol(_))
        ));
    }

    #[test]
    fn two_frames_in_one_read() {
        let mut bytes = masked(0x1, false, b"he");
        bytes.extend(masked(0x0, true, b"llo"));
        let (a, used) = parse(&bytes, 100).unwrap().unwrap();
        let (b, _) = parse(&bytes[used..], 100).unwrap().unwrap();
        assert!(!a.fin && b.fin);
        assert_eq!([a.payload, b.payload].concat(), b"hello");
    }

    #[test]
    fn peek_reads_every_length_encoding() {
        for (n, header) in [(5usize, 2u64), (300, 4), (70_000, 10)] {
            let bytes = masked(0x0, false, &vec![b'x'; n]);
            let p = peek(&bytes[..header as usize]).unwrap();
            assert_eq!(p.opcode, OP_CONTINUATION);
            assert_eq!(p.len, n as u64);
            assert_eq!(p.total, bytes.len() as u64);
            assert!(peek(&bytes[..header as usize - 1]).is_none());
        }
        // A hostile length does not overflow.
        let mut huge = vec![0x81, 0xff];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(peek(&huge).unwrap().total, u64::MAX);
    }

    #[test]
    fn close_bodies_are_checked_before_answering() {
        assert_eq!(close_request(b""), CloseRequest::Empty);
        assert!(matches!(
            close_request(&[3]),
            CloseRequest::Invalid(1002, _)
        ));
        assert_eq!(
            close_request(&1000u16.to_be_bytes()),
            CloseRequest::Code(1000)
        );
        let mut with_reason = 4999u16.to_be_bytes().to_vec();
        with_reason.extend_from_slice("bye ✓".as_bytes());
        assert_eq!(close_request(&with_reason), CloseRequest::Code(4999));
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(
                matches!(
                    close_request(&bad.to_be_bytes()),
                    CloseRequest::Invalid(1002, _)
                ),
                "{bad}"
            );
        }
        let mut not_utf8 = 1000u16.to_be_bytes().to_vec();
        not_utf8.extend_from_slice(&[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xf4, 0x90, 0x80, 0x80]);
        assert!(matches!(
            close_request(&not_utf8),
            CloseRequest::Invalid(1007, _)
        ));
    }
}
