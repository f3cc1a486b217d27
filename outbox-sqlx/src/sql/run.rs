//! Transactions and scripts: begun and run so that cancelling the caller leaves nothing
//! behind, with futures that are `Send`.

use std::future::Future;
use std::pin::Pin;

use outbox_core::StoreError;

/// Begins a transaction on `pool` (with `statement`, or a plain `BEGIN`), in a task of its
/// own.
///
/// The relay drops in-flight store calls when it stops. Once a transaction exists, dropping
/// it rolls it back; but sqlx's MySQL `begin` (and its SQLite `begin_with`) has a window
/// after the database began the transaction and before the `Transaction` exists: cancelled
/// there, the connection would go back to the pool inside a transaction that nobody ends,
/// and its next user would run in it, holding its locks. Begun in a task of its own, the
/// transaction always comes into existence, and is rolled back if nobody waits for it any
/// more.
pub(crate) async fn begin<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
    statement: Option<&'static str>,
    doing: &str,
) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
    let pool = pool.clone();
    let begun = tokio::spawn(async move {
        match statement {
            Some(statement) => pool.begin_with(statement).await,
            None => pool.begin().await,
        }
    })
    .await;
    match begun {
        Ok(begun) => begun.map_err(|err| crate::error::from_sqlx(err, doing)),
        Err(err) => Err(StoreError::new(
            outbox_core::StoreErrorKind::Database,
            format!("{doing}: the task beginning the transaction failed"),
        )
        .with_source(err)),
    }
}

/// What a statement run by an `E` returns.
type QueryResult<'e, E> = <<E as sqlx::Executor<'e>>::Database as sqlx::Database>::QueryResult;

/// Runs `script` (statements separated by `;`, no parameters) on `executor`.
///
/// Not `sqlx::raw_sql(script).execute(executor)`: that is an `async fn` generic over its
/// executor, and a future that holds it across an await on `&mut *tx` is not `Send` for every
/// lifetime ("implementation of `Executor` is not general enough"), so a caller could not run
/// `migrate` in `tokio::spawn`. `Executor::execute` returns a boxed `Send` future.
pub(crate) fn run_script<'e, E>(
    executor: E,
    script: &'e str,
) -> Pin<Box<dyn Future<Output = Result<QueryResult<'e, E>, sqlx::Error>> + Send + 'e>>
where
    E: sqlx::Executor<'e>,
{
    executor.execute(sqlx::raw_sql(script))
}
