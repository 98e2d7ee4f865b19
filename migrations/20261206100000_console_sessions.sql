-- The operator console's sessions (src/console). A row per signed-in browser: the SHA-256
-- of the session cookie's value (the value itself is never stored), the token its forms
-- carry against cross-site requests, and when it ends. Signing out deletes the row; rows
-- past their end are deleted at the next sign-in.
CREATE TABLE console_sessions (
    id bytea PRIMARY KEY,
    csrf text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_sessions_expires_idx ON console_sessions (expires_at);
