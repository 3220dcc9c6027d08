//! `RpcClient` over direct reply-to against RabbitMQ: replies reach the
//! call they answer, however many are in flight; a call with no reply times
//! out, and a reply that comes after its call gave up reaches no other call.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{
    rpc_client, BasicProperties, Connection, ConsumeOptions, Delivery, RpcClient, RpcError,
};
use amqp_client_tests::{
    close_from_broker, config, connect, connect_with, name, recovered, unique,
};
use tokio::sync::Notify;

const LIMIT: Duration = Duration::from_secs(30);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the test did not finish within {LIMIT:?}"),
    }
}

/// A request queue (deleted with the connection).
async fn request_queue(connection: &Connection, prefix: &str) -> String {
    let channel = connection.open_channel().await.expect("channel");
    let queue = unique(prefix);
    channel
        .queue_declare(queue::Declare {
            queue: name(&queue),
            exclusive: true,
            ..Default::default()
        })
        .await
        .expect("declare the request queue");
    queue
}

/// A server on `queue` answering each request with `"re:" + body`, after
/// `delay(body)`; `replied` is notified after each reply is published.
fn serve(
    connection: Connection,
    queue: String,
    delay: fn(&str) -> Duration,
    replied: Arc<Notify>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let channel = connection.open_channel().await.expect("server channel");
        let mut requests = channel
            .basic_consume(&queue, ConsumeOptions::default())
            .await
            .expect("consume requests");
        while let Some(request) = requests.next().await {
            let request: Delivery = request.expect("a request");
            let body = String::from_utf8_lossy(&request.body).into_owned();
            let replied = replied.clone();
            // Each request on a task of its own, so a delayed one holds up no other.
            tokio::spawn(async move {
                tokio::time::sleep(delay(&body)).await;
                rpc_client::reply(&request, BasicProperties::default(), format!("re:{body}"))
                    .await
                    .expect("reply")
                    .expect("the request names its reply-to");
                request.ack().await.expect("ack");
                replied.notify_one();
            });
        }
    })
}

fn no_delay(_: &str) -> Duration {
    Duration::ZERO
}

fn text(delivery: &Delivery) -> String {
    String::from_utf8_lossy(&delivery.body).into_owned()
}

