-- --max-backends-per-namespace counts a namespace's live backends at every keyed spawn.
CREATE INDEX backend_by_namespace ON backend (key_namespace, status_number);
