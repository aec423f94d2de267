-- Whether a drone's container engine can limit a container's disk (its storage driver
-- supports `--storage-opt size`); a spawn with `disk_limit_bytes` is placed only on such a
-- drone. 1 = it can. Set from each drone's hello.
ALTER TABLE node ADD COLUMN disk_limits BIGINT NOT NULL DEFAULT 0;
