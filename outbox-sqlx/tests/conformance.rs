//! The testkit's store and relay suites, against each store on its real server.

mod common;

#[cfg(feature = "postgres")]
mod postgres {
    use super::common::pg::harness;

    outbox_testkit::store_suite!(harness);
    outbox_testkit::relay_suite!(harness);
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::common::my::harness;

    outbox_testkit::store_suite!(harness);
    outbox_testkit::relay_suite!(harness);
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::common::lite::harness;

    outbox_testkit::store_suite!(harness);
    outbox_testkit::relay_suite!(harness);
}
