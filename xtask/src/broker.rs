//! `cargo xtask broker`: makes sure a RabbitMQ answers at `AMQP_URL`, installing
//! and starting the local one (Debian's `rabbitmq-server`) when none does.

use std::net::{TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, Instant};

/// The URL the tests use when `AMQP_URL` is unset.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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

fn answers(addr: &str) -> bool {
    addr.to_socket_addrs()
        .map(|mut addrs| {
            addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
        })
        .unwrap_or(false)
}

fn is_local(addr: &str) -> bool {
    addr.starts_with("127.") || addr.starts_with("localhost:") || addr.starts_with("[::1]")
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    println!("xtask broker: running {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed with {status}",
            args.join(" ")
        ))
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
    if answers(&addr) {
        println!("xtask broker: RabbitMQ answers at {addr}");
        return Ok(());
    }
    if !is_local(&addr) {
        return Err(format!(
            "nothing answers at {addr} (from AMQP_URL) and it is not this machine: start that broker, or unset AMQP_URL to use a local one"
        ));
    }
    if !have("rabbitmq-server") {
        if !have("apt-get") {
            return Err("RabbitMQ is not installed and this is not a Debian-like system: install RabbitMQ and start it on 127.0.0.1:5672 (guest/guest), or set AMQP_URL".to_owned());
        }
        run("apt-get", &["update", "-qq"])?;
        run("apt-get", &["install", "-y", "-qq", "rabbitmq-server"])?;
    }
    // Debian's package starts the service through systemd where there is one;
    // without it (containers, CI) the server is started by hand.
    if !answers(&addr) {
        run("rabbitmq-server", &["-detached"])?;
    }
    run("rabbitmqctl", &["--timeout", "120", "await_startup"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !answers(&addr) {
        if Instant::now() > deadline {
            return Err(format!("RabbitMQ started but nothing answers at {addr}"));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("xtask broker: RabbitMQ answers at {addr}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::address;

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
}
