-- Schema for SQLite. migrations/postgres/ holds the same schema in PostgreSQL's dialect:
-- every table, column, constraint and index exists in both (checked by tests/schema_parity).
-- Status-like columns are TEXT with CHECK constraints (not enum types) so both backends
-- enforce the same value sets and decode to the same Rust types.

CREATE TABLE users (
  id BLOB PRIMARY KEY,
  email TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL,
  display_name TEXT,
  avatar_url TEXT,
  role TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'operator', 'admin')),
  organization_id BLOB,
  preferences TEXT NOT NULL DEFAULT '{}',
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE TRIGGER users_updated_at AFTER UPDATE ON users FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE users SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE sessions (
  id BLOB PRIMARY KEY,
  user_id BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  token_hash TEXT NOT NULL UNIQUE,
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL
);
CREATE INDEX idx_sessions_user_id ON sessions(user_id);

CREATE TABLE api_tokens (
  id BLOB PRIMARY KEY,
  user_id BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  token_hash TEXT NOT NULL UNIQUE,
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  last_used_at TEXT,
  revoked_at TEXT
);
CREATE INDEX idx_api_tokens_user_id ON api_tokens(user_id);

CREATE TABLE enrollment_tokens (
  id BLOB PRIMARY KEY,
  token_hash TEXT NOT NULL UNIQUE,
  created_at TEXT NOT NULL,
  expires_at TEXT NOT NULL,
  use_count INTEGER NOT NULL DEFAULT 0,
  revoked_at TEXT
);

CREATE TABLE agents (
  id BLOB PRIMARY KEY,
  name TEXT NOT NULL,
  labels TEXT NOT NULL DEFAULT '{}',
  gpus TEXT NOT NULL DEFAULT '[]',
  secret_hash TEXT NOT NULL UNIQUE,
  enrollment_token_id BLOB REFERENCES enrollment_tokens(id) ON DELETE SET NULL,
  status TEXT NOT NULL DEFAULT 'online' CHECK (status IN ('online', 'offline', 'draining')),
  last_heartbeat_at TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX idx_agents_status ON agents(status);
CREATE TRIGGER agents_updated_at AFTER UPDATE ON agents FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE agents SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE training_files (
  id BLOB PRIMARY KEY,
  user_id BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  description TEXT,
  file_path TEXT NOT NULL,
  file_size INTEGER NOT NULL,
  mime_type TEXT,
  file_format TEXT,
  sha256 TEXT NOT NULL,
  conversation_count INTEGER NOT NULL DEFAULT 0,
  training_pairs_count INTEGER NOT NULL DEFAULT 0,
  average_quality_score REAL,
  quality_scores TEXT NOT NULL DEFAULT '{}',
  scaffolding_distribution TEXT NOT NULL DEFAULT '{}',
  human_review TEXT NOT NULL DEFAULT '{}',
  status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'archived', 'deleted')),
  enrichment_status TEXT NOT NULL DEFAULT 'pending' CHECK (enrichment_status IN ('pending', 'processing', 'completed', 'failed')),
  enrichment_error TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  last_enriched_at TEXT,
  deleted_at TEXT
);
CREATE INDEX idx_training_files_user_created ON training_files(user_id, created_at DESC);
CREATE INDEX idx_training_files_status ON training_files(status);
CREATE INDEX idx_training_files_enrichment_status ON training_files(enrichment_status);
CREATE TRIGGER training_files_updated_at AFTER UPDATE ON training_files FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE training_files SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE conversations (
  id BLOB PRIMARY KEY,
  training_file_id BLOB NOT NULL REFERENCES training_files(id) ON DELETE CASCADE,
  line_number INTEGER NOT NULL,
  persona TEXT,
  emotional_arc TEXT,
  topic TEXT,
  quality_score REAL,
  human_reviewed BOOLEAN,
  messages TEXT NOT NULL,
  metadata TEXT,
  created_at TEXT NOT NULL
);
CREATE INDEX idx_conversations_file_quality ON conversations(training_file_id, quality_score DESC);

