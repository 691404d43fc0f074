-- The agent protocol: telemetry, placement constraints, attempts with their recipe,
-- artifacts tied to attempts, and the key that signs download URLs.

ALTER TABLE agents ADD COLUMN capacity TEXT NOT NULL DEFAULT 'ondemand' CHECK (capacity IN ('spot', 'ondemand'));
ALTER TABLE agents ADD COLUMN host JSONB NOT NULL DEFAULT '{}';
ALTER TABLE agents ADD COLUMN current_attempt_id UUID;

CREATE TABLE agent_telemetry (
  id UUID PRIMARY KEY,
  agent_id UUID NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
  gpus JSONB NOT NULL,
  host JSONB NOT NULL,
  recorded_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_agent_telemetry_agent_recorded ON agent_telemetry(agent_id, recorded_at);

ALTER TABLE training_jobs ADD COLUMN required_labels JSONB NOT NULL DEFAULT '{}';

ALTER TABLE job_attempts ADD COLUMN recipe JSONB;
ALTER TABLE job_attempts ADD COLUMN interruption_provider TEXT;
ALTER TABLE job_attempts ADD COLUMN notice_seconds_used DOUBLE PRECISION;
ALTER TABLE job_attempts ADD COLUMN last_step BIGINT NOT NULL DEFAULT 0;
CREATE INDEX idx_job_attempts_job_status ON job_attempts(job_id, status);

ALTER TABLE model_artifacts ADD COLUMN attempt_id UUID REFERENCES job_attempts(id) ON DELETE SET NULL;
CREATE UNIQUE INDEX idx_model_artifacts_job_name ON model_artifacts(job_id, artifact_type, name);

ALTER TABLE checkpoints ADD COLUMN artifact_id UUID REFERENCES model_artifacts(id) ON DELETE CASCADE;

CREATE TABLE server_keys (
  name TEXT NOT NULL PRIMARY KEY,
  value TEXT NOT NULL,
  created_at TIMESTAMPTZ NOT NULL
);
