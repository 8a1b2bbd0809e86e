//! ADO demands: parsing and matching against capabilities, with the server's semantics.
//!
//! A job request carries its demands as strings. Azure DevOps parses each one with the pattern
//! `^(?<name>\S+)(\s+-(?<opcode>\S+)\s+(?<value>.*))?$` and knows three kinds:
//!
//! | text | kind | satisfied when |
//! |---|---|---|
//! | `name` | exists | the agent has a capability `name` (any value) |
//! | `name -equals value` | equals | the capability exists and its value equals `value`, ignoring case |
//! | `name -gtVersion value` | minimum version | the capability exists and its version is `>=` `value` |
//!
//! Details kept from the server's classes (`Demand`, `DemandExists`, `DemandEquals`,
//! `DemandMinimumVersion`): the opcode is case-sensitive (`-Equals` does not parse); the value is
//! everything after the whitespace following the opcode (it may contain spaces) and must not be
//! empty; capability names compare without regard to case. `-gtVersion` is, despite its name, a
//! *minimum* version (equal passes). Versions are .NET `System.Version`s (2 to 4 numeric parts;
//! anything from the first `-` on is ignored, so `3.220.0-rc1` is `3.220.0`); an unparseable demand
//! version is satisfied by any version, an unparseable capability version satisfies nothing (unless
//! the demand's is unparseable too).

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// One parsed demand of a job request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Demand {
    /// `name`: the capability exists.
    Exists { name: String },
    /// `name -equals value`: the capability's value equals `value`, ignoring case.
    Equals { name: String, value: String },
    /// `name -gtVersion value`: the capability's version is at least `value`.
    MinimumVersion { name: String, value: String },
}

/// Why a demand string could not be parsed. ADO itself would not have queued such a request with
/// this text, so it usually means a client bug or a new demand kind we do not know yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "demand {text:?} cannot be parsed ({problem}); expected `name`, `name -equals value` or `name -gtVersion version`"
)]
pub struct DemandParseError {
    /// The demand exactly as ADO sent it.
    pub text: String,
    /// What is wrong with it.
    pub problem: &'static str,
}

impl Demand {
    /// Parses one demand with ADO's rules (see the module documentation).
    pub fn parse(text: &str) -> Result<Self, DemandParseError> {
        let fail = |problem| DemandParseError {
            text: text.to_owned(),
            problem,
        };
        // .NET's `$` also matches before one final newline; `.` never matches a newline.
        let body = text.strip_suffix('\n').unwrap_or(text);
        if body.contains('\n') {
            return Err(fail("it spans several lines"));
        }
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        if name_end == 0 {
            return Err(fail(if body.is_empty() {
                "it is empty"
            } else {
                "it starts with whitespace"
            }));
        }
        let name = &body[..name_end];
        let rest = &body[name_end..];
        if rest.is_empty() {
            return Ok(Demand::Exists {
                name: name.to_owned(),
            });
        }
        let after_ws = rest.trim_start();
        let Some(op_and_value) = after_ws.strip_prefix('-') else {
            return Err(fail(
                "the name is followed by something that is not an `-operator`",
            ));
        };
        let op_end = op_and_value
            .find(char::is_whitespace)
            .ok_or_else(|| fail("the operator has no value after it"))?;
        let opcode = &op_and_value[..op_end];
        if opcode.is_empty() {
            return Err(fail("the operator after `-` is missing"));
        }
        let value = op_and_value[op_end..].trim_start();
        if value.is_empty() {
            return Err(fail("the operator has no value after it"));
        }
        let (name, value) = (name.to_owned(), value.to_owned());
        match opcode {
            "equals" => Ok(Demand::Equals { name, value }),
            "gtVersion" => Ok(Demand::MinimumVersion { name, value }),
            _ => Err(fail(
                "unknown operator (ADO knows `-equals` and `-gtVersion`)",
            )),
        }
    }

    /// The capability name this demand is about.
    pub fn name(&self) -> &str {
        match self {
            Demand::Exists { name }
            | Demand::Equals { name, .. }
            | Demand::MinimumVersion { name, .. } => name,
        }
    }

    /// Whether an agent with these capabilities satisfies the demand.
    pub fn is_satisfied_by(&self, capabilities: &Capabilities) -> bool {
        match self {
            Demand::Exists { name } => capabilities.get(name).is_some(),
            Demand::Equals { name, value } => capabilities
                .get(name)
                .is_some_and(|have| eq_ignore_case(have, value)),
            Demand::MinimumVersion { name, value } => capabilities
                .get(name)
                .is_some_and(|have| compare_versions(value, have) != Ordering::Greater),
        }
    }
}

