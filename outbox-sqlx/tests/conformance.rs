//! The testkit's store, relay and inbox suites, against each store on its real server.

mod common;

#[cfg(feature = "postgres")]
mod postgres {
    use super::common::inboxes::postgres as inbox;
    use super::common::pg::harness;

    outbox_testkit::store_suite!(harness);
    outbox_testkit::relay_suite!(harness);
    outbox_testkit::inbox_suite!(inbox);
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::common::inboxes::mysql as inbox;
    use super::common::my::harness;

    outbox_testkit::store_suite!(harness);
    outbox_testkit::relay_suite!(harness);
    outbox_testkit::inbox_suite!(inbox);
}

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::common::inboxes::sqlite as inbox;
    use super::common::lite::harness;

    outbox_testkit::store_suite!(harness);
    outbox_testkit::relay_suite!(harness);
    outbox_testkit::inbox_suite!(inbox);
}

/// The store and relay suites with each store's other claim mode: claims by lease on
/// PostgreSQL (which holds its claims in a transaction by default), claims held in a
/// transaction on MySQL (which claims by lease by default).
mod other_claim_mode {
    #[cfg(feature = "postgres")]
    mod postgres {
        use super::super::common::pg::harness_leased as harness;

        outbox_testkit::store_suite!(harness);
        outbox_testkit::relay_suite!(harness);
    }

    #[cfg(feature = "mysql")]
    mod mysql {
        use super::super::common::my::harness_held as harness;

        outbox_testkit::store_suite!(harness);
        outbox_testkit::relay_suite!(harness);
    }
}

/// The store suite on tables created by the schema script (what `outbox-relay schema` prints)
/// instead of `migrate`.
mod from_script {
    #[cfg(feature = "postgres")]
    mod postgres {
        use super::super::common::pg::harness_from_script as harness;

        outbox_testkit::store_suite!(harness);
    }

    #[cfg(feature = "mysql")]
    mod mysql {
        use super::super::common::my::harness_from_script as harness;

        outbox_testkit::store_suite!(harness);
    }

    #[cfg(feature = "sqlite")]
    mod sqlite {
        use super::super::common::lite::harness_from_script as harness;

        outbox_testkit::store_suite!(harness);
    }
}
