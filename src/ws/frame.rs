//! WebSocket frame encoding for the server side.
//!
//! Server frames are never masked, so the bytes of one frame are identical for every
//! recipient: an event is framed once here and the same [`Bytes`] is shared by every
//! outbound queue (DESIGN "Encode once, write many"). Client frames are parsed in
//! [`crate::ws::wire`]; writing is a plain byte copy of these prebuilt frames.

use bytes::{BufMut, Bytes, BytesMut};

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

fn header_len(payload: usize) -> usize {
    match payload {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

fn put_header(buf: &mut BytesMut, opcode: u8, len: usize) {
    buf.put_u8(0x80 | opcode);
    match len {
        0..=125 => buf.put_u8(len as u8),
        126..=65535 => {
            buf.put_u8(126);
            buf.put_u16(len as u16);
        }
        _ => {
            buf.put_u8(127);
            buf.put_u64(len as u64);
        }
    }
}

fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut buf, opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// A complete text frame carrying `payload` (which must be UTF-8; callers pass JSON).
pub fn text(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, payload)
}

/// The payload of a complete unmasked server frame built here (its header skipped).
pub fn payload(frame: &[u8]) -> &[u8] {
    let skip = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(skip..).unwrap_or(&[])
}

/// Whether `code` may appear in a Close frame on the wire (RFC 6455 §7.4): the codes the
/// RFC and the IANA registry define for endpoints to send (1000-1003, 1007-1014), and the
/// ranges for libraries and applications (3000-4999). 1004-1006 and 1015 are reserved
/// (never sent), the rest of 0-2999 is unassigned, and 5000 and up does not exist.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A close frame with a status code and a short reason (truncated to fit 125 bytes). The
/// gateway only ever sends valid codes: an invalid one (a bug) goes out as 1011.
pub fn close(code: u16, reason: &str) -> Bytes {
    debug_assert!(valid_close_code(code), "close code {code} is not sendable");
    let code = if valid_close_code(code) { code } else { 1011 };
    let mut reason = reason;
    while reason.len() > 123 {
        let mut cut = 123;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason = &reason[..cut];
    }
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason.as_bytes());
    frame(OP_CLOSE, &payload)
}

/// A close frame without a body: the answer to a client's empty close (RFC 6455 §5.5.1).
pub fn close_empty() -> Bytes {
    frame(OP_CLOSE, &[])
}

pub fn ping(payload: &[u8]) -> Bytes {
    frame(OP_PING, &payload[..payload.len().min(125)])
}

pub fn pong(payload: &[u8]) -> Bytes {
    frame(OP_PONG, &payload[..payload.len().min(125)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_use_the_right_encoding() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let medium = text(&vec![b'a'; 300]);
        assert_eq!(&medium[..4], &[0x81, 126, 1, 44]);
        let large = text(&vec![b'a'; 70_000]);
        assert_eq!(large[1], 127);
        assert_eq!(large.len(), 10 + 70_000);
    }

    #[test]
    fn close_carries_code_and_truncated_reason() {
        let f = close(4500, &"x".repeat(300));
        assert_eq!(f[0], 0x88);
        assert_eq!(f[1] as usize, 125);
        assert_eq!(u16::from_be_bytes([f[2], f[3]]), 4500);
    }

    #[test]
    fn close_codes_follow_rfc_6455_section_7_4() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(valid_close_code(ok), "{ok}");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!valid_close_code(bad), "{bad}");
        }
    }
}
