//! Writes a small seed corpus for each fuzz target into `corpus/<target>/`
//! (relative to the current directory; run it from `amqp-client/fuzz`):
//!
//! ```text
//! cargo run --example gen_corpus
//! ```

use std::fs;
use std::path::Path;

use amqp091::protocol::frame::{write_body, write_header, write_heartbeat, write_method};
use amqp091::protocol::methods::{basic, channel, connection, exchange, queue};
use amqp091::protocol::wire::write_table;
use amqp091::protocol::{BasicProperties, Decimal, FieldTable, FieldValue, Method, ShortString};
use bytes::{Bytes, BytesMut};

fn s(text: &str) -> ShortString {
    ShortString::new(text).expect("short")
}

/// A table with one value of every type, nested tables and arrays included.
fn every_type_table() -> FieldTable {
    let inner = FieldTable::new()
        .with(s("publisher_confirms"), true)
        .with(s("consumer_cancel_notify"), true);
    FieldTable::new()
        .with(s("bool"), true)
        .with(s("i8"), -8i8)
        .with(s("u8"), 8u8)
        .with(s("i16"), -16i16)
        .with(s("u16"), 16u16)
        .with(s("i32"), -32i32)
        .with(s("u32"), 32u32)
        .with(s("i64"), -64i64)
        .with(s("f32"), 1.5f32)
        .with(s("f64"), f64::NAN)
        .with(s("decimal"), Decimal { scale: 2, value: 12345 })
        .with(s("longstr"), "RabbitMQ")
        .with(s("bytes"), FieldValue::Bytes(Bytes::from_static(b"\x00\xff")))
        .with(
            s("array"),
            vec![FieldValue::from(1i32), FieldValue::from("x"), FieldValue::Void],
        )
        .with(s("timestamp"), FieldValue::Timestamp(1_700_000_000))
        .with(s("capabilities"), inner)
        .with(s("void"), FieldValue::Void)
}

fn tables() -> Vec<(&'static str, FieldTable)> {
    let mut deep = FieldTable::new().with(s("leaf"), 1u8);
    for _ in 0..10 {
        deep = FieldTable::new().with(s("t"), deep);
    }
    vec![
        ("empty", FieldTable::new()),
        ("every_type", every_type_table()),
        ("nested", deep),
        (
            "x_args",
            FieldTable::new()
                .with(s("x-message-ttl"), 60_000i32)
                .with(s("x-queue-type"), "quorum")
                .with(s("x-dead-letter-exchange"), ""),
        ),
    ]
}

fn methods() -> Vec<(&'static str, u16, Method)> {
    vec![
        (
            "connection_start",
            0,
            connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: every_type_table(),
                mechanisms: Bytes::from_static(b"PLAIN AMQPLAIN"),
                locales: Bytes::from_static(b"en_US"),
            }
            .into(),
        ),
        (
            "connection_tune",
            0,
            connection::Tune { channel_max: 2047, frame_max: 131_072, heartbeat: 60 }.into(),
        ),
        ("channel_open", 1, channel::Open::default().into()),
        (
            "exchange_declare",
            1,
            exchange::Declare {
                exchange: s("logs"),
                kind: s("topic"),
                durable: true,
                auto_delete: true,
                arguments: FieldTable::new().with(s("alternate-exchange"), "ae"),
                ..Default::default()
            }
            .into(),
        ),
        (
            "queue_declare",
            1,
            queue::Declare {
                queue: s("jobs"),
                durable: true,
                exclusive: true,
                arguments: tables()[3].1.clone(),
                ..Default::default()
            }
            .into(),
        ),
        (
            "basic_consume",
            1,
            basic::Consume {
                queue: s("jobs"),
                consumer_tag: s("ctag-1"),
                no_ack: true,
                ..Default::default()
            }
            .into(),
        ),
        (
            "basic_deliver",
            1,
            basic::Deliver {
                consumer_tag: s("ctag-1"),
                delivery_tag: 42,
                redelivered: true,
                exchange: s("logs"),
                routing_key: s("a.b.c"),
            }
            .into(),
        ),
    ]
}

