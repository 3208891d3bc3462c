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

use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::host::{Reducible, chunk_range, reduce_in_rank_order};
use super::wire::{self, Hello, WireOp};
use super::{CommErrorKind, ReduceOp};
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

fn rendezvous(msg: impl Into<String>) -> CommErrorKind {
    CommErrorKind::Rendezvous(msg.into())
}

impl SocketComm {
    /// Joins communicator `rank` of `world`: rank 0 binds `addr` and waits for the
    /// others, the others connect to `addr`.
    pub fn connect(
        addr: SocketAddr,
        rank: usize,
        world: usize,
        opts: SocketOptions,
    ) -> Result<Self> {
        if rank == 0 {
            let listener = TcpListener::bind(addr).map_err(|e| Error::Comm {
                rank,
                op: "rendezvous",
                kind: rendezvous(format!("cannot listen on {addr}: {e}")),
            })?;
            Self::host(listener, world, opts)
        } else {
            Self::join(addr, rank, world, opts)
        }
    }

    /// Rank 0 side of the rendezvous on a listener the caller bound (port 0 lets the
    /// OS choose; hand `listener.local_addr()` to the other ranks).
    pub fn host(listener: TcpListener, world: usize, opts: SocketOptions) -> Result<Self> {
        Self::host_inner(listener, world, opts).map_err(|kind| Error::Comm {
            rank: 0,
            op: "rendezvous",
            kind,
        })
    }

    /// Rank `rank` (≥ 1) side of the rendezvous: connects to rank 0 at `addr`.
    pub fn join(addr: SocketAddr, rank: usize, world: usize, opts: SocketOptions) -> Result<Self> {
        Self::join_inner(addr, rank, world, opts).map_err(|kind| Error::Comm {
            rank,
            op: "rendezvous",
            kind,
        })
    }

    /// `world` connected communicators over loopback, one per rank, built on threads;
    /// move each into the thread that plays its rank.
    pub fn local_group(world: usize, opts: SocketOptions) -> Result<Vec<Self>> {
        let err = |kind| Error::Comm {
            rank: 0,
            op: "rendezvous",
            kind,
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| err(rendezvous(format!("cannot listen on loopback: {e}"))))?;
        let addr = listener
            .local_addr()
            .map_err(|e| err(rendezvous(e.to_string())))?;
        let joiners: Vec<_> = (1..world)
            .map(|r| std::thread::spawn(move || Self::join(addr, r, world, opts)))
            .collect();
        let host = Self::host(listener, world, opts);
        let mut comms = vec![host];
        for j in joiners {
            comms.push(
                j.join()
                    .unwrap_or_else(|_| Err(err(rendezvous("joiner thread panicked")))),
            );
        }
        comms.into_iter().collect()
    }

