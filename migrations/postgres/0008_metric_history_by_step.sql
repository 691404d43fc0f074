-- A job's metric history is read by (job, step) and nothing else: the primary key is
-- (job_id, step) and carries every other column it returns (a covering index, read by
-- index-only scans), and an insert no longer maintains a random-UUID key or the unused
-- recorded_at index. The id stays as a column.
DROP INDEX idx_training_metrics_recorded_at;
ALTER TABLE training_metrics DROP CONSTRAINT training_metrics_pkey;
ALTER TABLE training_metrics DROP CONSTRAINT training_metrics_job_id_step_key;
ALTER TABLE training_metrics ADD CONSTRAINT training_metrics_pkey PRIMARY KEY (job_id, step)
  INCLUDE (epoch, training_loss, validation_loss, learning_rate, grad_norm, tokens_per_second,
           gpu_utilization, memory_used_gb, recorded_at);
-- The job page's evaluation points, found without reading the other steps.
CREATE INDEX idx_training_metrics_validation ON training_metrics(job_id, step) WHERE validation_loss IS NOT NULL;
