-- Quality validation (spec §4.2.9, §5.7). A job may name a validation file (another
-- enriched training file) and ask for a validation when training completes. Each
-- validation run is queued, claimed by an agent like a training attempt, and ends
-- completed (with the suites' reports, gates, verdict and recommendations) or failed.
ALTER TABLE training_jobs ADD COLUMN validation_file_id BLOB REFERENCES training_files(id) ON DELETE SET NULL;
-- {test_suites, gates}: run these suites with these gate overrides when training ends.
ALTER TABLE training_jobs ADD COLUMN validate_on_completion TEXT;

-- 0001 created the spec's table, which nothing ever wrote: it is replaced by one that also
-- holds the run's queue state, the baseline's results and the gates' details.
DROP TABLE validation_results;
CREATE TABLE validation_results (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  user_id BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
  test_suites TEXT NOT NULL,
  comparison_baseline_id BLOB REFERENCES training_jobs(id) ON DELETE SET NULL,
  -- A training file whose first user turns are knowledge retention's prompts (default: built in).
  retention_file_id BLOB REFERENCES training_files(id) ON DELETE SET NULL,
  gates TEXT NOT NULL,
  max_samples INTEGER NOT NULL,
  max_new_tokens INTEGER NOT NULL,
  automatic INTEGER NOT NULL DEFAULT 0,
  agent_id BLOB REFERENCES agents(id) ON DELETE SET NULL,
  claim_count INTEGER NOT NULL DEFAULT 0,
  progress TEXT,
  overall_status TEXT CHECK (overall_status IN ('production_ready', 'review_required', 'blocked')),
  overall_score REAL,
  perplexity_results TEXT,
  emotional_intelligence_results TEXT,
  knowledge_retention_results TEXT,
  voice_consistency_results TEXT,
  stop_behaviour_results TEXT,
  baseline_results TEXT,
  comparison TEXT,
  gate_results TEXT,
  passed_gates TEXT,
  failed_gates TEXT,
  warning_gates TEXT,
  recommendations TEXT,
  examples TEXT,
  error_message TEXT,
  created_at TEXT NOT NULL,
  started_at TEXT,
  validation_completed_at TEXT
);
CREATE INDEX idx_validation_results_job_id ON validation_results(job_id, created_at);
CREATE INDEX idx_validation_results_status ON validation_results(status, created_at);