impl fmt::Display for Demand {
    /// The canonical text, as ADO prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Demand::Exists { name } => write!(f, "{name}"),
            Demand::Equals { name, value } => write!(f, "{name} -equals {value}"),
            Demand::MinimumVersion { name, value } => write!(f, "{name} -gtVersion {value}"),
        }
    }
}

fn eq_ignore_case(a: &str, b: &str) -> bool {
    a == b || a.to_lowercase() == b.to_lowercase()
}

/// A capability set with ADO's case-insensitive names. Later insertions of the same name (in any
/// case) replace earlier ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// lower-cased name → (name as given, value)
    by_name: BTreeMap<String, (String, String)>,
}

impl Capabilities {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a capability.
    pub fn insert(&mut self, name: &str, value: &str) {
        self.by_name
            .insert(name.to_lowercase(), (name.to_owned(), value.to_owned()));
    }

    /// The value of a capability, looked up without regard to case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.by_name
            .get(&name.to_lowercase())
            .map(|(_, value)| value.as_str())
    }

    /// The number of distinct capability names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there is no capability at all.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Capabilities {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut capabilities = Capabilities::new();
        for (name, value) in iter {
            capabilities.insert(name.as_ref(), value.as_ref());
        }
        capabilities
    }
}

/// A .NET `System.Version`: major and minor always, build and revision optional (an absent part
/// sorts before any present one, so `1.2` < `1.2.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DotNetVersion {
    parts: [i64; 4],
}

impl DotNetVersion {
    /// Parses like ADO's `DemandMinimumVersion.ParseVersion`: text from the first `-` (not at the
    /// start) is dropped, then 2 to 4 dot-separated non-negative 32-bit integers, each optionally
    /// surrounded by whitespace and with an optional `+` sign. `None` when it does not parse.
    pub fn parse(text: &str) -> Option<Self> {
        let text = match text.find('-') {
            Some(cut) if cut > 0 => &text[..cut],
            _ => text,
        };
        let components: Vec<&str> = text.split('.').collect();
        if !(2..=4).contains(&components.len()) {
            return None;
        }
        let mut parts = [-1_i64; 4];
        for (slot, component) in parts.iter_mut().zip(&components) {
            let trimmed = component.trim();
            let digits = trimmed.strip_prefix('+').unwrap_or(trimmed);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let value: i32 = digits.parse().ok()?;
            *slot = i64::from(value);
        }
        Some(DotNetVersion { parts })
    }
}

/// Compares two version strings as ADO's `DemandMinimumVersion.CompareVersion` does: two
/// unparseable versions are equal, an unparseable one is smaller than any parseable one.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    match (DotNetVersion::parse(a), DotNetVersion::parse(b)) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(a), Some(b)) => a.cmp(&b),
    }
}

