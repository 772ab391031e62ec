//! Placement constraints: `ATTRIBUTE OP VALUE`, parsed once and evaluated
//! against a node's attributes.
//!
//! | operator | meaning | missing attribute |
//! |---|---|---|
//! | `==`, `!=` | string equality | `==` fails, `!=` holds |
//! | `=~`, `!~` | regular expression (unanchored; use `^…$`) | `=~` fails, `!~` holds |
//! | `in`, `not in` | set membership: `zone in [eu, us]` | `in` fails, `not in` holds |
//! | `>=`, `>`, `<=`, `<` | version comparison: `5.10 > 5.9` | fails |
//!
//! A negative operator holds on a node without the attribute: "not in zone
//! eu" is true of a node that has no zone.

use std::cmp::Ordering;
use std::fmt;

use regex::Regex;

/// The attribute every node has: its id. Constraints on it are checked per
/// node, never cached per node class.
pub const NODE_ID: &str = "node.id";

const MAX_REGEX_BYTES: usize = 1 << 16;

#[derive(Debug, Clone)]
pub enum Op {
    Eq(String),
    Ne(String),
    Matches(Regex),
    NotMatches(Regex),
    In(Vec<String>),
    NotIn(Vec<String>),
    Version(Ordering, bool, Version),
}

#[derive(Debug, Clone)]
pub struct Constraint {
    pub attribute: String,
    pub op: Op,
}

impl Constraint {
    /// Parses `zone == eu`, `kernel.version >= 5.10`, `zone in [eu, us]`...
    /// The error says what is wrong in words a spec author can act on.
    pub fn parse(text: &str) -> Result<Constraint, String> {
        let text = text.trim();
        let (attribute, rest) = text
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("`{text}` must be `ATTRIBUTE OP VALUE`, like `zone == eu`"))?;
        if attribute.is_empty()
            || !attribute
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
        {
            return Err(format!(
                "`{attribute}` is not an attribute name (letters, digits, `.`, `_`, `-`, `/`)"
            ));
        }
        let rest = rest.trim_start();
        let (op, value) = if let Some(value) = rest.strip_prefix("not in ") {
            ("not in", value)
        } else if let Some(value) = rest.strip_prefix("in ") {
            ("in", value)
        } else {
            rest.split_once(char::is_whitespace).ok_or_else(|| {
                format!("`{text}` must be `ATTRIBUTE OP VALUE`, like `zone == eu`")
            })?
        };
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("`{text}` has no value after `{op}`"));
        }
        let regex = |pattern: &str| {
            regex::RegexBuilder::new(pattern)
                .size_limit(MAX_REGEX_BYTES)
                .build()
                .map_err(|e| format!("`{pattern}` is not a valid regular expression: {e}"))
        };
        let version = |ordering: Ordering, or_equal: bool| {
            Version::parse(value)
                .map(|v| Op::Version(ordering, or_equal, v))
                .ok_or_else(|| format!("`{value}` is not a version like `5.10` or `1.2.3`"))
        };
        let op = match op {
            "==" | "=" => Op::Eq(value.to_string()),
            "!=" => Op::Ne(value.to_string()),
            "=~" => Op::Matches(regex(value)?),
            "!~" => Op::NotMatches(regex(value)?),
            "in" => Op::In(parse_set(value)?),
            "not in" => Op::NotIn(parse_set(value)?),
            ">=" => version(Ordering::Greater, true)?,
            ">" => version(Ordering::Greater, false)?,
            "<=" => version(Ordering::Less, true)?,
            "<" => version(Ordering::Less, false)?,
            other => {
                return Err(format!(
                    "unknown operator `{other}`: use ==, !=, =~, !~, in, not in, >=, >, <= or <"
                ));
            }
        };
        Ok(Constraint {
            attribute: attribute.to_string(),
            op,
        })
    }

    /// Whether a node whose value for the attribute is `value` satisfies it.
    pub fn holds(&self, value: Option<&str>) -> bool {
        match (&self.op, value) {
            (Op::Eq(want), Some(v)) => v == want,
            (Op::Ne(want), Some(v)) => v != want,
            (Op::Matches(re), Some(v)) => re.is_match(v),
            (Op::NotMatches(re), Some(v)) => !re.is_match(v),
            (Op::In(set), Some(v)) => set.iter().any(|s| s == v),
            (Op::NotIn(set), Some(v)) => !set.iter().any(|s| s == v),
            (Op::Version(ordering, or_equal, want), Some(v)) => match Version::parse(v) {
                Some(have) => {
                    let cmp = have.cmp(want);
                    cmp == *ordering || (*or_equal && cmp == Ordering::Equal)
                }
                None => false,
            },
            (Op::Ne(_) | Op::NotMatches(_) | Op::NotIn(_), None) => true,
            (_, None) => false,
        }
    }

    pub fn is_per_node(&self) -> bool {
        self.attribute == NODE_ID
    }
}

