//! A `vigil` process started in a network namespace, its output lines on a channel.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A `vigil` process in a namespace, its output lines on a channel (and on stderr).
pub struct Process {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    name: &'static str,
}

impl Process {
    pub fn start(name: &'static str, netns: &str, args: &[String], ready: &str) -> Process {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(crate::vigil_bin())
            .args(args)
            // Fewer guest timer ticks per wall second on an emulating host; guest timeouts
            // stretch by the same factor (see tests/tests/tenant.rs).
            .env("VIGIL_TSC_DILATION", "8")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start vigil");
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("[{name}] {line}");
                    if tx.send(line).is_err() {
                        // Nobody listens any more; keep draining so the process never blocks.
                        continue;
                    }
                }
            });
        }
        let mut p = Process { child, lines, name };
        p.wait_for(ready, Duration::from_secs(60));
        p
    }

    /// The first line containing `text` from now on.
    pub fn wait_for(&mut self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("{}: no line with {text:?} within {limit:?}", self.name),
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
