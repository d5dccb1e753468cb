//! An sshd on 127.0.0.1 with its own host and client keys, for real `fuse.sshfs` mounts.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nasbak_process::ExternalCommand;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running sshd on 127.0.0.1 that accepts root with a key of its own; stopped on drop.
#[derive(Debug)]
pub struct SshServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

fn keygen(path: &Path) {
    ExternalCommand::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .run()
        .unwrap_or_else(|e| panic!("ssh-keygen (package openssh-client; run `cargo xtask lab up`): {e}"));
}

impl SshServer {
    /// Starts sshd in the foreground on a free port of 127.0.0.1 and waits until it listens.
    pub fn start() -> SshServer {
        SshServer::start_in(None, "127.0.0.1")
    }

    /// Starts sshd listening on `address` inside the network namespace `netns` (one the caller
    /// made, reachable from here, e.g. over a shaped veth pair), or in this one when none; waits
    /// until it listens.
    pub fn start_in(netns: Option<&str>, address: &str) -> SshServer {
        let dir = std::env::temp_dir().join(format!("nasbak-sshd-{}-{}", std::process::id(), free_port()));
        fs::create_dir_all(&dir).expect("sshd dir");
        fs::create_dir_all("/run/sshd").expect("/run/sshd (privilege separation directory)");
        keygen(&dir.join("host_key"));
        keygen(&dir.join("client_key"));
        fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).expect("authorized_keys");
        let port = free_port();
        let config = format!(
            "ListenAddress {address}\nPort {port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile {d}/sshd.pid\nSubsystem sftp internal-sftp\nLogLevel ERROR\n",
            d = dir.display()
        );
        fs::write(dir.join("sshd_config"), config).expect("sshd_config");
        let sshd = ["/usr/sbin/sshd", "/sbin/sshd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or_else(|| crate::lab_missing("sshd is not installed (package openssh-server)"));
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, sshd]);
                c
            }
            None => Command::new(sshd),
        };
        let child = command
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sshd");
        let server = SshServer { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect((address, port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {address}:{port} within 20 s");
            thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client's private key, accepted for root.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_key")
    }

    /// Mount options for `fuse.sshfs` that reach this server without prompts.
    pub fn sshfs_options(&self) -> String {
        format!(
            "port={},IdentityFile={},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,ServerAliveInterval=2,ServerAliveCountMax=2,allow_other",
            self.port,
            self.client_key().display()
        )
    }

    /// Freezes the listening sshd (SIGSTOP): new connections hang, as with a dead server.
    pub fn pause(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGSTOP);
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
    }

    /// Sends `signal` to every process serving an open connection (the listener's descendants):
    /// SIGSTOP makes the server of established sessions stop answering, as a NAS that hangs.
    pub fn signal_sessions(&self, signal: Signal) {
        for pid in descendants(self.child.id() as i32) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

/// Every descendant of `root` (from the parent pids in `/proc/*/stat`).
fn descendants(root: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|pid| {
                    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    let ppid = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
                    Some((pid, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

impl Drop for SshServer {
    fn drop(&mut self) {
        self.resume();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Pids of processes whose command line contains `needle` (for pausing a FUSE daemon).
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
        })
        .filter(|pid| *pid != std::process::id() as i32)
        .collect()
}