CREATE TABLE hyperparameter_presets (
  id BLOB PRIMARY KEY,
  name TEXT NOT NULL,
  description TEXT,
  icon TEXT,
  is_system BOOLEAN NOT NULL DEFAULT 0,
  parameters TEXT NOT NULL,
  estimates TEXT NOT NULL,
  risk_level TEXT NOT NULL DEFAULT 'medium' CHECK (risk_level IN ('low', 'medium', 'high')),
  success_rate REAL,
  completed_jobs INTEGER NOT NULL DEFAULT 0,
  requires_completed_jobs INTEGER NOT NULL DEFAULT 0,
  recommended_for TEXT NOT NULL DEFAULT '[]',
  created_by BLOB REFERENCES users(id) ON DELETE CASCADE,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE UNIQUE INDEX idx_presets_system_name ON hyperparameter_presets(name) WHERE is_system;
CREATE INDEX idx_presets_created_by ON hyperparameter_presets(created_by);
CREATE TRIGGER presets_updated_at AFTER UPDATE ON hyperparameter_presets FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE hyperparameter_presets SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE training_jobs (
  id BLOB PRIMARY KEY,
  user_id BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  description TEXT,
  base_model TEXT NOT NULL,
  training_file_id BLOB NOT NULL REFERENCES training_files(id) ON DELETE RESTRICT,
  preset_id BLOB REFERENCES hyperparameter_presets(id),
  gpu_type TEXT CHECK (gpu_type IN ('spot', 'ondemand')),
  gpu_model TEXT,
  hyperparameters TEXT,
  status TEXT NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'configured', 'queued', 'provisioning', 'training', 'interrupted', 'completed', 'failed', 'cancelled')),
  progress_percentage INTEGER NOT NULL DEFAULT 0 CHECK (progress_percentage BETWEEN 0 AND 100),
  current_step INTEGER NOT NULL DEFAULT 0,
  total_steps INTEGER,
  current_epoch INTEGER NOT NULL DEFAULT 0,
  total_epochs INTEGER,
  current_stage TEXT,
  stage_substatus TEXT,
  queued_at TEXT,
  estimated_start_time TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  started_at TEXT,
  completed_at TEXT,
  elapsed_seconds INTEGER NOT NULL DEFAULT 0,
  estimated_remaining_seconds INTEGER,
  current_cost REAL NOT NULL DEFAULT 0,
  estimated_cost_min REAL,
  estimated_cost_max REAL,
  estimated_duration_hours_min REAL,
  estimated_duration_hours_max REAL,
  hourly_rate REAL,
  final_cost REAL,
  error_message TEXT,
  failed_stage TEXT,
  cancelled_reason TEXT,
  cancelled_at TEXT,
  retry_count INTEGER NOT NULL DEFAULT 0,
  max_retries INTEGER NOT NULL DEFAULT 3,
  interruption_count INTEGER NOT NULL DEFAULT 0,
  max_interruptions INTEGER NOT NULL DEFAULT 5,
  resume_from_checkpoint_id BLOB,
  agent_id BLOB REFERENCES agents(id) ON DELETE SET NULL,
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
CREATE TRIGGER training_jobs_updated_at AFTER UPDATE ON training_jobs FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE training_jobs SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE checkpoints (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  attempt_id BLOB,
  step INTEGER NOT NULL,
  epoch INTEGER,
  storage_path TEXT NOT NULL,
  size_bytes INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  created_at TEXT NOT NULL,
  UNIQUE (job_id, step)
);

CREATE TABLE job_attempts (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  agent_id BLOB REFERENCES agents(id) ON DELETE SET NULL,
  attempt_number INTEGER NOT NULL,
  status TEXT NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'succeeded', 'failed', 'interrupted', 'cancelled', 'lost')),
  resumed_from_checkpoint_id BLOB REFERENCES checkpoints(id) ON DELETE SET NULL,
  resumed_from_step INTEGER,
  gpu_type TEXT CHECK (gpu_type IN ('spot', 'ondemand')),
  hourly_rate REAL,
  cost REAL NOT NULL DEFAULT 0,
  error_message TEXT,
  notice_deadline TEXT,
  started_at TEXT NOT NULL,
  ended_at TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  UNIQUE (job_id, attempt_number)
);
CREATE INDEX idx_job_attempts_agent_id ON job_attempts(agent_id);
CREATE TRIGGER job_attempts_updated_at AFTER UPDATE ON job_attempts FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE job_attempts SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE training_metrics (
  id BLOB PRIMARY KEY,
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
  UNIQUE (job_id, step)
);
CREATE INDEX idx_training_metrics_recorded_at ON training_metrics(recorded_at);

CREATE TABLE event_logs (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  attempt_id BLOB REFERENCES job_attempts(id) ON DELETE SET NULL,
  event_type TEXT NOT NULL CHECK (event_type IN ('status', 'metrics', 'warning', 'error', 'checkpoint', 'info')),
  severity TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'error', 'critical')),
  message TEXT NOT NULL,
  details TEXT,
  source TEXT,
  idempotency_key TEXT,
  created_at TEXT NOT NULL,
  UNIQUE (job_id, idempotency_key)
);
CREATE INDEX idx_event_logs_job_created ON event_logs(job_id, created_at);
CREATE INDEX idx_event_logs_event_type ON event_logs(event_type);