    fn host_inner(listener: TcpListener, world: usize, opts: SocketOptions) -> KResult<Self> {
        if world == 0 {
            return Err(CommErrorKind::InvalidArgument(
                "world size must be at least 1".into(),
            ));
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let io = |what: &str, e: std::io::Error| rendezvous(format!("{what}: {e}"));
        let mut local_ip = listener
            .local_addr()
            .map_err(|e| io("listener address", e))?
            .ip();
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut addrs = vec![[0u8; wire::ADDR_LEN]; world];
        let mut joined = 0;
        while joined < world - 1 {
            let s = wire::accept_until(&listener, deadline).map_err(|e| {
                rendezvous(format!(
                    "{joined} of {} ranks joined before the deadline ({e})",
                    world - 1
                ))
            })?;
            wire::tune(&s).map_err(|e| io("socket options", e))?;
            let mut b = [0u8; wire::HELLO_LEN];
            if wire::read_full(&s, &mut b, deadline).is_err() {
                continue; // a stray connection that never spoke
            }
            let Ok(h) = Hello::decode(&b) else { continue };
            let r = h.rank as usize;
            if h.world as usize != world || r == 0 || r >= world || h.token != 0 {
                return Err(rendezvous(format!(
                    "rank {r} joined with world {} (expected world {world})",
                    h.world
                )));
            }
            if streams[r].is_some() {
                return Err(rendezvous(format!("two processes joined as rank {r}")));
            }
            let peer_ip = s.peer_addr().map_err(|e| io("peer address", e))?.ip();
            local_ip = s.local_addr().map_err(|e| io("local address", e))?.ip();
            addrs[r] = wire::encode_addr(SocketAddr::new(peer_ip, h.port));
            streams[r] = Some(s);
            joined += 1;
        }
        let token = new_token(&listener);
        let mut table = token.to_le_bytes().to_vec();
        for a in &addrs {
            table.extend_from_slice(a);
        }
        for (r, s) in streams.iter().enumerate() {
            if let Some(s) = s {
                wire::write_full(s, &table, deadline)
                    .map_err(|e| rendezvous(format!("sending the rank table to rank {r}: {e}")))?;
            }
        }
        if local_ip.is_unspecified() {
            local_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        }
        Ok(Self::from_streams(0, world, streams, local_ip, token, opts))
    }

    fn join_inner(
        addr: SocketAddr,
        rank: usize,
        world: usize,
        opts: SocketOptions,
    ) -> KResult<Self> {
        if rank == 0 || rank >= world {
            return Err(CommErrorKind::InvalidArgument(format!(
                "joining rank must be in 1..{world}, got {rank}"
            )));
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let io = |what: &str, e: std::io::Error| rendezvous(format!("{what}: {e}"));
        let to_root = wire::connect_until(addr, deadline)
            .map_err(|e| rendezvous(format!("cannot reach rank 0 at {addr}: {e}")))?;
        wire::tune(&to_root).map_err(|e| io("socket options", e))?;
        let local_ip = to_root
            .local_addr()
            .map_err(|e| io("local address", e))?
            .ip();
        let listener = TcpListener::bind((local_ip, 0)).map_err(|e| io("listen", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| io("listener address", e))?
            .port();
        let hello = Hello {
            rank: rank as u32,
            world: world as u32,
            token: 0,
            port,
        };
        wire::write_full(&to_root, &hello.encode(), deadline)
            .map_err(|e| io("hello to rank 0", e))?;
        let mut table = vec![0u8; 8 + world * wire::ADDR_LEN];
        wire::read_full(&to_root, &mut table, deadline).map_err(|e| {
            rendezvous(format!(
                "no rank table from rank 0 ({e}); did it reject us?"
            ))
        })?;
        let token = u64::from_le_bytes(table[..8].try_into().unwrap_or_default());
        let addrs: Vec<SocketAddr> = table[8..]
            .chunks_exact(wire::ADDR_LEN)
            .map(wire::decode_addr)
            .collect();
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        streams[0] = Some(to_root);
        build_mesh(rank, &addrs, 1, &listener, token, deadline, &mut streams)?;
        Ok(Self::from_streams(
            rank, world, streams, local_ip, token, opts,
        ))
    }

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

    // ---- collectives on host buffers -------------------------------------------

    /// Element-wise reduction over all ranks, in place. Every element is reduced once
    /// by the rank owning its chunk, in rank order with f32 accumulation, so all
    /// ranks end with identical bits.
    pub fn all_reduce_slice<T: Reducible>(&self, data: &mut [T], op: ReduceOp) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let (_g, deadline) = self.begin("all_reduce")?;
        let (n, w, me) = (data.len(), self.world, self.rank);
        let mine = chunk_range(n, w, me);
        // Phase 1: chunk j goes to rank j; our chunk arrives from everyone.
        let mut parts: Vec<Vec<T>> = (0..w)
            .map(|i| {
                if i == me {
                    Vec::new()
                } else {
                    vec![T::zeroed(); mine.len()]
                }
            })
            .collect();
        {
            let sends: Vec<(usize, &[u8])> = self
                .send_order()
                .map(|j| (j, bytemuck::cast_slice(&data[chunk_range(n, w, j)])))
                .collect();
            let mut slots: Vec<Option<&mut [u8]>> = parts
                .iter_mut()
                .map(|p| Some(bytemuck::cast_slice_mut(p.as_mut_slice())))
                .collect();
            let recvs = self
                .recv_order()
                .filter_map(|i| slots[i].take().map(|b| (i, b)))
                .collect();
            self.exchange(WireOp::AllReduce, &sends, recvs, deadline)?;
        }
        let mut reduced = vec![T::zeroed(); mine.len()];
        {
            let views: Vec<&[T]> = (0..w)
                .map(|i| {
                    if i == me {
                        &data[mine.clone()]
                    } else {
                        &parts[i][..]
                    }
                })
                .collect();
            reduce_in_rank_order(op, &views, &mut reduced);
        }
        // Phase 2: everyone gathers the reduced chunks.
        data[mine].copy_from_slice(&reduced);
        let sends: Vec<(usize, &[u8])> = self
            .send_order()
            .map(|j| (j, bytemuck::cast_slice(&reduced[..])))
            .collect();
        let sizes: Vec<usize> = (0..w).map(|i| chunk_range(n, w, i).len()).collect();
        let mut slots: Vec<Option<&mut [T]>> =
            split_sizes(data, &sizes).into_iter().map(Some).collect();
        slots[me] = None;
        let recvs = self
            .recv_order()
            .filter_map(|i| slots[i].take().map(|b| (i, bytemuck::cast_slice_mut(b))))
            .collect();
        self.exchange(WireOp::AllReduce, &sends, recvs, deadline)
    }

    /// Reduces `input` (world × m elements) over all ranks and returns this rank's
    /// m-element chunk, with the same determinism as [`Self::all_reduce_slice`].
    pub fn reduce_scatter_slice<T: Reducible>(&self, input: &[T], op: ReduceOp) -> Result<Vec<T>> {
        let w = self.world;
        if !input.len().is_multiple_of(w) {
            return Err(self.err(
                "reduce_scatter",
                CommErrorKind::InvalidArgument(format!(
                    "{} elements do not split into {w} chunks",
                    input.len()
                )),
            ));
        }
        let m = input.len() / w;
        let me = self.rank;
        if w == 1 {
            return Ok(input.to_vec());
        }
        let (_g, deadline) = self.begin("reduce_scatter")?;
        let mut parts: Vec<Vec<T>> = (0..w)
            .map(|i| {
                if i == me {
                    Vec::new()
                } else {
                    vec![T::zeroed(); m]
                }
            })
            .collect();
        {
            let sends: Vec<(usize, &[u8])> = self
                .send_order()
                .map(|j| (j, bytemuck::cast_slice(&input[j * m..(j + 1) * m])))
                .collect();
            let mut slots: Vec<Option<&mut [u8]>> = parts
                .iter_mut()
                .map(|p| Some(bytemuck::cast_slice_mut(p.as_mut_slice())))
                .collect();
            let recvs = self
                .recv_order()
                .filter_map(|i| slots[i].take().map(|b| (i, b)))
                .collect();
            self.exchange(WireOp::ReduceScatter, &sends, recvs, deadline)?;
        }
        let views: Vec<&[T]> = (0..w)
            .map(|i| {
                if i == me {
                    &input[me * m..(me + 1) * m]
                } else {
                    &parts[i][..]
                }
            })
            .collect();
        let mut out = vec![T::zeroed(); m];
        reduce_in_rank_order(op, &views, &mut out);
        Ok(out)
    }

    /// Concatenates every rank's `input` (all of equal length) in rank order.
    pub fn all_gather_bytes(&self, input: &[u8]) -> Result<Vec<u8>> {
        let n = input.len();
        let mut out = vec![0u8; n * self.world];
        out[self.rank * n..(self.rank + 1) * n].copy_from_slice(input);
        if self.world == 1 {
            return Ok(out);
        }
        let (_g, deadline) = self.begin("all_gather")?;
        let sends: Vec<(usize, &[u8])> = self.send_order().map(|j| (j, input)).collect();
        self.gather_into(WireOp::AllGather, &sends, &mut out, n, deadline)?;
        Ok(out)
    }

    /// `input` is world equal chunks; chunk j goes to rank j, and the result holds
    /// the chunks received from ranks 0, 1, … in order.
    pub fn all_to_all_bytes(&self, input: &[u8]) -> Result<Vec<u8>> {
        let w = self.world;
        if !input.len().is_multiple_of(w) {
            return Err(self.err(
                "all_to_all",
                CommErrorKind::InvalidArgument(format!(
                    "{} bytes do not split into {w} chunks",
                    input.len()
                )),
            ));
        }
        let c = input.len() / w;
        let me = self.rank;
        let mut out = vec![0u8; input.len()];
        out[me * c..(me + 1) * c].copy_from_slice(&input[me * c..(me + 1) * c]);
        if w == 1 {
            return Ok(out);
        }
        let (_g, deadline) = self.begin("all_to_all")?;
        let sends: Vec<(usize, &[u8])> = self
            .send_order()
            .map(|j| (j, &input[j * c..(j + 1) * c]))
            .collect();
        self.gather_into(WireOp::AllToAll, &sends, &mut out, c, deadline)?;
        Ok(out)
    }

    /// Receives chunk i (of `chunk` bytes) of `out` from every rank i ≠ self.
    fn gather_into(
        &self,
        op: WireOp,
        sends: &[(usize, &[u8])],
        out: &mut [u8],
        chunk: usize,
        deadline: Instant,
    ) -> Result<()> {
        let sizes = vec![chunk; self.world];
        let mut slots: Vec<Option<&mut [u8]>> =
            split_sizes(out, &sizes).into_iter().map(Some).collect();
        slots[self.rank] = None;
        let recvs = self
            .recv_order()
            .filter_map(|i| slots[i].take().map(|b| (i, b)))
            .collect();
        self.exchange(op, sends, recvs, deadline)
    }

    /// Copies `root`'s `buf` into `buf` on every rank (all ranks pass equal lengths).
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(self.err(
                "broadcast",
                CommErrorKind::InvalidArgument(format!(
                    "root {root} outside a {}-rank group",
                    self.world
                )),
            ));
        }
        if self.world == 1 {
            return Ok(());
        }
        let (_g, deadline) = self.begin("broadcast")?;
        if self.rank == root {
            let sends: Vec<(usize, &[u8])> = self.send_order().map(|j| (j, &*buf)).collect();
            self.exchange(WireOp::Broadcast, &sends, Vec::new(), deadline)
        } else {
            self.exchange(WireOp::Broadcast, &[], vec![(root, buf)], deadline)
        }
    }

