//! Starting one worker process per rank.
//!
//! Each worker gets: its own process group (a terminal's Ctrl-C reaches only the launcher,
//! and the launcher can signal the worker and anything it started at once), a stdin pipe the
//! launcher holds as a lifeline, `PR_SET_PDEATHSIG` as a second safety net, and its
//! stdout/stderr forwarded line by line with a `[rank N role]` prefix. The last stderr lines
//! are kept for the crash report.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use proto::worker::v1::RoleKind;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::task::JoinHandle;

/// Stderr lines kept per rank for the crash report.
const STDERR_TAIL_LINES: usize = 40;

/// Everything a worker process needs on its command line.
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    /// Global rank.
    pub rank: u32,
    /// Number of ranks.
    pub world_size: u32,
    /// Rank on this node.
    pub local_rank: u32,
    /// Role to start it as.
    pub role: RoleKind,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// The launcher's registration address.
    pub launcher: SocketAddr,
    /// Address the worker binds.
    pub listen: String,
    /// Host the coordinator uses to reach it, when not the bound IP.
    pub advertise_host: Option<String>,
}

/// The lines a rank printed last on stderr.
pub type Tail = Arc<Mutex<VecDeque<String>>>;

/// A running worker.
#[derive(Debug)]
pub struct RankProcess {
    /// Its pid, which is also its process-group id.
    pub pid: u32,
    /// The process, to be awaited by the monitor.
    pub child: Child,
    /// Write end of the worker's stdin; dropping it (or the launcher dying) closes the lifeline.
    pub lifeline: Option<ChildStdin>,
    /// Last stderr lines.
    pub tail: Tail,
    /// Log-forwarding tasks; they end at EOF.
    pub forwarders: Vec<JoinHandle<()>>,
}

/// Writes a line to stderr, ignoring a closed stream: losing the terminal must not panic the
/// launcher in the middle of stopping its workers (`eprintln!` panics on EPIPE).
pub fn say_err(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Writes a status line to stdout, ignoring a closed stream (see [`say_err`]).
pub fn say(line: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `[rank 3 dit]`, the prefix of everything a rank prints.
pub fn label(rank: u32, role: RoleKind) -> String {
    format!("[rank {rank} {}]", role.name())
}

/// Finds `lava-worker`: the flag/variable if given, else next to the running `lava`.
pub fn locate_worker(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("--worker-bin {} is not a file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating the lava executable: {e}"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent folder", exe.display()))?;
    let candidate = dir.join("lava-worker");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "lava-worker not found next to {} (build it with `cargo build -p worker`, or pass --worker-bin / LAVA_WORKER_BIN)",
            exe.display()
        ))
    }
}

/// Starts one worker. Must be called from the thread that stays alive for the whole job
/// (the launcher's main thread): `PR_SET_PDEATHSIG` fires when the *thread* that forked dies.
pub fn spawn(bin: &Path, spec: &WorkerSpec) -> io::Result<RankProcess> {
    let mut cmd = Command::new(bin);
    cmd.arg("--rank")
        .arg(spec.rank.to_string())
        .arg("--world-size")
        .arg(spec.world_size.to_string())
        .arg("--local-rank")
        .arg(spec.local_rank.to_string())
        .arg("--role")
        .arg(spec.role.name())
        .arg("--device")
        .arg(&spec.device)
        .arg("--launcher")
        .arg(spec.launcher.to_string())
        .arg("--listen")
        .arg(&spec.listen)
        .arg("--stdin-lifeline");
    if let Some(host) = &spec.advertise_host {
        cmd.arg("--advertise-host").arg(host);
    }
    // The job's rank variables describe launchers, not workers; don't let them leak into a
    // worker's libraries.
    for var in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    let parent = std::process::id();
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher may have died before prctl took effect.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(i32::from(proto::exit::PEER_LOST));
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("worker exited before its pid was read"))?;
    let tail: Tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
    let prefix = label(spec.rank, spec.role);
    let mut forwarders = Vec::new();
    if let Some(out) = child.stdout.take() {
        forwarders.push(tokio::spawn(forward(out, prefix.clone(), None)));
    }
    if let Some(err) = child.stderr.take() {
        forwarders.push(tokio::spawn(forward(err, prefix, Some(tail.clone()))));
    }
    let lifeline = child.stdin.take();
    Ok(RankProcess {
        pid,
        child,
        lifeline,
        tail,
        forwarders,
    })
}

/// Copies lines to the launcher's stderr with the rank prefix, keeping a tail if asked.
async fn forward(stream: impl AsyncRead + Unpin, prefix: String, tail: Option<Tail>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        say_err(&format!("{prefix} {line}"));
        if let Some(tail) = &tail {
            let mut tail = tail.lock().unwrap_or_else(PoisonError::into_inner);
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// Sends `signal` to the worker's whole process group. A group that no longer exists is fine.
pub fn signal_group(pid: u32, signal: i32) {
    let Ok(pgid) = i32::try_from(pid) else { return };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; a negative pid addresses the group.
    unsafe { libc::kill(-pgid, signal) };
}

/// "exit code 2 (bad input)" or "killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return match u8::try_from(code) {
            Ok(c) if proto::exit::name(c) != "unknown" => {
                format!("exit code {code} ({})", proto::exit::name(c))
            }
            _ => format!("exit code {code}"),
        };
    }
    match status.signal() {
        Some(sig) => format!("killed by signal {sig} ({})", signal_name(sig)),
        None => "ended without an exit code or signal".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}