#[tokio::test]
async fn a_call_gets_its_reply_with_its_correlation_id() {
    bounded(async {
        let connection = connect().await;
        let queue = request_queue(&connection, "rpc-round-trip").await;
        let server = serve(connection.clone(), queue.clone(), no_delay, Arc::default());
        let client = RpcClient::new(connection.open_channel().await.expect("channel"))
            .await
            .expect("client");
        let properties = BasicProperties::default().with_content_type("text/plain");
        let reply = client
            .call("", &queue, properties, "ping", Duration::from_secs(10))
            .await
            .expect("a reply");
        assert_eq!(text(&reply), "re:ping");
        assert!(reply.properties.correlation_id.is_some());
        assert_eq!(client.pending_calls(), 0);
        server.abort();
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_call_no_server_answers_times_out_and_is_forgotten() {
    bounded(async {
        let connection = connect().await;
        // A queue with no consumer: the request waits there forever.
        let queue = request_queue(&connection, "rpc-silent").await;
        let client = RpcClient::new(connection.open_channel().await.expect("channel"))
            .await
            .expect("client");
        let timeout = Duration::from_millis(300);
        let started = tokio::time::Instant::now();
        let error = client
            .call("", &queue, BasicProperties::default(), "anyone?", timeout)
            .await
            .expect_err("no reply");
        assert!(started.elapsed() >= timeout);
        match &error {
            RpcError::Timeout {
                timeout: reported, ..
            } => assert_eq!(*reported, timeout),
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(error.to_string().contains("no reply"), "{error}");
        assert_eq!(client.pending_calls(), 0, "the timed-out call is not kept");
        // The channel is still good for the next call.
        assert!(client.channel().closed_error().is_none());
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_hundred_concurrent_calls_on_one_channel_each_get_their_own_reply() {
    bounded(async {
        let connection = connect().await;
        let queue = request_queue(&connection, "rpc-concurrent").await;
        // Replies come back out of order: later requests are answered sooner.
        fn reversed(body: &str) -> Duration {
            let n: u64 = body.parse().expect("a number");
            Duration::from_millis((100 - n) * 3)
        }
        let server = serve(connection.clone(), queue.clone(), reversed, Arc::default());
        let client = RpcClient::new(connection.open_channel().await.expect("channel"))
            .await
            .expect("client");
        let calls: Vec<_> = (0..100u64)
            .map(|n| {
                let client = client.clone();
                let queue = queue.clone();
                tokio::spawn(async move {
                    let reply = client
                        .call(
                            "",
                            &queue,
                            BasicProperties::default(),
                            n.to_string(),
                            Duration::from_secs(20),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("call {n}: {e}"));
                    (n, text(&reply))
                })
            })
            .collect();
        for call in calls {
            let (n, reply) = call.await.expect("the call's task");
            assert_eq!(reply, format!("re:{n}"));
        }
        assert_eq!(client.pending_calls(), 0);
        server.abort();
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_reply_after_its_call_timed_out_reaches_no_later_call() {
    bounded(async {
        let connection = connect().await;
        let queue = request_queue(&connection, "rpc-late").await;
        fn slow_first(body: &str) -> Duration {
            if body == "slow" {
                Duration::from_millis(700)
            } else {
                Duration::ZERO
            }
        }
        let replied = Arc::new(Notify::new());
        let server = serve(
            connection.clone(),
            queue.clone(),
            slow_first,
            replied.clone(),
        );
        let client = RpcClient::new(connection.open_channel().await.expect("channel"))
            .await
            .expect("client");
        let error = client
            .call(
                "",
                &queue,
                BasicProperties::default(),
                "slow",
                Duration::from_millis(200),
            )
            .await
            .expect_err("the slow reply comes too late");
        assert!(matches!(error, RpcError::Timeout { .. }), "{error:?}");
        // The late reply is published, and given time to reach the client.
        replied.notified().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(client.pending_calls(), 0);
        let reply = client
            .call(
                "",
                &queue,
                BasicProperties::default(),
                "fast",
                Duration::from_secs(10),
            )
            .await
            .expect("a reply");
        assert_eq!(text(&reply), "re:fast", "a later call got the late reply");
        assert_eq!(client.pending_calls(), 0);
        server.abort();
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn a_call_after_the_channel_closed_fails_with_the_close() {
    bounded(async {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        let client = RpcClient::new(channel.clone()).await.expect("client");
        channel.close().await.expect("close the channel");
        let error = client
            .call(
                "",
                "nowhere",
                BasicProperties::default(),
                "x",
                Duration::from_secs(5),
            )
            .await
            .expect_err("the channel is closed");
        assert!(matches!(error, RpcError::Client(_)), "{error:?}");
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn calls_work_again_once_the_connection_recovered() {
    bounded(async {
        let server_connection = connect().await;
        let queue = request_queue(&server_connection, "rpc-recovery").await;
        let server = serve(
            server_connection.clone(),
            queue.clone(),
            no_delay,
            Arc::default(),
        );
        let connection_name = unique("rpc-recovery-client");
        let connection = connect_with(config().connection_name(connection_name.clone())).await;
        let mut events = connection.recovery_events();
        let client = RpcClient::new(connection.open_channel().await.expect("channel"))
            .await
            .expect("client");
        let call = |body: &'static str| {
            let client = client.clone();
            let queue = queue.clone();
            async move {
                client
                    .call(
                        "",
                        &queue,
                        BasicProperties::default(),
                        body,
                        Duration::from_secs(10),
                    )
                    .await
            }
        };
        assert_eq!(text(&call("before").await.expect("a reply")), "re:before");
        close_from_broker(&connection_name).await;
        recovered(&mut events).await;
        // The reply consumer was consumed again on the recovered channel.
        assert_eq!(text(&call("after").await.expect("a reply")), "re:after");
        assert_eq!(client.pending_calls(), 0);
        server.abort();
        connection.close().await.expect("close");
        server_connection.close().await.expect("close");
    })
    .await;
}
