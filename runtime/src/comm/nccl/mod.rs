//! [`NcclComm`]: NCCL over `cudarc::nccl::sys` (feature `cuda`).
//!
//! cudarc's safe `nccl::Comm` cannot be split, has no all-to-all, blocks in init and
//! panics in `Drop` if the abort fails, so this module owns the raw `ncclComm_t`:
//!
//! - [`NcclId`]: the 128-byte unique id, as bytes for our control plane.
//! - Communicators are created non-blocking (`ncclConfig_t.blocking = 0`): init,
//!   split and grouped calls return `ncclInProgress` and we poll
//!   `ncclCommGetAsyncError` against the timeout, so a rank that never shows up
//!   is a [`CommErrorKind::Timeout`], not a hang.
//! - Collectives are queued on the communicator's stream (the device's compute stream,
//!   so no events are needed). [`NcclComm::synchronize`] waits for them with a deadline
//!   and aborts the communicator when it passes; [`NcclComm::check`] is the
//!   non-blocking health probe (`ncclCommGetAsyncError`).
//! - `all_to_all` is a group of `ncclSend`/`ncclRecv` pairs, one per peer (as
//!   PyTorch does); `split` is `ncclCommSplit`.
//!
//! Unlike [`super::SocketComm`], NCCL's reduction order is NCCL's: sums are not
//! bit-identical to the rank-order reference.

use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::CudaStream;
use cudarc::driver::sys::{CUresult, cuStreamQuery};
use cudarc::nccl::sys;

mod ops;
mod tensor;

use super::{CommErrorKind, ReduceOp};
use crate::{DType, Error, Result};

/// The id every rank of a new communicator passes to [`NcclComm::init`]. Rank 0 makes
/// it and ships [`NcclId::to_bytes`] to the others over the control plane.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; 128]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}…)", &self.0[..8])
    }
}

impl NcclId {
    /// `ncclGetUniqueId` (needs libnccl, not a GPU).
    pub fn new() -> Result<Self> {
        library_present("nccl_id")?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        // SAFETY: `id` is a valid, writable ncclUniqueId; the library is loaded (checked).
        let r = unsafe { sys::ncclGetUniqueId(&mut id) };
        check(None, "nccl_id", 0, r)?;
        Ok(NcclId(id.internal.map(|c| c as u8)))
    }

    pub fn to_bytes(&self) -> [u8; 128] {
        self.0
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let b: [u8; 128] = bytes.try_into().map_err(|_| Error::Comm {
            rank: 0,
            op: "nccl_id",
            kind: CommErrorKind::InvalidArgument(format!(
                "an NCCL id is 128 bytes, got {}",
                bytes.len()
            )),
        })?;
        Ok(NcclId(b))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as std::ffi::c_char),
        }
    }
}

/// A communicator over NCCL. See the module docs.
#[derive(Debug)]
pub struct NcclComm {
    /// Guarded: NCCL communicators must not be used by two threads at once.
    comm: Mutex<sys::ncclComm_t>,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    timeout_ms: AtomicU64,
    /// Set by [`NcclComm::abort`] from any thread; the holder of `comm` acts on it.
    abort_requested: AtomicBool,
    /// The handle was aborted (or destroyed) and must not be used again.
    dead: AtomicBool,
}

// SAFETY: the raw ncclComm_t is only touched while holding the `comm` mutex, so no two
// threads use it at once (NCCL's rule: a communicator is not thread-safe, but may be
// used from any thread). The stream is a cudarc `Arc<CudaStream>`, itself Send + Sync.
unsafe impl Send for NcclComm {}
// SAFETY: as for Send; every method takes the mutex before using the handle.
unsafe impl Sync for NcclComm {}

fn library_present(op: &'static str) -> Result<()> {
    // SAFETY: only attempts to dlopen the candidate names; loads nothing else.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Comm {
            rank: 0,
            op,
            kind: CommErrorKind::Backend(
                "libnccl is not loadable: put a folder holding libnccl.so -> libnccl.so.2 \
                 (the nvidia-nccl-cu13 wheel's file) on LD_LIBRARY_PATH"
                    .into(),
            ),
        })
    }
}

