//! JWT verification (HS256 with a secret, RS256 or ES256 with a public key) and HS256 minting.
//!
//! Algorithm choice is ours, never the token's: each algorithm is bound to one key of its own
//! family, fixed at start-up. HS256 is verified only against the configured secret (never the
//! PEM bytes, which is the classic confusion attack), RS256 only against an RSA key, ES256 only
//! against an EC P-256 key. `none` and every other `alg` are refused before any crypto runs.
//!
//! Claims: `sub` and `exp` required, `nbf` checked when present, `iss`/`aud` checked only when
//! configured (a token carrying an `aud` we were not told about still passes), `projects`
//! optional (absent grants nothing), `role` optional. Clock skew: `leeway_secs` both ways.

use std::collections::HashSet;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthConfigError, AuthError, Claims, CredentialKind};

/// Tokens longer than this are refused unparsed; real ones are a few hundred bytes.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// JWT verification settings (from the gateway config).
#[derive(Clone, Default)]
pub struct JwtConfig {
    /// Enables HS256.
    pub hs256_secret: Option<Vec<u8>>,
    /// An RSA public key (enables RS256) or an EC P-256 public key (enables ES256), PEM.
    pub public_key_pem: Option<Vec<u8>>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    /// Refuse ES256 signatures in high-S form instead of normalising them (see
    /// `es256_canonical`). Only for issuers known to sign low-S: most signers (OpenSSL,
    /// Go, Java, RustCrypto) emit high-S for about half their tokens.
    pub es256_require_low_s: bool,
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("public_key_pem", &self.public_key_pem.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("es256_require_low_s", &self.es256_require_low_s)
            .finish()
    }
}

/// One algorithm, its key and the validation rules that go with it.
#[derive(Clone, Debug)]
struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

/// Verifies JWTs against the configured keys; cheap to share behind an `Arc`.
#[derive(Clone, Debug)]
pub struct JwtVerifier {
    hs256: Option<Verifier>,
    rs256: Option<Verifier>,
    es256: Option<Verifier>,
    es256_require_low_s: bool,
}

impl JwtVerifier {
    pub fn new(config: JwtConfig) -> Result<Self, AuthConfigError> {
        let hs256 = match &config.hs256_secret {
            Some(secret) if secret.is_empty() => return Err(AuthConfigError::EmptySecret),
            Some(secret) => Some(Verifier {
                key: DecodingKey::from_secret(secret),
                validation: validation(Algorithm::HS256, &config),
            }),
            None => None,
        };
        let (mut rs256, mut es256) = (None, None);
        if let Some(pem) = &config.public_key_pem {
            let (alg, key) = public_key(pem)?;
            let verifier = Some(Verifier {
                key,
                validation: validation(alg, &config),
            });
            match alg {
                Algorithm::RS256 => rs256 = verifier,
                _ => es256 = verifier,
            }
        }
        if hs256.is_none() && rs256.is_none() && es256.is_none() {
            return Err(AuthConfigError::NoKey);
        }
        Ok(Self {
            hs256,
            rs256,
            es256,
            es256_require_low_s: config.es256_require_low_s,
        })
    }

    /// The algorithms this verifier accepts, for start-up logs.
    pub fn algorithms(&self) -> Vec<&'static str> {
        [
            (self.hs256.is_some(), "HS256"),
            (self.rs256.is_some(), "RS256"),
            (self.es256.is_some(), "ES256"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect()
    }

    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() || token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        // Read `alg` ourselves: jsonwebtoken's header type cannot even represent `none`, and
        // the key must be chosen by alg before anything else is trusted.
        let alg = header_alg(token)?;
        let verifier = match alg.as_str() {
            "HS256" => self.hs256.as_ref(),
            "RS256" => self.rs256.as_ref(),
            "ES256" => self.es256.as_ref(),
            _ => None,
        }
        .ok_or(AuthError::AlgorithmNotAllowed)?;
        // ES256: only the canonical (low-S) signature is ever verified; see es256_canonical.
        let canonical = if alg == "ES256" {
            es256_canonical(token, self.es256_require_low_s)?
        } else {
            None
        };
        let token = canonical.as_deref().unwrap_or(token);

        let data = jsonwebtoken::decode::<RawClaims>(token, &verifier.key, &verifier.validation)
            .map_err(|e| map_error(e.into_kind()))?;
        let raw = data.claims;
        let sub = raw
            .sub
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthError::InvalidClaims("sub is missing or empty".to_owned()))?;
        Ok(Claims {
            sub,
            // Exact capacity: the claims live as long as the connection (serde grows the Vec
            // to 4 slots for one project).
            projects: raw.projects.map(shrunk).unwrap_or_default(),
            stories: raw.stories.unwrap_or_default().into_boxed_slice(),
            role: raw.role,
            exp: raw.exp,
            kind: CredentialKind::Jwt,
        })
    }
}

