-- The three system presets of the product spec (section 4.4), with fixed ids so every
-- installation and both backends name them the same way.
INSERT INTO hyperparameter_presets
  (id, name, description, icon, is_system, parameters, estimates, risk_level, success_rate,
   recommended_for, requires_completed_jobs, created_at, updated_at)
VALUES
  ('00000000-0000-4000-8000-000000000001', 'Conservative', 'Safe, proven configuration for first training runs', 'shield', true,
   '{"rank": 8, "learning_rate": 0.0001, "epochs": 2, "batch_size": 4, "gradient_accumulation_steps": 1}',
   '{"duration_hours_min": 8, "duration_hours_max": 10, "cost_spot_min": 25, "cost_spot_max": 30, "cost_ondemand_min": 80, "cost_ondemand_max": 120}',
   'low', 98.0, '["First training run", "High-quality seed data", "Budget-conscious", "Quick validation"]', 0, now(), now()),
  ('00000000-0000-4000-8000-000000000002', 'Balanced', 'Recommended for most production use cases', 'scales', true,
   '{"rank": 16, "learning_rate": 0.0002, "epochs": 3, "batch_size": 2, "gradient_accumulation_steps": 2}',
   '{"duration_hours_min": 12, "duration_hours_max": 15, "cost_spot_min": 50, "cost_spot_max": 60, "cost_ondemand_min": 120, "cost_ondemand_max": 140}',
   'medium', 96.0, '["Production models", "Proven reliability", "Standard datasets", "Client delivery"]', 0, now(), now()),
  ('00000000-0000-4000-8000-000000000003', 'Aggressive', 'Maximum quality for complex use cases', 'rocket', true,
   '{"rank": 32, "learning_rate": 0.0003, "epochs": 4, "batch_size": 1, "gradient_accumulation_steps": 4}',
   '{"duration_hours_min": 18, "duration_hours_max": 20, "cost_spot_min": 80, "cost_spot_max": 100, "cost_ondemand_min": 200, "cost_ondemand_max": 240}',
   'high', 92.0, '["Complex emotional intelligence", "Maximum quality", "Research/experimentation", "When budget allows"]', 3, now(), now());
