//! The `metrics` feature against a real RabbitMQ: the counters and gauges
//! move exactly as messages flow, the spans carry OpenTelemetry's messaging
//! attributes, and a W3C trace context injected on publish is extracted on
//! delivery.
//!
//! Each test runs on a current-thread runtime inside
//! `metrics::with_local_recorder`, so that the connection's I/O task (on
//! that same thread) reports to the test's own recorder: the tests run in
//! parallel without seeing each other's counts.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqp091::prelude::*;
use amqp091::protocol::methods::connection;
use amqp091::protocol::Method;
use amqp091::trace_context::TraceContext;
use amqp091::{BasicProperties, Channel, Confirmation, ConsumeOptions, FieldTable, RecoveryConfig};
use amqp_client_tests::fake_peer::{FakePeer, Tuning};
use amqp_client_tests::{
    close_from_broker, config, connect, connect_with, name, recovered, unique,
};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// Runs `test` with a recorder of its own, and hands it the snapshotter.
fn with_recorder<F, Fut>(test: F)
where
    F: FnOnce(Metrics) -> Fut,
    Fut: Future<Output = ()>,
{
    let recorder = DebuggingRecorder::new();
    let metrics = Metrics {
        snapshotter: recorder.snapshotter(),
        totals: Mutex::default(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    metrics::with_local_recorder(&recorder, || runtime.block_on(test(metrics)));
}

/// A metric: its kind, name and labels.
type Series = (MetricKind, String, Vec<(String, String)>);

/// What the test's recorder holds. A snapshot of the debugging recorder
/// takes what each metric gathered since the last one (counters and gauges
/// are swapped to zero, histograms drained); the client only adds to its
/// gauges, so adding the snapshots up gives every metric's value.
struct Metrics {
    snapshotter: Snapshotter,
    totals: Mutex<HashMap<Series, Value>>,
}

/// A metric's value so far.
#[derive(Debug, Clone)]
enum Value {
    Counter(u64),
    Gauge(f64),
    Histogram(Vec<f64>),
}

impl From<DebugValue> for Value {
    fn from(value: DebugValue) -> Self {
        match value {
            DebugValue::Counter(n) => Value::Counter(n),
            DebugValue::Gauge(g) => Value::Gauge(g.into_inner()),
            DebugValue::Histogram(samples) => {
                Value::Histogram(samples.into_iter().map(|s| s.into_inner()).collect())
            }
        }
    }
}

impl Metrics {
    fn values(&self) -> Vec<(Series, Value)> {
        let mut totals = self.totals.lock().expect("totals");
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let (kind, key) = key.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            let series = (kind, key.name().to_owned(), labels);
            let total = match (totals.remove(&series), Value::from(value)) {
                (None, value) => value,
                (Some(Value::Counter(a)), Value::Counter(b)) => Value::Counter(a + b),
                (Some(Value::Gauge(a)), Value::Gauge(b)) => Value::Gauge(a + b),
                (Some(Value::Histogram(mut a)), Value::Histogram(b)) => {
                    a.extend(b);
                    Value::Histogram(a)
                }
                (Some(a), b) => panic!("{series:?} changed kind: {a:?} then {b:?}"),
            };
            totals.insert(series, total);
        }
        totals
            .iter()
            .map(|(series, value)| (series.clone(), value.clone()))
            .collect()
    }

    /// The counter `name` whose labels include `labels` (0 if never registered).
    fn counter_with(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        self.values()
            .into_iter()
            .filter(|((_, n, l), _)| n == name && has_labels(l, labels))
            .map(|(_, value)| match value {
                Value::Counter(n) => n,
                other => panic!("{name} is not a counter: {other:?}"),
            })
            .sum()
    }

    fn counter(&self, name: &str) -> u64 {
        self.counter_with(name, &[])
    }

    fn gauge(&self, name: &str) -> f64 {
        self.values()
            .into_iter()
            .filter(|((_, n, _), _)| n == name)
            .map(|(_, value)| match value {
                Value::Gauge(g) => g,
                other => panic!("{name} is not a gauge: {other:?}"),
            })
            .sum()
    }

    /// The samples of the histogram `name` whose labels include `labels`.
    fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Vec<f64> {
        self.values()
            .into_iter()
            .filter(|((_, n, l), _)| n == name && has_labels(l, labels))
            .flat_map(|(_, value)| match value {
                Value::Histogram(samples) => samples,
                other => panic!("{name} is not a histogram: {other:?}"),
            })
            .collect()
    }
}

fn has_labels(labels: &[(String, String)], wanted: &[(&str, &str)]) -> bool {
    wanted
        .iter()
        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
}

async fn declare(channel: &Channel, queue: &str, arguments: FieldTable) {
    channel
        .queue_declare(queue::Declare {
            queue: name(queue),
            exclusive: true,
            arguments,
            ..Default::default()
        })
        .await
        .expect("declare");
}

#[test]
fn publishes_confirms_nacks_and_returns_are_counted_exactly() {
    with_recorder(|metrics| async move {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        channel
            .confirm_select(confirm::Select::default())
            .await
            .expect("confirm mode");
        let queue = unique("metrics.confirmed");
        declare(&channel, &queue, FieldTable::new()).await;
        let received_before = metrics.counter("amqp091.bytes.received");
        assert!(received_before > 0, "the replies so far were read");

        const N: u64 = 50;
        let mut confirms = Vec::new();
        for i in 0..N {
            let body = format!("message {i}");
            confirms.push(
                channel
                    .basic_publish("", &queue, false, &BasicProperties::default(), body)
                    .await
                    .expect("publish"),
            );
        }
        for confirm in confirms {
            assert_eq!(confirm.await.expect("confirmation"), Confirmation::Ack);
        }
        let sent = [
            ("messaging.operation.name", "publish"),
            ("messaging.system", "rabbitmq"),
        ];
        assert_eq!(
            metrics.counter_with("messaging.client.sent.messages", &sent),
            N
        );
        assert_eq!(metrics.counter("amqp091.publish.confirmed"), N);
        assert_eq!(metrics.counter("amqp091.publish.nacked"), 0);

        // A queue that takes nothing: the broker nacks each publish.
        let full = unique("metrics.full");
        declare(
            &channel,
            &full,
            FieldTable::new()
                .with(name("x-max-length"), 0i32)
                .with(name("x-overflow"), "reject-publish"),
        )
        .await;
        for _ in 0..3 {
            let confirm = channel
                .basic_publish("", &full, false, &BasicProperties::default(), "no room")
                .await
                .expect("publish");
            assert_eq!(confirm.await.expect("confirmation"), Confirmation::Nack);
        }
        assert_eq!(metrics.counter("amqp091.publish.nacked"), 3);

        // Mandatory and unroutable: returned, then acked.
        let confirm = channel
            .basic_publish(
                "",
                &unique("metrics.nowhere"),
                true,
                &BasicProperties::default(),
                "lost",
            )
            .await
            .expect("publish");
        assert!(matches!(
            confirm.await.expect("confirmation"),
            Confirmation::Returned(_)
        ));
        assert_eq!(metrics.counter("amqp091.publish.returned"), 1);
        assert_eq!(metrics.counter("messaging.client.sent.messages"), N + 4);
        assert_eq!(
            metrics.counter("amqp091.publish.confirmed"),
            N,
            "a returned message counts as returned, not confirmed"
        );

        // Every message went out and every confirm came in through the socket.
        let sent_bytes = metrics.counter("amqp091.bytes.sent");
        assert!(sent_bytes > N * 10, "{sent_bytes} bytes sent");
        assert!(metrics.counter("amqp091.bytes.received") > received_before);

        // Each synchronous call is timed, a failed one with its error.
        assert_eq!(
            metrics
                .histogram(
                    "messaging.client.operation.duration",
                    &[("messaging.operation.name", "queue.declare")]
                )
                .len(),
            2
        );
        let error = channel
            .queue_declare(queue::Declare {
                queue: name(&unique("metrics.missing")),
                passive: true,
                ..Default::default()
            })
            .await;
        assert!(error.is_err(), "a passive declare of a missing queue fails");
        let failed = metrics.histogram(
            "messaging.client.operation.duration",
            &[
                ("messaging.operation.name", "queue.declare"),
                ("error.type", "NOT_FOUND"),
            ],
        );
        assert_eq!(failed.len(), 1);
        assert!(failed[0] > 0.0 && failed[0] < 30.0, "{failed:?} s");
        connection.close().await.expect("close");
    });
}

#[test]
fn returns_without_confirm_mode_are_counted() {
    with_recorder(|metrics| async move {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        let mut returns = channel.returns(16).await.expect("returns");
        for _ in 0..2 {
            channel
                .basic_publish(
                    "",
                    &unique("metrics.nowhere"),
                    true,
                    &BasicProperties::default(),
                    "lost",
                )
                .await
                .expect("publish");
        }
        for _ in 0..2 {
            tokio::time::timeout(Duration::from_secs(10), returns.recv())
                .await
                .expect("a return in time")
                .expect("the returns stream is open");
        }
        assert_eq!(metrics.counter("amqp091.publish.returned"), 2);
        assert_eq!(metrics.counter("amqp091.publish.confirmed"), 0);
        connection.close().await.expect("close");
    });
}

#[test]
fn deliveries_and_settlements_are_counted_exactly() {
    with_recorder(|metrics| async move {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        let queue = unique("metrics.consumed");
        declare(&channel, &queue, FieldTable::new()).await;
        for i in 0..11 {
            channel
                .basic_publish(
                    "",
                    &queue,
                    false,
                    &BasicProperties::default(),
                    format!("{i}"),
                )
                .await
                .expect("publish");
        }
        amqp_client_tests::wait_for_message_count(&channel, &queue, 11, Duration::from_secs(10))
            .await;
        let got = channel
            .basic_get(&queue, false)
            .await
            .expect("get")
            .expect("a message");
        got.delivery.ack().await.expect("ack");
        let get = [("messaging.operation.name", "get")];
        assert_eq!(
            metrics.counter_with("messaging.client.consumed.messages", &get),
            1
        );

        let mut consumer = channel
            .basic_consume(&queue, ConsumeOptions::default())
            .await
            .expect("consume");
        for i in 0..10 {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a delivery in time")
                .expect("the consumer is open")
                .expect("a delivery");
            match i {
                0..=4 => delivery.ack().await.expect("ack"),
                5..=7 => delivery.nack(false, false).await.expect("nack"),
                _ => delivery.reject(false).await.expect("reject"),
            }
        }
        let deliver = [("messaging.operation.name", "deliver")];
        assert_eq!(
            metrics.counter_with("messaging.client.consumed.messages", &deliver),
            10
        );
        assert_eq!(metrics.counter("messaging.client.consumed.messages"), 11);
        assert_eq!(
            metrics.counter("amqp091.delivery.acked"),
            6,
            "5 deliveries and the get"
        );
        assert_eq!(metrics.counter("amqp091.delivery.nacked"), 3);
        assert_eq!(metrics.counter("amqp091.delivery.rejected"), 2);
        // Every message was settled: none is left.
        amqp_client_tests::wait_for_message_count(&channel, &queue, 0, Duration::from_secs(10))
            .await;
        connection.close().await.expect("close");
    });
}

#[test]
fn connection_and_channel_gauges_follow_opens_and_closes() {
    with_recorder(|metrics| async move {
        let connection = connect().await;
        let first = connection.open_channel().await.expect("channel");
        assert_eq!(metrics.gauge("amqp091.connections.open"), 1.0);
        assert_eq!(metrics.gauge("amqp091.channels.open"), 1.0);
        let second = connection.open_channel().await.expect("channel");
        let third = connection.open_channel().await.expect("channel");
        assert_eq!(metrics.gauge("amqp091.channels.open"), 3.0);

        let other = connect().await;
        let elsewhere = other.open_channel().await.expect("channel");
        assert_eq!(metrics.gauge("amqp091.connections.open"), 2.0);
        assert_eq!(
            metrics.gauge("amqp091.channels.open"),
            4.0,
            "summed over connections"
        );

        second.close().await.expect("close");
        assert_eq!(metrics.gauge("amqp091.channels.open"), 3.0);
        other.close().await.expect("close");
        assert_eq!(metrics.gauge("amqp091.connections.open"), 1.0);
        assert_eq!(metrics.gauge("amqp091.channels.open"), 2.0);
        connection.close().await.expect("close");
        assert_eq!(metrics.gauge("amqp091.connections.open"), 0.0);
        assert_eq!(metrics.gauge("amqp091.channels.open"), 0.0);
        drop((first, third, elsewhere));
    });
}

#[test]
fn a_reconnect_is_counted_once() {
    with_recorder(|metrics| async move {
        let connection_name = unique("metrics.forced");
        let connection = connect_with(config().connection_name(connection_name.clone()).recovery(
            RecoveryConfig {
                initial_delay: Duration::from_millis(50),
                max_delay: Duration::from_millis(500),
                ..RecoveryConfig::default()
            },
        ))
        .await;
        let channel = connection.open_channel().await.expect("channel");
        let mut events = connection.recovery_events();
        assert_eq!(metrics.counter("amqp091.connection.reconnects"), 0);
        close_from_broker(&connection_name).await;
        recovered(&mut events).await;
        assert_eq!(metrics.counter("amqp091.connection.reconnects"), 1);
        assert_eq!(
            metrics.gauge("amqp091.connections.open"),
            1.0,
            "the same connection"
        );
        assert_eq!(
            metrics.gauge("amqp091.channels.open"),
            1.0,
            "its channel recovered"
        );
        // The recovered channel works, and its calls are still timed.
        channel
            .queue_declare(queue::Declare {
                queue: name(&unique("metrics.after")),
                exclusive: true,
                ..Default::default()
            })
            .await
            .expect("declare after the reconnect");
        connection.close().await.expect("close");
        assert_eq!(metrics.gauge("amqp091.connections.open"), 0.0);
    });
}

#[test]
fn time_blocked_is_recorded_per_period() {
    with_recorder(|metrics| async move {
        let script = FakePeer::start(|mut peer| async move {
            peer.handshake(&Tuning::default()).await?;
            peer.send_method(
                0,
                &Method::ConnectionBlocked(connection::Blocked {
                    reason: name("low on memory"),
                }),
            )
            .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            peer.send_method(0, &Method::ConnectionUnblocked(connection::Unblocked {}))
                .await?;
            peer.expect_method("connection.close").await?;
            peer.send_method(0, &Method::ConnectionCloseOk(connection::CloseOk {}))
                .await?;
            Ok(())
        })
        .await
        .expect("fake peer");
        let connection = connect_with(script.config()).await;
        let mut blocked = connection.blocked();
        tokio::time::timeout(Duration::from_secs(10), blocked.wait_for(Option::is_some))
            .await
            .expect("blocked in time")
            .expect("watch open");
        tokio::time::timeout(Duration::from_secs(10), blocked.wait_for(Option::is_none))
            .await
            .expect("unblocked in time")
            .expect("watch open");
        let periods = metrics.histogram("amqp091.connection.blocked.duration", &[]);
        assert_eq!(periods.len(), 1, "{periods:?}");
        assert!(
            (0.25..10.0).contains(&periods[0]),
            "blocked for {} s",
            periods[0]
        );
        connection.close().await.expect("close");
        script.finish().await;
    });
}

#[test]
fn a_trace_context_injected_on_publish_is_extracted_on_delivery() {
    with_recorder(|_metrics| async move {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        let queue = unique("metrics.traced");
        declare(&channel, &queue, FieldTable::new()).await;

        let context = TraceContext::parse(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("congo=t61rcWkgMzE"),
        )
        .expect("valid");
        let mut traced = BasicProperties::default()
            .with_headers(FieldTable::new().with(name("x-other"), "kept"));
        context.inject_properties(&mut traced);
        let invalid = BasicProperties::default().with_headers(FieldTable::new().with(
            name("traceparent"),
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        ));
        for properties in [&traced, &invalid, &BasicProperties::default()] {
            channel
                .basic_publish("", &queue, false, properties, "traced")
                .await
                .expect("publish");
        }

        let mut consumer = channel
            .basic_consume(
                &queue,
                ConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
            )
            .await
            .expect("consume");
        let mut extracted = Vec::new();
        for _ in 0..3 {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a delivery in time")
                .expect("the consumer is open")
                .expect("a delivery");
            extracted.push(TraceContext::from_properties(&delivery.properties));
        }
        assert_eq!(extracted, vec![Some(context), None, None]);
        connection.close().await.expect("close");
    });
}

/// The spans a test's subscriber saw: name, fields, and the parent's name.
#[derive(Debug, Clone)]
struct SeenSpan {
    name: &'static str,
    fields: HashMap<String, String>,
    parent: Option<&'static str>,
}

#[derive(Clone, Default)]
struct SpanRecorder(Arc<Mutex<Vec<SeenSpan>>>);

struct FieldVisitor<'a>(&'a mut HashMap<String, String>);

