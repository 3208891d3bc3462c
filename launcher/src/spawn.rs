//! Starting one worker process per rank.
//!
//! Each worker gets: its own process group (a terminal's Ctrl-C reaches only the launcher,
//! and the launcher can signal the worker and anything it started at once), a stdin pipe the
//! launcher holds as a lifeline, `PR_SET_PDEATHSIG` as a second safety net, and its
//! stdout/stderr forwarded line by line with a `[rank N role]` prefix. The last stderr lines
//! are kept for the crash report.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use proto::worker::v1::RoleKind;
use proto::{Error, ErrorKind, exit};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

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
struct RankProcess {
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
fn spawn(bin: &Path, spec: &WorkerSpec) -> io::Result<RankProcess> {
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

/// A rank's process, as the supervisor tracks it.
#[derive(Debug)]
pub struct Running {
    /// Its role.
    pub role: RoleKind,
    /// Its pid (and process-group id).
    pub pid: u32,
    tail: Tail,
    /// Held, never written: dropping it is the worker's cue that the launcher is gone.
    _lifeline: Option<ChildStdin>,
    forwarders: Vec<JoinHandle<()>>,
}

/// A rank's process ended.
#[derive(Debug)]
pub struct RankExit {
    /// Which rank.
    pub rank: u32,
    /// How it ended.
    pub status: io::Result<ExitStatus>,
}

/// This launcher's workers, and the channel on which one monitor task per worker reports
/// its exit.
#[derive(Debug)]
pub struct Ranks {
    /// Workers not yet seen to exit, by rank.
    pub alive: BTreeMap<u32, Running>,
    /// Exits, in the order they happened.
    pub exits: mpsc::UnboundedReceiver<RankExit>,
    exit_tx: mpsc::UnboundedSender<RankExit>,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
}

impl Ranks {
    /// No workers yet.
    pub fn new(grace: Duration) -> Self {
        let (exit_tx, exits) = mpsc::unbounded_channel();
        Ranks {
            alive: BTreeMap::new(),
            exits,
            exit_tx,
            grace,
        }
    }

    /// Starts a worker (see [`spawn`]) and a task that reports its exit.
    pub fn start(&mut self, bin: &Path, spec: &WorkerSpec) -> io::Result<()> {
        let process = spawn(bin, spec)?;
        let mut child = process.child;
        let tx = self.exit_tx.clone();
        let rank = spec.rank;
        tokio::spawn(async move {
            let status = child.wait().await;
            // The receiver lives as long as the launcher's supervision.
            let _ = tx.send(RankExit { rank, status });
        });
        let running = Running {
            role: spec.role,
            pid: process.pid,
            tail: process.tail,
            _lifeline: process.lifeline,
            forwarders: process.forwarders,
        };
        self.alive.insert(rank, running);
        Ok(())
    }

    /// Marks a rank dead, sweeps its process group (anything it started), and waits briefly
    /// for its last output.
    pub async fn reap(&mut self, rank: u32) -> Option<Running> {
        let running = self.alive.remove(&rank)?;
        signal_group(running.pid, libc::SIGKILL);
        for f in &running.forwarders {
            // Output still in the pipe drains within moments; a grandchild holding it open does not stop us.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while !f.is_finished() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await;
        }
        Some(running)
    }

    /// Waits until every rank has exited or `deadline` passes.
    pub async fn wait_all(&mut self, deadline: Instant) {
        while !self.alive.is_empty() {
            tokio::select! {
                exit = self.exits.recv() => match exit {
                    Some(exit) => { self.reap(exit.rank).await; }
                    None => return,
                },
                _ = sleep_until(deadline) => return,
            }
        }
    }

    /// SIGTERM to every live rank, then SIGKILL after the grace period.
    pub async fn terminate(&mut self) {
        for r in self.alive.values() {
            signal_group(r.pid, libc::SIGTERM);
        }
        self.wait_all(Instant::now() + self.grace).await;
        if !self.alive.is_empty() {
            let ranks: Vec<_> = self.alive.keys().collect();
            say_err(&format!(
                "lava: ranks {ranks:?} ignored SIGTERM for {} s; sending SIGKILL",
                self.grace.as_secs()
            ));
            for r in self.alive.values() {
                signal_group(r.pid, libc::SIGKILL);
            }
            self.wait_all(Instant::now() + Duration::from_secs(5)).await;
        }
    }

    /// A rank died on its own: report it with its stderr tail, end every other rank, and
    /// return the job's error.
    pub async fn fail(&mut self, exit: RankExit) -> Error {
        let rank = exit.rank;
        let Some(running) = self.reap(rank).await else {
            return Error::Unattributed {
                kind: ErrorKind::Internal,
                message: format!("exit of unknown rank {rank}"),
            };
        };
        let (kind, how) = match &exit.status {
            Ok(status) => (kind_of_exit(*status), describe_exit(*status)),
            Err(e) => (ErrorKind::Internal, format!("could not be waited for: {e}")),
        };
        let label = label(rank, running.role);
        say_err(&format!(
            "lava: rank {rank} ({}, pid {}) died: {how}; ending the job",
            running.role.name(),
            running.pid
        ));
        let tail = running
            .tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if !tail.is_empty() {
            say_err(&format!("lava: last stderr lines of rank {rank}:"));
            for line in tail {
                say_err(&format!("lava:   {label} {line}"));
            }
        }
        self.terminate().await;
        Error::rank(
            rank,
            kind,
            format!(
                "{} worker (pid {}) died: {how}",
                running.role.name(),
                running.pid
            ),
        )
    }
}

/// The job's failure kind when a worker ends with `status`: its own bad-input, load and
/// plan failures are passed on; anything else is a lost peer.
pub fn kind_of_exit(status: ExitStatus) -> ErrorKind {
    match status.code().and_then(|c| u8::try_from(c).ok()) {
        Some(exit::BAD_INPUT) => ErrorKind::BadInput,
        Some(exit::LOAD_FAILURE) => ErrorKind::LoadFailure,
        Some(exit::INFEASIBLE_PLAN) => ErrorKind::Infeasible,
        _ => ErrorKind::PeerLost,
    }
}
