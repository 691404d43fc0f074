-- Estimates from measured throughput (stage 7). Enrichment counts each conversation's
-- tokens (estimated from characters: the control plane has no tokenizer) and keeps, per
-- file, the sums a run sees at each usual max_seq_len. A finished attempt keeps the
-- tokens/s its trainer measured, which later estimates for the same base model and GPU
-- model use. A job keeps what its estimate rested on.
ALTER TABLE conversations ADD COLUMN token_count INTEGER;
ALTER TABLE training_files ADD COLUMN token_counts JSONB;
ALTER TABLE job_attempts ADD COLUMN tokens_per_second DOUBLE PRECISION;
ALTER TABLE training_jobs ADD COLUMN estimate_basis JSONB;
CREATE INDEX idx_training_jobs_model_gpu ON training_jobs(base_model, gpu_model);

-- Files enriched before this: counted from the stored rows (their JSON, a slight overcount).
UPDATE conversations SET token_count = (LENGTH(messages::text) + LENGTH(COALESCE(text, '')) + 3) / 4;
UPDATE training_files SET token_counts = (
  SELECT jsonb_build_object('total', COALESCE(SUM(token_count), 0), 'truncated', jsonb_build_object(
    '128', COALESCE(SUM(LEAST(token_count, 128)), 0),
    '256', COALESCE(SUM(LEAST(token_count, 256)), 0),
    '512', COALESCE(SUM(LEAST(token_count, 512)), 0),
    '1024', COALESCE(SUM(LEAST(token_count, 1024)), 0),
    '2048', COALESCE(SUM(LEAST(token_count, 2048)), 0),
    '4096', COALESCE(SUM(LEAST(token_count, 4096)), 0),
    '8192', COALESCE(SUM(LEAST(token_count, 8192)), 0),
    '16384', COALESCE(SUM(LEAST(token_count, 16384)), 0),
    '32768', COALESCE(SUM(LEAST(token_count, 32768)), 0)))
  FROM conversations WHERE conversations.training_file_id = training_files.id)
WHERE enrichment_status = 'completed';