impl tracing::field::Visit for FieldVisitor<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl<S> tracing_subscriber::Layer<S> for SpanRecorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = HashMap::new();
        attrs.record(&mut FieldVisitor(&mut fields));
        let parent = ctx
            .span(id)
            .and_then(|span| span.parent())
            .map(|parent| parent.name());
        if let Ok(mut seen) = self.0.lock() {
            seen.push(SeenSpan {
                name: attrs.metadata().name(),
                fields,
                parent,
            });
        }
    }
}

impl SpanRecorder {
    fn named(&self, name: &str) -> Vec<SeenSpan> {
        self.0
            .lock()
            .map(|seen| seen.iter().filter(|s| s.name == name).cloned().collect())
            .unwrap_or_default()
    }
}

fn field<'a>(span: &'a SeenSpan, name: &str) -> &'a str {
    span.fields
        .get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("span {} has no field {name}: {:?}", span.name, span.fields))
}

#[test]
fn spans_carry_the_messaging_conventions_attributes() {
    use tracing_subscriber::layer::SubscriberExt;

    let spans = SpanRecorder::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _default = tracing::subscriber::set_default(subscriber);
    with_recorder(|_metrics| async move {
        let connection = connect().await;
        let channel = connection.open_channel().await.expect("channel");
        let queue = unique("metrics.spans");
        declare(&channel, &queue, FieldTable::new()).await;
        let properties = BasicProperties::default()
            .with_message_id("m-1")
            .with_correlation_id("conversation-7");
        channel
            .basic_publish("", &queue, false, &properties, "hello")
            .await
            .expect("publish");
        let mut consumer = channel
            .basic_consume(&queue, ConsumeOptions::default())
            .await
            .expect("consume");
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery in time")
            .expect("the consumer is open")
            .expect("a delivery");
        assert_eq!(
            delivery.span().metadata().map(|m| m.name()),
            Some("receive")
        );
        delivery.ack().await.expect("ack");
        connection.close().await.expect("close");
    });

    let connections = spans.named("amqp.connection");
    let connection = connections.first().expect("a connection span");
    assert_eq!(field(connection, "messaging.system"), "rabbitmq");
    assert_eq!(field(connection, "server.address"), config().host);
    assert_eq!(field(connection, "server.port"), config().port.to_string());

    let channel = spans.named("amqp.channel").pop().expect("a channel span");
    assert_eq!(channel.parent, Some("amqp.connection"));
    assert_eq!(field(&channel, "messaging.rabbitmq.channel"), "1");

    let publish = spans.named("publish").pop().expect("a publish span");
    assert_eq!(publish.parent, Some("amqp.channel"));
    assert_eq!(field(&publish, "messaging.operation.type"), "send");
    assert_eq!(field(&publish, "messaging.destination.name"), "");
    assert!(
        field(&publish, "messaging.rabbitmq.destination.routing_key")
            .starts_with("amqp-client-test.metrics.spans")
    );
    assert_eq!(field(&publish, "messaging.message.body.size"), "5");
    assert_eq!(field(&publish, "messaging.message.id"), "m-1");
    assert_eq!(
        field(&publish, "messaging.message.conversation_id"),
        "conversation-7"
    );

    let receive = spans.named("receive").pop().expect("a receive span");
    assert_eq!(receive.parent, Some("amqp.channel"));
    assert_eq!(field(&receive, "messaging.operation.type"), "receive");
    assert_eq!(field(&receive, "messaging.operation.name"), "deliver");
    assert_eq!(
        field(&receive, "messaging.rabbitmq.message.delivery_tag"),
        "1"
    );
    assert_eq!(field(&receive, "messaging.message.id"), "m-1");

    let settle = spans.named("settle").pop().expect("a settle span");
    assert_eq!(field(&settle, "messaging.operation.type"), "settle");
    assert_eq!(field(&settle, "messaging.operation.name"), "ack");
}
