//! Grant requests to the OAuth token endpoint (RFC 6749 sections 4.1.3 and 6). CX Social
//! documents GET query parameters where RFC 6749 says form POST, and may answer in its own
//! envelope or in plain RFC 6749 JSON, so this builds both request forms and reads every
//! answer shape ([`build_request`], [`interpret`]).

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;

use super::error::TokenError;
use super::secret::Secret;
use super::{OAuthMethod, OAuthSettings};
use crate::upstream::HttpClient;

/// A whole exchange (connect, send, read the answer) gets this long.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// Token answers are tiny; anything larger is not one.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// What is traded for a token.
pub(crate) enum Grant<'a> {
    Refresh(&'a Secret),
    Code {
        code: &'a str,
        redirect_uri: Option<&'a str>,
    },
}

/// A token the endpoint issued.
#[derive(Debug)]
pub(crate) struct Granted {
    pub access: Secret,
    /// Absent when the endpoint does not rotate: the old refresh token stays valid.
    pub refresh: Option<Secret>,
    pub expires_in: Option<Duration>,
    pub scope: Option<String>,
}

/// Performs one grant request.
pub(crate) async fn exchange(
    client: &HttpClient,
    oauth: &OAuthSettings,
    client_secret: &Secret,
    grant: Grant<'_>,
) -> Result<Granted, TokenError> {
    let request = build_request(oauth, client_secret, &grant)?;
    let round_trip = async {
        let response = client.request(request).await.map_err(TokenError::Http)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(TokenError::Body)?
            .to_bytes();
        Ok::<_, TokenError>((status, body))
    };
    let (status, body) = tokio::time::timeout(EXCHANGE_TIMEOUT, round_trip)
        .await
        .map_err(|_| TokenError::Timeout)??;
    interpret(status, &body)
}

/// The grant request, as GET query parameters or a form POST, from one parameter list: CX
/// Social documents the parameters as GET query parameters; RFC 6749 says form POST.
pub(crate) fn build_request(
    oauth: &OAuthSettings,
    client_secret: &Secret,
    grant: &Grant<'_>,
) -> Result<Request<Full<Bytes>>, TokenError> {
    let mut form = form_urlencoded::Serializer::new(String::new());
    match grant {
        Grant::Refresh(token) => {
            form.append_pair("grant_type", "refresh_token");
            form.append_pair("refresh_token", token.expose());
        }
        Grant::Code { code, redirect_uri } => {
            form.append_pair("grant_type", "authorization_code");
            form.append_pair("code", code);
            if let Some(uri) = redirect_uri {
                form.append_pair("redirect_uri", uri);
            }
        }
    }
    form.append_pair("client_id", &oauth.client_id);
    form.append_pair("client_secret", client_secret.expose());
    let params = form.finish();

    let (method, target, body) = match oauth.method {
        OAuthMethod::Post => (Method::POST, oauth.token_url.clone(), params),
        OAuthMethod::Get => {
            let joiner = if oauth.token_url.contains('?') {
                '&'
            } else {
                '?'
            };
            let target = format!("{}{joiner}{params}", oauth.token_url);
            (Method::GET, target, String::new())
        }
    };
    let uri = Uri::try_from(target).map_err(|_| TokenError::BadTokenUrl)?;
    let web = matches!(uri.scheme_str(), Some("http") | Some("https"));
    if !web || uri.authority().is_none() {
        return Err(TokenError::BadTokenUrl);
    }
    let mut builder = Request::builder()
        .method(method.clone())
        .uri(uri)
        .header(header::ACCEPT, "application/json")
        .header(
            header::USER_AGENT,
            concat!("cxgate/", env!("CARGO_PKG_VERSION")),
        );
    if method == Method::POST {
        builder = builder.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|_| TokenError::BadTokenUrl)
}

