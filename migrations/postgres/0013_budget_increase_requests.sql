-- Budget increase requests (spec §4.2.11): someone who counts against a budget asks for a
-- larger amount with a reason; an admin approves (the budget's amount becomes the one
-- asked for) or denies, with a note. The row is the record of who asked, who decided,
-- when, and the amount before and after.
CREATE TABLE budget_increase_requests (
  id UUID PRIMARY KEY,
  budget_id UUID NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
  requested_by UUID NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  current_amount DOUBLE PRECISION NOT NULL,
  requested_amount DOUBLE PRECISION NOT NULL CHECK (requested_amount >= 0),
  reason TEXT NOT NULL,
  status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'approved', 'denied')),
  decided_by UUID REFERENCES users(id) ON DELETE SET NULL,
  decided_at TIMESTAMPTZ,
  decision_note TEXT,
  created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX idx_budget_increase_requests_status ON budget_increase_requests(status, created_at);
CREATE INDEX idx_budget_increase_requests_requester ON budget_increase_requests(requested_by, created_at);
