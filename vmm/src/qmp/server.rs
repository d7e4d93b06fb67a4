//! The QMP server: the listening socket and its client sessions.
//!
//! It does no command execution itself: [`Monitor::read`] turns a client's bytes into requests,
//! the control loop executes them and hands the responses back with [`Monitor::reply`]. Client
//! sockets are non-blocking and edge-triggered; output that does not fit into a socket waits in
//! a per-client buffer, and a client that stops reading for good is dropped rather than allowed
//! to stall the VMM. Several clients may be connected; events go to every client that has
//! finished capabilities negotiation.
//!
//! Across a live update the listening socket and every connected client are preserved (see
//! [`Monitor::preserved_fds`]): clients keep their connection and their negotiated state, and the
//! socket path never refuses a connection.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use cpr_common::cpr::FdKind;

use super::protocol::{
    Action, Event, EventKind, Greeting, JsonStreamer, Request, Response, Session, VersionInfo,
};

pub type ClientId = u64;

/// The name the listening socket is preserved under across a live update.
pub const QMP_LISTENER_NAME: &str = "qmp-listener";

/// A client whose unsent output exceeds this is not reading; it is disconnected.
const MAX_PENDING_OUTPUT: usize = 8 << 20;

struct Client {
    stream: UnixStream,
    streamer: JsonStreamer,
    session: Session,
    pending: Vec<u8>,
    /// Handed over by a live update and not read since: what it holds was sent before the
    /// update ended (see [`Monitor::first_read_after_update`]).
    inherited_unread: bool,
}

impl Client {
    fn new(stream: UnixStream, session: Session) -> Self {
        Client {
            stream,
            streamer: JsonStreamer::new(),
            session,
            pending: Vec::new(),
            inherited_unread: false,
        }
    }

    /// Queues `text` and writes as much as the socket takes. False: the client is gone.
    fn send(&mut self, text: &str) -> bool {
        self.pending.extend_from_slice(text.as_bytes());
        self.flush()
    }

    /// Writes pending output until done or the socket is full. False: the client is gone.
    fn flush(&mut self) -> bool {
        while !self.pending.is_empty() {
            match self.stream.write(&self.pending) {
                Ok(0) => return false,
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return self.pending.len() <= MAX_PENDING_OUTPUT;
                }
                Err(_) => return false,
            }
        }
        true
    }
}

/// What reading a client produced.
pub struct ReadOutcome {
    /// Commands to execute, in order.
    pub requests: Vec<Request>,
    /// The client closed its end (after the requests above).
    pub closed: bool,
}

pub struct Monitor {
    listener: UnixListener,
    clients: BTreeMap<ClientId, Client>,
    next_id: ClientId,
    greeting: String,
}

impl Monitor {
    /// Binds `path` (mode 0600); fails if another process is listening there.
    pub fn bind(path: &Path, version: VersionInfo) -> io::Result<Self> {
        let listener = crate::unix_socket::bind_listener(path)?;
        Ok(Self::with_listener(listener, version))
    }

    fn with_listener(listener: UnixListener, version: VersionInfo) -> Self {
        let _ = listener.set_nonblocking(true);
        Monitor {
            listener,
            clients: BTreeMap::new(),
            next_id: 1,
            greeting: Greeting::new(version).to_line(),
        }
    }

    /// Takes over a listener and connected clients from the previous process. Clients keep their
    /// negotiation state and get no second greeting.
    pub fn from_inherited(
        listener: OwnedFd,
        clients: Vec<(OwnedFd, bool)>,
        version: VersionInfo,
    ) -> Self {
        let mut m = Self::with_listener(UnixListener::from(listener), version);
        for (fd, negotiated) in clients {
            let stream = UnixStream::from(fd);
            let _ = stream.set_nonblocking(true);
            let session = if negotiated {
                Session::negotiated()
            } else {
                Session::new()
            };
            let id = m.next_id;
            m.next_id += 1;
            let mut client = Client::new(stream, session);
            client.inherited_unread = true;
            m.clients.insert(id, client);
        }
        m
    }