/// Reads an answer of any accepted shape.
///
/// The answer may be plain RFC 6749 JSON or wrapped in the CX Social envelope
/// (`{"meta":{..},"response":{..}}`), and errors may use RFC 6749's `error` or the
/// envelope's `meta.error_type`: all four shapes are accepted. `invalid_grant` is its own
/// error because it is the one a retry can never fix.
pub(crate) fn interpret(status: StatusCode, body: &[u8]) -> Result<Granted, TokenError> {
    let value: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(_) if !status.is_success() => {
            return Err(TokenError::Rejected {
                status: status.as_u16(),
                code: None,
            })
        }
        Err(_) => return Err(TokenError::BadAnswer { reason: "not JSON" }),
    };
    let code = error_code(&value);
    if code.as_deref() == Some("invalid_grant") {
        return Err(TokenError::InvalidGrant);
    }
    let meta_status = value
        .pointer("/meta/code")
        .and_then(Value::as_u64)
        .filter(|c| *c >= 400);
    if !status.is_success() || meta_status.is_some() || code.is_some() {
        let status = match meta_status {
            Some(c) if status.is_success() => u16::try_from(c).unwrap_or(u16::MAX),
            _ => status.as_u16(),
        };
        return Err(TokenError::Rejected { status, code });
    }

    let payload = match value.get("response") {
        Some(inner @ Value::Object(_)) => inner,
        _ => &value,
    };
    let access = match payload.get("access_token") {
        Some(Value::String(s)) if super::file::sendable(s) => Secret::new(s.clone()),
        Some(Value::String(s)) if !s.is_empty() => {
            return Err(TokenError::BadAnswer {
                reason: "access_token is too long or holds characters that cannot be sent upstream",
            })
        }
        _ => {
            return Err(TokenError::BadAnswer {
                reason: "no access_token",
            })
        }
    };
    let refresh = match payload.get("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s.clone())),
        _ => None,
    };
    let expires_in = match payload.get("expires_in") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .and_then(|secs| Duration::try_from_secs_f64(secs).ok());
    let scope = match payload.get("scope") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    };
    Ok(Granted {
        access,
        refresh,
        expires_in,
        scope,
    })
}

