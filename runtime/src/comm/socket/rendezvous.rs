//! Building a [`SocketComm`]: the rank-0 rendezvous, the mesh of links, and splits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{KResult, SocketComm, SocketOptions, rendezvous_err as rendezvous};
use crate::comm::CommErrorKind;
use crate::comm::wire::{self, Hello, WireOp};
use crate::{Error, Result};

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
