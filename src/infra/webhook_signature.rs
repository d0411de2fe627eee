//! Standard Webhooks signatures, both sides: [`sign`] what the platform sends, [`verify`] what a
//! receiver checks (`cornjacket webhook listen`). A signature is `v1,` + base64(HMAC-SHA256(key,
//! "{id}.{timestamp}.{body}")), keyed by the bytes whose base64 follows `whsec_`; the
//! `webhook-signature` header carries one or more of them, space-separated, so a sender can sign
//! with an old and a new secret while a receiver rotates.
//!
//! The one home of the scheme: the deliverer (`services::actions::deliver::signing`) signs and
//! `services::actions::rules` validates secrets with it.

use std::fmt;
use std::str::FromStr;

use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SECRET_PREFIX: &str = "whsec_";
/// The key lengths the platform generates and accepts for a rule's secret.
pub const KEY_LEN: std::ops::RangeInclusive<usize> = 24..=64;
/// How far a timestamp may be from the receiver's clock, either way (the specification's default):
/// older means a replayed capture, newer a sender whose clock is wrong.
pub const TOLERANCE_S: i64 = 5 * 60;

pub const HEADER_ID: &str = "webhook-id";
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// A signing key, decoded once from its `whsec_…` form. Its `Debug` shows none of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    key: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a webhook secret starts with {SECRET_PREFIX}")]
    NoPrefix,
    #[error("what follows {SECRET_PREFIX} is not standard base64")]
    NotBase64,
    #[error("the key is {0} bytes; a webhook secret's key has 24 to 64")]
    Length(usize),
}

impl Secret {
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

impl FromStr for Secret {
    type Err = SecretError;

    fn from_str(s: &str) -> Result<Self, SecretError> {
        let b64 = s.strip_prefix(SECRET_PREFIX).ok_or(SecretError::NoPrefix)?;
        let key = B64.decode(b64).map_err(|_| SecretError::NotBase64)?;
        if !KEY_LEN.contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Self { key })
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(whsec_…)")
    }
}

/// The Standard Webhooks signature of one message, `v1,<base64>`.
pub fn sign(key: &[u8], id: &str, ts: i64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        B64.encode(mac(key, id, ts, body).finalize().into_bytes())
    )
}

fn mac(key: &[u8], id: &str, ts: i64, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// Why a request is not a verified webhook.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("no {0} header")]
    MissingHeader(&'static str),
    #[error("the {0} header is malformed")]
    MalformedHeader(&'static str),
    #[error("the timestamp is {0} s old; more than {TOLERANCE_S} s is refused (a replay?)")]
    TooOld(i64),
    #[error(
        "the timestamp is {0} s ahead; more than {TOLERANCE_S} s is refused (the sender's clock?)"
    )]
    InTheFuture(i64),
    #[error("none of the {candidates} v1 signature(s) matches a secret")]
    NoMatch { candidates: usize },
}

impl VerifyError {
    /// The request lacks what makes it a webhook at all, as opposed to one that is refused.
    pub fn is_malformed(&self) -> bool {
        matches!(self, Self::MissingHeader(_) | Self::MalformedHeader(_))
    }
}

