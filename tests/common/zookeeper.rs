//! A real ZooKeeper server on 127.0.0.1 (Debian's `zookeeperd`, installed by `make test`),
//! started per test with its own data directory and port, stoppable and restartable.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

const SCRIPT: &str = "/usr/share/zookeeper/bin/zkServer.sh";

pub struct ZooKeeper {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ZooKeeper {
    /// Whether a ZooKeeper installation is present (the Makefile installs one).
    pub fn installed() -> bool {
        std::path::Path::new(SCRIPT).exists()
    }

    pub fn start() -> ZooKeeper {
        assert!(
            Self::installed(),
            "ZooKeeper is not installed: run `make test` (apt zookeeperd)"
        );
        let dir = tempfile::tempdir().unwrap();
        let mut zk = ZooKeeper {
            port: super::reserve_port(),
            dir,
            child: None,
        };
        zk.spawn();
        zk
    }

    fn cfg(&self) -> PathBuf {
        self.dir.path().join("zoo.cfg")
    }

    fn spawn(&mut self) {
        let d = self.dir.path().display();
        std::fs::write(
            self.cfg(),
            format!(
                "tickTime=500\ninitLimit=5\nsyncLimit=2\ndataDir={d}/data\nclientPort={}\n\
                 clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=ruok,srvr\n",
                self.port
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("zk.log")).unwrap();
        let child = Command::new(SCRIPT)
            .arg("start-foreground")
            .arg(self.cfg())
            .env("ZOO_LOG_DIR", self.dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ruok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("ZooKeeper did not answer ruok within 30 s");
    }

    fn ruok(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"ruok").is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out == "imok"
    }

    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = killpg(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// Stop and start again on the same port and data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        self.stop();
    }
}
