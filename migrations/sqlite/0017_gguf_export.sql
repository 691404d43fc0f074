-- GGUF export: a job may ask for its adapter in llama.cpp's GGUF format too (exports =
-- ["gguf"]); the agent writes it after training and uploads it as a 'gguf_adapter'.
-- Allowing that artifact type means rebuilding model_artifacts (SQLite cannot change a
-- CHECK constraint) with foreign keys off, which a migration's transaction cannot do:
-- `Db::migrate` does it after the migrations (db/sqlite_rebuild.rs).
ALTER TABLE training_jobs ADD COLUMN exports TEXT;
