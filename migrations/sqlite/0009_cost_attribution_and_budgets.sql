-- Cost attribution and budgets (spec §4.2.10, §4.2.11). A job (and a template, for the
-- jobs made from it) carries its team, project, cost center and tags; its cost record copies them, with its owner and when its spend
-- was incurred (the job's first start), so reports and budgets aggregate cost records
-- alone. A budget is personal (its owner's jobs) or shared (an admin's, over everyone's
-- jobs of a team or project), and says what happens at its cap. Each alert is stored
-- once per budget, period and threshold, with what became of its webhook.
ALTER TABLE training_jobs ADD COLUMN team TEXT;
ALTER TABLE training_jobs ADD COLUMN project TEXT;
ALTER TABLE training_jobs ADD COLUMN cost_center TEXT;
ALTER TABLE training_jobs ADD COLUMN tags TEXT;
ALTER TABLE job_templates ADD COLUMN team TEXT;
ALTER TABLE job_templates ADD COLUMN project TEXT;
ALTER TABLE job_templates ADD COLUMN cost_center TEXT;
ALTER TABLE job_templates ADD COLUMN tags TEXT;

ALTER TABLE cost_tracking ADD COLUMN user_id BLOB REFERENCES users(id) ON DELETE CASCADE;
ALTER TABLE cost_tracking ADD COLUMN incurred_at TEXT;
UPDATE cost_tracking SET
  user_id = (SELECT user_id FROM training_jobs WHERE training_jobs.id = cost_tracking.job_id),
  incurred_at = (SELECT COALESCE(started_at, created_at) FROM training_jobs WHERE training_jobs.id = cost_tracking.job_id);
CREATE INDEX idx_cost_tracking_user_incurred ON cost_tracking(user_id, incurred_at);
CREATE INDEX idx_cost_tracking_incurred ON cost_tracking(incurred_at);

ALTER TABLE budgets ADD COLUMN scope TEXT NOT NULL DEFAULT 'personal' CHECK (scope IN ('personal', 'shared'));
ALTER TABLE budgets ADD COLUMN enforcement TEXT NOT NULL DEFAULT 'none' CHECK (enforcement IN ('none', 'block_start', 'stop_at_cap'));

CREATE TABLE budget_alerts (
  id BLOB PRIMARY KEY,
  budget_id BLOB NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
  period_start TEXT NOT NULL,
  threshold REAL NOT NULL,
  spend REAL NOT NULL,
  amount REAL NOT NULL,
  job_id BLOB REFERENCES training_jobs(id) ON DELETE SET NULL,
  created_at TEXT NOT NULL,
  -- The alert's webhook: NULL when none is configured, else sent or failed, after how
  -- many tries, and the last failure.
  webhook_status TEXT CHECK (webhook_status IN ('pending', 'sent', 'failed')),
  webhook_attempts INTEGER NOT NULL DEFAULT 0,
  webhook_error TEXT,
  UNIQUE (budget_id, period_start, threshold)
);
