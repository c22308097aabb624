//! A real etcd (Debian's `etcd-server`, installed by scripts/setup): a single-member cluster on
//! free loopback ports in a directory of its own, killed when its guard drops (and with the
//! process that started it). The same settings as `scripts/etcd-local`.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::TempDir;

/// How long etcd may take to answer after its start.
const START_LIMIT: Duration = Duration::from_secs(30);

pub struct Etcd {
    child: Child,
    /// Its client URL where it runs (127.0.0.1: in its namespace, if it has one).
    endpoint: String,
    /// The network namespace it runs in, if not the test's own.
    netns: Option<String>,
    // Removed after the process is gone.
    _dir: TempDir,
}

/// The etcd binary on PATH, if any.
pub fn etcd_bin() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join("etcd"))
        .find(|p| p.is_file())
}

fn free_tcp_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            what: "a free TCP port".into(),
            source,
        })
}

impl Etcd {
    /// Starts etcd and waits until it serves; `Ok(None)` if the binary is absent (a test says
    /// it skips; CI installs it, so it never skips there).
    pub fn try_start(name: &str) -> Result<Option<Etcd>> {
        Etcd::start_where(name, None)
    }

    /// [`Etcd::try_start`] in network namespace `netns`, listening on every address there (the
    /// hosts of an end-to-end cloud reach it over their underlay links, at
    /// [`Etcd::endpoint_at`]); its [`Etcd::endpoint`] and [`Etcd::store`] work only from inside
    /// that namespace.
    pub fn try_start_in(name: &str, netns: &crate::Namespace) -> Result<Option<Etcd>> {
        Etcd::start_where(name, Some(netns))
    }

    fn start_where(name: &str, netns: Option<&crate::Namespace>) -> Result<Option<Etcd>> {
        let Some(bin) = etcd_bin() else {
            return Ok(None);
        };
        let dir = TempDir::try_new(&format!("vigil-etcd-{name}"))?;
        let (client, peer) = (free_tcp_port()?, free_tcp_port()?);
        let endpoint = format!("http://127.0.0.1:{client}");
        let listen = match netns {
            Some(_) => format!("http://0.0.0.0:{client}"),
            None => endpoint.clone(),
        };
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.join("etcd.log")).map_err(|source| Error::Io {
            what: "etcd.log".into(),
            source,
        })?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        command
            .args(["--name", "vigil", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("vigil={peer_url}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl(2) only, between fork and exec: etcd dies with the thread that started it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| Error::Spawn {
            what: bin.display().to_string(),
            source,
        })?;
        let mut etcd = Etcd {
            child,
            endpoint,
            netns: netns.map(|ns| ns.name.clone()),
            _dir: dir,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let ready = etcd.in_place(|endpoint| {
                vmm_cluster::Store::connect(&[endpoint])
                    .and_then(|s| s.hosts().map(|_| ()))
                    .map_err(|e| e.to_string())
            });
            match ready {
                Ok(()) => return Ok(Some(etcd)),
                Err(e) if Instant::now() > deadline => {
                    return Err(Error::Failed {
                        command: "etcd".into(),
                        detail: format!("not serving within {START_LIMIT:?}: {e}"),
                    })
                }
                Err(_) => {}
            }
            if let Ok(Some(status)) = etcd.child.try_wait() {
                return Err(Error::Failed {
                    command: "etcd".into(),
                    detail: format!("exited at start ({status})"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its client URL (from inside its namespace, if it has one).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Its client URL at address `ip` of its namespace.
    pub fn endpoint_at(&self, ip: &str) -> String {
        let port = self.endpoint.rsplit(':').next().unwrap_or("2379");
        format!("http://{ip}:{port}")
    }

    /// Runs `f` with its endpoint where it is reachable: on this thread, or on a thread in its
    /// namespace (a socket stays in the namespace it was made in).
    fn in_place<T: Send + 'static>(&self, f: impl FnOnce(String) -> T + Send + 'static) -> T {
        let endpoint = self.endpoint.clone();
        match &self.netns {
            None => f(endpoint),
            Some(ns) => {
                let path = format!("/run/netns/{ns}");
                std::thread::spawn(move || {
                    let file = std::fs::File::open(&path).expect("open netns");
                    // SAFETY: setns on this thread only, with a valid namespace fd.
                    let rc = unsafe {
                        libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                    };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f(endpoint)
                })
                .join()
                .expect("etcd client thread")
            }
        }
    }

    /// `vigil cluster --etcd ENDPOINT ARGS…`, run where etcd is reachable (in its namespace, if
    /// it has one).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(crate::vigil_bin());
                c
            }
            None => Command::new(crate::vigil_bin()),
        };
        command
            .args(["cluster", "--etcd", &self.endpoint])
            .args(args)
            .output()
            .expect("run vigil cluster")
    }

    /// [`Etcd::cli`], which must succeed and print JSON: that JSON. Panics with its output
    /// otherwise.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "vigil cluster {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "vigil cluster {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Freezes etcd (SIGSTOP) until the guard drops (SIGCONT): unreachable to every client for
    /// that long, its state and leases kept, as a partitioned or stalled etcd.
    pub fn pause(&self) -> Paused {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child's pid, which is not reaped while `self` lives.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Paused { pid }
    }

    /// A client of it.
    pub fn store(&self) -> vmm_cluster::Store {
        vmm_cluster::Store::connect(std::slice::from_ref(&self.endpoint))
            .unwrap_or_else(|e| panic!("connect to etcd: {e}"))
    }
}

/// etcd frozen; dropping this lets it run again.
pub struct Paused {
    pid: libc::pid_t,
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as in `Etcd::pause`; the Etcd outlives its guard only by the caller's care,
        // and a SIGCONT to a reaped pid is harmless (no such process, or never reused this fast).
        unsafe { libc::kill(self.pid, libc::SIGCONT) };
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
