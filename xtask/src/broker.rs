//! `cargo xtask broker`: makes sure a RabbitMQ answers at `AMQP_URL`, installing
//! and starting the local one (Debian's `rabbitmq-server`) when none does.
//!
//! `rabbitmq-server -detached` returns before the node is up, and
//! `rabbitmqctl await_startup` exits at once (69, "not running at all") until
//! the booting node has registered with epmd, so neither is a wait: the step
//! polls the AMQP port itself until the node answers the protocol header, up
//! to a deadline, and names the node's log when it gives up.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The URL the tests use when `AMQP_URL` is unset.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// How long a node may take to boot: a first boot after `apt-get install`
/// on a loaded 2-core machine has taken most of a minute.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// How often the booting node is asked whether it answers.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The local node the step starts when nothing answers: the system's by
/// default, a private one in the tests.
#[derive(Debug, Clone)]
pub struct LocalNode {
    /// `-n` for `rabbitmqctl`; `None` leaves it to the CLI, which reads the
    /// same `RABBITMQ_NODENAME` and `rabbitmq-env.conf` the server does.
    name: Option<String>,
    /// Set for `rabbitmq-server` only.
    env: Vec<(String, OsString)>,
    /// The node's main log, named in errors.
    log: PathBuf,
}

impl LocalNode {
    /// The node `rabbitmq-server` starts without options on this machine.
    pub fn system() -> Self {
        Self {
            name: None,
            env: Vec::new(),
            log: system_log(),
        }
    }

    /// `rabbitmqctl [-n <name>] <args>`, with its output captured.
    fn ctl(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        let mut command = Command::new("rabbitmqctl");
        if let Some(name) = &self.name {
            command.args(["-n", name]);
        }
        command.args(args).stdin(Stdio::null()).output()
    }

    /// Whether the node's Erlang VM is up and registered with epmd, whether
    /// or not RabbitMQ has finished booting in it.
    fn pings(&self) -> bool {
        self.ctl(&["-q", "--timeout", "10", "ping"])
            .is_ok_and(|o| o.status.success())
    }

    fn start(&self) -> Result<(), String> {
        println!("xtask broker: running rabbitmq-server -detached");
        let output = Command::new("rabbitmq-server")
            .arg("-detached")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run rabbitmq-server: {e}"))?;
        if output.status.success() {
            return Ok(());
        }
        Err(format!(
            "`rabbitmq-server -detached` failed with {}:\n{}{}\nthe node's log: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log.display()
        ))
    }
}

/// `$RABBITMQ_LOGS`, or `<log base>/<node name>.log` as the server scripts
/// derive it: from the environment, then `/etc/rabbitmq/rabbitmq-env.conf`
/// (where Debian's package and this machine's setup put `NODENAME`), then
/// the defaults.
fn system_log() -> PathBuf {
    if let Some(logs) = std::env::var_os("RABBITMQ_LOGS").filter(|l| !l.is_empty() && l != "-") {
        return PathBuf::from(logs);
    }
    let conf = std::fs::read_to_string("/etc/rabbitmq/rabbitmq-env.conf").unwrap_or_default();
    let setting = |name: &str| {
        std::env::var(format!("RABBITMQ_{name}"))
            .ok()
            .or_else(|| env_conf_value(&conf, name))
            .filter(|v| !v.is_empty())
    };
    let node = setting("NODENAME").unwrap_or_else(|| format!("rabbit@{}", short_hostname()));
    let base = setting("LOG_BASE").unwrap_or_else(|| "/var/log/rabbitmq".to_owned());
    Path::new(&base).join(format!("{node}.log"))
}

/// The value of `NAME=value` (or `RABBITMQ_NAME=value`, optionally quoted
/// or exported) in a `rabbitmq-env.conf`; the last one wins, as in the shell.
fn env_conf_value(conf: &str, name: &str) -> Option<String> {
    let long = format!("RABBITMQ_{name}");
    conf.lines()
        .filter_map(|line| {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (key, value) = line.split_once('=')?;
            (key == name || key == long).then(|| value.trim_matches(['"', '\'']).to_owned())
        })
        .next_back()
}

