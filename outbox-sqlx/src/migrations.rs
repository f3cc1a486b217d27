//! The outbox schema, written once for the three dialects: the steps that bring the tables from
//! one version to the next, run by a store's `migrate` or handed to `sqlx`'s
//! [`Migrator`](sqlx::migrate::Migrator) as [`SqlxMigrations`].
//!
//! Each step is a script of its own: the dialect's migration, the record of its version in the
//! `{table}_schema` table, and the partition rows (inserted if missing). So the two ways of
//! migrating agree: a store sees the version a `Migrator` applied, and the reverse does no harm.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use outbox_core::{PARTITIONS, StoreError};
use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType};

use crate::config::Names;
use crate::sql::{Dialect, Sql};

/// The outbox schema of one dialect: its migrations and how it keeps the record of the
/// versions applied.
#[derive(Debug)]
pub(crate) struct Schema {
    /// The migrations, in order: version and template (see [`render`]).
    pub(crate) migrations: &'static [(i32, &'static str)],
    pub(crate) dialect: &'static Dialect,
    /// `CREATE TABLE IF NOT EXISTS {schema} (version ..., applied_at ...)`.
    pub(crate) versions_table: &'static str,
    /// Counts the versions tables of `names` (0 or 1), before there may be one.
    pub(crate) exists: fn(&Names) -> Sql,
    /// Drops the outbox's tables (and functions), every statement `IF EXISTS`.
    pub(crate) drop: &'static str,
    /// What turns the table's notifications off (PostgreSQL's notify trigger), or nothing.
    pub(crate) without_notify: &'static str,
    /// The earliest time, as the partitions' `expires_at` column takes it.
    pub(crate) epoch: &'static str,
    /// The 64-bit integer type of `CAST`.
    pub(crate) bigint: &'static str,
}

impl Schema {
    /// The version of the last migration: the schema a store of this release migrates to and
    /// expects.
    pub(crate) const fn latest(&self) -> i32 {
        match self.migrations.last() {
            Some((version, _)) => *version,
            None => 0,
        }
    }

    /// Counts the versions tables of `names`: 0 before the first migration, else 1.
    pub(crate) fn exists(&self, names: &Names) -> Sql {
        (self.exists)(names)
    }

    /// Drops the outbox's tables.
    pub(crate) fn drop(&self, names: &Names) -> String {
        render(self.drop, names)
    }

    /// Creates the table of applied versions, if missing.
    pub(crate) fn create_versions(&self, names: &Names) -> String {
        render(self.versions_table, names)
    }

    /// The version the tables are at (0 before the first migration), as a 64-bit integer.
    pub(crate) fn current(&self, names: &Names) -> String {
        format!(
            "SELECT CAST(COALESCE(MAX(version), 0) AS {}) FROM {}",
            self.bigint, names.schema
        )
    }

    /// The scripts that bring tables at version `current` to [`Self::latest`], in order;
    /// an error for tables a newer release migrated.
    pub(crate) fn steps(&self, names: &Names, current: i64) -> Result<Vec<String>, StoreError> {
        let current = i32::try_from(current).unwrap_or(i32::MAX);
        crate::check_version(current, self.latest())?;
        Ok(self
            .migrations
            .iter()
            .filter(|(version, _)| *version > current)
            .map(|(version, template)| self.step(names, *version, template))
            .collect())
    }

    /// The script of one step: the migration, the record of its version, the partition rows.
    fn step(&self, names: &Names, version: i32, template: &str) -> String {
        let (insert, tail) = self.dialect.insert_ignore;
        format!(
            "{};\n{insert} {} (version, applied_at) VALUES ({version}, {}){tail};\n{};\n",
            render(template, names).trim_end().trim_end_matches(';'),
            names.schema,
            self.dialect.now,
            seed_partitions(names, self.dialect, insert, tail, self.epoch),
        )
    }

    /// The whole script that brings tables at version `from` (0: none yet) to
    /// [`Self::latest`]: the versions table, each step, and without notifications (`notify`
    /// false) what turns them off.
    pub(crate) fn script(
        &self,
        names: &Names,
        from: i32,
        notify: bool,
    ) -> Result<String, StoreError> {
        let mut script = format!("{};\n", self.create_versions(names));
        for step in self.steps(names, from.into())? {
            script.push_str(&step);
        }
        if !notify && !self.without_notify.is_empty() {
            script.push_str(&render(self.without_notify, names));
            script.push_str(";\n");
        }
        Ok(script)
    }

