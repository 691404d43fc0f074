-- The order events were stored in, for live streams that resume after the last event a
-- client saw (`Last-Event-ID`). `created_at` is the reporter's clock and cannot serve:
-- an agent's events carry the time they happened, not the time they arrived.
CREATE SEQUENCE event_logs_seq;
ALTER TABLE event_logs ADD COLUMN seq BIGINT DEFAULT nextval('event_logs_seq');
ALTER SEQUENCE event_logs_seq OWNED BY event_logs.seq;
CREATE INDEX idx_event_logs_job_seq ON event_logs(job_id, seq);