CREATE TABLE model_artifacts (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  artifact_type TEXT NOT NULL CHECK (artifact_type IN ('final_model', 'checkpoint', 'adapter_weights', 'training_report', 'metrics_export', 'validation_report')),
  name TEXT NOT NULL,
  description TEXT,
  file_path TEXT NOT NULL,
  file_size INTEGER NOT NULL,
  mime_type TEXT,
  checksum TEXT,
  version TEXT,
  epoch INTEGER,
  step INTEGER,
  metrics TEXT,
  download_count INTEGER NOT NULL DEFAULT 0,
  last_downloaded_at TEXT,
  created_at TEXT NOT NULL
);
CREATE INDEX idx_model_artifacts_job_id ON model_artifacts(job_id, created_at);
CREATE INDEX idx_model_artifacts_type ON model_artifacts(artifact_type);

CREATE TABLE validation_results (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  overall_status TEXT NOT NULL CHECK (overall_status IN ('production_ready', 'review_required', 'blocked')),
  overall_score REAL,
  perplexity_results TEXT,
  emotional_intelligence_results TEXT,
  knowledge_retention_results TEXT,
  voice_consistency_results TEXT,
  passed_gates TEXT NOT NULL DEFAULT '[]',
  failed_gates TEXT NOT NULL DEFAULT '[]',
  warning_gates TEXT NOT NULL DEFAULT '[]',
  recommendations TEXT,
  created_at TEXT NOT NULL,
  validation_completed_at TEXT
);
CREATE INDEX idx_validation_results_job_id ON validation_results(job_id, created_at);
CREATE INDEX idx_validation_results_status ON validation_results(overall_status);

CREATE TABLE cost_tracking (
  id BLOB PRIMARY KEY,
  job_id BLOB NOT NULL REFERENCES training_jobs(id) ON DELETE CASCADE,
  compute_cost REAL NOT NULL DEFAULT 0,
  storage_cost REAL NOT NULL DEFAULT 0,
  network_cost REAL NOT NULL DEFAULT 0,
  total_cost REAL NOT NULL DEFAULT 0,
  gpu_hours REAL,
  spot_savings REAL NOT NULL DEFAULT 0,
  team TEXT,
  project TEXT,
  cost_center TEXT,
  tags TEXT,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX idx_cost_tracking_job_id ON cost_tracking(job_id);
CREATE INDEX idx_cost_tracking_team ON cost_tracking(team);
CREATE INDEX idx_cost_tracking_project ON cost_tracking(project);
CREATE TRIGGER cost_tracking_updated_at AFTER UPDATE ON cost_tracking FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE cost_tracking SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE budgets (
  id BLOB PRIMARY KEY,
  user_id BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  amount REAL NOT NULL CHECK (amount >= 0),
  period TEXT NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly', 'quarterly', 'annual')),
  alert_threshold REAL NOT NULL DEFAULT 80,
  alert_enabled BOOLEAN NOT NULL DEFAULT 1,
  current_spend REAL NOT NULL DEFAULT 0,
  team TEXT,
  project TEXT,
  cost_center TEXT,
  is_active BOOLEAN NOT NULL DEFAULT 1,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL,
  period_start TEXT,
  period_end TEXT
);
CREATE INDEX idx_budgets_user_active ON budgets(user_id, is_active);
CREATE TRIGGER budgets_updated_at AFTER UPDATE ON budgets FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE budgets SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;

CREATE TABLE job_templates (
  id BLOB PRIMARY KEY,
  user_id BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  name TEXT NOT NULL,
  description TEXT,
  icon TEXT,
  preset_id BLOB REFERENCES hyperparameter_presets(id),
  hyperparameters TEXT,
  gpu_type TEXT CHECK (gpu_type IN ('spot', 'ondemand')),
  gpu_model TEXT,
  base_model TEXT,
  source_job_id BLOB REFERENCES training_jobs(id) ON DELETE SET NULL,
  use_count INTEGER NOT NULL DEFAULT 0,
  success_rate REAL,
  avg_cost REAL,
  avg_duration_hours REAL,
  is_public BOOLEAN NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE INDEX idx_job_templates_user_id ON job_templates(user_id, created_at DESC);
CREATE INDEX idx_job_templates_is_public ON job_templates(is_public);
CREATE TRIGGER job_templates_updated_at AFTER UPDATE ON job_templates FOR EACH ROW WHEN NEW.updated_at = OLD.updated_at
BEGIN UPDATE job_templates SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = NEW.id; END;