    /// Sends `data` to `peer`; returns once the bytes are handed to the kernel.
    pub fn send_bytes(&self, data: &[u8], peer: usize) -> Result<()> {
        self.check_peer("send", peer)?;
        let (_g, deadline) = self.begin("send")?;
        self.write_frame(WireOp::SendRecv, peer, data, deadline)
            .map_err(|k| {
                self.fail();
                self.err("send", k)
            })
    }

    /// Receives exactly `buf.len()` bytes sent by `peer` with [`Self::send_bytes`].
    pub fn recv_bytes(&self, buf: &mut [u8], peer: usize) -> Result<()> {
        self.check_peer("recv", peer)?;
        let (_g, deadline) = self.begin("recv")?;
        self.read_frame(WireOp::SendRecv, peer, buf, deadline)
            .map_err(|k| {
                self.fail();
                self.err("recv", k)
            })
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let (_g, deadline) = self.begin("barrier")?;
        let sends: Vec<(usize, &[u8])> = self.send_order().map(|j| (j, &[][..])).collect();
        let mut empty: Vec<[u8; 0]> = vec![[]; self.world];
        let recvs = self
            .recv_order()
            .zip(empty.iter_mut())
            .map(|(i, e)| (i, &mut e[..]))
            .collect();
        self.exchange(WireOp::Barrier, &sends, recvs, deadline)
    }

