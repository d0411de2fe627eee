//! The reader every section parses from: a map of variables (the process environment, or a
//! test's), which records each name it is asked for so that the list of known variables comes
//! from the parser itself; and the error that names the variable, the value and the form.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

use super::ConfigError;

/// Reads variables from a map so that parsing is testable without touching the process env.
/// Records every name it is asked for, so the list of variables comes from the parser itself.
pub(super) struct Vars<'a>(
    pub(super) &'a HashMap<String, String>,
    pub(super) std::cell::RefCell<std::collections::BTreeSet<String>>,
);

impl Vars<'_> {
    pub(super) fn raw(&self, names: &[&str]) -> Option<(String, String)> {
        self.1
            .borrow_mut()
            .extend(names.iter().map(|n| n.to_string()));
        names.iter().find_map(|n| {
            self.0
                .get(*n)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (n.to_string(), v.trim().to_string()))
        })
    }

    pub(super) fn err(var: &str, value: &str, expected: &str) -> ConfigError {
        ConfigError {
            var: var.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    pub(super) fn string(&self, name: &str, default: &str) -> String {
        self.raw(&[name])
            .map(|(_, v)| v)
            .unwrap_or_else(|| default.to_string())
    }

    pub(super) fn parse<T: FromStr>(
        &self,
        name: &str,
        default: T,
        expected: &str,
    ) -> Result<T, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default),
            Some((var, v)) => v.parse().map_err(|_| Self::err(&var, &v, expected)),
        }
    }

    pub(super) fn ranged<T: FromStr + PartialOrd + Copy + std::fmt::Display>(
        &self,
        name: &str,
        default: T,
        min: T,
        max: T,
    ) -> Result<T, ConfigError> {
        let expected = format!("an integer from {min} to {max}");
        let v = self.parse(name, default, &expected)?;
        if v < min || v > max {
            return Err(Self::err(name, &v.to_string(), &expected));
        }
        Ok(v)
    }

    pub(super) fn port(&self, name: &str, default: u16) -> Result<u16, ConfigError> {
        self.parse(name, default, "a TCP port number from 0 to 65535")
    }

    pub(super) fn bool(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default),
            Some((var, v)) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(Self::err(&var, &v, "true or false")),
            },
        }
    }

    pub(super) fn duration(&self, name: &str, default: Duration) -> Result<Duration, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default),
            Some((var, v)) => parse_duration(&v)
                .ok_or_else(|| Self::err(&var, &v, "a duration such as 500ms, 5s, 24h")),
        }
    }

    pub(super) fn positive_duration(
        &self,
        name: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(name, default)?;
        if d.is_zero() {
            return Err(Self::err(name, "0", "a positive duration such as 5s"));
        }
        Ok(d)
    }

    pub(super) fn list(&self, name: &str, default: &[String]) -> Result<Vec<String>, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default.to_vec()),
            Some((var, t)) => {
                let list: Vec<String> = t
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                if list.is_empty() {
                    return Err(Self::err(&var, &t, "a comma-separated list of topic names"));
                }
                Ok(list)
            }
        }
    }

    /// A comma-separated list of IP networks (`10.0.0.0/8`) or addresses (`127.0.0.1`, taken
    /// as a network of one); empty when unset.
    pub(super) fn networks(&self, name: &str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        let Some((var, t)) = self.raw(&[name]) else {
            return Ok(Vec::new());
        };
        t.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        Self::err(
                            &var,
                            &t,
                            "comma-separated IP addresses or CIDR networks such as 10.0.0.0/8",
                        )
                    })
            })
            .collect()
    }

    pub(super) fn durations(
        &self,
        name: &str,
        default: &[Duration],
    ) -> Result<Vec<Duration>, ConfigError> {
        match self.raw(&[name]) {
            None => Ok(default.to_vec()),
            Some((var, t)) => t
                .split(',')
                .map(|s| parse_duration(s.trim()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    Self::err(
                        &var,
                        &t,
                        "a comma-separated list of durations such as 0s,1s,2s",
                    )
                }),
        }
    }

    pub(super) fn database_url(
        &self,
        names: &[&str],
        fallback: &str,
    ) -> Result<SecretString, ConfigError> {
        let Some((var, v)) = self.raw(names) else {
            return Ok(SecretString::from(fallback.to_string()));
        };
        validate_database_url(&v).map_err(|_| {
            Self::err(
                &var,
                &redact_url(&v),
                "a URL such as postgres://user:password@host:5432/db",
            )
        })?;
        Ok(SecretString::from(v))
    }
}

pub(super) fn parse_duration(v: &str) -> Option<Duration> {
    humantime::parse_duration(v).ok()
}

pub(super) fn validate_database_url(v: &str) -> Result<(), ()> {
    let rest = v
        .strip_prefix("postgres://")
        .or_else(|| v.strip_prefix("postgresql://"))
        .ok_or(())?;
    if rest.is_empty() {
        return Err(());
    }
    v.parse::<sqlx::postgres::PgConnectOptions>()
        .map(|_| ())
        .map_err(|_| ())
}

/// Hides the password of a database URL so it can appear in errors and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
