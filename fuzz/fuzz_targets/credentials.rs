//! Fuzz target `credentials`: credential extraction from a request, and JWT verification.
//!
//! The input is a request in a readable text form, so seeds are easy to write and mutate:
//! the first line is the request target (`/ws/p?token=...`), every further line a header
//! (`name: value`); lines that are no valid URI or header are dropped. The request goes
//! through the real `Authenticator` (HS256 secret and an RSA public key configured, an
//! in-memory session store), and every line, as well as the whole input, is also handed to
//! `JwtVerifier::verify` as a token. Nothing may panic, and:
//! - an accepted token is signed with the key of its algorithm: re-signing its header and
//!   claims with that key (HS256 secret, RSA private key; both deterministic) gives exactly
//!   its signature; it is not expired and names a subject. So `alg: none`, another key, an
//!   HS256 token keyed with the RSA public key (algorithm confusion) or a tampered token
//!   can never pass;
//! - a request is authenticated from the source docs/protocol.md §2 puts first (`Authorization:
//!   Bearer`, `?token=`, cookie `session=`, `?session=`): a JWT only when a Bearer header or
//!   a `token` parameter is present, a session only when neither is; with no source at all
//!   (a token in `Sec-WebSocket-Protocol` is not one) the outcome is "missing";
//! - a session is accepted only for a stored, unexpired id present in the request.
//!
//! Seeds (fuzz/corpus/credentials) carry tokens minted for this target's secret with
//! `switchboard token` (100-year TTL), an RS256 token signed with the fixture key, and the
//! forgeries above.

#![no_main]

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::{HeaderName, HeaderValue, AUTHORIZATION, COOKIE};
use http::{HeaderMap, Uri};
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use percent_encoding::percent_decode_str;
use serde_json::Value;
use switchboard_middleware::{
    Authentication, Authenticator, CredentialKind, JwtConfig, JwtVerifier, MemorySessionStore,
    SessionRecord,
};

/// The HS256 secret the seed tokens were minted with.
const SECRET: &[u8] = b"switchboard-fuzz-secret-0123456789";
const RSA_PRIVATE: &[u8] = include_bytes!("../../middleware/tests/fixtures/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../middleware/tests/fixtures/rsa_public.pem");

/// (session id, user, projects, expired)
const SESSIONS: [(&str, &str, &[&str], bool); 3] = [
    ("sid-alice", "alice", &["p"], false),
    ("sid-svc", "svc", &["*"], false),
    ("sid-old", "old-user", &["p"], true),
];

struct Fixture {
    runtime: tokio::runtime::Runtime,
    auth: Authenticator,
    hs_key: EncodingKey,
    rs_key: EncodingKey,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let verifier = JwtVerifier::new(JwtConfig {
            hs256_secret: Some(SECRET.to_vec()),
            public_key_pem: Some(RSA_PUBLIC.to_vec()),
            ..JwtConfig::default()
        })
        .expect("fuzz verifier config");
        let store = MemorySessionStore::new();
        let now = jsonwebtoken::get_current_timestamp();
        for (id, user, projects, expired) in SESSIONS {
            store.insert(
                id,
                SessionRecord {
                    user_id: user.into(),
                    projects: projects.iter().map(|p| p.to_string()).collect(),
                    expires_at: Some(if expired { now - 60 } else { now + 3600 }),
                },
            );
        }
        Fixture {
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
            auth: Authenticator::new(Some(verifier), Some(Arc::new(store))),
            hs_key: EncodingKey::from_secret(SECRET),
            rs_key: EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("fixture RSA key"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let text = String::from_utf8_lossy(data);
    for candidate in text.lines().chain([text.as_ref()]) {
        let before = jsonwebtoken::get_current_timestamp();
        if let Ok(claims) = verifier(fx).verify(candidate) {
            assert!(signed_by_our_keys(fx, candidate), "accepted a forged token");
            assert_eq!(subject(candidate).as_deref(), Some(claims.sub.as_str()));
            assert_eq!(claims.kind, CredentialKind::Jwt);
            assert!(
                claims.exp.is_some_and(|exp| exp >= before),
                "accepted expired"
            );
        }
    }

    let (uri, headers) = request(data);
    let outcome = fx.runtime.block_on(fx.auth.authenticate(&headers, &uri));
    let source = first_source(&headers, &uri);
    match &outcome {
        Authentication::Authenticated(claims) => match claims.kind {
            CredentialKind::Jwt => {
                assert!(
                    matches!(source, Some(Source::Bearer | Source::QueryToken)),
                    "JWT accepted from {source:?}"
                );
                let found = token_candidates(&headers, &uri).into_iter().any(|t| {
                    signed_by_our_keys(fx, &t) && subject(&t).as_deref() == Some(&claims.sub)
                });
                assert!(found, "accepted a JWT that no token of the request signs");
            }
            CredentialKind::Session => {
                assert!(
                    matches!(source, Some(Source::Cookie | Source::QuerySession)),
                    "session accepted from {source:?}"
                );
                let seen = request_text(&headers, &uri);
                let known = SESSIONS.iter().any(|(id, user, _, expired)| {
                    !expired && *user == claims.sub && seen.contains(id)
                });
                assert!(known, "accepted session of {:?}", claims.sub);
            }
        },
        Authentication::Missing => assert_eq!(source, None, "missing, yet {source:?}"),
        Authentication::Invalid(e) => assert!(!e.code().is_empty()),
    }
    if source.is_none() && !unreadable_authorization(&headers) {
        assert!(matches!(outcome, Authentication::Missing), "{outcome:?}");
    }
});

fn verifier(fx: &Fixture) -> &JwtVerifier {
    fx.auth.jwt().expect("configured")
}

/// The request: first line the target, then `name: value` headers.
fn request(data: &[u8]) -> (Uri, HeaderMap) {
    let mut lines = data.split(|b| *b == b'\n');
    let uri = lines
        .next()
        .and_then(|l| Uri::try_from(l.strip_suffix(b"\r").unwrap_or(l)).ok())
        .unwrap_or_else(|| Uri::from_static("/ws/p"));
    let mut headers = HeaderMap::new();
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    (uri, headers)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Bearer,
    QueryToken,
    Cookie,
    QuerySession,
}

fn query_keys(uri: &Uri) -> Vec<String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .map(|pair| pair.split_once('=').map_or(pair, |(k, _)| k))
        .map(|k| percent_decode_str(k).decode_utf8_lossy().into_owned())
        .collect()
}