fn parse_set(value: &str) -> Result<Vec<String>, String> {
    let inner = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    let items: Vec<String> = inner
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Err(format!(
            "`{value}` must list at least one value, like `[eu, us]`"
        ));
    }
    Ok(items)
}

/// Two constraints are equal when they read the same: `Display` is the
/// canonical text, and regexes compare by their source.
impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Constraint {}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.attribute;
        match &self.op {
            Op::Eq(v) => write!(f, "{a} == {v}"),
            Op::Ne(v) => write!(f, "{a} != {v}"),
            Op::Matches(re) => write!(f, "{a} =~ {}", re.as_str()),
            Op::NotMatches(re) => write!(f, "{a} !~ {}", re.as_str()),
            Op::In(set) => write!(f, "{a} in [{}]", set.join(", ")),
            Op::NotIn(set) => write!(f, "{a} not in [{}]", set.join(", ")),
            Op::Version(ordering, or_equal, v) => {
                let op = match (ordering, or_equal) {
                    (Ordering::Greater, true) => ">=",
                    (Ordering::Greater, false) => ">",
                    (_, true) => "<=",
                    (_, false) => "<",
                };
                write!(f, "{a} {op} {v}")
            }
        }
    }
}

/// A dotted numeric version: `5.10.0-1-amd64` is `[5, 10, 0]`. Anything
/// after the first non-numeric part is ignored; missing parts count as 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(Vec<u64>);

impl Version {
    pub fn parse(text: &str) -> Option<Version> {
        let text = text.trim().trim_start_matches('v');
        let mut parts = Vec::new();
        for part in text.split('.') {
            let digits: &str = &part[..part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len())];
            if digits.is_empty() {
                break;
            }
            parts.push(digits.parse().ok()?);
            if digits.len() != part.len() {
                break;
            }
        }
        (!parts.is_empty()).then_some(Version(parts))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.0.len().max(other.0.len());
        (0..len)
            .map(|i| {
                let a = self.0.get(i).copied().unwrap_or(0);
                let b = other.0.get(i).copied().unwrap_or(0);
                a.cmp(&b)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(u64::to_string).collect();
        f.write_str(&parts.join("."))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(text: &str, value: Option<&str>) -> bool {
        Constraint::parse(text).unwrap().holds(value)
    }

    #[test]
    fn operators() {
        assert!(holds("zone == eu", Some("eu")));
        assert!(!holds("zone == eu", Some("us")));
        assert!(!holds("zone == eu", None));
        assert!(holds("zone != eu", Some("us")));
        assert!(holds("zone != eu", None));
        assert!(holds("node.id =~ ^node-[12]$", Some("node-2")));
        assert!(!holds("node.id =~ ^node-[12]$", Some("node-3")));
        assert!(holds("disk !~ hdd", Some("ssd")));
        assert!(holds("zone in [eu, us]", Some("us")));
        assert!(!holds("zone in [eu, us]", Some("ap")));
        assert!(holds("zone not in [eu]", Some("ap")));
        assert!(holds("zone not in eu,us", None));
        assert!(holds("kernel.version >= 5.10", Some("5.10.0-28-amd64")));
        assert!(holds("kernel.version > 5.9", Some("5.10")));
        assert!(!holds("kernel.version > 5.10", Some("5.10.0")));
        assert!(holds("kernel.version < 6", Some("5.99")));
        assert!(!holds("kernel.version >= 5.10", Some("unknown")));
        assert!(!holds("kernel.version >= 5.10", None));
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let err = |t: &str| Constraint::parse(t).unwrap_err();
        assert!(err("zone").contains("ATTRIBUTE OP VALUE"));
        assert!(err("zone ~~ eu").contains("unknown operator `~~`"));
        assert!(err("zone =~ (").contains("not a valid regular expression"));
        assert!(err("v >= latest").contains("not a version"));
        assert!(err("zone in []").contains("at least one value"));
        assert!(err("zo$ne == eu").contains("not an attribute name"));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "zone == eu",
            "zone in [eu, us]",
            "kernel.version >= 5.10",
            "node.id =~ ^n",
        ] {
            let c = Constraint::parse(text).unwrap();
            assert_eq!(c.to_string(), text);
            assert_eq!(Constraint::parse(&c.to_string()).unwrap().to_string(), text);
        }
    }
}
