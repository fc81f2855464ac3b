//! Sending one signed Query API call: timeouts, bounded retries with
//! jittered backoff, and the classification of what came back.
//!
//! Classification (what the broker makes of an answer):
//!
//! | answer | error | retried |
//! |---|---|---|
//! | 2xx | (the XML is the result) | |
//! | `InvalidInstanceID.NotFound` / `.Malformed` | `Api`, which `describe_instance` turns into `None` | no |
//! | our credentials or rights refused: `AuthFailure`, `SignatureDoesNotMatch`, `InvalidClientTokenId`, `UnauthorizedOperation`, `AccessDenied`, … | `Unavailable` | no |
//! | throttling (`Throttling`, `RequestLimitExceeded`, …, or HTTP 429) | `Unavailable` | yes, even for calls that change state: AWS did not run them |
//! | `ExpiredToken` | `Unavailable` | yes, with fresh credentials |
//! | HTTP 5xx, `InternalError`, `ServiceUnavailable`, … | `Unavailable` | read-only calls only |
//! | connection refused or failed | `Unavailable` | yes |
//! | timeout, broken answer | `Unavailable` | read-only calls only |
//! | an answer that is not AWS error XML (a proxy's page), a redirect | `Unavailable` | 5xx: read-only calls only |
//! | any other 4xx AWS error | `Api { code, message }` | no |
//!
//! `Unavailable` means "could not check": the broker answers
//! `unavailable`, never `denied`, for it.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use tracing::{debug, warn};

use super::credentials::CredentialsProvider;
use super::sigv4::{self, FORM, Scope};
use super::{AwsError, xml};

/// Largest answer read; a DescribeInstances page of one instance is a few
/// KiB.
const MAX_ANSWER: usize = 8 << 20;
/// First backoff step; attempt n waits a random time in
/// [step·2ⁿ/2, step·2ⁿ].
const BACKOFF_STEP: Duration = Duration::from_millis(200);
/// AWS messages are cut to this many characters in our errors.
const MAX_MESSAGE: usize = 300;

/// Where one call goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target<'a> {
    pub url: &'a str,
    pub region: &'a str,
    pub service: &'a str,
    pub action: &'a str,
}

#[derive(Debug)]
pub(super) struct Transport {
    http: reqwest::Client,
    retries: u32,
}

/// Whether a failed attempt may be repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// AWS did not act on the request (not connected, throttled).
    Always,
    /// AWS may have acted: only calls that change nothing.
    IfIdempotent,
    /// Repeating cannot help.
    Never,
    /// Our temporary credentials expired: fetch new ones, then retry.
    WithNewCredentials,
}

#[derive(Debug)]
struct Failure {
    error: AwsError,
    retry: Retry,
}

impl Transport {
    pub(super) fn new(
        connect_timeout: Duration,
        request_timeout: Duration,
        retries: u32,
    ) -> Result<Transport, AwsError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("p11shim-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AwsError::Config(format!("HTTP client: {e}")))?;
        Ok(Transport { http, retries })
    }

