//! Running a VMM (or any stand-in program) as a child process and watching
//! its output.
//!
//! The guest serial console is the VMM's stdout and its logs go to stderr, so
//! almost every end-to-end assertion is "wait until stdout shows X". Output is
//! collected by background threads into shared buffers guarded by a
//! `Mutex` + `Condvar`, which lets waiters sleep until new bytes arrive
//! instead of polling, and never lets a full pipe stall the VMM.

use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::binaries::{build_binaries, vmm_bin};

/// How much of each stream error messages and panic reports show.
const TAIL_BYTES: usize = 4000;
/// Poll interval for things that cannot be waited on (exit status, paths).
const POLL_INTERVAL: Duration = Duration::from_millis(2);
/// How long to wait for the pipes to drain after the process has exited.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// One of the two captured output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

/// A wait on a child process that did not succeed in time.
///
/// Carries everything needed to understand the failure from the test log
/// alone: what was awaited, whether the process had already gone away, and
/// the output captured so far. `Debug` prints the same as `Display` so that
/// `.unwrap()` shows readable output instead of an escaped struct dump.
pub struct TimeoutError {
    /// Human-readable description of the awaited condition.
    pub what: String,
    /// How long the caller waited.
    pub waited: Duration,
    /// The awaited stream hit EOF, so waiting longer could not have helped.
    pub stream_closed: bool,
    /// The process's exit status if it had exited.
    pub exit_status: Option<ExitStatus>,
    /// All stdout captured so far (lossy UTF-8).
    pub stdout: String,
    /// All stderr captured so far (lossy UTF-8).
    pub stderr: String,
}

impl fmt::Display for TimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gave up after {:.3}s waiting for {}",
            self.waited.as_secs_f64(),
            self.what
        )?;
        if self.stream_closed {
            f.write_str(" (the stream was closed)")?;
        }
        match self.exit_status {
            Some(status) => write!(f, " (process exited: {status})")?,
            None => f.write_str(" (process still running)")?,
        }
        write_tail(f, "stdout", &self.stdout)?;
        write_tail(f, "stderr", &self.stderr)
    }
}

impl fmt::Debug for TimeoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for TimeoutError {}

