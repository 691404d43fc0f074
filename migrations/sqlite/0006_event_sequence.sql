-- The order events were stored in, for live streams that resume after the last event a
-- client saw (`Last-Event-ID`). `created_at` is the reporter's clock and cannot serve:
-- an agent's events carry the time they happened, not the time they arrived.
ALTER TABLE event_logs ADD COLUMN seq INTEGER;
UPDATE event_logs SET seq = rowid;
CREATE TRIGGER event_logs_sequence AFTER INSERT ON event_logs
BEGIN
  UPDATE event_logs SET seq = NEW.rowid WHERE rowid = NEW.rowid;
END;
CREATE INDEX idx_event_logs_job_seq ON event_logs(job_id, seq);
