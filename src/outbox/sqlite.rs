//! The outbox table on SQLite (`outbox-sqlite`). SQLite has one writer at a time, so a claim's
//! `UPDATE ... RETURNING` needs no row locks.

use sqlx::{SqliteConnection, SqlitePool};

use super::{OutboxDb, db_error};
use crate::error::Result;

impl OutboxDb for SqlitePool {
    type Connection = SqliteConnection;
    const CREATE: &'static str = "CREATE TABLE IF NOT EXISTS speedlayer_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        scope TEXT NOT NULL DEFAULT '',
        targets TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        claim INTEGER NOT NULL DEFAULT 0,
        claimed_until_ms INTEGER NOT NULL DEFAULT 0
    )";

    async fn insert(
        conn: &mut SqliteConnection,
        scope: &str,
        targets: &str,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO speedlayer_outbox (scope, targets, created_ms) VALUES (?, ?, ?)")
            .bind(scope)
            .bind(targets)
            .bind(now_ms)
            .execute(conn)
            .await
            .map(|_| ())
            .map_err(db_error)
    }

    async fn claim(
        &self,
        scope: &str,
        claim: i64,
        now_ms: i64,
        until_ms: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>> {
        sqlx::query_as(
            "UPDATE speedlayer_outbox SET claim = ?, claimed_until_ms = ?
             WHERE id IN (SELECT id FROM speedlayer_outbox WHERE scope = ? AND claimed_until_ms < ?
                          ORDER BY id LIMIT ?)
             RETURNING id, targets",
        )
        .bind(claim)
        .bind(until_ms)
        .bind(scope)
        .bind(now_ms)
        .bind(limit)
        .fetch_all(self)
        .await
        .map_err(db_error)
    }

    async fn delete(&self, id: i64, claim: i64) -> Result<()> {
        sqlx::query("DELETE FROM speedlayer_outbox WHERE id = ? AND claim = ?")
            .bind(id)
            .bind(claim)
            .execute(self)
            .await
            .map(|_| ())
            .map_err(db_error)
    }

    async fn release(&self, id: i64, claim: i64) -> Result<()> {
        sqlx::query(
            "UPDATE speedlayer_outbox SET claim = 0, claimed_until_ms = 0 WHERE id = ? AND claim = ?",
        )
        .bind(id)
        .bind(claim)
        .execute(self)
        .await
        .map(|_| ())
        .map_err(db_error)
    }

    async fn depth(&self) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM speedlayer_outbox")
            .fetch_one(self)
            .await
            .map_err(db_error)
    }

    async fn create(&self) -> Result<()> {
        sqlx::query(Self::CREATE)
            .execute(self)
            .await
            .map(|_| ())
            .map_err(db_error)
    }
}
