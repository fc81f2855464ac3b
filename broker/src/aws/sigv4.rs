//! SigV4 signing of one Query API request (a form-encoded POST), with the
//! `aws-sigv4` crate: the signature goes into headers, the body is hashed
//! as sent.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use http::{HeaderName, HeaderValue};

use super::AwsError;

/// The content type of every Query API request.
pub(super) const FORM: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// What to sign: the request's URL (with its host, which is signed),
/// region and service of the credential scope.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scope<'a> {
    pub url: &'a str,
    pub region: &'a str,
    pub service: &'a str,
}

/// Signs a POST of `body` with the headers `headers` (which are signed
/// too) and returns the headers to add: `authorization`, `x-amz-date`
/// and, with a session token, `x-amz-security-token` (marked sensitive,
/// so that no HTTP debug output shows it).
pub(super) fn sign_post(
    credentials: &Credentials,
    scope: Scope<'_>,
    headers: &[(&str, &str)],
    body: &[u8],
    time: SystemTime,
) -> Result<Vec<(HeaderName, HeaderValue)>, AwsError> {
    let identity: Identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(scope.region)
        .name(scope.service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| AwsError::Config(format!("signing parameters: {e}")))?
        .into();
    let request = SignableRequest::new(
        "POST",
        scope.url,
        headers.iter().copied(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| AwsError::Config(format!("cannot sign a request to {}: {e}", scope.url)))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| AwsError::Config(format!("signing: {e}")))?
        .into_parts();
    let (signed, _params) = instructions.into_parts();
    signed
        .into_iter()
        .map(|h| {
            let name = HeaderName::from_static(h.name());
            let mut value = HeaderValue::from_str(h.value()).map_err(|_| {
                AwsError::Config(format!(
                    "the signed header {} is not a header value",
                    h.name()
                ))
            })?;
            value.set_sensitive(h.sensitive());
            Ok((name, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn creds(token: Option<&str>) -> Credentials {
        Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            token.map(str::to_owned),
            None,
            "test",
        )
    }

    /// 2015-08-30T12:36:00Z, the date of AWS's SigV4 test suite.
    fn suite_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn header<'a>(h: &'a [(HeaderName, HeaderValue)], name: &str) -> Option<&'a HeaderValue> {
        h.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// AWS SigV4 test suite, `post-x-www-form-urlencoded`.
    #[test]
    fn aws_test_vector_form_post() {
        let h = sign_post(
            &creds(None),
            Scope {
                url: "https://example.amazonaws.com/",
                region: "us-east-1",
                service: "service",
            },
            &[("content-type", "application/x-www-form-urlencoded")],
            b"Param1=value1",
            suite_time(),
        )
        .unwrap();
        assert_eq!(
            header(&h, "authorization").unwrap(),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a"
        );
        assert_eq!(header(&h, "x-amz-date").unwrap(), "20150830T123600Z");
        assert!(header(&h, "x-amz-security-token").is_none());
    }

    #[test]
    fn session_token_is_signed_and_sensitive() {
        let h = sign_post(
            &creds(Some("session-token-value")),
            Scope {
                url: "http://127.0.0.1:5000/",
                region: "eu-west-1",
                service: "ec2",
            },
            &[("content-type", FORM)],
            b"Action=DescribeInstances&Version=2016-11-15",
            suite_time(),
        )
        .unwrap();
        let auth = header(&h, "authorization").unwrap().to_str().unwrap();
        assert!(
            auth.contains("/20150830/eu-west-1/ec2/aws4_request"),
            "{auth}"
        );
        assert!(
            auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token"),
            "{auth}"
        );
        let token = header(&h, "x-amz-security-token").unwrap();
        assert!(token.is_sensitive());
        assert!(!format!("{h:?}").contains("session-token-value"));
    }
}
