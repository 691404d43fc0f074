-- A conversation's tool definitions and a text record's text, beside its messages (which
-- stay an array: empty for a text record).
ALTER TABLE conversations ADD COLUMN tools JSONB;
ALTER TABLE conversations ADD COLUMN text TEXT;
