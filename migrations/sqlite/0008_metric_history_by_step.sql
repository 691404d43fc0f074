-- A job's metric history is read by (job, step) and nothing else: keep the rows in that
-- order (a WITHOUT ROWID table is its primary key's B-tree), so a range of steps is one
-- contiguous read with every column at hand (a covering index), and an insert touches one
-- B-tree instead of three (the random id key and the recorded_at index are gone; the id
-- stays as a column).
CREATE TABLE training_metrics_by_step (
  id BLOB NOT NULL,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  attempt_id BLOB REFERENCES job_attempts(id) ON DELETE SET NULL,
  step INTEGER NOT NULL,
  epoch INTEGER,
  training_loss REAL,
  validation_loss REAL,
  learning_rate REAL,
  grad_norm REAL,
  tokens_per_second REAL,
  gpu_utilization INTEGER CHECK (gpu_utilization BETWEEN 0 AND 100),
  memory_used_gb REAL,
  recorded_at TEXT NOT NULL,
  PRIMARY KEY (job_id, step)
) WITHOUT ROWID;
INSERT INTO training_metrics_by_step
  SELECT id, job_id, attempt_id, step, epoch, training_loss, validation_loss, learning_rate,
         grad_norm, tokens_per_second, gpu_utilization, memory_used_gb, recorded_at
  FROM training_metrics;
DROP TABLE training_metrics;
ALTER TABLE training_metrics_by_step RENAME TO training_metrics;
-- The job page's evaluation points, found without reading the other steps.
CREATE INDEX idx_training_metrics_validation ON training_metrics(job_id, step) WHERE validation_loss IS NOT NULL;
