//! How a service is told to be ready: its probe and the timings around it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How to tell a service is ready, as docker compose's healthchecks do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Readiness {
    pub probe: Probe,
    /// Time between probes.
    #[serde(with = "super::duration")]
    pub interval: Duration,
    /// One probe's time limit.
    #[serde(with = "super::duration")]
    pub timeout: Duration,
    /// Failures in this first stretch don't count against the service (a large model
    /// takes minutes to load).
    #[serde(with = "super::duration")]
    pub start_period: Duration,
    /// Give up if not ready after this long (from the start).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "super::opt_duration"
    )]
    pub ready_timeout: Option<Duration>,
}

impl Readiness {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(100);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    pub fn new(probe: Probe) -> Self {
        Self {
            probe,
            interval: Self::DEFAULT_INTERVAL,
            timeout: Self::DEFAULT_TIMEOUT,
            start_period: Duration::ZERO,
            ready_timeout: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Probe {
    /// Ready when `GET url` answers 2xx.
    Http { url: String },
    /// Ready when a TCP connection to `addr` (`host:port`) succeeds.
    Tcp { addr: String },
    /// Ready when a line of the task's log matches the regex.
    Log { regex: String },
}

impl Probe {
    pub fn describe(&self) -> String {
        match self {
            Probe::Http { url } => format!("GET {url}"),
            Probe::Tcp { addr } => format!("tcp {addr}"),
            Probe::Log { regex } => format!("log /{regex}/"),
        }
    }

    /// The host (without IPv6 brackets) and port an `http` or `tcp` probe reaches, its
    /// text passed through `resolve` first (the run's `${host:NODE}` addresses); `None` for
    /// a `log` probe or an address that does not parse.
    pub fn endpoint(&self, resolve: impl Fn(&str) -> String) -> Option<(String, u16)> {
        let (host, port) = match self {
            Probe::Http { url } => {
                let url = reqwest::Url::parse(&resolve(url)).ok()?;
                (url.host_str()?.to_string(), url.port_or_known_default()?)
            }
            Probe::Tcp { addr } => {
                let addr = resolve(addr);
                let (host, port) = addr.rsplit_once(':')?;
                (host.to_string(), port.parse().ok()?)
            }
            Probe::Log { .. } => return None,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Some((host.to_string(), port))
    }
}
