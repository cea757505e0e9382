"""Where the hub's state lives, and which hub process may change the leader-only part of it.

* ``database``: one way in for every store (``Database.run``: a function, one transaction, on
  a worker thread), SQLite files by default or PostgreSQL (``storage.database_url``), with
  fenced writes for the leader;
* ``migrations``: versioned schema steps each store applies when it opens (concurrent starts
  are safe);
* ``leader``: the leader among replicas (a PostgreSQL advisory lock and an epoch) or the sole
  SQLite process;
* ``copy``: ``edge-hub db migrate``, a SQLite hub's state copied into PostgreSQL.

The stores themselves (the registry's versions, rollouts, desired state) stay with their
subsystems and say their own SQL; this package knows nothing of what they keep.
"""
