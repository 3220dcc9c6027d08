//! Private RabbitMQ nodes for tests that need their own broker (TLS, restarts).
//!
//! [`PrivateNode::start`] boots a RabbitMQ node of its own next to the shared
//! one: its own node name (`amqptest-<pid>-<counter>-<nanos>@localhost`), its
//! own AMQP, distribution and (optionally) TLS ports, and its own directory
//! (config, enabled plugins, Mnesia, logs, pid file, crash dump) in a fresh
//! temporary directory. Dropping the [`PrivateNode`] stops the node and removes
//! the directory, also when the test panics.
//!
//! ```no_run
//! use amqp_client_tests::node::{NodeOptions, PrivateNode};
//!
//! # async fn example() {
//! let node = PrivateNode::start(NodeOptions::default());
//! let connection = amqp091::Connection::open(&node.amqp_url()).await.unwrap();
//! connection.close().await.unwrap();
//! node.stop_app();
//! node.start_app();
//! node.stop();
//! # }
//! ```
//!
//! The node is started with `rabbitmq-server -detached` and managed with
//! `rabbitmqctl -n <node>`, both from `PATH`. With the Debian/Ubuntu package
//! both are wrappers that, run as root, switch to the `rabbitmq` user (whose
//! home is `/var/lib/rabbitmq`): the private node, the shared node and every
//! `rabbitmqctl` then use the same cookie, `/var/lib/rabbitmq/.erlang.cookie`.
//! Elsewhere (a generic install run by the current user) server and CLI both
//! use `~/.erlang.cookie`. Either way the cookie is shared, and the files of
//! the node's directory are given to the `rabbitmq` user when the tests run as
//! root so that a node running as that user can use them.
//!
//! Ports are picked below the kernel's ephemeral range (where outgoing
//! connections take their local ports), skipping any port some socket is
//! listening on and any port handed out earlier in this process. A node
//! that still loses a port race (another process took it meanwhile) is
//! started again with new ports.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How a [`PrivateNode`] is set up.
///
/// In [`config`](Self::config) and in the contents of [`files`](Self::files)
/// the placeholders `{dir}` (the node's directory, where the files are
/// written), `{port}` (the AMQP port) and `{tls_port}` (the TLS port, when
/// [`tls_port`](Self::tls_port) asks for one) are replaced before the node
/// starts.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Extra lines for `rabbitmq.conf` (the new-style `key = value` format),
    /// appended after the AMQP listener line the node always gets.
    pub config: String,
    /// Files (`name`, contents) written into the node's directory before it
    /// starts, e.g. certificates that the config refers to as `{dir}/name`.
    pub files: Vec<(String, Vec<u8>)>,
    /// Reserve a free port for a TLS listener: `{tls_port}` in the config, and
    /// [`PrivateNode::tls_port`].
    pub tls_port: bool,
    /// Plugins to enable; none by default, so the node boots fast.
    pub plugins: Vec<String>,
    /// How long booting may take before [`PrivateNode::start`] gives up.
    pub start_timeout: Duration,
}

impl Default for NodeOptions {
    fn default() -> Self {
        Self {
            config: String::new(),
            files: Vec::new(),
            tls_port: false,
            plugins: Vec::new(),
            start_timeout: Duration::from_secs(120),
        }
    }
}

impl NodeOptions {
    /// Appends one line to [`config`](Self::config).
    #[must_use]
    pub fn config_line(mut self, line: impl AsRef<str>) -> Self {
        self.config.push_str(line.as_ref());
        self.config.push('\n');
        self
    }

