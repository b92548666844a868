//! The glue around fastwebsockets' upgrade: what it does not check, what it would buffer,
//! and the one connection the outbox never writes to.
//!
//! fastwebsockets checks the request's upgrade headers and builds the 101; we take hyper's
//! upgrade handle ourselves, because its own upgrade future would wrap the socket in a
//! reader with an 8 KiB buffer that every idle connection would carry. After the 101 the
//! raw `TcpStream` is taken back ([`into_tcp`]) with only the bytes the client already sent.

use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// RFC 6455 §4.2.1: exactly one `Sec-WebSocket-Key`, the base64 encoding of 16 bytes:
/// 22 base64 characters and `==` (the unused low bits of the last character are not
/// checked). fastwebsockets only checks that the header is there (an empty one passed),
/// and two of them (found by the red-team pass) leave which one was answered to whichever
/// the client library picks.
pub fn valid_key(headers: &http::HeaderMap) -> bool {
    let mut keys = headers.get_all(http::header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return false;
    };
    match key.as_bytes() {
        [chars @ .., b'=', b'='] if chars.len() == 22 => chars
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/'),
        _ => false,
    }
}

/// Why an upgraded connection could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade did not complete: {0}")]
    Incomplete(#[from] hyper::Error),
    #[error("upgraded connection is not a TCP stream")]
    NotTcp,
}

/// Waits for the 101 to be out and takes the raw socket back from hyper, with a copy of
/// what the client already sent (`read_buf` may be a slice of hyper's whole read buffer:
/// copying lets that buffer go now).
pub async fn into_tcp(
    upgrade: hyper::upgrade::OnUpgrade,
) -> Result<(TcpStream, Vec<u8>), UpgradeError> {
    let upgraded = upgrade.await?;
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| UpgradeError::NotTcp)?;
    Ok((parts.io.into_inner(), parts.read_buf.to_vec()))
}

/// Completes an upgrade only to say why the connection cannot stay: writes `notice` (a
/// text frame) and `close`, gives the client a moment to read them, and ends. The only
/// writer of a connection that never became a session; bounded to 5 s in all.
pub async fn refuse(upgrade: hyper::upgrade::OnUpgrade, notice: Bytes, close: Bytes) {
    let Ok(upgraded) = upgrade.await else { return };
    let mut io = TokioIo::new(upgraded);
    let write = async {
        io.write_all(&notice).await?;
        io.write_all(&close).await?;
        io.flush().await?;
        // Give the client a moment to read before the socket goes away.
        let mut sink = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(2), io.read(&mut sink)).await;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_must_be_one_base64_encoding_of_16_bytes() {
        let with = |keys: &[&str]| {
            let mut h = http::HeaderMap::new();
            for k in keys {
                h.append(
                    http::header::SEC_WEBSOCKET_KEY,
                    http::HeaderValue::from_str(k).unwrap(),
                );
            }
            valid_key(&h)
        };
        assert!(with(&["dGhlIHNhbXBsZSBub25jZQ=="]));
        assert!(!with(&[]));
        assert!(!with(&[""]));
        assert!(!with(&["dGhlIHNhbXBsZSBub25jZQ"]));
        assert!(!with(&["dGhlIHNhbXBsZSBub25jZ!=="]));
        assert!(!with(&[
            "dGhlIHNhbXBsZSBub25jZQ==",
            "dGhlIHNhbXBsZSBub25jZQ=="
        ]));
    }
}
