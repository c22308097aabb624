//! `vigil` processes: started directly or in a network namespace, both output streams drained
//! for the process's whole life (an undrained pipe blocks it) onto one channel of lines (each
//! echoed on stderr), stopped when their guard drops.

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};

/// How long a process may take to print its ready line (a host boots its switch micro-VM first).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Which of a process's output streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The event log (JSON lines) and, for a VM, its console.
    Stdout,
    /// The process's own log.
    Stderr,
}

/// One output line of a process.
#[derive(Debug, Clone)]
pub struct Line {
    pub stream: Stream,
    pub text: String,
}

/// Runs `vigil ARGS` to its end and returns its output (for the CLI's short runs).
pub fn run_vigil(args: &[&str]) -> Output {
    Command::new(crate::vigil_bin())
        .args(args)
        .output()
        .expect("run vigil")
}

/// A `vigil` command line to start as a [`VigilProcess`].
pub struct VigilCommand {
    name: String,
    bin: PathBuf,
    netns: Option<String>,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    echo_stdout: bool,
    die_with_parent: bool,
}

impl VigilCommand {
    /// `vigil` as [`crate::vigil_bin`] finds it; `name` prefixes its echoed lines and messages.
    pub fn new(name: impl Into<String>) -> VigilCommand {
        VigilCommand::with_bin(name, crate::vigil_bin())
    }

    /// The binary at `bin`.
    pub fn with_bin(name: impl Into<String>, bin: PathBuf) -> VigilCommand {
        VigilCommand {
            name: name.into(),
            bin,
            netns: None,
            args: Vec::new(),
            env: Vec::new(),
            echo_stdout: true,
            die_with_parent: false,
        }
    }

