//! The `switchboard` commands other than `serve`: `check-config`, `token`, `publish`.
//!
//! `publish` talks to a running gateway's HTTP API (so its events go through the same
//! validation and the same seq-assigning Lua script as every other publisher), with a
//! service token minted from the configured secret. Its HTTP client is deliberately tiny:
//! plain HTTP/1.1 with `Connection: close`, enough for a CLI on a trusted network.

use std::io::BufRead;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no JWT secret configured: set SWITCHBOARD_JWT_SECRET or auth.jwt_secret")]
    NoSecret,
    #[error("{0}")]
    Token(String),
    #[error("invalid URL {0:?}: only http://host:port[/] is supported")]
    Url(String),
    #[error("cannot reach {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("invalid event on line {line}: {message}")]
    Event { line: usize, message: String },
    #[error("the gateway answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("could not read input: {0}")]
    Input(std::io::Error),
    #[error("unreadable answer from the gateway")]
    BadResponse,
}

/// Mints a token with the configured HS256 secret.
pub fn token(
    config: &Config,
    sub: &str,
    projects: &[String],
    ttl_secs: u64,
    service: bool,
) -> Result<String, CliError> {
    let secret = config.auth.jwt_secret.as_ref().ok_or(CliError::NoSecret)?;
    switchboard_middleware::mint_hs256(secret.as_bytes(), sub, projects, ttl_secs, service)
        .map_err(|e| CliError::Token(e.to_string()))
}

/// Events from `--event` or from stdin, one JSON object per non-empty line.
pub fn read_events(event: Option<&str>, input: impl BufRead) -> Result<Vec<Value>, CliError> {
    let lines: Vec<String> = match event {
        Some(e) => vec![e.to_owned()],
        None => input
            .lines()
            .collect::<Result<_, _>>()
            .map_err(CliError::Input)?,
    };
    let mut events = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| CliError::Event {
            line: i + 1,
            message: e.to_string(),
        })?;
        if !value.is_object() {
            return Err(CliError::Event {
                line: i + 1,
                message: "not a JSON object".into(),
            });
        }
        events.push(value);
    }
    Ok(events)
}

/// Posts events to `{url}/v1/projects/{project}/events` in batches; returns every seq.
pub async fn publish(
    url: &str,
    project: &str,
    token: &str,
    events: Vec<Value>,
) -> Result<Vec<u64>, CliError> {
    let mut seqs = Vec::with_capacity(events.len());
    for chunk in events.chunks(500) {
        let body = serde_json::to_vec(chunk).unwrap_or_default();
        let (status, answer) =
            post(url, &format!("/v1/projects/{project}/events"), token, &body).await?;
        if status != 202 {
            return Err(CliError::Refused {
                status,
                body: answer,
            });
        }
        let v: Value = serde_json::from_str(&answer).map_err(|_| CliError::BadResponse)?;
        let list = v["seq"].as_array().ok_or(CliError::BadResponse)?;
        seqs.extend(list.iter().filter_map(Value::as_u64));
    }
    Ok(seqs)
}

async fn post(url: &str, path: &str, token: &str, body: &[u8]) -> Result<(u16, String), CliError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| CliError::Url(url.into()))?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(CliError::Url(url.into()));
    }
    let connect = tokio::net::TcpStream::connect(authority);
    let mut stream = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| CliError::Connect {
            url: url.into(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| CliError::Connect {
            url: url.into(),
            source,
        })?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let io = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .map_err(|_| CliError::BadResponse)?
        .map_err(|source| CliError::Connect {
            url: url.into(),
            source,
        })?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(CliError::BadResponse)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(CliError::BadResponse)?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_per_line() {
        let input = "{\"type\":\"a\"}\n\n{\"type\":\"b\"}\n";
        let evs = read_events(None, input.as_bytes()).unwrap();
        assert_eq!(evs.len(), 2);
        assert!(read_events(None, "[1]\n".as_bytes()).is_err());
        assert!(
            read_events(Some("{\"type\":\"x\"}"), "ignored".as_bytes())
                .unwrap()
                .len()
                == 1
        );
    }
}