fn write_tail(f: &mut fmt::Formatter<'_>, name: &str, text: &str) -> fmt::Result {
    let tail = tail_of(text, TAIL_BYTES);
    write!(
        f,
        "\n--- {name}: last {} of {} bytes ---\n{tail}",
        tail.len(),
        text.len()
    )
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail_of(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Output captured so far plus whether each pipe is still open.
#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_closed: bool,
    stderr_closed: bool,
}

impl Captured {
    fn bytes(&self, stream: Stream) -> &[u8] {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    fn closed(&self, stream: Stream) -> bool {
        match stream {
            Stream::Stdout => self.stdout_closed,
            Stream::Stderr => self.stderr_closed,
        }
    }
}

/// Shared between the reader threads and the `VmmProcess`.
#[derive(Default)]
struct SharedOutput {
    captured: Mutex<Captured>,
    changed: Condvar,
}

impl SharedOutput {
    /// Locks the buffers; a panic elsewhere never makes them unreadable.
    fn lock(&self) -> MutexGuard<'_, Captured> {
        self.captured.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn append(&self, stream: Stream, data: &[u8]) {
        let mut captured = self.lock();
        match stream {
            Stream::Stdout => captured.stdout.extend_from_slice(data),
            Stream::Stderr => captured.stderr.extend_from_slice(data),
        }
        self.changed.notify_all();
    }

    fn close(&self, stream: Stream) {
        let mut captured = self.lock();
        match stream {
            Stream::Stdout => captured.stdout_closed = true,
            Stream::Stderr => captured.stderr_closed = true,
        }
        self.changed.notify_all();
    }

    fn text(&self, stream: Stream) -> String {
        String::from_utf8_lossy(self.lock().bytes(stream)).into_owned()
    }
}

/// Copies one pipe into the shared buffer until EOF.
///
/// With `CPR_TEST_ECHO` set the bytes are also echoed to our stderr, which
/// (with `--nocapture`) shows the console live while debugging a test.
fn spawn_reader(
    mut pipe: impl Read + Send + 'static,
    stream: Stream,
    output: Arc<SharedOutput>,
    pid: u32,
) -> io::Result<()> {
    let echo = std::env::var_os("CPR_TEST_ECHO").is_some();
    thread::Builder::new()
        .name(format!("{stream}-of-{pid}"))
        .spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if echo {
                            eprint!("[{pid} {stream}] {}", String::from_utf8_lossy(&buf[..n]));
                        }
                        output.append(stream, &buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            output.close(stream);
        })?;
    Ok(())
}

/// A running VMM (or any program standing in for one) with captured output.
///
/// The child gets its own process group so that dropping the handle also
/// kills anything it spawned (a CPR shim, a successor VMM, a `sleep` in a
/// test script) and no stray process keeps the pipes or guest memory alive.
/// stdin is a pipe kept open until [`VmmProcess::close_stdin`] or drop, so a
/// VMM reading the serial console never sees a premature EOF.
pub struct VmmProcess {
    program: String,
    pid: u32,
    child: Mutex<Child>,
    stdin: Mutex<Option<ChildStdin>>,
    output: Arc<SharedOutput>,
}

impl VmmProcess {
    /// Spawns `command` with piped stdin/stdout/stderr in a new process group.
    pub fn spawn(mut command: Command) -> io::Result<Self> {
        use std::os::unix::process::CommandExt;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command.spawn()?;
        let pid = child.id();
        let output = Arc::new(SharedOutput::default());
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let stdin = child.stdin.take();
        // Build the handle first so that a failing thread spawn still kills the child.
        let process = VmmProcess {
            program,
            pid,
            child: Mutex::new(child),
            stdin: Mutex::new(stdin),
            output: Arc::clone(&output),
        };
        spawn_reader(stdout, Stream::Stdout, Arc::clone(&output), pid)?;
        spawn_reader(stderr, Stream::Stderr, output, pid)?;
        Ok(process)
    }

    /// Spawns `program` with `args`.
    pub fn start<I, S>(program: impl AsRef<OsStr>, args: I) -> io::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(program);
        command.args(args);
        Self::spawn(command)
    }

    /// Spawns `program` with `args` and extra environment variables.
    pub fn start_with_env<I, S, E, K, V>(
        program: impl AsRef<OsStr>,
        args: I,
        envs: E,
    ) -> io::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let mut command = Command::new(program);
        command.args(args).envs(envs);
        Self::spawn(command)
    }

    /// Builds the workspace binaries (once) and starts `vmm` with `args`.
    ///
    /// # Panics
    /// If the build fails or the binary cannot be started; both are setup
    /// failures that no test wants to handle.
    pub fn start_vmm<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        build_binaries();
        let bin = vmm_bin();
        Self::start(&bin, args).unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything written to stdout so far, lossily decoded as UTF-8.
    pub fn stdout_text(&self) -> String {
        self.output.text(Stream::Stdout)
    }

    /// Everything written to stderr so far, lossily decoded as UTF-8.
    pub fn stderr_text(&self) -> String {
        self.output.text(Stream::Stderr)
    }

    /// The raw stdout bytes so far (the serial console is not always text).
    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.output.lock().stdout.clone()
    }

    /// Waits until `predicate` holds for the whole stdout text so far, and
    /// returns that text.
    ///
    /// Fails early, without waiting out the timeout, once stdout is closed
    /// (the process exited) and the predicate still does not hold.
    pub fn wait_for_output(
        &self,
        mut predicate: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, TimeoutError> {
        self.wait_for_stream(
            Stream::Stdout,
            "stdout to match a predicate",
            timeout,
            |text| predicate(text).then(|| text.to_owned()),
        )
    }

    /// Waits until stdout contains `needle`; returns the stdout text.
    pub fn wait_for_stdout_contains(
        &self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, TimeoutError> {
        let what = format!("stdout to contain {needle:?}");
        self.wait_for_stream(Stream::Stdout, &what, timeout, |text| {
            text.contains(needle).then(|| text.to_owned())
        })
    }

    /// Waits until stderr (the VMM's log) contains `needle`; returns it.
    pub fn wait_for_stderr_contains(
        &self,
        needle: &str,
        timeout: Duration,
    ) -> Result<String, TimeoutError> {
        let what = format!("stderr to contain {needle:?}");
        self.wait_for_stream(Stream::Stderr, &what, timeout, |text| {
            text.contains(needle).then(|| text.to_owned())
        })
    }

    /// The general form of the waits above: re-runs `check` on the stream's
    /// whole text each time new bytes arrive, until it returns `Some`.
    ///
    /// `check` runs while the buffer is locked, so keep it cheap and do not
    /// call other methods of this `VmmProcess` from inside it.
    pub fn wait_for_stream<T>(
        &self,
        stream: Stream,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, TimeoutError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut captured = self.output.lock();
        let stream_closed = loop {
            if let Some(found) = check(&String::from_utf8_lossy(captured.bytes(stream))) {
                return Ok(found);
            }
            if captured.closed(stream) {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            captured = self
                .output
                .changed
                .wait_timeout(captured, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        };
        drop(captured);
        Err(self.timeout_error(format!("{stream}: {what}"), start.elapsed(), stream_closed))
    }

    /// Waits for `path` to exist (e.g. the QMP socket), failing early if the
    /// process exits first.
    pub fn wait_for_path(&self, path: &Path, timeout: Duration) -> Result<(), TimeoutError> {
        let start = Instant::now();
        loop {
            if path.exists() {
                return Ok(());
            }
            let exited = self.try_wait().is_some();
            if exited || start.elapsed() >= timeout {
                let what = format!("{} to appear", path.display());
                return Err(self.timeout_error(what, start.elapsed(), false));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.lock_child().try_wait().ok().flatten()
    }

    /// Whether the process is still running.
    pub fn is_running(&self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits for the process to exit, then for its output pipes to drain so
    /// that `stdout_text()` afterwards holds everything it printed.
    pub fn wait_exit(&self, timeout: Duration) -> Result<ExitStatus, TimeoutError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                self.wait_streams_closed(DRAIN_TIMEOUT);
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                return Err(self.timeout_error("process exit".into(), start.elapsed(), false));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Sends `signal` to the process (not its group).
    ///
    /// Refuses with `ESRCH` once the process has been reaped, because its
    /// pid may then belong to an unrelated process.
    pub fn send_signal(&self, signal: Signal) -> nix::Result<()> {
        let mut child = self.lock_child();
        if !matches!(child.try_wait(), Ok(None)) {
            return Err(Errno::ESRCH);
        }
        kill(self.nix_pid(), signal)
    }

    /// Writes to the process's stdin (the guest serial console input).
    pub fn write_stdin(&self, data: &[u8]) -> io::Result<()> {
        let mut stdin = self.stdin.lock().unwrap_or_else(PoisonError::into_inner);
        match stdin.as_mut() {
            Some(pipe) => pipe.write_all(data).and_then(|()| pipe.flush()),
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "stdin already closed",
            )),
        }
    }

    /// Closes stdin so the process sees EOF on its console input.
    pub fn close_stdin(&self) {
        self.stdin
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    fn lock_child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nix_pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid).expect("pids fit in i32"))
    }

    /// Waits (bounded) until both pipes reached EOF.
    fn wait_streams_closed(&self, timeout: Duration) {
        let captured = self.output.lock();
        let _unused = self
            .output
            .changed
            .wait_timeout_while(captured, timeout, |c| !(c.stdout_closed && c.stderr_closed))
            .unwrap_or_else(PoisonError::into_inner);
    }

    fn timeout_error(&self, what: String, waited: Duration, stream_closed: bool) -> TimeoutError {
        // A closed pipe usually means the process is exiting; give the exit
        // status a moment to become visible so the error can report it.
        let mut exit_status = self.try_wait();
        let grace = Instant::now() + Duration::from_millis(200);
        while stream_closed && exit_status.is_none() && Instant::now() < grace {
            thread::sleep(POLL_INTERVAL);
            exit_status = self.try_wait();
        }
        // Once the process is gone its last words (usually the reason it
        // died) may still be in the pipes; collect them for the report.
        if exit_status.is_some() {
            self.wait_streams_closed(DRAIN_TIMEOUT);
        }
        TimeoutError {
            what: format!("{what} from {} (pid {})", self.program, self.pid),
            waited,
            stream_closed,
            exit_status,
            stdout: self.stdout_text(),
            stderr: self.stderr_text(),
        }
    }

    fn report_output(&self) {
        let stdout = self.stdout_text();
        let stderr = self.stderr_text();
        let mut report = format!("cpr-tests: output of {} (pid {})", self.program, self.pid);
        for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
            let tail = tail_of(text, TAIL_BYTES);
            report += &format!(
                "\n--- {name}: last {} of {} bytes ---\n{tail}",
                tail.len(),
                text.len()
            );
        }
        eprintln!("{report}");
    }
}

impl Drop for VmmProcess {
    /// Kills the whole process group, reaps the child and, if the test is
    /// failing, prints what the process said so the failure is debuggable.
    fn drop(&mut self) {
        // The child leads its own group, so its pid is the group id.
        let group = self.nix_pid();
        let child = self.child.get_mut().unwrap_or_else(PoisonError::into_inner);
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.kill();
        let _ = child.wait();
        self.close_stdin();
        self.wait_streams_closed(Duration::from_millis(500));
        if thread::panicking() {
            self.report_output();
        }
    }
}

/// Starts `vmm args` expecting it to refuse to start, and checks how it ends: exit status 1
/// within `timeout`, nothing on stdout (no guest ran) and exactly one line on stderr, starting
/// with `vmm: ` and containing every one of `needles`. Returns that line.
///
/// # Panics
/// If any of that does not hold; the message names the arguments and shows what was printed.
#[track_caller]
pub fn assert_vmm_startup_error<S>(args: &[S], needles: &[&str], timeout: Duration) -> String
where
    S: AsRef<OsStr> + fmt::Debug,
{
    let vmm = VmmProcess::start_vmm(args);
    let status = vmm.wait_exit(timeout).unwrap();
    let stderr = vmm.stderr_text();
    assert_eq!(
        status.code(),
        Some(1),
        "vmm {args:?} should fail to start with exit status 1, got {status}; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "vmm {args:?}: expected exactly one line on stderr, got:\n{stderr}"
    );
    let line = lines[0];
    assert!(line.starts_with("vmm: "), "{line}");
    for needle in needles {
        assert!(
            line.contains(needle),
            "vmm {args:?}: the error should mention {needle:?}: {line}"
        );
    }
    assert_eq!(vmm.stdout_text(), "", "vmm {args:?} printed guest output");
    line.to_string()
}

/// Waits for `path` to exist, polling every few milliseconds.
pub fn wait_for_path(path: &Path, timeout: Duration) -> Result<(), String> {
    if crate::procfs::wait_until(timeout, || path.exists()) {
        Ok(())
    } else {
        Err(format!(
            "{} did not appear within {timeout:?}",
            path.display()
        ))
    }
}

/// Runs `vmm ARGS` as the unprivileged user `nobody` (uid and gid 65534, no groups, no
/// capabilities) through `setpriv`, waits for it to end, and returns its exit code and stderr.
/// The caller must be root (see [`crate::prereq::require_root`]).
pub fn run_vmm_as_nobody(
    args: &[String],
    timeout: std::time::Duration,
) -> io::Result<(Option<i32>, String)> {
    let mut all: Vec<String> = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.push(crate::binaries::vmm_bin().display().to_string());
    all.extend(args.iter().cloned());
    let vmm = VmmProcess::start("setpriv", &all)?;
    let status = vmm
        .wait_exit(timeout)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok((status.code(), vmm.stderr_text()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procfs::wait_until;
    use crate::tempdir::TempDir;
    use std::os::unix::process::ExitStatusExt;

    const LONG: Duration = Duration::from_secs(30);

    fn sh(script: &str) -> VmmProcess {
        VmmProcess::start("sh", ["-c", script]).unwrap()
    }

    /// Whether `pid` is gone or a zombie (killed but not yet reaped by init,
    /// which in a container may never happen).
    fn is_dead(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(") ")
                .next()
                .is_some_and(|rest| rest.starts_with('Z')),
        }
    }

    #[test]
    fn waits_for_output_and_drop_kills_the_process() {
        let vmm = sh("echo heartbeat: cpu 0 tick 1; sleep 30");
        let text = vmm
            .wait_for_output(|text| text.contains("tick 1\n"), LONG)
            .unwrap();
        assert_eq!(text, "heartbeat: cpu 0 tick 1\n");
        vmm.wait_for_stdout_contains("cpu 0", LONG).unwrap();
        assert_eq!(vmm.last_tick(0), Some(1));
        assert!(vmm.is_running());
        let pid = vmm.pid();
        let start = Instant::now();
        drop(vmm);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        assert!(is_dead(pid));
    }

    #[test]
    fn drop_kills_grandchildren_too() {
        let vmm = sh("sleep 30 & echo $!; wait");
        let text = vmm
            .wait_for_output(|text| text.ends_with('\n'), LONG)
            .unwrap();
        let grandchild: u32 = text.trim().parse().unwrap();
        assert!(!is_dead(grandchild));
        drop(vmm);
        assert!(wait_until(Duration::from_secs(5), || is_dead(grandchild)));
    }

    #[test]
    fn wait_exit_returns_the_status_and_all_output() {
        let vmm = sh("echo out; echo err >&2; exit 3");
        let status = vmm.wait_exit(LONG).unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(vmm.stdout_text(), "out\n");
        assert_eq!(vmm.stderr_text(), "err\n");
        assert_eq!(vmm.stdout_bytes(), b"out\n");
        assert_eq!(vmm.try_wait(), Some(status));
    }

    #[test]
    fn wait_exit_times_out_on_a_running_process() {
        let vmm = sh("echo still here; sleep 30");
        vmm.wait_for_stdout_contains("still here", LONG).unwrap();
        let error = vmm.wait_exit(Duration::from_millis(100)).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("process exit"), "{message}");
        assert!(message.contains("process still running"), "{message}");
        assert!(message.contains("still here"), "{message}");
        assert!(format!("{error:?}").contains("still here"));
    }

    #[test]
    fn waiting_for_output_fails_early_once_the_process_exits() {
        let vmm = sh("echo bye; echo oops >&2");
        let start = Instant::now();
        let error = vmm.wait_for_stdout_contains("never", LONG).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert!(error.stream_closed);
        assert_eq!(error.stdout, "bye\n");
        assert!(error.exit_status.is_some_and(|s| s.success()), "{error}");
        vmm.wait_exit(LONG).unwrap();
        assert_eq!(vmm.stderr_text(), "oops\n");
    }

    #[test]
    fn signals_reach_the_process() {
        let vmm = VmmProcess::start("sleep", ["30"]).unwrap();
        vmm.send_signal(Signal::SIGTERM).unwrap();
        let status = vmm.wait_exit(LONG).unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32));
        assert_eq!(vmm.send_signal(Signal::SIGTERM), Err(Errno::ESRCH));
    }

    #[test]
    fn environment_overrides_are_passed() {
        let vmm =
            VmmProcess::start_with_env("sh", ["-c", "echo $CPR_X"], [("CPR_X", "42")]).unwrap();
        vmm.wait_exit(LONG).unwrap();
        assert_eq!(vmm.stdout_text(), "42\n");
    }

    #[test]
    fn stdin_feeds_the_console() {
        let vmm = VmmProcess::start("cat", [] as [&str; 0]).unwrap();
        vmm.write_stdin(b"hello\n").unwrap();
        vmm.wait_for_stdout_contains("hello", LONG).unwrap();
        vmm.close_stdin();
        assert!(vmm.wait_exit(LONG).unwrap().success());
        assert!(vmm.write_stdin(b"more").is_err());
    }

    #[test]
    fn waits_for_a_path_to_appear() {
        let dir = TempDir::new("proc").unwrap();
        let path = dir.join("qmp.sock");
        let script = format!("sleep 0.1; touch {}; sleep 30", path.display());
        let vmm = sh(&script);
        vmm.wait_for_path(&path, LONG).unwrap();
        assert_eq!(wait_for_path(&path, Duration::ZERO), Ok(()));
        assert!(wait_for_path(&dir.join("nothing"), Duration::from_millis(20)).is_err());
    }

    #[test]
    fn waiting_for_a_path_fails_early_when_the_process_exits() {
        let dir = TempDir::new("proc").unwrap();
        let vmm = sh("echo 'vmm: cannot bind' >&2; exit 1");
        let start = Instant::now();
        let error = vmm.wait_for_path(&dir.join("qmp.sock"), LONG).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(error.exit_status.and_then(|s| s.code()), Some(1));
        assert!(error.to_string().contains("cannot bind"), "{error}");
    }

    #[test]
    fn tails_are_cut_at_character_boundaries() {
        assert_eq!(tail_of("héllo", 4), "llo");
        assert_eq!(tail_of("abc", 10), "abc");
    }
}
