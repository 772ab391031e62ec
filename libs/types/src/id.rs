//! Ids that arrive from the wire, parsed once into types that can only hold
//! a valid value. Ids end up in file paths (an agent's instance files, a
//! process's log), URLs and store keys, so nothing takes a bare string id
//! past the boundary: `../../etc/passwd` is refused where it enters, with the
//! field named, and never reaches a path.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Longest instance id: an app name (63) plus `-` and a random suffix.
pub const MAX_INSTANCE_ID_LEN: usize = 80;
pub const MAX_KEY_NAME_LEN: usize = 64;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses `text`; the error names `field`.
            pub fn parse(field: &str, text: &str) -> Result<Self, Error> {
                $check(text).map_err(|reason| Error::invalid(field, reason))?;
                Ok($name(text.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;

            fn try_from(text: String) -> Result<Self, String> {
                $check(&text)?;
                Ok($name(text))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl From<&$name> for String {
            fn from(id: &$name) -> String {
                id.0.clone()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// An app's name: a DNS label.
    AppName,
    crate::spec::check_dns_label
);
/// The most apps one request may name (`ListEndpoints`, `Sync`).
pub const MAX_NAMED_APPS: usize = 1_000;

impl AppName {
    /// `names` as a set of app names (repeats once); the error names
    /// `field`: too many names, or the first that is not an app name.
    pub fn parse_list(
        field: &str,
        names: &[String],
    ) -> Result<std::collections::BTreeSet<AppName>, Error> {
        if names.len() > MAX_NAMED_APPS {
            return Err(Error::invalid(
                field,
                format!("at most {MAX_NAMED_APPS} apps, not {}", names.len()),
            ));
        }
        names
            .iter()
            .map(|name| AppName::parse(field, name))
            .collect()
    }
}

id_type!(
    /// A project's name: a DNS label. Apps, and the keys of people who may
    /// touch them, belong to one.
    ProjectName,
    crate::spec::check_dns_label
);
id_type!(
    /// A node's id: a DNS label.
    NodeId,
    crate::spec::check_dns_label
);
id_type!(
    /// An instance's id: lowercase letters, digits and `-`, at most
    /// [`MAX_INSTANCE_ID_LEN`] characters (`web-3f9c2a1b`).
    InstanceId,
    check_instance_id
);
id_type!(
    /// An API key's name: letters, digits, `.`, `_`, `@` and `-`, starting
    /// with a letter or digit, at most [`MAX_KEY_NAME_LEN`] characters.
    KeyName,
    check_key_name
);

fn check_instance_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_INSTANCE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not an instance id: use 1-{MAX_INSTANCE_ID_LEN} lowercase letters, digits and `-`",
            shorten(id)
        ))
    }
}

fn check_key_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= MAX_KEY_NAME_LEN
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a key name: use 1-{MAX_KEY_NAME_LEN} letters, digits, `.`, `_`, `@` and `-`, starting with a letter or digit",
            shorten(name)
        ))
    }
}

/// Echoes at most 100 characters of a rejected value back.
pub(crate) fn shorten(text: &str) -> String {
    match text.char_indices().nth(100) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_refuse_paths_and_name_the_field() {
        for bad in ["", "../../etc", "a/b", "..", "A", "-a", "a-", "a b", "a\0b"] {
            let error = InstanceId::parse("instance_id", bad).unwrap_err();
            assert!(error.to_string().contains("instance_id:"), "{error}");
            assert!(NodeId::parse("node_id", bad).is_err(), "{bad:?}");
            assert!(AppName::parse("name", bad).is_err(), "{bad:?}");
        }
        assert!(KeyName::parse("name", "../x").is_err());
        let apps =
            AppName::parse_list("apps", &["web".into(), "api".into(), "web".into()]).unwrap();
        assert_eq!(apps.len(), 2);
        let error = AppName::parse_list("apps", &["web".into(), "../x".into()]).unwrap_err();
        assert!(error.to_string().contains("apps:"), "{error}");
        let many: Vec<String> = (0..=MAX_NAMED_APPS).map(|i| format!("a{i}")).collect();
        let error = AppName::parse_list("apps", &many).unwrap_err();
        assert!(error.to_string().contains("1001"), "{error}");
        assert!(InstanceId::parse("id", &"a".repeat(81)).is_err());
        assert!(KeyName::parse("name", &"a".repeat(65)).is_err());
        let id = InstanceId::parse("id", &format!("{}-3f9c2a1b", "a".repeat(63))).unwrap();
        assert_eq!(id.len(), 72);
        assert_eq!(
            KeyName::parse("name", "ci.bot@team-a").unwrap().as_str(),
            "ci.bot@team-a"
        );
    }

    #[test]
    fn ids_validate_when_deserialized() {
        assert!(serde_json::from_str::<InstanceId>("\"../x\"").is_err());
        let id: InstanceId = serde_json::from_str("\"web-1\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"web-1\"");
    }

    #[test]
    fn long_rejected_values_are_shortened() {
        let error = InstanceId::parse("id", &"x/".repeat(5000)).unwrap_err();
        assert!(error.to_string().len() < 400);
    }
}
