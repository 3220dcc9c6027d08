//! Runs the built `amqp` binary against the RabbitMQ at `AMQP_URL` (default
//! amqp://guest:guest@127.0.0.1:5672/%2f). Without a broker these tests fail,
//! naming the URL: `cargo xtask test` starts one.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A queue or exchange name no other test or run uses.
fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!(
        "amqp-cli-test.{prefix}.{}.{nanos}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `amqp ARGS` with `stdin` (empty when `None`), against `AMQP_URL`.
fn amqp(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_amqp"))
        .args(args)
        .env("AMQP_URL", url())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the amqp binary runs");
    let mut input = child.stdin.take().expect("stdin is piped");
    let body = stdin.unwrap_or_default().to_vec();
    // Written from a thread: a large input would fill the pipe while the
    // child's output fills the other one.
    let writer = std::thread::spawn(move || input.write_all(&body));
    let output = child.wait_with_output().expect("the amqp binary finishes");
    writer
        .join()
        .expect("the stdin writer does not panic")
        .expect("stdin is written");
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success, showing stderr when it failed.
fn ok(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let output = amqp(args, stdin);
    assert!(
        output.status.success(),
        "amqp {args:?} failed with {:?}: {}",
        output.status.code(),
        stderr(&output)
    );
    output
}

/// Asserts that `amqp ARGS` exits with `code` and one stderr line
/// `amqp: …` containing `cause`.
fn fails(args: &[&str], stdin: Option<&[u8]>, code: i32, cause: &str) -> Output {
    let output = amqp(args, stdin);
    let err = stderr(&output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "amqp {args:?}: exit code; stderr: {err}"
    );
    assert_eq!(err.lines().count(), 1, "amqp {args:?}: one line: {err:?}");
    assert!(err.starts_with("amqp: "), "amqp {args:?}: prefix: {err:?}");
    assert!(
        err.contains(cause),
        "amqp {args:?}: `{cause}` not in {err:?}"
    );
    output
}

/// Declares a fresh queue, failing loudly when no broker answers.
fn fresh_queue(prefix: &str) -> String {
    let queue = unique(prefix);
    let output = amqp(&["declare", "queue", &queue], None);
    assert!(
        output.status.success(),
        "no RabbitMQ at {} ({}): run the tests with `cargo xtask test`, which starts one, or set AMQP_URL",
        url(),
        stderr(&output)
    );
    assert_eq!(stdout(&output).trim(), queue);
    queue
}

fn delete_queue(queue: &str) {
    ok(&["delete", "queue", queue], None);
}

#[test]
fn ten_thousand_lines_round_trip() {
    let queue = fresh_queue("lines");
    let lines: Vec<String> = (0..10_000)
        .map(|i| format!("message {i} {}", "x".repeat(i % 50)))
        .collect();
    let input = lines.join("\n") + "\n";
    ok(
        &["publish", "-r", &queue, "--lines"],
        Some(input.as_bytes()),
    );
    let output = ok(
        &["consume", &queue, "--count", "10000", "--timeout", "30"],
        None,
    );
    let received: Vec<&str> = std::str::from_utf8(&output.stdout)
        .expect("the bodies are UTF-8")
        .lines()
        .collect();
    assert_eq!(received.len(), lines.len());
    assert!(received.iter().zip(&lines).all(|(a, b)| a == b));
    // Every message was acked: the queue is empty now.
    fails(&["get", &queue], None, 6, "is empty");
    delete_queue(&queue);
}

#[test]
fn json_round_trip_of_properties_and_headers() {
    let queue = fresh_queue("json");
    ok(
        &[
            "publish",
            "-r",
            &queue,
            "--content-type",
            "application/json",
            "--content-encoding",
            "identity",
            "--persistent",
            "--priority",
            "7",
            "--correlation-id",
            "corr-1",
            "--reply-to",
            "replies",
            "--expiration",
            "60000",
            "--message-id",
            "msg-1",
            "--timestamp",
            "1700000000",
            "--type",
            "order.created",
            "--user-id",
            "guest",
            "--app-id",
            "cli-test",
            "-H",
            "text=hello",
            "-H",
            "count=int:42",
            "-H",
            "flag=bool:true",
            "-H",
            "ratio=float:1.5",
            "-H",
            "literal=str:int:5",
            "{\"id\":1}",
        ],
        None,
    );
    let output = ok(&["consume", &queue, "--count", "1", "--json"], None);
    let line: Value = serde_json::from_str(stdout(&output).trim()).expect("one JSON line");
    assert_eq!(line["routing_key"], queue.as_str());
    assert_eq!(line["exchange"], "");
    assert_eq!(line["redelivered"], false);
    assert_eq!(line["body"], "{\"id\":1}");
    let expected = serde_json::json!({
        "content_type": "application/json",
        "content_encoding": "identity",
        "delivery_mode": 2,
        "priority": 7,
        "correlation_id": "corr-1",
        "reply_to": "replies",
        "expiration": "60000",
        "message_id": "msg-1",
        "timestamp": 1_700_000_000u64,
        "type": "order.created",
        "user_id": "guest",
        "app_id": "cli-test",
        "headers": {"text": "hello", "count": 42, "flag": true, "ratio": 1.5, "literal": "int:5"},
    });
    assert_eq!(line["properties"], expected);
    delete_queue(&queue);
}

#[test]
fn binary_bodies_from_files_come_back_as_base64() {
    let queue = fresh_queue("binary");
    let dir = std::env::temp_dir().join(unique("files"));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let binary = dir.join("binary");
    let text = dir.join("text");
    std::fs::write(&binary, [0xff, 0x00, 0x80]).expect("write");
    std::fs::write(&text, "from a file").expect("write");
    let (binary, text) = (binary.to_string_lossy(), text.to_string_lossy());
    ok(&["publish", "-r", &queue, "-f", &binary, "-f", &text], None);
    let first = ok(&["get", &queue, "--json"], None);
    let first: Value = serde_json::from_str(stdout(&first).trim()).expect("JSON");
    assert_eq!(first["body_base64"], "/wCA");
    assert_eq!(first["message_count"], 1);
    let second = ok(&["get", &queue], None);
    assert_eq!(stdout(&second), "from a file\n");
    fails(
        &["publish", "-r", &queue, "-f", "/nonexistent/amqp-cli"],
        None,
        1,
        "cannot read /nonexistent/amqp-cli",
    );
    let _ = std::fs::remove_dir_all(&dir);
    delete_queue(&queue);
}

#[test]
fn stdin_is_one_message_and_requeue_peeks() {
    let queue = fresh_queue("stdin");
    ok(&["publish", "-r", &queue], Some(b"line one\nline two\n"));
    let peek = ok(&["get", &queue, "--ack-mode", "reject", "--requeue"], None);
    assert_eq!(stdout(&peek), "line one\nline two\n\n");
    let again = ok(&["consume", &queue, "-n", "1", "--json"], None);
    let line: Value = serde_json::from_str(stdout(&again).trim()).expect("JSON");
    assert_eq!(line["body"], "line one\nline two\n");
    assert_eq!(line["redelivered"], true);
    fails(
        &["get", &queue, "--requeue"],
        None,
        1,
        "--requeue needs --ack-mode reject",
    );
    delete_queue(&queue);
}

#[test]
fn consume_timeout_exits_5() {
    let queue = fresh_queue("timeout");
    fails(
        &["consume", &queue, "--timeout", "0.3"],
        None,
        5,
        "no message arrived",
    );
    ok(&["publish", "-r", &queue, "only one"], None);
    let output = fails(
        &["consume", &queue, "--count", "2", "--timeout", "0.5"],
        None,
        5,
        "1 of 2 messages arrived",
    );
    assert_eq!(stdout(&output), "only one\n");
    delete_queue(&queue);
}

#[test]
fn unroutable_and_missing_exchange_publishes_fail() {
    let queue = unique("nowhere");
    fails(
        &["publish", "-r", &queue, "--mandatory", "lost"],
        None,
        4,
        "1 of 1 messages not confirmed: 1 returned (312 NO_ROUTE",
    );
    // Not mandatory: the broker drops it and acks, which is a success.
    ok(&["publish", "-r", &queue, "dropped"], None);
    fails(
        &["publish", "-e", &unique("no-exchange"), "-r", "k", "hi"],
        None,
        3,
        "404 NOT_FOUND",
    );
}

#[test]
fn declare_arguments_bind_and_unbind() {
    let queue = unique("declare");
    let exchange = unique("exchange");
    ok(
        &[
            "declare",
            "queue",
            &queue,
            "--type",
            "classic",
            "--max-length",
            "2",
            "--message-ttl",
            "60000",
            "--expires",
            "600000",
            "--dead-letter-exchange",
            "amq.fanout",
            "--dead-letter-routing-key",
            "dead",
            "--arg",
            "x-overflow=drop-head",
        ],
        None,
    );
    // The same name with other arguments is refused: they were applied.
    fails(
        &["declare", "queue", &queue, "--max-length", "3"],
        None,
        3,
        "406 PRECONDITION_FAILED",
    );
    ok(&["declare", "queue", &queue, "--passive"], None);
    ok(
        &[
            "declare",
            "exchange",
            &exchange,
            "--type",
            "topic",
            "--auto-delete",
        ],
        None,
    );
    fails(
        &["declare", "exchange", &exchange, "--type", "fanout"],
        None,
        3,
        "406 PRECONDITION_FAILED",
    );
    ok(
        &["bind", "queue", &queue, &exchange, "-r", "orders.*"],
        None,
    );
    let lines = "a\nb\nc\n";
    ok(
        &[
            "publish",
            "-e",
            &exchange,
            "-r",
            "orders.new",
            "--lines",
            "--mandatory",
        ],
        Some(lines.as_bytes()),
    );
    // x-max-length 2 with drop-head keeps the last two.
    let output = ok(&["consume", &queue, "-n", "2", "--timeout", "10"], None);
    assert_eq!(stdout(&output), "b\nc\n");
    ok(
        &["unbind", "queue", &queue, &exchange, "-r", "orders.*"],
        None,
    );
    // --auto-delete: the exchange went with its last binding.
    fails(
        &["publish", "-e", &exchange, "-r", "orders.new", "x"],
        None,
        3,
        &format!("no exchange '{exchange}'"),
    );
    // Exchange to exchange.
    ok(&["declare", "exchange", &exchange, "--type", "topic"], None);
    let source = unique("source");
    ok(&["declare", "exchange", &source, "--type", "fanout"], None);
    ok(&["bind", "exchange", &exchange, &source], None);
    ok(&["bind", "queue", &queue, &exchange, "-r", "#"], None);
    ok(
        &["publish", "-e", &source, "--mandatory", "via source"],
        None,
    );
    let purged = ok(&["purge", &queue], None);
    assert_eq!(stdout(&purged), "1\n");
    ok(&["unbind", "exchange", &exchange, &source], None);
    fails(
        &["publish", "-e", &source, "--mandatory", "x"],
        None,
        4,
        "returned (312 NO_ROUTE",
    );
    ok(&["delete", "exchange", &source], None);
    ok(&["delete", "exchange", &exchange], None);
    fails(&["delete", "exchange", &exchange], None, 3, "404 NOT_FOUND");
    ok(&["delete", "exchange", &exchange, "--if-exists"], None);
    delete_queue(&queue);
    ok(&["delete", "queue", &queue, "--if-exists"], None);
}

/// Every subcommand, aimed at `queue` (and an exchange that exists).
fn every_subcommand(queue: &str) -> Vec<Vec<String>> {
    let all: [&[&str]; 9] = [
        &["publish", "-r", queue, "body"],
        &["consume", queue, "--timeout", "5"],
        &["get", queue],
        &["declare", "queue", queue, "--passive"],
        &["declare", "exchange", "amq.direct", "--passive"],
        &["delete", "queue", queue],
        &["purge", queue],
        &["bind", "queue", queue, "amq.direct"],
        &["unbind", "queue", queue, "amq.direct"],
    ];
    all.iter()
        .map(|args| args.iter().map(|arg| arg.to_string()).collect())
        .collect()
}

#[test]
fn bad_url_fails_with_exit_2_for_every_subcommand() {
    let queue = unique("bad-url");
    for url in ["amqp://127.0.0.1:1/%2f", "foo://127.0.0.1/"] {
        for mut args in every_subcommand(&queue) {
            args.splice(0..0, ["--url".to_owned(), url.to_owned()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let cause = if url.starts_with("foo") {
                "bad URL"
            } else {
                "cannot connect"
            };
            fails(&args, None, 2, cause);
        }
    }
}

#[test]
fn wrong_credentials_fail_with_exit_2_for_every_subcommand() {
    let url = url();
    let (_, rest) = url.split_once("://").expect("AMQP_URL has a scheme");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    // A user that does not exist: nothing about guest changes.
    let bad = format!("amqp://amqp-cli-no-such-user:wrong@{host}");
    let queue = fresh_queue("auth");
    for mut args in every_subcommand(&queue) {
        args.splice(0..0, ["--url".to_owned(), bad.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        fails(
            &args,
            None,
            2,
            "authentication failed for user `amqp-cli-no-such-user`",
        );
    }
    delete_queue(&queue);
}

#[test]
fn missing_queue_fails_with_exit_3() {
    fresh_queue("broker-check");
    let queue = unique("missing");
    for args in every_subcommand(&queue) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match args[0] {
            // Publishing to a missing queue through the default exchange is
            // an unroutable message, which the broker drops (not mandatory).
            "publish" => {
                ok(&args, None);
            }
            // The exchange exists; unbinding a missing queue is refused.
            "declare" if args[1] == "exchange" => {
                ok(&args, None);
            }
            _ => {
                fails(&args, None, 3, &format!("no queue '{queue}'"));
            }
        }
    }
}

#[test]
fn usage_errors_exit_1_in_one_line() {
    fails(&["publish", "--no-such-flag"], None, 1, "--no-such-flag");
    fails(&["consume"], None, 1, "<QUEUE>");
    fails(
        &["publish", "-H", "novalue", "x"],
        None,
        1,
        "`novalue` is not key=value",
    );
    fails(
        &["publish", "-H", "n=int:five", "x"],
        None,
        1,
        "`five` is not a valid integer",
    );
    let long = "q".repeat(256);
    fails(&["get", &long], None, 1, "at most 255");
    let help = ok(&["--help"], None);
    assert!(stdout(&help).contains("Exit codes:"));
}
