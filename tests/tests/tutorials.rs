//! The seven RabbitMQ tutorials of `amqp-client/examples/`, run against the
//! broker: each example's file is compiled in here too, and its functions
//! are called with names of the test's own and counts that make every
//! receiver stop.

// Each tutorial's `main` is the example's, unused here.
#[allow(dead_code)]
#[path = "../../amqp-client/examples/tutorial_1_hello_world.rs"]
mod tutorial_1;
#[allow(dead_code)]
#[path = "../../amqp-client/examples/tutorial_2_work_queues.rs"]
mod tutorial_2;
#[allow(dead_code)]
#[path = "../../amqp-client/examples/tutorial_3_publish_subscribe.rs"]
mod tutorial_3;
#[allow(dead_code)]
#[path = "../../amqp-client/examples/tutorial_4_routing.rs"]
mod tutorial_4;
#[allow(dead_code)]
#[path = "../../amqp-client/examples/tutorial_5_topics.rs"]
mod tutorial_5;
#[allow(dead_code)]
#[path = "../../amqp-client/examples/tutorial_6_rpc.rs"]
mod tutorial_6;
#[allow(dead_code)]
#[path = "../../amqp-client/examples/tutorial_7_publisher_confirms.rs"]
mod tutorial_7;

use std::future::Future;
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::{Connection, RpcClient};
use amqp_client_tests::{connect, delete_queue, name, passive_declare, unique};

const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<T>(test: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, test).await {
        Ok(value) => value,
        Err(_) => panic!("the tutorial did not finish within {LIMIT:?}"),
    }
}

async fn delete_exchange(connection: &Connection, exchange: &str) {
    let channel = connection.open_channel().await.expect("channel");
    channel
        .exchange_delete(exchange::Delete {
            exchange: name(exchange),
            ..Default::default()
        })
        .await
        .expect("delete the exchange");
}

