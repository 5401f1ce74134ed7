//! `Proc`: a child process a scenario kills, pauses, resumes and restarts; killed on drop.
//!
//! Each child leads its own process group, so signals reach whatever it started too. Its stdout
//! and stderr go to `<dir>/<name>.log`, appended across restarts with a header line per start.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::{io_err, ChaosError, Result};

/// A command line to start (and start again on restart).
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    netns: Option<Netns>,
}

impl Cmd {
    /// `program` with no arguments.
    pub fn new(program: impl AsRef<OsStr>) -> Cmd {
        Cmd {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            netns: None,
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Cmd {
        self.args.push(a.as_ref().to_owned());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Cmd {
        self.env
            .push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Cmd {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs inside network namespace `ns` (through `ip netns exec`).
    pub fn in_netns(mut self, ns: Netns) -> Cmd {
        self.netns = Some(ns);
        self
    }

    /// The command line as one string (for logs).
    pub fn display(&self) -> String {
        let mut s = String::new();
        if let Some(ns) = &self.netns {
            s.push_str(&format!("[netns {}] ", ns.name()));
        }
        s.push_str(&self.program.to_string_lossy());
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    fn command(&self) -> Command {
        let mut c = match &self.netns {
            Some(ns) => ns.command(&self.program),
            None => Command::new(&self.program),
        };
        c.args(&self.args);
        for (k, v) in &self.env {
            c.env(k, v);
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c
    }
}

/// A running (or stopped) child process; SIGKILLed with its group on drop.
pub struct Proc {
    name: String,
    cmd: Cmd,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Proc {
    /// Starts `cmd` as `name`, logging to `log_dir/<name>.log`.
    pub fn spawn(name: &str, cmd: Cmd, log_dir: &Path) -> Result<Proc> {
        let mut p = Proc {
            name: name.to_string(),
            cmd,
            log: log_dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> Result<()> {
        self.starts += 1;
        let what = format!("log {} of {}", self.log.display(), self.name);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io_err(what.clone()))?;
        writeln!(log, "=== start {}: {}", self.starts, self.cmd.display())
            .map_err(io_err(what.clone()))?;
        let err = log.try_clone().map_err(io_err(what))?;
        let child = self
            .cmd
            .command()
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(io_err(format!(
                "starting {}: {}",
                self.name,
                self.cmd.display()
            )))?;
        tracing::info!(name = %self.name, pid = child.id(), cmd = %self.cmd.display(), "chaos: started");
        let pid = child.id();
        self.child = Some(child);
        if let Some(ns) = self.cmd.netns.clone() {
            self.wait_in_netns(pid, &ns)?;
        }
        Ok(())
    }

    /// Waits until `ip netns exec` has moved the child into `ns`, so that a kill of everything
    /// in the namespace (on drop of the net) cannot miss a process started just before.
    fn wait_in_netns(&mut self, pid: u32, ns: &Netns) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let want = std::fs::metadata(Path::new("/run/netns").join(ns.name()))
            .map_err(io_err(format!("network namespace {}", ns.name())))?
            .ino();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = std::fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino());
            if now.is_ok_and(|i| i == want) || !self.is_running() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ChaosError::Setup(format!(
                    "{} (pid {pid}) did not enter network namespace {} within 5 s",
                    self.name,
                    ns.name()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id of the current run, if started.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// How many times it was started.
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// True while the process has not exited (a paused process is running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(&self, sig: libc::c_int, what: &str) -> Result<()> {
        let pid = self.pid().ok_or_else(|| {
            ChaosError::Setup(format!("cannot {what} {}: not started", self.name))
        })?;
        // SAFETY: kill has no memory-safety preconditions; a negative pid names the group the
        // child leads (process_group(0) at spawn).
        if unsafe { libc::kill(-(pid as i32), sig) } != 0 {
            return Err(ChaosError::Io {
                what: format!("{what} {} (pid {pid})", self.name),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// SIGSTOP: the process hangs (sockets stay open, nothing answers).
    pub fn pause(&self) -> Result<()> {
        self.signal(libc::SIGSTOP, "pause")
    }

    /// SIGCONT after [`Proc::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(libc::SIGCONT, "resume")
    }

    /// SIGKILL to the process group, then reaps the child. Killing an exited process is fine.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // The whole group: children the process started die with it.
            // SAFETY: see `signal`.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            c.wait()
                .map_err(io_err(format!("reaping {} after SIGKILL", self.name)))?;
            tracing::info!(name = %self.name, "chaos: killed");
        }
        Ok(())
    }

    /// Kills the process if it runs and starts the same command line again.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.start()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let Some(c) = self.child.as_mut() else {
            return Ok(None);
        };
        loop {
            if let Some(st) = c
                .try_wait()
                .map_err(io_err(format!("waiting for {}", self.name)))?
            {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
