-- stop_at_cap (spec §4.2.11): a running job that takes a stop_at_cap budget past its
-- amount is asked to stop. The request is kept on the job ('budget_cap') until its agent
-- has checkpointed, published the adapter as of that checkpoint and ended the attempt;
-- the job then ends cancelled with that reason, whatever way the attempt ended.
ALTER TABLE training_jobs ADD COLUMN stop_requested TEXT CHECK (stop_requested IN ('budget_cap'));