fn error_string(r: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    let p = unsafe { sys::ncclGetErrorString(r) };
    if p.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null pointer to a static C string (see above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn last_error(comm: sys::ncclComm_t) -> String {
    // SAFETY: ncclGetLastError accepts any communicator (or null) and returns a
    // NUL-terminated string owned by NCCL, valid until the next NCCL call.
    let p = unsafe { sys::ncclGetLastError(comm) };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null C string from NCCL, copied out immediately.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `Ok(true)` for success, `Ok(false)` for in progress, the NCCL error otherwise.
fn check(
    comm: Option<sys::ncclComm_t>,
    op: &'static str,
    rank: usize,
    r: sys::ncclResult_t,
) -> Result<bool> {
    match r {
        sys::ncclResult_t::ncclSuccess => Ok(true),
        sys::ncclResult_t::ncclInProgress => Ok(false),
        other => {
            let detail = comm.map(last_error).filter(|s| !s.is_empty());
            let msg = match detail {
                Some(d) => format!("NCCL {}: {d}", error_string(other)),
                None => format!("NCCL {}", error_string(other)),
            };
            Err(Error::Comm {
                rank,
                op,
                kind: CommErrorKind::Backend(msg),
            })
        }
    }
}

/// A non-blocking config with every other field left to NCCL (its
/// `NCCL_CONFIG_INITIALIZER`: size, magic, version, then all fields undefined).
fn nonblocking_config(version: i32) -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: version as u32,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

fn nccl_version() -> Result<i32> {
    let mut v = 0;
    // SAFETY: writes one int; the library is loaded (checked by the callers).
    let r = unsafe { sys::ncclGetVersion(&mut v) };
    check(None, "nccl_version", 0, r)?;
    Ok(v)
}

pub(crate) fn nccl_dtype(d: DType) -> sys::ncclDataType_t {
    match d {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
        DType::F8E4M3 => sys::ncclDataType_t::ncclFloat8e4m3,
    }
}

fn nccl_op(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
        ReduceOp::Min => sys::ncclRedOp_t::ncclMin,
    }
}

impl NcclComm {
    /// `ncclCommInitRankConfig` (non-blocking) on the current device of `stream`; all
    /// `world` ranks call it with the same `id`. Fails with a timeout if the group is
    /// not complete within `timeout`.
    pub fn init(
        id: &NcclId,
        rank: usize,
        world: usize,
        stream: Arc<CudaStream>,
        timeout: Duration,
    ) -> Result<Self> {
        library_present("init")?;
        let err = |kind| Error::Comm {
            rank,
            op: "init",
            kind,
        };
        if rank >= world {
            return Err(err(CommErrorKind::InvalidArgument(format!(
                "rank {rank} outside a {world}-rank group"
            ))));
        }
        let (n, r) = (
            i32::try_from(world)
                .map_err(|_| err(CommErrorKind::InvalidArgument("world too large".into())))?,
            rank as i32,
        );
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| err(CommErrorKind::Backend(e.to_string())))?;
        let mut config = nonblocking_config(nccl_version()?);
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for writes/reads during the call; the id
        // is passed by value; NCCL keeps no pointer to `config` after returning.
        let res = unsafe { sys::ncclCommInitRankConfig(&mut comm, n, id.raw(), r, &mut config) };
        let c = Self::from_raw(comm, stream, rank, world, timeout);
        // Drop (abort) the half-made handle on any error below.
        let done = check(Some(comm), "init", rank, res)?;
        if !done {
            c.settle_locked(&c.lock(), "init", Instant::now() + timeout)?;
        }
        Ok(c)
    }

    fn from_raw(
        comm: sys::ncclComm_t,
        stream: Arc<CudaStream>,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Self {
        NcclComm {
            comm: Mutex::new(comm),
            stream,
            rank,
            world,
            timeout_ms: AtomicU64::new(timeout.as_millis().try_into().unwrap_or(u64::MAX)),
            abort_requested: AtomicBool::new(false),
            dead: AtomicBool::new(comm.is_null()),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    /// The stream every collective of this communicator is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }
    pub fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(
            timeout.as_millis().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    fn err(&self, op: &'static str, kind: CommErrorKind) -> Error {
        Error::Comm {
            rank: self.rank,
            op,
            kind,
        }
    }

    fn lock(&self) -> MutexGuard<'_, sys::ncclComm_t> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks the handle for an operation, refusing a dead communicator.
    fn begin(&self, op: &'static str) -> Result<MutexGuard<'_, sys::ncclComm_t>> {
        let g = self.lock();
        if self.abort_requested.load(Ordering::SeqCst) {
            self.abort_locked(*g);
        }
        if self.dead.load(Ordering::SeqCst) {
            return Err(self.err(op, CommErrorKind::Aborted));
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.err(op, CommErrorKind::Backend(e.to_string())))?;
        Ok(g)
    }

    fn abort_locked(&self, comm: sys::ncclComm_t) {
        if !self.dead.swap(true, Ordering::SeqCst) {
            // SAFETY: `comm` is a live handle (dead was false) and we hold the lock;
            // after this call it is never used again (dead is true).
            // The result is ignored: an abort that fails leaves nothing else to try.
            let _ = unsafe { sys::ncclCommAbort(comm) };
        }
    }

    /// Aborts the communicator (`ncclCommAbort`), also from another thread: an
    /// operation waiting in [`Self::synchronize`] notices within a millisecond.
    pub fn abort(&self) {
        self.abort_requested.store(true, Ordering::SeqCst);
        let g = self.lock();
        self.abort_locked(*g);
    }

    /// Non-blocking health probe: the communicator's asynchronous error, if any.
    pub fn check(&self) -> Result<()> {
        let g = self.begin("check")?;
        self.async_error(*g, "check").map(|_| ())
    }

    /// `Ok(true)` when NCCL has finished the last call, `Ok(false)` while in progress.
    fn async_error(&self, comm: sys::ncclComm_t, op: &'static str) -> Result<bool> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: live handle (callers hold the lock and checked `dead`); `state` is
        // a valid out-pointer.
        let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
        check(Some(comm), op, self.rank, r)?;
        check(Some(comm), op, self.rank, state)
    }

    /// Polls until NCCL has finished a non-blocking call; aborts on the deadline.
    fn settle_locked(
        &self,
        g: &MutexGuard<'_, sys::ncclComm_t>,
        op: &'static str,
        deadline: Instant,
    ) -> Result<()> {
        loop {
            match self.async_error(**g, op) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    self.abort_locked(**g);
                    return Err(e);
                }
            }
            if self.abort_requested.load(Ordering::SeqCst) {
                self.abort_locked(**g);
                return Err(self.err(op, CommErrorKind::Aborted));
            }
            if Instant::now() >= deadline {
                self.abort_locked(**g);
                return Err(self.err(
                    op,
                    CommErrorKind::Timeout {
                        peer: None,
                        after: self.timeout(),
                    },
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Runs one enqueue call (or a group of them) and waits until NCCL accepted it.
    fn run(
        &self,
        op: &'static str,
        f: impl FnOnce(sys::ncclComm_t, sys::cudaStream_t) -> sys::ncclResult_t,
    ) -> Result<()> {
        let g = self.begin(op)?;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let res = f(*g, stream);
        match check(Some(*g), op, self.rank, res) {
            Ok(true) => Ok(()),
            Ok(false) => self.settle_locked(&g, op, Instant::now() + self.timeout()),
            Err(e) => {
                self.abort_locked(*g);
                Err(e)
            }
        }
    }

    /// Blocks until every operation queued on the stream has finished, within the
    /// timeout; aborts the communicator (unblocking the GPU work) when it passes or
    /// when NCCL reports an asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        let g = self.begin("synchronize")?;
        let deadline = Instant::now() + self.timeout();
        loop {
            // SAFETY: a live stream of the bound context; cuStreamQuery only reads it.
            match unsafe { cuStreamQuery(self.stream.cu_stream()) } {
                CUresult::CUDA_SUCCESS => return Ok(()),
                CUresult::CUDA_ERROR_NOT_READY => {}
                other => {
                    return Err(self.err(
                        "synchronize",
                        CommErrorKind::Backend(format!("CUDA stream error {other:?}")),
                    ));
                }
            }
            if let Err(e) = self.async_error(*g, "synchronize") {
                self.abort_locked(*g);
                return Err(e);
            }
            if self.abort_requested.load(Ordering::SeqCst) {
                self.abort_locked(*g);
                return Err(self.err("synchronize", CommErrorKind::Aborted));
            }
            if Instant::now() >= deadline {
                self.abort_locked(*g);
                return Err(self.err(
                    "synchronize",
                    CommErrorKind::Timeout {
                        peer: None,
                        after: self.timeout(),
                    },
                ));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// `ncclCommSplit`: ranks with the same `color` form a new communicator ranked by
    /// `(key, rank)`, on the same stream. Collective over this communicator.
    pub fn split(&self, color: u32, key: u32) -> Result<NcclComm> {
        let op = "split";
        let (color_i, key_i) = (
            i32::try_from(color)
                .map_err(|_| self.err(op, CommErrorKind::InvalidArgument("color ≥ 2^31".into())))?,
            i32::try_from(key)
                .map_err(|_| self.err(op, CommErrorKind::InvalidArgument("key ≥ 2^31".into())))?,
        );
        let g = self.begin(op)?;
        let mut config = nonblocking_config(nccl_version()?);
        let mut child: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: live parent handle under the lock; `child` and `config` are valid for
        // the call; NCCL keeps no pointer to `config`.
        let res = unsafe { sys::ncclCommSplit(*g, color_i, key_i, &mut child, &mut config) };
        if let Err(e) = check(Some(*g), op, self.rank, res) {
            self.abort_locked(*g);
            return Err(e);
        }
        // The parent settles first (the split is a collective on it), then the child.
        self.settle_locked(&g, op, Instant::now() + self.timeout())?;
        drop(g);
        let mut c = Self::from_raw(child, Arc::clone(&self.stream), 0, 0, self.timeout());
        {
            let cg = c.begin(op)?;
            c.settle_locked(&cg, op, Instant::now() + self.timeout())?;
            let (mut n, mut r) = (0, 0);
            // SAFETY: live child handle under its lock; out-pointers are valid ints.
            let rc = unsafe { sys::ncclCommCount(*cg, &mut n) };
            check(Some(*cg), op, self.rank, rc)?;
            // SAFETY: as above.
            let rr = unsafe { sys::ncclCommUserRank(*cg, &mut r) };
            check(Some(*cg), op, self.rank, rr)?;
            drop(cg);
            c.world = n.max(0) as usize;
            c.rank = r.max(0) as usize;
        }
        Ok(c)
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let comm = *self.comm.get_mut().unwrap_or_else(|p| p.into_inner());
        if !self.dead.swap(true, Ordering::SeqCst) {
            // Abort rather than finalize: finalize waits for peers, and a drop during
            // error handling must not hang. Errors cannot be reported from drop.
            // SAFETY: live handle (dead was false), exclusively ours (&mut self).
            let _ = unsafe { sys::ncclCommAbort(comm) };
        }
    }
}
