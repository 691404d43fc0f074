-- Schema for PostgreSQL. migrations/sqlite/ holds the same schema in SQLite's dialect:
-- every table, column, constraint and index exists in both (checked by tests/schema_parity).
-- Status-like columns are TEXT with CHECK constraints (not enum types) so both backends
-- enforce the same value sets and decode to the same Rust types.

CREATE FUNCTION set_updated_at() RETURNS TRIGGER AS $$
BEGIN
  NEW.updated_at = now();
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TABLE users (
  id UUID PRIMARY KEY,
  email TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL,
  display_name TEXT,
  avatar_url TEXT,
  role TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator', 'admin')),
  organization_id UUID,
  preferences JSONB NOT NULL DEFAULT '{}',
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL
);
CREATE TRIGGER users_updated_at BEFORE UPDATE ON users FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE sessions (
  id UUID PRIMARY KEY,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  token_hash TEXT NOT NULL UNIQUE,
  created_at TIMESTAMPTZ NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_sessions_user_id ON sessions(user_id);

CREATE TABLE api_tokens (
  id UUID PRIMARY KEY,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  token_hash TEXT NOT NULL UNIQUE,
  created_at TIMESTAMPTZ NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL,
  last_used_at TIMESTAMPTZ,
  revoked_at TIMESTAMPTZ
);
CREATE INDEX idx_api_tokens_user_id ON api_tokens(user_id);

CREATE TABLE enrollment_tokens (
  id UUID PRIMARY KEY,
  token_hash TEXT NOT NULL UNIQUE,
  created_at TIMESTAMPTZ NOT NULL,
  expires_at TIMESTAMPTZ NOT NULL,
  use_count BIGINT NOT NULL DEFAULT 0,
  revoked_at TIMESTAMPTZ
);

CREATE TABLE agents (
  id UUID PRIMARY KEY,
  name TEXT NOT NULL,
  labels JSONB NOT NULL DEFAULT '{}',
  gpus JSONB NOT NULL DEFAULT '[]',
  secret_hash TEXT NOT NULL UNIQUE,
  enrollment_token_id UUID REFERENCES enrollment_tokens(id) ON DELETE SET NULL,
  status TEXT NOT NULL DEFAULT 'online' CHECK (status IN ('online', 'offline', 'draining')),
  last_heartbeat_at TIMESTAMPTZ,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_agents_status ON agents(status);
CREATE TRIGGER agents_updated_at BEFORE UPDATE ON agents FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE training_files (
  id UUID PRIMARY KEY,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  description TEXT,
  file_path TEXT NOT NULL,
  file_size BIGINT NOT NULL,
  mime_type TEXT,
  file_format TEXT,
  sha256 TEXT NOT NULL,
  conversation_count BIGINT NOT NULL DEFAULT 0,
  training_pairs_count BIGINT NOT NULL DEFAULT 0,
  average_quality_score DOUBLE PRECISION,
  quality_scores JSONB NOT NULL DEFAULT '{}',
  scaffolding_distribution JSONB NOT NULL DEFAULT '{}',
  human_review JSONB NOT NULL DEFAULT '{}',
  status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived', 'deleted')),
  enrichment_status TEXT NOT NULL DEFAULT 'pending' CHECK (enrichment_status IN ('pending', 'processing', 'completed', 'failed')),
  enrichment_error TEXT,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL,
  last_enriched_at TIMESTAMPTZ,
  deleted_at TIMESTAMPTZ
);
CREATE INDEX idx_training_files_user_created ON training_files(user_id, created_at DESC);
CREATE INDEX idx_training_files_status ON training_files(status);
CREATE INDEX idx_training_files_enrichment_status ON training_files(enrichment_status);
CREATE TRIGGER training_files_updated_at BEFORE UPDATE ON training_files FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE conversations (
  id UUID PRIMARY KEY,
  training_file_id UUID NOT NULL REFERENCES training_files(id) ON DELETE CASCADE,
  line_number BIGINT NOT NULL,
  persona TEXT,
  emotional_arc TEXT,
  topic TEXT,
  quality_score DOUBLE PRECISION,
  human_reviewed BOOLEAN,
  messages JSONB NOT NULL,
  metadata JSONB,
  created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_conversations_file_quality ON conversations(training_file_id, quality_score DESC);

CREATE TABLE hyperparameter_presets (
  id UUID PRIMARY KEY,
  name TEXT NOT NULL,
  description TEXT,
  icon TEXT,
  is_system BOOLEAN NOT NULL DEFAULT false,
  parameters JSONB NOT NULL,
  estimates JSONB NOT NULL,
  risk_level TEXT NOT NULL DEFAULT 'medium' CHECK (risk_level IN ('low', 'medium', 'high')),
  success_rate DOUBLE PRECISION,
  completed_jobs BIGINT NOT NULL DEFAULT 0,
  requires_completed_jobs BIGINT NOT NULL DEFAULT 0,
  recommended_for JSONB NOT NULL DEFAULT '[]',
  created_by UUID REFERENCES users(id) ON DELETE CASCADE,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL
);
CREATE UNIQUE INDEX idx_presets_system_name ON hyperparameter_presets(name) WHERE is_system;
CREATE INDEX idx_presets_created_by ON hyperparameter_presets(created_by);
CREATE TRIGGER presets_updated_at BEFORE UPDATE ON hyperparameter_presets FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE training_jobs (
  id UUID PRIMARY KEY,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  description TEXT,
  base_model TEXT NOT NULL,
  training_file_id UUID NOT NULL REFERENCES training_files(id) ON DELETE RESTRICT,
  preset_id UUID REFERENCES hyperparameter_presets(id),
  gpu_type TEXT CHECK (gpu_type IN ('spot', 'ondemand')),
  gpu_model TEXT,
  hyperparameters JSONB,
  status TEXT NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'configured', 'queued', 'provisioning', 'training', 'interrupted', 'completed', 'failed', 'cancelled')),
  progress_percentage BIGINT NOT NULL DEFAULT 0 CHECK (progress_percentage BETWEEN 0 AND 100),
  current_step BIGINT NOT NULL DEFAULT 0,
  total_steps BIGINT,
  current_epoch BIGINT NOT NULL DEFAULT 0,
  total_epochs BIGINT,
  current_stage TEXT,
  stage_substatus TEXT,
  queued_at TIMESTAMPTZ,
  estimated_start_time TIMESTAMPTZ,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL,
  started_at TIMESTAMPTZ,
  completed_at TIMESTAMPTZ,
  elapsed_seconds BIGINT NOT NULL DEFAULT 0,
  estimated_remaining_seconds BIGINT,
  current_cost DOUBLE PRECISION NOT NULL DEFAULT 0,
  estimated_cost_min DOUBLE PRECISION,
  estimated_cost_max DOUBLE PRECISION,
  estimated_duration_hours_min DOUBLE PRECISION,
  estimated_duration_hours_max DOUBLE PRECISION,
  hourly_rate DOUBLE PRECISION,
  final_cost DOUBLE PRECISION,
  error_message TEXT,
  failed_stage TEXT,
  cancelled_reason TEXT,
  cancelled_at TIMESTAMPTZ,
  retry_count BIGINT NOT NULL DEFAULT 0,
  max_retries BIGINT NOT NULL DEFAULT 3,
  interruption_count BIGINT NOT NULL DEFAULT 0,
  max_interruptions BIGINT NOT NULL DEFAULT 5,
  resume_from_checkpoint_id UUID,
  agent_id UUID REFERENCES agents(id) ON DELETE SET NULL,
  external_job_id TEXT,
  CONSTRAINT valid_progress CHECK (
    status NOT IN ('draft', 'configured', 'queued', 'provisioning') OR progress_percentage = 0
    OR resume_from_checkpoint_id IS NOT NULL
  )
);
CREATE INDEX idx_training_jobs_user_created ON training_jobs(user_id, created_at DESC);
CREATE INDEX idx_training_jobs_status_queued ON training_jobs(status, queued_at);
CREATE INDEX idx_training_jobs_training_file_id ON training_jobs(training_file_id);
CREATE INDEX idx_training_jobs_created_at ON training_jobs(created_at DESC);
CREATE TRIGGER training_jobs_updated_at BEFORE UPDATE ON training_jobs FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE checkpoints (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  attempt_id UUID,
  step BIGINT NOT NULL,
  epoch BIGINT,
  storage_path TEXT NOT NULL,
  size_bytes BIGINT NOT NULL,
  sha256 TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL,
  UNIQUE (job_id, step)
);

CREATE TABLE job_attempts (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  agent_id UUID REFERENCES agents(id) ON DELETE SET NULL,
  attempt_number BIGINT NOT NULL,
  status TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted', 'cancelled', 'lost')),
  resumed_from_checkpoint_id UUID REFERENCES checkpoints(id) ON DELETE SET NULL,
  resumed_from_step BIGINT,
  gpu_type TEXT CHECK (gpu_type IN ('spot', 'ondemand')),
  hourly_rate DOUBLE PRECISION,
  cost DOUBLE PRECISION NOT NULL DEFAULT 0,
  error_message TEXT,
  notice_deadline TIMESTAMPTZ,
  started_at TIMESTAMPTZ NOT NULL,
  ended_at TIMESTAMPTZ,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL,
  UNIQUE (job_id, attempt_number)
);
CREATE INDEX idx_job_attempts_agent_id ON job_attempts(agent_id);
CREATE TRIGGER job_attempts_updated_at BEFORE UPDATE ON job_attempts FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE training_metrics (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  attempt_id UUID REFERENCES job_attempts(id) ON DELETE SET NULL,
  step BIGINT NOT NULL,
  epoch BIGINT,
  training_loss DOUBLE PRECISION,
  validation_loss DOUBLE PRECISION,
  learning_rate DOUBLE PRECISION,
  grad_norm DOUBLE PRECISION,
  tokens_per_second DOUBLE PRECISION,
  gpu_utilization BIGINT CHECK (gpu_utilization BETWEEN 0 AND 100),
  memory_used_gb DOUBLE PRECISION,
  recorded_at TIMESTAMPTZ NOT NULL,
  UNIQUE (job_id, step)
);
CREATE INDEX idx_training_metrics_recorded_at ON training_metrics(recorded_at);

CREATE TABLE event_logs (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  attempt_id UUID REFERENCES job_attempts(id) ON DELETE SET NULL,
  event_type TEXT NOT NULL CHECK (event_type IN ('status', 'metrics', 'warning', 'error', 'checkpoint', 'info')),
  severity TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
  message TEXT NOT NULL,
  details JSONB,
  source TEXT,
  idempotency_key TEXT,
  created_at TIMESTAMPTZ NOT NULL,
  UNIQUE (job_id, idempotency_key)
);
CREATE INDEX idx_event_logs_job_created ON event_logs(job_id, created_at);
CREATE INDEX idx_event_logs_event_type ON event_logs(event_type);

CREATE TABLE model_artifacts (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  artifact_type TEXT NOT NULL CHECK (artifact_type IN ('final_model', 'checkpoint', 'adapter_weights', 'training_report', 'metrics_export', 'validation_report')),
  name TEXT NOT NULL,
  description TEXT,
  file_path TEXT NOT NULL,
  file_size BIGINT NOT NULL,
  mime_type TEXT,
  checksum TEXT,
  version TEXT,
  epoch BIGINT,
  step BIGINT,
  metrics JSONB,
  download_count BIGINT NOT NULL DEFAULT 0,
  last_downloaded_at TIMESTAMPTZ,
  created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_model_artifacts_job_id ON model_artifacts(job_id, created_at);
CREATE INDEX idx_model_artifacts_type ON model_artifacts(artifact_type);

CREATE TABLE validation_results (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  overall_status TEXT NOT NULL CHECK (overall_status IN ('production_ready', 'review_required', 'blocked')),
  overall_score DOUBLE PRECISION,
  perplexity_results JSONB,
  emotional_intelligence_results JSONB,
  knowledge_retention_results JSONB,
  voice_consistency_results JSONB,
  passed_gates JSONB NOT NULL DEFAULT '[]',
  failed_gates JSONB NOT NULL DEFAULT '[]',
  warning_gates JSONB NOT NULL DEFAULT '[]',
  recommendations JSONB,
  created_at TIMESTAMPTZ NOT NULL,
  validation_completed_at TIMESTAMPTZ
);
CREATE INDEX idx_validation_results_job_id ON validation_results(job_id, created_at);
CREATE INDEX idx_validation_results_status ON validation_results(overall_status);

CREATE TABLE cost_tracking (
  id UUID PRIMARY KEY,
  job_id UUID NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  compute_cost DOUBLE PRECISION NOT NULL DEFAULT 0,
  storage_cost DOUBLE PRECISION NOT NULL DEFAULT 0,
  network_cost DOUBLE PRECISION NOT NULL DEFAULT 0,
  total_cost DOUBLE PRECISION NOT NULL DEFAULT 0,
  gpu_hours DOUBLE PRECISION,
  spot_savings DOUBLE PRECISION NOT NULL DEFAULT 0,
  team TEXT,
  project TEXT,
  cost_center TEXT,
  tags JSONB,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_cost_tracking_job_id ON cost_tracking(job_id);
CREATE INDEX idx_cost_tracking_team ON cost_tracking(team);
CREATE INDEX idx_cost_tracking_project ON cost_tracking(project);
CREATE TRIGGER cost_tracking_updated_at BEFORE UPDATE ON cost_tracking FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE budgets (
  id UUID PRIMARY KEY,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  amount DOUBLE PRECISION NOT NULL CHECK (amount >= 0),
  period TEXT NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly', 'quarterly', 'annual')),
  alert_threshold DOUBLE PRECISION NOT NULL DEFAULT 80,
  alert_enabled BOOLEAN NOT NULL DEFAULT true,
  current_spend DOUBLE PRECISION NOT NULL DEFAULT 0,
  team TEXT,
  project TEXT,
  cost_center TEXT,
  is_active BOOLEAN NOT NULL DEFAULT true,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL,
  period_start TIMESTAMPTZ,
  period_end TIMESTAMPTZ
);
CREATE INDEX idx_budgets_user_active ON budgets(user_id, is_active);
CREATE TRIGGER budgets_updated_at BEFORE UPDATE ON budgets FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE job_templates (
  id UUID PRIMARY KEY,
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  description TEXT,
  icon TEXT,
  preset_id UUID REFERENCES hyperparameter_presets(id),
  hyperparameters JSONB,
  gpu_type TEXT CHECK (gpu_type IN ('spot', 'ondemand')),
  gpu_model TEXT,
  base_model TEXT,
  source_job_id UUID REFERENCES training_jobs(id) ON DELETE SET NULL,
  use_count BIGINT NOT NULL DEFAULT 0,
  success_rate DOUBLE PRECISION,
  avg_cost DOUBLE PRECISION,
  avg_duration_hours DOUBLE PRECISION,
  is_public BOOLEAN NOT NULL DEFAULT false,
  created_at TIMESTAMPTZ NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_job_templates_user_id ON job_templates(user_id, created_at DESC);
CREATE INDEX idx_job_templates_is_public ON job_templates(is_public);
CREATE TRIGGER job_templates_updated_at BEFORE UPDATE ON job_templates FOR EACH ROW EXECUTE FUNCTION set_updated_at();
