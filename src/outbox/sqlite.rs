//! The outbox table on SQLite (`outbox-sqlite`). SQLite has one writer at a time, so a claim's
//! `UPDATE ... RETURNING` needs no row locks.

use sqlx::{SqliteConnection, SqlitePool};

use super::Statements;

outbox_db!(
    SqlitePool,
    SqliteConnection,
    "CREATE TABLE IF NOT EXISTS speedlayer_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        scope TEXT NOT NULL DEFAULT '',
        targets TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        claim INTEGER NOT NULL DEFAULT 0,
        claimed_until_ms INTEGER NOT NULL DEFAULT 0
    )",
    Statements {
        insert: "INSERT INTO speedlayer_outbox (scope, targets, created_ms) VALUES (?, ?, ?)",
        claim: "UPDATE speedlayer_outbox SET claim = ?, claimed_until_ms = ?
             WHERE id IN (SELECT id FROM speedlayer_outbox WHERE scope = ? AND claimed_until_ms < ?
                          ORDER BY id LIMIT ?)
             RETURNING id, targets",
        delete: "DELETE FROM speedlayer_outbox WHERE id = ? AND claim = ?",
        release: "UPDATE speedlayer_outbox SET claim = 0, claimed_until_ms = 0 WHERE id = ? AND claim = ?",
    }
);
