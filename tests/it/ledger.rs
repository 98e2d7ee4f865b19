//! The ledger and outbox: QueueService inserts, uniqueness, rollback.

use kongflow_events::QueueService;
use kongflow_events::ledger::{
    DeliverEventArgs, InsertOpts, InvokeDispatcherArgs, JobInsert, JobKind, JobPriority, JobState,
};
use uuid::Uuid;

use crate::helpers::{NO_ROLES, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_take_the_defaults_and_are_unique_by_args() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let q = QueueService::new();
    let args = DeliverEventArgs { id: Uuid::new_v4() };
    let mut tx = app.pool.begin().await.unwrap();
    let first = q
        .enqueue_deliver_event(&mut tx, args, InsertOpts::default())
        .await
        .unwrap();
    let again = q
        .enqueue_deliver_event(&mut tx, args, InsertOpts::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();

    assert!(!first.unique_skipped_as_duplicate);
    assert!(again.unique_skipped_as_duplicate);
    assert_eq!(first.job.id, again.job.id);
    let job = first.job;
    assert_eq!(job.kind, JobKind::DeliverEvent);
    assert_eq!(job.queue, "events");
    assert_eq!(job.priority, JobPriority::High);
    assert_eq!(job.max_attempts, 5);
    assert_eq!(job.state, JobState::Available);
    assert!(job.published_at.is_none());

    // Batch form: a duplicate inside the batch and one of an earlier insert.
    let d = Uuid::new_v4();
    let e = Uuid::new_v4();
    let invoke = |id| {
        JobInsert::invoke_dispatcher(
            InvokeDispatcherArgs {
                id,
                event_record_id: e,
            },
            InsertOpts {
                priority: JobPriority::Critical,
                ..InsertOpts::default()
            },
        )
    };
    let mut tx = app.pool.begin().await.unwrap();
    let res = q
        .enqueue_many(
            &mut tx,
            vec![
                invoke(d),
                invoke(d),
                JobInsert::deliver_event(args, InsertOpts::default()),
            ],
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let flags: Vec<bool> = res.iter().map(|r| r.unique_skipped_as_duplicate).collect();
    assert_eq!(flags, vec![false, true, true]);
    assert_eq!(res[0].job.id, res[1].job.id);
    assert_eq!(res[0].job.kind, JobKind::InvokeDispatcher);
    assert_eq!(res[0].job.priority, JobPriority::Critical);
    assert_eq!(res[2].job.id, job.id);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_enqueue_leaves_no_job_and_publishes_nothing() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let q = QueueService::new();
    let mut tx = app.pool.begin().await.unwrap();
    let res = q
        .enqueue_deliver_event(
            &mut tx,
            DeliverEventArgs { id: Uuid::new_v4() },
            InsertOpts::default(),
        )
        .await
        .unwrap();
    assert!(res.job.id > 0);
    tx.rollback().await.unwrap();

    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_jobs")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(app.relay_all().await, 0);
    assert_eq!(app.queue_depth(JobKind::DeliverEvent).await, 0);

    // The same job committed is published: the check above could have failed.
    let mut tx = app.pool.begin().await.unwrap();
    q.enqueue_deliver_event(
        &mut tx,
        DeliverEventArgs { id: Uuid::new_v4() },
        InsertOpts::default(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(app.relay_all().await, 1);
    crate::helpers::wait_until(
        "the committed job's message",
        std::time::Duration::from_secs(5),
        || async { app.queue_depth(JobKind::DeliverEvent).await == 1 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_never_publish_the_same_rows() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let q = QueueService::new();
    let mut tx = app.pool.begin().await.unwrap();
    let jobs = (0..1200)
        .map(|_| {
            JobInsert::deliver_event(
                DeliverEventArgs { id: Uuid::new_v4() },
                InsertOpts::default(),
            )
        })
        .collect();
    q.enqueue_many(&mut tx, jobs).await.unwrap();
    tx.commit().await.unwrap();

    let (a, b) = tokio::join!(app.relay_all(), app.relay_all());
    assert_eq!(a + b, 1200);
    crate::helpers::wait_until(
        "1200 messages",
        std::time::Duration::from_secs(10),
        || async { app.queue_depth(JobKind::DeliverEvent).await == 1200 },
    )
    .await;
    let unpublished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM queue_jobs WHERE published_at IS NULL")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(unpublished, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_returns_keeps_its_job_in_the_outbox() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    let mut tx = app.pool.begin().await.unwrap();
    let job = QueueService::new()
        .enqueue_deliver_event(
            &mut tx,
            DeliverEventArgs { id: Uuid::new_v4() },
            InsertOpts::default(),
        )
        .await
        .unwrap()
        .job;
    tx.commit().await.unwrap();
    let published_at = || async {
        sqlx::query_scalar::<_, Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT published_at FROM queue_jobs WHERE id = $1",
        )
        .bind(job.id)
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let relay = app.relay();
    let channel = relay.open_channel(&app.amqp).await.unwrap();
    // The work queue is gone: the publish is unroutable and the broker returns it
    // (`mandatory`), though it confirms the publish itself. (A queue bound under another
    // key keeps the test's auto-delete exchange alive.)
    app.remove_work_queue(JobKind::DeliverEvent).await;
    assert_eq!(relay.publish_batch(&channel).await.unwrap(), 0);
    assert_eq!(published_at().await, None, "the mark was taken back");
    assert_eq!(
        relay.publish_batch(&channel).await.unwrap(),
        0,
        "still not routable"
    );
    assert_eq!(published_at().await, None);

    // With the queue back, the same job is published, and only now marked.
    app.topology.declare(&app.channel).await.unwrap();
    assert_eq!(relay.publish_batch(&channel).await.unwrap(), 1);
    assert!(published_at().await.is_some());
    crate::helpers::wait_until(
        "the message in its queue",
        std::time::Duration::from_secs(5),
        || async { app.queue_depth(JobKind::DeliverEvent).await == 1 },
    )
    .await;
    let _ = channel.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_relay_publishes() {
    let app = TestApp::builder().roles(NO_ROLES).start().await;
    app.register_job("job", "quiet").await;
    // Ingest, then a worker step on the deliverEvent job, handed to it directly.
    let ingested = kongflow_events::EventsService::new(app.pool.clone())
        .ingest_send_event(
            &app.env,
            kongflow_events::events::SendEvent {
                id: Some("quiet-1".into()),
                name: "quiet".into(),
                ..Default::default()
            },
            kongflow_events::events::SendEventOptions::default(),
        )
        .await
        .unwrap();
    let job = ingested.job.unwrap().job;
    let message = kongflow_events::amqp::JobMessage::from_job(&job);
    let done = app.worker().process(vec![Ok(message)]).await.unwrap();
    assert_eq!(done, vec![kongflow_events::worker::Disposition::Ack]);

    // The delivery enqueued an invocation in the ledger, and nothing reached the broker.
    let (deliver_state, invocations): (String, i64) = sqlx::query_as(
        "SELECT (SELECT state::text FROM queue_jobs WHERE id = $1),
                (SELECT count(*) FROM queue_jobs WHERE kind = 'events.invokeDispatcher'
                    AND published_at IS NULL)",
    )
    .bind(job.id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((deliver_state.as_str(), invocations), ("completed", 1));
    for queue in app.topology.all_queues() {
        assert_eq!(app.depth_of(&queue).await, 0, "{queue} holds a message");
    }
    // The relay, and only it, publishes the invocation.
    assert_eq!(app.relay_all().await, 1);
    crate::helpers::wait_until(
        "the invocation's message",
        std::time::Duration::from_secs(5),
        || async { app.queue_depth(JobKind::InvokeDispatcher).await == 1 },
    )
    .await;
}
