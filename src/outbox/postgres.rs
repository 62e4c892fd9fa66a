//! The outbox table on PostgreSQL (`outbox-postgres`). A claim locks the rows it takes with
//! `FOR UPDATE SKIP LOCKED`: relays running at once take disjoint batches.

use sqlx::{PgConnection, PgPool};

use super::Statements;

outbox_db!(
    PgPool,
    PgConnection,
    "CREATE TABLE IF NOT EXISTS speedlayer_outbox (
        id BIGSERIAL PRIMARY KEY,
        scope TEXT NOT NULL DEFAULT '',
        targets TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        claim BIGINT NOT NULL DEFAULT 0,
        claimed_until_ms BIGINT NOT NULL DEFAULT 0
    )",
    Statements {
        insert: "INSERT INTO speedlayer_outbox (scope, targets, created_ms) VALUES ($1, $2, $3)",
        claim: "UPDATE speedlayer_outbox SET claim = $1, claimed_until_ms = $2
             WHERE id IN (SELECT id FROM speedlayer_outbox WHERE scope = $3 AND claimed_until_ms < $4
                          ORDER BY id LIMIT $5 FOR UPDATE SKIP LOCKED)
             RETURNING id, targets",
        delete: "DELETE FROM speedlayer_outbox WHERE id = $1 AND claim = $2",
        release: "UPDATE speedlayer_outbox SET claim = 0, claimed_until_ms = 0 WHERE id = $1 AND claim = $2",
    }
);