/// The RFC 6749 `error` or the envelope's `meta.error_type`, if it looks like a code.
/// Anything else (long, odd characters) is dropped: it could echo a credential.
fn error_code(value: &Value) -> Option<String> {
    let raw = value
        .get("error")
        .and_then(Value::as_str)
        .or_else(|| value.pointer("/meta/error_type").and_then(Value::as_str))?;
    let plain = raw.len() <= 64
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    plain.then(|| raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(method: OAuthMethod, url: &str) -> OAuthSettings {
        OAuthSettings {
            token_url: url.to_string(),
            client_id: "cid".to_string(),
            client_secret_env: "UNUSED".to_string(),
            method,
        }
    }

    #[test]
    fn plain_and_enveloped_answers_are_read_alike() {
        let plain = br#"{"access_token":"a1","expires_in":3600,"refresh_token":"r1","scope":"s"}"#;
        let wrapped = br#"{"meta":{"code":200},"response":{"access_token":"a1","expires_in":"3600","refresh_token":"r1","scope":"s"}}"#;
        for body in [&plain[..], &wrapped[..]] {
            let got = interpret(StatusCode::OK, body);
            let Ok(got) = got else {
                panic!(
                    "expected a token from {:?}, saw {got:?}",
                    String::from_utf8_lossy(body)
                );
            };
            assert_eq!(got.access.expose(), "a1", "expected access a1");
            assert_eq!(
                got.refresh.as_ref().map(Secret::expose),
                Some("r1"),
                "expected refresh r1"
            );
            assert_eq!(
                got.expires_in,
                Some(Duration::from_secs(3600)),
                "expected 3600 s"
            );
            assert_eq!(got.scope.as_deref(), Some("s"), "expected scope s");
        }
    }

    #[test]
    fn invalid_grant_is_recognised_in_both_shapes() {
        let rfc = br#"{"error":"invalid_grant","error_description":"used"}"#;
        let envelope = br#"{"meta":{"code":400,"error_type":"invalid_grant","error_message":"x"}}"#;
        for body in [&rfc[..], &envelope[..]] {
            let got = interpret(StatusCode::BAD_REQUEST, body);
            assert!(
                matches!(got, Err(TokenError::InvalidGrant)),
                "expected InvalidGrant, saw {got:?}"
            );
        }
    }

    #[test]
    fn other_failures_are_rejections_without_echoing_text() {
        let got = interpret(StatusCode::SERVICE_UNAVAILABLE, b"<html>down</html>");
        assert!(
            matches!(
                got,
                Err(TokenError::Rejected {
                    status: 503,
                    code: None
                })
            ),
            "expected a 503 rejection, saw {got:?}"
        );
        let echo = br#"{"error":"token abc-secret-value is bad"}"#;
        let got = interpret(StatusCode::BAD_REQUEST, echo);
        let text = format!("{:?}", got.as_ref().err());
        assert!(
            !text.contains("abc-secret-value"),
            "expected the odd error text to be dropped, saw {text}"
        );
        let got = interpret(
            StatusCode::OK,
            br#"{"meta":{"code":401,"error_type":"invalid_client"}}"#,
        );
        assert!(
            matches!(got, Err(TokenError::Rejected { status: 401, .. })),
            "expected an enveloped 401 to be a rejection, saw {got:?}"
        );
        for bad in [
            &br#"{"access_token":"a b","expires_in":60}"#[..],
            br#"{"access_token":"a\u0000b","expires_in":60}"#,
            br#"{"access_token":"a\u00e8b","expires_in":60}"#,
        ] {
            let got = interpret(StatusCode::OK, bad);
            assert!(
                matches!(got, Err(TokenError::BadAnswer { .. })),
                "expected an access token that cannot be sent refused, saw {got:?}"
            );
        }
        let got = interpret(StatusCode::OK, br#"{"token_type":"bearer"}"#);
        assert!(
            matches!(got, Err(TokenError::BadAnswer { .. })),
            "expected an answer without access_token to be refused, saw {got:?}"
        );
    }

    #[test]
    fn post_sends_a_form_and_get_sends_query_parameters() {
        let secret = Secret::new("shh/+".to_string());
        let refresh = Secret::new("r 1".to_string());
        let post = settings(OAuthMethod::Post, "https://app.example/oauth/access_token/");
        let req = build_request(&post, &secret, &Grant::Refresh(&refresh));
        let Ok(req) = req else {
            panic!("expected a POST request, saw {:?}", req.err());
        };
        assert_eq!(req.method(), Method::POST, "expected POST");
        assert_eq!(
            req.headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/x-www-form-urlencoded"[..]),
            "expected a form content type"
        );
        assert_eq!(req.uri().query(), None, "expected no query on POST");

        let get = settings(
            OAuthMethod::Get,
            "https://app.example/oauth/access_token/?x=1",
        );
        let code = Grant::Code {
            code: "c0de",
            redirect_uri: Some("https://me.example/cb"),
        };
        let req = build_request(&get, &secret, &code);
        let Ok(req) = req else {
            panic!("expected a GET request, saw {:?}", req.err());
        };
        assert_eq!(req.method(), Method::GET, "expected GET");
        let query = req.uri().query().unwrap_or_default();
        let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        let want = [
            ("x", "1"),
            ("grant_type", "authorization_code"),
            ("code", "c0de"),
            ("redirect_uri", "https://me.example/cb"),
            ("client_id", "cid"),
            ("client_secret", "shh/+"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs, want, "expected the grant as query parameters");
    }

    #[test]
    fn a_token_url_that_is_not_http_is_refused() {
        let secret = Secret::new("s".to_string());
        let refresh = Secret::new("r".to_string());
        for url in ["ftp://x/y", "not a url", "/relative"] {
            let got = build_request(
                &settings(OAuthMethod::Post, url),
                &secret,
                &Grant::Refresh(&refresh),
            );
            assert!(
                matches!(got, Err(TokenError::BadTokenUrl)),
                "expected BadTokenUrl for {url:?}, saw {:?}",
                got.map(|_| "a request")
            );
        }
    }
}
