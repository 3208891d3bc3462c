//! [`SocketComm`]: a full TCP mesh between CPU ranks, in separate processes or in
//! threads of one process, so that every parallel layout runs in CI without a GPU.
//!
//! Rendezvous: rank 0 listens on an address the caller chooses; every other rank
//! connects to it, says who it is and on which port it listens, and gets back the
//! table of all listeners. Then each rank connects to the ranks below it and accepts
//! the ranks above it, giving one TCP link per pair of ranks.
//!
//! Every blocking read and write is bounded by the operation's deadline (the current
//! [`SocketComm::timeout`] from the start of the operation). A closed link or a
//! missed deadline becomes [`CommErrorKind::PeerLost`] or [`CommErrorKind::Timeout`]
//! naming the peer. After any such failure the communicator shuts all its links down,
//! so that its peers fail at once instead of waiting for their own timeouts, and
//! every later call returns [`CommErrorKind::Broken`].

use std::net::{IpAddr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

mod collectives;
mod rendezvous;

use super::CommErrorKind;
use super::wire::{self, WireOp};
use crate::{Error, Result};

const OK: u8 = 0;
const BROKEN: u8 = 1;
const ABORTED: u8 = 2;

/// Timeouts of a [`SocketComm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// Deadline of every operation, counted from its start.
    pub timeout: Duration,
    /// How long the rendezvous (and a split) may take in all.
    pub connect_timeout: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug)]
struct Link {
    stream: TcpStream,
    send_seq: AtomicU64,
    recv_seq: AtomicU64,
}

/// A communicator over TCP. See the module docs.
#[derive(Debug)]
pub struct SocketComm {
    rank: usize,
    world: usize,
    /// One link per peer rank; `None` at our own index.
    links: Vec<Option<Link>>,
    /// Address of this host as the peers see it; split listeners bind here.
    local_ip: IpAddr,
    token: u64,
    timeout_ms: AtomicU64,
    connect_timeout: Duration,
    state: AtomicU8,
    /// Serialises operations: frames of two collectives must never interleave.
    op_lock: Mutex<()>,
    splits: AtomicU64,
}

type KResult<T> = std::result::Result<T, CommErrorKind>;

pub(super) fn rendezvous_err(msg: impl Into<String>) -> CommErrorKind {
    CommErrorKind::Rendezvous(msg.into())
}

