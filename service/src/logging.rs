//! Logging to stderr (one line per record) or to syslog (facility daemon).
//!
//! The target is chosen once, at start-up; the level follows the config, also on reload.

use crate::config::LogTarget;
use log::{LevelFilter, Log, Metadata, Record};
use std::time::{SystemTime, UNIX_EPOCH};

struct StderrLogger {
    timestamp: bool,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = String::with_capacity(128);
        if self.timestamp {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            line.push_str(&format!("{}.{:03} ", now.as_secs(), now.subsec_millis()));
        }
        line.push_str(&format!(
            "[{:<5} parsec] {}\n",
            record.level(),
            record.args()
        ));
        // To the original stderr when libraries' output is captured (`module_output`); a
        // closed stderr must not take the service down.
        crate::module_output::write_log(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Libraries log their own view of a failure, which the provider then logs decoded, with
/// the client and a hint: their lines only show at debug level. cryptoki logs an error for
/// every mechanism a token lists that it has no name for ("Mechanism type 4356 is not
/// supported."): nothing is wrong then.
fn wanted(record: &Record) -> bool {
    let target = record.target();
    !(target.starts_with("tss_esapi") || target.starts_with("cryptoki"))
        || log::max_level() >= LevelFilter::Debug
}

/// Drops the records `wanted` refuses, whatever the target.
struct Filtered(Box<dyn Log>);

impl Log for Filtered {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if wanted(record) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Installs the logger. Call once; later calls only change the level.
pub fn init(target: LogTarget, level: LevelFilter, timestamp: bool) -> Result<(), String> {
    let logger: Box<dyn Log> = match target {
        LogTarget::Stderr => Box::new(StderrLogger { timestamp }),
        LogTarget::Syslog => {
            let formatter = syslog::Formatter3164 {
                facility: syslog::Facility::LOG_DAEMON,
                hostname: None,
                process: "parsec".into(),
                pid: std::process::id(),
            };
            let writer = syslog::unix(formatter)
                .map_err(|e| format!("cannot reach syslog at /dev/log: {e}"))?;
            Box::new(syslog::BasicLogger::new(writer))
        }
    };
    match log::set_boxed_logger(Box::new(Filtered(logger))) {
        Ok(()) => {}
        Err(_) => log::debug!("logger already installed: only the level changes"),
    }
    log::set_max_level(level);
    Ok(())
}

pub fn set_level(level: LevelFilter) {
    log::set_max_level(level);
}
