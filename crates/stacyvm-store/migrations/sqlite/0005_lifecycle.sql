-- Idle timeouts (docs/api.md): how long a sandbox may go without
-- activity, what a timeout does (kill or pause), and when the idle timeout
-- falls due (moved on as activity is seen).
ALTER TABLE sandboxes ADD COLUMN idle_timeout_secs INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT NOT NULL DEFAULT '';
ALTER TABLE sandboxes ADD COLUMN idle_deadline TEXT NOT NULL DEFAULT '1970-01-01T00:00:00.000000000Z';
CREATE INDEX IF NOT EXISTS idx_sandboxes_idle ON sandboxes(idle_deadline) WHERE idle_timeout_secs > 0;
-- Templates that act: files written into a sandbox spawned from one.
ALTER TABLE templates ADD COLUMN files TEXT NOT NULL DEFAULT '{}';