impl SocketComm {
    fn from_streams(
        rank: usize,
        world: usize,
        streams: Vec<Option<TcpStream>>,
        local_ip: IpAddr,
        token: u64,
        opts: SocketOptions,
    ) -> Self {
        let links = streams
            .into_iter()
            .map(|s| {
                s.map(|stream| Link {
                    stream,
                    send_seq: AtomicU64::new(0),
                    recv_seq: AtomicU64::new(0),
                })
            })
            .collect();
        SocketComm {
            rank,
            world,
            links,
            local_ip,
            token,
            timeout_ms: AtomicU64::new(opts.timeout.as_millis().try_into().unwrap_or(u64::MAX)),
            connect_timeout: opts.connect_timeout,
            state: AtomicU8::new(OK),
            op_lock: Mutex::new(()),
            splits: AtomicU64::new(0),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Deadline applied to each later operation, counted from its start.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    pub fn set_timeout(&self, timeout: Duration) {
        let ms = timeout.as_millis().clamp(1, u64::MAX as u128) as u64;
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    /// Shuts every link down. A blocked operation (in another thread) returns
    /// [`CommErrorKind::Aborted`] at once, peers see the links close, and every
    /// later call fails. Safe to call more than once.
    pub fn abort(&self) {
        self.state.store(ABORTED, Ordering::SeqCst);
        self.shutdown_links();
    }

    fn shutdown_links(&self) {
        for l in self.links.iter().flatten() {
            // Already-closed links report NotConnected; nothing more to do for them.
            let _ = l.stream.shutdown(Shutdown::Both);
        }
    }

    /// Marks the communicator unusable after a failed operation (see module docs).
    fn fail(&self) {
        let _ = self
            .state
            .compare_exchange(OK, BROKEN, Ordering::SeqCst, Ordering::SeqCst);
        self.shutdown_links();
    }

    fn err(&self, op: &'static str, kind: CommErrorKind) -> Error {
        Error::Comm {
            rank: self.rank,
            op,
            kind,
        }
    }

    fn check_state(&self) -> KResult<()> {
        match self.state.load(Ordering::SeqCst) {
            OK => Ok(()),
            ABORTED => Err(CommErrorKind::Aborted),
            _ => Err(CommErrorKind::Broken),
        }
    }

    /// Starts an operation: state check, exclusive use of the links, deadline.
    fn begin(&self, op: &'static str) -> Result<(MutexGuard<'_, ()>, Instant)> {
        self.check_state().map_err(|k| self.err(op, k))?;
        let guard = self.op_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_state().map_err(|k| self.err(op, k))?;
        Ok((guard, Instant::now() + self.timeout()))
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<()> {
        if peer >= self.world || peer == self.rank {
            return Err(self.err(
                op,
                CommErrorKind::InvalidArgument(format!(
                    "peer {peer} is not another rank of this {}-rank group",
                    self.world
                )),
            ));
        }
        Ok(())
    }

    fn link(&self, peer: usize) -> KResult<&Link> {
        self.links
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| CommErrorKind::InvalidArgument(format!("no link to rank {peer}")))
    }

    fn io_kind(&self, peer: usize, e: &std::io::Error) -> CommErrorKind {
        if self.state.load(Ordering::SeqCst) == ABORTED {
            CommErrorKind::Aborted
        } else if wire::is_timeout(e) {
            CommErrorKind::Timeout {
                peer: Some(peer),
                after: self.timeout(),
            }
        } else {
            CommErrorKind::PeerLost {
                peer,
                detail: e.to_string(),
            }
        }
    }

    fn write_frame(&self, op: WireOp, peer: usize, data: &[u8], deadline: Instant) -> KResult<()> {
        let link = self.link(peer)?;
        let seq = link.send_seq.fetch_add(1, Ordering::Relaxed);
        let header = wire::encode_header(op, seq, data.len());
        let res = if data.len() <= 4096 {
            // One segment for small frames (barriers, split records).
            let mut buf = Vec::with_capacity(wire::HEADER_LEN + data.len());
            buf.extend_from_slice(&header);
            buf.extend_from_slice(data);
            wire::write_full(&link.stream, &buf, deadline)
        } else {
            wire::write_full(&link.stream, &header, deadline)
                .and_then(|()| wire::write_full(&link.stream, data, deadline))
        };
        res.map_err(|e| self.io_kind(peer, &e))
    }

    fn read_frame(
        &self,
        op: WireOp,
        peer: usize,
        buf: &mut [u8],
        deadline: Instant,
    ) -> KResult<()> {
        let link = self.link(peer)?;
        let mut header = [0u8; wire::HEADER_LEN];
        wire::read_full(&link.stream, &mut header, deadline).map_err(|e| self.io_kind(peer, &e))?;
        let seq = link.recv_seq.fetch_add(1, Ordering::Relaxed);
        wire::check_header(&header, op, seq, buf.len())
            .map_err(|m| CommErrorKind::Protocol(format!("from rank {peer}: {m}")))?;
        wire::read_full(&link.stream, buf, deadline).map_err(|e| self.io_kind(peer, &e))
    }

    /// Peers in the order this rank sends to them: rank+1, rank+2, … (mod world).
    fn send_order(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.world).map(move |s| (self.rank + s) % self.world)
    }

    /// Peers in the order this rank receives from them: rank-1, rank-2, … (mod world).
    /// With `send_order` this schedule never deadlocks on full socket buffers.
    fn recv_order(&self) -> impl Iterator<Item = usize> + '_ {
        (1..self.world).map(move |s| (self.rank + self.world - s) % self.world)
    }

    /// Sends and receives whole frames at the same time: a scoped writer thread
    /// works through `sends` while this thread fills `recvs`. The first failure
    /// breaks the communicator (which also unblocks the other side) and is returned.
    fn exchange(
        &self,
        op: WireOp,
        sends: &[(usize, &[u8])],
        recvs: Vec<(usize, &mut [u8])>,
        deadline: Instant,
    ) -> Result<()> {
        let first: Mutex<Option<CommErrorKind>> = Mutex::new(None);
        let record = |k: CommErrorKind| {
            let mut f = first.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some(k);
            }
            drop(f);
            self.fail();
        };
        std::thread::scope(|s| {
            let writer = (!sends.is_empty()).then(|| {
                s.spawn(|| {
                    for (peer, data) in sends {
                        if let Err(k) = self.write_frame(op, *peer, data, deadline) {
                            record(k);
                            return;
                        }
                    }
                })
            });
            for (peer, buf) in recvs {
                if let Err(k) = self.read_frame(op, peer, buf, deadline) {
                    record(k);
                    break;
                }
            }
            if let Some(w) = writer
                && w.join().is_err()
            {
                record(CommErrorKind::Protocol("sender thread panicked".into()));
            }
        });
        match first.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(k) => Err(self.err(op.name(), k)),
            None => Ok(()),
        }
    }
}
