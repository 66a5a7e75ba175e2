"""The billing service: plans, subscriptions, charges, renewals, cancellations and refunds on the
MariaDB Galera cluster, with a double-entry ledger and a transactional outbox to ``billing.events``."""