#[tokio::test]
async fn tutorial_1_hello_world_sends_and_receives() {
    bounded(async {
        let connection = connect().await;
        let queue = unique("hello");
        tutorial_1::send(&connection, &queue, "Hello World!")
            .await
            .expect("send");
        let received = tutorial_1::receive(&connection, &queue, Some(1))
            .await
            .expect("receive");
        assert_eq!(received, ["Hello World!"]);
        let channel = connection.open_channel().await.expect("channel");
        assert_eq!(passive_declare(&channel, &queue).await.message_count, 0);
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn tutorial_2_work_queues_share_the_tasks_between_workers() {
    bounded(async {
        let connection = connect().await;
        let queue = unique("task_queue");
        // Declared as the tutorial does, so that the test can watch it from the start.
        let channel = connection.open_channel().await.expect("channel");
        channel
            .queue_declare(queue::Declare {
                queue: name(&queue),
                durable: true,
                ..Default::default()
            })
            .await
            .expect("declare");
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let connection = connection.clone();
                let queue = queue.clone();
                tokio::spawn(async move {
                    let per_dot = Duration::from_millis(50);
                    tutorial_2::worker(&connection, &queue, per_dot, Some(Duration::from_secs(2)))
                        .await
                        .expect("worker")
                })
            })
            .collect();
        // Let both workers consume before the tasks come.
        for _ in 0..100 {
            if passive_declare(&channel, &queue).await.consumer_count == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let tasks = ["a.", "b..", "c...", "d.", "e..", "f..."];
        for task in tasks {
            tutorial_2::new_task(&connection, &queue, task)
                .await
                .expect("new task");
        }
        let mut done = Vec::new();
        for worker in workers {
            let did = worker.await.expect("the worker's task");
            assert!(
                !did.is_empty(),
                "a worker got no task: prefetch 1 spreads them"
            );
            done.extend(did);
        }
        done.sort();
        assert_eq!(done, tasks, "each task done exactly once");
        assert_eq!(
            passive_declare(&channel, &queue).await.message_count,
            0,
            "all acked"
        );
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn tutorial_3_every_subscriber_gets_every_log() {
    bounded(async {
        let connection = connect().await;
        let exchange = unique("logs");
        let first = tutorial_3::subscribe(&connection, &exchange)
            .await
            .expect("subscribe");
        let second = tutorial_3::subscribe(&connection, &exchange)
            .await
            .expect("subscribe");
        let logs = ["info: one", "warning: two", "error: three"];
        for log in logs {
            tutorial_3::emit_log(&connection, &exchange, log)
                .await
                .expect("emit");
        }
        assert_eq!(
            tutorial_3::receive_logs(first, Some(3))
                .await
                .expect("receive"),
            logs
        );
        assert_eq!(
            tutorial_3::receive_logs(second, Some(3))
                .await
                .expect("receive"),
            logs
        );
        delete_exchange(&connection, &exchange).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn tutorial_4_receivers_get_the_severities_they_bound() {
    bounded(async {
        let connection = connect().await;
        let exchange = unique("direct_logs");
        let to_disk = tutorial_4::subscribe(&connection, &exchange, &["error"])
            .await
            .expect("subscribe");
        let to_screen =
            tutorial_4::subscribe(&connection, &exchange, &["info", "warning", "error"])
                .await
                .expect("subscribe");
        for (severity, message) in [
            ("info", "one"),
            ("warning", "two"),
            ("error", "three"),
            ("debug", "four"),
        ] {
            tutorial_4::emit_log_direct(&connection, &exchange, severity, message)
                .await
                .expect("emit");
        }
        // A last error proves that nothing else reached the disk receiver in between.
        tutorial_4::emit_log_direct(&connection, &exchange, "error", "five")
            .await
            .expect("emit");
        assert_eq!(
            tutorial_4::receive_logs_direct(to_disk, Some(2))
                .await
                .expect("receive"),
            ["error:three", "error:five"]
        );
        assert_eq!(
            tutorial_4::receive_logs_direct(to_screen, Some(4))
                .await
                .expect("receive"),
            ["info:one", "warning:two", "error:three", "error:five"]
        );
        delete_exchange(&connection, &exchange).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn tutorial_5_topics_match_words_with_star_and_hash() {
    bounded(async {
        let connection = connect().await;
        let exchange = unique("topic_logs");
        let orange = tutorial_5::subscribe(&connection, &exchange, &["*.orange.*"])
            .await
            .expect("subscribe");
        let lazy_rabbits = tutorial_5::subscribe(&connection, &exchange, &["*.*.rabbit", "lazy.#"])
            .await
            .expect("subscribe");
        for routing_key in [
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "quick.orange.fox",
            "lazy.brown.fox",
            "quick.brown.fox",
            "lazy.orange.new.rabbit",
            "quick.orange.male.rabbit",
            "lazy",
        ] {
            tutorial_5::emit_log_topic(&connection, &exchange, routing_key, "x")
                .await
                .expect("emit");
        }
        assert_eq!(
            tutorial_5::receive_logs_topic(orange, Some(3))
                .await
                .expect("receive"),
            [
                "quick.orange.rabbit:x",
                "lazy.orange.elephant:x",
                "quick.orange.fox:x"
            ]
        );
        assert_eq!(
            tutorial_5::receive_logs_topic(lazy_rabbits, Some(5))
                .await
                .expect("receive"),
            [
                "quick.orange.rabbit:x",
                "lazy.orange.elephant:x",
                "lazy.brown.fox:x",
                "lazy.orange.new.rabbit:x",
                "lazy:x",
            ]
        );
        delete_exchange(&connection, &exchange).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn tutorial_6_rpc_computes_fibonacci_numbers_remotely() {
    bounded(async {
        let connection = connect().await;
        let queue = unique("rpc_queue");
        let requests = tutorial_6::start_server(&connection, &queue)
            .await
            .expect("server");
        let server = tokio::spawn(tutorial_6::serve(requests, Some(3)));
        let client = RpcClient::new(connection.open_channel().await.expect("channel"))
            .await
            .expect("client");
        for (n, expected) in [(0, 0), (10, 55), (20, 6765)] {
            let answer = tutorial_6::call_fib(&client, &queue, n)
                .await
                .expect("call");
            assert_eq!(answer, expected, "fib({n})");
        }
        assert_eq!(server.await.expect("the server's task").expect("serve"), 3);
        let channel = connection.open_channel().await.expect("channel");
        delete_queue(&channel, &queue).await;
        connection.close().await.expect("close");
    })
    .await;
}

#[tokio::test]
async fn tutorial_7_each_confirm_strategy_gets_every_message_acked() {
    bounded(async {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        let messages = 500;
        let outcomes = [
            tutorial_7::publish_individually(&connection, messages)
                .await
                .expect("individually"),
            tutorial_7::publish_in_batches(&connection, messages, 64)
                .await
                .expect("batches"),
            tutorial_7::handle_confirms_asynchronously(&connection, messages)
                .await
                .expect("asynchronously"),
        ];
        for outcome in outcomes {
            assert_eq!(
                (outcome.acked, outcome.nacked),
                (messages, 0),
                "{outcome:?}"
            );
            let waiting = passive_declare(&channel, &outcome.queue)
                .await
                .message_count;
            assert_eq!(waiting as usize, messages, "{outcome:?}");
        }
        connection.close().await.expect("close");
    })
    .await;
}
