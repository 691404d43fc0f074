-- Quality validation (spec §4.2.9, §5.7). A job may name a validation file (another
-- enriched training file) and ask for a validation when training completes. Each
-- validation run is queued, claimed by an agent like a training attempt, and ends
-- completed (with the suites' reports, gates, verdict and recommendations) or failed.
ALTER TABLE training_jobs ADD COLUMN validation_file_id UUID REFERENCES training_files(id) ON DELETE SET NULL;
-- {test_suites, gates}: run these suites with these gate overrides when training ends.
ALTER TABLE training_jobs ADD COLUMN validate_on_completion JSONB;

-- 0001 created the spec's table, which nothing ever wrote: it is replaced by one that also
-- holds the run's queue state, the baseline's results and the gates' details.
DROP TABLE validation_results;
CREATE TABLE validation_results (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed')),
  test_suites JSONB NOT NULL,
  comparison_baseline_id UUID REFERENCES training_jobs(id) ON DELETE SET NULL,
  -- A training file whose first user turns are knowledge retention's prompts (default: built in).
  retention_file_id UUID REFERENCES training_files(id) ON DELETE SET NULL,
  gates JSONB NOT NULL,
  max_samples BIGINT NOT NULL,
  max_new_tokens BIGINT NOT NULL,
  automatic BOOLEAN NOT NULL DEFAULT false,
  agent_id UUID REFERENCES agents(id) ON DELETE SET NULL,
  claim_count BIGINT NOT NULL DEFAULT 0,
  progress JSONB,
  overall_status TEXT CHECK (overall_status IN ('production_ready', 'review_required', 'blocked')),
  overall_score DOUBLE PRECISION,
  perplexity_results JSONB,
  emotional_intelligence_results JSONB,
  knowledge_retention_results JSONB,
  voice_consistency_results JSONB,
  stop_behaviour_results JSONB,
  baseline_results JSONB,
  comparison JSONB,
  gate_results JSONB,
  passed_gates JSONB,
  failed_gates JSONB,
  warning_gates JSONB,
  recommendations JSONB,
  examples JSONB,
  error_message TEXT,
  created_at TIMESTAMPTZ NOT NULL,
  started_at TIMESTAMPTZ,
  validation_completed_at TIMESTAMPTZ
);
CREATE INDEX idx_validation_results_job_id ON validation_results(job_id, created_at);
CREATE INDEX idx_validation_results_status ON validation_results(status, created_at);
