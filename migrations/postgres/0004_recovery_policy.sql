-- Recovery policy set by users: whether an interruption resumes on its own, and the
-- policy a template or preset carries to the jobs made from it (NULL: the defaults).

ALTER TABLE training_jobs ADD COLUMN auto_resume BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE job_templates ADD COLUMN recovery JSONB;
ALTER TABLE hyperparameter_presets ADD COLUMN recovery JSONB;
