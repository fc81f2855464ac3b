//! Reading Query API answers by path. Elements are matched by local name
//! along an explicit path from the root, never by searching the whole
//! tree for a tag: IAM answers nest `Roles/member/Arn` inside each
//! profile, and only the profile's own `Arn` may be taken.

use roxmltree::{Document, Node, ParsingOptions};

use super::AwsError;

/// Node limit of one answer: a DescribeInstances page of 1000 instances
/// stays far below it, a hostile answer cannot make the parser grow.
const NODES_LIMIT: u32 = 2_000_000;

/// Parses an answer (no DTD, bounded size).
pub(super) fn parse(text: &str) -> Result<Document<'_>, AwsError> {
    let opts = ParsingOptions {
        allow_dtd: false,
        nodes_limit: NODES_LIMIT,
    };
    Document::parse_with_options(text, opts).map_err(|e| {
        AwsError::Unavailable(format!("AWS answered with XML that does not parse: {e}"))
    })
}

/// The element child of `n` called `name` (the first one).
pub(super) fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

/// The element reached from `n` by following `path`.
pub(super) fn at<'a, 'i>(n: Node<'a, 'i>, path: &[&str]) -> Option<Node<'a, 'i>> {
    path.iter().try_fold(n, |n, name| child(n, name))
}

/// The element children of `n` called `name`.
pub(super) fn all<'a, 'i: 'a>(
    n: Node<'a, 'i>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'i>> + 'a {
    n.children()
        .filter(move |c| c.is_element() && c.tag_name().name() == name)
}

/// The trimmed text at `path` below `n`; `None` when the element is
/// missing or empty (AWS writes `<dnsName/>` for "none").
pub(super) fn text<'a>(n: Node<'a, '_>, path: &[&str]) -> Option<&'a str> {
    at(n, path)
        .and_then(|e| e.text())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// An AWS error answer: EC2 writes
/// `<Response><Errors><Error><Code/><Message/></Error></Errors>…`,
/// IAM and STS `<ErrorResponse><Error><Code/><Message/></Error>…`
/// (moto's authentication errors: `ErrorResponse/Errors/Error`).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ErrorXml {
    pub code: String,
    pub message: String,
}

pub(super) fn error(body: &str) -> Option<ErrorXml> {
    let doc = parse(body).ok()?;
    let root = doc.root_element();
    let err = match root.tag_name().name() {
        "Response" => at(root, &["Errors", "Error"])?,
        // moto writes `ErrorResponse/Errors/Error` for its auth errors.
        "ErrorResponse" => child(root, "Error").or_else(|| at(root, &["Errors", "Error"]))?,
        _ => return None,
    };
    let code = text(err, &["Code"])?.to_owned();
    let message = text(err, &["Message"]).unwrap_or("").to_owned();
    Some(ErrorXml { code, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_shapes() {
        let ec2 = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-0123456789abcdef0' does not exist</Message></Error></Errors><RequestID>59dbff89-35bd-4eac-99ed-be587EXAMPLE</RequestID></Response>";
        assert_eq!(
            error(ec2),
            Some(ErrorXml {
                code: "InvalidInstanceID.NotFound".into(),
                message: "The instance ID 'i-0123456789abcdef0' does not exist".into()
            })
        );
        let iam = "<ErrorResponse xmlns=\"https://iam.amazonaws.com/doc/2010-05-08/\"><Error><Type>Sender</Type><Code>NoSuchEntity</Code><Message>The role with name x cannot be found.</Message></Error><RequestId>1</RequestId></ErrorResponse>";
        assert_eq!(error(iam).unwrap().code, "NoSuchEntity");
        let moto = "<ErrorResponse><Errors><Error><Code>AuthFailure</Code><Message>AWS was not able to validate the provided access credentials</Message><Type>Sender</Type></Error></Errors></ErrorResponse>";
        assert_eq!(error(moto).unwrap().code, "AuthFailure");
        assert_eq!(error("<html><body>502 Bad Gateway</body></html>"), None);
        assert_eq!(error("not xml"), None);
        assert_eq!(
            error("<Response><Errors><Error><Message>m</Message></Error></Errors></Response>"),
            None
        );
    }

    #[test]
    fn dtd_is_refused() {
        let bomb = "<?xml version=\"1.0\"?><!DOCTYPE r [<!ENTITY a \"aaaa\">]><r>&a;</r>";
        assert!(parse(bomb).is_err());
    }
}
