//! The `RateLimit-Policy` and `RateLimit` response fields (draft-ietf-httpapi-ratelimit-headers,
//! revisions 08 to 11), so clients can pace themselves by the share that limits them;
//! [`policy`] and [`state`] say what each member means.

use std::time::Duration;

use http::HeaderValue;

/// `"<name>";q=<limit>;w=<period seconds>`. The window is rounded up to whole seconds, as
/// `w` is an Integer, and is at least 1.
///
/// Both are Structured Field Lists (RFC 9651) whose members are quoted policy names with
/// parameters: the policy says `q` (quota units) per `w` (window, seconds); the live field says
/// `r` (units remaining) and `t` (seconds until the quota restores). The older
/// `RateLimit-Limit`/`-Remaining`/`-Reset` trio and the unquoted-token form of drafts 07 and
/// earlier are not sent. A GCRA quota does not reset in one step: it returns one cell every
/// `w / q` seconds, so `t` is the time until the next cell comes back (0 when the burst is
/// full), which is exactly when a client that got `r=0` may try again.
pub(crate) fn policy(name: &'static str, limit: u32, period: Duration) -> HeaderValue {
    let window = whole_seconds(period).max(1);
    value(format!("\"{name}\";q={limit};w={window}"))
}

/// `"<name>";r=<remaining>;t=<seconds>`, with `t` rounded up so a client that waits that long
/// finds the cell there.
///
/// Sent with every cache hit, so it is written on the stack rather than through `format!`.
pub(crate) fn state(name: &'static str, remaining: u32, next: Duration) -> HeaderValue {
    let seconds = whole_seconds(next);
    let mut text = Text::default();
    text.push(b"\"")
        .push(name.as_bytes())
        .push(b"\";r=")
        .push_int(u64::from(remaining))
        .push(b";t=")
        .push_int(seconds);
    match text.as_bytes() {
        Some(bytes) => HeaderValue::from_bytes(bytes)
            .unwrap_or_else(|_| HeaderValue::from_static("\"budget\"")),
        // Only a policy name far longer than `client` or `global` could get here.
        None => value(format!("\"{name}\";r={remaining};t={seconds}")),
    }
}

/// Field text built on the stack: a quoted policy name and two integers fit in 64 bytes
/// (`"global";r=4294967295;t=18446744073709551615` is 44).
struct Text {
    buf: [u8; 64],
    len: usize,
    /// Something did not fit; the text is then incomplete and must not be used.
    overflowed: bool,
}

impl Default for Text {
    fn default() -> Self {
        Text {
            buf: [0; 64],
            len: 0,
            overflowed: false,
        }
    }
}

impl Text {
    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(slot) => {
                slot.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.overflowed = true,
        }
        self
    }

    /// Appends `n` in decimal, as `Display` would write it.
    fn push_int(&mut self, mut n: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[start..])
    }

    /// The text written, unless something did not fit.
    fn as_bytes(&self) -> Option<&[u8]> {
        (!self.overflowed).then_some(&self.buf[..self.len])
    }
}

/// Rounds up to whole seconds (`Retry-After` and the `t`/`w` parameters are all integers).
pub(crate) fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn value(text: String) -> HeaderValue {
    // The text is a `&'static str` policy name of letters plus digits, quotes, `;` and `=`,
    // all visible ASCII, so the conversion cannot fail; the fallback only avoids a panic path.
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("\"budget\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_uses_quoted_name_and_integer_window() {
        let got = policy("client", 200, Duration::from_secs(3600));
        assert_eq!(
            got, "\"client\";q=200;w=3600",
            "expected draft-11 policy, saw {got:?}"
        );
        let got = policy("global", 5, Duration::from_millis(1500));
        assert_eq!(
            got, "\"global\";q=5;w=2",
            "expected w rounded up, saw {got:?}"
        );
        let got = policy("global", 5, Duration::from_millis(10));
        assert_eq!(
            got, "\"global\";q=5;w=1",
            "expected w at least 1, saw {got:?}"
        );
    }

    #[test]
    fn state_rounds_time_up() {
        let got = state("client", 7, Duration::from_millis(600));
        assert_eq!(
            got, "\"client\";r=7;t=1",
            "expected t rounded up, saw {got:?}"
        );
        let got = state("global", 50, Duration::ZERO);
        assert_eq!(
            got, "\"global\";r=50;t=0",
            "expected t=0 when full, saw {got:?}"
        );
    }

    #[test]
    fn state_writes_integers_as_display_does() {
        let cases = [
            (0, Duration::ZERO),
            (9, Duration::from_secs(10)),
            (u32::MAX, Duration::from_secs(u64::MAX)),
            (1_000_000, Duration::from_nanos(1)),
        ];
        for (remaining, next) in cases {
            let got = state("global", remaining, next);
            let want = format!("\"global\";r={remaining};t={}", whole_seconds(next));
            assert_eq!(got, want.as_str(), "expected {want:?}, saw {got:?}");
        }
    }

    #[test]
    fn state_with_an_overlong_name_still_says_everything() {
        let name = "a-policy-name-much-longer-than-any-the-budget-uses-for-its-shares";
        let got = state(name, 3, Duration::from_secs(2));
        let want = format!("\"{name}\";r=3;t=2");
        assert_eq!(got, want.as_str(), "expected {want:?}, saw {got:?}");
    }

    #[test]
    fn whole_seconds_rounds_up_only_fractions() {
        let cases = [(0, 0), (1, 1), (999, 1), (1000, 1), (1001, 2), (5000, 5)];
        for (millis, want) in cases {
            let got = whole_seconds(Duration::from_millis(millis));
            assert_eq!(got, want, "expected {want} s for {millis} ms, saw {got}");
        }
    }
}
