"""Airflow Assets that connect the DAGs: a new dataset version triggers retraining."""
from airflow.sdk import Asset

DATASET_VERSION = Asset(name="shoplens_dataset_version", uri="s3://shoplens/datasets/")
