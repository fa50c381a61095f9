"""Prefect flows that sequence and schedule the DVC stages; dvc.yaml stays the one truth about the DAG."""
