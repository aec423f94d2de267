-- A backend may be served at <subdomain>.<cluster>; its proxies route to it only there.
ALTER TABLE backend ADD COLUMN subdomain TEXT;
