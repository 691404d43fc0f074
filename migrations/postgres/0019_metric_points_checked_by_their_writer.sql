-- Agents' metric points are written by the report statement
-- (db::attempts::store_reports_postgres), and only when that statement has updated, and
-- so locked, their job's row while the job runs their attempt; jobs and attempts are
-- never deleted. The two foreign keys checked that again for every point, two SPI
-- queries a row and a quarter of the statement's time at one point per report; they go.
-- (Deleting a job by hand no longer cascades to its points: delete those first.)
ALTER TABLE training_metrics DROP CONSTRAINT training_metrics_job_id_fkey;
ALTER TABLE training_metrics DROP CONSTRAINT training_metrics_attempt_id_fkey;
