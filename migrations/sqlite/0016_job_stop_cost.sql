-- stop_at_cap at step granularity. Heartbeats keep, on a running job, the job cost at
-- which its agent is asked to stop: where its tightest stop_at_cap budget runs out, less
-- what the stop itself costs (its checkpoint and uploads, as long as the job's latest
-- checkpoint took). Each report batch compares the job's fresh cost with it, so the stop
-- is asked for at a step, not at the next heartbeat.
ALTER TABLE training_jobs ADD COLUMN stop_cost REAL;
