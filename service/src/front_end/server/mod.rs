//! The event loop: one thread, one `mio::Poll`, serving every client.
//!
//! Tokens: the listening socket, the signal pipe, the workers' waker, then one per connection. Each connection
//! carries a deadline fixed when it is accepted (now + `listener.timeout`); deadlines are
//! queued in accept order, so they are sorted and expiring them is O(1) per connection.
//! A request is answered as soon as its last byte arrives, within the same wake-up, so a
//! slow or silent client only ever holds its own connection.

use super::connection::{Budget, Connection, Progress};
use super::{fd_limit, framing, systemd};
use crate::authenticators::PeerCredentials;
use crate::config::{Config, ConfigSource};
use crate::dispatcher::{Dispatched, Dispatcher, PendingRequest};
use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use parsec_interface::requests::{Response, ResponseStatus};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod jobs;
mod lifecycle;

use jobs::Job;
use lifecycle::bind;

const LISTENER: Token = Token(0);
const SIGNALS: Token = Token(1);
/// Woken by a provider's worker when a batch of requests is done.
const WORKERS: Token = Token(2);
const FIRST_CONNECTION: usize = 3;

pub struct Server {
    poll: Poll,
    listener: UnixListener,
    socket_path: PathBuf,
    /// The socket came from systemd (socket activation): it is systemd's to keep or remove.
    activated: bool,
    signals: Signals,
    connections: HashMap<Token, Connection>,
    deadlines: VecDeque<(Instant, Token)>,
    /// Complete requests waiting for their turn: cheap core operations (ping, listings)
    /// first, then everything else in arrival order. One is answered per loop turn, so a
    /// ping waits for at most the one operation running when it arrived.
    ready_cheap: VecDeque<(Token, Vec<u8>)>,
    ready_heavy: VecDeque<(Token, Vec<u8>)>,
    /// Requests running in child processes (slow key generation), by the token of the
    /// pipe their child writes to.
    jobs: HashMap<Token, Job>,
    /// Requests in the hands of providers' workers: the connection of each ticket.
    queued: HashMap<u64, Token>,
    /// Request bytes held across connections, and the connections waiting for room in it.
    budget: Budget,
    stalled: VecDeque<Token>,
    last_budget_log: Option<Instant>,
    next_token: usize,
    dispatcher: Dispatcher,
    config: Config,
    source: ConfigSource,
    /// When a refused connection was last logged, to keep a flood out of the log.
    last_refusal_log: Option<Instant>,
    /// Connections served at once: `listener.max_connections`, or fewer if the descriptor
    /// limit cannot fit them (`fd_limit`).
    max_connections: usize,
    spare: fd_limit::Spare,
}

fn peer_credentials(stream: &UnixStream) -> Option<PeerCredentials> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials as PeerCred};
    match getsockopt(stream, PeerCred) {
        Ok(cred) => Some(PeerCredentials {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        }),
        Err(e) => {
            log::warn!("cannot read SO_PEERCRED of a new connection: {e}");
            None
        }
    }
}

