"""spend: the whole budget lifecycle, from the rules to the ledger. Import the modules
themselves (settings import the rules, so this package imports nothing eagerly).

    rules, money, buckets, messages   pure budget arithmetic (re-exported by `budgets`)
    ledger/                           where reservations and spend are kept (SQLite, Redis)
    admission                         reserve a request's worst case → Admission with its Hold
    hold                              the Hold and the Admission
    lifecycle                         Spend: settle or release each hold once, the outbox of
                                      settlements the ledger could not take, the chores
    metrics, webhook                  what budgets export and announce
"""
