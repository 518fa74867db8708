//! The service's socket, reloads (SIGHUP) and the orderly stop (SIGTERM, SIGINT).

use super::*;

/// How long shutdown waits for responses still being written.
const DRAIN_TIME: Duration = Duration::from_secs(1);
/// How long shutdown waits for requests running in child processes (RSA-4096 generation).
const JOB_WAIT: Duration = Duration::from_secs(60);
/// How long the stop waits for each worker to close its device (or finalize its module).
const WORKER_WAIT: Duration = Duration::from_secs(10);

/// Binds the service's socket, refusing to steal it from a running service.
pub(super) fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        if !dir.is_dir() {
            // Only the service's group may reach a socket directory the service creates
            // (the Parsec threat model's /run/parsec: 0750, group parsec-clients).
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|e| {
                    format!("cannot create the socket directory {}: {e}", dir.display())
                })?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!(
                "another service is already listening on {}: stop it or choose another listener.socket_path",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    // Any local user may connect; who may do what is the authenticator's business, and
    // who may reach the socket at all is the socket directory's mode.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    Ok(listener)
}

impl Server {
    /// Reads the config again and switches to it if it is valid; otherwise keeps running
    /// on the old one and says why.
    pub(super) fn reload(&mut self) {
        systemd::notify("RELOADING=1");
        self.apply_new_config();
        systemd::notify("READY=1");
    }

    fn apply_new_config(&mut self) {
        let source = self.source.describe();
        log::info!("SIGHUP: reloading {source}");
        let config = match self.source.load() {
            Ok(config) => {
                for warning in &config.warnings {
                    log::warn!("SIGHUP: {warning}");
                }
                config
            }
            Err(e) => {
                log::error!("SIGHUP: {e}; keeping the running configuration");
                return;
            }
        };
        if config.socket_path != self.socket_path && self.activated {
            log::warn!("SIGHUP: listener.socket_path is ignored under socket activation: change the .socket unit instead");
        } else if config.socket_path != self.socket_path {
            match bind(&config.socket_path) {
                Ok(mut listener) => {
                    if let Err(e) =
                        self.poll
                            .registry()
                            .register(&mut listener, LISTENER, Interest::READABLE)
                    {
                        log::error!("SIGHUP: cannot watch the new socket: {e}; keeping the running configuration");
                        let _ = std::fs::remove_file(&config.socket_path);
                        return;
                    }
                    let _ = self.poll.registry().deregister(&mut self.listener);
                    let _ = std::fs::remove_file(&self.socket_path);
                    self.listener = listener;
                    self.socket_path = config.socket_path.clone();
                }
                Err(e) => {
                    log::error!("SIGHUP: {e}; keeping the running configuration");
                    return;
                }
            }
        }
        // Providers whose settings are unchanged keep running untouched; the others drain
        // and stop before their successors start (never waited for here). Requests in hand
        // are finished, moved or failed, never lost.
        let answers = self.dispatcher.reload(&config);
        self.deliver(answers);
        if config.log_target != self.config.log_target {
            log::warn!("SIGHUP: core_settings.log_target changes take effect at the next start");
        }
        crate::logging::set_level(config.log_level);
        self.budget.limit = config.connection_buffer_budget;
        self.max_connections =
            fd_limit::connection_cap(config.max_connections, config.max_keygen_processes);
        self.config = config;
        log::info!(
            "SIGHUP: {source} reloaded, listening on {}",
            self.socket_path.display()
        );
    }

    /// Stops listening, sends the responses still being written, removes the socket.
    pub(super) fn shutdown(&mut self) {
        systemd::notify("STOPPING=1");
        // Requests received in full are answered before the service stops, those running
        // in child processes included.
        while self.answer_next() {}
        let until = Instant::now() + JOB_WAIT;
        let mut events = Events::with_capacity(16);
        while (!self.jobs.is_empty() || self.dispatcher.outstanding() > 0) && Instant::now() < until
        {
            let _ = self
                .poll
                .poll(&mut events, Some(Duration::from_millis(100)));
            let ready: Vec<Token> = events
                .iter()
                .map(|e| e.token())
                .filter(|t| self.jobs.contains_key(t))
                .collect();
            for token in ready {
                self.job_output(token);
            }
            self.deliver_completed();
        }
        let _ = self.poll.registry().deregister(&mut self.listener);
        if !self.activated {
            if let Err(e) = std::fs::remove_file(&self.socket_path) {
                log::warn!("cannot remove {}: {e}", self.socket_path.display());
            }
        }
        let until = Instant::now() + DRAIN_TIME;
        let mut events = Events::with_capacity(64);
        let writing: Vec<Token> = self
            .connections
            .iter()
            .filter(|(_, c)| c.is_writing())
            .map(|(t, _)| *t)
            .collect();
        let idle: Vec<Token> = self
            .connections
            .keys()
            .filter(|t| !writing.contains(t))
            .copied()
            .collect();
        for token in idle {
            self.close(token);
        }
        while !self.connections.is_empty() && Instant::now() < until {
            let _ = self.poll.poll(
                &mut events,
                Some(until.saturating_duration_since(Instant::now())),
            );
            for event in events.iter() {
                if self.connections.contains_key(&event.token()) {
                    self.serve(event.token());
                }
            }
        }
        self.dispatcher.stop(WORKER_WAIT);
        log::info!("stopped");
    }
}
