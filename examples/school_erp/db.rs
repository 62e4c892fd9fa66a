//! The source of truth: SQLite (embedded, a file in the temporary directory) by default, or
//! PostgreSQL when `DATABASE_URL=postgres://…` is set. Both run the same SQL through sqlx's `Any`
//! driver; only the seeded schema's auto-increment column differs. Every query is counted, so the
//! report can show what the cache saved.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// Size of the seeded school.
#[derive(Clone, Copy, Debug)]
pub struct SchoolSize {
    pub students: i64,
    pub teachers: i64,
    /// Days of attendance recorded per student.
    pub days: i64,
}

impl Default for SchoolSize {
    fn default() -> Self {
        SchoolSize {
            students: 10_000,
            teachers: 400,
            days: 10,
        }
    }
}

/// Fee plans: (id, name, yearly amount in cents).
const FEE_PLANS: [(i64, &str, i64); 4] = [
    (1, "day scholar", 120_000),
    (2, "day scholar with transport", 150_000),
    (3, "boarder", 380_000),
    (4, "scholarship", 30_000),
];

/// Which database runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

impl DbKind {
    pub fn name(self) -> &'static str {
        match self {
            DbKind::Sqlite => "SQLite",
            DbKind::Postgres => "PostgreSQL",
        }
    }
}

