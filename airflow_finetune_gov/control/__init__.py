"""The governance control plane: the one process that holds what the controls rely on.

It runs under the deployment's own OS identity (the embedded stack: root, beside the scheduler and the
api-server), never under the DAG user that parses DAG files and runs tasks. It alone holds the
workload-identity signing key (so it alone can log in to OpenBao), the governance database writer, the
revoker and the database monitor. Governed operators reach it over a unix socket
(:mod:`airflow_finetune_gov.control.client`); it knows which task is calling by the kernel's account of
the calling process (``SO_PEERCRED``), matched to the task processes the executor registered
(:mod:`airflow_finetune_gov.executors.task_user`), never by anything the caller says about itself.
"""