    /// Whether this is the first read of a client handed over by a live update (and from now
    /// on, no longer): commands in it were sent while the update ran, under the previous VMM's
    /// migration parameters, which the new VMM does not have.
    pub fn first_read_after_update(&mut self, id: ClientId) -> bool {
        self.clients
            .get_mut(&id)
            .is_some_and(|c| std::mem::take(&mut c.inherited_unread))
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    pub fn client_fds(&self) -> Vec<(ClientId, RawFd)> {
        self.clients
            .iter()
            .map(|(id, c)| (*id, c.stream.as_raw_fd()))
            .collect()
    }

    /// Accepts every waiting connection and greets it. Returns the new clients.
    pub fn accept(&mut self) -> Vec<(ClientId, RawFd)> {
        let mut new = Vec::new();
        loop {
            let stream = match crate::unix_socket::accept(&self.listener) {
                Ok(Some(stream)) => stream,
                Ok(None) => return new,
                Err(e) => {
                    log::warn!("QMP: accept failed: {e}");
                    return new;
                }
            };
            let _ = stream.set_nonblocking(true);
            let mut client = Client::new(stream, Session::new());
            if !client.send(&self.greeting) {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            new.push((id, client.stream.as_raw_fd()));
            self.clients.insert(id, client);
        }
    }

    /// Reads everything the client sent. Protocol-level replies (parse errors, negotiation) are
    /// sent here; commands are returned for the caller to execute.
    pub fn read(&mut self, id: ClientId) -> ReadOutcome {
        let mut out = ReadOutcome {
            requests: Vec::new(),
            closed: false,
        };
        let Some(client) = self.clients.get_mut(&id) else {
            out.closed = true;
            return out;
        };
        let mut buf = [0u8; 16 << 10];
        loop {
            match client.stream.read(&mut buf) {
                Ok(0) => {
                    out.closed = true;
                    break;
                }
                Ok(n) => {
                    for message in client.streamer.feed(&buf[..n]) {
                        match client.session.handle(message) {
                            Action::Reply(r) => {
                                if !client.send(&r.to_line()) {
                                    out.closed = true;
                                }
                            }
                            Action::Execute(req) => out.requests.push(req),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    out.closed = true;
                    break;
                }
            }
        }
        out
    }

    /// Sends a command's response. A client that is gone is removed.
    pub fn reply(&mut self, id: ClientId, response: &Response) {
        let line = response.to_line();
        if let Some(c) = self.clients.get_mut(&id)
            && !c.send(&line)
        {
            self.remove(id);
        }
    }

    /// Continues writing after the socket became writable again.
    pub fn writable(&mut self, id: ClientId) {
        if let Some(c) = self.clients.get_mut(&id)
            && !c.flush()
        {
            self.remove(id);
        }
    }

    /// Sends an event to every negotiated client.
    pub fn broadcast(&mut self, kind: &EventKind) {
        self.broadcast_at(kind, SystemTime::now());
    }

    pub fn broadcast_at(&mut self, kind: &EventKind, at: SystemTime) {
        let line = Event::new(kind, at).to_line();
        let mut gone = Vec::new();
        for (id, c) in self.clients.iter_mut() {
            if c.session.is_negotiated() && !c.send(&line) {
                gone.push(*id);
            }
        }
        for id in gone {
            self.remove(id);
        }
    }

    pub fn remove(&mut self, id: ClientId) {
        self.clients.remove(&id);
    }

    /// Writes all pending output, waiting up to `timeout` for slow readers (before exit or exec,
    /// so replies and events are not lost).
    pub fn drain_output(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for c in self.clients.values_mut() {
            if c.pending.is_empty() {
                continue;
            }
            let _ = c.stream.set_nonblocking(false);
            let _ = c.stream.set_write_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ));
            let _ = c.stream.write_all(&c.pending);
            c.pending.clear();
            let _ = c.stream.set_nonblocking(true);
        }
    }

    /// Writes what each client's socket accepts right now, without waiting (for the moment
    /// just before an exec, with the guest stopped). A client whose socket takes nothing loses
    /// those messages; one that takes only part of them is disconnected, since a cut message
    /// would break its stream (it sees EOF and can connect again).
    pub fn flush_nonblocking(&mut self) {
        let mut cut = Vec::new();
        for (id, c) in &mut self.clients {
            if c.pending.is_empty() {
                continue;
            }
            let _ = c.stream.set_nonblocking(true);
            match std::io::Write::write(&mut c.stream, &c.pending) {
                Ok(n) if n == c.pending.len() => {}
                Ok(0) | Err(_) => {
                    log::warn!("QMP client {id} is not reading; its output is dropped")
                }
                Ok(_) => cut.push(*id),
            }
            c.pending.clear();
        }
        // Shut down, not closed: the fd is already listed among those the exec hands over.
        for id in cut {
            log::warn!("QMP client {id} is not reading; disconnected before the exec");
            if let Some(c) = self.clients.get(&id) {
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    /// The fds that must survive a live update: the listener and each client, with whether it
    /// has negotiated capabilities.
    pub fn preserved_fds(&self) -> Vec<(FdKind, String, RawFd)> {
        let mut out = vec![(
            FdKind::QmpListener,
            QMP_LISTENER_NAME.to_string(),
            self.listener.as_raw_fd(),
        )];
        for (id, c) in &self.clients {
            out.push((
                FdKind::QmpClient {
                    negotiated: c.session.is_negotiated(),
                },
                format!("qmp-client-{id}"),
                c.stream.as_raw_fd(),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// A client handed over by a live update is "first read after the update" exactly once,
    /// and a client that connects afterwards never is.
    #[test]
    fn only_the_first_read_of_a_handed_over_client_counts_as_during_the_update() {
        let dir = std::env::temp_dir().join(format!("cpr-qmp-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let listener = UnixListener::bind(&dir).unwrap();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut m = Monitor::from_inherited(
            OwnedFd::from(listener),
            vec![(OwnedFd::from(ours), true)],
            crate::control::qmp_version(),
        );
        let inherited: Vec<ClientId> = m.client_fds().into_iter().map(|(c, _)| c).collect();
        assert_eq!(inherited.len(), 1);
        assert!(m.first_read_after_update(inherited[0]));
        assert!(!m.first_read_after_update(inherited[0]));
        let _late = UnixStream::connect(&dir).unwrap();
        assert_eq!(m.accept().len(), 1);
        assert_eq!(m.client_fds().len(), 2);
        for (id, _) in m.client_fds() {
            assert!(!m.first_read_after_update(id), "client {id}");
        }
        let _ = std::fs::remove_file(&dir);
    }
}
