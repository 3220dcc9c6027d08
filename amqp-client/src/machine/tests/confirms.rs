//! Publisher confirms: acks, nacks, returns and their bounds.

use super::*;

#[test]
fn confirms_settle_single_and_multiple_acks_and_nacks() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let (select, _select_answer) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: target(&m, id),
            method: Box::new(Method::ConfirmSelect(confirm::Select { no_wait: false })),
            reply: select,
        },
        now,
    );
    written(&mut m);
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ConfirmSelectOk(confirm::SelectOk {}),
    })
    .expect("select-ok");
    let mut answers = Vec::new();
    for _ in 0..4 {
        let (tx, rx) = oneshot::channel();
        m.command(
            Command::Publish {
                channel: target(&m, id),
                head: publish_head(id, 1),
                body: PublishBody(Bytes::from_static(b"x")),
                confirm: Some(tx),
                credit: None,
            },
            now,
        );
        answers.push(rx);
    }
    let (wait_tx, mut wait) = oneshot::channel();
    m.command(
        Command::WaitForConfirms {
            channel: target(&m, id),
            reply: wait_tx,
        },
        now,
    );
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::BasicAck(basic::Ack {
            delivery_tag: 2,
            multiple: true,
        }),
    })
    .expect("ack");
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::BasicNack(basic::Nack {
            delivery_tag: 4,
            multiple: false,
            requeue: false,
        }),
    })
    .expect("nack");
    assert!(wait.try_recv().is_err(), "publish 3 is outstanding");
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::BasicAck(basic::Ack {
            delivery_tag: 3,
            multiple: false,
        }),
    })
    .expect("ack");
    let outcomes: Vec<_> = answers
        .iter_mut()
        .map(|a| a.try_recv().expect("settled").expect("ok"))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            Confirmation::Ack,
            Confirmation::Ack,
            Confirmation::Ack,
            Confirmation::Nack
        ]
    );
    assert!(
        !wait.try_recv().expect("all settled").expect("ok"),
        "one was nacked"
    );
}

#[test]
fn more_returns_waiting_than_publishes_pending_is_a_protocol_error() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    confirm_mode(&mut m, now, id);
    let _answer = publish_one(&mut m, now, id, true).expect("confirm mode");
    written(&mut m);
    broker_returns(&mut m, id).expect("the return of the pending publish");
    let err = broker_returns(&mut m, id).expect_err("a second return for one publish");
    assert!(
        matches!(&err, Error::UnexpectedFrame(text) if text.contains("basic.return")),
        "{err:?}"
    );

    // With nothing pending at all, the first return is already one too many.
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    confirm_mode(&mut m, now, id);
    let err = broker_returns(&mut m, id).expect_err("a return with no publish pending");
    assert!(matches!(err, Error::UnexpectedFrame(_)), "{err:?}");

    // The well-behaved order still gives the returned message to its publish.
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    confirm_mode(&mut m, now, id);
    let mut answer = publish_one(&mut m, now, id, true).expect("confirm mode");
    written(&mut m);
    broker_returns(&mut m, id).expect("return");
    broker_acks(&mut m, id, 1, false).expect("ack");
    assert!(matches!(
        answer.try_recv().expect("settled"),
        Ok(Confirmation::Returned(_))
    ));
}

#[test]
fn a_return_of_a_publish_sent_before_confirm_select_is_not_taken_for_a_confirm() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    let (returns, mut returned) = mpsc::channel(4);
    m.command(
        Command::SetReturns {
            channel: target(&m, id),
            returns,
        },
        now,
    );
    // A mandatory publish, then confirm.select at once: the broker
    // returns the publish before it answers select-ok.
    publish_one(&mut m, now, id, false);
    let (select, _answer) = oneshot::channel();
    m.command(
        Command::Rpc {
            channel: target(&m, id),
            method: Box::new(Method::ConfirmSelect(confirm::Select { no_wait: false })),
            reply: select,
        },
        now,
    );
    written(&mut m);
    broker_returns(&mut m, id).expect("a return of the earlier publish");
    m.handle_frame(Frame::Method {
        channel: id,
        method: Method::ConfirmSelectOk(confirm::SelectOk {}),
    })
    .expect("select-ok");
    assert!(returned.try_recv().is_ok(), "it went to the returns stream");
    let mut answer = publish_one(&mut m, now, id, true).expect("confirm mode");
    written(&mut m);
    broker_acks(&mut m, id, 1, false).expect("ack");
    assert_eq!(
        answer.try_recv().expect("settled").expect("ok"),
        Confirmation::Ack,
        "the first publish in confirm mode was not returned"
    );
}

#[test]
fn returns_left_over_by_a_multiple_ack_do_not_wait_for_later_publishes() {
    let now = Instant::now();
    let (mut m, _) = machine(now);
    let id = open_channel(&mut m, now);
    confirm_mode(&mut m, now, id);
    publish_one(&mut m, now, id, true);
    publish_one(&mut m, now, id, true);
    written(&mut m);
    broker_returns(&mut m, id).expect("return 1");
    broker_returns(&mut m, id).expect("return 2");
    broker_acks(&mut m, id, 2, true).expect("one ack for both");
    // The next publish is routed and acked: nothing returned is left to
    // pin on it, and its own return would be accepted.
    let mut answer = publish_one(&mut m, now, id, true).expect("confirm mode");
    written(&mut m);
    broker_acks(&mut m, id, 3, false).expect("ack");
    assert_eq!(
        answer.try_recv().expect("settled").expect("ok"),
        Confirmation::Ack
    );
}
