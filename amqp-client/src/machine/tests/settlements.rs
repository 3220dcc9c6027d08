//! Acks, nacks and rejects: coalescing, ordering, no-ack and tx channels.

use super::*;

#[test]
fn acks_sent_one_by_one_go_out_as_one_multiple_ack_when_they_settle_a_prefix() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=6);
    for tag in 1..=4 {
        settle(&mut m, now, id, ack(tag));
    }
    assert_eq!(
        written_methods(&mut m),
        [Method::BasicAck(basic::Ack {
            delivery_tag: 4,
            multiple: true
        })]
    );
    // 6 before 5 is sent alone; 5 then completes the prefix through 6,
    // but 6 is no longer the broker's to ack (RabbitMQ refuses a
    // multiple ack of a tag it does not hold): 5 goes alone.
    settle(&mut m, now, id, ack(6));
    assert_eq!(written_methods(&mut m), [ack(6)]);
    settle(&mut m, now, id, ack(5));
    assert_eq!(written_methods(&mut m), [ack(5)]);
}

#[test]
fn acks_sent_as_plain_methods_are_tracked_like_delivery_acks() {
    // `channel.basic_ack(..)` (the generated stub) sends a `Command::Send`.
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=3);
    for tag in 1..=3 {
        send(&mut m, now, id, ack(tag));
    }
    assert_eq!(
        written_methods(&mut m),
        [Method::BasicAck(basic::Ack {
            delivery_tag: 3,
            multiple: true
        })]
    );
    // Recover-async stops the tracking: later acks go out as they are.
    let _more = consume_and_deliver(&mut m, now, id, false, 4..=5);
    let recover = Method::BasicRecoverAsync(basic::RecoverAsync { requeue: true });
    send(&mut m, now, id, recover.clone());
    for tag in 4..=5 {
        send(&mut m, now, id, ack(tag));
    }
    assert_eq!(written_methods(&mut m), [recover, ack(4), ack(5)]);
}

#[test]
fn an_unacked_delivery_is_never_covered_by_a_multiple_ack() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=4);
    // 1 stays unacked: 2..4 go out one by one.
    for tag in 2..=4 {
        settle(&mut m, now, id, ack(tag));
    }
    assert_eq!(written_methods(&mut m), [ack(2), ack(3), ack(4)]);
    // A reject of 1 settles it but is not an ack.
    let reject = Method::BasicReject(basic::Reject {
        delivery_tag: 1,
        requeue: true,
    });
    settle(&mut m, now, id, reject.clone());
    assert_eq!(written_methods(&mut m), [reject]);
    // A second ack of a settled tag is left to the broker to refuse.
    settle(&mut m, now, id, ack(3));
    assert_eq!(written_methods(&mut m), [ack(3)]);
}

#[test]
fn a_reject_between_acks_stays_in_order_and_the_widened_ack_follows_it() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=4);
    let nack = Method::BasicNack(basic::Nack {
        delivery_tag: 2,
        multiple: false,
        requeue: false,
    });
    settle(&mut m, now, id, ack(1));
    settle(&mut m, now, id, nack.clone());
    settle(&mut m, now, id, ack(3));
    settle(&mut m, now, id, ack(4));
    assert_eq!(
        written_methods(&mut m),
        [
            ack(1),
            nack,
            Method::BasicAck(basic::Ack {
                delivery_tag: 4,
                multiple: true
            })
        ]
    );
}

#[test]
fn the_widened_ack_names_a_tag_whose_ack_is_still_waiting() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=5);
    // 3 is rejected, 2 and 4 acked: waiting, not a prefix yet.
    settle(
        &mut m,
        now,
        id,
        Method::BasicReject(basic::Reject {
            delivery_tag: 3,
            requeue: false,
        }),
    );
    settle(&mut m, now, id, ack(2));
    settle(&mut m, now, id, ack(4));
    written(&mut m);
    // 1 settles the prefix through 4, whose acks are written already.
    settle(&mut m, now, id, ack(1));
    assert_eq!(written_methods(&mut m), [ack(1)]);
    settle(&mut m, now, id, ack(5));
    assert_eq!(written_methods(&mut m), [ack(5)]);
}

#[test]
fn a_transaction_channel_sends_every_settlement_as_it_is() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let (reply, _answer) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: target(&m, id),
            method: Box::new(Method::TxSelect(crate::protocol::methods::tx::Select {})),
            reply,
        },
        now,
    );
    written(&mut m);
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::TxSelectOk(crate::protocol::methods::tx::SelectOk {}),
    })
    .expect("select-ok");
    let _deliveries = consume_and_deliver(&mut m, now, id, false, 1..=3);
    for tag in 1..=3 {
        settle(&mut m, now, id, ack(tag));
    }
    // A rollback would make them unacknowledged again: no widening.
    assert_eq!(written_methods(&mut m), [ack(1), ack(2), ack(3)]);
}

#[test]
fn acks_of_no_ack_deliveries_are_passed_through_for_the_broker_to_refuse() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    // A no-ack consumer: its tags are not outstanding; an ack of one is
    // passed through for the broker to refuse.
    let _deliveries = consume_and_deliver(&mut m, now, id, true, 1..=3);
    settle(&mut m, now, id, ack(2));
    assert_eq!(written_methods(&mut m), [ack(2)]);
}

#[test]
fn forgetting_a_no_ack_consumer_cancels_it_without_nacking_its_deliveries() {
    for no_ack in [true, false] {
        let now = Instant::now();
        let (mut m, _) = machine(now);
        let id = open_channel(&mut m, now);
        let _deliveries = consume_and_deliver(&mut m, now, id, no_ack, 1..=3);
        m.handle_frame(Frame::Method {
            channel: id,
            method: Method::BasicConsumeOk(basic::ConsumeOk {
                consumer_tag: ShortString::from_static("t"),
            }),
        })
        .expect("consume-ok");
        // What a dropped consumer that buffered 2 and 3 asks for.
        m.command(
            Command::ForgetConsumer {
                channel: target(&m, id),
                tag: ShortString::from_static("t"),
                requeue: vec![2, 3],
                requeue_epoch: m.channels[&id].epoch.load(Ordering::Acquire),
            },
            now,
        );
        let sent = written_methods(&mut m);
        let nacked: Vec<u64> = sent
            .iter()
            .filter_map(|method| match method {
                Method::BasicNack(nack) if nack.requeue => Some(nack.delivery_tag),
                _ => None,
            })
            .collect();
        // The broker closes the channel (406) on a nack of a no-ack tag.
        let expected: &[u64] = if no_ack { &[] } else { &[2, 3] };
        assert_eq!(nacked, expected, "no_ack: {no_ack}; sent {sent:?}");
        assert!(
            sent.iter()
                .any(|method| matches!(method, Method::BasicCancel(_))),
            "no_ack: {no_ack}; sent {sent:?}"
        );
    }
}