/// `v` without spare capacity (claims are kept for a connection's life).
pub(crate) fn shrunk(mut v: Vec<String>) -> Vec<String> {
    v.shrink_to_fit();
    v
}

/// Half the order of P-256, `floor(n / 2)`, big-endian.
const P256_HALF_ORDER: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0x80, 0x00, 0x00, 0x00, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xde, 0x73, 0x7d, 0x56, 0xd3, 0x8b, 0xcf, 0x42, 0x79, 0xdc, 0xe5, 0x61, 0x7e, 0x31, 0x92, 0xa8,
];

/// The order n of P-256, big-endian.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// ECDSA malleability: for every valid signature `(R, S)`, `(R, n - S)` verifies too, so a
/// captured ES256 token can be re-encoded as a second, different string with the same
/// claims (a twin that would dodge a blocklist or cache keyed on the token string). The JWS
/// signature is `R || S`, 32 bytes each (RFC 7518 §3.4); any other length is refused.
///
/// Returns the token to verify: `None` when it is already canonical (`S <= n/2`), else the
/// same token with `S` replaced by `n - S`, so a token and its twin are one credential, and
/// only a canonical signature ever reaches the verifier. With `require_low_s`, a high-S
/// signature is refused instead. Refusing is not the default because most signers
/// (OpenSSL, Go, Java, RustCrypto's p256) do not normalise: about half of their genuine
/// tokens are high-S.
fn es256_canonical(token: &str, require_low_s: bool) -> Result<Option<String>, AuthError> {
    let (signed, signature) = token.rsplit_once('.').ok_or(AuthError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| AuthError::Malformed)?;
    let (Some(r), Some(s), 64) = (bytes.get(..32), bytes.get(32..64), bytes.len()) else {
        return Err(AuthError::InvalidSignature);
    };
    // Big-endian byte strings of equal length compare like the numbers they encode.
    if s <= &P256_HALF_ORDER[..] {
        return Ok(None);
    }
    if require_low_s {
        return Err(AuthError::InvalidSignature);
    }
    let mut canonical = Vec::with_capacity(64);
    canonical.extend_from_slice(r);
    canonical.extend_from_slice(&p256_negate(s));
    Ok(Some(format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(&canonical)
    )))
}

/// `n - s` for a 32-byte big-endian `s` (with `n/2 < s`, so the result is in `1..n/2`; an
/// `s >= n` is not a valid signature and fails verification whatever this returns).
fn p256_negate(s: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    let mut borrow = 0u16;
    for i in (0..32).rev() {
        let minuend = u16::from(P256_ORDER[i]);
        let subtrahend = u16::from(s.get(i).copied().unwrap_or(0)) + borrow;
        let (digit, next) = if minuend >= subtrahend {
            (minuend - subtrahend, 0)
        } else {
            (minuend + 256 - subtrahend, 1)
        };
        out[i] = digit as u8;
        borrow = next;
    }
    out
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
}

/// The token's claimed algorithm, read without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: RawHeader = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    Ok(header.alg)
}

/// Only the claims we use; every field optional so absence is reported by validation, not
/// as an opaque parse failure.
#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    projects: Option<Vec<String>>,
    stories: Option<Vec<String>>,
    role: Option<String>,
    exp: Option<u64>,
}

fn validation(alg: Algorithm, config: &JwtConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = config.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required: HashSet<String> = ["exp", "sub"].iter().map(|s| s.to_string()).collect();
    if let Some(issuer) = &config.issuer {
        v.set_issuer(&[issuer]);
        required.insert("iss".to_owned());
    }
    match &config.audience {
        Some(audience) => {
            v.set_audience(&[audience]);
            required.insert("aud".to_owned());
        }
        // jsonwebtoken rejects any token carrying `aud` unless an audience is set; with none
        // configured, `aud` is simply not ours to check.
        None => v.validate_aud = false,
    }
    v.required_spec_claims = required;
    v
}

