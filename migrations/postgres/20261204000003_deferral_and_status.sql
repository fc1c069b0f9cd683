-- Circuit-breaker deferrals: a job put back because its service refuses calls keeps its attempts;
-- deferred_since bounds how long that may go on. Node metrics gain the HTTP status of a failed call.
ALTER TABLE tm_jobs ADD COLUMN deferred_since TIMESTAMPTZ;
ALTER TABLE tm_jobs ADD COLUMN deferred_reason TEXT;
ALTER TABLE tm_node_metrics ADD COLUMN http_status BIGINT;
