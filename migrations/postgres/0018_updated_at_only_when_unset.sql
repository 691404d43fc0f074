-- The updated_at triggers run only when an UPDATE leaves updated_at as it was, as the
-- SQLite schema's do. Writers that set it themselves (the report path's job-progress and
-- attempt updates, once per agent report) then skip a PL/pgSQL call per row.
DO $$
DECLARE
  t TEXT[];
BEGIN
  FOREACH t SLICE 1 IN ARRAY ARRAY[
    ['users_updated_at', 'users'], ['agents_updated_at', 'agents'],
    ['training_files_updated_at', 'training_files'],
    ['presets_updated_at', 'hyperparameter_presets'],
    ['training_jobs_updated_at', 'training_jobs'], ['job_attempts_updated_at', 'job_attempts'],
    ['cost_tracking_updated_at', 'cost_tracking'], ['budgets_updated_at', 'budgets']]
  LOOP
    EXECUTE format('DROP TRIGGER %I ON %I', t[1], t[2]);
    EXECUTE format('CREATE TRIGGER %I BEFORE UPDATE ON %I FOR EACH ROW
                    WHEN (OLD.updated_at IS NOT DISTINCT FROM NEW.updated_at)
                    EXECUTE FUNCTION set_updated_at()', t[1], t[2]);
  END LOOP;
END;
$$;
