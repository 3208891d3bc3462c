//! Process supervision of `lava launch` with real `lava-worker` processes on CPU.
//!
//! Each test starts the launcher as a separate process, watches its output, and checks the
//! workers through /proc: readiness of 4 ranks, a clean SIGTERM drain, SIGKILL of any rank
//! ending the job with the peer-lost exit code and no orphans, workers dying with their
//! launcher, and rank discovery from torchrun-style and Slurm variables with two launchers.
//!
//! The binaries are built once per run with `cargo build -p launcher -p worker` (cargo does
//! not build other packages' binaries for this crate's tests); `LAVA_BIN_DIR` skips that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use lava_tests::bin_dir;

/// proto::exit::PEER_LOST, repeated here because this crate does not link the launcher.
const PEER_LOST: i32 = 5;
/// proto::exit::BAD_INPUT.
const BAD_INPUT: i32 = 2;
/// proto::exit::LOAD_FAILURE.
const LOAD_FAILURE: i32 = 4;

/// Cluster tests share 2 cores; one cluster at a time keeps the time bounds meaningful.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running `lava launch` with its output collected.
struct Launcher {
    child: Child,
    stdout: Receiver<String>,
    stdout_seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Launcher {
    fn start(args: &[&str], env: &[(&str, String)]) -> Launcher {
        let mut cmd = Command::new(bin_dir().join("lava"));
        cmd.arg("launch")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "SLURM_PROCID",
            "SLURM_JOB_ID",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Launcher {
            child,
            stdout,
            stdout_seen: Vec::new(),
            stderr,
        }
    }

    /// Reads stdout until a line starts with `prefix`; panics with the output after `timeout`.
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.stdout_seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no {prefix:?} within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.stdout_seen.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    /// Worker pids by rank, from the registration lines seen so far.
    fn worker_pids(&self) -> BTreeMap<u32, i32> {
        // "lava: rank 2 registered: dit, pid 1234, 127.0.0.1:4567 on host"
        self.stdout_seen
            .iter()
            .filter_map(|l| l.strip_prefix("lava: rank "))
            .filter_map(|l| {
                let (rank, rest) = l.split_once(" registered: ")?;
                let pid = rest.split_once("pid ")?.1.split(',').next()?;
                Some((rank.parse().ok()?, pid.parse().ok()?))
            })
            .collect()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn signal(&self, sig: i32) {
        kill(self.child.id() as i32, sig);
    }

    /// Waits for the launcher to exit; panics after `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                thread::sleep(Duration::from_millis(100));
                while let Ok(line) = self.stdout.try_recv() {
                    self.stdout_seen.push(line);
                }
                return (status, t0.elapsed());
            }
            if t0.elapsed() > timeout {
                let _ = self.child.kill();
                panic!(
                    "launcher still running after {timeout:?}\nstderr:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // A failed assertion must not leave a cluster behind.
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
        for pid in self.worker_pids().values() {
            if alive(*pid) {
                kill(*pid, libc::SIGKILL);
            }
        }
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

/// Whether `pid` is a live (not zombie) lava-worker process.
fn alive(pid: i32) -> bool {
    alive_as(pid, "lava-worker")
}

/// Whether `pid` is a live (not zombie) process whose command line contains `needle`.
fn alive_as(pid: i32, needle: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if state == Some("Z") || state == Some("X") {
        return false;
    }
    // A reused pid would not be one of our workers.
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Waits until none of `pids` is alive; returns the ones still alive after `timeout`.
fn wait_dead(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The role of rank `r` in [`start_four`]'s job.
fn role(r: u32) -> &'static str {
    if r == 3 { "vae" } else { "dit" }
}

/// Ranks 0-2 are DiT ranks, rank 3 the dedicated VAE rank.
fn start_four() -> (Launcher, BTreeMap<u32, i32>) {
    let mut l = Launcher::start(&["--nproc", "4", "--grace", "3", "--vae-rank", "3"], &[]);
    let ready = l.wait_for("lava: ready:", Duration::from_secs(60));
    assert!(ready.contains("4 ranks"), "{ready}");
    let pids = l.worker_pids();
    assert_eq!(
        pids.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "{:?}",
        l.stdout_seen
    );
    assert!(
        pids.values().all(|p| alive(*p)),
        "a worker is not running: {pids:?}"
    );
    (l, pids)
}

#[test]
fn four_ranks_come_up_ready_and_sigterm_drains_them() {
    let _g = serial();
    let (mut l, pids) = start_four();
    for rank in 0..4 {
        let healthy = format!("lava: rank {rank} healthy: registered, cpu:");
        assert!(
            l.stdout_seen.iter().any(|s| s.starts_with(&healthy)),
            "no health line for rank {rank}: {:?}",
            l.stdout_seen
        );
    }
    l.signal(libc::SIGTERM);
    let (status, _) = l.wait_exit(Duration::from_secs(20));
    let stderr = l.stderr();
    assert_eq!(status.code(), Some(0), "{stderr}");
    // Every rank left through the Shutdown RPC, not a signal.
    for rank in 0..4 {
        assert!(
            stderr.contains(&format!("[rank {rank} {}] exiting (Shutdown)", role(rank))),
            "rank {rank} did not drain:\n{stderr}"
        );
    }
    let pid_list: Vec<i32> = pids.values().copied().collect();
    assert_eq!(
        wait_dead(&pid_list, Duration::from_secs(1)),
        Vec::<i32>::new()
    );
}

#[test]
fn sigkill_of_any_worker_ends_the_job_with_peer_lost_and_no_orphans() {
    let _g = serial();
    for victim in 0..4u32 {
        let (mut l, pids) = start_four();
        kill(pids[&victim], libc::SIGKILL);
        let (status, took) = l.wait_exit(Duration::from_secs(30));
        let stderr = l.stderr();
        assert_eq!(status.code(), Some(PEER_LOST), "victim {victim}:\n{stderr}");
        assert!(
            took < Duration::from_secs(10),
            "job took {took:?} to end after rank {victim} died"
        );
        let named = format!(
            "lava: error: rank {victim}: peer-lost: {} worker (pid {}) died: killed by signal 9",
            role(victim),
            pids[&victim]
        );
        assert!(
            stderr.contains(&named),
            "error does not name rank {victim}:\n{stderr}"
        );
        // The crash report includes the dead rank's stderr tail.
        let tail = format!(
            "lava:   [rank {victim} {}] registered with job",
            role(victim)
        );
        let dump = stderr.find(&format!("lava: last stderr lines of rank {victim}:"));
        assert!(
            dump.is_some_and(|at| stderr[at..].contains(&tail)),
            "no stderr tail for rank {victim}:\n{stderr}"
        );
        let pid_list: Vec<i32> = pids.values().copied().collect();
        assert_eq!(
            wait_dead(&pid_list, Duration::from_secs(1)),
            Vec::<i32>::new(),
            "orphans after rank {victim} died"
        );
    }
}

#[test]
fn killing_the_launcher_makes_every_worker_exit() {
    let _g = serial();
    let (mut l, pids) = start_four();
    l.signal(libc::SIGKILL);
    l.wait_exit(Duration::from_secs(5));
    let pid_list: Vec<i32> = pids.values().copied().collect();
    assert_eq!(
        wait_dead(&pid_list, Duration::from_secs(10)),
        Vec::<i32>::new(),
        "workers outlived their launcher"
    );
}

/// An executable shell script standing in for `lava-worker`, unique to this test process.
fn fake_worker(name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("lava-fake-worker-{}-{name}", std::process::id()));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
fn ranks_that_never_register_end_the_job_and_their_children_with_them() {
    let _g = serial();
    // Each fake worker leaves a background child in its process group, then never registers.
    let pids_file = std::env::temp_dir().join(format!("lava-fake-pids-{}", std::process::id()));
    let _ = std::fs::remove_file(&pids_file);
    let script = fake_worker(
        "silent",
        "sleep 300 &\necho $! >> \"$LAVA_TEST_PIDS\"\necho $$ >> \"$LAVA_TEST_PIDS\"\nexec sleep 300",
    );
    let args = [
        "--nproc",
        "2",
        "--ready-timeout",
        "2",
        "--grace",
        "2",
        "--worker-bin",
    ];
    let mut l = Launcher::start(
        &[&args[..], &[script.to_str().unwrap()]].concat(),
        &[("LAVA_TEST_PIDS", pids_file.display().to_string())],
    );
    let (status, _) = l.wait_exit(Duration::from_secs(20));
    let stderr = l.stderr();
    assert_eq!(status.code(), Some(PEER_LOST), "{stderr}");
    assert!(
        stderr.contains("ranks [0, 1] did not register within 2 s"),
        "{stderr}"
    );
    let pids: Vec<i32> = std::fs::read_to_string(&pids_file)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "two workers and their two children");
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| alive_as(*p, "sleep")) {
        assert!(Instant::now() < deadline, "orphans left: {pids:?}");
        thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&pids_file);
    let _ = std::fs::remove_file(&script);
}

#[test]
fn workers_that_ignore_sigterm_get_sigkill_after_the_grace_period() {
    let _g = serial();
    // SIG_IGN survives exec, so the sleep that replaces the shell ignores SIGTERM too.
    let script = fake_worker("stubborn", "trap '' TERM\nexec sleep 300");
    let args = [
        "--nproc",
        "1",
        "--ready-timeout",
        "1",
        "--grace",
        "1",
        "--worker-bin",
    ];
    let mut l = Launcher::start(&[&args[..], &[script.to_str().unwrap()]].concat(), &[]);
    let (status, took) = l.wait_exit(Duration::from_secs(20));
    let stderr = l.stderr();
    assert_eq!(status.code(), Some(PEER_LOST), "{stderr}");
    assert!(
        stderr.contains("lava: ranks [0] ignored SIGTERM for 1 s; sending SIGKILL"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let _ = std::fs::remove_file(&script);
}

#[test]
fn a_worker_load_failure_is_the_job_exit_code_with_its_rank_and_stderr() {
    let _g = serial();
    let script = fake_worker("load", "echo 'cannot read shard 3 of 8' >&2\nexit 4");
    let mut l = Launcher::start(
        &["--nproc", "1", "--worker-bin", script.to_str().unwrap()],
        &[],
    );
    let (status, _) = l.wait_exit(Duration::from_secs(20));
    let stderr = l.stderr();
    assert_eq!(status.code(), Some(LOAD_FAILURE), "{stderr}");
    assert!(
        stderr.contains("lava: error: rank 0: load-failure: dit worker"),
        "{stderr}"
    );
    assert!(
        stderr.contains("lava:   [rank 0 dit] cannot read shard 3 of 8"),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&script);
}

#[test]
fn a_missing_worker_binary_is_bad_input_and_spawns_nothing() {
    let _g = serial();
    let mut l = Launcher::start(
        &["--nproc", "2", "--worker-bin", "/nonexistent/lava-worker"],
        &[],
    );
    let (status, _) = l.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(BAD_INPUT), "{}", l.stderr());
    assert!(
        l.stderr().contains("/nonexistent/lava-worker"),
        "{}",
        l.stderr()
    );
    assert!(l.worker_pids().is_empty());
}

/// A port nobody listens on, in `lo..hi`.
fn free_port(lo: u16, hi: u16) -> u16 {
    let seed = std::process::id() as u16;
    (0..hi - lo)
        .map(|i| lo + (seed.wrapping_mul(7919).wrapping_add(i)) % (hi - lo))
        .find(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
        .unwrap()
}

/// Two launchers of 2 workers each, ready as one job of 4 ranks.
fn start_two(
    env0: Vec<(&str, String)>,
    env1: Vec<(&str, String)>,
    source: &str,
) -> (Launcher, Launcher) {
    let mut master = Launcher::start(
        &["--nproc", "2", "--grace", "3", "--health-interval", "1"],
        &env0,
    );
    let mut other = Launcher::start(
        &["--nproc", "2", "--grace", "3", "--health-interval", "1"],
        &env1,
    );
    master.wait_for("lava: ready: 4 ranks", Duration::from_secs(60));
    other.wait_for("lava: ready: 2 local ranks", Duration::from_secs(10));
    assert_eq!(
        master.worker_pids().keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert_eq!(
        other.worker_pids().keys().copied().collect::<Vec<_>>(),
        [2, 3]
    );
    assert!(
        other.stderr().contains(&format!(
            "lava: launcher 1 of 2 ({source}): ranks 2..4 of 4"
        )),
        "{}",
        other.stderr()
    );
    (master, other)
}

/// SIGTERM to the master drains both launchers.
fn two_launchers(env0: Vec<(&str, String)>, env1: Vec<(&str, String)>, source: &str) {
    let (mut master, mut other) = start_two(env0, env1, source);
    master.signal(libc::SIGTERM);
    let (status, _) = master.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", master.stderr());
    let (status, _) = other.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", other.stderr());
    let pids: Vec<i32> = master.worker_pids().values().copied().collect();
    assert_eq!(wait_dead(&pids, Duration::from_secs(1)), Vec::<i32>::new());
}

/// torchrun-style variables of launcher `rank` of 2, master on `port`.
fn torchrun_env(rank: &str, port: &str) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
    ]
}

#[test]
fn torchrun_variables_join_two_launchers_into_one_job() {
    let _g = serial();
    let port = free_port(30000, 40000).to_string();
    two_launchers(
        torchrun_env("0", &port),
        torchrun_env("1", &port),
        "Torchrun",
    );
}

#[test]
fn a_rank_lost_under_another_launcher_ends_the_whole_job() {
    let _g = serial();
    let port = free_port(30000, 40000).to_string();
    let (mut master, mut other) = start_two(
        torchrun_env("0", &port),
        torchrun_env("1", &port),
        "Torchrun",
    );
    let pids: Vec<i32> = master.worker_pids().values().copied().collect();
    kill(other.worker_pids()[&3], libc::SIGKILL);
    let (status, _) = other.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(PEER_LOST), "{}", other.stderr());
    assert!(
        other.stderr().contains("lava: error: rank 3: peer-lost"),
        "{}",
        other.stderr()
    );
    // The master sees ranks 2 and 3 stop answering and names one of them.
    let (status, took) = master.wait_exit(Duration::from_secs(15));
    let stderr = master.stderr();
    assert_eq!(status.code(), Some(PEER_LOST), "{stderr}");
    assert!(took < Duration::from_secs(10), "master took {took:?}");
    assert!(
        stderr.contains("lava: error: rank 2: peer-lost")
            || stderr.contains("lava: error: rank 3: peer-lost"),
        "{stderr}"
    );
    assert_eq!(wait_dead(&pids, Duration::from_secs(2)), Vec::<i32>::new());
}

#[test]
fn losing_the_master_launcher_ends_the_others() {
    let _g = serial();
    let port = free_port(30000, 40000).to_string();
    let (mut master, mut other) = start_two(
        torchrun_env("0", &port),
        torchrun_env("1", &port),
        "Torchrun",
    );
    let pids: Vec<i32> = master.worker_pids().values().copied().collect();
    master.signal(libc::SIGKILL);
    master.wait_exit(Duration::from_secs(5));
    let (status, took) = other.wait_exit(Duration::from_secs(20));
    let stderr = other.stderr();
    assert_eq!(status.code(), Some(PEER_LOST), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "master launcher at http://127.0.0.1:{port} unreachable"
        )),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(wait_dead(&pids, Duration::from_secs(2)), Vec::<i32>::new());
}

#[test]
fn slurm_variables_join_two_launchers_into_one_job() {
    let _g = serial();
    // The master port comes from the job id (20000 + id % 10000) and the master host from the
    // first entry of the expanded node list.
    let port = free_port(20000, 30000);
    let job_id = (port - 20000 + 10000).to_string();
    let env = |procid: &str| {
        vec![
            ("SLURM_PROCID", procid.to_string()),
            ("SLURM_NTASKS", "2".to_string()),
            ("SLURM_LOCALID", procid.to_string()),
            ("SLURM_JOB_NODELIST", "127.0.0.[1-2]".to_string()),
            ("SLURM_JOB_ID", job_id.clone()),
        ]
    };
    two_launchers(env("0"), env("1"), "Slurm");
}