    /// Collective over this communicator: ranks passing the same `color` form a new
    /// communicator, ranked by `(key, rank in self)`. It gets its own links, so it is
    /// independent of its parent and of its siblings.
    pub fn split(&self, color: u32, key: u32) -> Result<SocketComm> {
        let (_g, _) = self.begin("split")?;
        let deadline = Instant::now() + self.connect_timeout.max(self.timeout());
        let e = |k| self.err("split", k);
        let io = |what: &str, err: std::io::Error| e(rendezvous(format!("{what}: {err}")));
        let listener = TcpListener::bind((self.local_ip, 0)).map_err(|x| io("listen", x))?;
        let my_addr = listener
            .local_addr()
            .map_err(|x| io("listener address", x))?;
        let mut record = [0u8; 8 + wire::ADDR_LEN];
        record[0..4].copy_from_slice(&color.to_le_bytes());
        record[4..8].copy_from_slice(&key.to_le_bytes());
        record[8..].copy_from_slice(&wire::encode_addr(my_addr));
        let rl = record.len();
        let mut all = vec![0u8; rl * self.world];
        all[self.rank * rl..(self.rank + 1) * rl].copy_from_slice(&record);
        let sends: Vec<(usize, &[u8])> = self.send_order().map(|j| (j, &record[..])).collect();
        self.gather_into(WireOp::Split, &sends, &mut all, rl, deadline)?;
        let mut members: Vec<(u32, usize, SocketAddr)> = all
            .chunks_exact(rl)
            .enumerate()
            .filter(|(_, r)| r[0..4] == color.to_le_bytes())
            .map(|(i, r)| {
                (
                    u32::from_le_bytes([r[4], r[5], r[6], r[7]]),
                    i,
                    wire::decode_addr(&r[8..]),
                )
            })
            .collect();
        members.sort_by_key(|&(k, r, _)| (k, r));
        let new_rank = members
            .iter()
            .position(|&(_, r, _)| r == self.rank)
            .unwrap_or(0);
        let addrs: Vec<SocketAddr> = members.iter().map(|&(_, _, a)| a).collect();
        let n = self.splits.fetch_add(1, Ordering::Relaxed);
        let token = mix(self.token ^ mix(n.wrapping_add(1)) ^ mix(u64::from(color) << 32 | 0x5EED));
        let mut streams: Vec<Option<TcpStream>> = (0..addrs.len()).map(|_| None).collect();
        build_mesh(
            new_rank,
            &addrs,
            0,
            &listener,
            token,
            deadline,
            &mut streams,
        )
        .map_err(|k| {
            self.fail();
            e(k)
        })?;
        let opts = SocketOptions {
            timeout: self.timeout(),
            connect_timeout: self.connect_timeout,
        };
        Ok(Self::from_streams(
            new_rank,
            addrs.len(),
            streams,
            self.local_ip,
            token,
            opts,
        ))
    }
}

