-- Budget increase requests (spec §4.2.11): someone who counts against a budget asks for a
-- larger amount with a reason; an admin approves (the budget's amount becomes the one
-- asked for) or denies, with a note. The row is the record of who asked, who decided,
-- when, and the amount before and after.
CREATE TABLE budget_increase_requests (
  id BLOB PRIMARY KEY,
  budget_id BLOB NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
  requested_by BLOB NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  current_amount REAL NOT NULL,
  requested_amount REAL NOT NULL CHECK (requested_amount >= 0),
  reason TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied')),
  decided_by BLOB REFERENCES users(id) ON DELETE SET NULL,
  decided_at TEXT,
  decision_note TEXT,
  created_at TEXT NOT NULL
);
CREATE INDEX idx_budget_increase_requests_status ON budget_increase_requests(status, created_at);
CREATE INDEX idx_budget_increase_requests_requester ON budget_increase_requests(requested_by, created_at);
