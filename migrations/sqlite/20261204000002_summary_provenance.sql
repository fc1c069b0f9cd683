-- What made each summary, so an unchanged trial set can reuse it (issue: skip unchanged) and a cut
-- summary can be flagged: the prompt or format version, prompt-cache token counts, and the job whose
-- summary was reused instead of calling the model again.
ALTER TABLE tm_summaries ADD COLUMN prompt_version TEXT NOT NULL DEFAULT '';
ALTER TABLE tm_summaries ADD COLUMN cache_creation_tokens INTEGER;
ALTER TABLE tm_summaries ADD COLUMN cache_read_tokens INTEGER;
ALTER TABLE tm_summaries ADD COLUMN reused_from_job TEXT;
CREATE INDEX tm_summaries_reuse ON tm_summaries (lower(mutation), summarizer, prompt_version, created_at);
