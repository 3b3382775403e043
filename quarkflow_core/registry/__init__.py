"""The model registry: immutable versions, the ``champion`` / ``challenger`` aliases, the
promotion policy, human approval with a frozen evidence bundle, rollback and history.

The rules hold whatever the caller (CLI, API, workbench, flows); each module states its own:

* ``lookups``   read-only: resolve ``3`` / ``"v3"`` / ``"champion"``, list versions and aliases,
  a version's summary and lineage.
* ``events``    the promotion event log: the registry write lock, alias moves, append-only events
  with their evidence sha256 (``set_challenger``), and reading them back (``history``).
* ``versions``  register an artifact once (files first, row last) and read it back verified
  (``verify_stored``, ``materialize``, ``load_version``, ``model_cache_dir``).
* ``policy``    compare two versions on the hold-out and judge the comparison; advises only.
* ``promotion`` the decisions: ``approve``, ``reject``, ``rollback``, by an ML lead with a reason,
  in one transaction with their event and audit row, refused on a concurrent change.

Each module imports only those listed above it. Callers use the package:
``from quarkflow_core import registry; registry.approve(...)``.

Everything is per project: every function that reads or writes versions, aliases or events
takes ``project_id`` (default: the default project); versions are numbered per project, each
project has its own ``champion`` / ``challenger`` and history, and another project's version
answers NotFound like an unknown one.

Transactions: the reads never commit. The writes (``register_version``, ``set_challenger``,
``approve``, ``reject``, ``rollback``) commit by design: each takes the registry lock in a
fresh transaction (ending the caller's) and commits its change with the event and audit row
that record it, so a promotion is one transaction with its audit record whoever calls it.
"""

from quarkflow_core.registry.events import (
    champion_at,
    event_dict,
    evidence_sha256,
    history,
    set_challenger,
    verify_event,
)
from quarkflow_core.registry.lookups import (
    ALIASES,
    CHALLENGER,
    CHAMPION,
    alias_of,
    aliases,
    get_version,
    in_project,
    lineage,
    list_versions,
    summary,
)
from quarkflow_core.registry.policy import (
    PolicyConfig,
    PolicyVerdict,
    Proposal,
    compare_versions,
    evaluate_policy,
    propose,
)
from quarkflow_core.registry.promotion import (
    MIN_OVERRIDE_REASON,
    MIN_REASON,
    approve,
    champion_stack,
    reject,
    rollback,
)
from quarkflow_core.registry.versions import (
    load_version,
    materialize,
    model_cache_dir,
    register_version,
    storage_prefix,
    verify_stored,
)

__all__ = [
    "ALIASES",
    "CHALLENGER",
    "CHAMPION",
    "MIN_OVERRIDE_REASON",
    "MIN_REASON",
    "PolicyConfig",
    "PolicyVerdict",
    "Proposal",
    "alias_of",
    "aliases",
    "approve",
    "champion_at",
    "champion_stack",
    "compare_versions",
    "evaluate_policy",
    "event_dict",
    "evidence_sha256",
    "get_version",
    "history",
    "in_project",
    "lineage",
    "list_versions",
    "load_version",
    "materialize",
    "model_cache_dir",
    "propose",
    "register_version",
    "reject",
    "rollback",
    "set_challenger",
    "storage_prefix",
    "summary",
    "verify_event",
    "verify_stored",
]
