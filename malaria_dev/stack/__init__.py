"""A local stack of real servers: SeaweedFS (S3) and a Prefect server, started by the project.

``stack_up`` starts them as detached processes whose pid files, logs, data and credentials
live in one state folder (``.malaria/`` by default, ``MALARIA_STATE_DIR`` or ``--state-dir``)::

    .malaria/
      s3-identities.json   S3 access key + secret (mode 0600), given to weed -s3.config
      stack.env            what a client process needs (mode 0600): endpoint, keys, API URL
                           and the Prefect API auth string
      security/            SeaweedFS security.toml (JWT keys) + gRPC mTLS certificates (0600)
      stack.json           the bucket and ports this folder's stack was started with
      seaweedfs/           SeaweedFS data (volumes, filer metadata, master raft state)
      prefect/             PREFECT_HOME with the SQLite database
      logs/                seaweedfs.log, prefect.log, worker-<pool>.log
      run/                 seaweedfs.pid, prefect.pid, worker-<pool>.pid
      stack.lock           serialises concurrent up/down on the same folder

Everything listens on loopback only and nothing answers without credentials (the S3 keys,
the Prefect auth string, SeaweedFS's JWT keys and client certificate: see ``security``), each port set by a ``MALARIA_*_PORT`` variable, so two
stacks with their own folders and ports run side by side. Secrets are written to files and
never printed. Linux/macOS only (process groups, flock).

Modules: ``config`` (folder, ports, variables), ``ports`` (free/busy ports),
``credentials`` (S3 identity, Prefect auth string, client environment), ``security``
(SeaweedFS's keys and certificates), ``processes`` (start, pid files, stop),
``seaweedfs`` and ``prefect_server`` (one server each), ``workers`` (Prefect workers),
``lifecycle`` (up, down, status). This package exports what other code uses.
"""

from malaria_dev.stack.config import (
    GRPC_OFFSET,
    PORT_VARIABLES,
    SERVICES,
    StackConfig,
    StackError,
)
from malaria_dev.stack.credentials import (
    load_stack_env,
    prefect_api_client,
    prefect_auth_string,
    s3_credentials,
    stack_env,
    stack_s3_client,
    use_local_stack_if_configured,
)
from malaria_dev.stack.lifecycle import (
    ServiceStatus,
    StackStatus,
    stack_down,
    stack_status,
    stack_up,
)
from malaria_dev.stack.ports import free_port, free_ports
from malaria_dev.stack.prefect_server import (
    prefect_argv,
    prefect_server_env,
    start_prefect,
    wait_prefect_healthy,
)
from malaria_dev.stack.seaweedfs import (
    find_weed,
    seaweedfs_argv,
    start_seaweedfs,
    wait_s3_healthy,
)
from malaria_dev.stack.workers import start_worker, stop_workers, worker_pids

__all__ = [
    "GRPC_OFFSET",
    "PORT_VARIABLES",
    "SERVICES",
    "ServiceStatus",
    "StackConfig",
    "StackError",
    "StackStatus",
    "find_weed",
    "free_port",
    "free_ports",
    "load_stack_env",
    "prefect_api_client",
    "prefect_argv",
    "prefect_auth_string",
    "prefect_server_env",
    "s3_credentials",
    "seaweedfs_argv",
    "stack_down",
    "stack_env",
    "stack_s3_client",
    "stack_status",
    "stack_up",
    "start_prefect",
    "start_seaweedfs",
    "start_worker",
    "stop_workers",
    "use_local_stack_if_configured",
    "wait_prefect_healthy",
    "wait_s3_healthy",
    "worker_pids",
]
