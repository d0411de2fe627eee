//! Standard Webhooks signatures: what lets a receiver check that a call is ours and unaltered.
//! One signature is `infra::webhook_signature::sign` (shared with `cornjacket webhook listen`,
//! which verifies them); here, the header value for a rotation's several keys.

use crate::infra::webhook_signature::sign;

/// The `webhook-signature` value for several keys (a secret rotation's overlap): one signature
/// per key, space separated, as the Standard Webhooks specification defines.
pub(super) fn sign_all(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| sign(k, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::actions::rules;

    /// The example of the Standard Webhooks specification (and its reference libraries), twice:
    /// a rotation's header carries one signature per key.
    #[test]
    fn every_key_signs_the_standard_webhooks_example() {
        let key = rules::secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let other = rules::secret_key(&rules::generate_secret()).unwrap();
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let header = sign_all(&[key.clone(), other.clone()], id, 1_614_265_330, body);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(parts[1], sign(&other, id, 1_614_265_330, body));
        assert_eq!(parts.len(), 2);
        assert_eq!(sign_all(&[key], id, 1_614_265_330, body), parts[0]);
    }
}
