-- Ingestion in one round trip per batch. A batch was BEGIN, the store, the variables'
-- fill (every job's first event), the watermark's update and COMMIT: five round trips,
-- each a wake-up of the gateway and of Postgres, when at a low rate every event is a batch
-- of its own. One function call is one statement, atomic without an explicit transaction
-- (services/gateway/ingest.py says what each statement does and why).
--
-- The function's parameters are prefixed `p_` so that none shadows a column name. The
-- gateway's connections plan every statement for its parameters (`force_custom_plan`, for
-- the lists' partial indexes, services/gateway/db.py); these statements take arrays whose
-- values change no plan, so theirs are planned once per connection and reused.

-- The consumer's watermark only ever rises.
CREATE OR REPLACE FUNCTION xoogify_save_progress(p_consumer text, p_kind text, p_mark bigint)
RETURNS void LANGUAGE sql AS $fn$
    INSERT INTO ingest_progress (consumer, kind, watermark) VALUES (p_consumer, p_kind, p_mark)
    ON CONFLICT (consumer) DO UPDATE SET watermark = greatest(ingest_progress.watermark,
        EXCLUDED.watermark), updated_at = now();
$fn$;

CREATE OR REPLACE FUNCTION xoogify_ingest_events(
    p_seqs bigint[], p_payloads bytea, p_fill bigint[],
    p_consumer text, p_kind text, p_mark bigint
) RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
BEGIN
    WITH received AS MATERIALIZED (
        SELECT m.stream_seq, m.payload::jsonb AS payload
          FROM unnest(p_seqs, string_to_array(convert_from(p_payloads, 'UTF8'), chr(30)))
               AS m (stream_seq, payload)
    ), events AS MATERIALIZED (
        SELECT r.stream_seq, r.payload, e.*
          FROM received r, jsonb_to_record(r.payload) AS e (
              event_id text, build_id bigint, organization text, environment text,
              module_type text, module_name text, action text, status text, reason text,
              exit_code integer, runner_id text, queue_position integer, seq integer,
              requested_by text, submitted_at timestamptz, started_at timestamptz,
              finished_at timestamptz, updated_at timestamptz, variables jsonb)
    ), stored AS (
        INSERT INTO job_events (event_id, build_id, seq, status, at, reason, runner_id, exit_code,
                                queue_position, stream_seq, payload)
        SELECT event_id, build_id, seq, status, updated_at, reason, runner_id, exit_code,
               queue_position, stream_seq, payload
          FROM events
        ON CONFLICT (event_id) DO NOTHING
    )
    INSERT INTO jobs (build_id, organization, environment, module_type, module_name, action,
                      status, reason, exit_code, runner_id, queue_position, seq, requested_by,
                      submitted_at, started_at, finished_at, updated_at, stream_seq, variables)
    SELECT DISTINCT ON (build_id)
           build_id, organization, environment, module_type, module_name, action, status,
           reason, exit_code, runner_id, queue_position, seq, requested_by, submitted_at,
           started_at, finished_at, updated_at, stream_seq, variables
      FROM events
     ORDER BY build_id, seq DESC
    ON CONFLICT (build_id) DO UPDATE SET
        status = EXCLUDED.status, reason = EXCLUDED.reason, exit_code = EXCLUDED.exit_code,
        runner_id = EXCLUDED.runner_id, queue_position = EXCLUDED.queue_position,
        seq = EXCLUDED.seq, started_at = EXCLUDED.started_at,
        finished_at = EXCLUDED.finished_at, updated_at = EXCLUDED.updated_at,
        stream_seq = EXCLUDED.stream_seq,
        variables = coalesce(EXCLUDED.variables, jobs.variables)
    WHERE jobs.seq < EXCLUDED.seq;
    IF cardinality(p_fill) > 0 THEN
        UPDATE jobs SET variables = e.payload->'variables'
          FROM job_events e
         WHERE jobs.build_id = ANY(p_fill) AND jobs.variables IS NULL
           AND e.build_id = jobs.build_id AND e.payload ? 'variables';
    END IF;
    PERFORM xoogify_save_progress(p_consumer, p_kind, p_mark);
END
$fn$;

CREATE OR REPLACE FUNCTION xoogify_ingest_chunks(
    p_build_ids bigint[], p_offsets bigint[], p_sizes int[], p_data text[], p_eof bool[],
    p_consumer text, p_kind text, p_mark bigint
) RETURNS void LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
BEGIN
    IF cardinality(p_build_ids) > 0 THEN
        INSERT INTO job_log_chunks (build_id, "offset", size, data, eof)
        SELECT * FROM unnest(p_build_ids, p_offsets, p_sizes, p_data, p_eof)
        ON CONFLICT (build_id, "offset") DO NOTHING;
    END IF;
    PERFORM xoogify_save_progress(p_consumer, p_kind, p_mark);
END
$fn$;