    /// Adds a file to write into the node's directory.
    #[must_use]
    pub fn file(mut self, name: impl Into<String>, contents: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.into(), contents.into()));
        self
    }

    /// Adds a plugin to enable.
    #[must_use]
    pub fn plugin(mut self, name: impl Into<String>) -> Self {
        self.plugins.push(name.into());
        self
    }

    /// A TLS listener on 127.0.0.1 and a free port: writes the PEM files
    /// `tls-ca.pem`, `tls-cert.pem` and `tls-key.pem` into the node's
    /// directory and configures `ssl_options` with them, without asking
    /// clients for certificates (`verify_none`).
    #[must_use]
    pub fn tls_listener(
        self,
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_listener_with(ca_pem, cert_pem, key_pem, false)
    }

    /// The same listener, but clients must present a certificate signed by
    /// the CA (`verify_peer`, `fail_if_no_peer_cert`), as SASL EXTERNAL needs.
    #[must_use]
    pub fn tls_listener_verifying_clients(
        self,
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_listener_with(ca_pem, cert_pem, key_pem, true)
    }

    fn tls_listener_with(
        mut self,
        ca_pem: impl Into<Vec<u8>>,
        cert_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
        verify_clients: bool,
    ) -> Self {
        self.tls_port = true;
        let (verify, fail_if_no_peer_cert) = if verify_clients {
            ("verify_peer", true)
        } else {
            ("verify_none", false)
        };
        self.file("tls-ca.pem", ca_pem)
            .file("tls-cert.pem", cert_pem)
            .file("tls-key.pem", key_pem)
            .config_line("listeners.ssl.1 = 127.0.0.1:{tls_port}")
            .config_line("ssl_options.cacertfile = {dir}/tls-ca.pem")
            .config_line("ssl_options.certfile = {dir}/tls-cert.pem")
            .config_line("ssl_options.keyfile = {dir}/tls-key.pem")
            .config_line(format!("ssl_options.verify = {verify}"))
            .config_line(format!(
                "ssl_options.fail_if_no_peer_cert = {fail_if_no_peer_cert}"
            ))
    }

    /// Sets how long booting may take.
    #[must_use]
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }
}

/// A RabbitMQ node of its own, stopped and deleted on drop.
#[derive(Debug)]
pub struct PrivateNode {
    node: Node,
    startup_time: Duration,
    stopped: AtomicBool,
}

/// What it takes to manage a node; cheap to clone into a blocking task.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    port: u16,
    dist_port: u16,
    tls_port: Option<u16>,
    dir: PathBuf,
}

/// Why one attempt to boot a node failed.
struct StartError {
    message: String,
    /// A port was taken by someone else: worth another try with new ports.
    port_clash: bool,
}

const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

