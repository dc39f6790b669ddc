//! Listening addresses: `unix:PATH` and `tcp:HOST:PORT`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a monitor listens. Each address is one monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP socket, `host:port` (an empty host means all interfaces).
    Tcp(String),
}

/// Why a listening address could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddrError {
    /// Neither `unix:` nor `tcp:`.
    #[error("'{0}': expected unix:PATH or tcp:HOST:PORT")]
    UnknownKind(String),
    /// `unix:` with nothing after it.
    #[error("'{0}': the unix socket path is empty")]
    EmptyPath(String),
    /// A unix socket path longer than `sun_path` allows.
    #[error("'{0}': the unix socket path is longer than 107 bytes")]
    PathTooLong(String),
    /// `tcp:` without `:PORT`.
    #[error("'{0}': expected tcp:HOST:PORT")]
    MissingPort(String),
    /// A port that is not a number from 0 to 65535.
    #[error("'{0}': invalid port '{1}'")]
    BadPort(String, String),
}

impl FromStr for ListenAddr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(AddrError::EmptyPath(s.into()));
            }
            if path.len() > 107 {
                return Err(AddrError::PathTooLong(s.into()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp:") {
            let Some((host, port)) = rest.rsplit_once(':') else {
                return Err(AddrError::MissingPort(s.into()));
            };
            if port.parse::<u16>().is_err() {
                return Err(AddrError::BadPort(s.into(), port.into()));
            }
            let host = if host.is_empty() { "0.0.0.0" } else { host };
            return Ok(ListenAddr::Tcp(format!("{host}:{port}")));
        }
        Err(AddrError::UnknownKind(s.into()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(
            "unix:/tmp/q.sock".parse(),
            Ok(ListenAddr::Unix("/tmp/q.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(ListenAddr::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:4444".parse(),
            Ok(ListenAddr::Tcp("[::1]:4444".into()))
        );
        assert_eq!(
            "tcp::4444".parse(),
            Ok(ListenAddr::Tcp("0.0.0.0:4444".into()))
        );
        assert_eq!(
            "tcp:localhost:0"
                .parse::<ListenAddr>()
                .map(|a| a.to_string()),
            Ok("tcp:localhost:0".into())
        );
    }

    #[test]
    fn rejects() {
        assert_eq!(
            "stdio".parse::<ListenAddr>(),
            Err(AddrError::UnknownKind("stdio".into()))
        );
        assert_eq!(
            "unix:".parse::<ListenAddr>(),
            Err(AddrError::EmptyPath("unix:".into()))
        );
        assert!(matches!(
            format!("unix:/{}", "a".repeat(200)).parse::<ListenAddr>(),
            Err(AddrError::PathTooLong(_))
        ));
        assert_eq!(
            "tcp:4444".parse::<ListenAddr>(),
            Err(AddrError::MissingPort("tcp:4444".into()))
        );
        assert_eq!(
            "tcp:host".parse::<ListenAddr>(),
            Err(AddrError::MissingPort("tcp:host".into()))
        );
        assert_eq!(
            "tcp:h:99999".parse::<ListenAddr>(),
            Err(AddrError::BadPort("tcp:h:99999".into(), "99999".into()))
        );
        assert_eq!(
            "tcp:h:x".parse::<ListenAddr>().unwrap_err().to_string(),
            "'tcp:h:x': invalid port 'x'"
        );
    }
}
