"""Rate and concurrency limits: requests and tokens per minute (GCRA) and requests in
flight, per key, user, team or model, shared exactly by every worker and instance that
shares the ledger."""
