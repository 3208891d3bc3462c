//! TCP plumbing for [`super::SocketComm`]: frame headers, deadline-bounded reads and
//! writes, and the hello records exchanged while the mesh is built.
//!
//! Every frame is `magic u32 | op u8 | 3 pad | seq u64 | len u64` followed by `len`
//! payload bytes, little endian. Each link numbers its frames per direction, so a
//! rank that issues a different collective than its peer gets a protocol error
//! instead of silently mixing payloads.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub const MAGIC: u32 = 0x4156_414c; // "LAVA" read as little-endian bytes
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 24;
pub const HELLO_LEN: usize = 40;
pub const ADDR_LEN: usize = 18;

/// Which operation a frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WireOp {
    AllReduce = 1,
    AllGather = 2,
    ReduceScatter = 3,
    AllToAll = 4,
    SendRecv = 5,
    Broadcast = 6,
    Barrier = 7,
    Split = 8,
}

impl WireOp {
    pub fn name(self) -> &'static str {
        match self {
            WireOp::AllReduce => "all_reduce",
            WireOp::AllGather => "all_gather",
            WireOp::ReduceScatter => "reduce_scatter",
            WireOp::AllToAll => "all_to_all",
            WireOp::SendRecv => "send/recv",
            WireOp::Broadcast => "broadcast",
            WireOp::Barrier => "barrier",
            WireOp::Split => "split",
        }
    }
}

pub fn encode_header(op: WireOp, seq: u64, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = op as u8;
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

/// Checks a received header against what this rank expects next on the link.
pub fn check_header(h: &[u8; HEADER_LEN], op: WireOp, seq: u64, len: usize) -> Result<(), String> {
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(format!("bad frame magic {magic:#x}"));
    }
    let got_seq = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    let got_len = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    if h[4] != op as u8 || got_seq != seq {
        return Err(format!(
            "ranks out of step: expected {} frame #{seq}, got op code {} frame #{got_seq}",
            op.name(),
            h[4]
        ));
    }
    if got_len != len as u64 {
        return Err(format!(
            "{} payload is {got_len} bytes, expected {len} (shapes differ between ranks?)",
            op.name()
        ));
    }
    Ok(())
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let rem = deadline.saturating_duration_since(Instant::now());
    if rem.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    } else {
        Ok(rem)
    }
}

/// Fills `buf` from `stream`; every read is bounded by what is left until `deadline`.
pub fn read_full(stream: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut pos = 0;
    let mut r = stream;
    while pos < buf.len() {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match r.read(&mut buf[pos..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by peer",
                ));
            }
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf`; every write is bounded by what is left until `deadline`.
pub fn write_full(stream: &TcpStream, buf: &[u8], deadline: Instant) -> io::Result<()> {
    let mut pos = 0;
    let mut w = stream;
    while pos < buf.len() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match w.write(&buf[pos..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "connection closed by peer",
                ));
            }
            Ok(n) => pos += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// True when an I/O error means "no answer in time" rather than "link gone".
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// First message on every link: who is connecting, to which job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub rank: u32,
    pub world: u32,
    /// Identifies one communicator (0 while joining rank 0, before it hands one out).
    pub token: u64,
    /// Port of the sender's own listener (mesh building), 0 when unused.
    pub port: u16,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&VERSION.to_le_bytes());
        b[8..12].copy_from_slice(&self.rank.to_le_bytes());
        b[12..16].copy_from_slice(&self.world.to_le_bytes());
        b[16..24].copy_from_slice(&self.token.to_le_bytes());
        b[24..26].copy_from_slice(&self.port.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, String> {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != MAGIC {
            return Err("connection is not a lava communicator peer".into());
        }
        if u32_at(4) != VERSION {
            return Err(format!(
                "peer speaks wire version {}, we speak {VERSION}",
                u32_at(4)
            ));
        }
        Ok(Hello {
            rank: u32_at(8),
            world: u32_at(12),
            token: u64::from_le_bytes(b[16..24].try_into().unwrap_or_default()),
            port: u16::from_le_bytes([b[24], b[25]]),
        })
    }
}

pub fn encode_addr(addr: SocketAddr) -> [u8; ADDR_LEN] {
    let ip6 = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut b = [0u8; ADDR_LEN];
    b[..16].copy_from_slice(&ip6.octets());
    b[16..].copy_from_slice(&addr.port().to_le_bytes());
    b
}

pub fn decode_addr(b: &[u8]) -> SocketAddr {
    let mut o = [0u8; 16];
    o.copy_from_slice(&b[..16]);
    let ip6 = Ipv6Addr::from(o);
    let ip = match ip6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(ip6),
    };
    SocketAddr::new(ip, u16::from_le_bytes([b[16], b[17]]))
}

/// Accepts one connection before `deadline` (std has no accept timeout, so poll).
pub fn accept_until(listener: &TcpListener, deadline: Instant) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                remaining(deadline)?;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `addr`, retrying while nobody listens yet, until `deadline`.
pub fn connect_until(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    loop {
        let rem = remaining(deadline)?;
        match TcpStream::connect_timeout(&addr, rem.min(Duration::from_secs(2))) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                ) =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Socket options every link gets.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_mismatch() {
        let h = encode_header(WireOp::AllGather, 7, 64);
        assert!(check_header(&h, WireOp::AllGather, 7, 64).is_ok());
        assert!(check_header(&h, WireOp::AllReduce, 7, 64).is_err());
        assert!(check_header(&h, WireOp::AllGather, 8, 64).is_err());
        let e = check_header(&h, WireOp::AllGather, 7, 32).unwrap_err();
        assert!(e.contains("64 bytes"), "{e}");
    }

    #[test]
    fn hello_and_addr_roundtrip() {
        let h = Hello {
            rank: 3,
            world: 4,
            token: 0xdead_beef_1234,
            port: 4567,
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad[0] ^= 1;
        assert!(Hello::decode(&bad).is_err());
        for a in ["127.0.0.1:80", "[::1]:65535", "10.1.2.3:0"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(decode_addr(&encode_addr(addr)), addr);
        }
    }
}
