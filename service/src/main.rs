//! `parsec`: the service's command line.

use parsec_service::config::{ConfigSource, LogTarget, Overrides, DEFAULT_CONFIG_PATH};
use parsec_service::dispatcher::Dispatcher;
use parsec_service::front_end::server::Server;
use parsec_service::{config, logging};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: parsec [--config FILE] [--socket PATH] [--store DIR] [--allow-root]
       parsec --check-config FILE
       parsec migrate --check [--config FILE]
       parsec --version | --help

  --config FILE        configuration (default: /etc/parsec/config.toml if it exists,
                       else the embedded default: software provider, /run/parsec/parsec.sock)
  --socket PATH        listen on PATH instead of listener.socket_path
  --store DIR          keep every provider's key store (and Mbed TLS key files) in DIR
  --allow-root         run even as root (a development machine, a container), as
                       core_settings.allow_root = true would; a device runs it as its own user
  --check-config FILE  check FILE and exit: 0 if it is valid, 1 with the reason if not
  migrate --check      say, key by key, what this service will serve of the key stores
                       the config names (upstream Parsec's too), writing nothing; exit 0
                       if every key will be served, 1 if not (docs/migration.md)
";

struct Args {
    config: Option<PathBuf>,
    check: Option<PathBuf>,
    migrate_check: bool,
    overrides: Overrides,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        config: None,
        check: None,
        migrate_check: false,
        overrides: Overrides::default(),
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        let arg = arg.to_string_lossy().to_string();
        let mut value = |name: &str| {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--config" | "-c" => args.config = Some(value("--config")?),
            "--check-config" => args.check = Some(value("--check-config")?),
            "--socket" => args.overrides.socket_path = Some(value("--socket")?),
            "--store" => args.overrides.store_dir = Some(value("--store")?),
            "--allow-root" => args.overrides.allow_root = true,
            "migrate" => match it
                .next()
                .map(|a| a.to_string_lossy().to_string())
                .as_deref()
            {
                Some("--check") => args.migrate_check = true,
                _ => return Err(format!("migrate needs --check\n{USAGE}")),
            },
            "--version" | "-V" => {
                println!(
                    "parsec {} (providers: {}; threads: 1 event loop + 1 key store writer + 1 worker per provider configured, the software provider's with a second crypto thread when its Mbed TLS is thread-safe){}",
                    env!("CARGO_PKG_VERSION"),
                    config::built_in_providers().join(", "),
                    crypto_library()
                );
                return Ok(None);
            }
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("parsec: {e}");
            return ExitCode::from(2);
        }
    };
    let base_dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    // Upstream Parsec kept Mbed TLS's key files in its working directory: remember it
    // before the software provider changes it.
    config::start_dir();

    if let Some(file) = args.check {
        let source = ConfigSource {
            path: Some(file.clone()),
            overrides: args.overrides,
            base_dir,
        };
        return match source.load() {
            Ok(config) => {
                println!(
                    "{}: valid; providers in order: [{}]; socket {}",
                    file.display(),
                    config
                        .providers
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    config.socket_path.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("parsec: {e}");
                ExitCode::FAILURE
            }
        };
    }

    let path = args.config.or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG_PATH);
        default.exists().then_some(default)
    });
    let source = ConfigSource {
        path,
        overrides: args.overrides,
        base_dir,
    };
    let config = match source.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("parsec: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.migrate_check {
        let report = parsec_service::migrate::check(&config);
        print!("{}", report.text);
        return if report.all_served {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if let Err(e) = logging::init(config.log_target, config.log_level, config.log_timestamp) {
        eprintln!("parsec: {e}");
        return ExitCode::FAILURE;
    }
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
    let target = config.log_target;
    if nix::unistd::geteuid().is_root() && !config.allow_root {
        return fatal(
            target,
            &format!(
                "refusing to run as root: run the service as its own user, or set core_settings.allow_root = true in {} (or pass --allow-root)",
                source.describe()
            ),
        );
    }
    log::info!(
        "parsec {} starting with {}{}",
        env!("CARGO_PKG_VERSION"),
        source.describe(),
        crypto_library()
    );
    let dispatcher = match Dispatcher::new(&config) {
        Ok(dispatcher) => dispatcher,
        Err(e) => return fatal(target, &e.to_string()),
    };
    let result = Server::new(config, source, dispatcher).and_then(Server::run);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fatal(target, &e.to_string()),
    }
}

/// Why the service stops: logged, and with syslog as the target also written to stderr, so
/// that whoever started it (an init script, a shell) sees the reason without reading syslog.
fn fatal(target: LogTarget, message: &str) -> ExitCode {
    log::error!("{message}");
    if target == LogTarget::Syslog {
        eprintln!("parsec: {message}");
    }
    ExitCode::FAILURE
}

/// "; software provider on Mbed TLS 3.6.6, thread-safe (2 crypto threads)", as the linked
/// library says (empty without it).
fn crypto_library() -> String {
    #[cfg(feature = "mbed-crypto-provider")]
    {
        use parsec_service::providers::mbed_crypto::version;
        format!(
            "; software provider on {}, {}",
            version::mbedtls_version(),
            if version::thread_safe() {
                "thread-safe (2 crypto threads on 2 cores or more)"
            } else {
                "not thread-safe (1 crypto thread)"
            }
        )
    }
    #[cfg(not(feature = "mbed-crypto-provider"))]
    String::new()
}
