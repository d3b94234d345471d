-- Placeholder for migration 006 (006_nodes.sql), which another branch adds (tern needs every
-- number from 1 up): delete this file when that branch's 006 is merged.
SELECT 1;

---- create above / drop below ----

SELECT 1;