impl PrivateNode {
    /// Boots a node and waits until it accepts AMQP (and TLS) connections.
    /// Blocks for the few seconds that takes; from async code prefer
    /// [`start_async`](Self::start_async).
    ///
    /// # Panics
    ///
    /// When the node does not come up within
    /// [`NodeOptions::start_timeout`], with the tail of its log.
    pub fn start(options: NodeOptions) -> PrivateNode {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            match Self::try_start(&options) {
                Ok(node) => return node,
                Err(e) if e.port_clash && attempt < ATTEMPTS => {
                    eprintln!("a private RabbitMQ node lost a port race; starting it again with new ports:\n{}", e.message);
                }
                Err(e) => panic!("{}", e.message),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// [`start`](Self::start) on a blocking thread.
    pub async fn start_async(options: NodeOptions) -> PrivateNode {
        match tokio::task::spawn_blocking(move || Self::start(options)).await {
            Ok(node) => node,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    fn try_start(options: &NodeOptions) -> Result<PrivateNode, StartError> {
        let started = Instant::now();
        let id = unique_id();
        let node = Node {
            name: format!("amqptest-{id}@localhost"),
            port: free_port(),
            dist_port: free_port(),
            tls_port: options.tls_port.then(free_port),
            dir: std::env::temp_dir().join(format!("amqptest-{id}")),
        };
        let fail = |message: String| StartError {
            message,
            port_clash: false,
        };
        std::fs::create_dir_all(&node.dir)
            .map_err(|e| fail(format!("cannot create {}: {e}", node.dir.display())))?;
        let mut private = PrivateNode {
            node,
            startup_time: Duration::ZERO,
            // Nothing to stop until rabbitmq-server ran.
            stopped: AtomicBool::new(true),
        };
        let node = &private.node;
        node.write_files(options).map_err(fail)?;

        let output = node
            .server_command()
            .arg("-detached")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                fail(format!(
                    "cannot run rabbitmq-server: {e} (is RabbitMQ installed and on PATH?)"
                ))
            })?;
        if !output.status.success() {
            return Err(node.start_error("`rabbitmq-server -detached` failed", Some(&output)));
        }
        private.stopped.store(false, Ordering::SeqCst);
        node.spawn_watchdog();
        let deadline = started + options.start_timeout;
        let booted = node.await_startup(deadline).and_then(|()| {
            node.wait_for_ports(true, deadline)
                .map_err(|what| node.start_error(&what, None))
        });
        if let Err(e) = booted {
            // start_error killed the node already.
            private.stopped.store(true, Ordering::SeqCst);
            return Err(e);
        }
        private.startup_time = started.elapsed();
        Ok(private)
    }

    /// The node name, `amqptest-…@localhost`.
    pub fn node_name(&self) -> &str {
        &self.node.name
    }

    /// The AMQP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.node.port
    }

    /// The Erlang distribution port.
    pub fn dist_port(&self) -> u16 {
        self.node.dist_port
    }

    /// The TLS port, when [`NodeOptions::tls_port`] asked for one.
    pub fn tls_port(&self) -> Option<u16> {
        self.node.tls_port
    }

    /// The node's directory: config, the options' files, data and logs.
    pub fn dir(&self) -> &Path {
        &self.node.dir
    }

    /// How long booting took, until the ports accepted connections.
    pub fn startup_time(&self) -> Duration {
        self.startup_time
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{HOST}:{}/%2f", self.node.port)
    }

    /// The config of [`amqp_url`](Self::amqp_url).
    pub fn config(&self) -> amqp091::Config {
        self.amqp_url().parse().expect("a valid AMQP URL")
    }

    /// The node's main log file.
    pub fn log_file(&self) -> PathBuf {
        self.node.log_file()
    }

    /// The last `lines` lines of the node's log, with a heading.
    pub fn log_tail(&self, lines: usize) -> String {
        self.node.log_tail(lines)
    }

    /// Runs `rabbitmqctl -n <node> <args>` and returns its stdout.
    ///
    /// # Panics
    ///
    /// When the command fails, with its output and the log's tail.
    pub fn rabbitmqctl(&self, args: &[&str]) -> String {
        self.node.ctl_ok(args)
    }

    /// Stops the RabbitMQ application (the Erlang node keeps running) and
    /// waits until its ports refuse connections. Blocks; from async code
    /// prefer [`stop_app_async`](Self::stop_app_async).
    ///
    /// # Panics
    ///
    /// When `rabbitmqctl stop_app` fails or the ports stay open for 60 s.
    pub fn stop_app(&self) {
        self.node.stop_app();
    }

    /// Starts the RabbitMQ application again and waits until its ports
    /// accept connections. Blocks; from async code prefer
    /// [`start_app_async`](Self::start_app_async).
    ///
    /// # Panics
    ///
    /// When `rabbitmqctl start_app` fails or the ports stay closed for 60 s.
    pub fn start_app(&self) {
        self.node.start_app();
    }

    /// [`stop_app`](Self::stop_app) on a blocking thread, so that the
    /// runtime keeps driving the connections meanwhile.
    pub async fn stop_app_async(&self) {
        let node = self.node.clone();
        join_blocking(tokio::task::spawn_blocking(move || node.stop_app())).await;
    }

    /// [`start_app`](Self::start_app) on a blocking thread.
    pub async fn start_app_async(&self) {
        let node = self.node.clone();
        join_blocking(tokio::task::spawn_blocking(move || node.start_app())).await;
    }

    /// Stops the node and waits for its process to exit (`rabbitmqctl stop`
    /// with the pid file); kills it when that fails. Stopping twice is a
    /// no-op.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let node = &self.node;
        if node.os_pid().is_some_and(|pid| !process_alive(pid)) {
            return;
        }
        let pid_file = node.pid_file();
        let stopped = node
            .ctl(&["stop", &pid_file.display().to_string()])
            .is_ok_and(|o| o.status.success());
        if !stopped || node.os_pid().is_some_and(process_alive) {
            eprintln!(
                "`rabbitmqctl stop` of private node {} failed; killing it",
                node.name
            );
            node.kill();
        }
    }

    /// Whether [`stop`](Self::stop) ran (or the node never started).
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
}

async fn join_blocking(task: tokio::task::JoinHandle<()>) {
    if let Err(e) = task.await {
        std::panic::resume_unwind(e.into_panic());
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("AMQPTEST_KEEP_NODE_DIRS").is_some() {
            eprintln!("keeping {}", self.node.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.node.dir);
        }
    }
}

