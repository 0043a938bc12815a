//! `Secret`: the only type a token, refresh token or client secret ever lives in, so a token
//! cannot reach a log line, an error message or admin output by accident, and reading one is
//! a deliberate call that is easy to find in review.

use std::fmt;
use std::sync::Arc;

/// What `Debug` and `Display` print instead of the value.
pub const REDACTED: &str = "[redacted]";

/// A secret string. Cheap to clone; never printed.
///
/// Its `Debug` and `Display` print `[redacted]` (`{:?}` on a struct holding one is safe).
/// Reading the value takes a deliberate call to [`Secret::expose`]. There is no
/// `Serialize`: the token file encodes an exposed copy explicitly.
///
/// The text sits behind an `Arc<str>` so clones (one per proxied request) cost a reference
/// count, not an allocation. Memory is not wiped on drop: doing that reliably needs either
/// `unsafe` or another crate, and the process holds the live token in memory anyway.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Secret {
        Secret(Arc::from(value))
    }

    /// The secret text, for the one place that must send or store it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("s3cr3t-token-value".to_string());
        let shown = [
            format!("{secret}"),
            format!("{secret:?}"),
            format!("{secret:#?}"),
            format!("{:?}", Some(&secret)),
            format!("{:?}", vec![secret.clone()]),
        ];
        for text in &shown {
            assert!(
                !text.contains("s3cr3t"),
                "expected no secret text in formatted output, saw {text:?}"
            );
            assert!(
                text.contains(REDACTED),
                "expected {REDACTED:?} in formatted output, saw {text:?}"
            );
        }
    }

    #[test]
    fn expose_returns_the_value_and_clones_compare_equal() {
        let secret = Secret::new("abc-123".to_string());
        let copy = secret.clone();
        assert_eq!(
            copy.expose(),
            "abc-123",
            "expected the exposed value to be the one stored"
        );
        assert_eq!(copy, secret, "expected a clone to equal its original");
        assert_ne!(
            secret,
            Secret::new("abc-124".to_string()),
            "expected different values to compare unequal"
        );
    }

    #[test]
    fn a_struct_holding_a_secret_debugs_safely() {
        #[derive(Debug)]
        #[allow(dead_code)] // the fields exist to be printed by Debug
        struct Holder {
            generation: u64,
            token: Secret,
        }
        let holder = Holder {
            generation: 7,
            token: Secret::new("very-private".to_string()),
        };
        let text = format!("{holder:?}");
        assert!(
            !text.contains("very-private") && text.contains("generation: 7"),
            "expected the generation but not the token in {text:?}"
        );
    }
}
