//! The in-memory store and publisher pass every suite.

use std::time::Duration;

use outbox_core::{MemoryStore, MessageId, NewMessage, StoreError};
use outbox_testkit::StoreHarness;

struct MemoryHarness {
    store: MemoryStore,
}

impl StoreHarness for MemoryHarness {
    type Store = MemoryStore;

    fn store(&self) -> MemoryStore {
        self.store.clone()
    }

    async fn enqueue(&self, messages: Vec<NewMessage>) -> Result<Vec<MessageId>, StoreError> {
        let mut tx = self.store.begin();
        let ids = messages
            .into_iter()
            .map(|m| tx.enqueue(m))
            .collect::<Result<Vec<_>, _>>()?;
        tx.commit();
        Ok(ids)
    }

    async fn enqueue_rolled_back(&self, messages: Vec<NewMessage>) -> Result<(), StoreError> {
        let mut tx = self.store.begin();
        for m in messages {
            tx.enqueue(m)?;
        }
        tx.rollback();
        Ok(())
    }

    async fn enqueue_overlapping(
        &self,
        first: Vec<NewMessage>,
        second: Vec<NewMessage>,
    ) -> Result<bool, StoreError> {
        let mut one = self.store.begin();
        for m in first {
            one.enqueue(m)?;
        }
        let mut two = self.store.begin();
        for m in second {
            two.enqueue(m)?;
        }
        two.commit();
        one.commit();
        Ok(true)
    }

    fn with_retention(&self, retention: Duration) -> Option<MemoryStore> {
        // Retention is a property of the handle; the tables are shared.
        Some(self.store.clone().with_retention(retention))
    }

    async fn corrupt(&self, id: MessageId) -> bool {
        self.store
            .corrupt(id, "headers: invalid JSON (corrupted by hand)");
        true
    }

    async fn teardown(self) {}
}

async fn harness() -> Option<MemoryHarness> {
    Some(MemoryHarness {
        store: MemoryStore::new(),
    })
}

outbox_testkit::store_suite!(harness);
outbox_testkit::relay_suite!(harness);

mod properties {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

        #[test]
        fn random_failure_schedules_lose_nothing_and_keep_key_order(
            schedule in outbox_testkit::schedule::schedules()
        ) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            rt.block_on(outbox_testkit::schedule::run(super::MemoryHarness { store: outbox_core::MemoryStore::new() }, schedule));
        }
    }
}