/// The first demand these capabilities do not satisfy, if any.
pub fn first_unmet<'a>(demands: &'a [Demand], capabilities: &Capabilities) -> Option<&'a Demand> {
    demands.iter().find(|d| !d.is_satisfied_by(capabilities))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pairs: &[(&str, &str)]) -> Capabilities {
        pairs.iter().copied().collect()
    }

    #[test]
    fn parses_the_three_kinds() {
        let cases = [
            (
                "docker",
                Demand::Exists {
                    name: "docker".into(),
                },
            ),
            (
                "Agent.OS -equals Linux",
                Demand::Equals {
                    name: "Agent.OS".into(),
                    value: "Linux".into(),
                },
            ),
            (
                "Agent.Version -gtVersion 2.163.1",
                Demand::MinimumVersion {
                    name: "Agent.Version".into(),
                    value: "2.163.1".into(),
                },
            ),
            // The value is the rest of the line, inner spaces included; extra spaces between parts are fine.
            (
                "java   -equals  C:\\Program Files\\Java ",
                Demand::Equals {
                    name: "java".into(),
                    value: "C:\\Program Files\\Java ".into(),
                },
            ),
            (
                "tab\t-equals\tx",
                Demand::Equals {
                    name: "tab".into(),
                    value: "x".into(),
                },
            ),
            (
                "trailing-newline\n",
                Demand::Exists {
                    name: "trailing-newline".into(),
                },
            ),
            // A name may contain a dash and the value may start with one.
            (
                "my-cap -equals -1",
                Demand::Equals {
                    name: "my-cap".into(),
                    value: "-1".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Demand::parse(text).as_ref(), Ok(&want), "parsing {text:?}");
        }
    }

    #[test]
    fn rejects_what_ado_rejects() {
        for text in [
            "",
            " docker",
            "docker ",
            "Agent.OS -equals",
            "Agent.OS -equals ",
            "Agent.OS -Equals Linux",
            "Agent.OS -notequals Linux",
            "Agent.OS equals Linux",
            "Agent.OS - Linux",
            "a\nb",
            "Agent.Version -gtversion 2.0",
        ] {
            let err = Demand::parse(text).expect_err(text);
            assert_eq!(err.text, text);
            assert!(err.to_string().contains("cannot be parsed"), "{err}");
        }
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "docker",
            "Agent.OS -equals Linux",
            "Agent.Version -gtVersion 3.0",
        ] {
            let demand = Demand::parse(text).expect(text);
            assert_eq!(demand.to_string(), text);
            assert_eq!(Demand::parse(&demand.to_string()), Ok(demand));
        }
    }

    #[test]
    fn names_and_equals_values_ignore_case() {
        let have = caps(&[("Agent.OS", "Linux"), ("DOCKER", "")]);
        let table = [
            ("agent.os -equals LINUX", true),
            ("AGENT.OS -equals linux", true),
            ("Agent.OS -equals Windows_NT", false),
            ("docker", true),
            ("Docker", true),
            ("maven", false),
            ("maven -equals x", false),
        ];
        for (text, want) in table {
            let demand = Demand::parse(text).expect(text);
            assert_eq!(demand.is_satisfied_by(&have), want, "{text}");
        }
    }

    #[test]
    fn gt_version_is_a_minimum() {
        let table = [
            // (demand, capability, satisfied)
            ("2.163.1", "2.163.1", true),
            ("2.163.1", "2.163.2", true),
            ("2.163.1", "3.0", true),
            ("2.163.1", "2.163.0", false),
            ("2.163.1", "2.99.9", false),
            ("1.2", "1.2.0", true),           // absent parts sort first
            ("1.2.0", "1.2", false),          //
            ("3.220.0-rc1", "3.220.0", true), // pre-release tail ignored
            ("3.220.0", "3.220.5-beta", true),
            ("10.0", "9.99", false),        // numeric, not lexical
            ("not-a-version", "1.0", true), // unparseable demand: any version passes
            ("1.0", "not-a-version", false),
            ("garbage", "rubbish", true), // both unparseable: equal
            ("1", "2.0", true),           // a single part is not a .NET version
            ("1.0", "2", false),
            ("1.0.0.0.0", "1.0", true), // five parts do not parse either
            ("+1. 2", "1.2", true),     // .NET accepts signs and spaces per part
            ("2147483648.0", "1.0", true), // overflow → unparseable demand
        ];
        for (want_version, have_version, ok) in table {
            let have = caps(&[("Agent.Version", have_version)]);
            let demand = Demand::MinimumVersion {
                name: "agent.version".into(),
                value: want_version.into(),
            };
            assert_eq!(
                demand.is_satisfied_by(&have),
                ok,
                "{want_version} <= {have_version}"
            );
        }
        let no_version = caps(&[("docker", "1")]);
        let demand = Demand::parse("Agent.Version -gtVersion 1.0").expect("parses");
        assert!(!demand.is_satisfied_by(&no_version));
    }

    #[test]
    fn later_capability_of_the_same_name_wins() {
        let have = caps(&[("Agent.Version", "1.0"), ("agent.version", "4.0")]);
        assert_eq!(have.len(), 1);
        assert_eq!(have.get("AGENT.VERSION"), Some("4.0"));
    }

    #[test]
    fn first_unmet_names_the_failing_demand() {
        let demands: Vec<Demand> = ["docker", "Agent.OS -equals Linux", "gpu"]
            .iter()
            .map(|t| Demand::parse(t).expect(t))
            .collect();
        let have = caps(&[("docker", "1"), ("Agent.OS", "linux")]);
        assert_eq!(first_unmet(&demands, &have).map(Demand::name), Some("gpu"));
        let all = caps(&[("docker", "1"), ("Agent.OS", "linux"), ("GPU", "a100")]);
        assert_eq!(first_unmet(&demands, &all), None);
    }
}