fn short_hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| {
            let output = Command::new("hostname").output().ok()?;
            Some(String::from_utf8_lossy(&output.stdout).into_owned())
        })
        .unwrap_or_default();
    name.trim()
        .split('.')
        .next()
        .unwrap_or("localhost")
        .to_owned()
}

/// `host:port` of an `amqp://` or `amqps://` URL, without a URL parser: the
/// authority is what lies between `//` (after any `user:pass@`) and the next `/`.
fn address(url: &str) -> Result<String, String> {
    let (scheme, rest) = url
        .split_once("://")
        // Not echoed: without its scheme it may still hold a password.
        .ok_or_else(|| "AMQP_URL has no scheme: expected amqp:// or amqps://".to_owned())?;
    let default_port = match scheme {
        "amqp" => 5672,
        "amqps" => 5671,
        other => return Err(format!("AMQP_URL scheme `{other}` is not amqp or amqps")),
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = if host_port.is_empty() {
        "localhost"
    } else {
        host_port
    };
    Ok(if host_port.ends_with(']') || !host_port.contains(':') {
        format!("{host_port}:{default_port}")
    } else {
        host_port.to_owned()
    })
}

/// Whether a broker answers at `addr`. Plain AMQP must answer the protocol
/// header with a method frame on channel 0 (`connection.start`): an open
/// port alone could be some other program. A TLS port is only connected to.
fn answers(addr: &str, tls: bool) -> bool {
    let Ok(addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs.into_iter().any(|a| {
        let connect = TcpStream::connect_timeout(&a, Duration::from_secs(2));
        match connect {
            Ok(stream) if !tls => greets(stream).unwrap_or(false),
            Ok(_) => true,
            Err(_) => false,
        }
    })
}

fn greets(mut stream: TcpStream) -> std::io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"AMQP\x00\x00\x09\x01")?;
    let mut frame_start = [0u8; 3];
    stream.read_exact(&mut frame_start)?;
    Ok(frame_start == [1, 0, 0])
}

fn is_local(addr: &str) -> bool {
    addr.starts_with("127.") || addr.starts_with("localhost:") || addr.starts_with("[::1]")
}

