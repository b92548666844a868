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

/// How many bytes the frame starting at `buf` needs in total, when its header is complete.
/// Lets the reader refuse an oversized frame before buffering it.
pub fn declared_len(buf: &[u8]) -> Option<u64> {
    if buf.len() < 2 {
        return None;
    }
    match buf[1] & 0x7f {
        126 if buf.len() >= 4 => Some(u16::from_be_bytes([buf[2], buf[3]]) as u64),
        127 if buf.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&buf[2..10]);
            Some(u64::from_be_bytes(n))
        }
        126 | 127 => None,
        n => Some(n as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
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
}
