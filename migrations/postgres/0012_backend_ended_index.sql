-- The overview lists backends that ended in the last hour: terminated ones by when they ended.
CREATE INDEX backend_by_end ON backend (status_number, status_time);