impl Node {
    /// Writes `rabbitmq.conf`, `enabled_plugins` and the options' files, and
    /// gives them to the user the broker runs as.
    fn write_files(&self, options: &NodeOptions) -> Result<(), String> {
        let expand = |text: &str| {
            text.replace("{dir}", &self.dir.display().to_string())
                .replace("{port}", &self.port.to_string())
                .replace(
                    "{tls_port}",
                    &self.tls_port.map(|p| p.to_string()).unwrap_or_default(),
                )
        };
        let write = |name: &str, contents: &[u8]| {
            let path = self.dir.join(name);
            std::fs::write(&path, contents)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        let mut config = format!(
            "# written by amqp_client_tests::node for {}\nlisteners.tcp.1 = {HOST}:{}\n",
            self.name, self.port
        );
        config.push_str(&expand(&options.config));
        write("rabbitmq.conf", config.as_bytes())?;
        write(
            "enabled_plugins",
            format!("[{}].\n", options.plugins.join(",")).as_bytes(),
        )?;
        for (name, contents) in &options.files {
            match std::str::from_utf8(contents) {
                Ok(text) => write(name, expand(text).as_bytes())?,
                Err(_) => write(name, contents)?,
            }
        }
        give_to_broker_user(&self.dir)?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot restrict {}: {e}", self.dir.display()))
    }

    /// `rabbitmq-server` with the environment that makes this node private.
    fn server_command(&self) -> Command {
        let mut command = Command::new("rabbitmq-server");
        let dir = &self.dir;
        command
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            // RabbitMQ 3.10 takes the path with or without `.conf`.
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            // No conf.d or advanced.config from /etc/rabbitmq.
            .env("RABBITMQ_CONFIG_FILES", dir.join("conf.d"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.pid_file())
            .env("ERL_CRASH_DUMP", self.crash_dump())
            // Whatever the environment says about the shared node.
            .env_remove("RABBITMQ_NODE_PORT")
            .env_remove("RABBITMQ_NODE_IP_ADDRESS")
            .env_remove("RABBITMQ_USE_LONGNAME")
            .env_remove("RABBITMQ_LOGS")
            .env_remove("RABBITMQ_MNESIA_DIR")
            .env_remove("RABBITMQ_FEATURE_FLAGS_FILE")
            .env_remove("RABBITMQ_PLUGINS_EXPAND_DIR")
            .env_remove("RABBITMQ_QUORUM_DIR")
            .env_remove("RABBITMQ_STREAM_DIR");
        command
    }

    /// Starts a detached shell that stops the node and deletes its
    /// directory if this process dies without dropping the [`PrivateNode`]
    /// (killed, or `std::process::exit`); it ends by itself once the
    /// directory is gone.
    fn spawn_watchdog(&self) {
        let quote =
            |path: &Path| format!("'{}'", path.display().to_string().replace('\'', "'\\''"));
        let (dir, pid_file) = (quote(&self.dir), quote(&self.pid_file()));
        let script = format!(
            "( trap '' HUP INT TERM
               while kill -0 {me} 2>/dev/null && [ -d {dir} ]; do sleep 1; done
               if [ -d {dir} ]; then
                 pid=$(cat {pid_file} 2>/dev/null)
                 if [ -n \"$pid\" ]; then
                   kill -TERM \"$pid\" 2>/dev/null
                   i=0; while [ $i -lt 30 ] && kill -0 \"$pid\" 2>/dev/null; do sleep 1; i=$((i+1)); done
                   kill -KILL \"$pid\" 2>/dev/null
                 fi
                 rm -rf {dir}
               fi ) </dev/null >/dev/null 2>&1 &",
            me = std::process::id(),
        );
        // The shell forks the watchdog and exits at once; init adopts it.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// `rabbitmqctl -n <node> <args>`.
    fn ctl(&self, args: &[&str]) -> std::io::Result<Output> {
        Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .env_remove("RABBITMQ_USE_LONGNAME")
            .stdin(Stdio::null())
            .output()
    }

    /// `rabbitmqctl -n <node> <args>`, panicking with its output on failure.
    fn ctl_ok(&self, args: &[&str]) -> String {
        let output = self
            .ctl(args)
            .unwrap_or_else(|e| panic!("cannot run rabbitmqctl: {e}"));
        if !output.status.success() {
            panic!(
                "`rabbitmqctl -n {} {}` failed ({}):\n{}{}\n{}",
                self.name,
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log_tail(40)
            );
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits for the boot to finish: first for the pid file (written early
    /// in the boot), then for `rabbitmqctl await_startup`, which fails at
    /// once while the node is not yet registered with epmd, so it is
    /// retried. A crash dump or a dead process ends the wait early.
    fn await_startup(&self, deadline: Instant) -> Result<(), StartError> {
        let mut last = None;
        loop {
            if self.crash_dump().exists() {
                return Err(self.start_error("the node crashed while booting", last.as_ref()));
            }
            if let Some(pid) = self.os_pid() {
                if !process_alive(pid) {
                    return Err(self.start_error(
                        &format!("the node (OS pid {pid}) exited while booting"),
                        last.as_ref(),
                    ));
                }
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .max(1);
                let output = self
                    .ctl(&["--timeout", &left.to_string(), "await_startup"])
                    .map_err(|e| StartError {
                        message: format!("cannot run rabbitmqctl: {e}"),
                        port_clash: false,
                    })?;
                if output.status.success() {
                    return Ok(());
                }
                last = Some(output);
            }
            if Instant::now() >= deadline {
                return Err(self.start_error("the node did not boot in time", last.as_ref()));
            }
            std::thread::sleep(Duration::from_millis(if last.is_some() {
                500
            } else {
                100
            }));
        }
    }

    /// Waits until the AMQP (and TLS) ports accept connections (`open`) or
    /// refuse them (`!open`).
    fn wait_for_ports(&self, open: bool, deadline: Instant) -> Result<(), String> {
        for port in std::iter::once(self.port).chain(self.tls_port) {
            loop {
                let address = SocketAddr::from((HOST, port));
                let accepts = TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok();
                if accepts == open {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "port {port} of node {} still {} connections",
                        self.name,
                        if open { "refuses" } else { "accepts" }
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn stop_app(&self) {
        self.ctl_ok(&["stop_app"]);
        if let Err(e) = self.wait_for_ports(false, Instant::now() + Duration::from_secs(60)) {
            panic!("{e}\n{}", self.log_tail(40));
        }
    }

    fn start_app(&self) {
        self.ctl_ok(&["start_app"]);
        if let Err(e) = self.wait_for_ports(true, Instant::now() + Duration::from_secs(60)) {
            panic!("{e}\n{}", self.log_tail(40));
        }
    }

    /// Kills what an attempt started and describes why it failed.
    fn start_error(&self, what: &str, output: Option<&Output>) -> StartError {
        let log = self.log_tail(60);
        let stderr = output
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default();
        let port_clash = ["eaddrinuse", "dist_port_already_used", "already in use"]
            .iter()
            .any(|sign| log.contains(sign) || stderr.contains(sign));
        let mut message = format!(
            "private RabbitMQ node {} (AMQP port {}, distribution port {}, TLS port {:?}, dir {}) failed to start: {what}\n",
            self.name,
            self.port,
            self.dist_port,
            self.tls_port,
            self.dir.display()
        );
        if let Some(output) = output {
            let _ = writeln!(
                message,
                "last command: {}\nstdout:\n{}\nstderr:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout).trim_end(),
                stderr.trim_end()
            );
        }
        if let Some(slogan) = self.crash_slogan() {
            let _ = writeln!(
                message,
                "crash dump {}: {slogan}",
                self.crash_dump().display()
            );
        }
        message.push_str(&log);
        self.kill();
        if !self.log_file().exists() && self.crash_dump().exists() {
            // It died before its logging was set up (a bad config, say): what
            // it said went to the stdout that `-detached` throws away.
            message.push_str(&self.foreground_output());
        }
        StartError {
            message,
            port_clash,
        }
    }

    /// The `Slogan:` line of the crash dump: why the VM died. Waits a little
    /// for a dump that is being written.
    fn crash_slogan(&self) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut head = Vec::with_capacity(4096);
            let read = std::fs::File::open(self.crash_dump())
                .and_then(|file| file.take(4096).read_to_end(&mut head));
            let slogan = String::from_utf8_lossy(&head)
                .lines()
                .find_map(|line| line.strip_prefix("Slogan: ").map(str::to_owned));
            if slogan.is_some() || read.is_err() || Instant::now() >= deadline {
                return slogan;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Boots the node once more in the foreground, which fails again, and
    /// returns the first lines it printed.
    fn foreground_output(&self) -> String {
        let path = self.dir.join("foreground.out");
        let run = || -> std::io::Result<()> {
            let out = std::fs::File::create(&path)?;
            let err = out.try_clone()?;
            let _ = std::fs::remove_file(self.crash_dump());
            let mut child = self
                .server_command()
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() >= deadline {
                    self.kill();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        };
        // The reason comes first; a crash report and the VM's last words follow.
        let head = |path: &Path| -> std::io::Result<String> {
            let text = std::fs::read_to_string(path)?;
            Ok(text.lines().take(30).fold(String::new(), |mut out, line| {
                out.push_str(line);
                out.push('\n');
                out
            }))
        };
        match run().and_then(|()| head(&path)) {
            Ok(text) => format!(
                "\n--- first lines `rabbitmq-server` prints when run in the foreground ---\n{text}--- end ---"
            ),
            Err(e) => format!("\n(cannot run rabbitmq-server in the foreground: {e})"),
        }
    }

    /// Kills the node's process, if it wrote its pid file, and waits for it
    /// to exit.
    fn kill(&self) {
        let Some(pid) = self.os_pid() else { return };
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("log").join(format!("{}.log", self.name))
    }

    fn log_tail(&self, lines: usize) -> String {
        let path = self.log_file();
        match tail(&path, lines) {
            Ok(text) => format!(
                "--- last {lines} lines of {} ---\n{text}--- end of log ---",
                path.display()
            ),
            Err(e) => format!("(no log: cannot read {}: {e})", path.display()),
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("rabbitmq.pid")
    }

    fn crash_dump(&self) -> PathBuf {
        self.dir.join("erl_crash.dump")
    }

    /// The OS pid of the node, from its pid file.
    fn os_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// `<pid>-<counter>-<nanos>`: unique in this process, and across processes
/// (and earlier runs that reused the pid).
fn unique_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos:09}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A port on 127.0.0.1 that nothing listens on and that this process has not
/// handed out before.
///
/// Ports come from below the ephemeral range: a port from `bind(0)` is one
/// outgoing connections use too, and RabbitMQ's listener failed with
/// `eaddrinuse` on such a port. Each process starts at its own offset so
/// that test binaries running at once rarely try the same ports.
fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<(u16, HashSet<u16>)>> = OnceLock::new();
    let (low, high) = port_range();
    let span = high - low;
    let given = GIVEN.get_or_init(|| {
        let start = (std::process::id() % u32::from(span / 97)) as u16 * 97;
        Mutex::new((start, HashSet::new()))
    });
    let mut given = given.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..span {
        let port = low + given.0 % span;
        given.0 = (given.0 + 1) % span;
        if given.1.contains(&port) {
            continue;
        }
        if TcpListener::bind((HOST, port)).is_ok() {
            given.1.insert(port);
            return port;
        }
    }
    panic!("no free port between {low} and {high}");
}

/// `[low, high)` for [`free_port`]: up to 10000 ports ending where the
/// kernel's ephemeral range starts.
fn port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low > 12000 {
        (
            ephemeral_low.saturating_sub(10000).max(11000),
            ephemeral_low,
        )
    } else {
        (61000, 65000)
    }
}

fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie (state Z) has exited already.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => {
            if Path::new("/proc/self").exists() {
                false
            } else {
                Command::new("kill")
                    .args(["-0", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            }
        }
    }
}

/// Gives `dir` and everything in it to the `rabbitmq` user when this process
/// runs as root and that user exists: the packaged scripts run the node as
/// `rabbitmq`, which must write its data there and read the config and keys.
fn give_to_broker_user(dir: &Path) -> Result<(), String> {
    static OWNER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    let owner = *OWNER.get_or_init(|| {
        let id = |args: &[&str]| -> Option<u32> {
            let output = Command::new("id").args(args).output().ok()?;
            if !output.status.success() {
                return None;
            }
            String::from_utf8_lossy(&output.stdout).trim().parse().ok()
        };
        if id(&["-u"])? != 0 {
            return None;
        }
        Some((id(&["-u", "rabbitmq"])?, id(&["-g", "rabbitmq"])?))
    });
    let Some((uid, gid)) = owner else {
        return Ok(());
    };
    fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        if path.is_dir() {
            for entry in std::fs::read_dir(path)? {
                chown_tree(&entry?.path(), uid, gid)?;
            }
        }
        Ok(())
    }
    chown_tree(dir, uid, gid)
        .map_err(|e| format!("cannot give {} to the rabbitmq user: {e}", dir.display()))
}

/// The last `lines` lines of a file, reading at most its last 64 KiB.
fn tail(path: &Path, lines: usize) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let mut out = all[all.len().saturating_sub(lines)..].join("\n");
    out.push('\n');
    Ok(out)
}