    /// Sends `body` to `target`, signed with the provider's current
    /// credentials, retrying as the table in the module header says.
    pub(super) async fn call(
        &self,
        credentials: &CredentialsProvider,
        target: &Target<'_>,
        body: Vec<u8>,
        idempotent: bool,
    ) -> Result<String, AwsError> {
        let mut attempt = 0u32;
        loop {
            let failure = match self.attempt(credentials, target, &body).await {
                Ok(xml) => return Ok(xml),
                Err(f) => f,
            };
            let retry = attempt < self.retries
                && match failure.retry {
                    Retry::Always | Retry::WithNewCredentials => true,
                    Retry::IfIdempotent => idempotent,
                    Retry::Never => false,
                };
            if !retry {
                return Err(failure.error);
            }
            if failure.retry == Retry::WithNewCredentials {
                credentials.invalidate().await;
            }
            let wait = backoff(attempt);
            debug!(service = target.service, action = target.action, attempt, error = %failure.error, ?wait, "AWS call retried");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn attempt(
        &self,
        provider: &CredentialsProvider,
        target: &Target<'_>,
        body: &[u8],
    ) -> Result<String, Failure> {
        let credentials = provider.credentials().await.map_err(|error| Failure {
            error,
            retry: Retry::Never,
        })?;
        let signed = sigv4::sign_post(
            &credentials,
            Scope {
                url: target.url,
                region: target.region,
                service: target.service,
            },
            &[("content-type", FORM)],
            body,
            SystemTime::now(),
        )
        .map_err(|error| Failure {
            error,
            retry: Retry::Never,
        })?;
        drop(credentials);
        let mut request = self
            .http
            .post(target.url)
            .header(reqwest::header::CONTENT_TYPE, FORM)
            .body(body.to_vec());
        for (name, value) in signed {
            request = request.header(name, value);
        }
        let mut response = request.send().await.map_err(|e| network(target, &e))?;
        let status = response.status();
        let mut answer = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| network(target, &e))? {
            if answer.len() + chunk.len() > MAX_ANSWER {
                return Err(Failure {
                    error: AwsError::Unavailable(format!(
                        "{}: answer larger than {MAX_ANSWER} bytes",
                        describe(target)
                    )),
                    retry: Retry::Never,
                });
            }
            answer.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(answer).map_err(|_| Failure {
            error: AwsError::Unavailable(format!("{}: answer is not UTF-8", describe(target))),
            retry: Retry::IfIdempotent,
        })?;
        if status.is_success() {
            return Ok(text);
        }
        let failure = classify(status, &text, target);
        if failure.retry == Retry::Never && matches!(failure.error, AwsError::Unavailable(_)) {
            warn!(service = target.service, action = target.action, error = %failure.error, "AWS refused the broker's call");
        }
        Err(failure)
    }
}

fn describe(target: &Target<'_>) -> String {
    format!("{} {} at {}", target.service, target.action, target.url)
}

fn network(target: &Target<'_>, e: &reqwest::Error) -> Failure {
    // The request never left when the connection failed; a timeout or a
    // broken answer leaves it open whether AWS acted.
    let (what, retry) = if e.is_connect() {
        ("cannot connect", Retry::Always)
    } else if e.is_timeout() {
        ("timed out", Retry::IfIdempotent)
    } else {
        ("failed", Retry::IfIdempotent)
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    let detail = if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    };
    Failure {
        error: AwsError::Unavailable(format!("{}: {what}{detail}", describe(target))),
        retry,
    }
}

/// Our own credentials or rights were refused: the broker cannot check.
fn is_refusal(code: &str) -> bool {
    matches!(
        code,
        "AuthFailure"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "InvalidClientTokenId"
            | "InvalidAccessKeyId"
            | "UnrecognizedClientException"
            | "MissingAuthenticationToken"
            | "MissingAuthenticationTokenException"
            | "InvalidToken"
            | "UnauthorizedOperation"
            | "AccessDenied"
            | "AccessDeniedException"
            | "RequestExpired"
            | "OptInRequired"
            | "Blocked"
            | "PendingVerification"
    )
}

fn is_expired_token(code: &str) -> bool {
    matches!(code, "ExpiredToken" | "ExpiredTokenException")
}

fn is_throttling(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "BandwidthLimitExceeded"
            | "EC2ThrottledException"
            | "SlowDown"
            | "PriorRequestNotComplete"
    )
}

fn is_server_fault(code: &str) -> bool {
    matches!(
        code,
        "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "Unavailable"
            | "ServiceFailure"
    )
}

fn classify(status: StatusCode, body: &str, target: &Target<'_>) -> Failure {
    let Some(err) = xml::error(body) else {
        let retry = if status.is_server_error() {
            Retry::IfIdempotent
        } else if status == StatusCode::TOO_MANY_REQUESTS {
            Retry::Always
        } else {
            Retry::Never
        };
        return Failure {
            error: AwsError::Unavailable(format!(
                "{}: HTTP {status} without an AWS error",
                describe(target)
            )),
            retry,
        };
    };
    let message: String = err.message.chars().take(MAX_MESSAGE).collect();
    let code = err.code;
    let unavailable = |retry| Failure {
        error: AwsError::Unavailable(format!(
            "{}: {code} (HTTP {}): {message}",
            describe(target),
            status.as_u16()
        )),
        retry,
    };
    if is_throttling(&code) || status == StatusCode::TOO_MANY_REQUESTS {
        unavailable(Retry::Always)
    } else if is_expired_token(&code) {
        unavailable(Retry::WithNewCredentials)
    } else if is_refusal(&code) {
        unavailable(Retry::Never)
    } else if status.is_server_error() || is_server_fault(&code) {
        unavailable(Retry::IfIdempotent)
    } else {
        Failure {
            error: AwsError::Api { code, message },
            retry: Retry::Never,
        }
    }
}

/// Full-jitter-ish exponential backoff: a random time in the upper half
/// of `BACKOFF_STEP · 2^attempt`.
fn backoff(attempt: u32) -> Duration {
    let cap = BACKOFF_STEP * 2u32.saturating_pow(attempt.min(6));
    let half = cap / 2;
    let r = getrandom::u32().unwrap_or(u32::MAX);
    half + half.mul_f64(f64::from(r) / f64::from(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Target<'static> = Target {
        url: "https://ec2.us-east-1.amazonaws.com/",
        region: "us-east-1",
        service: "ec2",
        action: "DescribeInstances",
    };

    fn ec2_error(code: &str) -> String {
        format!(
            "<Response><Errors><Error><Code>{code}</Code><Message>m</Message></Error></Errors><RequestID>r</RequestID></Response>"
        )
    }

    #[test]
    fn classification() {
        let c = |status: u16, code: &str| {
            classify(StatusCode::from_u16(status).unwrap(), &ec2_error(code), &T)
        };
        let f = c(400, "InvalidInstanceID.NotFound");
        assert!(
            matches!(f.error, AwsError::Api { ref code, .. } if code == "InvalidInstanceID.NotFound")
        );
        assert_eq!(f.retry, Retry::Never);
        for code in [
            "AuthFailure",
            "SignatureDoesNotMatch",
            "InvalidClientTokenId",
            "UnauthorizedOperation",
            "AccessDenied",
        ] {
            let f = c(403, code);
            assert!(matches!(f.error, AwsError::Unavailable(_)), "{code}");
            assert_eq!(f.retry, Retry::Never, "{code}");
        }
        let f = c(503, "RequestLimitExceeded");
        assert!(matches!(f.error, AwsError::Unavailable(_)));
        assert_eq!(f.retry, Retry::Always);
        let f = c(500, "InternalError");
        assert_eq!(f.retry, Retry::IfIdempotent);
        let f = c(400, "ExpiredToken");
        assert_eq!(f.retry, Retry::WithNewCredentials);
        let f = classify(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>", &T);
        assert!(matches!(f.error, AwsError::Unavailable(_)));
        assert_eq!(f.retry, Retry::IfIdempotent);
        let f = classify(StatusCode::FORBIDDEN, "Forbidden", &T);
        assert!(matches!(f.error, AwsError::Unavailable(_)));
        assert_eq!(f.retry, Retry::Never);
        let iam = "<ErrorResponse><Error><Type>Sender</Type><Code>NoSuchEntity</Code><Message>no role</Message></Error></ErrorResponse>";
        assert!(
            matches!(classify(StatusCode::NOT_FOUND, iam, &T).error, AwsError::Api { ref code, .. } if code == "NoSuchEntity")
        );
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        for attempt in 0..4 {
            let cap = BACKOFF_STEP * 2u32.pow(attempt);
            let b = backoff(attempt);
            assert!(b >= cap / 2 && b <= cap, "{attempt}: {b:?}");
        }
        assert!(backoff(40) <= BACKOFF_STEP * 64);
    }
}