    /// Runs it inside network namespace `netns` (`ip netns exec`).
    pub fn netns(mut self, netns: &str) -> VigilCommand {
        self.netns = Some(netns.to_string());
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> VigilCommand {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> VigilCommand {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> VigilCommand {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// Fewer guest timer ticks per wall second on an emulating host (measured: faster to the
    /// tenant's /init); guest timeouts stretch by the same factor.
    pub fn tsc_dilation(self) -> VigilCommand {
        self.env("VIGIL_TSC_DILATION", "8")
    }

    /// Does not echo stdout lines (a long event log) on stderr; they still reach the channel.
    pub fn quiet_stdout(mut self) -> VigilCommand {
        self.echo_stdout = false;
        self
    }

    /// The process is killed when the thread that started it exits (`PR_SET_PDEATHSIG`), so
    /// that even a killed caller leaves no VMM behind.
    pub fn die_with_parent(mut self) -> VigilCommand {
        self.die_with_parent = true;
        self
    }

    /// Starts the process; its output is drained from now on.
    pub fn spawn(self) -> Result<VigilProcess> {
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        command
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.die_with_parent {
            // SAFETY: prctl in the forked child before exec touches no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            what: format!("vigil {}", self.name),
            source,
        })?;
        let (tx, lines) = mpsc::channel();
        let outputs = [
            (
                Stream::Stdout,
                Box::new(child.stdout.take().expect("piped stdout")) as Box<dyn Read + Send>,
            ),
            (
                Stream::Stderr,
                Box::new(child.stderr.take().expect("piped stderr")),
            ),
        ];
        for (stream, out) in outputs {
            let tx = tx.clone();
            let name = self.name.clone();
            let echo = stream == Stream::Stderr || self.echo_stdout;
            std::thread::spawn(move || {
                for text in BufReader::new(out).lines().map_while(std::io::Result::ok) {
                    if echo {
                        eprintln!("[{name}] {text}");
                    }
                    // Nobody listening any more is fine: keep draining so the process never
                    // blocks on a full pipe.
                    let _ = tx.send(Line { stream, text });
                }
            });
        }
        Ok(VigilProcess {
            name: self.name,
            child,
            lines,
            shutdown: None,
        })
    }

    /// Starts the process and waits (up to [`START_TIMEOUT`]) for a line containing `ready`.
    pub fn start(self, ready: &str) -> Result<VigilProcess> {
        let process = self.spawn()?;
        process.wait_line(START_TIMEOUT, &format!("{ready:?}"), |l| {
            l.text.contains(ready)
        })?;
        Ok(process)
    }
}

/// A running `vigil`, its output lines on a channel. Dropped: stopped through its API's shutdown
/// endpoint if one was given ([`VigilProcess::shutdown_with`]), else SIGTERM, else SIGKILL;
/// without an endpoint, killed at once.
pub struct VigilProcess {
    name: String,
    child: Child,
    lines: mpsc::Receiver<Line>,
    shutdown: Option<(PathBuf, &'static str)>,
}

/// A process that ran to its end: how it exited and what it printed.
pub struct Finished {
    pub status: ExitStatus,
    /// Standard output, line by line (a VM's console and its events).
    pub stdout: Vec<String>,
    /// Standard error, joined (diagnostics, for failure messages).
    pub stderr: String,
}

impl VigilProcess {
    /// On drop, stop the process with `PUT /api/v1/{endpoint}` on `socket` first (which also
    /// ends the event streams still open to it, which a SIGTERM'd server would wait for).
    pub fn shutdown_with(&mut self, socket: &Path, endpoint: &'static str) {
        self.shutdown = Some((socket.to_path_buf(), endpoint));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The next line (from now on, of either stream) that `matches`; `what` names it in errors.
    pub fn wait_line(
        &self,
        limit: Duration,
        what: &str,
        mut matches: impl FnMut(&Line) -> bool,
    ) -> Result<Line> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Error::NoLine {
                        name: self.name.clone(),
                        what: what.to_string(),
                        limit,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Exited {
                        name: self.name.clone(),
                        what: what.to_string(),
                    })
                }
            }
        }
    }

    /// The first line containing `text` from now on; panics after `limit`.
    pub fn wait_for(&self, text: &str, limit: Duration) -> String {
        self.wait_line(limit, &format!("{text:?}"), |l| l.text.contains(text))
            .unwrap_or_else(|e| panic!("{e}"))
            .text
    }

    /// The next JSON event on stdout that `matches`, skipping other lines.
    pub fn wait_event(
        &self,
        limit: Duration,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut found = None;
        self.wait_line(limit, what, |line| {
            if line.stream != Stream::Stdout {
                return false;
            }
            match serde_json::from_str::<Value>(&line.text) {
                Ok(event) if matches(&event) => {
                    found = Some(event);
                    true
                }
                _ => false,
            }
        })?;
        Ok(found.expect("the matching event"))
    }

    /// Every line not read yet, up to the end of both streams (blocks until the process closed
    /// them, normally by exiting).
    pub fn remaining_lines(&self) -> impl Iterator<Item = Line> + '_ {
        self.lines.iter()
    }

    /// Reads every line the process prints until it exits, then reaps it: what a run-to-the-end
    /// command (`vigil run-tenant ... --timeout`) leaves to check.
    pub fn finish(mut self) -> Finished {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        for line in self.remaining_lines() {
            match line.stream {
                Stream::Stdout => stdout.push(line.text),
                Stream::Stderr => stderr.push(line.text),
            }
        }
        let status = self.wait();
        Finished {
            status,
            stdout,
            stderr: stderr.join("\n"),
        }
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        self.child.wait().expect("wait for vigil")
    }

    /// Stops the process as an operator would (SIGTERM) and waits for it.
    pub fn terminate(&mut self) -> ExitStatus {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.wait()
    }

    fn exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for VigilProcess {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let Some((socket, endpoint)) = self.shutdown.take() else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return;
        };
        let path = format!("{}{endpoint}", vmm_api::API_PREFIX);
        let _ = vmm_api::http::request(&socket, "PUT", &path, None, Duration::from_secs(5));
        if self.exited_within(Duration::from_secs(10)) {
            return;
        }
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        if self.exited_within(Duration::from_secs(5)) {
            return;
        }
        eprintln!("vigil-tests: {} did not stop; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory of this test run (`$TMPDIR/{prefix}-{pid}`), made empty; removed with everything
/// in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        TempDir::try_new(prefix).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_new(prefix: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).map_err(|source| Error::Io {
            what: format!("cannot create {}", path.display()),
            source,
        })?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
