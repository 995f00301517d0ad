"""airflow-finetune-gov: governed LLM fine-tuning for Apache Airflow.

The governance logic (policy, lineage chain, lease bookkeeping, evaluation) lives in plain modules
that do not import Airflow; the Airflow adapters (operators, hooks, plugin) are thin layers on top.
"""

__version__ = "0.1.0"