/// Connects to the ranks in `connect_from..rank` and accepts the ranks above `rank`.
fn build_mesh(
    rank: usize,
    addrs: &[SocketAddr],
    connect_from: usize,
    listener: &TcpListener,
    token: u64,
    deadline: Instant,
    streams: &mut [Option<TcpStream>],
) -> KResult<()> {
    let world = addrs.len();
    let hello = Hello {
        rank: rank as u32,
        world: world as u32,
        token,
        port: 0,
    }
    .encode();
    for (j, &addr) in addrs.iter().enumerate().take(rank).skip(connect_from) {
        let s = wire::connect_until(addr, deadline).map_err(|e| CommErrorKind::PeerLost {
            peer: j,
            detail: format!("cannot connect to {addr}: {e}"),
        })?;
        wire::tune(&s).map_err(|e| rendezvous(e.to_string()))?;
        wire::write_full(&s, &hello, deadline).map_err(|e| CommErrorKind::PeerLost {
            peer: j,
            detail: format!("hello failed: {e}"),
        })?;
        streams[j] = Some(s);
    }
    let mut missing = world - rank - 1;
    while missing > 0 {
        let s = wire::accept_until(listener, deadline).map_err(|e| {
            let waiting: Vec<usize> = (rank + 1..world)
                .filter(|&r| streams[r].is_none())
                .collect();
            rendezvous(format!("ranks {waiting:?} did not connect ({e})"))
        })?;
        let mut b = [0u8; wire::HELLO_LEN];
        if wire::read_full(&s, &mut b, deadline).is_err() {
            continue;
        }
        let Ok(h) = Hello::decode(&b) else { continue };
        let r = h.rank as usize;
        // Connections from other jobs or other splits carry another token: ignore them.
        if h.token != token
            || h.world as usize != world
            || r <= rank
            || r >= world
            || streams[r].is_some()
        {
            continue;
        }
        wire::tune(&s).map_err(|e| rendezvous(e.to_string()))?;
        streams[r] = Some(s);
        missing -= 1;
    }
    Ok(())
}

/// Splits `buf` into consecutive pieces of the given lengths.
fn split_sizes<'a, T>(mut buf: &'a mut [T], sizes: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(sizes.len());
    for &s in sizes {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(s);
        out.push(head);
        buf = tail;
    }
    out
}

/// splitmix64 finaliser: spreads bits so tokens of different groups differ.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A token that differs between jobs: time, process id and port.
fn new_token(listener: &TcpListener) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    mix(nanos ^ (u64::from(std::process::id()) << 32) ^ u64::from(port)) | 1
}
