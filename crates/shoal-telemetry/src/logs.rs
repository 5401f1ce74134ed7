//! Log setup: an env-filter and either human-readable lines or one JSON object per line, on
//! stderr (stdout stays free for command output).

use std::str::FromStr;

use crate::TelemetryError;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line (for log collectors).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: expected `human` or `json`")),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

/// Installs the process-wide log subscriber: `filter` in tracing env-filter syntax
/// (e.g. `info`, `shoal_peer=debug,warn`), lines on stderr in `format`.
pub fn init_tracing(filter: &str, format: LogFormat) -> Result<(), TelemetryError> {
    let env_filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| TelemetryError::Filter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInitialised)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_bad_filters_are_refused() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!("human".parse::<LogFormat>(), Ok(LogFormat::Human));
        assert!("xml".parse::<LogFormat>().is_err());
        let err = init_tracing("shoal=[", LogFormat::Human).unwrap_err();
        assert!(matches!(err, TelemetryError::Filter { .. }), "{err}");
    }
}
