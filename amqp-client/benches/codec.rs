#![allow(missing_docs)] // criterion's macros generate undocumented functions
//! Frame codec hot paths: encoding a `basic.publish` with its header and a
//! 32-byte body, and decoding a `basic.deliver` with its header and body.

use amqp091::protocol::frame::{self, Frame, FrameDecoder};
use amqp091::protocol::methods::{basic, Method};
use amqp091::protocol::{BasicProperties, ShortString};
use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
// Not criterion 0.5's `black_box`: it is a volatile read, which the compiler
// splits into two-byte loads of the whole 144-byte `Frame` (measured: about
// as much time as decoding it).
use std::hint::black_box;

const BODY: [u8; 32] = [b'x'; 32];

fn encode_publish(c: &mut Criterion) {
    let publish = basic::Publish {
        exchange: ShortString::from_static("bench-exchange"),
        routing_key: ShortString::from_static("bench.routing.key"),
        mandatory: false,
        immediate: false,
    };
    let properties = BasicProperties::default().with_delivery_mode(2);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode basic.publish + header + 32-byte body", |b| {
        b.iter(|| {
            if buf.len() > 60 * 1024 {
                buf.clear();
            }
            frame::write_publish(
                &mut buf,
                1,
                black_box(&publish),
                black_box(&properties),
                black_box(&BODY),
                131_072,
            );
        })
    });
    group.finish();
}

fn decode_deliver(c: &mut Criterion) {
    let deliver = Method::BasicDeliver(basic::Deliver {
        consumer_tag: ShortString::from_static("amq.ctag-0123456789abcdef"),
        delivery_tag: 123_456,
        redelivered: false,
        exchange: ShortString::from_static("bench-exchange"),
        routing_key: ShortString::from_static("bench.routing.key"),
    });
    let properties = BasicProperties::default().with_delivery_mode(2);
    let mut one = BytesMut::new();
    frame::write_method(&mut one, 1, &deliver);
    frame::write_header(&mut one, 1, BODY.len() as u64, &properties);
    frame::write_body(&mut one, 1, &BODY, 131_072);
    // Many messages back to back, as they arrive in one socket read.
    const BATCH: usize = 1024;
    let mut batch = BytesMut::new();
    for _ in 0..BATCH {
        batch.extend_from_slice(&one);
    }
    let mut decoder = FrameDecoder::new(131_072);
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(
        "decode basic.deliver + header + 32-byte body (per 1024)",
        |b| {
            b.iter_batched_ref(
                || batch.clone(),
                |buf| {
                    for _ in 0..BATCH {
                        for _ in 0..3 {
                            match decoder.decode(buf) {
                                Ok(Some(frame)) => {
                                    black_box::<Frame>(frame);
                                }
                                other => panic!("{other:?}"),
                            }
                        }
                    }
                },
                criterion::BatchSize::LargeInput,
            )
        },
    );
    group.finish();
}

criterion_group!(benches, encode_publish, decode_deliver);
criterion_main!(benches);
