//! RabbitMQ tutorial 6, "RPC": a client sends a number to `rpc_queue` and
//! waits for the server's reply, the Fibonacci number of it. Replies come
//! back over direct reply-to (`amq.rabbitmq.reply-to`), matched to their
//! request by correlation id, through [`amqp091::RpcClient`]; the server
//! answers with [`amqp091::rpc_client::reply`].
//!
//! ```sh
//! cargo run -p amqp091 --example tutorial_6_rpc -- rpc_server    # until Ctrl-C
//! cargo run -p amqp091 --example tutorial_6_rpc -- rpc_client 30
//! cargo run -p amqp091 --example tutorial_6_rpc                  # a demo: server and client
//! ```
//!
//! The broker is `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! The functions are public so that `tests/tests/tutorials.rs` runs them.

use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{rpc_client, BasicProperties, Connection, ConsumeOptions, Consumer, RpcClient};

/// The server's work: a deliberately slow recursive Fibonacci.
pub fn fib(n: u64) -> u64 {
    match n {
        0 => 0,
        1 => 1,
        n => fib(n - 1) + fib(n - 2),
    }
}

/// Declares the request queue and starts consuming it, one request at a
/// time (prefetch 1), so that several servers share the load.
pub async fn start_server(
    connection: &Connection,
    queue: &str,
) -> Result<Consumer, amqp091::Error> {
    let channel = connection.open_channel().await?;
    channel
        .queue_declare(queue::Declare {
            queue: queue.into(),
            ..Default::default()
        })
        .await?;
    channel
        .basic_qos(basic::Qos {
            prefetch_count: 1,
            ..Default::default()
        })
        .await?;
    channel
        .basic_consume(queue, ConsumeOptions::default())
        .await
}

/// Answers `count` requests (or forever with `None`): each body is a
/// number n, the reply fib(n) (a body that is no number gets an empty reply).
pub async fn serve(mut requests: Consumer, count: Option<usize>) -> Result<usize, amqp091::Error> {
    println!(" [x] Awaiting RPC requests");
    let mut served = 0;
    while count.is_none_or(|count| served < count) {
        let Some(request) = requests.next().await else {
            break;
        };
        let request = request?;
        let reply = match String::from_utf8_lossy(&request.body).trim().parse::<u64>() {
            // Capped: the recursion is exponential.
            Ok(n) => {
                let n = n.min(40);
                println!(" [.] fib({n})");
                fib(n).to_string()
            }
            Err(_) => String::new(),
        };
        rpc_client::reply(&request, BasicProperties::default(), reply).await?;
        request.ack().await?;
        served += 1;
    }
    requests.cancel().await?;
    Ok(served)
}

/// Asks the server behind `queue` for fib(`n`) through `client`.
pub async fn call_fib(
    client: &RpcClient,
    queue: &str,
    n: u64,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    println!(" [x] Requesting fib({n})");
    let reply = client
        .call(
            "",
            queue,
            BasicProperties::default(),
            n.to_string(),
            Duration::from_secs(30),
        )
        .await?;
    let answer = String::from_utf8_lossy(&reply.body).parse::<u64>()?;
    println!(" [.] Got {answer}");
    Ok(answer)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    let connection = Connection::open(&url).await?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let queue = "rpc_queue";
    match args.first().map(String::as_str) {
        Some("rpc_server") => drop(serve(start_server(&connection, queue).await?, None).await?),
        Some("rpc_client") => {
            let n = args.get(1).map(|n| n.parse()).transpose()?.unwrap_or(30);
            let client = RpcClient::new(connection.open_channel().await?).await?;
            call_fib(&client, queue, n).await?;
        }
        None => {
            let requests = start_server(&connection, queue).await?;
            let server = tokio::spawn(serve(requests, Some(3)));
            let client = RpcClient::new(connection.open_channel().await?).await?;
            for n in [10, 20, 30] {
                call_fib(&client, queue, n).await?;
            }
            server.await??;
        }
        Some(other) => {
            return Err(format!("unknown command {other:?}: rpc_server or rpc_client").into())
        }
    }
    connection.close().await?;
    Ok(())
}
