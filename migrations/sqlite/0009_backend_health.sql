-- A ready backend's health as its drone's checks see it: a status entry with the same
-- status (`ready`) and `health` set records each change, in sequence like any other.
ALTER TABLE backend_status ADD COLUMN health TEXT;