/// Classifies the PEM: RSA -> RS256, EC P-256 -> ES256; anything else is a config error.
fn public_key(pem: &[u8]) -> Result<(Algorithm, DecodingKey), AuthConfigError> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        // The PEM wrapper parsed; make sure the RSA key inside does too, now rather than on
        // the first handshake (rsa parses lazily at verify time).
        let der = key
            .try_get_as_bytes()
            .map_err(|e| AuthConfigError::InvalidPem(e.to_string()))?;
        (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
            .key_utils
            .rsa_pub_components_from_public_key)(der)
        .map_err(|e| AuthConfigError::InvalidPem(e.to_string()))?;
        return Ok((Algorithm::RS256, key));
    }
    match DecodingKey::from_ec_pem(pem) {
        Ok(key) => {
            // An uncompressed SEC1 point: 0x04 || x || y, 32 bytes each on P-256. P-384 keys
            // (97 bytes) would need ES384, which we do not accept.
            let point = key
                .try_get_as_bytes()
                .map_err(|e| AuthConfigError::InvalidPem(e.to_string()))?;
            if point.len() != 65 || point[0] != 0x04 {
                return Err(AuthConfigError::InvalidPem(
                    "EC key is not on curve P-256".to_owned(),
                ));
            }
            // Probe once so an invalid point fails here; a bogus signature must just not verify.
            jsonwebtoken::crypto::verify("AA", b"probe", &key, Algorithm::ES256)
                .map_err(|e| AuthConfigError::InvalidPem(e.to_string()))?;
            Ok((Algorithm::ES256, key))
        }
        Err(e) => Err(AuthConfigError::InvalidPem(e.to_string())),
    }
}

fn map_error(kind: ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::InvalidSignature => AuthError::InvalidSignature,
        ErrorKind::ImmatureSignature => AuthError::InvalidClaims("not valid yet (nbf)".to_owned()),
        ErrorKind::InvalidIssuer => AuthError::InvalidClaims("issuer not accepted".to_owned()),
        ErrorKind::InvalidAudience => AuthError::InvalidClaims("audience not accepted".to_owned()),
        ErrorKind::InvalidSubject => AuthError::InvalidClaims("subject not accepted".to_owned()),
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::InvalidClaims(format!("required claim `{claim}` is missing"))
        }
        ErrorKind::InvalidClaimFormat(claim) => {
            AuthError::InvalidClaims(format!("claim `{claim}` has the wrong type"))
        }
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed,
        // Keys are validated at start-up, so a key error here means the signature bytes did
        // not fit the key: from the client's side, a bad signature.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::InvalidKeyFormat => {
            AuthError::InvalidSignature
        }
        _ => AuthError::Malformed,
    }
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    projects: &'a [String],
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
}