    /// The steps as `sqlx` migrations numbered from `first_version`.
    pub(crate) fn sqlx_migrations(&self, names: &Names, first_version: i64) -> SqlxMigrations {
        let migrations = self
            .migrations
            .iter()
            .enumerate()
            .map(|(i, (version, template))| {
                let mut script = self.step(names, *version, template);
                if i == 0 {
                    script.insert_str(0, &format!("{};\n", self.create_versions(names)));
                }
                Migration::new(
                    first_version + i64::from(*version) - 1,
                    Cow::Owned(format!("outbox {} schema version {version}", names.table)),
                    MigrationType::Simple,
                    Cow::Owned(script),
                    false,
                )
            })
            .collect();
        SqlxMigrations { migrations }
    }
}

/// The rows every partition needs, each free, written by the migration if missing. The
/// dialect's `insert_ignore` is the start of an INSERT that skips existing rows, its
/// `epoch` a time long past.
pub(crate) fn seed_partitions(
    names: &Names,
    d: &Dialect,
    insert_ignore: &str,
    tail: &str,
    epoch: &str,
) -> String {
    let rows: Vec<String> = (0..PARTITIONS)
        .map(|p| format!("({p}, '', {epoch})"))
        .collect();
    format!(
        "{insert_ignore} {} ({}, owner, expires_at) VALUES {}{tail}",
        names.partitions,
        d.col("partition"),
        rows.join(", ")
    )
}

/// Migration text for `names`: the placeholders `{table}`, `{partitions}`, `{relays}`,
/// `{claim}` and `{schema}` replaced by quoted, validated names, `{ix_<suffix>}`,
/// `{fn_<suffix>}` and `{trg_<suffix>}` by the names of the table's indexes, functions and
/// triggers, and `{channel}` by the notify channel as a string literal.
pub(crate) fn render(template: &str, names: &Names) -> String {
    let mut text = template
        .replace("{table}", &names.table)
        .replace("{partitions}", &names.partitions)
        .replace("{relays}", &names.relays)
        .replace("{claim}", &names.claim)
        .replace("{schema}", &names.schema)
        .replace(
            "{channel}",
            &format!("'{}'", names.channel.replace('\'', "''")),
        );
    type Derive = fn(&Names, &str) -> String;
    let derived: [(&str, Derive); 3] = [
        ("{ix_", Names::index),
        ("{fn_", Names::function),
        ("{trg_", Names::trigger),
    ];
    for (prefix, name) in derived {
        let mut from = 0;
        while let Some(start) = text[from..].find(prefix).map(|at| from + at) {
            let Some(len) = text[start..].find('}') else {
                break;
            };
            let suffix = text[start + prefix.len()..start + len].to_owned();
            let replacement = name(names, &suffix);
            text.replace_range(start..=start + len, &replacement);
            from = start + replacement.len();
        }
    }
    text
}

/// The outbox's migrations as `sqlx` migrations, for a service whose schema changes all run
/// through `sqlx`'s [`Migrator`](sqlx::migrate::Migrator) (or `sqlx migrate`): a
/// [`MigrationSource`] to build one from, alone or together with the service's own migrations.
///
/// Migration `n` of the outbox (1, 2, ...) gets the `sqlx` version `first_version + n - 1`:
/// reserve a range for it (future releases add versions), and keep `first_version` the same
/// for ever, since `sqlx` knows applied migrations by version and checksum. Each one also
/// records its version in the outbox's own `{table}_schema` table, so the store's
/// [`migrate`](crate::PostgresStore::migrate) finds nothing left to do afterwards. Run one or
/// the other at a time, not both at once.
///
/// `sqlx` refuses to run a `Migrator` when the database holds applied migrations it does not
/// list: give one `Migrator` the service's migrations and these ([`SqlxMigrations::with`]), or
/// call `set_ignore_missing(true)` on each.
#[derive(Debug, Clone)]
pub struct SqlxMigrations {
    migrations: Vec<Migration>,
}

impl SqlxMigrations {
    /// These migrations and `others` (for example `sqlx::migrate!().iter().cloned()`), in
    /// version order, for one `Migrator` that runs them all.
    pub fn with(mut self, others: impl IntoIterator<Item = Migration>) -> Self {
        self.migrations.extend(others);
        self.migrations.sort_by_key(|migration| migration.version);
        self
    }

    /// The migrations, in version order.
    pub fn into_vec(self) -> Vec<Migration> {
        self.migrations
    }
}

impl<'s> MigrationSource<'s> for SqlxMigrations {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 's>> {
        Box::pin(async move { Ok(self.migrations) })
    }
}