/// Checks a received webhook: fresh timestamp, and one `v1` signature in the header made by one
/// of `secrets` (several during a rotation) over exactly these bytes.
pub fn verify(
    secrets: &[Secret],
    headers: &HeaderMap,
    body: &[u8],
    now: DateTime<Utc>,
) -> Result<(), VerifyError> {
    let header = |name: &'static str| -> Result<&str, VerifyError> {
        headers
            .get(name)
            .ok_or(VerifyError::MissingHeader(name))?
            .to_str()
            .map_err(|_| VerifyError::MalformedHeader(name))
    };
    let id = header(HEADER_ID)?;
    let ts_text = header(HEADER_TIMESTAMP)?;
    let signatures = header(HEADER_SIGNATURE)?;
    let ts: i64 = ts_text
        .trim()
        .parse()
        .map_err(|_| VerifyError::MalformedHeader(HEADER_TIMESTAMP))?;
    let age = now.timestamp().saturating_sub(ts);
    if age > TOLERANCE_S {
        return Err(VerifyError::TooOld(age));
    }
    if -age > TOLERANCE_S {
        return Err(VerifyError::InTheFuture(-age));
    }
    // Other versions (v1a is the asymmetric one) are not ours to check; undecodable entries
    // cannot match and are skipped like them.
    let v1: Vec<&str> = signatures
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .collect();
    let decoded: Vec<Vec<u8>> = v1.iter().filter_map(|b64| B64.decode(b64).ok()).collect();
    for s in secrets {
        let m = mac(&s.key, id, ts, body);
        // verify_slice compares in constant time.
        if decoded.iter().any(|c| m.clone().verify_slice(c).is_ok()) {
            return Ok(());
        }
    }
    Err(VerifyError::NoMatch {
        candidates: v1.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const EXAMPLE_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const EXAMPLE_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const EXAMPLE_TS: i64 = 1_614_265_330;
    const EXAMPLE_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXAMPLE_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    /// A second 32-byte key, for rotations and wrong secrets.
    const OTHER_SECRET: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn secret(s: &str) -> Secret {
        s.parse().unwrap()
    }

    fn at(ts: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(ts, 0).unwrap()
    }

    fn headers(id: &str, ts: i64, signature: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER_ID, HeaderValue::from_str(id).unwrap());
        h.insert(HEADER_TIMESTAMP, HeaderValue::from(ts));
        h.insert(HEADER_SIGNATURE, HeaderValue::from_str(signature).unwrap());
        h
    }

    fn example_headers(signature: &str) -> HeaderMap {
        headers(EXAMPLE_ID, EXAMPLE_TS, signature)
    }

    /// The example of the Standard Webhooks specification (and its reference libraries).
    #[test]
    fn sign_matches_the_standard_webhooks_example() {
        let sig = sign(
            secret(EXAMPLE_SECRET).key(),
            EXAMPLE_ID,
            EXAMPLE_TS,
            EXAMPLE_BODY,
        );
        assert_eq!(sig, EXAMPLE_SIGNATURE);
    }

    #[test]
    fn the_example_verifies_at_its_own_time() {
        let r = verify(
            &[secret(EXAMPLE_SECRET)],
            &example_headers(EXAMPLE_SIGNATURE),
            EXAMPLE_BODY,
            at(EXAMPLE_TS),
        );
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn one_matching_signature_among_several_is_enough() {
        let other = sign(
            secret(OTHER_SECRET).key(),
            EXAMPLE_ID,
            EXAMPLE_TS,
            EXAMPLE_BODY,
        );
        let header = format!(
            "v1,Mm7xgUVICxZfQ3bgf0h0Dof65L/IFx+PnZvnDWPCX6Q= v1a,c2lnbmVk {other} {EXAMPLE_SIGNATURE}"
        );
        for secrets in [
            vec![secret(EXAMPLE_SECRET)],
            vec![secret(OTHER_SECRET)],
            vec![secret(EXAMPLE_SECRET), secret(OTHER_SECRET)],
        ] {
            let r = verify(
                &secrets,
                &example_headers(&header),
                EXAMPLE_BODY,
                at(EXAMPLE_TS),
            );
            assert_eq!(r, Ok(()), "{header}");
        }
    }

    #[test]
    fn any_of_the_receivers_secrets_verifies_during_a_rotation() {
        let secrets = [secret(OTHER_SECRET), secret(EXAMPLE_SECRET)];
        let r = verify(
            &secrets,
            &example_headers(EXAMPLE_SIGNATURE),
            EXAMPLE_BODY,
            at(EXAMPLE_TS),
        );
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let r = verify(
            &[secret(OTHER_SECRET)],
            &example_headers(EXAMPLE_SIGNATURE),
            EXAMPLE_BODY,
            at(EXAMPLE_TS),
        );
        assert_eq!(r, Err(VerifyError::NoMatch { candidates: 1 }));
    }

    #[test]
    fn a_tampered_body_id_or_timestamp_is_refused() {
        let secrets = [secret(EXAMPLE_SECRET)];
        let now = at(EXAMPLE_TS);
        let no_match = Err(VerifyError::NoMatch { candidates: 1 });
        let body = br#"{"test": 2432232315}"#;
        let h = example_headers(EXAMPLE_SIGNATURE);
        assert_eq!(verify(&secrets, &h, body, now), no_match);
        let h = headers("msg_other", EXAMPLE_TS, EXAMPLE_SIGNATURE);
        assert_eq!(verify(&secrets, &h, EXAMPLE_BODY, now), no_match);
        let h = headers(EXAMPLE_ID, EXAMPLE_TS + 1, EXAMPLE_SIGNATURE);
        assert_eq!(verify(&secrets, &h, EXAMPLE_BODY, now), no_match);
    }

    #[test]
    fn a_truncated_or_unversioned_signature_is_refused() {
        let secrets = [secret(EXAMPLE_SECRET)];
        let (_, b64) = EXAMPLE_SIGNATURE.split_once(',').unwrap();
        for (header, candidates) in [
            ("v1,", 1),
            (&EXAMPLE_SIGNATURE[..20], 1),
            (b64, 0),
            (&format!("v2,{b64}"), 0),
            ("", 0),
        ] {
            let r = verify(
                &secrets,
                &example_headers(header),
                EXAMPLE_BODY,
                at(EXAMPLE_TS),
            );
            assert_eq!(r, Err(VerifyError::NoMatch { candidates }), "{header:?}");
        }
    }

    #[test]
    fn a_timestamp_more_than_five_minutes_away_is_refused_either_way() {
        let secrets = [secret(EXAMPLE_SECRET)];
        let h = example_headers(EXAMPLE_SIGNATURE);
        let check = |now| verify(&secrets, &h, EXAMPLE_BODY, at(now));
        assert_eq!(check(EXAMPLE_TS + 300), Ok(()));
        assert_eq!(check(EXAMPLE_TS - 300), Ok(()));
        assert_eq!(check(EXAMPLE_TS + 301), Err(VerifyError::TooOld(301)));
        assert_eq!(check(EXAMPLE_TS - 301), Err(VerifyError::InTheFuture(301)));
        assert_eq!(check(EXAMPLE_TS + 86_400), Err(VerifyError::TooOld(86_400)));
    }

    #[test]
    fn missing_and_malformed_headers_are_named() {
        let secrets = [secret(EXAMPLE_SECRET)];
        let now = at(EXAMPLE_TS);
        for name in [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE] {
            let mut h = example_headers(EXAMPLE_SIGNATURE);
            h.remove(name);
            let e = verify(&secrets, &h, EXAMPLE_BODY, now).unwrap_err();
            assert_eq!(e, VerifyError::MissingHeader(name));
            assert!(e.is_malformed());
        }
        let mut h = example_headers(EXAMPLE_SIGNATURE);
        h.insert(HEADER_TIMESTAMP, HeaderValue::from_static("yesterday"));
        let e = verify(&secrets, &h, EXAMPLE_BODY, now).unwrap_err();
        assert_eq!(e, VerifyError::MalformedHeader(HEADER_TIMESTAMP));
        assert!(e.is_malformed());
        assert!(!VerifyError::TooOld(301).is_malformed());
        assert!(!VerifyError::NoMatch { candidates: 1 }.is_malformed());
    }

    #[test]
    fn secrets_are_whsec_and_the_base64_of_24_to_64_bytes() {
        assert_eq!(
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".parse::<Secret>(),
            Err(SecretError::NoPrefix)
        );
        assert_eq!(
            "whsec_not base64!".parse::<Secret>(),
            Err(SecretError::NotBase64)
        );
        let of_len = |n: usize| format!("{SECRET_PREFIX}{}", B64.encode(vec![7u8; n]));
        assert_eq!(of_len(23).parse::<Secret>(), Err(SecretError::Length(23)));
        assert_eq!(of_len(65).parse::<Secret>(), Err(SecretError::Length(65)));
        assert_eq!(of_len(24).parse::<Secret>().unwrap().key().len(), 24);
        assert_eq!(of_len(64).parse::<Secret>().unwrap().key().len(), 64);
    }

    #[test]
    fn a_secret_never_prints() {
        let s = secret(EXAMPLE_SECRET);
        let shown = format!("{s:?} {:?}", std::slice::from_ref(&s));
        assert!(!shown.contains("MfKQ9r8"), "{shown}");
    }
}