/// Mints an HS256 token valid for `ttl_secs` from now (dev tooling and service tokens).
pub fn mint_hs256(
    secret: &[u8],
    sub: &str,
    projects: &[String],
    ttl_secs: u64,
    service: bool,
) -> Result<String, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::NotConfigured);
    }
    let iat = jsonwebtoken::get_current_timestamp();
    let claims = MintClaims {
        sub,
        projects,
        iat,
        exp: iat.saturating_add(ttl_secs),
        role: service.then_some("service"),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| AuthError::Signing(e.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{json, Value};

    pub(crate) const SECRET: &[u8] = b"test-secret-0123456789abcdef";
    pub(crate) const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/rsa_private.pem");
    pub(crate) const RSA_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/rsa_public.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/ec_private.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/ec_public.pem");
    const EC_P384_PUBLIC: &[u8] = include_bytes!("../../tests/fixtures/ec_p384_public.pem");

    pub(crate) fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    pub(crate) fn hs_config() -> JwtConfig {
        JwtConfig {
            hs256_secret: Some(SECRET.to_vec()),
            ..JwtConfig::default()
        }
    }

    pub(crate) fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    pub(crate) fn hs(claims: &Value) -> String {
        sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), claims)
    }

    fn valid_claims() -> Value {
        json!({"sub": "user-1", "projects": ["p1", "p2"], "exp": now() + 300})
    }

    fn verifier(config: JwtConfig) -> JwtVerifier {
        JwtVerifier::new(config).unwrap()
    }

    #[test]
    fn hs256_roundtrip() {
        let v = verifier(hs_config());
        let claims = v.verify(&hs(&valid_claims())).unwrap();
        assert_eq!(claims.sub, "user-1");
        assert_eq!(claims.projects, vec!["p1", "p2"]);
        assert_eq!(claims.kind, CredentialKind::Jwt);
        assert!(claims.role.is_none());
        assert_eq!(v.algorithms(), vec!["HS256"]);
    }

    #[test]
    fn rs256_roundtrip() {
        let v = verifier(JwtConfig {
            public_key_pem: Some(RSA_PUBLIC.to_vec()),
            ..JwtConfig::default()
        });
        assert_eq!(v.algorithms(), vec!["RS256"]);
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        let token = sign(Algorithm::RS256, &key, &valid_claims());
        assert_eq!(v.verify(&token).unwrap().sub, "user-1");
        // Same key, but PS256 is not on our list.
        let token = sign(Algorithm::PS256, &key, &valid_claims());
        assert_eq!(v.verify(&token), Err(AuthError::AlgorithmNotAllowed));
    }

    #[test]
    fn es256_roundtrip() {
        let v = verifier(JwtConfig {
            public_key_pem: Some(EC_PUBLIC.to_vec()),
            ..JwtConfig::default()
        });
        assert_eq!(v.algorithms(), vec!["ES256"]);
        let key = EncodingKey::from_ec_pem(EC_PRIVATE).unwrap();
        let token = sign(Algorithm::ES256, &key, &valid_claims());
        assert_eq!(v.verify(&token).unwrap().sub, "user-1");
        // An RS256 token at an EC-only verifier.
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        let token = sign(Algorithm::RS256, &rsa, &valid_claims());
        assert_eq!(v.verify(&token), Err(AuthError::AlgorithmNotAllowed));
    }

    /// A real ES256 token and its malleated twin `(R, n - S)`, as (low-S, high-S).
    fn es256_pair(key: &EncodingKey) -> (String, String) {
        let token = sign(Algorithm::ES256, key, &valid_claims());
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        assert_eq!(sig.len(), 64);
        let mut flipped = sig[..32].to_vec();
        flipped.extend(p256_negate(&sig[32..]));
        let twin = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&flipped));
        // Exactly one of (R, S) and (R, n - S) is low-S.
        if sig[32..] <= P256_HALF_ORDER[..] {
            (token, twin)
        } else {
            (twin, token)
        }
    }

    #[test]
    fn p256_negate_is_n_minus_s() {
        assert_eq!(p256_negate(&[0u8; 32]), P256_ORDER);
        let mut one = [0u8; 32];
        one[31] = 1;
        let mut n_minus_one = P256_ORDER;
        n_minus_one[31] -= 1;
        assert_eq!(p256_negate(&one), n_minus_one);
        assert_eq!(p256_negate(&p256_negate(&one)), one);
        // n - floor(n/2) = floor(n/2) + 1 (n is odd).
        let mut half_plus_one = P256_HALF_ORDER;
        half_plus_one[31] += 1;
        assert_eq!(p256_negate(&P256_HALF_ORDER), half_plus_one);
    }

    #[test]
    fn es256_high_s_is_normalised_by_default() {
        let v = verifier(JwtConfig {
            public_key_pem: Some(EC_PUBLIC.to_vec()),
            ..JwtConfig::default()
        });
        let key = EncodingKey::from_ec_pem(EC_PRIVATE).unwrap();
        for _ in 0..8 {
            let (low, high) = es256_pair(&key);
            assert_eq!(es256_canonical(&low, false), Ok(None));
            // The twin is verified as its canonical form: the same token, one credential.
            assert_eq!(es256_canonical(&high, false), Ok(Some(low.clone())));
            assert_eq!(v.verify(&high), v.verify(&low));
            assert_eq!(v.verify(&low).unwrap().sub, "user-1");
        }
        // A bad signature stays bad in either form.
        let (low, _) = es256_pair(&key);
        let (signed, _) = low.rsplit_once('.').unwrap();
        let bogus = format!("{signed}.{}", URL_SAFE_NO_PAD.encode([0xffu8; 64]));
        assert_eq!(v.verify(&bogus), Err(AuthError::InvalidSignature));
        let short = format!("{signed}.{}", URL_SAFE_NO_PAD.encode([1u8; 63]));
        assert_eq!(v.verify(&short), Err(AuthError::InvalidSignature));
    }

    #[test]
    fn es256_high_s_is_refused_when_required() {
        let v = verifier(JwtConfig {
            public_key_pem: Some(EC_PUBLIC.to_vec()),
            es256_require_low_s: true,
            ..JwtConfig::default()
        });
        let key = EncodingKey::from_ec_pem(EC_PRIVATE).unwrap();
        for _ in 0..8 {
            let (low, high) = es256_pair(&key);
            assert_eq!(v.verify(&low).unwrap().sub, "user-1");
            assert_eq!(v.verify(&high), Err(AuthError::InvalidSignature));
            assert_eq!(AuthError::InvalidSignature.code(), "invalid_token");
        }
    }

    #[test]
    fn secret_and_public_key_together() {
        let v = verifier(JwtConfig {
            hs256_secret: Some(SECRET.to_vec()),
            public_key_pem: Some(RSA_PUBLIC.to_vec()),
            ..JwtConfig::default()
        });
        assert!(v.verify(&hs(&valid_claims())).is_ok());
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        assert!(v
            .verify(&sign(Algorithm::RS256, &key, &valid_claims()))
            .is_ok());
    }

    #[test]
    fn bad_config() {
        assert!(matches!(
            JwtVerifier::new(JwtConfig::default()),
            Err(AuthConfigError::NoKey)
        ));
        assert!(matches!(
            JwtVerifier::new(JwtConfig {
                hs256_secret: Some(vec![]),
                ..JwtConfig::default()
            }),
            Err(AuthConfigError::EmptySecret)
        ));
        for pem in [
            &b"not a pem"[..],
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
            EC_P384_PUBLIC,
            // A private key is not a public key.
            RSA_PRIVATE,
        ] {
            let result = JwtVerifier::new(JwtConfig {
                public_key_pem: Some(pem.to_vec()),
                ..JwtConfig::default()
            });
            assert!(
                matches!(result, Err(AuthConfigError::InvalidPem(_))),
                "{result:?}"
            );
        }
    }

    #[test]
    fn expired_and_leeway() {
        let claims = json!({"sub": "u", "exp": now() - 30});
        assert_eq!(
            verifier(hs_config()).verify(&hs(&claims)),
            Err(AuthError::Expired)
        );
        let lenient = verifier(JwtConfig {
            leeway_secs: 60,
            ..hs_config()
        });
        assert!(lenient.verify(&hs(&claims)).is_ok());

        // nbf slightly in the future: refused without leeway, accepted within it.
        let claims = json!({"sub": "u", "exp": now() + 300, "nbf": now() + 30});
        assert!(matches!(
            verifier(hs_config()).verify(&hs(&claims)),
            Err(AuthError::InvalidClaims(_))
        ));
        assert!(lenient.verify(&hs(&claims)).is_ok());
    }

    #[test]
    fn wrong_signature() {
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another-secret"),
            &valid_claims(),
        );
        assert_eq!(
            verifier(hs_config()).verify(&token),
            Err(AuthError::InvalidSignature)
        );
        // Tampered payload under a valid signature.
        let good = hs(&valid_claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged = URL_SAFE_NO_PAD
            .encode(json!({"sub": "admin", "projects": ["*"], "exp": now() + 300}).to_string());
        parts[1] = &forged;
        assert_eq!(
            verifier(hs_config()).verify(&parts.join(".")),
            Err(AuthError::InvalidSignature)
        );
    }

    #[test]
    fn alg_none_is_refused() {
        let payload = URL_SAFE_NO_PAD
            .encode(json!({"sub": "admin", "projects": ["*"], "exp": now() + 300}).to_string());
        for header in [r#"{"alg":"none"}"#, r#"{"alg":"None","typ":"JWT"}"#] {
            let token = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(header));
            assert_eq!(
                verifier(hs_config()).verify(&token),
                Err(AuthError::AlgorithmNotAllowed)
            );
        }
        // The literal hand-crafted form from the brief.
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.");
        assert_eq!(
            verifier(hs_config()).verify(&token),
            Err(AuthError::AlgorithmNotAllowed)
        );
    }

    #[test]
    fn algorithm_confusion_is_refused() {
        // HS256 "signed" with the RSA public key PEM as the HMAC secret.
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(RSA_PUBLIC),
            &valid_claims(),
        );
        let pem_only = verifier(JwtConfig {
            public_key_pem: Some(RSA_PUBLIC.to_vec()),
            ..JwtConfig::default()
        });
        assert_eq!(pem_only.verify(&token), Err(AuthError::AlgorithmNotAllowed));

        let both = verifier(JwtConfig {
            hs256_secret: Some(SECRET.to_vec()),
            public_key_pem: Some(RSA_PUBLIC.to_vec()),
            ..JwtConfig::default()
        });
        assert_eq!(both.verify(&token), Err(AuthError::InvalidSignature));

        // Same with the EC key.
        let token = sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(EC_PUBLIC),
            &valid_claims(),
        );
        let ec_only = verifier(JwtConfig {
            public_key_pem: Some(EC_PUBLIC.to_vec()),
            ..JwtConfig::default()
        });
        assert_eq!(ec_only.verify(&token), Err(AuthError::AlgorithmNotAllowed));

        // HS384/HS512 are never accepted, even with the right secret.
        let token = sign(
            Algorithm::HS512,
            &EncodingKey::from_secret(SECRET),
            &valid_claims(),
        );
        assert_eq!(
            verifier(hs_config()).verify(&token),
            Err(AuthError::AlgorithmNotAllowed)
        );
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let v = verifier(JwtConfig {
            issuer: Some("https://issuer.example".into()),
            audience: Some("switchboard".into()),
            ..hs_config()
        });
        let exp = now() + 300;
        let ok =
            json!({"sub": "u", "exp": exp, "iss": "https://issuer.example", "aud": "switchboard"});
        assert!(v.verify(&hs(&ok)).is_ok());
        let aud_list = json!({"sub": "u", "exp": exp, "iss": "https://issuer.example", "aud": ["x", "switchboard"]});
        assert!(v.verify(&hs(&aud_list)).is_ok());
        for bad in [
            json!({"sub": "u", "exp": exp, "iss": "https://evil.example", "aud": "switchboard"}),
            json!({"sub": "u", "exp": exp, "iss": "https://issuer.example", "aud": "other"}),
            json!({"sub": "u", "exp": exp, "aud": "switchboard"}),
            json!({"sub": "u", "exp": exp, "iss": "https://issuer.example"}),
        ] {
            assert!(
                matches!(v.verify(&hs(&bad)), Err(AuthError::InvalidClaims(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn unconfigured_iss_and_aud_are_not_checked() {
        let claims = json!({"sub": "u", "exp": now() + 300, "iss": "anyone", "aud": "anything"});
        assert!(verifier(hs_config()).verify(&hs(&claims)).is_ok());
    }

    #[test]
    fn required_and_optional_claims() {
        let v = verifier(hs_config());
        let no_exp = json!({"sub": "u"});
        assert!(matches!(
            v.verify(&hs(&no_exp)),
            Err(AuthError::InvalidClaims(_))
        ));
        let no_sub = json!({"exp": now() + 300});
        assert!(matches!(
            v.verify(&hs(&no_sub)),
            Err(AuthError::InvalidClaims(_))
        ));
        let empty_sub = json!({"sub": "", "exp": now() + 300});
        assert!(matches!(
            v.verify(&hs(&empty_sub)),
            Err(AuthError::InvalidClaims(_))
        ));
        let minimal = v
            .verify(&hs(&json!({"sub": "u", "exp": now() + 300})))
            .unwrap();
        assert!(minimal.projects.is_empty() && !minimal.grants("p"));
        let service = v
            .verify(&hs(
                &json!({"sub": "svc", "exp": now() + 300, "role": "service", "projects": ["*"]}),
            ))
            .unwrap();
        assert!(service.is_service() && service.grants_all());
    }

    #[test]
    fn malformed_tokens() {
        let v = verifier(hs_config());
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.e30.sig",
            "e30.e30.",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            let err = v.verify(bad).unwrap_err();
            assert_eq!(err.code(), "invalid_token", "{bad:?} -> {err:?}");
        }
    }

    #[test]
    fn mint_then_verify() {
        let projects = vec!["p1".to_owned()];
        let token = mint_hs256(SECRET, "svc", &projects, 60, true).unwrap();
        let claims = verifier(hs_config()).verify(&token).unwrap();
        assert_eq!(claims.sub, "svc");
        assert_eq!(claims.projects, projects);
        assert!(claims.is_service());
        let exp = claims.expires_at().unwrap();
        assert!(exp >= now() + 59 && exp <= now() + 61);

        let token = mint_hs256(SECRET, "user", &projects, 60, false).unwrap();
        assert!(!verifier(hs_config()).verify(&token).unwrap().is_service());
        assert_eq!(
            mint_hs256(b"", "u", &projects, 60, false),
            Err(AuthError::NotConfigured)
        );
    }
}
