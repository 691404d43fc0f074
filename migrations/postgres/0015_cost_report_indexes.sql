-- The costliest jobs of a report are found in an index alone: owner (or time, for reports
-- over everyone's spend), time, attribution, cost and job, so the records' rows are read
-- only for the jobs listed. The single-column team and project indexes led the planner to
-- read every user's records of a team to find one user's.
DROP INDEX idx_cost_tracking_team;
DROP INDEX idx_cost_tracking_project;
DROP INDEX idx_cost_tracking_user_incurred;
DROP INDEX idx_cost_tracking_incurred;
CREATE INDEX idx_cost_tracking_user_report ON cost_tracking(user_id, incurred_at, team, project, cost_center, total_cost, job_id);
-- A team's reports (shared budgets are mostly by team) start from the owner's team.
CREATE INDEX idx_cost_tracking_user_team ON cost_tracking(user_id, team, incurred_at, total_cost, job_id);
CREATE INDEX idx_cost_tracking_report ON cost_tracking(incurred_at, team, project, cost_center, user_id, total_cost, job_id);
-- The jobs running now, for reports: those with an attempt that has not ended.
CREATE INDEX idx_job_attempts_open ON job_attempts(job_id) WHERE ended_at IS NULL;
