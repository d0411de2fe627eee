//! What of a receiver's answer is kept with an attempt: a bounded excerpt with credentials
//! masked. Receivers echo requests in their errors (our signature, their own tokens), and the
//! attempts are readable by every `actions:admin` holder and kept for the retention period.

use std::sync::LazyLock;

use regex::Regex;

/// Bytes of an answer read at all: a receiver cannot make the worker buffer more.
pub(super) const READ_BYTES: usize = 4096;
/// Characters of it kept.
const KEEP_CHARS: usize = 512;

static MASKS: LazyLock<Vec<(Regex, &'static str)>> = LazyLock::new(|| {
    [
        // Standard Webhooks secrets and signatures.
        (r"whsec_[A-Za-z0-9+/=]+", "whsec_***"),
        (r"v1,[A-Za-z0-9+/]{20,}={0,2}", "v1,***"),
        // Authorization values.
        (r"(?i)\b(bearer|basic|token)\s+[A-Za-z0-9._~+/=-]{8,}", "$1 ***"),
        // "password": "…", api_key=…, and the like, in JSON, forms and headers.
        (
            r#"(?i)("?(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|authorization|cookie|set-cookie)"?\s*[:=]\s*)("[^"]*"|[^\s,;&}]+)"#,
            "$1***",
        ),
        // JSON Web Tokens.
        (
            r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
            "***",
        ),
    ]
    .into_iter()
    .map(|(p, r)| (Regex::new(p).expect("mask regex"), r))
    .collect()
});

/// The excerpt of an answer's first bytes: decoded lossily, control characters dropped,
/// credentials masked, at most `KEEP_CHARS` characters. `None` for an empty answer.
pub(super) fn excerpt(body: &[u8]) -> Option<String> {
    let text: String = String::from_utf8_lossy(&body[..body.len().min(READ_BYTES)])
        .chars()
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect();
    let mut text = text;
    for (re, with) in MASKS.iter() {
        text = re.replace_all(&text, *with).into_owned();
    }
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let mut out: String = text.chars().take(KEEP_CHARS).collect();
    if text.chars().count() > KEEP_CHARS {
        out.push('…');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_masked_and_the_rest_kept() {
        let body = br#"{"error":"bad signature","got":"v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=","password":"hunter2","api_key":"abc123","hint":"use whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}"#;
        let e = excerpt(body).unwrap();
        assert!(e.contains("bad signature"), "{e}");
        for leaked in ["g0hM9SsE", "hunter2", "abc123", "MfKQ9r8G"] {
            assert!(!e.contains(leaked), "{leaked} leaked in {e}");
        }
        let e =
            excerpt(b"Authorization: Bearer abcdefghijklmnop\r\ntoken=s3cr3tvalue&x=1").unwrap();
        assert!(
            !e.contains("abcdefghijklmnop") && !e.contains("s3cr3tvalue"),
            "{e}"
        );
        assert!(e.contains("x=1"), "{e}");
    }

    #[test]
    fn the_excerpt_is_bounded_and_printable() {
        assert_eq!(excerpt(b""), None);
        assert_eq!(excerpt(b" \r\n "), None);
        let long = "é".repeat(10_000);
        let e = excerpt(long.as_bytes()).unwrap();
        assert_eq!(e.chars().count(), KEEP_CHARS + 1);
        let e = excerpt(b"a\x00b\x1b[31mc\xff").unwrap();
        assert!(!e.chars().any(|c| c.is_control()), "{e:?}");
    }
}
