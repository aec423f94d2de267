-- token_by_backend_user (backend_id, username) serves every lookup by backend_id too, and one
-- index fewer is one page fewer to write per batch of tokens.
DROP INDEX token_by_backend;