/// Which credential source docs/protocol.md §2 says wins, from what is present (not parsed).
fn first_source(headers: &HeaderMap, uri: &Uri) -> Option<Source> {
    let bearer = headers.get_all(AUTHORIZATION).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            let v = v.trim();
            v.split_once(' ')
                .map_or(v, |(scheme, _)| scheme)
                .eq_ignore_ascii_case("bearer")
        })
    });
    let keys = query_keys(uri);
    let cookie = headers.get_all(COOKIE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(';').any(|pair| {
                pair.trim()
                    .split_once('=')
                    .is_some_and(|(k, _)| k.trim() == "session")
            })
        })
    });
    if bearer {
        Some(Source::Bearer)
    } else if keys.iter().any(|k| k == "token") {
        Some(Source::QueryToken)
    } else if cookie {
        Some(Source::Cookie)
    } else if keys.iter().any(|k| k == "session") {
        Some(Source::QuerySession)
    } else {
        None
    }
}

/// An `Authorization` header that is not text: the authenticator may refuse the request
/// for it (the header could have been the credential) rather than call it missing.
fn unreadable_authorization(headers: &HeaderMap) -> bool {
    headers
        .get_all(AUTHORIZATION)
        .iter()
        .any(|v| v.to_str().is_err())
}

/// Every header value and the percent-decoded query, as one string.
fn request_text(headers: &HeaderMap, uri: &Uri) -> String {
    let mut text = percent_decode_str(uri.query().unwrap_or(""))
        .decode_utf8_lossy()
        .into_owned();
    for value in headers.values() {
        text.push('\n');
        text.push_str(&String::from_utf8_lossy(value.as_bytes()));
    }
    text
}

/// Every substring of the request shaped like a compact JWT (three base64url parts).
fn token_candidates(headers: &HeaderMap, uri: &Uri) -> Vec<String> {
    request_text(headers, uri)
        .split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .filter(|s| s.matches('.').count() == 2)
        .map(str::to_owned)
        .collect()
}

fn part(token: &str, index: usize) -> Option<Value> {
    let bytes = URL_SAFE_NO_PAD.decode(token.split('.').nth(index)?).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn subject(token: &str) -> Option<String> {
    Some(part(token, 1)?.get("sub")?.as_str()?.to_owned())
}

/// Re-signs the token's `header.claims` with our key for its `alg` and compares.
fn signed_by_our_keys(fx: &Fixture, token: &str) -> bool {
    let Some((signing_input, signature)) = token.rsplit_once('.') else {
        return false;
    };
    let alg = part(token, 0).and_then(|h| h.get("alg")?.as_str().map(str::to_owned));
    let (key, alg) = match alg.as_deref() {
        Some("HS256") => (&fx.hs_key, Algorithm::HS256),
        Some("RS256") => (&fx.rs_key, Algorithm::RS256),
        _ => return false,
    };
    jsonwebtoken::crypto::sign(signing_input.as_bytes(), key, alg).is_ok_and(|s| s == signature)
}
