//! IAM `ListInstanceProfilesForRole`: the ARNs of the profiles that hold
//! a role, one page at a time.

use super::AwsError;
use super::xml::{all, at, parse, text};

/// Pages read before giving up (with AWS's page size of 100, 10000
/// profiles: far more than one role is ever in).
pub(super) const MAX_PAGES: usize = 100;

/// IAM role names: 1–64 of `[A-Za-z0-9+=,.@_-]`.
pub(super) fn is_role_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

#[derive(Debug)]
pub(super) struct Page {
    pub arns: Vec<String>,
    /// Set when `IsTruncated` is true: the `Marker` of the next page.
    pub marker: Option<String>,
}

/// Reads `ListInstanceProfilesForRoleResponse/
/// ListInstanceProfilesForRoleResult/InstanceProfiles/member/Arn`; the
/// nested `Roles/member/Arn` of each profile is not a profile.
pub(super) fn parse_profiles_for_role(xml: &str) -> Result<Page, AwsError> {
    let doc = parse(xml)?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListInstanceProfilesForRoleResponse" {
        return Err(malformed(format!(
            "root element is <{}>",
            root.tag_name().name()
        )));
    }
    let result = at(root, &["ListInstanceProfilesForRoleResult"])
        .ok_or_else(|| malformed("ListInstanceProfilesForRoleResult is missing".into()))?;
    let mut arns = Vec::new();
    if let Some(list) = at(result, &["InstanceProfiles"]) {
        for m in all(list, "member") {
            let arn = text(m, &["Arn"]).ok_or_else(|| malformed("a profile has no Arn".into()))?;
            if !arn.starts_with("arn:") || !arn.contains(":instance-profile/") {
                return Err(malformed(format!("'{arn}' is not an instance profile ARN")));
            }
            arns.push(arn.to_owned());
        }
    }
    let truncated = match text(result, &["IsTruncated"]) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(malformed(format!("IsTruncated '{other}'"))),
    };
    let marker = match (truncated, text(result, &["Marker"])) {
        (false, _) => None,
        (true, Some(m)) => Some(m.to_owned()),
        (true, None) => return Err(malformed("IsTruncated without a Marker".into())),
    };
    Ok(Page { arns, marker })
}

fn malformed(what: String) -> AwsError {
    AwsError::Unavailable(format!("ListInstanceProfilesForRole answer: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"<ListInstanceProfilesForRoleResponse xmlns="https://iam.amazonaws.com/doc/2010-05-08/">
  <ListInstanceProfilesForRoleResult>
    <IsTruncated>true</IsTruncated>
    <Marker>page-2</Marker>
    <InstanceProfiles>
      <member>
        <InstanceProfileId>AIPACIFN4OZXG7EXAMPLE</InstanceProfileId>
        <Roles>
          <member>
            <Path>/</Path>
            <Arn>arn:aws:iam::123456789012:role/hsm-client</Arn>
            <RoleName>hsm-client</RoleName>
          </member>
        </Roles>
        <InstanceProfileName>hsm-client-profile</InstanceProfileName>
        <Path>/</Path>
        <Arn>arn:aws:iam::123456789012:instance-profile/hsm-client-profile</Arn>
      </member>
    </InstanceProfiles>
  </ListInstanceProfilesForRoleResult>
  <ResponseMetadata><RequestId>6a8c3992-99f4-11e1-a4c3-27EXAMPLE804</RequestId></ResponseMetadata>
</ListInstanceProfilesForRoleResponse>"#;

    #[test]
    fn the_profile_arn_not_the_nested_role_arn() {
        let p = parse_profiles_for_role(PAGE).unwrap();
        assert_eq!(
            p.arns,
            ["arn:aws:iam::123456789012:instance-profile/hsm-client-profile"]
        );
        assert_eq!(p.marker.as_deref(), Some("page-2"));
    }

    #[test]
    fn last_page_and_broken_pages() {
        let last = PAGE.replace(
            "<IsTruncated>true</IsTruncated>",
            "<IsTruncated>false</IsTruncated>",
        );
        assert_eq!(parse_profiles_for_role(&last).unwrap().marker, None);
        let no_marker = PAGE.replace("<Marker>page-2</Marker>", "");
        assert!(parse_profiles_for_role(&no_marker).is_err());
        // A role ARN where the profile's own Arn should be is refused.
        let swapped = PAGE.replace(
            "<Arn>arn:aws:iam::123456789012:instance-profile/hsm-client-profile</Arn>",
            "<Arn>arn:aws:iam::123456789012:role/other</Arn>",
        );
        assert!(parse_profiles_for_role(&swapped).is_err());
        // A profile with no Arn of its own: the nested role Arn is not taken.
        let missing = PAGE.replace(
            "<Arn>arn:aws:iam::123456789012:instance-profile/hsm-client-profile</Arn>",
            "",
        );
        assert!(parse_profiles_for_role(&missing).is_err());
    }

    #[test]
    fn role_names() {
        assert!(is_role_name("hsm-client"));
        assert!(is_role_name("a+b=c,d.e@f_g"));
        assert!(!is_role_name(""));
        assert!(!is_role_name("a/b"));
        assert!(!is_role_name(&"a".repeat(65)));
    }
}
