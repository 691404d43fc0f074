-- GGUF export: a job may ask for its adapter in llama.cpp's GGUF format too (exports =
-- ["gguf"]); the agent writes it after training and uploads it as a 'gguf_adapter'.
ALTER TABLE training_jobs ADD COLUMN exports JSONB;
ALTER TABLE model_artifacts DROP CONSTRAINT model_artifacts_artifact_type_check;
ALTER TABLE model_artifacts ADD CONSTRAINT model_artifacts_artifact_type_check CHECK (artifact_type IN
  ('final_model', 'checkpoint', 'adapter_weights', 'training_report', 'metrics_export', 'validation_report', 'gguf_adapter'));
