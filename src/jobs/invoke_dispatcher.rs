//! `events.invokeDispatcher`: create the job runs of one dispatcher for one event.

use sqlx::PgConnection;

use super::JobError;
use crate::queue::InvokeDispatcherArgs;

pub async fn run(tx: &mut PgConnection, args: InvokeDispatcherArgs) -> Result<(), JobError> {
    let dispatcher = sqlx::query!(
        r#"SELECT id, environment_id, enabled, dispatchable_type, target_id
           FROM event_dispatchers WHERE id = $1"#,
        args.id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let event = sqlx::query!(
        "SELECT id, environment_id FROM event_records WHERE id = $1",
        args.event_record_id
    )
    .fetch_optional(&mut *tx)
    .await?;
    let (Some(dispatcher), Some(event)) = (dispatcher, event) else {
        tracing::warn!(dispatcher_id = %args.id, event_record_id = %args.event_record_id,
            "invokeDispatcher: dispatcher or event is gone");
        return Ok(());
    };
    if !dispatcher.enabled || dispatcher.environment_id != event.environment_id {
        return Ok(());
    }

    // Runs are unique per (event, dispatcher, job version): a second invocation inserts nothing.
    let created = match dispatcher.dispatchable_type.as_str() {
        "JOB_VERSION" => {
            sqlx::query!(
                r#"INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id)
                   SELECT gen_random_uuid(), v.environment_id, v.job_id, v.id, $2, $3
                   FROM job_versions v WHERE v.id = $1 AND v.environment_id = $4
                   ON CONFLICT (event_record_id, dispatcher_id, job_version_id) DO NOTHING"#,
                dispatcher.target_id,
                event.id,
                dispatcher.id,
                dispatcher.environment_id
            )
            .execute(&mut *tx)
            .await?
            .rows_affected()
        }
        "DYNAMIC_TRIGGER" => {
            sqlx::query!(
                r#"INSERT INTO job_runs (id, environment_id, job_id, job_version_id, event_record_id, dispatcher_id)
                   SELECT gen_random_uuid(), j.environment_id, j.id, j.latest_version_id, $2, $3
                   FROM dynamic_trigger_jobs dtj JOIN jobs j ON j.id = dtj.job_id
                   WHERE dtj.dynamic_trigger_id = $1 AND j.latest_version_id IS NOT NULL
                     AND j.environment_id = $4
                   ON CONFLICT (event_record_id, dispatcher_id, job_version_id) DO NOTHING"#,
                dispatcher.target_id,
                event.id,
                dispatcher.id,
                dispatcher.environment_id
            )
            .execute(&mut *tx)
            .await?
            .rows_affected()
        }
        other => {
            return Err(JobError::Permanent(format!(
                "dispatcher {} has unknown dispatchable type {other:?}",
                dispatcher.id
            )));
        }
    };
    tracing::debug!(dispatcher_id = %dispatcher.id, event_record_id = %event.id, created, "dispatcher invoked");
    Ok(())
}