fn run(command: &mut Command) -> Result<(), String> {
    let shown = format!(
        "{} {}",
        command.get_program().to_string_lossy(),
        command
            .get_args()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("xtask broker: running {shown}");
    let status = command
        .status()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed with {status}"))
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Ensures a broker answers at `AMQP_URL` (or the default).
pub fn ensure() -> Result<(), String> {
    let url = std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let addr = address(&url)?;
    ensure_at(
        &addr,
        url.starts_with("amqps:"),
        &LocalNode::system(),
        BOOT_TIMEOUT,
    )
}

/// Ensures a broker answers at `addr`, installing and starting `node` when
/// `addr` is on this machine and nothing answers, and waiting up to
/// `timeout` for it to boot.
fn ensure_at(addr: &str, tls: bool, node: &LocalNode, timeout: Duration) -> Result<(), String> {
    if answers(addr, tls) {
        println!("xtask broker: RabbitMQ answers at {addr}");
        return Ok(());
    }
    if !is_local(addr) {
        return Err(format!(
            "nothing answers at {addr} (from AMQP_URL) and it is not this machine: start that broker, or unset AMQP_URL to use a local one"
        ));
    }
    if !have("rabbitmq-server") {
        install()?;
    }
    let started = Instant::now();
    // Only what the log gains from now on tells about this boot.
    let log_start = std::fs::metadata(&node.log).map_or(0, |m| m.len());
    // A node that is up but not answering is still booting (started by the
    // package's install script, or by a concurrent run): a second
    // `rabbitmq-server` would only fail on the name it holds.
    if node.pings() {
        println!("xtask broker: the node is running but not answering yet");
    } else {
        node.start()?;
    }
    println!(
        "xtask broker: waiting up to {} s for RabbitMQ to answer at {addr}",
        timeout.as_secs()
    );
    wait_until_answers(addr, tls, node, started + timeout, log_start)?;
    println!(
        "xtask broker: RabbitMQ answers at {addr} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Debian's package. It starts the service where systemd runs (and the
/// install returns once it is up); elsewhere, containers and CI, nothing
/// starts it, which [`ensure_at`] then does.
fn install() -> Result<(), String> {
    if !have("apt-get") {
        return Err("RabbitMQ is not installed and this is not a Debian-like system: install RabbitMQ and start it on 127.0.0.1:5672 (guest/guest), or set AMQP_URL".to_owned());
    }
    let apt = |args: &[&str]| {
        run(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null()))
        .map_err(|e| {
            format!("{e}; installing RabbitMQ needs root (or install rabbitmq-server yourself)")
        })
    };
    apt(&["update", "-qq"])?;
    apt(&["install", "-y", "-qq", "rabbitmq-server"])
}

/// Polls `addr` until the node answers. Fails at `deadline`, or as soon as
/// the node's log reports a failed boot and the node is gone, naming the log.
fn wait_until_answers(
    addr: &str,
    tls: bool,
    node: &LocalNode,
    deadline: Instant,
    log_start: u64,
) -> Result<(), String> {
    let log = node.log.display();
    loop {
        if answers(addr, tls) {
            return Ok(());
        }
        // The VM lingers a moment after `BOOT FAILED`, and another node of
        // the same name (one already booting) may have written it.
        if let Some(report) = boot_failure(&node.log, log_start) {
            if !node.pings() {
                return Err(format!(
                    "RabbitMQ failed to boot; from its log {log}:\n{report}"
                ));
            }
        }
        if Instant::now() >= deadline {
            let state = if node.pings() {
                "its node is running (`rabbitmqctl ping` succeeds) but does not answer there: is the RabbitMQ application stopped, or its listener on another port?"
            } else {
                "its node is not running (`rabbitmqctl ping` fails)"
            };
            return Err(format!(
                "RabbitMQ does not answer at {addr} after waiting for it to boot; {state}\nthe node's log: {log}\n{}",
                log_tail(&node.log, 20)
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The `BOOT FAILED` report (that line and the few after it, which say why)
/// in what the log gained after byte `start`.
fn boot_failure(log: &Path, start: u64) -> Option<String> {
    let mut file = std::fs::File::open(log).ok()?;
    let len = file.metadata().ok()?.len();
    // A shorter log was rotated or replaced: all of it is new.
    let start = if len < start { 0 } else { start };
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let at = lines.iter().position(|l| l.contains("BOOT FAILED"))?;
    Some(lines[at..lines.len().min(at + 8)].join("\n"))
}

/// The last `lines` lines of the log (read from its last 64 KiB), with a
/// heading, or why there are none.
fn log_tail(log: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(log)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            format!(
                "--- last {lines} lines of {} ---\n{}\n--- end of log ---",
                log.display(),
                all[all.len().saturating_sub(lines)..].join("\n")
            )
        }
        Err(e) => format!("(cannot read {}: {e})", log.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn addresses_come_from_the_url_authority() {
        assert_eq!(
            address("amqp://guest:guest@127.0.0.1:5672/%2f").as_deref(),
            Ok("127.0.0.1:5672")
        );
        assert_eq!(address("amqp:///").as_deref(), Ok("localhost:5672"));
        assert_eq!(
            address("amqps://u:p@rabbit.example").as_deref(),
            Ok("rabbit.example:5671")
        );
        assert_eq!(
            address("amqp://[::1]:5673/v?heartbeat=1").as_deref(),
            Ok("[::1]:5673")
        );
        assert!(address("http://x").is_err());
    }

    #[test]
    fn a_refused_url_is_not_echoed_with_its_password() {
        let error = address("guest:s3cret@rabbit:5672/%2f").expect_err("no scheme");
        assert!(!error.contains("s3cret"), "{error}");
    }

    #[test]
    fn node_settings_are_read_from_rabbitmq_env_conf() {
        let conf = "# comment\nNODENAME=rabbit@first\nexport RABBITMQ_NODENAME=\"rabbit@localhost\"\nLOG_BASE=/srv/log\n";
        assert_eq!(
            env_conf_value(conf, "NODENAME").as_deref(),
            Some("rabbit@localhost")
        );
        assert_eq!(
            env_conf_value(conf, "LOG_BASE").as_deref(),
            Some("/srv/log")
        );
        assert_eq!(env_conf_value(conf, "MNESIA_BASE"), None);
    }

    /// A fresh directory under the system's temporary one.
    fn temp_dir(prefix: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    /// A port on 127.0.0.1 that nothing listens on.
    fn refused_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port()
    }

    /// A node name no node has: `rabbitmqctl ping` fails for it.
    fn absent_node(log: PathBuf) -> LocalNode {
        LocalNode {
            name: Some(format!("xtask-absent-{}@localhost", std::process::id())),
            env: Vec::new(),
            log,
        }
    }

    #[test]
    fn a_node_that_never_answers_fails_at_the_deadline_naming_its_log() {
        let dir = temp_dir("xtask-deadline-test");
        let node = absent_node(dir.join("node.log"));
        let addr = format!("127.0.0.1:{}", refused_port());
        let error = wait_until_answers(
            &addr,
            false,
            &node,
            Instant::now() + Duration::from_secs(1),
            0,
        )
        .expect_err("nothing listens there");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(error.contains(&node.log.display().to_string()), "{error}");
        assert!(error.contains("not running"), "{error}");
    }

    #[test]
    fn a_failed_boot_ends_the_wait_early_with_the_report_from_the_log() {
        let dir = temp_dir("xtask-boot-failed-test");
        let log = dir.join("node.log");
        // An earlier boot's failure is not this one's.
        std::fs::write(&log, "BOOT FAILED\nError during startup: {old}\n").expect("log");
        let log_start = std::fs::metadata(&log).expect("log").len();
        assert_eq!(boot_failure(&log, log_start), None);
        let node = absent_node(log.clone());
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("log");
            file.write_all(b"BOOT FAILED\n===========\nError during startup: {error,eaddrinuse}\n")
                .expect("append");
        });
        let started = Instant::now();
        let addr = format!("127.0.0.1:{}", refused_port());
        let error = wait_until_answers(
            &addr,
            false,
            &node,
            started + Duration::from_secs(60),
            log_start,
        )
        .expect_err("the boot failed");
        writer.join().expect("writer");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(started.elapsed() < Duration::from_secs(20), "{error}");
        assert!(error.contains("eaddrinuse"), "{error}");
        assert!(!error.contains("{old}"), "{error}");
        assert!(error.contains(&node.log.display().to_string()), "{error}");
    }

    /// A RabbitMQ node of the test's own (name, ports, config, data and logs
    /// in a temporary directory, no plugins so that it boots fast), that
    /// only the broker step starts. Stopped and deleted on drop, also when
    /// the test panics.
    struct PrivateNode {
        node: LocalNode,
        dir: PathBuf,
        port: u16,
        stopped: bool,
    }

    impl PrivateNode {
        fn new() -> Self {
            let dir = temp_dir("xtask-start-test");
            let name = format!("xtask-start-test-{}@localhost", std::process::id());
            let port = unused_port(0);
            let dist_port = unused_port(port);
            // The listener is set in a config file of its own, not with
            // RABBITMQ_NODE_PORT: the system's rabbitmq.conf, which the node
            // would read otherwise, may set the shared node's listener.
            std::fs::write(
                dir.join("rabbitmq.conf"),
                format!("listeners.tcp.1 = 127.0.0.1:{port}\n"),
            )
            .expect("rabbitmq.conf");
            std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("enabled_plugins");
            give_to_broker_user(&dir);
            let env = [
                ("RABBITMQ_NODENAME", OsString::from(&name)),
                ("RABBITMQ_DIST_PORT", dist_port.to_string().into()),
                ("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf").into()),
                // Neither conf.d nor advanced.config from /etc/rabbitmq.
                ("RABBITMQ_CONFIG_FILES", dir.join("conf.d").into()),
                (
                    "RABBITMQ_ADVANCED_CONFIG_FILE",
                    dir.join("advanced.config").into(),
                ),
                (
                    "RABBITMQ_ENABLED_PLUGINS_FILE",
                    dir.join("enabled_plugins").into(),
                ),
                ("RABBITMQ_MNESIA_BASE", dir.join("mnesia").into()),
                ("RABBITMQ_LOG_BASE", dir.join("log").into()),
                ("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid").into()),
                ("ERL_CRASH_DUMP", dir.join("erl_crash.dump").into()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            let log = dir.join("log").join(format!("{name}.log"));
            Self {
                node: LocalNode {
                    name: Some(name),
                    env,
                    log,
                },
                dir,
                port,
                stopped: false,
            }
        }

        fn addr(&self) -> String {
            format!("127.0.0.1:{}", self.port)
        }

        /// `rabbitmqctl stop` with the pid file, which returns once the
        /// node's process has exited; kills the process when that fails.
        fn stop(&mut self) -> Result<(), String> {
            self.stopped = true;
            let pid_file = self.dir.join("rabbitmq.pid");
            let output = self
                .node
                .ctl(&["stop", &pid_file.display().to_string()])
                .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
            if output.status.success() {
                return Ok(());
            }
            if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
            Err(format!(
                "`rabbitmqctl stop` failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    impl Drop for PrivateNode {
        fn drop(&mut self) {
            if !self.stopped {
                let _ = self.stop();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A port on 127.0.0.1 that nothing listens on, below the kernel's
    /// ephemeral range: RabbitMQ's listener has lost ports from that range
    /// to outgoing connections (see tests/src/node.rs).
    fn unused_port(other_than: u16) -> u16 {
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
            .unwrap_or(32768);
        let (low, span) = if ephemeral_low > 12000 {
            (ephemeral_low - 10000, 10000)
        } else {
            (61000, 4000)
        };
        // Its own offset, so that concurrent test processes rarely collide.
        let offset = (std::process::id() * 7919 % u32::from(span)) as u16;
        (0..span)
            .map(|i| low + (offset + i) % span)
            .find(|&p| p != other_than && TcpListener::bind(("127.0.0.1", p)).is_ok())
            .expect("a free port")
    }

    /// Debian's scripts run the node as the `rabbitmq` user when started
    /// by root: it must own the directory to write its data and logs there.
    fn give_to_broker_user(dir: &Path) {
        let id = |args: &[&str]| -> Option<u32> {
            let output = Command::new("id").args(args).output().ok()?;
            String::from_utf8_lossy(&output.stdout).trim().parse().ok()
        };
        if id(&["-u"]) != Some(0) {
            return;
        }
        let (Some(uid), Some(gid)) = (id(&["-u", "rabbitmq"]), id(&["-g", "rabbitmq"])) else {
            return;
        };
        for entry in std::fs::read_dir(dir).expect("node dir") {
            let path = entry.expect("entry").path();
            std::os::unix::fs::chown(&path, Some(uid), Some(gid)).expect("chown");
        }
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown");
    }

    /// The start path, against a stopped node of the test's own: the step
    /// starts it and returns only once it answers AMQP. A shared broker
    /// running on this machine is not touched.
    #[test]
    fn the_broker_step_starts_a_stopped_node_and_waits_until_it_answers() {
        let shared = address(DEFAULT_URL).expect("default URL");
        let shared_was_up = answers(&shared, false);
        let mut node = PrivateNode::new();
        let addr = node.addr();
        assert!(!answers(&addr, false), "nothing answers before the step");
        let started = Instant::now();
        if let Err(e) = ensure_at(&addr, false, &node.node, Duration::from_secs(60)) {
            panic!("{e}\n{}", log_tail(&node.node.log, 40));
        }
        println!("the private node answered after {:?}", started.elapsed());
        // At once, with no retry: the step's return means the node is up.
        assert!(answers(&addr, false), "the node answers AMQP at {addr}");
        node.stop().expect("stop the private node");
        assert!(!answers(&addr, false), "the stopped node still answers");
        if shared_was_up {
            assert!(answers(&shared, false), "the shared broker still answers");
        }
    }
}
