-- Retention deletes by age (database.exec_log_retention,
-- database.sandbox_retention); without these they scan the tables.
CREATE INDEX IF NOT EXISTS idx_exec_logs_created ON exec_logs(created_at);
CREATE INDEX IF NOT EXISTS idx_sandboxes_state_updated ON sandboxes(state, updated_at);