/// A user's role as the database knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRecord {
    /// `student`, `parent`, `teacher`, `admin`, or `suspended` (an inactive student).
    pub role: String,
    /// What the user's data is about: a student's own id, a parent's child's student id, a
    /// teacher's class id (the admin's own id).
    pub ref_id: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeeSummary {
    pub student_id: i64,
    pub student_name: String,
    pub plan: String,
    pub due_cents: i64,
    pub paid_cents: i64,
    pub balance_cents: i64,
    pub payments: i64,
    /// The student's profile version (the summary shows the name).
    pub profile_version: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudentProfile {
    pub id: i64,
    pub name: String,
    pub phone: String,
    pub class_id: i64,
    pub class_name: String,
    pub teacher_name: String,
    /// Incremented by every profile update.
    pub version: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attendance {
    pub days: i64,
    pub present: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub student_id: i64,
    pub name: String,
    pub version: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassOverview {
    pub class_id: i64,
    pub class_name: String,
    pub teacher_name: String,
    pub roster: Vec<RosterEntry>,
}

/// A class and the ids of its active students.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassMembers {
    pub class_id: i64,
    pub class_name: String,
    pub teacher_name: String,
    pub student_ids: Vec<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchoolTotals {
    pub students: i64,
    pub teachers: i64,
    pub payments: i64,
    pub collected_cents: i64,
}

/// A profile update as the API receives it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ProfileUpdate {
    pub name: String,
    pub phone: String,
    #[serde(default = "yes")]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// What a profile update changed.
#[derive(Clone, Copy, Debug)]
pub struct ProfileUpdated {
    pub version: i64,
    pub class_id: i64,
}

/// The database, with a count of the queries run on it.
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
    queries: AtomicU64,
    /// The SQLite file, removed when the database is closed or dropped.
    file: Option<PathBuf>,
}

pub type DbResult<T> = Result<T, sqlx::Error>;

impl Db {
    /// Opens `url` (a `postgres://` URL), or a new SQLite file when `url` is `None`, and creates
    /// and seeds the school's tables. On PostgreSQL the demo's own tables (all prefixed `erp_`)
    /// are dropped and created again; nothing else is touched.
    pub async fn open(url: Option<&str>, size: SchoolSize) -> DbResult<Db> {
        sqlx::any::install_default_drivers();
        let (kind, url, file) = match url {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                (DbKind::Postgres, url.to_owned(), None)
            }
            Some(other) => {
                return Err(sqlx::Error::Configuration(
                    format!(
                        "DATABASE_URL must be a postgres:// URL (got a URL starting {:?}); unset it for the embedded SQLite database",
                        other.split(':').next().unwrap_or_default()
                    )
                    .into(),
                ));
            }
            None => {
                let file = std::env::temp_dir().join(format!(
                    "speedlayer-school-erp-{}-{}.db",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                let url = format!("sqlite://{}?mode=rwc", file.display());
                (DbKind::Sqlite, url, Some(file))
            }
        };
        let db = Db::connect(kind, &url, file).await?;
        db.create_and_seed(size).await?;
        Ok(db)
    }

    /// Another instance's handle on a database [`Db::open`] created and seeded: `target` is the
    /// PostgreSQL URL or the SQLite file ([`Db::target`]). Nothing is seeded, and the file is
    /// left to its creator.
    pub async fn attach(target: &str) -> DbResult<Db> {
        sqlx::any::install_default_drivers();
        if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            Db::connect(DbKind::Postgres, target, None).await
        } else {
            Db::connect(DbKind::Sqlite, &format!("sqlite://{target}"), None).await
        }
    }

    /// What [`Db::attach`] takes to open this database from another process.
    pub fn target(&self, url: Option<&str>) -> String {
        match (&self.file, url) {
            (Some(file), _) => file.display().to_string(),
            (None, Some(url)) => url.to_owned(),
            (None, None) => String::new(),
        }
    }

    async fn connect(kind: DbKind, url: &str, file: Option<PathBuf>) -> DbResult<Db> {
        let pool = AnyPoolOptions::new()
            .max_connections(match kind {
                DbKind::Sqlite => 8,
                DbKind::Postgres => 16,
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        // Readers do not block the writer; a writer waits for the lock.
                        sqlx::query("PRAGMA journal_mode = WAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(url)
            .await?;
        Ok(Db {
            pool,
            kind,
            queries: AtomicU64::new(0),
            file,
        })
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }

    /// Queries run since the seed.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    fn count(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
    }

    async fn create_and_seed(&self, size: SchoolSize) -> DbResult<()> {
        let serial = match self.kind {
            DbKind::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            DbKind::Postgres => "BIGSERIAL PRIMARY KEY",
        };
        let statements = [
            "DROP TABLE IF EXISTS erp_sessions".to_owned(),
            "DROP TABLE IF EXISTS erp_roll_marks".to_owned(),
            "DROP TABLE IF EXISTS erp_flushed_batches".to_owned(),
            "DROP TABLE IF EXISTS erp_notifications".to_owned(),
            "DROP TABLE IF EXISTS erp_requests".to_owned(),
            "DROP TABLE IF EXISTS erp_attendance".to_owned(),
            "DROP TABLE IF EXISTS erp_payments".to_owned(),
            "DROP TABLE IF EXISTS erp_users".to_owned(),
            "DROP TABLE IF EXISTS erp_parents".to_owned(),
            "DROP TABLE IF EXISTS erp_students".to_owned(),
            "DROP TABLE IF EXISTS erp_classes".to_owned(),
            "DROP TABLE IF EXISTS erp_teachers".to_owned(),
            "DROP TABLE IF EXISTS erp_fee_plans".to_owned(),
            "CREATE TABLE erp_teachers (id BIGINT PRIMARY KEY, name TEXT NOT NULL)".to_owned(),
            "CREATE TABLE erp_classes (id BIGINT PRIMARY KEY, name TEXT NOT NULL, teacher_id BIGINT NOT NULL)".to_owned(),
            "CREATE TABLE erp_fee_plans (id BIGINT PRIMARY KEY, name TEXT NOT NULL, amount_cents BIGINT NOT NULL)".to_owned(),
            "CREATE TABLE erp_students (id BIGINT PRIMARY KEY, name TEXT NOT NULL, phone TEXT NOT NULL, class_id BIGINT NOT NULL, fee_plan_id BIGINT NOT NULL, active BIGINT NOT NULL, version BIGINT NOT NULL)".to_owned(),
            "CREATE TABLE erp_parents (id BIGINT PRIMARY KEY, name TEXT NOT NULL, student_id BIGINT NOT NULL)".to_owned(),
            // A real service stores a password hash (argon2, say); the demo's passwords are
            // public demo credentials.
            "CREATE TABLE erp_users (id TEXT PRIMARY KEY, role TEXT NOT NULL, ref_id BIGINT NOT NULL, demo_password TEXT NOT NULL)".to_owned(),
            // `request_key`: the Idempotency-Key the payment was recorded under (none for the
            // seeded ones), so that a duplicate would show.
            format!("CREATE TABLE erp_payments (id {serial}, student_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL, day BIGINT NOT NULL, request_key TEXT)"),
            // Requests waiting for the admin (absence notes); `fence`: the highest lock token
            // that wrote the row.
            "CREATE TABLE erp_requests (id BIGINT PRIMARY KEY, student_id BIGINT NOT NULL, status TEXT NOT NULL, approved_by TEXT, fence BIGINT NOT NULL)".to_owned(),
            format!("CREATE TABLE erp_notifications (id {serial}, user_id TEXT NOT NULL, body TEXT NOT NULL, unread BIGINT NOT NULL)"),
            "CREATE INDEX erp_notifications_user ON erp_notifications (user_id, unread)".to_owned(),
            "CREATE TABLE erp_attendance (student_id BIGINT NOT NULL, day BIGINT NOT NULL, present BIGINT NOT NULL, PRIMARY KEY (student_id, day))".to_owned(),
            "CREATE INDEX erp_payments_student ON erp_payments (student_id)".to_owned(),
            // Sessions: the authority the session index reads through (a token's SHA-256, never
            // the token).
            "CREATE TABLE erp_sessions (token_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, expires_ms BIGINT NOT NULL)".to_owned(),
            // Today's roll call as teachers submit it: one row per mark applied, so that a mark
            // applied twice would show; and the scratch batches already applied, so that a
            // batch delivered again is applied once.
            "CREATE TABLE erp_roll_marks (class_id BIGINT NOT NULL, student_id BIGINT NOT NULL, status TEXT NOT NULL, batch_id TEXT NOT NULL)".to_owned(),
            "CREATE TABLE erp_flushed_batches (id TEXT PRIMARY KEY)".to_owned(),
            "CREATE INDEX erp_students_class ON erp_students (class_id)".to_owned(),
            "CREATE INDEX erp_parents_student ON erp_parents (student_id)".to_owned(),
        ];
        for statement in &statements {
            sqlx::query(statement).execute(&self.pool).await?;
        }

        let mut tx = self.pool.begin().await?;
        let students = size.students.max(1);
        let teachers = size.teachers.clamp(1, students);
        insert_rows(
            &mut tx,
            "erp_fee_plans (id, name, amount_cents)",
            &FEE_PLANS,
            |q, p| q.bind(p.0).bind(p.1).bind(p.2),
        )
        .await?;
        let teacher_ids: Vec<i64> = (1..=teachers).collect();
        insert_rows(&mut tx, "erp_teachers (id, name)", &teacher_ids, |q, t| {
            q.bind(*t).bind(format!("Teacher {t}"))
        })
        .await?;
        insert_rows(
            &mut tx,
            "erp_classes (id, name, teacher_id)",
            &teacher_ids,
            |q, t| {
                q.bind(*t)
                    .bind(format!("Grade {}-{}", (t - 1) % 12 + 1, (t - 1) / 12 + 1))
                    .bind(*t)
            },
        )
        .await?;
        let student_ids: Vec<i64> = (1..=students).collect();
        insert_rows(
            &mut tx,
            "erp_students (id, name, phone, class_id, fee_plan_id, active, version)",
            &student_ids,
            |q, s| {
                q.bind(*s)
                    .bind(format!("Student {s}"))
                    .bind(format!("+1-555-{:07}", s))
                    .bind((s - 1) % teachers + 1)
                    .bind((s - 1) % 4 + 1)
                    .bind(1_i64)
                    .bind(1_i64)
            },
        )
        .await?;
        // Parent p<n> is the parent of student s<n>.
        insert_rows(
            &mut tx,
            "erp_parents (id, name, student_id)",
            &student_ids,
            |q, s| q.bind(*s).bind(format!("Parent of Student {s}")).bind(*s),
        )
        .await?;
        let mut users: Vec<(String, &str, i64)> = vec![("a1".to_owned(), "admin", 1)];
        users.extend((1..=teachers).map(|t| (format!("t{t}"), "teacher", t)));
        users.extend((1..=students).map(|s| (format!("s{s}"), "student", s)));
        users.extend((1..=students).map(|s| (format!("p{s}"), "parent", s)));
        insert_rows(
            &mut tx,
            "erp_users (id, role, ref_id, demo_password)",
            &users,
            |q, u| {
                q.bind(u.0.clone())
                    .bind(u.1)
                    .bind(u.2)
                    .bind(format!("demo-{}", u.0))
            },
        )
        .await?;
        // Two instalments already paid by every student.
        let payments: Vec<(i64, i64)> = student_ids
            .iter()
            .flat_map(|s| [(*s, 1), (*s, 2)])
            .collect();
        insert_rows(
            &mut tx,
            "erp_payments (student_id, amount_cents, day)",
            &payments,
            |q, p| q.bind(p.0).bind(10_000 + (p.0 % 7) * 500).bind(p.1),
        )
        .await?;
        // A pending request from every tenth student.
        let requests: Vec<i64> = student_ids
            .iter()
            .copied()
            .filter(|s| s % 10 == 0)
            .collect();
        insert_rows(
            &mut tx,
            "erp_requests (id, student_id, status, approved_by, fence)",
            &requests,
            |q, s| {
                q.bind(*s / 10)
                    .bind(*s)
                    .bind("pending")
                    .bind(None::<String>)
                    .bind(0_i64)
            },
        )
        .await?;
        let attendance: Vec<(i64, i64)> = student_ids
            .iter()
            .flat_map(|s| (1..=size.days).map(move |d| (*s, d)))
            .collect();
        insert_rows(
            &mut tx,
            "erp_attendance (student_id, day, present)",
            &attendance,
            |q, a| q.bind(a.0).bind(a.1).bind(i64::from((a.0 + a.1) % 11 != 0)),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The role of `user_id`, or `None` for an unknown user. One query.
    pub async fn role(&self, user_id: &str) -> DbResult<Option<RoleRecord>> {
        self.count();
        let row = sqlx::query(
            "SELECT u.role, COALESCE(p.student_id, c.id, u.ref_id), COALESCE(s.active, 1) \
             FROM erp_users u \
             LEFT JOIN erp_students s ON u.role = 'student' AND s.id = u.ref_id \
             LEFT JOIN erp_parents p ON u.role = 'parent' AND p.id = u.ref_id \
             LEFT JOIN erp_classes c ON u.role = 'teacher' AND c.teacher_id = u.ref_id \
             WHERE u.id = $1",
        )
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| {
            let role: String = r.get(0);
            let active: i64 = r.get(2);
            RoleRecord {
                role: if active == 1 {
                    role
                } else {
                    "suspended".into()
                },
                ref_id: r.get(1),
            }
        }))
    }

    /// Checks a login. One query.
    pub async fn check_password(&self, user_id: &str, password: &str) -> DbResult<bool> {
        self.count();
        let row = sqlx::query("SELECT demo_password FROM erp_users WHERE id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some_and(|r| r.get::<String, _>(0) == password))
    }

    /// A student's fees. One query.
    pub async fn fee_summary(&self, student_id: i64) -> DbResult<Option<FeeSummary>> {
        self.count();
        let row = sqlx::query(
            "SELECT s.name, f.name, f.amount_cents, \
               CAST(COALESCE((SELECT SUM(p.amount_cents) FROM erp_payments p WHERE p.student_id = s.id), 0) AS BIGINT), \
               CAST((SELECT COUNT(*) FROM erp_payments p WHERE p.student_id = s.id) AS BIGINT), \
               s.version \
             FROM erp_students s JOIN erp_fee_plans f ON f.id = s.fee_plan_id WHERE s.id = $1",
        )
        .bind(student_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| {
            let due: i64 = r.get(2);
            let paid: i64 = r.get(3);
            FeeSummary {
                student_id,
                student_name: r.get(0),
                plan: r.get(1),
                due_cents: due,
                paid_cents: paid,
                balance_cents: due - paid,
                payments: r.get(4),
                profile_version: r.get(5),
            }
        }))
    }

    /// A student's attendance. One query.
    pub async fn attendance(&self, student_id: i64) -> DbResult<Attendance> {
        self.count();
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT), CAST(COALESCE(SUM(present), 0) AS BIGINT) \
             FROM erp_attendance WHERE student_id = $1",
        )
        .bind(student_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Attendance {
            days: row.get(0),
            present: row.get(1),
        })
    }

    /// The profiles of `ids` that exist, by id: one query (`WHERE s.id IN (...)`) for a whole
    /// page, whatever its size.
    pub async fn students(&self, ids: &[i64]) -> DbResult<HashMap<i64, StudentProfile>> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        self.count();
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT s.id, s.name, s.phone, c.id, c.name, t.name, s.version \
             FROM erp_students s JOIN erp_classes c ON c.id = s.class_id \
             JOIN erp_teachers t ON t.id = c.teacher_id WHERE s.id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(*id);
        }
        Ok(query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r: &AnyRow| {
                let id: i64 = r.get(0);
                let profile = StudentProfile {
                    id,
                    name: r.get(1),
                    phone: r.get(2),
                    class_id: r.get(3),
                    class_name: r.get(4),
                    teacher_name: r.get(5),
                    version: r.get(6),
                };
                (id, profile)
            })
            .collect())
    }

    /// The class a teacher teaches and the ids of its active students (the roster's rows are
    /// read through the cache, see `AppState::profiles`). Two queries.
    pub async fn class_of_teacher(&self, teacher_id: i64) -> DbResult<Option<ClassMembers>> {
        self.count();
        let Some(class) = sqlx::query(
            "SELECT c.id, c.name, t.name FROM erp_classes c \
             JOIN erp_teachers t ON t.id = c.teacher_id WHERE c.teacher_id = $1",
        )
        .bind(teacher_id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let class_id: i64 = class.get(0);
        self.count();
        let student_ids = sqlx::query(
            "SELECT id FROM erp_students WHERE class_id = $1 AND active = 1 ORDER BY id",
        )
        .bind(class_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r: &AnyRow| r.get(0))
        .collect();
        Ok(Some(ClassMembers {
            class_id,
            class_name: class.get(1),
            teacher_name: class.get(2),
            student_ids,
        }))
    }

    /// School-wide figures. One query.
    pub async fn totals(&self) -> DbResult<SchoolTotals> {
        self.count();
        let row = sqlx::query(
            "SELECT \
               CAST((SELECT COUNT(*) FROM erp_students) AS BIGINT), \
               CAST((SELECT COUNT(*) FROM erp_teachers) AS BIGINT), \
               CAST((SELECT COUNT(*) FROM erp_payments) AS BIGINT), \
               CAST((SELECT COALESCE(SUM(amount_cents), 0) FROM erp_payments) AS BIGINT)",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(SchoolTotals {
            students: row.get(0),
            teachers: row.get(1),
            payments: row.get(2),
            collected_cents: row.get(3),
        })
    }

    /// Records a payment made under `request_key` (its Idempotency-Key); returns the student's
    /// new total paid, or `None` for an unknown student. Two queries.
    pub async fn record_payment(
        &self,
        student_id: i64,
        amount_cents: i64,
        request_key: &str,
    ) -> DbResult<Option<i64>> {
        self.count();
        let inserted = sqlx::query(
            "INSERT INTO erp_payments (student_id, amount_cents, day, request_key) \
             SELECT id, $2, 100, $3 FROM erp_students WHERE id = $1",
        )
        .bind(student_id)
        .bind(amount_cents)
        .bind(request_key)
        .execute(&self.pool)
        .await?;
        if inserted.rows_affected() == 0 {
            return Ok(None);
        }
        self.count();
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM erp_payments WHERE student_id = $1",
        )
        .bind(student_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(row.get(0)))
    }

    /// Records a session. One query.
    pub async fn create_session(
        &self,
        token_hash: &str,
        user_id: &str,
        expires_ms: i64,
    ) -> DbResult<()> {
        self.count();
        sqlx::query(
            "INSERT INTO erp_sessions (token_hash, user_id, expires_ms) VALUES ($1, $2, $3)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(expires_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session of a token hash: its user and expiry (Unix ms). One query.
    pub async fn session(&self, token_hash: &str) -> DbResult<Option<(String, i64)>> {
        self.count();
        let row = sqlx::query("SELECT user_id, expires_ms FROM erp_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Ends a session; true when there was one. One query.
    pub async fn delete_session(&self, token_hash: &str) -> DbResult<bool> {
        self.count();
        let done = sqlx::query("DELETE FROM erp_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Applies a batch of roll-call marks in one transaction, unless its id was applied before
    /// (then nothing, and `false`): a batch delivered twice is applied once.
    pub async fn apply_roll_batch(
        &self,
        batch_id: &str,
        class_id: i64,
        marks: &[(i64, String)],
    ) -> DbResult<bool> {
        self.count();
        let mut tx = self.pool.begin().await?;
        let fresh =
            sqlx::query("INSERT INTO erp_flushed_batches (id) VALUES ($1) ON CONFLICT DO NOTHING")
                .bind(batch_id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                > 0;
        if fresh {
            for (student, status) in marks {
                sqlx::query("INSERT INTO erp_roll_marks (class_id, student_id, status, batch_id) VALUES ($1, $2, $3, $4)")
                    .bind(class_id)
                    .bind(*student)
                    .bind(status.as_str())
                    .bind(batch_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(fresh)
    }

    /// The roll call as the database holds it: marks applied, students marked, and students
    /// marked more than once. One query.
    pub async fn roll_audit(&self) -> DbResult<(i64, i64, i64)> {
        self.count();
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT), CAST(COUNT(*) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN n > 1 THEN 1 ELSE 0 END), 0) AS BIGINT) \
             FROM (SELECT COUNT(*) AS n FROM erp_roll_marks GROUP BY class_id, student_id) per_student",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// Updates a student's profile; `None` for an unknown student. One query.
    pub async fn update_student(
        &self,
        student_id: i64,
        update: &ProfileUpdate,
    ) -> DbResult<Option<ProfileUpdated>> {
        self.count();
        let row = sqlx::query(
            "UPDATE erp_students SET name = $2, phone = $3, active = $4, version = version + 1 \
             WHERE id = $1 RETURNING version, class_id",
        )
        .bind(student_id)
        .bind(update.name.as_str())
        .bind(update.phone.as_str())
        .bind(i64::from(update.active))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| ProfileUpdated {
            version: r.get(0),
            class_id: r.get(1),
        }))
    }

    /// Payments recorded more than once under one Idempotency-Key (must be 0). One query.
    pub async fn duplicate_payments(&self) -> DbResult<i64> {
        self.count();
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) - COUNT(DISTINCT request_key) AS BIGINT) FROM erp_payments \
             WHERE request_key IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get(0))
    }

    /// Approves request `id` for `approver` if it is pending, with the lock token `fence`: the
    /// row is written only when `fence` is above every token that wrote it before, so a holder
    /// that lost its lock (paused past its lease) cannot write after a later holder. Returns the
    /// student to notify when this call approved it. Two queries when it did.
    pub async fn approve_request(
        &self,
        id: i64,
        approver: &str,
        fence: u64,
    ) -> DbResult<Option<i64>> {
        self.count();
        let fence = i64::try_from(fence).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "UPDATE erp_requests SET status = 'approved', approved_by = $2, fence = $3 \
             WHERE id = $1 AND status = 'pending' AND fence < $3 RETURNING student_id",
        )
        .bind(id)
        .bind(approver)
        .bind(fence)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Requests approved (each once). One query.
    pub async fn approved_requests(&self) -> DbResult<i64> {
        self.count();
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM erp_requests WHERE status = 'approved'",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get(0))
    }

    /// Adds an unread notification for `user_id`. One query.
    pub async fn notify(&self, user_id: &str, body: &str) -> DbResult<()> {
        self.count();
        sqlx::query("INSERT INTO erp_notifications (user_id, body, unread) VALUES ($1, $2, 1)")
            .bind(user_id)
            .bind(body)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `SELECT COUNT(*)` of `user_id`'s unread notifications. One query.
    pub async fn unread_notifications(&self, user_id: &str) -> DbResult<i64> {
        self.count();
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM erp_notifications WHERE user_id = $1 AND unread = 1",
        )
        .bind(user_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get(0))
    }

    /// Marks every notification of `user_id` read. One query.
    pub async fn read_notifications(&self, user_id: &str) -> DbResult<u64> {
        self.count();
        let done = sqlx::query(
            "UPDATE erp_notifications SET unread = 0 WHERE user_id = $1 AND unread = 1",
        )
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Closes the pool (and removes the SQLite file).
    pub async fn close(&self) {
        self.pool.close().await;
        self.remove_file();
    }

    fn remove_file(&self) {
        if let Some(file) = &self.file {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = file.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

impl Drop for Db {
    /// Removes the SQLite file on every path out, errors and panics included.
    fn drop(&mut self) {
        self.remove_file();
    }
}

/// A query with its bound values so far.
type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>;

/// Inserts `rows` in batches of multi-row `INSERT`s with bound values (numbered placeholders,
/// which both SQLite and PostgreSQL read).
async fn insert_rows<T>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    table_and_columns: &str,
    rows: &[T],
    bind: impl for<'q> Fn(AnyQuery<'q>, &T) -> AnyQuery<'q>,
) -> DbResult<()> {
    let columns = table_and_columns.matches(',').count() + 1;
    for chunk in rows.chunks(500) {
        let mut sql = format!("INSERT INTO {table_and_columns} VALUES ");
        let mut n = 0;
        for r in 0..chunk.len() {
            sql.push_str(if r == 0 { "(" } else { ", (" });
            for c in 0..columns {
                n += 1;
                sql.push_str(&format!("{}${n}", if c == 0 { "" } else { ", " }));
            }
            sql.push(')');
        }
        let mut query = sqlx::query(&sql);
        for row in chunk {
            query = bind(query, row);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}