impl Server {
    pub fn new(
        config: Config,
        source: ConfigSource,
        dispatcher: Dispatcher,
    ) -> Result<Server, String> {
        let poll = Poll::new().map_err(|e| format!("cannot create the event loop: {e}"))?;
        let (mut listener, socket_path, activated) = match systemd::inherited_listener() {
            Some(inherited) => {
                let listener = UnixListener::from_std(inherited?);
                let path = listener
                    .local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(Path::to_path_buf))
                    .unwrap_or_else(|| config.socket_path.clone());
                if path != config.socket_path {
                    log::warn!(
                        "socket activation: serving {} from systemd; listener.socket_path ({}) is not used",
                        path.display(),
                        config.socket_path.display()
                    );
                }
                (listener, path, true)
            }
            None => (
                bind(&config.socket_path)?,
                config.socket_path.clone(),
                false,
            ),
        };
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(|e| format!("cannot watch the socket: {e}"))?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| format!("cannot watch signals: {e}"))?;
        let waker = mio::Waker::new(poll.registry(), WORKERS)
            .map_err(|e| format!("cannot create the workers' waker: {e}"))?;
        dispatcher.set_waker(waker);
        let max_connections =
            fd_limit::connection_cap(config.max_connections, config.max_keygen_processes);
        Ok(Server {
            poll,
            listener,
            socket_path,
            activated,
            signals,
            connections: HashMap::new(),
            deadlines: VecDeque::new(),
            ready_cheap: VecDeque::new(),
            ready_heavy: VecDeque::new(),
            jobs: HashMap::new(),
            queued: HashMap::new(),
            budget: Budget::new(config.connection_buffer_budget),
            stalled: VecDeque::new(),
            last_budget_log: None,
            next_token: FIRST_CONNECTION,
            dispatcher,
            config,
            source,
            last_refusal_log: None,
            max_connections,
            spare: fd_limit::Spare::reserve(),
        })
    }

    /// Serves until SIGTERM or SIGINT, then removes the socket.
    pub fn run(mut self) -> Result<(), String> {
        log::info!(
            "listening on {} ({} providers, up to {} connections)",
            self.socket_path.display(),
            self.config.providers.len(),
            self.max_connections
        );
        systemd::notify("READY=1");
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = if self.ready_cheap.is_empty() && self.ready_heavy.is_empty() {
                let retry = self.dispatcher.next_wakeup();
                let next = match (self.next_deadline(), retry) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                next.map(|at| at.saturating_duration_since(Instant::now()))
            } else {
                // Requests are waiting: only look for new events, then answer the next one.
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("event loop failed: {e}"));
            }
            let mut stop = false;
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    SIGNALS => {
                        let pending: Vec<i32> = self.signals.pending().collect();
                        for signal in pending {
                            match signal {
                                SIGHUP => self.reload(),
                                _ => {
                                    log::info!("signal {signal}: finishing and shutting down");
                                    stop = true;
                                }
                            }
                        }
                    }
                    WORKERS => self.deliver_completed(),
                    token if self.jobs.contains_key(&token) => self.job_output(token),
                    // Both directions closed (a client that shut down only its writing
                    // side still waits for its answer, and is served as usual).
                    token if event.is_write_closed() => self.hung_up(token),
                    token => self.serve(token),
                }
            }
            self.expire();
            if self
                .dispatcher
                .next_wakeup()
                .is_some_and(|at| at <= Instant::now())
            {
                let answers = self.dispatcher.tick();
                self.deliver(answers);
            }
            if stop {
                self.shutdown();
                return Ok(());
            }
            self.answer_next();
            if !self.stalled.is_empty() {
                self.resume_stalled();
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let (mut stream, _) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if fd_limit::out_of_descriptors(&e) => {
                    // Never leave the client waiting unanswered: close it at once.
                    let turned = self.spare.turn_away(&self.listener);
                    self.log_refusal(&format!(
                        "{e} with {} connections open: a client was closed at once; raise LimitNOFILE (or ulimit -n) or lower listener.max_connections",
                        self.connections.len()
                    ));
                    if turned {
                        continue;
                    }
                    return;
                }
                Err(e) => {
                    log::error!("accept failed: {e}");
                    return;
                }
            };
            if self.connections.len() >= self.max_connections {
                // Closed at once: the client sees the end of the stream, never a hang.
                self.log_refusal(&format!(
                    "{} open, the most served at once is {} (listener.max_connections = {})",
                    self.connections.len(),
                    self.max_connections,
                    self.config.max_connections
                ));
                continue;
            }
            let token = Token(self.next_token);
            self.next_token = self.next_token.wrapping_add(1).max(FIRST_CONNECTION);
            if let Err(e) = self
                .poll
                .registry()
                .register(&mut stream, token, Interest::READABLE)
            {
                log::error!("cannot watch a new connection: {e}");
                continue;
            }
            let peer = peer_credentials(&stream);
            let deadline = Instant::now() + self.config.read_timeout;
            self.connections
                .insert(token, Connection::new(stream, peer, deadline));
            self.deadlines.push_back((deadline, token));
            // The request may already be there.
            self.serve(token);
        }
    }

    /// Logs a refused connection, at most once a second (a flood stays out of the log).
    fn log_refusal(&mut self, why: &str) {
        let now = Instant::now();
        if self
            .last_refusal_log
            .map_or(true, |t| now.duration_since(t) >= Duration::from_secs(1))
        {
            log::warn!("refusing connections: {why}");
            self.last_refusal_log = Some(now);
        }
    }

    /// Moves one connection forward: read, answer, write.
    fn serve(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        if !connection.is_writing() {
            let response = match connection.read(self.config.body_len_limit, &mut self.budget) {
                Ok(Progress::Pending) => return,
                Ok(Progress::Stalled) => {
                    self.stalled.push_back(token);
                    let now = Instant::now();
                    if self
                        .last_budget_log
                        .map_or(true, |t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        log::warn!(
                            "holding {} request bytes (core_settings.connection_buffer_budget = {}): reading paused on {} connections until others finish",
                            self.budget.used,
                            self.budget.limit,
                            self.stalled.len()
                        );
                        self.last_budget_log = Some(now);
                    }
                    return;
                }
                Ok(Progress::Closed) => {
                    log::debug!("client closed its connection before sending a whole request");
                    self.close(token);
                    return;
                }
                Err(e) => {
                    log::debug!("reading a request failed: {e}");
                    self.close(token);
                    return;
                }
                Ok(Progress::Reject(status)) => {
                    log::warn!("request rejected before its body: status={status:?} ({status})");
                    Response::from_status(status)
                }
                Ok(Progress::Frame(frame)) => {
                    connection.queue();
                    if framing::is_cheap(&frame) {
                        self.ready_cheap.push_back((token, frame));
                    } else {
                        self.ready_heavy.push_back((token, frame));
                    }
                    return;
                }
            };
            connection.respond(framing::encode(response));
        }
        self.send(token);
    }

    /// Answers the next waiting request, if any; false when none waits.
    fn answer_next(&mut self) -> bool {
        let Some((token, frame)) = self
            .ready_cheap
            .pop_front()
            .or_else(|| self.ready_heavy.pop_front())
        else {
            return false;
        };
        let Some(connection) = self.connections.get_mut(&token) else {
            return true;
        };
        let dispatched = super::answer_frame(
            &mut self.dispatcher,
            &frame,
            connection.peer,
            self.config.body_len_limit,
        );
        self.handle(token, dispatched);
        true
    }

    /// Sends the responses of requests the workers have finished.
    fn deliver_completed(&mut self) {
        let answers = self.dispatcher.completed();
        self.deliver(answers);
        // Written (or queued behind a slow reader): removed keys' material may go now.
        self.dispatcher.answers_sent();
    }

    fn deliver(&mut self, answers: Vec<(u64, Dispatched)>) {
        for (ticket, dispatched) in answers {
            let Some(token) = self.queued.remove(&ticket) else {
                // Nobody waits for it (hung up, or answered at its deadline). A request
                // that has just gone to a child process must still be finished.
                if let Dispatched::Deferred(pending) = dispatched {
                    self.watch_job(None, pending);
                }
                continue;
            };
            self.handle(token, dispatched);
        }
    }

    /// Sends a response, or keeps track of a request still in hand, for one connection.
    fn handle(&mut self, token: Token, dispatched: Dispatched) {
        match dispatched {
            Dispatched::Done(response) => {
                if let Some(connection) = self.connections.get_mut(&token) {
                    connection.respond(framing::encode(response));
                    self.send(token);
                }
            }
            Dispatched::Deferred(pending) => self.watch_job(Some(token), pending),
            Dispatched::Queued(ticket) => {
                self.queued.insert(ticket, token);
            }
        }
    }

    /// Writes what the socket takes of a connection's response; closes it once sent.
    fn send(&mut self, token: Token) {
        let Some(connection) = self.connections.get_mut(&token) else {
            return;
        };
        match connection.write() {
            Ok(true) => self.close(token),
            Ok(false) => {
                if let Err(e) = self.poll.registry().reregister(
                    &mut connection.stream,
                    token,
                    Interest::WRITABLE,
                ) {
                    log::debug!("cannot wait to write a response: {e}");
                    self.close(token);
                }
            }
            Err(e) => {
                log::debug!("writing a response failed: {e}");
                self.close(token);
            }
        }
    }

    /// A client closed its connection. If its request is in hand, the dispatcher is told:
    /// a request still waiting for its provider is dropped, and a large random request stops
    /// at its next chunk (work nobody will read must not hold a device from the others).
    fn hung_up(&mut self, token: Token) {
        if !self
            .connections
            .get(&token)
            .is_some_and(Connection::is_queued)
        {
            self.serve(token);
            return;
        }
        let tickets: Vec<u64> = self
            .queued
            .iter()
            .filter(|(_, t)| **t == token)
            .map(|(ticket, _)| *ticket)
            .collect();
        for ticket in tickets {
            self.queued.remove(&ticket);
            self.dispatcher.cancel(ticket);
        }
        self.close(token);
    }

    fn close(&mut self, token: Token) {
        // Dropping the stream closes its only descriptor, which also removes it from the
        // epoll set: no deregister call (one system call fewer per request).
        if let Some(connection) = self.connections.remove(&token) {
            self.budget
                .release(connection.client(), connection.reserved);
        }
    }

    /// Reads again from connections that waited for room in the buffer budget, oldest first,
    /// while there is room (their data is in the socket already: no event will come).
    fn resume_stalled(&mut self) {
        for _ in 0..self.stalled.len() {
            // Nothing large fits in a full budget (small requests never stall).
            if self.budget.used >= self.budget.limit {
                return;
            }
            let Some(token) = self.stalled.pop_front() else {
                return;
            };
            if self.connections.get(&token).is_some_and(|c| c.is_stalled()) {
                self.serve(token);
            }
        }
    }

    /// The earliest deadline of a connection still open. Deadlines of closed connections are
    /// dropped here rather than when they close, so an idle service does not wake up for them.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some(&(deadline, token)) = self.deadlines.front() {
            match self.connections.get(&token) {
                Some(connection) if connection.deadline == deadline => return Some(deadline),
                _ => {
                    self.deadlines.pop_front();
                }
            }
        }
        None
    }

    /// Closes every connection whose deadline has passed.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, token)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(connection) = self.connections.get_mut(&token) else {
                continue;
            };
            if connection.deadline != deadline {
                continue; // the token was reused by a later connection
            }
            if connection.is_queued() || connection.is_stalled() {
                // The client sent its whole request in time (or the service stopped reading
                // it for want of buffer room); it waits for the service.
                let later = now + self.config.read_timeout;
                connection.deadline = later;
                self.deadlines.push_back((later, token));
                continue;
            }
            if !connection.is_writing() {
                log::warn!(
                    "client{} sent no complete request within {} ms: closing its connection",
                    connection
                        .peer
                        .map(|p| format!(" (uid {}, pid {})", p.uid, p.pid))
                        .unwrap_or_default(),
                    self.config.read_timeout.as_millis()
                );
                // Tell it why, as upstream does, if its socket has room.
                connection.respond(framing::encode(Response::from_status(
                    ResponseStatus::ConnectionError,
                )));
                let _ = connection.write();
            } else {
                log::warn!("client did not read its response in time: closing its connection");
            }
            self.close(token);
        }
    }
}