fn full_properties() -> BasicProperties {
    BasicProperties {
        content_type: Some(s("application/json")),
        content_encoding: Some(s("gzip")),
        headers: Some(every_type_table()),
        delivery_mode: Some(2),
        priority: Some(5),
        correlation_id: Some(s("corr")),
        reply_to: Some(s("amq.rabbitmq.reply-to")),
        expiration: Some(s("60000")),
        message_id: Some(s("id-1")),
        timestamp: Some(1_700_000_000),
        kind: Some(s("type")),
        user_id: Some(s("guest")),
        app_id: Some(s("app")),
        reserved: Some(s("cluster")),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).expect("write seed");
}

/// URLs with every part a URL can have, and some that are refused.
const URLS: [(&str, &str); 10] = [
    (
        "full",
        "amqp://user%40x:p%2Fw@rabbit.local:5673/my%2fvhost?heartbeat=5&frame_max=8192&channel_max=10&connection_timeout=1500&call_timeout=2500&auth_mechanism=amqplain",
    ),
    ("default", "amqp:///"),
    (
        "tls",
        "amqps://guest:guest@rabbit:5671/%2f?cacertfile=%2Fetc%2Fca.pem&server_name_indication=rabbit",
    ),
    ("ipv6", "amqp://[::1]:5000/v"),
    ("ipv4", "amqp://127.0.0.1/"),
    ("named", "amqp://h/?connection_name=orders+service"),
    ("dot_vhost", "amqp://h/%2e"),
    ("bad_vhost", "amqp://h/a/b"),
    ("bad_query", "amqp://h/?heartbeat=70000"),
    ("no_authority", "amqp:vhost"),
];

fn main() {
    let frames = Path::new("corpus/frame_decoder");
    let table_dir = Path::new("corpus/table_decoder");
    let url_dir = Path::new("corpus/url");
    let machine_dir = Path::new("corpus/machine");
    for dir in [frames, table_dir, url_dir, machine_dir] {
        fs::create_dir_all(dir).expect("mkdir");
    }

    for (name, url) in URLS {
        write(url_dir, name, url.as_bytes());
    }
    // Programs the machine harness runs far: in its own format, so the
    // harness writes them.
    for (name, program) in amqp091::fuzzing::machine_seeds() {
        write(machine_dir, name, &program);
    }

    for (name, table) in tables() {
        let mut buf = BytesMut::new();
        write_table(&mut buf, &table);
        write(table_dir, name, &buf);
    }

    let mut stream = BytesMut::new();
    for (name, ch, method) in methods() {
        let mut buf = BytesMut::new();
        write_method(&mut buf, ch, &method);
        write(frames, name, &buf);
        stream.extend_from_slice(&buf);
    }

    let mut buf = BytesMut::new();
    write_header(&mut buf, 1, 5, &BasicProperties::default());
    write(frames, "header_empty", &buf);

    let mut buf = BytesMut::new();
    write_header(&mut buf, 1, 11, &full_properties());
    write(frames, "header_full", &buf);

    let mut buf = BytesMut::new();
    write_heartbeat(&mut buf);
    write(frames, "heartbeat", &buf);

    // A whole delivery: method, header and body split over two body frames.
    let mut buf = BytesMut::new();
    let deliver = &methods()[6];
    write_method(&mut buf, deliver.1, &deliver.2);
    write_header(&mut buf, 1, 5000, &full_properties());
    write_body(&mut buf, 1, &[b'x'; 5000], 4096);
    write(frames, "delivery", &buf);

    write_heartbeat(&mut stream);
    write(frames, "stream", &stream);

    println!("seeds written to corpus/{{frame_decoder,table_decoder,url,machine}}");
}
