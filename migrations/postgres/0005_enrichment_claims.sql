-- Each enrichment run claims its file with a token and tags the conversations it stores,
-- so a run that lost its claim (its server was slow, not dead) can neither finish the file
-- nor leave rows that count twice.

ALTER TABLE training_files ADD COLUMN enrichment_claim UUID;
ALTER TABLE conversations ADD COLUMN enrichment_claim UUID;
