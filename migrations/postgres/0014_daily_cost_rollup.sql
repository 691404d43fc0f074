-- Cost reports over long ranges read a daily rollup of the cost records instead of every
-- record: one row per owner, UTC day (YYYY-MM-DD, when the spend was incurred) and
-- attribution ('' for none), with the sums and the number of jobs. Each write of a cost
-- record moves its contribution in the same transaction; the hourly storage refresh
-- rebuilds it. Running jobs still count with their live cost, added at query time.
CREATE TABLE cost_daily (
  user_id UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  day TEXT NOT NULL,
  team TEXT NOT NULL,
  project TEXT NOT NULL,
  cost_center TEXT NOT NULL,
  total_cost DOUBLE PRECISION NOT NULL,
  compute_cost DOUBLE PRECISION NOT NULL,
  storage_cost DOUBLE PRECISION NOT NULL,
  network_cost DOUBLE PRECISION NOT NULL,
  gpu_hours DOUBLE PRECISION NOT NULL,
  spot_savings DOUBLE PRECISION NOT NULL,
  job_count BIGINT NOT NULL,
  PRIMARY KEY (user_id, day, team, project, cost_center)
);
CREATE INDEX idx_cost_daily_day ON cost_daily(day);

INSERT INTO cost_daily (user_id, day, team, project, cost_center, total_cost, compute_cost,
                        storage_cost, network_cost, gpu_hours, spot_savings, job_count)
SELECT user_id, to_char(incurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), COALESCE(team, ''), COALESCE(project, ''), COALESCE(cost_center, ''),
       SUM(total_cost), SUM(compute_cost), SUM(storage_cost), SUM(network_cost),
       SUM(COALESCE(gpu_hours, 0)), SUM(spot_savings), COUNT(*)
  FROM cost_tracking WHERE user_id IS NOT NULL AND incurred_at IS NOT NULL
 GROUP BY 1, 2, 3, 4, 5;
