//! ADO demand parsing and matching, as the ADO server does it: `name` (capability exists),
//! `name -equals value`, `name -gtVersion x`; names and values compare case-insensitively.

use std::collections::HashMap;

/// One parsed demand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Demand {
    /// `name`: the capability exists (any value).
    Exists { name: String },
    /// `name -equals value` (case-insensitive).
    Equals { name: String, value: String },
    /// `name -gtVersion x`: the capability is a version strictly greater than `x`.
    GtVersion { name: String, version: String },
}

/// A demand string the simulator cannot parse.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "demand {demand:?} is not valid: expected `name`, `name -equals value` or `name -gtVersion x`"
)]
pub struct DemandError {
    pub demand: String,
}

impl Demand {
    /// Parses `name`, `name -equals value` or `name -gtVersion x` (operator case-insensitive).
    pub fn parse(s: &str) -> Result<Demand, DemandError> {
        let err = || DemandError {
            demand: s.to_owned(),
        };
        let trimmed = s.trim();
        if trimmed.is_empty() {
            return Err(err());
        }
        let lower = trimmed.to_ascii_lowercase();
        for (op, ctor) in [(" -equals ", 0u8), (" -gtversion ", 1u8)] {
            if let Some(pos) = lower.find(op) {
                let name = trimmed[..pos].trim();
                let value = trimmed[pos + op.len()..].trim();
                if name.is_empty() || value.is_empty() || name.contains(char::is_whitespace) {
                    return Err(err());
                }
                return Ok(match ctor {
                    0 => Demand::Equals {
                        name: name.to_owned(),
                        value: value.to_owned(),
                    },
                    _ => Demand::GtVersion {
                        name: name.to_owned(),
                        version: value.to_owned(),
                    },
                });
            }
        }
        if trimmed.contains(char::is_whitespace) {
            return Err(err());
        }
        Ok(Demand::Exists {
            name: trimmed.to_owned(),
        })
    }

    /// The capability name this demand is about.
    pub fn name(&self) -> &str {
        match self {
            Demand::Exists { name }
            | Demand::Equals { name, .. }
            | Demand::GtVersion { name, .. } => name,
        }
    }

    /// Whether `caps` (keys lower-cased, see [`Capabilities`]) satisfy this demand.
    pub fn satisfied_by(&self, caps: &Capabilities) -> bool {
        let Some(have) = caps.get(self.name()) else {
            return false;
        };
        match self {
            Demand::Exists { .. } => true,
            Demand::Equals { value, .. } => have.eq_ignore_ascii_case(value),
            // Despite its name, ADO's `-gtVersion` is a minimum version (DemandMinimumVersion):
            // an agent of exactly that version satisfies it.
            Demand::GtVersion { version, .. } => {
                match (parse_version(have), parse_version(version)) {
                    (Some(h), Some(w)) => h >= w,
                    _ => false,
                }
            }
        }
    }
}

/// An agent's capabilities (system ∪ user; user wins), keyed case-insensitively.
#[derive(Debug, Clone, Default)]
pub struct Capabilities {
    by_name: HashMap<String, String>,
}

impl Capabilities {
    /// Builds the effective set from system and user capabilities (user values override system ones).
    pub fn new<'a>(
        system: impl IntoIterator<Item = (&'a String, &'a String)>,
        user: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Self {
        let mut by_name = HashMap::new();
        for (k, v) in system.into_iter().chain(user) {
            by_name.insert(k.to_ascii_lowercase(), v.clone());
        }
        Capabilities { by_name }
    }

    /// Adds a capability unless one of that name exists already.
    pub fn insert_default(&mut self, name: &str, value: &str) {
        self.by_name
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| value.to_owned());
    }

    /// The value of a capability (name compared case-insensitively).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.by_name
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    /// Whether every demand is satisfied.
    pub fn satisfy(&self, demands: &[Demand]) -> bool {
        demands.iter().all(|d| d.satisfied_by(self))
    }
}

/// Numeric dotted version (`2.211.0`), missing parts count as 0. `None` if any part is not a number.
fn parse_version(s: &str) -> Option<Vec<u64>> {
    let mut parts: Vec<u64> = s
        .trim()
        .split('.')
        .map(|p| p.trim().parse::<u64>().ok())
        .collect::<Option<Vec<_>>>()?;
    while parts.len() > 1 && parts.last() == Some(&0) {
        parts.pop();
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(pairs: &[(&str, &str)]) -> Capabilities {
        let sys: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Capabilities::new(sys.iter().map(|(k, v)| (k, v)), std::iter::empty())
    }

    #[test]
    fn parses_the_three_forms_case_insensitively() {
        assert_eq!(
            Demand::parse("docker").unwrap(),
            Demand::Exists {
                name: "docker".into()
            }
        );
        assert_eq!(
            Demand::parse("Agent.OS -equals Linux").unwrap(),
            Demand::Equals {
                name: "Agent.OS".into(),
                value: "Linux".into()
            }
        );
        assert_eq!(
            Demand::parse("Agent.Version -GTVERSION 2.200.1").unwrap(),
            Demand::GtVersion {
                name: "Agent.Version".into(),
                version: "2.200.1".into()
            }
        );
        assert!(Demand::parse("").is_err());
        assert!(Demand::parse("two words").is_err());
        assert!(Demand::parse("x -equals ").is_err());
    }

    #[test]
    fn matches_like_ado() {
        let c = caps(&[
            ("Agent.OS", "Linux"),
            ("DOCKER", ""),
            ("Agent.Version", "2.211.0"),
        ]);
        assert!(Demand::parse("docker").unwrap().satisfied_by(&c));
        assert!(
            Demand::parse("agent.os -equals LINUX")
                .unwrap()
                .satisfied_by(&c)
        );
        assert!(
            !Demand::parse("agent.os -equals Windows")
                .unwrap()
                .satisfied_by(&c)
        );
        assert!(!Demand::parse("java").unwrap().satisfied_by(&c));
        assert!(
            Demand::parse("Agent.Version -gtVersion 2.200.1")
                .unwrap()
                .satisfied_by(&c)
        );
        assert!(
            Demand::parse("Agent.Version -gtVersion 2.99")
                .unwrap()
                .satisfied_by(&c)
        );
        assert!(
            Demand::parse("Agent.Version -gtVersion 2.211.0")
                .unwrap()
                .satisfied_by(&c),
            "-gtVersion is a minimum: the same version satisfies it"
        );
        assert!(
            !Demand::parse("Agent.Version -gtVersion 3.0.0")
                .unwrap()
                .satisfied_by(&c)
        );
        assert!(
            !Demand::parse("Agent.OS -gtVersion 1.0")
                .unwrap()
                .satisfied_by(&c),
            "non-numeric never matches"
        );
    }

    #[test]
    fn user_capabilities_override_system_ones() {
        let sys = [("color".to_string(), "red".to_string())];
        let user = [("Color".to_string(), "blue".to_string())];
        let c = Capabilities::new(
            sys.iter().map(|(k, v)| (k, v)),
            user.iter().map(|(k, v)| (k, v)),
        );
        assert_eq!(c.get("COLOR"), Some("blue"));
        assert!(c.satisfy(&[Demand::parse("color -equals Blue").unwrap()]));
        assert!(c.satisfy(&[]));
    }
}
